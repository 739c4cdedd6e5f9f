"""Where the chat page's JavaScript comes from: transformers.js and onnxruntime-web's WebAssembly.

The wheel ships none of it (the WebAssembly files alone are ~40 MB), only ``package.json`` and
``package-lock.json``, which pin every package with its integrity hash. :func:`runtime_sources` takes the
first ``node_modules`` of:

1. ``$MLX_PERSONA_NODE_MODULES``, one of the user's choosing;
2. the one beside this file: a checkout after ``npm ci`` (``scripts/setup.sh test``);
3. ``cache_dir()/web/transformers-<lock hash>/node_modules``, installed on first use: ``npm ci`` of the
   shipped lock file in a fresh private folder (no dev dependencies, no install scripts), of which only the
   files the page copies are kept (~42 MB of npm's ~470), moved into place by one rename.

The browser runs what that folder holds, so it is kept like the JIT's kernel folder
(:func:`mlx_persona.backend.folders.private_dir`): mode 0700, ours alone, on a way only root or we can
change, and its files ours and not links. Without npm, the error says so on one line, with what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from mlx_persona.backend.folders import UnsafeFolder, check_file, private_dir, problem
from mlx_persona.export.web.errors import WebError
from mlx_persona.paths import cache_dir

PAGE_DIR = Path(__file__).resolve().parent
NPM_FILES = ("package.json", "package-lock.json", ".npmrc")
# onnxruntime-web builds transformers.js loads: asyncify (WebGPU + WASM), plain (Safari < 26 without WebGPU).
ORT_FILES = ("ort-wasm-simd-threaded.asyncify.mjs", "ort-wasm-simd-threaded.asyncify.wasm",
             "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
NPM_CI = ("ci", "--omit=dev", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error")


def user_folder() -> Path:
    """The per-user install of the pinned packages (it may not exist yet): one per lock file."""
    lock = hashlib.sha256((PAGE_DIR / "package-lock.json").read_bytes()).hexdigest()[:16]
    return cache_dir() / "web" / f"transformers-{lock}"


def node_modules() -> Path:
    """The ``node_modules`` the page's runtime is taken from (see the module doc); nothing is installed here."""
    if os.environ.get("MLX_PERSONA_NODE_MODULES"):
        return Path(os.environ["MLX_PERSONA_NODE_MODULES"])
    checkout = PAGE_DIR / "node_modules"
    return checkout if checkout.is_dir() else user_folder() / "node_modules"


def runtime_sources(log=None) -> tuple[dict[str, Path], dict]:
    """{destination (relative to the web folder): source} for the runtime files, and their versions.

    Args:
        log: called with one line before a first-use install (which takes a while).

    Raises:
        WebError: the packages are missing or broken, npm is missing or failed, or the per-user folder is
            not ours alone; the message says what to do.
    """
    if os.environ.get("MLX_PERSONA_NODE_MODULES") or (PAGE_DIR / "node_modules").is_dir():
        return _sources(node_modules(), f"run `npm ci` in {PAGE_DIR} (or set MLX_PERSONA_NODE_MODULES)")
    try:
        web = private_dir(cache_dir(), "web")
        folder = web / user_folder().name
        if not os.path.lexists(folder):
            _install(web, folder, log or (lambda line: None))
        why = problem(folder)
        if why:
            raise UnsafeFolder(why)
        found = _sources(folder / "node_modules", f"remove {folder} to install it again")
        for src in found[0].values():
            check_file(src)
    except UnsafeFolder as e:
        raise WebError(f"{e}: the page's JavaScript is not installed or taken from there") from None
    except OSError as e:  # a full disk, a read-only cache ...
        raise WebError(f"cannot install transformers.js into {user_folder()}: {e.strerror or e}") from None
    return found


