"""Evaluation, sweeps and comparisons end to end on the built-in tiny model: the files, their contents, and
the HTML report in headless Chromium. Kept small: two prompts, one or two seeds, a few new tokens."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner

from mlx_persona.cli import main
from mlx_persona.eval.compare import _trained_entry, load_recipe
from mlx_persona.eval.entries import check_names, find_bases, parse_model_arg
from mlx_persona.eval.options import EvalError, assistant_replies, load_prompts
from mlx_persona.eval.sweep import grid_settings, parse_grid, setting_label
from mlx_persona.eval.metrics import StyleModel
from mlx_persona.eval.verdict import verdict
from mlx_persona.models import load_model
from mlx_persona.tuner.adapters import attach_adapters, save_adapters

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
PROMPTS = ["Hi Bluey! What are you playing today?", "Why is the sky blue?"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


@pytest.fixture(scope="module")
def adapter(tiny_path, tmp_path_factory) -> Path:
    """A LoRA folder whose lora_b is random, so the model it makes replies (and scores) differently."""
    model, _ = load_model(tiny_path)
    mx.random.seed(3)  # before attach_adapters, which draws lora_a: the same adapter whatever ran before
    cfg = attach_adapters(model, "lora", rank=4, alpha=8.0, modules=["q_proj", "v_proj", "down_proj"])
    cfg.update({"model": str(tiny_path), "model_spec": "builtin:tiny"})
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = 0.2 * mx.random.normal(m.lora_b.shape)
    out = tmp_path_factory.mktemp("runs") / "bluey-tiny"
    out.mkdir()
    save_adapters(model, out, cfg)
    return out


def reference_val_loss(model_path, adapter, valid: Path) -> tuple[float, int]:
    """Mean next-token cross-entropy over the validation replies' loss tokens, one conversation at a time in
    plain MLX ops (no batching, padding or chunking); the loss tokens are data.prepare_dataset's masks."""
    import numpy as np

    from mlx_persona.data import load_jsonl, prepare_dataset

    model, tok = load_model(str(model_path), adapter_path=adapter)
    ds = prepare_dataset(tok, load_jsonl(valid), 1024)
    total, count = 0.0, 0
    for ids, mask in zip(ds.tokens, ds.masks):
        logits = model(mx.array(np.asarray(ids)[None, :-1]))[0].astype(mx.float32)
        nll = mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, mx.array(np.asarray(ids)[1:, None]), -1)[:, 0]
        total += float(np.array(nll, np.float64)[np.asarray(mask[1:])].sum())
        count += int(np.asarray(mask[1:]).sum())
    return total / count, count


def open_in_chromium(page: Path, tmp_path: Path) -> tuple[str, str]:
    """The DOM Chromium renders from `page` and its log (console messages included)."""
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--enable-logging=stderr", "--v=0",
         "--dump-dom", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, proc.stderr


# ------------------------------------------------------------------------------------------- arguments
def test_parse_model_arg(tiny_path, adapter, tmp_path):
    assert parse_model_arg("builtin:tiny") == parse_model_arg(" builtin:tiny ")
    m = parse_model_arg("builtin:tiny")
    assert (m.name, m.model, m.adapter) == ("builtin:tiny", "builtin:tiny", None)
    m = parse_model_arg("base=google/gemma-3-1b-it")
    assert (m.name, m.model, m.adapter) == ("base", "google/gemma-3-1b-it", None)
    m = parse_model_arg(f"it+bluey=builtin:tiny@{adapter}")
    assert (m.name, m.model, m.adapter) == ("it+bluey", "builtin:tiny", str(adapter))
    # An adapter folder alone stands for its recorded base model (the folder, since it still exists).
    m = parse_model_arg(str(adapter))
    assert (m.name, m.model, m.adapter) == ("bluey-tiny", str(tiny_path), str(adapter))
    with pytest.raises(EvalError, match="no such adapter folder"):
        parse_model_arg(f"x=builtin:tiny@{tmp_path / 'nope'}")
    with pytest.raises(EvalError, match=r"expected \[NAME=\]SPEC\[@ADAPTER\]"):
        parse_model_arg("x=builtin:tiny@")
    with pytest.raises(EvalError, match="two models are named 'a'"):
        check_names([parse_model_arg("a=builtin:tiny"), parse_model_arg("a=builtin:tiny-it")])


