"""The rating page's process: listen on one address (127.0.0.1 by default), serve until stopped.

The HTTP rules are ``mlx-persona serve``'s (:mod:`mlx_persona.serve.server`): uvicorn with a deadline for
each request head, a 5 s keep-alive, a cap on connections, and no wildcard address.
"""

from __future__ import annotations

from collections.abc import Callable

from mlx_persona.rate.app import Limits, Session, create_app

MAX_CONNECTIONS = 32


def serve(session: Session, host: str, port: int, *, request_timeout: float = 10.0,
          log: Callable[[str], None] = print) -> None:
    """Serves `session`'s page until interrupted (Ctrl-C, SIGTERM)."""
    import uvicorn

    from mlx_persona.export.web.server import allowed_hosts
    from mlx_persona.serve.server import LOG_CONFIG, bind, h11_with_deadline

    sock = bind(host, port)
    try:
        port = sock.getsockname()[1]
        app = create_app(session, allowed_hosts(host.strip("[]"), port), Limits(body_timeout=request_timeout))
        config = uvicorn.Config(app, http=h11_with_deadline(request_timeout), lifespan="off", log_config=LOG_CONFIG,
                                server_header=False, timeout_keep_alive=5, limit_concurrency=MAX_CONNECTIONS,
                                timeout_graceful_shutdown=5, access_log=False)
        shown = f"[{host.strip('[]')}]" if ":" in host else host
        state = session.next()
        log(f"rating on http://{shown}:{port}/ ({state['rated']} of {state['total']} pairs rated; Ctrl-C stops, "
            "and a later run continues)")
        try:
            uvicorn.Server(config).run(sockets=[sock])
        except KeyboardInterrupt:
            log("stopped")
    finally:
        sock.close()
