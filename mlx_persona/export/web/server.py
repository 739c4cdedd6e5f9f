"""HTTP serving that is safe on a shared machine: the reusable piece of every server mlx-persona runs.

The chat page (``mlx-persona web``) uses it; the rating page and the OpenAI-compatible server are meant
to as well: subclass :class:`LocalOnlyHandler` (or :class:`StaticFileHandler` for files), run it in a
:class:`LocalOnlyServer`, and these rules hold without further code:

- **Loopback names only.** The ``Host`` header must be one of the bound address's forms
  (``127.0.0.1:PORT``, ``localhost:PORT``, ``[::1]:PORT``, or the ``--host`` given, with its port;
  without the port only on port 80): anything else gets ``421`` and a one-line body, so a DNS-rebinding
  page (``evil.example.com`` resolving to 127.0.0.1) reads nothing. No ``Host``, or two: ``400``.
  Binding a wildcard address (``0.0.0.0``, ``::``) is refused: there would be no name to check.
- **Only the declared methods** (:attr:`LocalOnlyHandler.methods`, ``GET``/``HEAD`` by default), else
  ``405`` with ``Allow``. A handler that accepts ``POST`` must bound what it reads of the body itself.
- **Bounded time and connections.** Each connection gets ``request_timeout`` seconds (10 by default)
  per socket read or write, and the request line plus headers must arrive within that many seconds in
  all (a client trickling a byte at a time is cut too). At most ``max_connections`` (32) are handled at
  once, one thread each; one more is answered ``503`` at once and closed, so half-sent requests cannot
  pile up threads.
- **Files from the folder and nothing else** (:func:`resolve_file`, :func:`open_file`): the request
  path is percent-decoded once, strictly (invalid UTF-8, NUL, control characters, backslashes, ``.``
  / ``..`` / empty / dot-file segments: refused); the file is resolved with every symlink followed and
  must be a regular file inside the resolved root, opened without following a final symlink and checked
  to be the file that was resolved. Folders are never listed (``/`` means ``index.html``).
- Short plain-text error bodies, control characters escaped in the log, no Python version in
  ``Server``, ``X-Content-Type-Options: nosniff`` and ``Cross-Origin-Resource-Policy: same-origin``
  (other sites cannot embed the responses either).
"""

from __future__ import annotations

import email.utils
import io
import ipaddress
import mimetypes
import os
import socket
import stat
import sys
import threading
import time
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

__all__ = ["MAX_CONNECTIONS", "REQUEST_TIMEOUT", "LocalOnlyHandler", "LocalOnlyServer", "StaticFileHandler",
           "address_family", "allowed_hosts", "open_file", "resolve_file"]

REQUEST_TIMEOUT = 10.0
MAX_CONNECTIONS = 32
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
_BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n"
         b"Retry-After: 1\r\nConnection: close\r\n\r\nbusy\n")
_LOG_TABLE = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}


def allowed_hosts(host: str, port: int) -> frozenset[str]:
    """The ``Host`` header values (lower case) a server bound to `host`:`port` answers."""
    bound = host.lower()
    if ":" in bound and not bound.startswith("["):
        bound = f"[{bound}]"
    names = {*LOOPBACK_NAMES, bound}
    return frozenset({f"{n}:{port}" for n in names} | (names if port == 80 else set()))


