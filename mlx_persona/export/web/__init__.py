"""The static chat page: install it next to an ONNX export and serve it on 127.0.0.1.

``mlx-persona web WEB_DIR`` copies into WEB_DIR (an output folder of ``mlx-persona export onnx``):

- ``index.html``, ``app.js``, ``sampling.js`` (the logits processors), ``style.css`` (this folder);
- ``vendor/transformers/transformers.min.js``: transformers.js' browser bundle (it includes
  onnxruntime-web's JavaScript);
- ``vendor/ort/ort-wasm-simd-threaded*.{mjs,wasm}``: onnxruntime-web's WebAssembly binaries of the same
  version, which transformers.js would otherwise fetch from a CDN;
- ``web.json``: the dtypes the folder has, the one to load by default, the persona (:mod:`.manifest`).

The JavaScript packages (versions pinned in package.json and package-lock.json) come from
``$MLX_PERSONA_NODE_MODULES``, from ``npm ci`` in this folder (a checkout), or else from a per-user
install made with npm on first use (:mod:`.runtime`; the wheel ships no JavaScript runtime). The server
(:mod:`.server`, shared by every server of mlx-persona) serves the folder's regular files and nothing else
(no symlink out of it, no listing, no ``mlx_persona.json``), only to ``Host: 127.0.0.1:PORT`` /
``localhost:PORT`` / ``[::1]:PORT``, GET/HEAD only, with read timeouts and at most 32 connections; with
the MIME types browsers insist on (``.wasm`` application/wasm, ``.mjs`` text/javascript) and
cross-origin isolation headers, which let onnxruntime-web use threads.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from mlx_persona.export.web.errors import WebError
from mlx_persona.export.web.manifest import page_manifest
from mlx_persona.export.web.runtime import PAGE_DIR, node_modules, runtime_sources
from mlx_persona.export.web.server import (
    MAX_CONNECTIONS,
    REQUEST_TIMEOUT,
    LocalOnlyServer,
    StaticFileHandler,
)

__all__ = ["PAGE_DIR", "WebError", "install_page", "make_server", "node_modules", "serve"]

PAGE_FILES = ("index.html", "app.js", "sampling.js", "style.css")
DTYPE_FILES = {"fp32": "model.onnx", "q4": "model_q4.onnx"}
MIME = {".wasm": "application/wasm", ".mjs": "text/javascript", ".js": "text/javascript",
        ".json": "application/json", ".onnx": "application/octet-stream", ".onnx_data": "application/octet-stream",
        ".css": "text/css", ".html": "text/html", ".png": "image/png"}


def _copy_if_changed(src: Path, dst: Path) -> None:
    if dst.exists():
        s, d = src.stat(), dst.stat()
        if s.st_size == d.st_size and int(s.st_mtime) == int(d.st_mtime):
            return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".part")
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def install_page(web_dir: str | Path, log=None) -> Path:
    """Copies the page and the browser runtime into an ONNX export folder.

    Args:
        web_dir: a folder written by ``mlx-persona export onnx`` (``config.json`` + ``onnx/``).
        log: called with one line before the runtime is installed on first use (:mod:`.runtime`).

    Returns:
        The folder. Nothing is written outside it.
    """
    web = Path(web_dir).expanduser()
    if not (web / "config.json").is_file():
        raise FileNotFoundError(f"{web}: no config.json; pass a folder written by `mlx-persona export onnx`")
    dtypes = [d for d, name in DTYPE_FILES.items() if (web / "onnx" / name).is_file()]
    if not dtypes:
        raise WebError(f"{web}/onnx: no model.onnx or model_q4.onnx; run `mlx-persona export onnx` first")
    runtime, versions = runtime_sources(log)
    for name in PAGE_FILES:
        _copy_if_changed(PAGE_DIR / name, web / name)
    for dst, src in runtime.items():
        _copy_if_changed(src, web / dst)
    manifest = {**page_manifest(web, dtypes), **versions}
    (web / "web.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return web


class _PageHandler(StaticFileHandler):
    """The folder's files (never mlx_persona.json: provenance, not for the page) with cross-origin isolation."""

    mime = MIME
    hidden = frozenset({"mlx_persona.json"})

    def end_headers(self):
        # Cross-origin isolation enables SharedArrayBuffer, i.e. multi-threaded WASM.
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()


def make_server(web_dir: str | Path, port: int = 0, log=None, *, host: str = "127.0.0.1",
                timeout: float = REQUEST_TIMEOUT, max_connections: int = MAX_CONNECTIONS) -> LocalOnlyServer:
    """An HTTP server for `web_dir` on `host` (port 0 = a free port; see ``server.server_port``).

    It serves the folder's regular files and nothing else, to requests naming the bound address only,
    with `timeout` seconds per read and `max_connections` at once: see :mod:`mlx_persona.export.web.server`.
    """
    root = Path(web_dir).resolve(strict=True)
    server = LocalOnlyServer((host, port), _PageHandler, request_timeout=timeout, max_connections=max_connections,
                             log=log)
    server.root = root
    return server


def serve(web_dir: str | Path, port: int = 8000, log=print, request_log=None, host: str = "127.0.0.1") -> None:
    """Serves `web_dir` on `host` (127.0.0.1 by default) until interrupted."""
    server = make_server(web_dir, port, request_log, host=host)
    shown = f"[{host}]" if ":" in host else host
    log(f"serving {Path(web_dir).resolve()} at http://{shown}:{server.server_port}/ (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
