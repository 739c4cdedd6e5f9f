"""The built wheel works outside a checkout (issue 13): the quickstart, generate, eval, ONNX export, the web page.

The wheel is built from a copy of this tree (pyproject.toml, README.md, mlx_persona/: the checkout gets no
build/ nor egg-info) with ``pip wheel --no-build-isolation`` (offline), and installed with ``pip --python``
into a fresh virtual environment made ``--without-pip``. That environment gets the dependencies from this
one through a ``.pth`` file holding one plain path line: Python does not read the ``.pth`` files of a
folder added that way, so the editable install's finder there never runs and ``import mlx_persona`` can
only find the wheel's copy (checked). Every command runs from an empty folder, with no PYTHONPATH.

The built-in models and MLX's compiled kernels come from the test session's cache, as for every other test
(a fresh one would spend a minute compiling kernels); ``init-model`` shows the wheel building the tiny model
from its own copy of the data. The web page's JavaScript is installed the way a user without a checkout gets
it: ``npm ci`` of the shipped lock file on first use, here with ``npm_config_offline=true`` so that npm takes
the packages from its cache (``npm ci`` in mlx_persona/export/web put them there; skipped without it, failed
under CI=true).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import urllib.request
from pathlib import Path

import pytest

from mlx_persona.export.web import PAGE_DIR, WebError, runtime
from mlx_persona.paths import DEFAULT_DATA, data_path

REPO = Path(__file__).resolve().parents[1]
CHECKOUT_JS = PAGE_DIR / "node_modules" / "@huggingface" / "transformers" / "dist" / "transformers.min.js"
PROMPT = "Hi Bluey! What's your favourite game to play with Bingo?"
TIMEOUT = 600  # a guard against a hung command, not a measurement
PINNED = json.loads((PAGE_DIR / "package-lock.json").read_text())["packages"]["node_modules/@huggingface/transformers"]

needs_npm = pytest.mark.needs(bool(shutil.which("npm")) and CHECKOUT_JS.is_file(),
                              reason=f"needs npm and its cache of the pinned packages (`npm ci` in {PAGE_DIR})")


class Wheel:
    """The installed wheel: its environment, and commands run from a folder with it."""

    def __init__(self, venv: Path, env: dict):
        self.venv, self.env = venv, env

    def run(self, cwd: Path, *args: str, env: dict | None = None, ok: bool = True) -> subprocess.CompletedProcess:
        """``mlx-persona ARGS`` (or ``python -c`` with ``args[0] == "-c"``) in `cwd`; asserts exit 0 when `ok`."""
        exe = str(self.venv / "bin" / ("python" if args[0] == "-c" else "mlx-persona"))
        return _run([exe, *args], ok=ok, cwd=cwd, env={**self.env, **(env or {})})


def _run(cmd: list[str], *, ok: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, check=False, **kw)
    if ok:
        assert proc.returncode == 0, f"{cmd}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _check(*cmd: str) -> str:
    return _run(list(cmd)).stdout.strip()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Wheel:
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "mlx_persona", src / "mlx_persona",
                    ignore=shutil.ignore_patterns("node_modules", "__pycache__", "*.egg-info"))
    _check(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
           "-w", str(root / "dist"), str(src))
    (built,) = (root / "dist").glob("mlx_persona-*.whl")
    venv = root / "venv"
    _check(sys.executable, "-m", "venv", "--without-pip", str(venv))
    _check(sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps", "--no-index",
           "-q", str(built))
    purelib = _check(str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    Path(purelib, "_test_dependencies.pth").write_text("".join(f"{p}\n" for p in ours))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLX_PERSONA_NODE_MODULES")}
    env["HF_HUB_OFFLINE"] = "1"
    return Wheel(venv, env)


@pytest.fixture(scope="module")
def quickstart(wheel, tmp_path_factory) -> Path:
    """The quickstart's training (configs/quickstart.yaml, 3 steps) from an empty folder."""
    work = tmp_path_factory.mktemp("user")
    shutil.copy2(REPO / "configs" / "quickstart.yaml", work / "quickstart.yaml")  # `data: data/bluey`
    wheel.run(work, "train", "--config", "quickstart.yaml", "--steps", "3", "--no-progress")
    assert sorted(p.name for p in work.iterdir()) == ["quickstart.yaml", "runs"]  # nothing written beside the run
    return work


