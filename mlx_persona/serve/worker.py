"""The one thread that owns the model: requests wait in a bounded queue and are generated one at a time.

MLX must not be driven from several threads at once, so the model is loaded, and every prompt rendered
and generated, on this thread alone. The event loop hands a :class:`Job` in with :meth:`Worker.submit`
(a full queue is a ``503`` at once) and reads what comes back from the job's ``asyncio.Queue``: a
``start`` event (the prompt's token count) once the prompt is rendered and fits the context, then
``text`` pieces, then ``done`` with the :class:`~mlx_persona.generation.GenerationResult`; or one
``error`` (an :class:`~mlx_persona.serve.schema.APIError`) instead. A job cancelled by the event loop (its
client went away) is skipped if it is still queued, and stopped at its next piece of text if it runs.

Test-only hold point (:mod:`mlx_persona.testing`): ``serve:token:N``, a generation has handed back its
N-th piece of text (and not yet checked whether it was cancelled).
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
import traceback
import uuid
from collections.abc import Callable

from mlx_persona.serve.schema import APIError, Request
from mlx_persona.testing import hold


@dataclasses.dataclass
class Loaded:
    """What the worker serves: the model, its tokenizer, its end ids, its context (None: unknown), the
    system prompt put before conversations that have none."""

    model: object
    tokenizer: object
    end_ids: list[int]
    context: int | None
    system: str | None = None


class Job:
    """One request on its way through the worker; created on the event loop's thread."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop, kind: str = "chatcmpl"):
        self.request, self.loop = request, loop
        self.id = f"{kind}-{uuid.uuid4().hex[:24]}"
        self.events: asyncio.Queue = asyncio.Queue()
        self._cancel = threading.Event()

    def emit(self, kind: str, value=None) -> None:
        """Hands an event to the event loop (from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()


class Stats:
    """Counters for ``/health``, shared by the event loop and the worker."""

    NAMES = ("completed", "cancelled", "rejected", "errors", "disconnects")

    def __init__(self):
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(self.NAMES, 0)

    def add(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


def safe_length(text: str, stops: list[str]) -> int:
    """How much of `text` can go out: all but a tail that may be the start of a stop string, which a
    later piece could complete (the reply then ends before it, and nothing of it may have been sent)."""
    for start in range(max(0, len(text) - max(map(len, stops), default=0) + 1), len(text)):
        if any(s.startswith(text[start:]) for s in stops):
            return start
    return len(text)


class Worker:
    """The generation thread and its queue.

    Args:
        load: called on the worker thread; returns the :class:`Loaded` model (its errors reach
            :meth:`start`).
        queue_size: requests that may wait while one runs; one more is refused with ``503``.
        log: a callable taking one line (from the worker thread too).
    """

    def __init__(self, load: Callable[[], Loaded], *, queue_size: int, log: Callable[[str], None]):
        self._load, self.log = load, log
        self.queue_size = queue_size
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name="mlx-persona-generation", daemon=True)
        self.loaded: Loaded | None = None
        self.running: Job | None = None
        self.stats = Stats()

    def start(self) -> Loaded:
        """Starts the thread and waits for the model; re-raises what loading it raised."""
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self.loaded

    def waiting(self) -> int:
        return self._queue.qsize()

    def submit(self, job: Job) -> None:
        """Queues `job`, or raises a ``503`` APIError when the queue is full or the server stops."""
        if self._stopping:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.stats.add("rejected")
            raise APIError(503, f"the server is busy: {self.queue_size} requests are already waiting; "
                                "retry later", code="queue_full", headers={"Retry-After": "1"}) from None

    def stop(self, timeout: float = 10.0) -> None:
        """Cancels every job, lets the thread finish the one piece it may be on, and joins it."""
        self._stopping = True
        if self.running is not None:
            self.running.cancel()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            job.cancel()
            job.emit("error", APIError(503, "the server is shutting down", code="shutting_down"))
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:  # a submit raced the flag; the thread is a daemon and ends with the process
            return
        self._thread.join(timeout)

    def _main(self) -> None:
        try:
            self.loaded = self._load()
        except BaseException as e:  # noqa: BLE001 - handed to start(), which re-raises it
            self._error = e
        self._ready.set()
        if self._error is not None:
            return
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancelled:
                self.stats.add("cancelled")
                continue
            self.running = job
            try:
                self._run(job)
            except Exception as e:  # noqa: BLE001 - one request failing must not stop the server
                self.stats.add("errors")
                self.log(f"{job.id}: generation failed:\n{traceback.format_exc().rstrip()}")
                job.emit("error", APIError(500, f"generation failed ({type(e).__name__}); see the server's log",
                                           code="generation_failed"))
            finally:
                self.running = None

    def _prompt(self, job: Job) -> tuple[list[int], object]:
        """(prompt ids, settings for them), or an APIError for a prompt the template or context refuses."""
        from mlx_persona.generation import build_prompt
        from mlx_persona.models import ModelError

        req, m = job.request, self.loaded
        try:
            if req.chat:
                system = None if any(x["role"] == "system" for x in req.prompt) else m.system
                ids = build_prompt(m.tokenizer, req.prompt, system=system)
            else:
                ids = build_prompt(m.tokenizer, req.prompt, chat_template=False)
        except (ModelError, ValueError) as e:
            raise APIError(400, str(e), param="messages" if req.chat else "prompt") from None
        config = req.config
        if m.context is not None:
            room = m.context - len(ids)
            if room < 1 or (req.max_tokens_given and config.max_new_tokens > room):
                asked = f" plus max_tokens {config.max_new_tokens}" if req.max_tokens_given else ""
                raise APIError(400, f"the prompt is {len(ids)} tokens{asked}; this model's context is "
                                    f"{m.context} tokens", param="messages" if req.chat else "prompt",
                               code="context_length_exceeded")
            if config.max_new_tokens > room:
                config = dataclasses.replace(config, max_new_tokens=room)
        return ids, config

    def _run(self, job: Job) -> None:
        from mlx_persona.generation import stream_generate

        try:
            ids, config = self._prompt(job)
        except APIError as e:
            job.emit("error", e)
            return
        job.emit("start", len(ids))
        m = self.loaded
        seen, sent = "", 0  # the text so far, and how much of it went out
        for pieces, chunk in enumerate(stream_generate(m.model, m.tokenizer, ids, config, end_ids=m.end_ids), 1):
            if chunk.result is not None:  # the last chunk; its text is `seen` cut before any stop string
                if chunk.result.text[sent:]:
                    job.emit("text", chunk.result.text[sent:])
                self.stats.add("completed")
                job.emit("done", chunk.result)
                return
            seen += chunk.text
            safe = safe_length(seen, config.stop)
            if safe > sent:
                job.emit("text", seen[sent:safe])
                sent = safe
            hold(f"serve:token:{pieces}")
            if job.cancelled:
                self.stats.add("cancelled")
                self.log(f"{job.id}: the client went away; generation stopped after {pieces} pieces of text")
                return
