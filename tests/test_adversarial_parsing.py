"""Hostile or broken inputs end in one line: ``path[:line]: what is wrong``, a non-zero exit, no traceback,
in bounded time and memory, with no temporary file left behind.

Covered: YAML alias bombs and other unbounded YAML (configs, persona cards, recipes, ``--set``), values
shortened in messages, invalid UTF-8, damaged adapters (truncated, misshapen, unknown or missing tensors,
integer or NaN values) and float16 ones (cast), NaN/inf model weights, tampered checkpoint states, chat
templates that do not compile, raise or try to build gigabytes, and a full disk (a real 2 MB tmpfs).
The bombs run the CLI in a child process whose address space is capped (``RLIMIT_AS``).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest
from training_runs import REPO, bitwise_equal, config, copy_run, reference_run

GB = 1 << 30
YAML_BOMB_LINES = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]'] + [
    f"{c}: &{c} [" + ",".join([f"*{p}"] * 9) + "]" for p, c in zip("abcdefgh", "bcdefghi")]


def bomb(key: str, before: str = "", indent: str = "") -> str:
    """A billion-laughs document (~400 bytes; 9**9 strings once expanded) under `key`."""
    return before + f"{indent}{key}:\n" + "\n".join(indent + "  " + line for line in YAML_BOMB_LINES) + "\n"


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cli(*args, mem: int | None = None, timeout: float = 180) -> tuple[subprocess.CompletedProcess, float]:
    """``python -m mlx_persona ARGS`` in a child process, its address space capped at `mem` bytes; returns it
    and the CPU seconds it used (not wall time, which a loaded machine stretches)."""
    def cap():
        if mem:
            resource.setrlimit(resource.RLIMIT_AS, (mem, mem))

    cpu = _children_cpu()
    proc = subprocess.run([sys.executable, "-m", "mlx_persona", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=cap, stdin=subprocess.DEVNULL, check=False)
    print(f"{' '.join(map(str, args[:1]))}: {_children_cpu() - cpu:.1f} CPU s")
    return proc, _children_cpu() - cpu


def one_error_line(proc: subprocess.CompletedProcess, *fragments: str, only: bool = False) -> str:
    """The run failed with exactly one ``error:`` line holding `fragments` (and, with `only`, nothing else)."""
    assert proc.returncode not in (0, None), proc.stderr[-2000:]
    assert proc.returncode > 0, f"killed by signal {-proc.returncode}: {proc.stderr[-2000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    if only:
        assert lines == errors, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert len(errors[0]) < 600, errors[0][:2000]
    return errors[0]


# ----------------------------------------------------------------------------------------------- YAML

BOMBS = {  # each under a key whose value today's messages printed with repr
    "config": (lambda p: ["train", "--config", p], bomb("model")),
    "persona": (lambda p: ["generate", "--model", "builtin:tiny", "--prompt", "hi", "--persona", p],
                bomb("description", "name: Bluey\n")),
    "recipe": (lambda p: ["compare", p], bomb("model", "output: o\nvariants:\n  - name: a\n", indent="    ")),
}


@pytest.mark.parametrize("kind", BOMBS)
def test_yaml_alias_bomb_is_one_line_in_a_capped_process(kind, tmp_path):
    """A 370-byte billion laughs took > 5.5 GB (a 425-byte one wrote a 312 MB message); now: refused at the
    first anchor, at once, in a process that may not map more than 1.5 GB."""
    args, text = BOMBS[kind]
    path = tmp_path / f"{kind}.yaml"
    path.write_text(text)
    assert path.stat().st_size < 600
    proc, seconds = cli(*args(path), mem=int(1.5 * GB), timeout=120)
    one_error_line(proc, f"{path}:", "anchors (&a) are not allowed", only=True)
    assert seconds < 60  # CPU s; measured 0.2-0.9 (a cold cache adds the speed layer's builds, ~10)


def _readers():
    from mlx_persona.eval.compare import load_recipe
    from mlx_persona.eval.persona import load_persona
    from mlx_persona.tuner.config import load_config

    return {"config": load_config, "persona": load_persona, "recipe": load_recipe}


@pytest.mark.parametrize("kind", ["config", "persona", "recipe"])
@pytest.mark.parametrize("text, why", [
    ("model: &x abc\ndata: *x\n", "YAML anchors (&x) are not allowed"),
    ("model: *x\n", "YAML aliases (*x) are not allowed"),
    ("model: " + "[" * 5000 + "]" * 5000 + "\n", "nested more than 64 levels deep"),
    ("model: " + "x" * (70 << 10) + "\n", "larger than 65,536 bytes"),
    ("model: 2024-13-45\n", "invalid YAML: month must be in 1..12"),
    ("model: \x00\n", "unacceptable character #x0000"),
    ("model: [1\n", "invalid YAML"),
])
def test_unbounded_yaml_is_refused_by_every_reader(kind, text, why, tmp_path):
    path = tmp_path / "in.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as info:  # ConfigError, PersonaError, EvalError: all ValueErrors
        _readers()[kind](path)
    assert type(info.value).__name__ != "InputError"  # each reader's own error type, which its command reports
    message = str(info.value)
    assert message.startswith(f"{path}") and why in message and "\n" not in message, message
    assert len(message) < 300, message[:1000]


def test_set_values_are_read_without_aliases():
    from mlx_persona.tuner.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"^--set model: invalid YAML: YAML anchors \(&a\)"):
        load_config(None, sets=["model=&a [x]"])
    with pytest.raises(ConfigError, match=r"^--set model: invalid YAML: expected ','"):
        load_config(None, sets=["model=[1"])


@pytest.mark.parametrize("kind, text", [
    ("config", "model: [" + ", ".join(["xxxxxxxx"] * 5000) + "]\n"),
    ("config", "lora:\n  rank: '" + "9" * 30000 + "'\n"),
    ("config", "? " + "y" * 30000 + "\n: 1\n"),
    ("persona", "name: Bluey\ndescription: [" + ", ".join(["xxxxxxxx"] * 5000) + "]\n"),
    ("persona", "name: Bluey\ndescription: d\nvocabulary: ['" + "two words " * 3000 + "']\n"),
    ("persona", "name: Bluey\ndescription: d\nvocabulary: [" + ", ".join(["1"] * 5000) + "]\n"),
    ("recipe", "output: o\nvariants: [{name: a, model: [" + ", ".join(["x"] * 8000) + "]}]\n"),
    ("recipe", "output: o\nvariants: [{name: a, model: m}]\neval: {limit: '" + "x" * 30000 + "'}\n"),
])
def test_values_in_error_messages_are_shortened(kind, text, tmp_path):
    """Every value shown is cut to ~80 characters plus its length; a card's problems to 20 lines."""
    path = tmp_path / "in.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        _readers()[kind](path)
    message = str(info.value)
    assert message.startswith(str(path)), message[:300]
    assert len(message) < 3000 and all(len(line) < 600 for line in message.splitlines()), message[:3000]


