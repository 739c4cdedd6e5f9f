"""The chat page's server against an adversarial client on a shared machine: it serves the folder and
nothing else, to loopback Host names only, GET/HEAD only, with bounded connections and read timeouts;
the files it serves name no local absolute path; ``report.md`` / ``sweep.md`` run no markup.

Every server here is a real one (``make_server``) on a free port of 127.0.0.1; requests are written on raw
sockets so that no client library normalises the paths or the headers. Every loop is bounded.
"""

from __future__ import annotations

import html.parser
import json
import os
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from mlx_persona.export.web import PAGE_DIR, install_page, make_server, node_modules

SECRET = "TOP-SECRET-7f3a"
INDEX = "<!DOCTYPE html><title>persona page</title>"
PATIENCE = 6.0  # seconds a test waits for a server with a 1 s timeout to close a connection (default: 10)
needs_js = pytest.mark.needs((node_modules() / "@huggingface" / "transformers" / "dist").is_dir(),
                             reason=f"transformers.js not installed: run `npm ci` in {PAGE_DIR}")


# ------------------------------------------------------------------------------------------- helpers
def raw(port: int, data: bytes, timeout: float = 5.0) -> tuple[int, dict, bytes]:
    """Sends `data` as is and reads the reply until the server closes: (status, headers, body); status 0
    when the reply has no status line (none at all, or HTTP/0.9's)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    reply = b"".join(chunks)
    if not reply.startswith(b"HTTP/"):  # nothing, or an HTTP/0.9 reply (a body alone)
        return 0, {}, reply
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


def get(port: int, target: str, host: str | None = "default", method: str = "GET",
        extra: str = "") -> tuple[int, dict, bytes]:
    host = f"127.0.0.1:{port}" if host == "default" else host
    hdr = f"Host: {host}\r\n" if host is not None else ""
    return raw(port, f"{method} {target} HTTP/1.1\r\n{hdr}{extra}Connection: close\r\n\r\n".encode("latin-1"))


class Served:
    def __init__(self, folder: Path, **kw):
        self.server = make_server(folder, 0, **kw)
        self.port = self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def secret_dir(tmp_path) -> Path:
    d = tmp_path / "outside"
    d.mkdir()
    (d / "secret.txt").write_text(SECRET)
    return d


@pytest.fixture
def site(tmp_path, secret_dir) -> Path:
    """A folder laid out like an installed page, with symlinks planted by someone else."""
    web = tmp_path / "site"
    (web / "onnx").mkdir(parents=True)
    (web / "vendor" / "ort").mkdir(parents=True)
    (web / "index.html").write_text(INDEX)
    (web / "app.js").write_text("console.log('page');\n")
    (web / "web.json").write_text('{"dtypes": ["q4"]}\n')
    (web / "onnx" / "model_q4.onnx").write_bytes(b"\x08\x07onnx")
    (web / "onnx" / "model_q4.onnx_data").write_bytes(b"\0" * 64)
    (web / "vendor" / "ort" / "ort-wasm-simd-threaded.wasm").write_bytes(b"\0asm")
    (web / "vendor" / "ort" / "ort-wasm-simd-threaded.mjs").write_text("export {};\n")
    (web / "link_etc").symlink_to("/etc")
    (web / "link_out").symlink_to(secret_dir)
    (web / "secret.txt").symlink_to(secret_dir / "secret.txt")
    (web / "onnx" / "up.txt").symlink_to("../../outside/secret.txt")
    (web / "alias.js").symlink_to("app.js")  # inside the folder: fine
    (web / "mlx_persona.json").write_text(json.dumps({"fused": {"base": str(secret_dir), "note": SECRET}}))
    (web / "meta.txt").symlink_to("mlx_persona.json")
    (web / ".hidden.json").write_text(SECRET)
    return web


@pytest.fixture
def served(site):
    s = Served(site)
    yield s
    s.close()


# ------------------------------------------------------------------------------------------- files
def test_symlinks_out_of_the_folder_are_404(served, site, secret_dir):
    for target in ("/link_etc/passwd", "/link_etc/hostname", "/link_out/secret.txt", "/secret.txt",
                   "/onnx/up.txt", "/link_out/", "/link_etc/"):
        status, _, body = get(served.port, target)
        assert status == 404, target
        assert SECRET.encode() not in body and b"root:" not in body, target
    status, headers, body = get(served.port, "/alias.js")
    assert status == 200 and body == b"console.log('page');\n"
    assert headers["content-type"].startswith("text/javascript")


def test_no_directory_listing(served):
    for target in ("/onnx/", "/onnx", "/vendor/", "/vendor", "/vendor/ort/", "/vendor/ort", "//onnx/", "/./"):
        status, _, body = get(served.port, target)
        assert status == 404, target
        assert b"model_q4" not in body and b"ort-wasm" not in body and b"Directory listing" not in body, target
    for target in ("/", "/index.html", "/?x=1"):
        status, headers, body = get(served.port, target)
        assert (status, body) == (200, INDEX.encode()), target
        assert headers["content-type"].startswith("text/html")


def test_provenance_and_dot_files_not_served(served):
    for target in ("/mlx_persona.json", "/MLX_PERSONA.json", "/mlx_persona.json?x=1", "/meta.txt",
                   "/mlx%5fpersona.json", "/.hidden.json", "/%2ehidden.json"):
        status, _, body = get(served.port, target)
        assert status == 404 and SECRET.encode() not in body, target


def test_folder_swapped_for_a_symlink_after_resolving(site, secret_dir, monkeypatch):
    """The race: the path checks out, then a folder in it becomes a symlink out before the file is opened."""
    from mlx_persona.export.web import server

    root = site.resolve()
    (root / "d").mkdir()
    (root / "d" / "secret.txt").write_text("inside")
    resolved = server.resolve_file(root, "/d/secret.txt")
    assert resolved == root / "d" / "secret.txt"
    (root / "d").rename(root / "d.old")
    (root / "d").symlink_to(secret_dir)
    monkeypatch.setattr(server, "resolve_file", lambda *a, **k: resolved)
    assert server.open_file(root, "/d/secret.txt") is None


def test_mime_types_and_headers_kept(served):
    for target, mime in (("/vendor/ort/ort-wasm-simd-threaded.wasm", "application/wasm"),
                         ("/vendor/ort/ort-wasm-simd-threaded.mjs", "text/javascript"),
                         ("/onnx/model_q4.onnx_data", "application/octet-stream"),
                         ("/onnx/model_q4.onnx", "application/octet-stream"),
                         ("/web.json", "application/json")):
        status, headers, body = get(served.port, target)
        assert status == 200 and headers["content-type"].split(";")[0] == mime, target
        assert headers["cross-origin-embedder-policy"] == "require-corp"
        assert headers["cross-origin-opener-policy"] == "same-origin"
        assert int(headers["content-length"]) == len(body)
    status, headers, body = get(served.port, "/app.js", method="HEAD")
    assert status == 200 and body == b"" and headers["content-length"] == "21"


TRAVERSALS = [
    "/../outside/secret.txt", "/onnx/../../outside/secret.txt", "/%2e%2e/outside/secret.txt",
    "/%2E%2E/outside/secret.txt", "/..%2foutside%2fsecret.txt", "/%2e%2e%2foutside%2fsecret.txt",
    "/onnx/..%2f..%2foutside/secret.txt", "/%252e%252e/outside/secret.txt", "/%252e%252e%252foutside/secret.txt",
    "/..\\outside\\secret.txt", "/..%5coutside%5csecret.txt", "/onnx\\..\\..\\outside\\secret.txt",
    "/%c0%ae%c0%ae/outside/secret.txt", "/.%2e/outside/secret.txt", "/index.html%00.js", "/%00",
    "/./../outside/secret.txt", "..%2foutside/secret.txt", "http://127.0.0.1/../outside/secret.txt",
    "/" + "../" * 40 + "etc/passwd", "/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
]


def test_traversal_in_every_encoding(served):
    for target in TRAVERSALS:
        status, _, body = get(served.port, target)
        assert status in (400, 404), (target, status)
        assert SECRET.encode() not in body and b"root:" not in body, target


# ------------------------------------------------------------------------------------------- requests
def test_foreign_host_refused(served):
    p = served.port
    for host in ("evil.example.com", f"evil.example.com:{p}", f"127.0.0.1:{p + 1}", "127.0.0.1", "localhost",
                 f"127.0.0.2:{p}", f"localhost.:{p}", f"0.0.0.0:{p}", f"127.0.0.1:{p}@evil.example.com", ""):
        status, _, body = get(p, "/", host=host)
        assert status in (400, 403, 421), host
        assert b"persona page" not in body and len(body) < 200, host
        status, _, body = get(p, "/web.json", host=host)
        assert status in (400, 403, 421) and b"dtypes" not in body, host
    status, _, body = get(p, "/", host=None)  # no Host at all
    assert status == 400 and b"persona page" not in body
    status, _, body = raw(p, b"GET / HTTP/1.0\r\n\r\n")
    assert status == 400 and b"persona page" not in body
    assert b"persona page" not in raw(p, b"GET /\r\n\r\n")[2] + raw(p, b"GET /index.html\r\n\r\n")[2]  # HTTP/0.9
    status, _, body = get(p, "/", extra="Host: evil.example.com\r\n")  # two Host headers
    assert status == 400 and b"persona page" not in body
    for host in (f"127.0.0.1:{p}", f"localhost:{p}", f"[::1]:{p}", f"LOCALHOST:{p}"):
        status, _, body = get(p, "/", host=host)
        assert (status, body) == (200, INDEX.encode()), host


def test_wildcard_bind_refused(site):
    for host in ("0.0.0.0", "::", ""):
        with pytest.raises(ValueError, match="every interface"):
            make_server(site, 0, host=host)


def test_only_get_and_head(served):
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "PROPFIND", "FOO"):
        status, headers, body = get(served.port, "/index.html", method=method)
        assert status == 405, method
        assert headers.get("allow") == "GET, HEAD" and b"persona page" not in body, method


def test_half_sent_connections_bounded_and_timed_out(site):
    before = threading.active_count()
    s = Served(site, timeout=1.0, max_connections=32)
    socks: list[tuple[socket.socket, float]] = []
    try:
        t0 = time.monotonic()
        for _ in range(200):  # bounded: 200 connects, each with its own timeout
            c = socket.create_connection(("127.0.0.1", s.port), timeout=2)
            c.sendall(f"GET /index.html HTTP/1.1\r\nHost: 127.0.0.1:{s.port}\r\nX-Slow: ".encode())
            socks.append((c, time.monotonic()))
        opened = time.monotonic() - t0
        time.sleep(0.3)
        peak = threading.active_count() - before
        assert peak <= 32 + 3, f"{peak} server threads for 200 half-sent requests"
        # Each is closed by the server: at once over the bound, after the 1 s read timeout within it. Only
        # time tells the 1 s asked for from the 10 s default: the patience sits between them, 5 s past the
        # timeout, for a loaded machine (measured here: all closed within 1.0-1.3 s).
        held = []
        for c, since in socks:
            c.settimeout(max(0.05, since + PATIENCE - time.monotonic()))
            try:
                while c.recv(4096):
                    pass
            except ConnectionResetError:
                pass
            except TimeoutError:
                held.append(float("inf"))
                continue
            held.append(time.monotonic() - since)
        assert max(held) < PATIENCE, f"a half-sent request was held {max(held):.1f}s (timeout 1s)"
        with urllib.request.urlopen(f"http://127.0.0.1:{s.port}/index.html", timeout=5) as r:
            assert r.read() == INDEX.encode()
        print(f"200 half-sent connections opened in {opened:.2f}s: peak {peak} server threads, "
              f"each closed by the server within {max(held):.2f}s")
    finally:
        for c, _ in socks:
            c.close()
        s.close()
    deadline = time.monotonic() + 60  # waits for the server's threads to end, no longer than needed
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= before


def test_trickled_request_cut_at_the_deadline(site):
    """One byte per 0.3 s never trips a per-read timeout of 1 s; the request as a whole (line and headers
    within 1 s) must: the server closes the connection while the trickle goes on. 30 bytes take 9 s, so
    neither a missing deadline nor the 10 s default passes; a late scheduler only closes it later."""
    s = Served(site, timeout=1.0)
    try:
        with socket.create_connection(("127.0.0.1", s.port), timeout=2) as c:
            c.sendall(f"GET /index.html HTTP/1.1\r\nHost: 127.0.0.1:{s.port}\r\nX-Slow: ".encode())
            t0, sent, closed = time.monotonic(), 0, False
            for _ in range(30):
                try:
                    c.sendall(b"a")
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
                sent += 1
                c.settimeout(0.3)
                try:
                    closed = c.recv(4096) == b""
                except ConnectionResetError:
                    closed = True
                except TimeoutError:
                    pass
                if closed:
                    break
            print(f"closed by the server after {sent} trickled bytes, {time.monotonic() - t0:.2f}s")
            assert closed, f"trickled request still open after {sent} bytes, {time.monotonic() - t0:.1f}s"
        with urllib.request.urlopen(f"http://127.0.0.1:{s.port}/", timeout=5) as r:
            assert r.read() == INDEX.encode()
    finally:
        s.close()


# ------------------------------------------------------------------------------------------- served files
@pytest.fixture(scope="module")
def exported(tiny_path, tmp_path_factory):
    """The tiny model, fused and exported (q4) from folders under a recognisable absolute root."""
    from mlx_persona.export.hf import fuse
    from mlx_persona.models import load_model
    from mlx_persona.tuner.adapters import attach_adapters, save_adapters

    pytest.importorskip("onnxruntime")
    from mlx_persona.export.onnx import export_onnx

    root = tmp_path_factory.mktemp("abs-root-marker")
    model, _ = load_model(str(tiny_path))
    cfg = attach_adapters(model, "lora", rank=4, alpha=8.0, modules=["q_proj", "v_proj"])
    cfg["model"] = str(tiny_path)
    (root / "adapter").mkdir()
    save_adapters(model, root / "adapter", cfg)
    hf = fuse(str(tiny_path), root / "adapter", root / "hf")
    return export_onnx(hf, root / "site", ("q4",)), root


@needs_js
def test_served_files_name_no_local_path(exported, tiny_path):
    web, root = exported
    install_page(web)
    s = Served(web)
    needles = {str(root), str(root.resolve()), str(Path(tiny_path).parent), str(Path(tiny_path).resolve().parent),
               os.path.expanduser("~")} - {"/", ""}
    checked = []
    try:
        for path in sorted(p for p in web.rglob("*") if p.is_file()):
            rel = path.relative_to(web).as_posix()
            if path.suffix in (".onnx", ".onnx_data", ".wasm"):
                continue
            status, _, body = get(s.port, "/" + rel)
            if status == 404:
                continue
            assert status == 200, rel
            text = body.decode("utf-8", "replace")
            for needle in needles:
                assert needle not in text, f"/{rel} names the local path {needle}"
            checked.append(rel)
    finally:
        s.close()
    assert {"web.json", "config.json", "generation_config.json", "index.html", "app.js"} <= set(checked)
    # The export's provenance names local folders (the ONNX source, the fused base and adapter): it stays
    # on disk for the user and the tests, and is never served.
    assert "mlx_persona.json" not in checked and str(root) in (web / "mlx_persona.json").read_text()
    assert json.loads((web / "web.json").read_text())["title"].startswith("mlx-persona chat")


# ------------------------------------------------------------------------------------------- reports
EVIL = "run<img src=x onerror=alert(1)>"
EVIL_PROMPT = "Hi <script>alert(1)</script> | [click](javascript:alert(2)) ![x](javascript:alert(3))"
EVIL_REPLY = "Sure! <img src=x onerror=alert(4)>\n<a href=\"javascript:alert(5)\">x</a> & `code` *em* | done"


class _Tags(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _render(md: str) -> list[tuple[str, dict]]:
    """The tags a CommonMark renderer (raw HTML allowed, as CommonMark does) makes of `md`."""
    markdown_it = pytest.importorskip("markdown_it")
    page = markdown_it.MarkdownIt("commonmark", {"html": True}).enable("table").render(md)
    parser = _Tags()
    parser.feed(page)
    return parser.tags


def _assert_inert(tags: list[tuple[str, dict]], images: tuple[str, ...] = ()) -> None:
    """No tag but the report's own (its figures among `images`) and no script in attributes."""
    for tag, attrs in tags:
        if tag == "img" and attrs.get("src") in images and set(attrs) == {"src", "alt"}:
            continue
        assert tag not in ("img", "script", "iframe", "svg", "object", "a"), (tag, attrs)
        assert not any(k.startswith("on") for k in attrs), (tag, attrs)
        assert not any("javascript:" in (v or "") for v in attrs.values()), (tag, attrs)


