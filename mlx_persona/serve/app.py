"""The routes of the OpenAI-compatible server, as a Starlette app, behind the guard every request passes.

``POST /v1/chat/completions``, ``POST /v1/completions`` (whole answers, or ``stream: true`` as server-sent
events), ``GET /v1/models`` (and ``/v1/models/ID``), ``GET /health`` (status, queue, batch and counters;
``widest_batch``: the most requests that have decoded together).

The guard (:class:`Guard`), before any route: exactly one ``Host`` header (else ``400``), one of the bound
address's names (else ``421``, so a DNS-rebinding page reads nothing); with an API key, ``Authorization:
Bearer KEY`` on every ``/v1/`` route (compared in constant time; else ``401``). Bodies: ``Content-Type:
application/json`` (else ``415``, which also makes a browser ask first, and we answer no CORS), at most
``max_body`` bytes (else ``413``), all of it within ``body_timeout`` seconds (else ``408``). Every error
is OpenAI's JSON shape. A client that goes away, while its request waits or while it is generated, has
its job cancelled (:mod:`mlx_persona.serve.worker`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mlx_persona.sampling import GenerationConfig
from mlx_persona.serve.responses import DONE, Shapes, sse
from mlx_persona.serve.schema import (
    APIError,
    chat_request,
    completion_request,
    parse_json,
)
from mlx_persona.serve.worker import Job, Stats, Worker

# A body this many times over the limit is refused before it is read; below, it is read and dropped, so
# that the client, still sending, gets to read the 413.
DRAIN_FACTOR = 16
_SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"cross-origin-resource-policy", b"same-origin"),
                     (b"cache-control", b"no-store")]


@dataclass
class Settings:
    """What the app needs besides the worker."""

    model_id: str
    defaults: GenerationConfig
    hosts: frozenset[str]
    api_key: str | None = None
    max_body: int = 1_000_000
    body_timeout: float = 10.0


def _error(status: int, message: str, **kw) -> JSONResponse:
    e = APIError(status, message, **kw)
    return JSONResponse(e.body(), status_code=status, headers=e.headers)


class Guard:
    """ASGI middleware: the Host rule, the API key, and the security headers on every response."""

    def __init__(self, app, hosts: frozenset[str], api_key: str | None):
        self.app, self.hosts = app, hosts
        self.key = api_key.encode() if api_key else None

    def _refusal(self, scope) -> JSONResponse | None:
        headers = scope["headers"]
        hosts = [v for k, v in headers if k == b"host"]
        if len(hosts) != 1:
            return _error(400, "missing Host header" if not hosts else "more than one Host header")
        if hosts[0].decode("latin-1").strip().lower() not in self.hosts:
            return _error(421, "this server answers only the names of its own address")
        if self.key is None or not scope["path"].startswith("/v1/"):
            return None
        auth = [v for k, v in headers if k == b"authorization"]
        scheme, _, token = (auth[0] if len(auth) == 1 else b"").partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return _error(401, "missing API key: send the header Authorization: Bearer KEY",
                          code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(token.strip(), self.key):
            return _error(401, "incorrect API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def secured(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *_SECURITY_HEADERS]}
            await send(message)

        refusal = self._refusal(scope)
        if refusal is not None:
            return await refusal(scope, receive, secured)
        return await self.app(scope, receive, secured)


async def _body(request, limit: int) -> bytes:
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit * DRAIN_FACTOR:
            break
        if size <= limit:
            parts.append(chunk)
    if size > limit:
        raise APIError(413, f"the request body is {'over ' if size > limit * DRAIN_FACTOR else ''}{size} bytes; "
                            f"this server takes at most {limit}", code="request_too_large")
    return b"".join(parts)


async def read_json(request, settings: Settings) -> dict:
    """The request's JSON object, within the size and time bounds (module docstring)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise APIError(415, "send the body as JSON, with Content-Type: application/json")
    length = request.headers.get("content-length")
    if length is not None and not length.strip().isdigit():
        raise APIError(400, "Content-Length is not a number")
    if length is not None and int(length) > settings.max_body * DRAIN_FACTOR:
        raise APIError(413, f"the request body is {int(length)} bytes; this server takes at most "
                            f"{settings.max_body}", code="request_too_large")
    try:
        raw = await asyncio.wait_for(_body(request, settings.max_body), settings.body_timeout)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {settings.body_timeout:g} s") from None
    return parse_json(raw)


