"""End-to-end training: the CLI, the files written, what changes, and that plain mlx-lm loads the result."""

import json
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from mlx_persona.cli import main
from mlx_persona.tuner.config import load_config
from mlx_persona.tuner.run import run

REPO = Path(__file__).resolve().parents[1]


def _run(args):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    return result


def _metrics(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def lora_run(tiny_path, small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "lora"
    # lr 3e-3: at 1e-2 this 12-example run is chaotic (Adam turns 1e-6 differences in the numerics into a
    # different loss curve after a few steps), so "the loss went down" would test the rounding.
    result = _run(["train", "--model", str(tiny_path), "--data", str(small_data), "-o", str(out),
                   "--steps", "12", "--batch-size", "4", "--learning-rate", "3e-3", "--no-progress",
                   "--set", "log_every=2", "--set", "eval_every=6", "--set", "save_every=6",
                   "--set", "lora.rank=4"])
    assert result.exit_code == 0, result.output
    return out


def test_cli_train_writes_everything(lora_run):
    out = lora_run
    for name in ("adapters.safetensors", "adapter_config.json", "config.yaml", "metrics.jsonl", "loss.png",
                 "summary.json", "best/adapters.safetensors", "best/adapter_config.json"):
        assert (out / name).is_file(), name
    rows = _metrics(out)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    for key in ("step", "loss", "lr", "tokens_per_sec", "peak_memory_gb", "loss_tokens_per_sec"):
        assert key in rows[0]
    assert [r["step"] for r in rows if "val_loss" in r] == [6, 12]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["best_val_loss"] is not None and summary["peak_memory_gb"] > 0
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-00000006", "step-00000012"]


def test_adapters_changed_and_base_did_not(lora_run, tiny_path):
    from mlx_persona.models import load_model

    base, _ = load_model(tiny_path)
    tuned, _ = load_model(tiny_path, adapter_path=lora_run)
    base_w = dict(tree_flatten(base.parameters()))
    tuned_w = dict(tree_flatten(tuned.parameters()))
    lora_b = [v for k, v in tuned_w.items() if k.endswith("lora_b")]
    assert lora_b and all(mx.abs(v).max().item() > 0 for v in lora_b)  # initialised at zero
    for name, w in tuned_w.items():
        plain = name.replace(".linear.", ".")
        if "lora_" not in name:
            assert mx.array_equal(w, base_w[plain]), name


def _mlx_lm_generate(model, prompt, n, adapter=None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mlx_lm", "generate", "--model", str(model), "--prompt", prompt,
           "--max-tokens", str(n), "--temp", "0"] + (["--adapter-path", str(adapter)] if adapter else [])
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _mlx_lm_output(proc: subprocess.Popen) -> tuple[str, int, int]:
    """The reply, prompt tokens and generated tokens `mlx_lm generate` printed."""
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    _, text, stats = out.split("==========\n")  # ==========\nTEXT\n==========\nPrompt: ...
    prompt = int(re.search(r"^Prompt: (\d+) tokens", stats, re.M).group(1))
    generated = int(re.search(r"^Generation: (\d+) tokens", stats, re.M).group(1))
    return text.removesuffix("\n"), prompt, generated


def test_plain_mlx_lm_loads_the_adapters(lora_run, tiny_path):
    """`python -m mlx_lm generate --adapter-path RUN --temp 0` replies with exactly our greedy reply, and
    without the adapter it replies differently (so the adapter was applied)."""
    from mlx_persona.generation import build_prompt, end_token_ids, generate
    from mlx_persona.models import load_model
    from mlx_persona.sampling import GenerationConfig

    message, n = "Hi Bluey!", 16
    procs = [_mlx_lm_generate(tiny_path, message, n, lora_run), _mlx_lm_generate(tiny_path, message, n)]
    cfg = GenerationConfig(temperature=0.0, max_new_tokens=n)
    ours = []
    for adapter in (lora_run, None):
        model, tok = load_model(tiny_path, adapter_path=adapter)
        # mlx-lm's CLI renders the message with the chat template and encodes it without special tokens
        # (the template writes <bos>), as build_prompt does.
        ids = build_prompt(tok, message)
        ours.append((ids, generate(model, tok, ids, cfg, end_ids=end_token_ids(tok, tiny_path))))
    (ids, tuned), (_, base) = ours
    assert tuned.tokens != base.tokens
    for proc, mine in zip(procs, (tuned, base)):
        text, prompt_tokens, generated = _mlx_lm_output(proc)
        assert prompt_tokens == len(ids)
        assert (text, generated) == (mine.text, mine.generated_tokens + (mine.stop_reason == "end_token"))
    assert tuned.text != base.text


def test_existing_output_is_not_overwritten(lora_run, tiny_path, small_data):
    before = (lora_run / "adapters.safetensors").read_bytes()
    result = _run(["train", "--model", str(tiny_path), "--data", str(small_data), "-o", str(lora_run),
                   "--steps", "1", "--no-progress"])
    assert result.exit_code == 1
    assert "already exists" in result.output and "--overwrite" in result.output
    assert (lora_run / "adapters.safetensors").read_bytes() == before


def test_bad_data_fails_before_training_with_file_line(tiny_path, tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    (data / "train.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{not json\n')
    result = _run(["train", "--model", str(tiny_path), "--data", str(data), "-o", str(tmp_path / "o"),
                   "--steps", "1", "--no-progress"])
    assert result.exit_code == 1
    assert f"{data / 'train.jsonl'}:1:" in result.output and f"{data / 'train.jsonl'}:2:" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "o" / "adapters.safetensors").exists()


def test_full_fine_tune_writes_a_model_folder_mlx_lm_loads(tiny_path, small_data, tmp_path):
    from mlx_lm import load

    cfg = load_config(None, {"model": str(tiny_path), "data": str(small_data), "output": str(tmp_path / "full"),
                             "method": "full", "steps": 3, "progress": False})
    run(cfg, log=lambda *a: None)
    out = tmp_path / "full"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file()
    model, tok = load(str(out))
    tuned = mx.load(str(out / "model.safetensors"))
    base = mx.load(str(tiny_path / "model.safetensors"))
    assert not mx.array_equal(tuned["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert model(mx.array([tok.encode("hi")])).shape[-1] == base["model.embed_tokens.weight"].shape[0]


def test_quickstart_config_memorises_a_handful(tiny_path, tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    lines = (REPO / "data" / "bluey" / "train.jsonl").read_text().splitlines()
    short = sorted(lines, key=len)[:4]
    (data / "train.jsonl").write_text("\n".join(short) + "\n")
    cfg = load_config(REPO / "configs" / "quickstart.yaml",
                      {"model": str(tiny_path), "data": str(data), "output": str(tmp_path / "q"),
                       "steps": 60, "progress": False, "optim.warmup_steps": 5})
    summary = run(cfg, log=lambda *a: None)
    losses = [r["loss"] for r in _metrics(tmp_path / "q") if "loss" in r]
    assert summary["steps"] == 60
    assert losses[-1] < 0.3 * losses[0], losses
