"""The browser path end to end: export -> `mlx-persona web` -> transformers.js in headless Chromium.

The page's replies equal MLX's; its logits processing (sampling.js) equals mlx_persona.sampling.process_logits;
it loads the precision the export measured fit (fp32 here: the tiny model's q4 does not keep fp32's greedy
tokens) and shows the persona and its generation defaults.

Needs Debian's `chromium` and `npm ci` in mlx_persona/export/web (transformers.js + playwright-core); skipped
with the reason when either is missing (failed instead under CI=true). Screenshots go to test-artifacts/
(MLX_PERSONA_TEST_ARTIFACTS).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_persona.export.hf import fuse
from mlx_persona.export.web import (
    PAGE_DIR,
    WebError,
    install_page,
    make_server,
    node_modules,
)
from mlx_persona.export.web.manifest import page_manifest
from mlx_persona.models import load_model
from mlx_persona.sampling import GenerationConfig, preset, process_logits
from mlx_persona.tuner.adapters import attach_adapters, save_adapters

pytest.importorskip("onnxruntime")
from mlx_persona.export.onnx import Q4_MIN_AGREEMENT, default_dtype, export_onnx

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("MLX_PERSONA_TEST_ARTIFACTS") or REPO / "test-artifacts")
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MESSAGE = "Hi Bluey! What's your favourite game to play with Bingo?"
GREEDY = {"do_sample": False, "max_new_tokens": 16, "min_new_tokens": 0, "repetition_penalty": 1.0}

# Skipped when missing, failed instead under CI=true (conftest.need).
needs_js = pytest.mark.needs((node_modules() / "@huggingface" / "transformers" / "dist").is_dir(),
                             reason=f"transformers.js not installed: run `npm ci` in {PAGE_DIR}")
needs_browser = pytest.mark.needs(
    bool(Path(CHROMIUM).exists() and shutil.which("node") and (node_modules() / "playwright-core").is_dir()),
    reason="needs /usr/bin/chromium (apt-get install chromium), node and playwright-core "
           f"(`npm ci` in {PAGE_DIR})")

# Opens the page and waits for it to load a model, then runs each step, a JavaScript function (source)
# evaluated in the page with its argument; blocks every request that is not to our server (the page must
# need nothing else) and reports them.
DRIVER = r"""
const { chromium } = require(process.env.PLAYWRIGHT_CORE);
const fs = require("fs"), os = require("os"), path = require("path");
(async () => {
  const cfg = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
  const origin = new URL(cfg.url).origin;
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), "persona-chromium-"));
  const out = { results: [], external: [], logs: [], fetched: [], seconds: {} };
  const t0 = Date.now();
  const mark = (what) => { out.seconds[what] = (Date.now() - t0) / 1000; };
  let context = null;
  try {
    context = await chromium.launchPersistentContext(profile, {
      executablePath: cfg.chromium, headless: true,
      args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync"],
    });
    await context.route("**/*", (route) => {
      const u = route.request().url();
      if (u.startsWith(origin) || u.startsWith("data:") || u.startsWith("blob:")) return route.continue();
      out.external.push(u);
      return route.abort();
    });
    mark("launched");
    const page = context.pages()[0] ?? (await context.newPage());
    page.on("console", (m) => out.logs.push(`${m.type()}: ${m.text()}`));
    page.on("pageerror", (e) => out.logs.push(`pageerror: ${e.message}`));
    page.on("requestfinished", (r) => out.fetched.push(r.url().slice(origin.length)));
    await page.goto(cfg.url);
    await page.waitForFunction(() => window.__persona && (window.__persona.ready || window.__persona.error),
                               null, { timeout: cfg.timeout_ms });
    mark("loaded");
    for (const [i, step] of cfg.steps.entries()) {
      out.results.push(await page.evaluate(([src, arg]) => (0, eval)(`(${src})`)(arg), [step.fn, step.arg]));
      mark(step.name ?? `step ${i}`);
      if (step.screenshot) await page.screenshot({ path: step.screenshot, fullPage: true });
    }
  } catch (e) {
    out.error = String((e && e.stack) || e);
  } finally {
    if (context) await context.close();
    fs.rmSync(profile, { recursive: true, force: true });
  }
  console.log(JSON.stringify(out));
})();
"""
# Steps: what the page shows and loaded; a new chat's first turn; another model, then a new chat's turn; how
# replies are drawn (and the bubbles on the page); the chain's scores.
STATE = """() => ({ error: window.__persona.error, dtype: window.__persona.dtype, device: window.__persona.device,
  dtypes: window.__persona.dtypes, persona: document.getElementById("persona-name").textContent,
  preset: document.getElementById("preset").textContent, dtype_note: document.getElementById("dtype-note").textContent,
  selected: document.getElementById("dtype").value,
  defaults: Object.fromEntries([...document.querySelectorAll("#defaults dd")].map((d) => [d.dataset.key, d.textContent])),
  panel: Object.fromEntries([...document.querySelectorAll("#settings input")].map((e) => [e.id, e.type === "checkbox" ? e.checked : e.value])) })"""
SEND = "([t, s]) => { window.__persona.reset(); return window.__persona.send(t, s); }"
LOAD_AND_SEND = "async ([d, t, s]) => { window.__persona.reset(); await window.__persona.load(d); return window.__persona.send(t, s); }"
BUBBLES = """(texts) => {
  const shown = texts.map((t) => { const el = document.createElement("div"); window.__persona.showReply(el, t); return el.textContent; });
  return { shown, bubbles: [...document.querySelectorAll("#chat .msg.assistant")].map((b) => b.textContent) };
}"""
SCORES = """(cases) => cases.map((c) => window.__persona.processScores(c.logits, c.history,
  { promptLength: c.prompt_length, eos: c.eos, settings: c.settings })
  .map((v) => (v === -Infinity ? "-inf" : Number.isNaN(v) ? "nan" : v)))"""


def run_page(url: str, steps: list[dict], tmp_path: Path) -> dict:
    """Runs DRIVER on `url` with `steps`; returns its report (asserting it got one, without error)."""
    cfg_path = tmp_path / "run.json"
    cfg_path.write_text(json.dumps({"url": url, "chromium": CHROMIUM, "timeout_ms": 120_000, "steps": steps}))
    (tmp_path / "driver.js").write_text(DRIVER)
    env = {**os.environ, "PLAYWRIGHT_CORE": str(node_modules() / "playwright-core")}
    run = subprocess.run(["node", str(tmp_path / "driver.js"), str(cfg_path)], capture_output=True, text=True,
                         timeout=300, env=env, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert "error" not in out, out["error"] + "\n" + "\n".join(out["logs"][-20:])
    assert out["external"] == [], "the page fetched something from outside the folder"
    return out


@pytest.fixture(scope="module")
def exported(tiny_path, tmp_path_factory):
    """The tiny model with a random LoRA adapter "trained" on data/bluey (its persona card names Bluey),
    fused and exported (fp32 + q4)."""
    root = tmp_path_factory.mktemp("web")
    model, _ = load_model(str(tiny_path))
    mx.random.seed(5)  # before attach_adapters, which draws lora_a: the same adapter whatever ran before
    cfg = attach_adapters(model, "lora", rank=4, alpha=8.0, modules=MODULES)
    cfg["model"] = str(tiny_path)
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = 0.05 * mx.random.normal(m.lora_b.shape)
    (root / "adapter").mkdir()
    save_adapters(model, root / "adapter", cfg)
    (root / "adapter" / "config.yaml").write_text(f"model: {tiny_path}\ndata: {REPO / 'data' / 'bluey'}\n")
    hf = fuse(str(tiny_path), root / "adapter", root / "hf")
    web = export_onnx(hf, root / "site", ("fp32", "q4"))
    return web, root / "adapter", tiny_path


def mlx_greedy_reply(base: Path, adapter: Path, eos: set[int], n: int,
                     config: GenerationConfig | None = None) -> tuple[list[int], list[int], str]:
    """MLX's greedy reply to MESSAGE: the argmax of the raw logits, or of process_logits(`config`) (temperature 0)."""
    from mlx_lm.models.cache import make_prompt_cache

    model, tokenizer = load_model(str(base), adapter_path=adapter)
    text = tokenizer.apply_chat_template([{"role": "user", "content": MESSAGE}], add_generation_prompt=True,
                                         tokenize=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    cache = make_prompt_cache(model)
    logits = model(mx.array([ids]), cache=cache)
    out = []
    for _ in range(n):
        scores = logits[0, -1]
        if config is not None:
            scores = process_logits(config, ids + out, scores, prompt_length=len(ids), eos_token_ids=sorted(eos))
        out.append(int(mx.argmax(scores).item()))
        if out[-1] in eos:
            break
        logits = model(mx.array([[out[-1]]]), cache=cache)
    return ids, out, tokenizer.decode(out, skip_special_tokens=True)


@contextlib.contextmanager
def serving(web_dir: Path):
    """The URL of `mlx-persona web WEB_DIR --port 0`, running in a child process while in the block."""
    proc, url = start_server(web_dir)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def start_server(web_dir: Path) -> tuple[subprocess.Popen, str]:
    """`mlx-persona web WEB_DIR --port 0` in a child process; returns it and the URL it prints."""
    proc = subprocess.Popen([sys.executable, "-m", "mlx_persona", "web", str(web_dir), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen = []
    while True:
        try:
            line = lines.get(timeout=60)
        except queue.Empty:
            proc.kill()
            raise AssertionError(f"`mlx-persona web` printed no URL: {seen}") from None
        seen.append(line)
        m = re.search(r"http://127\.0\.0\.1:\d+/", line)
        if m:
            return proc, m.group(0)
        if proc.poll() is not None:
            raise AssertionError(f"`mlx-persona web` exited: {''.join(seen)}")


@needs_js
def test_install_page_and_server_headers(exported, tmp_path):
    web, _, _ = exported
    install_page(web)
    for name in ("index.html", "app.js", "style.css", "web.json", "vendor/transformers/transformers.min.js",
                 "vendor/ort/ort-wasm-simd-threaded.asyncify.wasm", "vendor/ort/ort-wasm-simd-threaded.asyncify.mjs"):
        assert (web / name).is_file(), name
    manifest = json.loads((web / "web.json").read_text())
    assert manifest["dtypes"] == ["fp32", "q4"]
    # The export measured the tiny model's q4 (~0.4 of fp32's greedy next tokens): fp32 loads first.
    assert manifest["q4_agreement"] < Q4_MIN_AGREEMENT and manifest["default_dtype"] == "fp32"
    assert manifest["persona"] == {"name": "Bluey"} and manifest["preset"] == "persona"
    assert (web / "sampling.js").read_bytes() == (PAGE_DIR / "sampling.js").read_bytes()
    assert "https://" not in (web / "app.js").read_text() + (web / "index.html").read_text()
    server = make_server(web, 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}/"
        for path, mime in (("vendor/ort/ort-wasm-simd-threaded.asyncify.wasm", "application/wasm"),
                           ("vendor/ort/ort-wasm-simd-threaded.asyncify.mjs", "text/javascript"),
                           ("onnx/model_q4.onnx_data", "application/octet-stream"),
                           ("index.html", "text/html")):
            with urllib.request.urlopen(base + path) as r:
                assert r.headers["Content-Type"].split(";")[0] == mime, path
                assert r.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(FileNotFoundError, match="export onnx"):
        install_page(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(WebError, match="model.onnx"):
        install_page(tmp_path)


def test_default_dtype_rule(exported, tmp_path):
    """fp32 unless the export measured q4 keeping fp32's greedy next token at Q4_MIN_AGREEMENT of the positions."""
    web, _, _ = exported
    assert default_dtype(["fp32", "q4"], None) == "fp32"
    assert default_dtype(["fp32", "q4"], Q4_MIN_AGREEMENT - 0.01) == "fp32"
    assert default_dtype(["fp32", "q4"], Q4_MIN_AGREEMENT) == "q4"
    assert default_dtype(["q4"], None) == "q4" and default_dtype(["fp32"], 1.0) == "fp32"
    meta = json.loads((web / "mlx_persona.json").read_text())
    agreement = meta["onnx"]["q4_agreement"]
    print(f"export: q4 = fp32's greedy next token at {agreement['agreed']}/{agreement['positions']} positions")
    assert 0 < agreement["agreed"] < agreement["positions"] and agreement["positions"] > 50
    assert meta["onnx"]["default_dtype"] == "fp32" and meta["persona"] == {"name": "Bluey"}
    assert json.loads((web / "config.json").read_text())["transformers.js_config"]["dtype"] == "fp32"
    # What web.json says follows what mlx_persona.json recorded and what the folder holds.
    copy = tmp_path / "site"
    shutil.copytree(web, copy, ignore=shutil.ignore_patterns("vendor"))
    meta["onnx"]["q4_agreement"]["next_token"] = 0.95
    (copy / "mlx_persona.json").write_text(json.dumps(meta))
    assert page_manifest(copy, ["fp32", "q4"])["default_dtype"] == "q4"
    assert page_manifest(copy, ["q4"])["default_dtype"] == "q4"
    (copy / "mlx_persona.json").write_text(json.dumps({"onnx": {}}))
    assert page_manifest(copy, ["fp32", "q4"])["default_dtype"] == "fp32"
    assert page_manifest(copy, ["fp32", "q4"])["persona"] is None
    (copy / "mlx_persona.json").write_text('{\n  "onnx": {,\n}')
    with pytest.raises(WebError, match=r"mlx_persona\.json:2: not valid JSON"):
        page_manifest(copy, ["fp32", "q4"])


@needs_js
@needs_browser
def test_browser_reply_equals_mlx(exported, tmp_path):
    web, adapter, base = exported
    eos = set(json.loads((web / "generation_config.json").read_text())["eos_token_id"])
    n = GREEDY["max_new_tokens"]
    prompt, expected, expected_text = mlx_greedy_reply(base, adapter, eos, n)
    # Greedy under a repetition penalty and an n-gram ban: generate() runs our processors, as MLX does.
    penalised = GenerationConfig(temperature=0.0, repetition_penalty=1.5, no_repeat_ngram_size=2)
    _, expected_penalised, _ = mlx_greedy_reply(base, adapter, eos, n, penalised)
    assert expected_penalised != expected
    # Sampling that can keep only the top token: top_k=1, top_p below 1/vocab, min_p=1 (each alone): greedy's
    # reply, drawn through each warper and the draw. Seeded sampling from everything: the same reply twice,
    # not greedy's.
    sample = {**persona_settings(), "max_new_tokens": n, "min_new_tokens": 0, "repetition_penalty": 1.0}
    only_top = [{**sample, **change}
                for change in ({"top_k": 1}, {"top_k": 0, "top_p": 1e-4}, {"top_k": 0, "top_p": 1.0, "min_p": 1.0})]
    seeded = {**sample, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 7}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    install_page(web)
    with serving(web) as url:
        out = run_page(f"{url}?device=wasm", [  # no ?dtype: the folder's default
            {"fn": STATE, "name": "state"},
            {"fn": SEND, "arg": [MESSAGE, GREEDY], "name": "fp32 greedy", "screenshot": str(ARTIFACTS / "web-fp32.png")},
            *({"fn": SEND, "arg": [MESSAGE, s], "name": f"fp32 only-top {i}"} for i, s in enumerate(only_top)),
            {"fn": SEND, "arg": [MESSAGE, {**GREEDY, **persona_settings(penalised), "max_new_tokens": n}],
             "name": "fp32 penalised"},
            *({"fn": SEND, "arg": [MESSAGE, seeded], "name": f"fp32 seeded {i}"} for i in range(2)),
            {"fn": LOAD_AND_SEND, "arg": ["q4", MESSAGE, GREEDY], "name": "q4 greedy"},
            {"fn": STATE, "name": "q4 state"},
            {"fn": BUBBLES, "arg": ["\n" * 256, " \n ", "", "Hooray!"], "screenshot": str(ARTIFACTS / "web.png")},
        ], tmp_path)
    assert "/vendor/ort/ort-wasm-simd-threaded.asyncify.wasm" in out["fetched"]
    state, fp32, *sampled, penalised_reply, seeded_a, seeded_b, q4, q4_state, bubbles = out["results"]
    assert state["error"] is None and q4_state["error"] is None, state["error"] or q4_state["error"]
    assert state["device"] == "wasm" and state["dtypes"] == ["fp32", "q4"]
    assert state["dtype"] == state["selected"] == "fp32" and q4_state["dtype"] == "q4"
    assert "% of the positions measured at export" in state["dtype_note"]
    # The persona and its generation defaults (the persona preset, written by fuse) as the page shows them.
    gen = json.loads((web / "generation_config.json").read_text())
    assert state["persona"] == "Bluey" and state["preset"] == "persona preset"
    assert state["defaults"] == {"sampling": "on", "temperature": "0.8", "top-k": "50", "top-p": "0.95",
                                 "min-p": "off", "repetition penalty": "1.1", "no-repeat n-gram": "off",
                                 "min new tokens": "50", "max new tokens": "256"}
    assert {k: state["panel"][k] for k in ("do_sample", "temperature", "top_k", "top_p", "min_new_tokens")} == {
        "do_sample": gen["do_sample"], "temperature": "0.8", "top_k": "50", "top_p": "0.95", "min_new_tokens": "50"}
    for r in (fp32, *sampled, penalised_reply, seeded_a, q4):
        assert r["prompt_ids"] == prompt  # the chat template, rendered by transformers.js
    assert fp32["tokens"] == expected
    assert fp32["text"] == expected_text
    for r in sampled:
        assert r["tokens"] == expected
    assert penalised_reply["tokens"] == expected_penalised
    assert seeded_a["tokens"] == seeded_b["tokens"] != expected
    # A reply of only whitespace is named, not drawn as an empty bubble; none of the bubbles is blank.
    assert bubbles["shown"] == ["(only whitespace: 256 line breaks)", "(only whitespace: 3 whitespace characters)",
                                "(empty reply)", "Hooray!"]
    assert len(bubbles["bubbles"]) == 1 and bubbles["bubbles"][0].strip()  # q4's reply
    agree = sum(a == b for a, b in zip(q4["tokens"], expected))
    print("browser timeline (s):", out["seconds"])
    print(f"browser fp32 reply == MLX ({len(expected)} tokens): {expected_text!r}; "
          f"q4 agrees on {agree}/{len(expected)} tokens: {q4['text']!r}")
    assert len(q4["tokens"]) >= 1
    assert (ARTIFACTS / "web.png").stat().st_size > 0


def persona_settings(config: GenerationConfig | None = None) -> dict:
    """The page's settings for a GenerationConfig (default: the persona preset)."""
    c = config or preset("persona")
    return {"do_sample": c.do_sample, "temperature": c.temperature, "top_k": c.top_k, "top_p": c.top_p,
            "min_p": c.min_p, "repetition_penalty": c.repetition_penalty,
            "no_repeat_ngram_size": c.no_repeat_ngram_size, "min_new_tokens": c.min_new_tokens,
            "max_new_tokens": c.max_new_tokens}


def random_config(rng: np.random.Generator, vocab: int) -> GenerationConfig:
    return GenerationConfig(
        temperature=float(rng.choice([0.0, rng.uniform(0.3, 1.6)], p=[0.2, 0.8])),
        top_k=int(rng.choice([0, 1, 5, 40, vocab + 10])), top_p=float(rng.choice([1.0, rng.uniform(0.3, 0.99)])),
        min_p=float(rng.choice([0.0, rng.uniform(0.01, 0.3)])), repetition_penalty=float(rng.uniform(0.7, 1.6)),
        no_repeat_ngram_size=int(rng.choice([0, 2, 3])), min_new_tokens=int(rng.choice([0, 5, 20])))


def scoring_cases(vocab: int = 1000, eos: tuple[int, ...] = (1, 7)) -> list[dict]:
    """Logits, a token history and settings: the persona preset, chosen and seeded random settings; "ties" cases
    have logits on a 0.5 grid, so that top-k and top-p cut through groups of equal values."""
    rng = np.random.default_rng(13)
    configs = [(preset("persona"), False), (preset("persona"), True),
               (GenerationConfig(top_k=0, top_p=0.9, min_p=0.05, temperature=1.3), False),
               (GenerationConfig(temperature=0.0, repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=3), True),
               (GenerationConfig(top_k=20), True),
               *((random_config(rng, vocab), i % 2 == 1) for i in range(6))]
    cases = []
    for config, ties in configs:
        logits = rng.normal(0.0, 3.0, vocab).astype(np.float32)
        if ties:
            logits = np.round(logits * 2) / 2
        logits[list(eos)] = logits.max() + 1.0  # the end ids lead: min_new_tokens decides them
        prompt = rng.integers(0, 60, 30)
        generated = np.concatenate([rng.integers(0, 60, 4), prompt[5:9], prompt[5:7]])  # repeated n-grams
        history = np.concatenate([prompt, generated]).tolist()
        cases.append({"config": config, "logits": logits, "history": history, "prompt_length": len(prompt),
                      "eos": list(eos)})
    return cases


@needs_js
@needs_browser
def test_page_scores_equal_process_logits(exported, tmp_path):
    """sampling.js' chain (in Chromium, through transformers.js' processor classes) == process_logits (1e-5)."""
    web, _, _ = exported
    cases = scoring_cases()
    install_page(web)
    with serving(web) as url:
        out = run_page(f"{url}?device=wasm", [{"fn": SCORES, "arg": [
            {"logits": c["logits"].tolist(), "history": c["history"], "prompt_length": c["prompt_length"],
             "eos": c["eos"], "settings": persona_settings(c["config"])} for c in cases]}], tmp_path)
    (pages,) = out["results"]
    kept = []
    for c, page in zip(cases, pages, strict=True):
        ref = np.array(process_logits(c["config"], c["history"], mx.array(c["logits"]),
                                      prompt_length=c["prompt_length"], eos_token_ids=c["eos"]))
        got = np.array([float(v) for v in page], np.float64)
        finite = np.isfinite(got)
        got[finite] -= np.log(np.exp(got[finite] - got[finite].max()).sum()) + got[finite].max()  # log_softmax
        assert (np.isneginf(got) == np.isneginf(ref)).all(), (c["config"], np.flatnonzero(np.isneginf(got) != np.isneginf(ref)))
        assert np.abs(got[finite] - ref[finite]).max() < 1e-5, c["config"]
        kept.append(int(finite.sum()))
    print("tokens kept per case:", kept)
    # Cuts happened: top-p below the persona's top_k=50; top-p + min-p, and the n-gram ban, in the vocabulary;
    # the values tied with the 20th all survive top_k=20.
    assert kept[0] < 50 and kept[2] < 1000 and kept[3] < 1000 and kept[4] > 20
@needs_js
def test_cli_web_no_serve(exported, tmp_path):
    from click.testing import CliRunner

    from mlx_persona.cli import main

    web, _, _ = exported
    res = CliRunner().invoke(main, ["web", str(web), "--no-serve"])
    assert res.exit_code == 0, res.output
    assert (web / "index.html").exists() and "serving" not in res.output
    res = CliRunner().invoke(main, ["web", str(tmp_path), "--no-serve"])
    assert res.exit_code == 1 and "export onnx" in res.output and "Traceback" not in res.output