def _packages(nm: Path, setup: str) -> tuple[Path, Path, dict]:
    """(transformers.js' folder, the onnxruntime-web it bundles, their versions) in `nm`."""
    tjs = nm / "@huggingface" / "transformers"
    if not (tjs / "dist" / "transformers.min.js").exists():
        raise WebError(f"transformers.js is not installed in {nm}: {setup}")
    tjs_pkg = json.loads((tjs / "package.json").read_text())
    wanted = tjs_pkg.get("dependencies", {}).get("onnxruntime-web", "")
    # npm nests a dependency when another version sits at the top level; prefer the nested one.
    for ort in (tjs / "node_modules" / "onnxruntime-web", nm / "onnxruntime-web"):
        if (ort / "package.json").exists():
            break
    else:
        raise WebError(f"onnxruntime-web is not installed in {nm}: {setup}")
    ort_version = json.loads((ort / "package.json").read_text())["version"]
    # The WASM binary must be the build of the JavaScript bundled inside transformers.min.js.
    if wanted and wanted.lstrip("^~=") != ort_version and wanted[0].isdigit():
        raise WebError(f"transformers.js {tjs_pkg['version']} needs onnxruntime-web {wanted}, "
                       f"found {ort_version} in {ort}: {setup}")
    return tjs, ort, {"transformers.js": tjs_pkg["version"], "onnxruntime-web": ort_version}


def _sources(nm: Path, setup: str) -> tuple[dict[str, Path], dict]:
    tjs, ort, versions = _packages(nm, setup)
    files = {"vendor/transformers/transformers.min.js": tjs / "dist" / "transformers.min.js"}
    for name in ORT_FILES:
        src = ort / "dist" / name
        if not src.exists():
            raise WebError(f"{src}: missing from onnxruntime-web {versions['onnxruntime-web']}: {setup}")
        files[f"vendor/ort/{name}"] = src
    return files, versions


def _install(web: Path, folder: Path, log) -> None:
    """``npm ci`` of the shipped lock file in a private folder under `web`; what the page needs becomes `folder`."""
    npm = shutil.which("npm")
    pinned = json.loads((PAGE_DIR / "package-lock.json").read_text())["packages"][
        "node_modules/@huggingface/transformers"]["version"]
    if npm is None:
        raise WebError(f"transformers.js {pinned} is not installed and npm is not on PATH to install it: install "
                       "Node.js (with npm) and run this again, or set MLX_PERSONA_NODE_MODULES to a node_modules "
                       "holding it")
    log(f"installing transformers.js {pinned} into {folder} with npm ci (once; npm fetches ~470 MB, "
        "~42 MB are kept)")
    stage = Path(tempfile.mkdtemp(prefix=".install-", dir=web))
    try:
        for name in NPM_FILES:
            shutil.copyfile(PAGE_DIR / name, stage / name)
        done = subprocess.run([npm, *NPM_CI], cwd=stage, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              check=False)
        if done.returncode:
            raise WebError(f"npm ci failed (exit {done.returncode}) installing transformers.js {pinned}: "
                           f"{_npm_error(done.stderr or done.stdout)}")
        nm = stage / "node_modules"
        files = _sources(nm, "npm ci left an incomplete node_modules")[0].values()
        kept = stage / "kept"
        for src in {*files, *(f.parents[1] / "package.json" for f in files)}:  # and the packages' versions
            dst = kept / "node_modules" / src.relative_to(nm)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
            os.chmod(dst, 0o644)
        for here, _, _ in os.walk(kept):
            os.chmod(here, 0o700)
        try:
            os.rename(kept, folder)
        except OSError:
            if not folder.is_dir():  # else another process installed it meanwhile
                raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _npm_error(output: str) -> str:
    """npm's error on one line: its code and first message (not the pointer to its log file)."""
    lines = [line.removeprefix("npm error").strip() for line in output.splitlines() if line.strip()]
    code = next((line[5:] for line in lines if line.startswith("code ")), "")
    said = next((line for line in lines if not line.startswith(("code ", "A complete log"))), "")
    return ": ".join(x for x in (code, said) if x) or "no message"