@pytest.fixture(scope="module")
def exported(wheel, quickstart) -> Path:
    wheel.run(quickstart, "export", "onnx", "runs/quickstart", "--out", "onnx", "--dtype", "q4")
    return quickstart / "onnx"


def test_the_wheel_is_what_runs(wheel, tmp_path):
    code = ("import sys, mlx_persona, mlx_persona.paths as p; print(mlx_persona.__file__); print(p.DEFAULT_DATA); "
            "print(sorted(f.name for f in p.DEFAULT_DATA.iterdir()))")
    file, data, names = wheel.run(tmp_path, "-c", code).stdout.splitlines()
    assert Path(file).is_relative_to(wheel.venv) and Path(data).is_relative_to(wheel.venv)
    assert names == str(sorted(["README.md", "eval_prompts.jsonl", "persona.yaml", "train.jsonl", "valid.jsonl"]))


def test_quickstart_trains_on_the_shipped_data(quickstart):
    out = quickstart / "runs" / "quickstart"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["stop_reason"] == "completed"
    # All of the shipped Bluey data: 149 training conversations, the 21 validation ones scored.
    assert summary["data"]["examples"] == 149 and summary["best_val_loss"] > 0


def test_generate_and_eval_from_an_empty_folder(wheel, quickstart):
    proc = wheel.run(quickstart, "generate", "--model", "runs/quickstart", "--preset", "persona", "--seed", "0",
                     "--max-new-tokens", "8", "--json", "--prompt", PROMPT)
    assert json.loads(proc.stdout)["text"]
    # The default prompts, persona card, style and validation data: the wheel's own.
    wheel.run(quickstart, "eval", "--model", "runs/quickstart", "--limit", "2", "--seeds", "0",
              "--max-new-tokens", "8", "-o", "report")
    rows = [json.loads(line) for line in (quickstart / "report" / "results.jsonl").read_text().splitlines()]
    prompts = [json.loads(line)["prompt"] for line in (DEFAULT_DATA / "eval_prompts.jsonl").read_text().splitlines()]
    assert sorted({r["prompt"] for r in rows}) == sorted(prompts[:2])


def test_the_builtin_tokenizer_is_trained_on_the_wheels_data(wheel, tiny_path, tmp_path):
    wheel.run(tmp_path, "init-model", "tiny")
    assert (tmp_path / "tiny" / "tokenizer.json").read_bytes() == (tiny_path / "tokenizer.json").read_bytes()


def test_onnx_export(exported):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(exported / "onnx" / "model_q4.onnx"))
    assert "input_ids" in {i.name for i in session.get_inputs()} and (exported / "tokenizer.json").is_file()