@pytest.mark.parametrize("kind", ["config", "persona", "recipe"])
def test_invalid_utf8_names_the_byte(kind, tmp_path):
    path = tmp_path / "in.yaml"
    path.write_bytes(b"name: Bluey\ndescription: caf\xe9\n")
    with pytest.raises(ValueError) as info:
        _readers()[kind](path)
    assert str(info.value) == f"{path}: not valid UTF-8 (byte 28, line 2)"


def test_invalid_utf8_config_on_the_command_line(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_bytes(b"model: builtin:tiny\nseed: \xff\xfe\n")
    proc, _ = cli("train", "--config", path)
    one_error_line(proc, f"{path}: not valid UTF-8 (byte 26, line 2)", only=True)


# ------------------------------------------------------------------------------------------- adapters

@pytest.fixture(scope="module")
def trained(tiny_path, small_data, tmp_path_factory):
    """An uninterrupted run (shared with the resume tests): adapters, checkpoints at steps 2, 4 and 6."""
    return reference_run(tiny_path, small_data, tmp_path_factory.mktemp("adversarial"))


def _adapter_copy(trained: Path, dst: Path, change=None) -> Path:
    dst.mkdir()
    for name in ("adapter_config.json", "adapters.safetensors"):
        shutil.copy2(trained / name, dst / name)
    if change:
        weights = mx.load(str(dst / "adapters.safetensors"))
        mx.save_safetensors(str(dst / "adapters.safetensors"), change(weights))
    return dst


def _set(name, fn):
    return lambda w: {**w, name: fn(w[name])}


A = "model.layers.1.self_attn.q_proj.lora_b"
ADAPTER_DAMAGE = {
    "wrong shape": (_set(A, lambda x: mx.zeros((x.shape[1], x.shape[0] + 1))), f"{A} has shape"),
    "unknown tensor": (lambda w: {**w, "model.layers.0.mlp.extra.lora_a": mx.zeros((2, 2))},
                       "model.layers.0.mlp.extra.lora_a"),
    "missing tensor": (lambda w: {k: v for k, v in w.items() if k != A}, f"missing, e.g. {A}"),
    "int32": (lambda w: {k: v.astype(mx.int32) for k, v in w.items()}, "is int32, expected floating-point"),
    "NaN": (_set(A, lambda x: x.at[0, 0].add(float("nan"))), f"{A} holds NaN or inf"),
    "inf": (_set(A, lambda x: x.at[0, 0].add(float("inf"))), f"{A} holds NaN or inf"),
}


@pytest.mark.parametrize("damage", ADAPTER_DAMAGE)
def test_damaged_adapter_is_a_model_error_naming_the_file_and_tensor(damage, trained, tiny_path, tmp_path):
    from mlx_persona.models import ModelError, load_model

    change, fragment = ADAPTER_DAMAGE[damage]
    folder = _adapter_copy(trained, tmp_path / "adapter", change)
    with pytest.raises(ModelError) as info:
        load_model(tiny_path, adapter_path=folder)
    message = str(info.value)
    assert message.startswith(f"{folder / 'adapters.safetensors'}: ") and fragment in message, message
    assert "\n" not in message


def test_truncated_adapter_on_the_command_line(trained, tiny_path, tmp_path):
    folder = _adapter_copy(trained, tmp_path / "adapter")
    file = folder / "adapters.safetensors"
    with open(file, "r+b") as f:
        f.truncate(file.stat().st_size // 2)
    proc, _ = cli("generate", "--model", tiny_path, "--adapter", folder, "--prompt", "hi", "--max-new-tokens", 2)
    one_error_line(proc, f"{file}: not a readable safetensors file, truncated or damaged?")


def test_adapter_config_is_checked_before_it_sizes_a_layer(trained, tiny_path, tmp_path):
    from mlx_persona.models import ModelError, load_model

    folder = _adapter_copy(trained, tmp_path / "adapter")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["lora_parameters"]["rank"] = 10**9  # would be lora_a/lora_b of 10**9 columns per layer
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"adapter_config.json: lora_parameters.rank is 1000000000, expected"):
        load_model(tiny_path, adapter_path=folder)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_precision_adapter_runs_in_the_model_dtype(dtype, trained, tiny_path, tmp_path):
    """float16 adapters on the float32 model printed "........": the LoRA layers ran in float16. Now cast."""
    from mlx.utils import tree_flatten

    from mlx_persona.models import load_model

    half = _adapter_copy(trained, tmp_path / "half", lambda w: {k: v.astype(dtype) for k, v in w.items()})
    tokens = mx.array([[2, 10, 20, 30, 40, 50]])
    logits = {}
    for name, folder in (("float32", trained), ("half", half)):
        model, _ = load_model(tiny_path, adapter_path=folder)
        dtypes = {v.dtype for k, v in tree_flatten(model.parameters()) if k.endswith(("lora_a", "lora_b"))}
        assert dtypes == {mx.float32}, (name, dtypes)
        logits[name] = model(tokens)
    assert mx.abs(logits["float32"] - logits["half"]).max().item() < 0.05


def test_nonfinite_model_weight_is_a_model_error(tiny_path, tmp_path):
    from mlx_persona.models import ModelError, load_model

    folder = tmp_path / "model"
    shutil.copytree(tiny_path, folder)
    weights = mx.load(str(folder / "model.safetensors"))
    name = "model.layers.2.mlp.down_proj.weight"
    weights[name] = weights[name].at[0, 0].add(float("nan"))
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    with pytest.raises(ModelError, match=rf"^{folder}: weight {name} holds NaN or inf values$"):
        load_model(folder)


# ---------------------------------------------------------------------------------------- checkpoints

def _tamper(checkpoint: Path, change) -> None:
    """Edits state.json and rewrites the manifest to match, as a careful attacker (or a bug) would."""
    state = json.loads((checkpoint / "state.json").read_text())
    state = change(state) or state
    data = (json.dumps(state, indent=2) + "\n").encode()
    (checkpoint / "state.json").write_bytes(data)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"]["state.json"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _loop(key, value):
    return lambda s: s["loop"].__setitem__(key, value)


TAMPERED = {
    "batch=1e6": _loop("batch", 1e6),  # was an IndexError
    "rng=[2**40,-1]": lambda s: s.__setitem__("rng", [2**40, -1]),  # was a TypeError
    "step=-5": _loop("step", -5),  # was "resuming at step -5", and a wrong result
}


@pytest.mark.parametrize("tamper", TAMPERED)
def test_tampered_checkpoint_is_skipped_for_an_older_one(tamper, trained, tiny_path, small_data, tmp_path):
    """The newest checkpoint passes its checksums but is impossible: it is reported and the run resumes
    from the one before, ending bit for bit where the uninterrupted run ended."""
    from mlx_persona.tuner.run import run

    out = copy_run(trained, tmp_path / "run")
    shutil.rmtree(out / "checkpoints" / "step-00000006")
    for name in ("adapters.safetensors", "summary.json"):
        (out / name).unlink()
    _tamper(out / "checkpoints" / "step-00000004", TAMPERED[tamper])
    logs = []
    run(config(tiny_path, small_data, out), resume=True, log=logs.append)
    warnings = [line for line in logs if "step-00000004 is unusable: state.json: " in line]
    assert len(warnings) == 1 and "trying an older one" in warnings[0], logs
    assert any(line.startswith("resuming at step 2 of 6") for line in logs), logs
    assert bitwise_equal(out / "adapters.safetensors", trained / "adapters.safetensors")


def test_every_checkpoint_tampered_is_one_line(trained, tiny_path, small_data, tmp_path):
    from mlx_persona.tuner.run import run
    from mlx_persona.tuner.trainer import TrainingError

    out = copy_run(trained, tmp_path / "run")
    for checkpoint in (out / "checkpoints").iterdir():
        _tamper(checkpoint, _loop("tokens", -1))
    logs = []
    with pytest.raises(TrainingError, match=r"every checkpoint is damaged \(3 found\)") as info:
        run(config(tiny_path, small_data, out), resume=True, log=logs.append)
    assert "\n" not in str(info.value)
    assert sum("loop.tokens is -1, expected an integer >= 0" in line for line in logs) == 3, logs


@pytest.mark.parametrize("change, expected", [
    (_loop("batch", 10**6), "loop.batch is 1000000, expected an integer in [0, 3)"),
    (_loop("batch", -1), "loop.batch is -1"),
    (_loop("step", 5), "loop.step is 5, expected the checkpoint's step, 4"),
    (_loop("step", "4"), "loop.step is '4'"),
    (_loop("epoch", None), "loop.epoch is None"),
    (_loop("best_val", "x"), "loop.best_val is 'x'"),
    (_loop("best_val", float("nan")), "loop.best_val is nan"),
    (_loop("best_step", 9), "loop.best_step is 9"),
    (_loop("bad_evals", True), "loop.bad_evals is True"),
    (_loop("tokens", -1), "loop.tokens is -1"),
    (_loop("loss_tokens", 10**9), "loop.loss_tokens is 1000000000, expected an integer in [0, tokens]"),
    (_loop("train_time", float("inf")), "loop.train_time is inf"),
    (_loop("stop_reason", ["x"] * 100), "loop.stop_reason is ['x', 'x'"),
    (lambda s: s["loop"].pop("tokens") and None, "loop has missing keys ['tokens']"),
    (lambda s: s.__setitem__("rng", [1, 2, 3]), "rng is [1, 2, 3], expected two integers in [0, 2**32)"),
    (lambda s: s.__setitem__("rng", [1.5, 2]), "rng is [1.5, 2]"),
    (lambda s: s.__setitem__("loop", []), "loop is [], expected a mapping"),
    (lambda s: s.__setitem__("data", 5), "data is 5"),
    (lambda s: ["not", "a", "mapping"], "state.json: expected a mapping"),
])
def test_checkpoint_state_checks(change, expected, trained):
    from mlx_persona.tuner import checkpoint as ckpt
    from mlx_persona.tuner.trainer import new_loop_state

    assert ckpt.LOOP_KEYS == tuple(new_loop_state())
    state = json.loads((trained / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert ckpt.check_state(state, 4, total_steps=6, batches_per_epoch=3) is None
    assert ckpt.check_state(state, 4, total_steps=3, batches_per_epoch=3) == \
        "state.json: loop.step is 4, expected at most this run's 3 steps"
    state = change(state) or state
    problem = ckpt.check_state(state, 4, total_steps=6, batches_per_epoch=3)
    assert problem and problem.startswith("state.json: ") and expected in problem, problem
    assert len(problem) < 200


def test_nonfinite_checkpoint_weights_are_skipped(trained, tmp_path):
    from mlx_persona.tuner import checkpoint as ckpt

    root = copy_run(trained, tmp_path / "run") / "checkpoints"
    newest = root / "step-00000006"
    weights = mx.load(str(newest / "weights.safetensors"))
    weights[A] = weights[A].at[0, 0].add(float("inf"))
    mx.save_safetensors(str(newest / "weights.safetensors"), weights)
    manifest = json.loads((newest / "manifest.json").read_text())
    data = (newest / "weights.safetensors").read_bytes()
    manifest["files"]["weights.safetensors"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (newest / "manifest.json").write_text(json.dumps(manifest))
    logs = []
    found = ckpt.load_latest(root, log=logs.append)
    assert found[0].name == "step-00000004"
    assert logs == [f"warning: checkpoint {newest} is unusable: {A} holds NaN or inf; trying an older one"]


# ----------------------------------------------------------------------------------------- templates

def _model_with_template(tiny_path: Path, dst: Path, template: str) -> Path:
    shutil.copytree(tiny_path, dst)
    (dst / "chat_template.jinja").write_text(template)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


def test_shipped_template_renders_byte_identically(tiny_path):
    """The bounded sandbox changes nothing a real template renders: every prefix of every shipped
    conversation, with and without the generation prompt, against transformers in a fresh process."""
    from transformers import AutoTokenizer

    from mlx_persona.data import template_limits

    script = (
        "import json, sys\nfrom transformers import AutoTokenizer\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[1])\nout = []\n"
        "for f in ('train', 'valid'):\n"
        "    for line in open(f'data/bluey/{f}.jsonl'):\n"
        "        m = json.loads(line)['messages']\n"
        "        for i in range(1, len(m) + 1):\n"
        "            for g in (False, True):\n"
        "                out.append(tok.apply_chat_template(m[:i], tokenize=False, add_generation_prompt=g))\n"
        "json.dump(out, sys.stdout)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tiny_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=True)
    reference = json.loads(proc.stdout)
    assert template_limits.install()
    from transformers.utils import chat_template_utils

    assert chat_template_utils.ImmutableSandboxedEnvironment is template_limits.bounded_environment_class()
    tok = AutoTokenizer.from_pretrained(tiny_path)
    ours = []
    for f in ("train", "valid"):
        for line in (REPO / "data" / "bluey" / f"{f}.jsonl").read_text().splitlines():
            m = json.loads(line)["messages"]
            ours += [tok.apply_chat_template(m[:i], tokenize=False, add_generation_prompt=g)
                     for i in range(1, len(m) + 1) for g in (False, True)]
    assert len(ours) > 500 and ours == reference


TEMPLATE_BOMBS = {
    "str * n": "{{ 'a' * (3 * 10**8) }}",
    "str * n, constant": "{{ 'a' * 300000000 }}",
    "list * n": "{{ [1] * 10**9 }}",
    "doubling +": "{% set ns = namespace(s='a') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "doubling ~": "{% set ns = namespace(s='a') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "nested lists": "{% set a = ['x' * 1000000] %}{% set b = [a,a,a,a,a,a,a,a] %}{% set c = [b,b,b,b,b,b,b,b] %}"
                    "{% set d = [c,c,c,c,c,c,c,c] %}{{ d }}",
    "nested tojson": "{% set a = ['x' * 1000000] %}{% set b = [a,a,a,a,a,a,a,a] %}{% set c = [b,b,b,b,b,b,b,b] %}"
                     "{{ [c,c,c,c,c,c,c,c]|tojson }}",
    "ljust": "{{ 'a'.ljust(10**9) }}",
    "center": "{{ 'a'|center(1000000000) }}",
    "indent": "{% set s = '\n' * 1000000 %}{{ s|indent(100) }}",
    "replace": "{% set s = 'a' * 10000 %}{{ s.replace('', s) }}",
    "join": "{% set a = ['x' * 1000000] * 16 %}{{ a|join(a|join) }}",
    "printf width": "{{ '%999999999d' % 1 }}",
    "format width": "{{ '{:>999999999}'.format(1) }}",
    "batch": "{{ [1]|batch(10**9, 0)|list }}",
    "power": "{{ 10 ** (10 ** 8) }}",
    "output": "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
}


@pytest.mark.parametrize("name", TEMPLATE_BOMBS)
def test_template_bombs_are_stopped_at_once(name, tiny_path):
    from jinja2.exceptions import SecurityError
    from transformers import AutoTokenizer

    from mlx_persona.data import template_limits

    assert template_limits.install()
    tok = AutoTokenizer.from_pretrained(tiny_path)
    cpu = time.process_time()  # CPU seconds, not wall time, which a loaded machine stretches
    with pytest.raises(SecurityError, match="over the limit"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=TEMPLATE_BOMBS[name],
                                tokenize=False)
    print(f"{name}: refused after {time.process_time() - cpu:.3f} CPU s")
    assert time.process_time() - cpu < 5  # measured 0.001-0.016 (computed, `power` alone is a 330-million-bit number)


def test_template_bomb_in_a_capped_process(tiny_path, small_data, tmp_path):
    """`{{ 'a' * (3 * 10**8) }}` aborted training with signal 6 after 3.6 GB; now: one line naming the
    first example, in a process that may not map more than 2.5 GB (training the tiny model needs ~2)."""
    model = _model_with_template(tiny_path, tmp_path / "model", TEMPLATE_BOMBS["str * n"])
    proc, seconds = cli("train", "--model", model, "--data", small_data, "-o", tmp_path / "out", "--steps", 1,
                        "--no-progress", mem=int(2.5 * GB))
    one_error_line(proc, f"{small_data / 'train.jsonl'}:1: the chat template failed: a repeated value of "
                         "300,000,000 characters or items is over the limit")
    assert seconds < 90  # CPU s; measured 2.1


def test_template_syntax_error_names_the_model(tiny_path, small_data, tmp_path):
    model = _model_with_template(tiny_path, tmp_path / "model", "{% if messages %}{{ bos_token }")
    proc, _ = cli("train", "--model", model, "--data", small_data, "-o", tmp_path / "out", "--steps", 1,
                  "--no-progress")
    one_error_line(proc, f"{model}: chat template failed: unexpected '}}' (template line 1)")


def test_template_that_raises_names_the_example(tiny_path, small_data, tmp_path):
    model = _model_with_template(tiny_path, tmp_path / "model", "{{ raise_exception('no conversation, ever\n') }}")
    proc, _ = cli("train", "--model", model, "--data", small_data, "-o", tmp_path / "out", "--steps", 1,
                  "--no-progress")
    one_error_line(proc, f"{small_data / 'train.jsonl'}:1: the chat template failed: no conversation, ever")


# ----------------------------------------------------------------------------------------- full disk

def test_write_failure_removes_the_temporary_file(tmp_path, monkeypatch):
    import errno

    from mlx_persona.tuner import checkpoint as ckpt

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.os, "replace", full)
    with pytest.raises(Exception, match=rf"^{tmp_path / 'metrics.jsonl'}: no space left on device \(") as info:
        ckpt.write_text_atomic(tmp_path / "metrics.jsonl", "x\n")
    assert type(info.value).__name__ == "WriteError"  # reported by the CLI as one line
    assert list(tmp_path.iterdir()) == []


def test_failed_checkpoint_save_leaves_no_temporary_folder(tmp_path, monkeypatch):
    from mlx_persona.tuner import checkpoint as ckpt

    real = mx.save_safetensors

    def fails_second(path, arrays, *a, **k):
        if "optimizer" in path:
            Path(path).write_bytes(b"\0" * 1000)
            raise RuntimeError("[write] Unable to write 7812 bytes to file.")
        real(path, arrays, *a, **k)

    monkeypatch.setattr(ckpt.mx, "save_safetensors", fails_second)
    with pytest.raises(Exception, match=r"step-00000003: (no space left on device|could not be written) "
                                        r"\(\[write\] Unable to write 7812 bytes to file.\)$") as info:
        ckpt.save_checkpoint(tmp_path, 3, {"w": mx.zeros((4,))}, {"m": mx.zeros((4,))}, {"loop": {}})
    assert type(info.value).__name__ == "WriteError"
    assert list(tmp_path.iterdir()) == []


FULL_DISK = r"""
set -u
mount -t tmpfs -o size=400k tmpfs "$DISK" || exit 99
run() { "$PY" -m mlx_persona train --model "$MODEL" --data "$DATA" -o "$DISK/run" --no-progress "$@"; }
run --steps 3 --set lora.rank=4 --set save_every=1 --set eval_every=0 --set log_every=1 2>"$LOGS/first.txt"
echo "first=$?"
find "$DISK" -name '*tmp*' > "$LOGS/first-left.txt"
dd if=/dev/zero of="$DISK/filler" bs=4k 2>/dev/null  # now nothing fits
run --config "$DISK/run/config.yaml" --resume 2>"$LOGS/resume.txt"
echo "resume=$?"
find "$DISK" -name '*tmp*' > "$LOGS/resume-left.txt"
cp "$DISK/run/config.yaml" "$LOGS/config.yaml"
"""


def test_full_disk_is_one_line_and_leaves_no_temporary_file(tiny_path, small_data, tmp_path):
    """On a 400 kB tmpfs: the second checkpoint does not fit (it was a 30-line traceback without a path,
    and a .tmp-step-* holding the space); then a resume on a disk with no byte left (it left a 0-byte
    .metrics.jsonl.tmp)."""
    disk, logs = tmp_path / "disk", tmp_path / "logs"
    disk.mkdir()
    logs.mkdir()
    if not shutil.which("unshare"):
        pytest.skip("no unshare(1) to mount a small tmpfs in a private mount namespace")
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {disk}"],
                           capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {disk}"],
                               capture_output=True, text=True, check=False)
        if probe.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (unshare -m / -rm): {probe.stderr.strip()[:200]}")
        prefix = ["unshare", "-rm"]
    else:
        prefix = ["unshare", "-m"]
    env = {**os.environ, "DISK": str(disk), "LOGS": str(logs), "PY": sys.executable, "MODEL": str(tiny_path),
           "DATA": str(small_data)}
    proc = subprocess.run([*prefix, "sh", "-c", FULL_DISK], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=400, check=False)
    assert "first=1" in proc.stdout and "resume=1" in proc.stdout, (proc.stdout, proc.stderr)
    for name, path in (("first", "run/checkpoints/step-00000002"), ("resume", "run/metrics.jsonl")):
        result = subprocess.CompletedProcess([], 1, "", (logs / f"{name}.txt").read_text())
        one_error_line(result, f"{disk / path}: no space left on device (")
        assert (logs / f"{name}-left.txt").read_text() == "", name
    assert "model:" in (logs / "config.yaml").read_text()  # the resumed run's config is whole


def test_generate_with_a_raising_template_is_one_line(tiny_path, tmp_path):
    """`mlx-persona generate` with a chat template that raises (or is refused by the size cap): one line, exit 1."""
    import json
    import shutil
    import subprocess
    import sys

    model = tmp_path / "model"
    shutil.copytree(tiny_path, model)
    cfg_path = model / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = "{{ raise_exception('no roles here') if messages else '' }}"
    cfg_path.write_text(json.dumps(cfg))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "-m", "mlx_persona", "generate", "--model", str(model), "--prompt", "Hi"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "chat template failed: no roles here" in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) <= 2, proc.stderr  # the error line (and at most a setup warning)
