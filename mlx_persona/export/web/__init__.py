"""The static chat page: install it next to an ONNX export and serve it on 127.0.0.1.

``mlx-persona web WEB_DIR`` copies into WEB_DIR (an output folder of ``mlx-persona export onnx``):

- ``index.html``, ``app.js``, ``style.css`` (this folder);
- ``vendor/transformers/transformers.min.js``: transformers.js' browser bundle (it includes
  onnxruntime-web's JavaScript);
- ``vendor/ort/ort-wasm-simd-threaded*.{mjs,wasm}``: onnxruntime-web's WebAssembly binaries of the same
  version, which transformers.js would otherwise fetch from a CDN;
- ``web.json``: the dtypes the folder has, so the page offers only those.

The JavaScript packages come from ``npm ci`` in this folder (versions pinned in package.json and
package-lock.json); ``MLX_PERSONA_NODE_MODULES`` may point at another ``node_modules``. The server is
Python's ``http.server`` with the MIME types browsers insist on (``.wasm`` application/wasm, ``.mjs``
text/javascript) and cross-origin isolation headers, which let onnxruntime-web use threads.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

__all__ = ["WebError", "install_page", "make_server", "serve", "node_modules", "PAGE_DIR"]

PAGE_DIR = Path(__file__).resolve().parent
PAGE_FILES = ("index.html", "app.js", "style.css")
# onnxruntime-web builds transformers.js loads: asyncify (WebGPU + WASM), plain (Safari < 26 without WebGPU).
ORT_FILES = ("ort-wasm-simd-threaded.asyncify.mjs", "ort-wasm-simd-threaded.asyncify.wasm",
             "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
DTYPE_FILES = {"fp32": "model.onnx", "q4": "model_q4.onnx"}
MIME = {".wasm": "application/wasm", ".mjs": "text/javascript", ".js": "text/javascript",
        ".json": "application/json", ".onnx": "application/octet-stream", ".onnx_data": "application/octet-stream",
        ".css": "text/css", ".html": "text/html", ".png": "image/png"}


class WebError(Exception):
    """The page cannot be installed (not an export folder, JavaScript packages missing ...)."""


def node_modules() -> Path:
    """The ``node_modules`` holding ``@huggingface/transformers`` and ``onnxruntime-web``."""
    return Path(os.environ.get("MLX_PERSONA_NODE_MODULES") or PAGE_DIR / "node_modules")


def _runtime_sources() -> tuple[dict[str, Path], dict]:
    """{destination (relative to the web folder): source} for the runtime files, and their versions."""
    nm = node_modules()
    tjs = nm / "@huggingface" / "transformers"
    setup = f"run `npm ci` in {PAGE_DIR} (or set MLX_PERSONA_NODE_MODULES)"
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
    files = {"vendor/transformers/transformers.min.js": tjs / "dist" / "transformers.min.js"}
    for name in ORT_FILES:
        src = ort / "dist" / name
        if not src.exists():
            raise WebError(f"{src}: missing from onnxruntime-web {ort_version}: {setup}")
        files[f"vendor/ort/{name}"] = src
    return files, {"transformers.js": tjs_pkg["version"], "onnxruntime-web": ort_version}


def _copy_if_changed(src: Path, dst: Path) -> None:
    if dst.exists():
        s, d = src.stat(), dst.stat()
        if s.st_size == d.st_size and int(s.st_mtime) == int(d.st_mtime):
            return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".part")
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def install_page(web_dir: str | Path) -> Path:
    """Copies the page and the browser runtime into an ONNX export folder.

    Args:
        web_dir: a folder written by ``mlx-persona export onnx`` (``config.json`` + ``onnx/``).

    Returns:
        The folder. Nothing is written outside it.
    """
    web = Path(web_dir).expanduser()
    if not (web / "config.json").is_file():
        raise FileNotFoundError(f"{web}: no config.json; pass a folder written by `mlx-persona export onnx`")
    dtypes = [d for d, name in DTYPE_FILES.items() if (web / "onnx" / name).is_file()]
    if not dtypes:
        raise WebError(f"{web}/onnx: no model.onnx or model_q4.onnx; run `mlx-persona export onnx` first")
    runtime, versions = _runtime_sources()
    for name in PAGE_FILES:
        _copy_if_changed(PAGE_DIR / name, web / name)
    for dst, src in runtime.items():
        _copy_if_changed(src, web / dst)
    title = "mlx-persona chat"
    meta = web / "mlx_persona.json"
    if meta.exists():
        info = json.loads(meta.read_text())
        spec = (info.get("fused") or {}).get("model_spec")
        if info.get("random_weights") and info.get("preset"):
            title = f"mlx-persona chat · {info['preset']} (random weights)"
        elif spec:
            title = f"mlx-persona chat · {Path(str(spec)).name}"
    manifest = {"dtypes": dtypes, "default_dtype": "q4" if "q4" in dtypes else dtypes[0], "title": title,
                **versions}
    (web / "web.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return web


class _Handler(SimpleHTTPRequestHandler):
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, **MIME}

    def guess_type(self, path):
        # ".onnx_data" is not a suffix mimetypes knows; match it (and the rest) by name.
        for ext, mime in MIME.items():
            if str(path).endswith(ext):
                return mime
        return super().guess_type(path)

    def end_headers(self):
        # Cross-origin isolation enables SharedArrayBuffer, i.e. multi-threaded WASM.
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def log_message(self, format, *args):
        if self.server.log is not None:
            self.server.log(f"{self.address_string()} {format % args}")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A browser that navigates away mid-download resets the connection: not an error worth a traceback.
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            return
        super().handle_error(request, client_address)


def make_server(web_dir: str | Path, port: int = 0, log=None) -> ThreadingHTTPServer:
    """An HTTP server for `web_dir` on 127.0.0.1 (port 0 = a free port; see ``server.server_port``)."""
    server = _Server(("127.0.0.1", port), partial(_Handler, directory=str(Path(web_dir).resolve())))
    server.log = log
    return server


def serve(web_dir: str | Path, port: int = 8000, log=print, request_log=None) -> None:
    """Serves `web_dir` on 127.0.0.1 until interrupted."""
    server = make_server(web_dir, port, request_log)
    log(f"serving {Path(web_dir).resolve()} at http://127.0.0.1:{server.server_port}/ (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
