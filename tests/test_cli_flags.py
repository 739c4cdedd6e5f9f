"""mlx-lm's flag names as aliases (each gives the same config as ours), one output flag on every command that
writes, and messages that name the flag the user typed."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from mlx_persona.cli import main
from mlx_persona.cli import train as train_cli
from mlx_persona.cli.doctor import init_model_cmd
from mlx_persona.cli.eval import compare, eval_cmd, sweep
from mlx_persona.cli.export import export_onnx_cmd, fuse, web
from mlx_persona.cli.export_gguf import gguf_cmd, ollama_cmd
from mlx_persona.cli.generate import chat, generate, make_generation_config
from mlx_persona.tuner.config import to_dict


def cli(*args, **kwargs):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, **kwargs)


def params(command, *args) -> dict:
    """What click makes of `args` for `command` (its parameters), without running it."""
    return dict(command.make_context(command.name, [str(a) for a in args]).params)


def train_config(*args) -> tuple[dict, bool]:
    """The config (as a dict) and the resume flag `mlx-persona train ARGS` would run with."""
    ctx = train_cli.train.make_context("train", [str(a) for a in args])
    with ctx:
        cfg, resume = train_cli.configure(ctx.params)
    return to_dict(cfg), resume


def generation(command, *args):
    """The GenerationConfig `command ARGS` would generate with."""
    ctx = command.make_context(command.name, [str(a) for a in args])
    with ctx:
        p = ctx.params
        settings = {k: p[k] for k in ("max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p", "min_p",
                                      "repetition_penalty", "no_repeat_ngram_size", "stop", "seed")}
        return make_generation_config(p["preset"], **settings)


def test_mlx_lm_train_flags_give_the_same_config_as_ours(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"epochs": 2, "lora": {"alpha": 8.0}}))
    pairs = [  # (mlx_lm.lora's spelling, ours)
        (["--iters", 3], ["--steps", 3]),
        (["--adapter-path", tmp_path / "run"], ["--output", tmp_path / "run"]),
        (["-o", tmp_path / "run"], ["--output", tmp_path / "run"]),
        (["--fine-tune-type", "dora"], ["--method", "dora"]),
        (["--num-layers", 2], ["--set", "lora.num_layers=2"]),
        (["--save-every", 5], ["--set", "save_every=5"]),
        (["--batch-size", 2], ["--set", "batch_size=2"]),
        (["--learning-rate", "1e-3"], ["--set", "optim.learning_rate=1e-3"]),
        (["--seed", 3], ["--set", "seed=3"]),
        (["--max-seq-length", 64], ["--max-seq-len", 64]),
        (["--grad-accumulation-steps", 2], ["--grad-accumulation", 2]),
        (["--steps-per-eval", 7], ["--eval-every", 7]),
        (["--val-batches", 2], ["--eval-batches", 2]),
        (["--steps-per-report", 3], ["--log-every", 3]),
        (["-m", "builtin:gemma-3-270m"], ["--model", "builtin:gemma-3-270m"]),
        (["-c", config], ["--config", config]),
    ]
    default, _ = train_config()
    for theirs, ours in pairs:
        got, want = train_config(*theirs), train_config(*ours)
        assert got == want, (theirs, ours)
        assert got[0] != default, ours  # each pair sets something
    assert train_config("--save-every", 5)[0]["save_every"] == 5
    assert train_config("--num-layers", 2)[0]["lora"]["num_layers"] == 2
    # mlx_lm.lora's --train ("do train") is accepted and changes nothing.
    assert train_config("--train", "--iters", 3) == train_config("--steps", 3)


def test_resume_adapter_file_resumes_the_run_that_holds_it(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("{}\n")
    (run / "adapters.safetensors").write_bytes(b"")
    for file in (run / "adapters.safetensors", run):
        cfg, resume = train_config("--resume-adapter-file", file)
        assert resume and cfg["output"] == str(run)
    assert train_config("--resume-adapter-file", run / "adapters.safetensors", "-o", run)[1]
    other = cli("train", "--resume-adapter-file", run / "adapters.safetensors", "-o", tmp_path / "elsewhere")
    assert other.exit_code == 1 and f"resumes the run in {run}" in other.output
    stray = tmp_path / "adapters.safetensors"
    stray.write_bytes(b"")
    result = cli("train", "--resume-adapter-file", stray)
    assert result.exit_code == 1 and "not in an output folder of `mlx-persona train`" in result.output
    assert "Traceback" not in result.output


def test_mlx_lm_generation_flags_give_the_same_settings_as_ours():
    pairs = [(["--max-tokens", 17], ["--max-new-tokens", 17]), (["--temp", 0.3], ["--temperature", 0.3]),
             (["--top-p", 0.5], ["--top-p", 0.5]), (["--min-p", 0.2], ["--min-p", 0.2]), (["--seed", 9], ["--seed", 9])]
    default = generation(generate, "-p", "x")
    for theirs, ours in pairs:
        for command in (generate, chat):
            extra = ["-p", "x"] if command is generate else []
            got = generation(command, *extra, *theirs)
            assert got == generation(command, *extra, *ours) != default, theirs
    for theirs, ours in [(["-m", "builtin:tiny"], ["--model", "builtin:tiny"]), (["-p", "hi"], ["--prompt", "hi"]),
                         (["--adapter-path", "runs/a"], ["--adapter", "runs/a"]),
                         (["--system-prompt", "Be Bluey."], ["--system", "Be Bluey."]),
                         (["--ignore-chat-template"], ["--raw"])]:
        base = [] if "-p" in theirs else ["-p", "x"]
        assert params(generate, *base, *theirs) == params(generate, *base, *ours) != params(generate, "-p", "x")
    assert params(chat, "-m", "builtin:tiny", "--adapter-path", "r") == params(chat, "--model", "builtin:tiny",
                                                                              "--adapter", "r")


def test_generate_with_mlx_lm_flags_writes_the_same_reply(tiny_path):
    theirs = cli("generate", "-m", tiny_path, "-p", "Hi Bluey!", "--max-tokens", 6, "--temp", 0.7, "--seed", 4,
                 "--top-p", 0.9, "--json")
    ours = cli("generate", "--model", tiny_path, "--prompt", "Hi Bluey!", "--max-new-tokens", 6, "--temperature",
               0.7, "--seed", 4, "--top-p", 0.9, "--json")
    assert theirs.exit_code == ours.exit_code == 0, theirs.output
    a, b = json.loads(theirs.stdout), json.loads(ours.stdout)
    assert a["tokens"] == b["tokens"] and len(a["tokens"]) == 6
    piped = cli("generate", "-m", tiny_path, "-p", "-", "--max-tokens", 6, "--temp", 0.7, "--seed", 4, "--top-p",
                0.9, "--json", input="Hi Bluey!")
    assert json.loads(piped.stdout)["tokens"] == a["tokens"]  # -p - reads the prompt from stdin


def test_every_command_that_writes_takes_o_and_output(tmp_path):
    out = str(tmp_path / "out")
    commands = {  # command -> (its other required arguments, the parameter that holds the folder)
        train_cli.train: ([], "output"), eval_cmd: (["-m", "builtin:tiny"], "out"),
        sweep: (["-m", "builtin:tiny"], "out"), compare: (["recipe.yaml"], "out"),
        fuse: (["--adapter", "runs/a"], "out"), export_onnx_cmd: (["hf"], "out"), init_model_cmd: ([], "output"),
        web: (["runs/a"], "output"), gguf_cmd: (["runs/a"], "out"), ollama_cmd: (["runs/a"], "out"),
    }
    for command, (rest, name) in commands.items():
        for flag in ("-o", "--output"):
            assert params(command, *rest, flag, out)[name] == out, (command.name, flag)
    for command in (eval_cmd, sweep, compare, fuse, export_onnx_cmd, gguf_cmd):  # the old spelling still works
        assert params(command, *commands[command][0], "--out", out)["out"] == out
    assert params(fuse, "--adapter", "a", "--save-path", out)["out"] == out  # mlx_lm.fuse's name
    assert params(train_cli.train, "--output", out) == params(train_cli.train, "--adapter-path", out)
    made = cli("init-model", "-o", out)
    assert made.exit_code == 0 and (tmp_path / "out" / "config.json").is_file()
    both = cli("init-model", out, "-o", out)
    assert both.exit_code == 1 and "OUT or -o/--output" in both.output


@pytest.mark.parametrize("args, message", [
    (["--top-p", 1.5], "error: --top-p: must be a number in (0, 1] (1 = off), got 1.5"),
    (["--temp", -1], "error: --temp: must be a finite number >= 0"),
    (["--temperature", -1], "error: --temperature: must be a finite number >= 0"),
    (["--max-tokens", 0], "error: --max-tokens: must be an integer >= 1"),
    (["--min-new-tokens", 30, "--max-tokens", 20],
     "error: --min-new-tokens 30 is greater than --max-tokens 20: every reply would run to the length limit"),
    (["--min-new-tokens", 300], "error: --min-new-tokens 300 is greater than max_new_tokens 256 (of --preset"),
])
def test_generation_errors_name_the_flag_typed(args, message):
    for command in (["generate", "-p", "hi"], ["chat"], ["eval", "-o", "unused"]):
        result = cli(*command, "-m", "builtin:tiny", *args)
        assert result.exit_code == 1 and result.output.startswith(message), (command, result.output)
        assert "GenerationConfig" not in result.output and "Traceback" not in result.output


def test_train_errors_name_the_flag_typed(tmp_path):
    for args, start in [(["--steps", -1], "error: --steps: must be >= 0"),
                        (["--iters", -1], "error: --iters: must be >= 0"),
                        (["--set", "steps=-1"], "error: steps: must be >= 0"),  # the key typed
                        (["--learning-rate", 0], "error: --learning-rate: must be > 0"),
                        (["--num-layers", 0], "error: --num-layers: must be -1 or >= 1"),
                        (["--adapter-path", " "], "error: --adapter-path: must name a folder")]:
        result = cli("train", "-o", tmp_path / "o", *args) if "-o" not in args and "--adapter-path" not in args \
            else cli("train", *args)
        assert result.exit_code == 1 and result.output.startswith(start), (args, result.output)
    assert not (tmp_path / "o").exists()


def test_a_presets_min_new_tokens_above_a_smaller_max_is_allowed():
    # persona's min_new_tokens=50 with --max-new-tokens 8: a short reply with the preset's other settings.
    cfg = generation(generate, "-p", "x", "--preset", "persona", "--max-new-tokens", 8)
    assert (cfg.min_new_tokens, cfg.max_new_tokens, cfg.temperature) == (50, 8, 0.8)


def test_a_number_as_the_model_points_to_max_tokens():
    result = cli("generate", "-m", "200", "-p", "hi")
    assert result.exit_code == 1 and "use --max-tokens 200" in result.output