def _metrics(words=5):
    return {"words": words, "mid_sentence": False, "early_end": False, "catchphrases": ["<b>hi</b>"],
            "breaking": []}


def test_report_md_escapes_what_it_shows(tmp_path):
    from mlx_persona.eval.report import write_eval_report
    from mlx_persona.eval.verdict import judge

    summary = {"replies": 1, "words_mean": 5.0}
    models = {EVIL: {**summary, "model": "/models/a`<img src=x onerror=alert(6)>`b", "adapter": "runs/<svg onload=1>",
                     "note": "base | <img src=y onerror=alert(7)>"},
              "plain": {**summary, "model": "builtin:tiny", "adapter": None, "note": None}}
    result = {"command": "mlx-persona eval `<img src=z onerror=alert(8)>`", "generation": {"temperature": 0.7},
              "prompts": [EVIL_PROMPT], "system": False, "models": models, "reference": None,
              "options": {"early_tokens": 8, "prompts": "<img src=p onerror=alert(9)>.jsonl",
                          "persona": "[card](javascript:alert(10))", "train": "train.jsonl", "valid": None}}
    rows = [{"prompt_id": 0, "prompt": EVIL_PROMPT, "seed": 0, "model": name, "text": EVIL_REPLY,
             "stop_reason": "end_token", "metrics": _metrics()} for name in models]
    # The verdict names the models too: as a fine-tune against the evil-named base, and as that base.
    judged = [judge("words_mean", 5.0, 4.0, None, 0.5), judge("val_loss", 1.0, 2.0, None, 0.0)]
    result["verdict"] = {EVIL: {"base": None, "seeds": 1, "metrics": [], "counts": {}, "towards_reference": 0,
                                "with_reference": 0},
                         "plain": {"base": EVIL, "seeds": 2, "metrics": judged, "counts": {}, "towards_reference": 0,
                                   "with_reference": 0}}
    write_eval_report(tmp_path, result, rows, {})
    md = (tmp_path / "report.md").read_text()
    assert md.index("## Verdict") < md.index("## Models")
    assert "<img" not in md and "<script" not in md and "<svg" not in md and "<a " not in md
    tags = _render(md)
    _assert_inert(tags)
    # The tables keep their shape: the escaped `|` splits no cell.
    heads = [line for line in md.splitlines() if line.startswith("| seed |")]
    assert len(heads) == 1 and heads[0].count(" | ") == 2
    assert sum(t == "th" for t, _ in tags) >= 9 + 3 + 4 + 3  # verdict + summary + models + replies headers
    parser = _Tags()  # the HTML page, verdict included, is as inert (it has no figure here)
    parser.feed((tmp_path / "report.html").read_text())
    _assert_inert(parser.tags)
    assert [t for t, _ in parser.tags].count("strong") >= 3  # the verdict's model names, as text in <strong>