def address_family(host: str) -> socket.AddressFamily:
    """The socket family of the one address `host` (IPv6 in brackets or not); a wildcard (``0.0.0.0``,
    ``::``, empty) is a ValueError: there would be no name to check the ``Host`` header against."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        ip = None
    if host in ("", "*") or (ip is not None and ip.is_unspecified):
        raise ValueError(f"{host or '(empty)'}: binding every interface is refused; give one address "
                         "(127.0.0.1 by default)")
    return socket.AF_INET6 if ip is not None and ip.version == 6 else socket.AF_INET


def resolve_file(root: Path, target: str, *, index: str = "index.html", hidden: frozenset[str] = frozenset()):
    """The regular file inside `root` that the request target `target` names, or None.

    Args:
        root: the served folder, already resolved (``Path.resolve(strict=True)``).
        target: the request target as received (``/a/b.js?x=1``); must start with ``/``.
        index: the file ``/`` means.
        hidden: paths relative to `root` (``a/b.json``) never served.
    """
    path = target.split("?", 1)[0].split("#", 1)[0]
    if not path.startswith("/"):
        return None
    if path == "/":
        path = "/" + index
    try:
        path = urllib.parse.unquote(path, errors="strict")
    except UnicodeDecodeError:
        return None
    if "\\" in path or any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        return None
    parts = path[1:].split("/")
    if any(not p or p.startswith(".") for p in parts):
        return None
    try:
        real = root.joinpath(*parts).resolve(strict=True)
        if root not in real.parents or not stat.S_ISREG(real.stat().st_mode):
            return None
    except (OSError, RuntimeError, ValueError):
        return None
    # Hidden by the name asked for or by the file's own (a symlink to it), in any case (macOS' APFS).
    hidden = {h.casefold() for h in hidden}
    if "/".join(parts).casefold() in hidden or real.relative_to(root).as_posix().casefold() in hidden:
        return None
    return real


def open_file(root: Path, target: str, **kw):
    """(binary file object, its ``os.stat_result``, its resolved path) of :func:`resolve_file`'s file, or None.

    Opened with ``O_NOFOLLOW`` (and ``O_NONBLOCK``, against a FIFO planted meanwhile), then checked to be a
    regular file that is still inside `root` by the open descriptor's own path (Linux' /proc, macOS'
    ``F_GETPATH``; elsewhere: the same inode as when resolved), so a symlink swapped in after the check
    (a folder of the path replaced) is not followed out.
    """
    path = resolve_file(root, target, **kw)
    if path is None:
        return None
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        before = path.stat()
        fd = os.open(path, flags)
    except OSError:
        return None
    st = os.fstat(fd)
    opened = _fd_path(fd)
    inside = root in Path(opened).parents if opened else (st.st_dev, st.st_ino) == (before.st_dev, before.st_ino)
    if not stat.S_ISREG(st.st_mode) or not inside:
        os.close(fd)
        return None
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb"), st, path


def _fd_path(fd: int) -> str | None:
    """Where the open file `fd` is now, if the system says (Linux, macOS)."""
    try:
        if os.path.isdir("/proc/self/fd"):
            return os.readlink(f"/proc/self/fd/{fd}")
        import fcntl

        if hasattr(fcntl, "F_GETPATH"):
            return fcntl.fcntl(fd, fcntl.F_GETPATH, bytes(1024)).split(b"\0", 1)[0].decode()
    except (OSError, ImportError, UnicodeDecodeError):
        pass
    return None


class _DeadlineReader(io.RawIOBase):
    """The socket's reads, each under `per_read` seconds and, while `deadline` is set, all before it."""

    def __init__(self, sock: socket.socket, per_read: float):
        self.sock, self.per_read, self.deadline = sock, per_read, None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        timeout = self.per_read
        if self.deadline is not None:
            timeout = min(timeout, self.deadline - time.monotonic())
            if timeout <= 0:
                raise TimeoutError("the request line and headers did not arrive in time")
        self.sock.settimeout(timeout)
        return self.sock.recv_into(buffer)