async def _gone(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def watched(job: Job, receive, stats: Stats) -> AsyncIterator[tuple[str, object]]:
    """The job's events until ``done`` or ``error``; cancels the job if the client goes away first."""
    gone = asyncio.ensure_future(_gone(receive))
    try:
        while True:
            get = asyncio.ensure_future(job.events.get())
            await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                stats.add("disconnects")
                return
            kind, value = get.result()
            yield kind, value
            if kind in ("done", "error"):
                return
    finally:
        gone.cancel()
        job.cancel()  # a no-op once the job is done


class EventStream:
    """A ``text/event-stream`` response of the byte chunks `body` yields."""

    def __init__(self, body: AsyncIterator[bytes]):
        self.body = body

    async def __call__(self, scope, receive, send):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
        async with contextlib.aclosing(self.body):
            try:
                async for data in self.body:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:  # the client went away while we wrote
                pass


async def _sse(events, shapes: Shapes) -> AsyncIterator[bytes]:
    async with contextlib.aclosing(events):
        if shapes.chat:
            yield shapes.chunk(None, first=True)
        async for kind, value in events:
            if kind == "text":
                yield shapes.chunk(value)
            elif kind == "done":
                yield shapes.last(value)
            elif kind == "error":
                yield sse(value.body()) + DONE


def create_app(worker: Worker, settings: Settings):
    """The ASGI app serving `worker`'s model (already loaded)."""
    created = int(time.time())
    context = worker.loaded.context
    card = {"id": settings.model_id, "object": "model", "created": created, "owned_by": "mlx-persona"}

    async def answer(request, req, kind: str):
        job = Job(req, asyncio.get_running_loop(), kind)
        worker.submit(job)
        events = watched(job, request.receive, worker.stats)
        first = await anext(events, None)
        if first is not None and first[0] == "error":
            await events.aclose()
            raise first[1]
        shapes = Shapes(job.id, settings.model_id, int(time.time()), chat=req.chat,
                        include_usage=req.include_usage)
        if first is not None and req.stream:
            return EventStream(_sse(events, shapes))
        async with contextlib.aclosing(events):
            async for name, value in events:
                if name == "done":
                    return JSONResponse(shapes.whole(value))
                if name == "error":
                    raise value
        return Response(status_code=499)  # the client went away; nobody reads this

    async def chat(request):
        body = await read_json(request, settings)
        return await answer(request, chat_request(body, model_id=settings.model_id, defaults=settings.defaults,
                                                  context=context), "chatcmpl")

    async def completions(request):
        body = await read_json(request, settings)
        return await answer(request, completion_request(body, model_id=settings.model_id,
                                                        defaults=settings.defaults, context=context), "cmpl")

    async def models(request):
        return JSONResponse({"object": "list", "data": [card]})

    async def model(request):
        if request.path_params["model"] != settings.model_id:
            raise APIError(404, f"the model {request.path_params['model'][:200]!r} does not exist",
                           param="model", code="model_not_found")
        return JSONResponse(card)

    async def health(request):
        return JSONResponse({"status": "ok", "model": settings.model_id, "queue_size": worker.queue_size,
                             "waiting": worker.waiting(), "running": worker.running(),
                             "max_batch": worker.max_batch,
                             **worker.stats.snapshot()})

    routes = [Route("/v1/chat/completions", chat, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]), Route("/v1/models/{model:path}", model, methods=["GET"]),
              Route("/health", health, methods=["GET"])]
    handlers = {APIError: _api_error, HTTPException: _http_error, Exception: _server_error(worker)}
    return Guard(Starlette(routes=routes, exception_handlers=handlers), settings.hosts, settings.api_key)


async def _api_error(request, exc: APIError):
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request, exc: HTTPException):
    messages = {404: f"no such route: {request.url.path[:200]}", 405: f"{request.method} is not allowed here"}
    return _error(exc.status_code, messages.get(exc.status_code, exc.detail), headers=exc.headers)


def _server_error(worker: Worker):
    async def handler(request, exc: Exception):
        worker.stats.add("errors")
        return _error(500, f"internal error ({type(exc).__name__}); see the server's log")

    return handler