def test_sweep_md_escapes_what_it_shows(tmp_path):
    from mlx_persona.eval.sweep_report import write_sweep_report

    row = {"model": EVIL, "setting": "temperature=<img src=x onerror=alert(1)>", "temperature": 0.7, "replies": 1,
           "words_mean": 4.0, "words_min": 2, "words_max": 6}
    result = {"rows": [row], "grid": {"temperature": ["<b>0.7</b>"]}, "generation": {"top_p": "<i>x</i>"},
              "prompts": [EVIL_PROMPT], "system": False, "reference": None, "command": "`<img src=c onerror=1>`",
              "options": {"early_tokens": 8, "prompts": "<img src=p onerror=2>", "seeds": [0]}}
    write_sweep_report(tmp_path, result)
    md = (tmp_path / "sweep.md").read_text()
    tags = _render(md)
    _assert_inert(tags, images=("sweep.png",))
    assert not any(t in ("b", "i") for t, _ in tags)


@needs_js
def test_cli_web_refuses_a_wildcard_host(exported):
    from click.testing import CliRunner

    from mlx_persona.cli import main

    web, _ = exported
    res = CliRunner().invoke(main, ["web", str(web), "--host", "0.0.0.0", "--port", "0"])
    assert res.exit_code == 1 and "every interface" in res.output and "Traceback" not in res.output