def test_web_page_without_npm_says_so(wheel, exported, tmp_path):
    web = shutil.copytree(exported, tmp_path / "web")
    env = {"MLX_PERSONA_CACHE": str(tmp_path / "cache"), "PATH": str(wheel.venv / "bin")}
    proc = wheel.run(tmp_path, "web", str(web), "--no-serve", env=env, ok=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    line = proc.stderr.splitlines()[-1]
    assert line.startswith(f"error: transformers.js {PINNED['version']} is not installed and npm is not on PATH")
    assert "MLX_PERSONA_NODE_MODULES" in line
    assert not (web / "vendor").exists() and not any((tmp_path / "cache" / "web").iterdir())


@needs_npm
def test_web_page_failed_npm_leaves_nothing(wheel, exported, tmp_path):
    web = shutil.copytree(exported, tmp_path / "web")
    empty_npm_cache = tmp_path / "npm-cache"
    env = {"MLX_PERSONA_CACHE": str(tmp_path / "cache"), "npm_config_offline": "true",
           "npm_config_cache": str(empty_npm_cache)}
    proc = wheel.run(tmp_path, "web", str(web), "--no-serve", env=env, ok=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith(f"error: npm ci failed (exit 1) installing transformers.js "
                                                   f"{PINNED['version']}: ENOTCACHED: ")
    assert not any((tmp_path / "cache" / "web").iterdir())  # no half-installed folder, no staging folder


@needs_npm
def test_web_page_installs_transformers_js_on_first_use_and_serves_it(wheel, exported, tmp_path):
    web = shutil.copytree(exported, tmp_path / "web")
    cache = tmp_path / "cache"
    env = {"MLX_PERSONA_CACHE": str(cache), "npm_config_offline": "true"}
    proc = wheel.run(tmp_path, "web", str(web), "--no-serve", env=env)
    assert f"installing transformers.js {PINNED['version']} into " in proc.stderr
    (folder,) = (cache / "web").iterdir()
    assert folder.name.startswith("transformers-") and folder.stat().st_mode & 0o777 == 0o700
    kept = sorted(p.relative_to(folder / "node_modules").as_posix() for p in folder.rglob("*") if p.is_file())
    assert kept == sorted(["@huggingface/transformers/package.json", "@huggingface/transformers/dist/transformers.min.js",
                           "onnxruntime-web/package.json",
                           *(f"onnxruntime-web/dist/{n}" for n in runtime.ORT_FILES)])

    server = subprocess.Popen([str(wheel.venv / "bin" / "mlx-persona"), "web", str(web), "--port", "0"], cwd=tmp_path,
                              env={**wheel.env, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in server.stdout:
            if line.startswith("serving "):
                url = line.split(" at ", 1)[1].split()[0]
                break
        else:
            pytest.fail(f"the server did not start: {server.stderr.read()}")
        with urllib.request.urlopen(url + "vendor/transformers/transformers.min.js", timeout=30) as r:
            served = r.read()
        with urllib.request.urlopen(url + "vendor/ort/ort-wasm-simd-threaded.wasm", timeout=30) as r:
            assert r.headers["Content-Type"] == "application/wasm"
    finally:
        server.terminate()
        _, errors = server.communicate(timeout=TIMEOUT)
    assert "installing" not in errors  # the second time: installed already
    # The pinned version: the very bytes the checkout's `npm ci` installed.
    assert served == CHECKOUT_JS.read_bytes()


def test_data_bluey_names_the_shipped_files_unless_it_exists_here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert data_path("data/bluey") == DEFAULT_DATA
    assert data_path("./data/bluey/persona.yaml") == DEFAULT_DATA / "persona.yaml"
    assert data_path("data/bluey/no-such.jsonl") == Path("data/bluey/no-such.jsonl")  # the error names it
    assert data_path("data/blue") == Path("data/blue")
    (tmp_path / "data" / "bluey").mkdir(parents=True)
    assert data_path("data/bluey") == Path("data/bluey")  # a folder of the user's wins
    assert data_path("data/bluey/train.jsonl") == Path("data/bluey/train.jsonl")


def test_the_checkout_has_one_copy_of_the_data():
    assert (REPO / "data" / "bluey").is_symlink() and (REPO / "data" / "bluey").resolve() == DEFAULT_DATA.resolve()


def test_an_unsafe_per_user_folder_is_refused(tmp_path, monkeypatch):
    page = tmp_path / "page"
    page.mkdir()
    for name in runtime.NPM_FILES:
        shutil.copy2(PAGE_DIR / name, page / name)
    monkeypatch.setattr(runtime, "PAGE_DIR", page)  # a page folder without node_modules, as in the wheel
    monkeypatch.delenv("MLX_PERSONA_NODE_MODULES", raising=False)
    monkeypatch.setenv("MLX_PERSONA_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "web").mkdir(parents=True, mode=0o700)
    os.chmod(tmp_path / "cache" / "web", 0o777)
    with pytest.raises(WebError, match=r"web is writable by group and others .*not installed or taken from there"):
        runtime.runtime_sources()