def test_find_bases(tiny_path, adapter, tmp_path):
    full = tmp_path / "full-run"
    full.mkdir()
    (full / "config.json").write_text("{}")
    (full / "summary.json").write_text(json.dumps({"model": "builtin:tiny", "method": "full", "steps": 2}))
    entries = [parse_model_arg(a) for a in ("pt=builtin:tiny", "it=builtin:tiny-it", f"ft=builtin:tiny-it@{adapter}",
                                            f"full={full}", str(adapter), f"hub=google/gemma-3-1b-it@{adapter}")]
    assert [e.base for e in entries] == [None, None, "builtin:tiny-it", "builtin:tiny", str(tiny_path),
                                         "google/gemma-3-1b-it"]
    # The same text first (builtin:tiny-it is builtin:tiny's folder too), then the same folder; a hub id whose
    # base is not in the evaluation has none.
    assert find_bases(entries) == {"pt": None, "it": None, "ft": "it", "full": "pt", "bluey-tiny": "pt", "hub": None}
    assert find_bases(entries[2:]) == {e.name: None for e in entries[2:]}  # no base model evaluated


def test_parse_grid():
    grid = parse_grid(["min_new_tokens=0,50", "temperature=0.8", "top-p=0.9,1"])
    assert grid == {"min_new_tokens": [0, 50], "temperature": [0.8], "top_p": [0.9, 1.0]}
    settings = grid_settings(grid)
    assert [setting_label(s) for s in settings] == [
        "min_new_tokens=0 temperature=0.8 top_p=0.9", "min_new_tokens=0 temperature=0.8 top_p=1",
        "min_new_tokens=50 temperature=0.8 top_p=0.9", "min_new_tokens=50 temperature=0.8 top_p=1"]
    assert grid_settings({}) == [{}] and setting_label({}) == "base"
    for bad, why in (("seed=1,2", "unknown setting 'seed'"), ("min_new_tokens=1.5", "takes integers"),
                     ("temperature", "expected KEY=V1,V2"), ("top_k=5,5", "listed twice")):
        with pytest.raises(EvalError, match=why):
            parse_grid([bad])
    with pytest.raises(EvalError, match="given twice"):
        parse_grid(["top_k=5", "top_k=10"])


def test_load_prompts(tmp_path, prompts):
    assert load_prompts(prompts) == PROMPTS and load_prompts(prompts, limit=1) == PROMPTS[:1]
    assert len(load_prompts(REPO / "data" / "bluey" / "eval_prompts.jsonl")) == 40
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": ""}\nnot json\n{"text": "x"}\n')
    with pytest.raises(EvalError) as e:
        load_prompts(bad)
    assert [line.split(":")[1] for line in str(e.value).splitlines()] == ["2", "3", "4"]


def test_shipped_recipes_parse():
    for name in ("compare-pt-vs-it.yaml", "compare-builtin.yaml"):
        recipe = load_recipe(REPO / "configs" / name)
        assert len(recipe.variants) == 4 and recipe.generation.min_new_tokens == 50
    hub = load_recipe(REPO / "configs" / "compare-pt-vs-it.yaml")
    assert {v.get("model") for v in hub.variants} >= {"google/gemma-3-270m", "google/gemma-3-270m-it"}


