"""The rating page's routes (Starlette), behind the guard of ``mlx-persona serve``
(:class:`mlx_persona.serve.app.Guard`: one ``Host`` header naming the bound address, else 400/421) and
its body rules (:func:`mlx_persona.serve.app.read_json`: JSON only, bounded size and time).

``GET /`` the page (``index.html``, ``rate.js``, ``rate.css``, shipped in ``page/``); ``GET /api/next``
the next pair; ``POST /api/judge`` ``{"token", "choice": "left"|"right"|"tie"|"both_bad", "note"?}``
records a judgement of the pair that token stands for; ``POST /api/undo`` ``{}`` marks the last judgement
undone and shows its pair again. Each answers ``{"rated", "total", "done", "pair"}``, the pair being
``{"token", "prompt", "left", "right"}`` or null: no model name ever reaches the page. A token is random,
known only to this process, and good for one judgement; after a restart the page asks for a new pair
(409). A judgement is committed before its answer is sent.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Route

from mlx_persona.rate import schedule, store
from mlx_persona.serve.app import Guard, _api_error, _error, _http_error, read_json
from mlx_persona.serve.schema import APIError

PAGE = Path(__file__).resolve().parent / "page"
FILES = {"/": ("index.html", "text/html; charset=utf-8"), "/rate.js": ("rate.js", "text/javascript; charset=utf-8"),
         "/rate.css": ("rate.css", "text/css; charset=utf-8")}
CHOICES = ("left", "right", "tie", "both_bad")
MAX_NOTE = 2000
_PAGE_HEADERS = {"content-security-policy": "default-src 'self'; frame-ancestors 'none'", "x-frame-options": "DENY"}
MAX_TOKENS = 64  # pairs handed out and not yet judged that are still accepted


@dataclass
class Limits:
    """The request body bounds :func:`~mlx_persona.serve.app.read_json` reads."""

    max_body: int = 64_000
    body_timeout: float = 10.0


class Session:
    """The rater's state: the database, the pairs, the seed, the tokens handed out."""

    def __init__(self, conn, seed: int = 0, rater: str = store.HUMAN):
        self.conn, self.seed, self.rater = conn, seed, rater
        self.pairs = store.pairs(conn)
        self.lock = threading.Lock()
        self.shown: OrderedDict[str, tuple[store.Pair, str]] = OrderedDict()

    def _show(self, pair: store.Pair | None) -> dict:
        judged = store.judged(self.conn, self.rater)
        rated, total = schedule.progress(self.pairs, judged)
        state = {"rated": rated, "total": total, "done": pair is None, "pair": None}
        if pair is not None:
            side = schedule.left_is(self.seed, pair)
            token = secrets.token_urlsafe(16)
            self.shown[token] = (pair, side)
            while len(self.shown) > MAX_TOKENS:
                self.shown.popitem(last=False)
            left, right = (pair.reply_a, pair.reply_b) if side == "a" else (pair.reply_b, pair.reply_a)
            state["pair"] = {"token": token, "prompt": pair.prompt, "left": left, "right": right}
        return state

    def next(self) -> dict:
        with self.lock:
            return self._show(schedule.next_pair(self.pairs, store.judged(self.conn, self.rater), self.seed))

    def judge(self, token: str, choice: str, note: str | None) -> dict:
        with self.lock:
            shown = self.shown.pop(token, None)
            if shown is None:
                raise APIError(409, "this pair is no longer open (judged already, or the server restarted); "
                                    "reload for the next one", code="stale_pair")
            pair, side = shown
            if pair.key in set(store.judged(self.conn, self.rater)):
                raise APIError(409, "this pair is judged already; reload for the next one", code="stale_pair")
            other = "b" if side == "a" else "a"
            verdict = {"left": side, "right": other}.get(choice, choice)
            store.record(self.conn, pair, self.rater, side, verdict, note)
            return self._show(schedule.next_pair(self.pairs, store.judged(self.conn, self.rater), self.seed))

    def undo(self) -> dict:
        with self.lock:
            row = store.undo_last(self.conn, self.rater)
            if row is None:
                raise APIError(409, "nothing to undo", code="nothing_to_undo")
            key = (row["prompt_key"], row["model_a"], row["model_b"])
            again = next((p for p in self.pairs if p.key == key), None)
            return self._show(again or schedule.next_pair(self.pairs, store.judged(self.conn, self.rater),
                                                          self.seed))


def _judgement(body: dict) -> tuple[str, str, str | None]:
    unknown = sorted(set(body) - {"token", "choice", "note"})
    if unknown:
        raise APIError(400, f"unknown field {unknown[0][:40]!r}; send token, choice and note", param=unknown[0][:40])
    token, choice, note = body.get("token"), body.get("choice"), body.get("note")
    if not isinstance(token, str) or not 0 < len(token) <= 100:
        raise APIError(400, "token: expected the string the pair came with", param="token")
    if choice not in CHOICES:
        raise APIError(400, f"choice: expected one of {', '.join(CHOICES)}", param="choice")
    if note is not None and (not isinstance(note, str) or len(note) > MAX_NOTE):
        raise APIError(400, f"note: expected a string of at most {MAX_NOTE} characters", param="note")
    return token, choice, (note.strip() or None) if note else None


def create_app(session: Session, hosts: frozenset[str], limits: Limits | None = None):
    """The ASGI app of the rating page for `session`, answering the Host names `hosts`."""
    limits = limits or Limits()

    async def page(request):
        name, kind = FILES[request.url.path]
        return FileResponse(PAGE / name, media_type=kind, headers=_PAGE_HEADERS)

    async def next_pair(request):
        return JSONResponse(session.next())

    async def judge(request):
        token, choice, note = _judgement(await read_json(request, limits))
        return JSONResponse(session.judge(token, choice, note))

    async def undo(request):
        body = await read_json(request, limits)
        if body:
            raise APIError(400, "send an empty object {}")
        return JSONResponse(session.undo())

    routes = [*(Route(path, page, methods=["GET"]) for path in FILES),
              Route("/api/next", next_pair, methods=["GET"]), Route("/api/judge", judge, methods=["POST"]),
              Route("/api/undo", undo, methods=["POST"])]
    handlers = {APIError: _api_error, HTTPException: _http_error,
                Exception: lambda request, exc: _error(500, f"internal error ({type(exc).__name__}); nothing was saved")}
    return Guard(Starlette(routes=routes, exception_handlers=handlers), hosts, None)
