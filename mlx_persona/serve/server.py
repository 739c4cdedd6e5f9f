"""`mlx-persona serve`'s process: load the model on the worker thread, listen, run uvicorn until stopped.

uvicorn gives the HTTP/1.1 parsing (h11), the keep-alive timeout (5 s idle between requests) and a cap on
connections at once (``queue_size + max_batch + 32``: past it, uvicorn's own ``503``). It has no deadline for a
request's line and headers, so a client sending them a byte at a time could hold a connection forever:
:func:`h11_with_deadline` adds one (``request_timeout`` seconds from the connection's start, or from the
end of its last response, to a complete request head), after which the connection is closed.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from uvicorn.protocols.http.h11_impl import H11Protocol

from mlx_persona.serve.worker import Loaded

EXTRA_CONNECTIONS = 32
LOG_CONFIG = {
    "version": 1, "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}},
    "loggers": {"uvicorn": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
                "uvicorn.access": {"handlers": ["stderr"], "level": "INFO", "propagate": False}},
}


class ServeError(Exception):
    """A mistake of the user's (address, options): one line, the command exits non-zero."""


@dataclass
class ServeOptions:
    """`mlx-persona serve`'s options (see its ``--help``)."""

    model: str
    adapter: str | None = None
    persona: str | None = None
    preset: str = "persona"
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    queue_size: int = 64
    max_body: int = 1_000_000
    request_timeout: float = 10.0
    max_batch: int | None = None  # requests decoded together (None: default_batch_size's choice)


def h11_with_deadline(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose next request head is not in after `seconds`."""

    class Deadline(H11Protocol):
        def _arm(self) -> None:
            cycle = self.cycle  # the request answered last (None: none yet); a new one replaces it

            def expire():
                if self.cycle is cycle and not self.transport.is_closing():
                    self.transport.close()

            self._deadline = self.loop.call_later(seconds, expire)

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self):
            self._deadline.cancel()
            self._arm()  # before a pipelined request can start in super()'s call
            super().on_response_complete()

        def connection_lost(self, exc):
            self._deadline.cancel()
            super().connection_lost(exc)

    return Deadline


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on `host`:`port` (0: any free port); a wildcard address is refused."""
    from mlx_persona.export.web.server import address_family

    try:
        family = address_family(host)
    except ValueError as e:
        raise ServeError(f"--host {e}, e.g. this machine's LAN address (the Host header is checked against it)") \
            from None
    sock = socket.socket(family)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise ServeError(f"{host}:{port}: cannot listen there ({e.strerror or e})") from None
    return sock


def context_length(path: Path) -> int | None:
    """The model's context (``max_position_embeddings`` in config.json, or its ``text_config``), if stated."""
    config = json.loads((Path(path) / "config.json").read_text())
    value = config.get("max_position_embeddings") or (config.get("text_config") or {}).get("max_position_embeddings")
    return int(value) if isinstance(value, int) and value > 0 else None


def loader(spec: str, adapter: str | None, system: str | None) -> Callable[[], Loaded]:
    """What the worker thread calls to load the model (all of MLX stays on that thread)."""

    def load() -> Loaded:
        from mlx_persona.generation import end_token_ids
        from mlx_persona.models import load_model, resolve_model

        model, tok = load_model(spec, adapter_path=adapter)
        path = resolve_model(spec)
        return Loaded(model, tok, end_token_ids(tok, path), context_length(path), system)

    return load


def _entry(options: ServeOptions):
    """(served model id, spec, adapter) from ``--model [NAME=]SPEC[@ADAPTER]`` and ``--adapter``."""
    from mlx_persona.eval.entries import parse_model_arg

    if options.adapter is not None and "@" in options.model:
        raise ServeError("give the adapter once: --model SPEC@ADAPTER or --adapter ADAPTER")
    entry = parse_model_arg(options.model if options.adapter is None else f"{options.model}@{options.adapter}")
    return entry.name, entry.model, entry.adapter


def run(options: ServeOptions, log: Callable[[str], None]) -> None:
    """Serves until interrupted (Ctrl-C, SIGTERM). Raises :class:`ServeError` (and the loaders' user errors)."""
    import uvicorn

    from mlx_persona.export.web.server import allowed_hosts
    from mlx_persona.sampling import GenerationConfig, preset
    from mlx_persona.serve.app import Settings, create_app
    from mlx_persona.serve.worker import Worker

    model_id, spec, adapter = _entry(options)
    system = None
    if options.persona:
        from mlx_persona.eval.persona import load_persona

        system = load_persona(options.persona).system_prompt or None
    defaults = GenerationConfig() if options.preset == "default" else preset(options.preset)
    sock = bind(options.host, options.port)
    worker = Worker(loader(spec, adapter, system), queue_size=options.queue_size, log=log,
                    max_batch=options.max_batch)
    try:
        log(f"loading {spec}" + (f" + {adapter}" if adapter else ""))
        worker.start()
        port = sock.getsockname()[1]
        settings = Settings(model_id, defaults, allowed_hosts(options.host.strip("[]"), port), options.api_key,
                            options.max_body, options.request_timeout)
        config = uvicorn.Config(create_app(worker, settings), http=h11_with_deadline(options.request_timeout),
                                lifespan="off", log_config=LOG_CONFIG, server_header=False, timeout_keep_alive=5,
                                limit_concurrency=options.queue_size + worker.max_batch + EXTRA_CONNECTIONS,
                                timeout_graceful_shutdown=5)
        shown = f"[{options.host.strip('[]')}]" if ":" in options.host else options.host
        log(f"serving {model_id!r} on http://{shown}:{port}/v1 (preset {options.preset}, queue {options.queue_size}, "
            f"batch {worker.max_batch}"
            + (", API key required)" if options.api_key else ")"))
        if not (ipaddress.ip_address(sock.getsockname()[0]).is_loopback or options.api_key):
            log("warning: this address is reachable from other machines and no --api-key is set")
        try:
            uvicorn.Server(config).run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on
            log("stopped")
    finally:
        worker.stop()
        sock.close()
