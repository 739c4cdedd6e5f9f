"""The browser path end to end: export -> `mlx-persona web` -> transformers.js in headless Chromium.

Needs Debian's `chromium` and `npm ci` in mlx_persona/export/web (transformers.js + playwright-core); skipped
with the reason when either is missing (failed instead under CI=true). Screenshots go to test-artifacts/
(MLX_PERSONA_TEST_ARTIFACTS).
"""

from __future__ import annotations

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

# Drives the page like a user would, through its test hook; blocks every request that is not to our
# server (the page must need nothing else) and reports them.
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
    for (const [i, run] of cfg.runs.entries()) {
      if (i === 0) {
        await page.goto(`${cfg.url}?dtype=${run.dtype}&device=wasm`);
        await page.waitForFunction(() => window.__persona && (window.__persona.ready || window.__persona.error),
                                   null, { timeout: cfg.timeout_ms });
      } else {  // what the dtype selector does: same page, another model
        await page.evaluate(async (dtype) => { window.__persona.reset(); await window.__persona.load(dtype); },
                            run.dtype);
      }
      mark(`${run.dtype} loaded`);
      const state = await page.evaluate(() => ({ error: window.__persona.error, dtype: window.__persona.dtype,
                                                  device: window.__persona.device, dtypes: window.__persona.dtypes }));
      const reply = state.error ? null
        : await page.evaluate(([t, s]) => window.__persona.send(t, s), [run.message, run.settings]);
      mark(`${run.dtype} replied`);
      if (run.screenshot) await page.screenshot({ path: run.screenshot, fullPage: true });
      out.results.push({ dtype: run.dtype, state, reply });
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


@pytest.fixture(scope="module")
def exported(tiny_path, tmp_path_factory):
    """The tiny model with a random LoRA adapter "trained" on data/bluey (its persona card names Bluey),
    fused and exported (fp32 + q4)."""
    root = tmp_path_factory.mktemp("web")
    model, _ = load_model(str(tiny_path))
    cfg = attach_adapters(model, "lora", rank=4, alpha=8.0, modules=MODULES)
    cfg["model"] = str(tiny_path)
    mx.random.seed(5)
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = 0.05 * mx.random.normal(m.lora_b.shape)
    (root / "adapter").mkdir()
    save_adapters(model, root / "adapter", cfg)
    (root / "adapter" / "config.yaml").write_text(f"model: {tiny_path}\ndata: {REPO / 'data' / 'bluey'}\n")
    hf = fuse(str(tiny_path), root / "adapter", root / "hf")
    web = export_onnx(hf, root / "site", ("fp32", "q4"))
    return web, root / "adapter", tiny_path


def mlx_greedy_reply(base: Path, adapter: Path, eos: set[int], n: int) -> tuple[list[int], list[int], str]:
    from mlx_lm.models.cache import make_prompt_cache

    model, tokenizer = load_model(str(base), adapter_path=adapter)
    text = tokenizer.apply_chat_template([{"role": "user", "content": MESSAGE}], add_generation_prompt=True,
                                         tokenize=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    cache = make_prompt_cache(model)
    logits = model(mx.array([ids]), cache=cache)
    out = []
    for _ in range(n):
        out.append(int(mx.argmax(logits[0, -1]).item()))
        if out[-1] in eos:
            break
        logits = model(mx.array([[out[-1]]]), cache=cache)
    return ids, out, tokenizer.decode(out, skip_special_tokens=True)


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
    prompt, expected, expected_text = mlx_greedy_reply(base, adapter, eos, GREEDY["max_new_tokens"])
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    cfg_path = tmp_path / "run.json"
    proc, url = start_server(web)
    try:
        cfg_path.write_text(json.dumps({"url": url, "chromium": CHROMIUM, "timeout_ms": 120_000, "runs": [
            {"dtype": "fp32", "message": MESSAGE, "settings": GREEDY, "screenshot": str(ARTIFACTS / "web-fp32.png")},
            {"dtype": "q4", "message": MESSAGE, "settings": GREEDY, "screenshot": str(ARTIFACTS / "web.png")}]}))
        (tmp_path / "driver.js").write_text(DRIVER)
        env = {**os.environ, "PLAYWRIGHT_CORE": str(node_modules() / "playwright-core")}
        run = subprocess.run(["node", str(tmp_path / "driver.js"), str(cfg_path)], capture_output=True, text=True,
                             timeout=300, env=env)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert "error" not in out, out["error"] + "\n" + "\n".join(out["logs"][-20:])
    assert out["external"] == [], "the page fetched something from outside the folder"
    assert "/vendor/ort/ort-wasm-simd-threaded.asyncify.wasm" in out["fetched"]
    fp32, q4 = out["results"]
    for r in (fp32, q4):
        assert r["state"]["error"] is None, r["state"]["error"]
        assert r["state"]["device"] == "wasm" and r["state"]["dtype"] == r["dtype"]
        assert r["reply"]["prompt_ids"] == prompt  # the chat template, rendered by transformers.js
    assert fp32["reply"]["tokens"] == expected
    assert fp32["reply"]["text"] == expected_text
    agree = sum(a == b for a, b in zip(q4["reply"]["tokens"], expected))
    print("browser timeline (s):", out["seconds"])
    print(f"browser fp32 reply == MLX ({len(expected)} tokens): {expected_text!r}; "
          f"q4 agrees on {agree}/{len(expected)} tokens: {q4['reply']['text']!r}")
    assert len(q4["reply"]["tokens"]) >= 1
    assert (ARTIFACTS / "web.png").stat().st_size > 0


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