def test_recipe_errors(tmp_path):
    path = tmp_path / "r.yaml"
    for text, why in (("variants: []\n", "output: required"),
                      ("output: o\nvariants: [{name: a}]\n", r"variants\[0\]: give exactly one of model"),
                      ("output: o\nvariants: [{name: a, model: m, colour: x}]\n", r"variants\[0\].colour: unknown key"),
                      ("output: o\nvariants: [{name: a, model: m}]\neval: {seeds: 3}\n", "eval.seeds: expected list"),
                      ("output: o\nvariants: [{name: a, model: m}]\ngeneration: {top_p: 2}\n", "generation: .*top_p"),
                      ("output: o\nvariants: [{name: a, model: m}, {name: a, model: n}]\n", "used twice")):
        path.write_text(text)
        with pytest.raises(EvalError, match=why):
            load_recipe(path)


# ------------------------------------------------------------------------------------------- eval
def test_eval_writes_a_self_contained_report(tiny_path, adapter, prompts, small_data, tmp_path):
    out = tmp_path / "report"
    args = ["eval", "--model", "base=builtin:tiny", "--model", str(adapter), "--prompts", prompts,
            "--seeds", "0,1", "--max-new-tokens", 8, "--temperature", 0.8, "--train-data", small_data / "train.jsonl",
            "--valid", small_data / "valid.jsonl", "-o", out]
    result = run(*args)
    assert result.exit_code == 0, result.output
    for name in ("report.md", "report.html", "results.jsonl", "summary.json", "lengths.png", "rates.png"):
        assert (out / name).is_file(), name

    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * len(PROMPTS) * 2  # models x prompts x seeds
    assert {(r["model"], r["prompt"], r["seed"]) for r in rows} == {
        (m, p, s) for m in ("base", "bluey-tiny") for p in PROMPTS for s in (0, 1)}
    for r in rows:
        assert set(r) >= {"model", "prompt", "seed", "text", "tokens", "stop_reason", "metrics"}
        assert r["metrics"]["words"] == len(r["text"].split()) and len(r["tokens"]) <= 8
        assert r["stop_reason"] in ("end_token", "length", "stop_string")
    # A different model and a different seed give different replies.
    texts = {(r["model"], r["prompt"], r["seed"]): r["text"] for r in rows}
    assert texts[("base", PROMPTS[0], 0)] != texts[("bluey-tiny", PROMPTS[0], 0)]
    assert texts[("base", PROMPTS[0], 0)] != texts[("base", PROMPTS[0], 1)]

    summary = json.loads((out / "summary.json").read_text())
    models = summary["models"]
    assert list(models) == ["base", "bluey-tiny"] and models["bluey-tiny"]["adapter"] == str(adapter)
    style = StyleModel(assistant_replies(small_data / "train.jsonl"))
    losses = {}
    for name, adapter_path in (("base", None), ("bluey-tiny", adapter)):
        s, mine = models[name], [r for r in rows if r["model"] == name]
        words = [len(r["text"].split()) for r in mine]
        assert s["replies"] == len(mine) == 4
        assert (s["words_min"], s["words_max"]) == (min(words), max(words))
        assert s["words_mean"] == pytest.approx(sum(words) / 4, abs=1e-12)
        styles = [style.similarity(r["text"]) for r in mine]
        assert [r["metrics"]["style"] for r in mine] == pytest.approx(styles, abs=1e-12)
        assert s["style"] == pytest.approx(sum(styles) / 4, abs=1e-12)
        # The validation loss is this model's (the adapter applied for bluey-tiny) over every loss token.
        losses[name], tokens = reference_val_loss(tiny_path, adapter_path, small_data / "valid.jsonl")
        # Measured within 1e-6 (relative); the adapter moves this random model's loss by only 7.5e-5.
        assert s["val_loss"] == pytest.approx(losses[name], rel=5e-6) and s["val_loss_tokens"] == tokens
        assert s["val_ppl"] == pytest.approx(math.exp(s["val_loss"]), rel=1e-12)
    assert abs(losses["base"] / losses["bluey-tiny"] - 1) > 5e-5  # so the check above tells the two apart
    assert summary["reference"]["mid_sentence"] == 0.0  # the human-written replies end their sentences
    assert summary["system"] is None  # no --persona-system

    # The adapter folder alone records its base as the built-in's folder: the same model as base=builtin:tiny.
    assert (models["base"]["base"], models["bluey-tiny"]["base"]) == (None, "base")
    assert summary["verdict"] == json.loads(json.dumps(verdict(summary, rows)))  # the data, recomputed from the files
    judged = {m["key"]: m for m in summary["verdict"]["bluey-tiny"]["metrics"]}
    assert judged["val_loss"]["change"] == pytest.approx(models["bluey-tiny"]["val_loss"] - models["base"]["val_loss"])
    assert judged["words_mean"]["reference"] == summary["reference"]["words_mean"]

    md = (out / "report.md").read_text()
    assert md.startswith("# Persona evaluation\n\n## Verdict\n\n- **base**: a base model, set against its fine-tunes")
    assert "- **bluey-tiny** against its base **base** (2 seeds): " in md
    assert "| metric | better | base | bluey-tiny | reference |" in md and "| seed | base | bluey-tiny |" in md
    assert all(f"### {i + 1}. " in md for i in range(len(PROMPTS)))

    page = (out / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # no external resources
    assert "<script" not in page and "<link" not in page and "@import" not in page
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2 and all(base64.b64decode(b).startswith(b"\x89PNG\r\n\x1a\n") for b in images)

    again = run(*args)
    assert again.exit_code == 1 and "already exists" in again.output


@pytest.mark.needs(Path(CHROMIUM).exists(), reason=f"headless Chromium not found at {CHROMIUM} "
                   "(apt-get install chromium, or set CHROMIUM)")  # failed instead under CI=true
def test_report_html_renders_in_headless_chromium(tiny_path, prompts, tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "old.txt").write_text("replaced by --overwrite")
    assert run("eval", "--model", "builtin:tiny", "--prompts", prompts, "--limit", 1, "--seed", 0,
               "--max-new-tokens", 4, "--no-valid", "--persona-system", "-o", out, "--overwrite").exit_code == 0
    assert not (out / "old.txt").exists()
    assert json.loads((out / "summary.json").read_text())["system"].startswith("You are Bluey")
    dom, log = open_in_chromium(out / "report.html", tmp_path)
    assert "<h1>Persona evaluation</h1>" in dom and 'class="summary"' in dom
    assert dom.count("data:image/png;base64,") == 2 and PROMPTS[0] in dom
    problems = [line for line in log.splitlines() if "CONSOLE" in line or "Uncaught" in line
                or "Failed to load" in line or "ERR_" in line]
    assert not problems, problems


def test_eval_user_errors_exit_cleanly(prompts, tmp_path):
    for args, why in ((["--model", "x=builtin:tiny@"], "expected [NAME=]SPEC[@ADAPTER]"),
                      (["--model", "builtin:tiny", "--seeds", "a,b"], "--seeds 'a,b'"),
                      (["--model", "builtin:tiny", "--seeds", "1", "--seed", "2"], "not both"),
                      (["--model", "a=builtin:tiny", "--model", "a=builtin:tiny"], "two models are named"),
                      (["--model", "builtin:tiny", "--persona", tmp_path / "none.yaml"], "no such file"),
                      (["--model", "builtin:tiny", "--top-p", "3"], "error: --top-p: must be a number in (0, 1]")):
        result = run("eval", "--prompts", prompts, "-o", tmp_path / "o", *args)
        assert result.exit_code == 1 and why in result.output, (args, result.output)
    result = run("sweep", "--model", "builtin:tiny", "--grid", "colour=1", "-o", tmp_path / "s")
    assert result.exit_code == 1 and "unknown setting 'colour'" in result.output


# ------------------------------------------------------------------------------------------- sweep
def test_sweep_one_row_per_setting(tiny_path, prompts, tmp_path):
    out = tmp_path / "sweep"
    result = run("sweep", "--model", "builtin:tiny", "--prompts", prompts, "--seeds", 0,
                 "--grid", "min_new_tokens=0,6", "--grid", "temperature=0.7,1.0", "--max-new-tokens", 8,
                 "--no-valid", "-o", out)
    assert result.exit_code == 0, result.output
    lines = (out / "sweep.csv").read_text().splitlines()
    header, body = lines[0].split(","), [line.split(",") for line in lines[1:]]
    assert header[:4] == ["model", "setting", "min_new_tokens", "temperature"] and "early_end" in header
    assert [row[1] for row in body] == ["min_new_tokens=0 temperature=0.7", "min_new_tokens=0 temperature=1",
                                        "min_new_tokens=6 temperature=0.7", "min_new_tokens=6 temperature=1"]
    md = (out / "sweep.md").read_text()
    assert sum(line.startswith("| builtin:tiny |") for line in md.splitlines()) == 4
    assert (out / "sweep.png").read_bytes().startswith(b"\x89PNG")
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * len(PROMPTS)
    # min_new_tokens holds every end token back: no reply of those settings is shorter than 6 tokens.
    assert all(r["generated_tokens"] >= 6 for r in rows if r["setting"].startswith("min_new_tokens=6"))
    words = {row[1]: float(row[header.index("words_mean")]) for row in body}
    assert all(w > 0 for w in words.values())


# ------------------------------------------------------------------------------------------- compare
def test_compare_trains_once_then_reuses_the_run(tiny_path, small_data, prompts, tmp_path):
    run_dir = tmp_path / "runs" / "tuned"
    recipe = tmp_path / "compare.yaml"
    recipe.write_text(f"""
output: {tmp_path / 'report'}
variants:
  - name: base
    model: {tiny_path}
  - name: tuned
    train: {REPO / 'configs' / 'quickstart.yaml'}
    set: {{data: {small_data}, output: {run_dir}, steps: 2, progress: false, optim: {{warmup_steps: 1}}}}
eval:
  prompts: {prompts}
  train: {small_data / 'train.jsonl'}
  valid: {small_data / 'valid.jsonl'}
  seeds: [0]
  limit: 1
generation:
  preset: persona
  max_new_tokens: 6
""")
    result = run("compare", recipe)
    assert result.exit_code == 0, result.output
    assert "training" in result.output and (run_dir / "summary.json").is_file()
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert list(summary["models"]) == ["base", "tuned"]
    tuned = summary["models"]["tuned"]
    assert tuned["model"] == str(run_dir) and "trained:" in tuned["note"] and "2 steps" in tuned["note"]
    assert tuned["base"] == "base" and summary["verdict"]["tuned"]["base"] == "base"  # trained from base's model
    # Each row's validation loss is its own model's: the base, and the trained run (a full fine-tune).
    base_loss, _ = reference_val_loss(tiny_path, None, small_data / "valid.jsonl")
    tuned_loss, _ = reference_val_loss(run_dir, None, small_data / "valid.jsonl")
    assert summary["models"]["base"]["val_loss"] == pytest.approx(base_loss, rel=5e-6)
    assert tuned["val_loss"] == pytest.approx(tuned_loss, rel=5e-6)
    assert abs(base_loss / tuned_loss - 1) > 5e-5
    assert summary["generation"]["min_new_tokens"] == 50  # the persona preset
    assert "| seed | base | tuned |" in (tmp_path / "report" / "report.md").read_text()

    # A second compare reuses the finished run instead of training again.
    mtime, logs = (run_dir / "summary.json").stat().st_mtime, []
    entry = _trained_entry(load_recipe(recipe).variants[1], retrain=False, log=logs.append)
    assert entry.model == str(run_dir) and "using the finished run" in logs[0]
    assert (run_dir / "summary.json").stat().st_mtime == mtime
    again = run("compare", recipe)
    assert again.exit_code == 1 and "--overwrite" in again.output  # the report folder exists