class LocalOnlyServer(ThreadingHTTPServer):
    """A threading HTTP server with the Host rule, timeouts and a bound on connections (module doc).

    Args:
        address: (host, port); the host a specific address (``127.0.0.1`` by default in callers), port 0
            for any free one.
        handler: a :class:`LocalOnlyHandler` subclass.
        request_timeout: seconds per read/write, and for the request line plus headers in all.
        max_connections: connections handled at once; further ones get ``503`` and are closed.
        log: a callable taking one line per request, or None for silence.
    """

    daemon_threads = True
    request_queue_size = 128  # listen() backlog: a burst of connects is accepted (and refused) at once

    def __init__(self, address: tuple[str, int], handler, *, request_timeout: float = REQUEST_TIMEOUT,
                 max_connections: int = MAX_CONNECTIONS, log=None):
        self.address_family = address_family(address[0])
        address = (address[0].strip("[]"), *address[1:])
        self.request_timeout = float(request_timeout)
        self.max_connections = int(max_connections)
        self.log = log
        self._slots = threading.BoundedSemaphore(self.max_connections)
        super().__init__(address, handler)
        self.allowed_hosts = allowed_hosts(address[0], self.server_port)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            try:  # full: say so without waiting on the client, and close
                request.setblocking(False)
                request.send(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address):
        # A browser that navigates away mid-download resets the connection: not an error worth a traceback.
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class LocalOnlyHandler(BaseHTTPRequestHandler):
    """A request handler enforcing the module's rules before any ``do_*`` method runs.

    Subclasses define ``do_GET`` etc. and may widen :attr:`methods`. ``self.server`` must be a
    :class:`LocalOnlyServer`.
    """

    methods: tuple[str, ...] = ("GET", "HEAD")
    server_version = "mlx-persona"
    sys_version = ""
    error_message_format = "%(code)d %(message)s\n"
    error_content_type = "text/plain; charset=utf-8"

    def setup(self):
        self.timeout = self.server.request_timeout
        super().setup()
        self.rfile.close()  # the makefile() one; ours reads the socket under the deadline
        self._reader = _DeadlineReader(self.connection, self.timeout)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self):
        self._reader.deadline = time.monotonic() + self.timeout
        super().handle_one_request()

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        self._reader.deadline = None  # the headers are in; from here on, per read/write
        self.connection.settimeout(self.timeout)
        hosts = self.headers.get_all("Host") or []
        if len(hosts) != 1:
            self.send_error(HTTPStatus.BAD_REQUEST, "missing Host header" if not hosts else "more than one Host")
            return False
        if hosts[0].strip().lower() not in self.server.allowed_hosts:
            self.send_error(HTTPStatus.MISDIRECTED_REQUEST, "this server answers only its loopback address")
            return False
        if self.command not in self.methods:
            self.send_response(HTTPStatus.METHOD_NOT_ALLOWED)
            body = b"405 method not allowed\n"
            self.send_header("Allow", ", ".join(self.methods))
            self.send_header("Connection", "close")
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
            return False
        if not self.path.startswith("/"):
            self.send_error(HTTPStatus.BAD_REQUEST, "the request target must be a path")
            return False
        return True

    def end_headers(self):
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        super().end_headers()

    def log_message(self, format, *args):
        if self.server.log is not None:
            self.server.log(f"{self.address_string()} {(format % args).translate(_LOG_TABLE)}")


class StaticFileHandler(LocalOnlyHandler):
    """GET/HEAD of the regular files of ``self.server.root`` (a resolved folder); see :func:`open_file`.

    Class attributes: ``mime`` (suffix -> type, matched on the name's end, before :mod:`mimetypes`),
    ``hidden`` (relative paths never served), ``index`` (the file ``/`` means).
    """

    mime: ClassVar[dict[str, str]] = {}
    hidden: ClassVar[frozenset[str]] = frozenset()
    index = "index.html"

    def guess_type(self, path: Path) -> str:
        for ext, mime in self.mime.items():
            if path.name.endswith(ext):
                return mime
        return mimetypes.guess_type(path.name)[0] or "application/octet-stream"

    def do_GET(self):
        opened = open_file(self.server.root, self.path, index=self.index, hidden=self.hidden)
        if opened is None:
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        f, st, path = opened
        with f:
            since = self.headers.get("If-Modified-Since")
            if since:
                try:
                    if int(st.st_mtime) <= email.utils.parsedate_to_datetime(since).timestamp():
                        self.send_response(HTTPStatus.NOT_MODIFIED)
                        self.end_headers()
                        return
                except (TypeError, ValueError, OverflowError, IndexError):
                    pass
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", self.guess_type(path))
            self.send_header("Content-Length", str(st.st_size))
            self.send_header("Last-Modified", self.date_time_string(st.st_mtime))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.flush()
                self.connection.sendfile(f, count=st.st_size)

    do_HEAD = do_GET
