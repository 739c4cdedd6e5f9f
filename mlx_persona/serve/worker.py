"""The one thread that owns the model: requests wait in a bounded queue and are decoded together.

MLX must not be driven from several threads at once, so the model is loaded, and every prompt rendered
and generated, on this thread alone. The event loop hands a :class:`Job` in with :meth:`Worker.submit`
(a full queue is a ``503`` at once) and reads what comes back from the job's ``asyncio.Queue``: a
``start`` event (the prompt's token count) once the prompt is rendered and fits the context, then
``text`` pieces, then ``done`` with the :class:`~mlx_persona.generation.GenerationResult`; or one
``error`` (an :class:`~mlx_persona.serve.schema.APIError`) instead.

Between two decoding steps the thread moves waiting jobs into the running batch
(:class:`~mlx_persona.serve.batch.Batch`) while it has fewer than ``max_batch`` rows, so concurrent
requests share every step; a request waits in the queue only while the batch is full. A job cancelled by
the event loop (its client went away) is skipped if it is still queued, and its row leaves the batch
after the step it is in.

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
        self._widest = 0

    def widest(self, rows: int) -> None:
        """Notes a batch of `rows` requests decoding together."""
        with self._lock:
            self._widest = max(self._widest, rows)

    def add(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {**self._counts, "widest_batch": self._widest}


class Worker:
    """The generation thread and its queue.

    Args:
        load: called on the worker thread; returns the :class:`Loaded` model (its errors reach
            :meth:`start`).
        queue_size: requests that may wait while the batch is full; one more is refused with ``503``.
        log: a callable taking one line (from the worker thread too).
        max_batch: rows decoded together (None: :func:`~mlx_persona.batch_generation.default_batch_size`
            for a reply filling the model's context).
    """

    def __init__(self, load: Callable[[], Loaded], *, queue_size: int, log: Callable[[str], None],
                 max_batch: int | None = None):
        self._load, self.log = load, log
        self.queue_size, self.max_batch = queue_size, max_batch
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name="mlx-persona-generation", daemon=True)
        self.loaded: Loaded | None = None
        self.batch = None  # the running Batch, once the model is loaded
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

    def running(self) -> int:
        """Requests decoding now."""
        return len(self.batch) if self.batch is not None else 0

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
        """Cancels every job, lets the thread finish the step it may be in, and joins it."""
        self._stopping = True  # the worker thread drops every row after its step
        self._refuse_waiting()
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:  # a submit raced the flag; the thread is a daemon and ends with the process
            return
        self._thread.join(timeout)

    def _main(self) -> None:
        try:
            self.loaded = self._load()
            self.batch = self._new_batch()
        except BaseException as e:  # noqa: BLE001 - handed to start(), which re-raises it
            self._error = e
        self._ready.set()
        if self._error is not None:
            return
        try:
            while True:
                try:
                    if not self._admit():
                        break
                    self._drop_cancelled()
                    if len(self.batch):
                        self.batch.step(self._finished)
                        self._drop_cancelled()
                except Exception as e:  # noqa: BLE001 - one failing step must not stop the server
                    self._failed(e)
        finally:  # stopped (or a fresh batch could not be made): no client is left waiting
            self._stopping = True
            self._drop_cancelled()
            self._refuse_waiting()
            self.batch.close()

    def _refuse_waiting(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None and not job.cancelled:
                job.cancel()
                job.emit("error", APIError(503, "the server is shutting down", code="shutting_down"))

    def _new_batch(self):
        from mlx_persona.batch_generation import default_batch_size
        from mlx_persona.serve.batch import Batch

        m = self.loaded
        if self.max_batch is None:
            self.max_batch = default_batch_size(m.model, m.context or 4096)
        return Batch(m.model, m.tokenizer, m.end_ids, self.max_batch)

    def _admit(self) -> bool:
        """Moves waiting jobs into the batch while it has room (waiting for one when it is empty);
        False once :meth:`stop` was called."""
        while len(self.batch) < self.max_batch:
            try:
                job = self._queue.get(block=not len(self.batch))
            except queue.Empty:
                return True
            if job is None:
                return False
            if job.cancelled:
                self.stats.add("cancelled")
                continue
            try:
                ids, config = self._prompt(job)
                self.batch.join(job, ids, config)
            except APIError as e:
                job.emit("error", e)
                continue
            except Exception as e:  # noqa: BLE001 - one request failing must not stop the server
                self._error_event(job, e)
                continue
            job.emit("start", len(ids))
            self.stats.widest(len(self.batch))
        return True

    def _finished(self, job: Job, result) -> None:
        self.stats.add("completed")
        job.emit("done", result)

    def _drop_cancelled(self) -> None:
        for uid, (job, _) in list(self.batch.rows.items()):
            if job.cancelled or self._stopping:
                if not job.cancelled:  # stopping: the client hears why its reply ends here
                    job.emit("error", APIError(503, "the server is shutting down", code="shutting_down"))
                pieces = self.batch.pieces(uid)
                self.batch.leave(uid)
                self.stats.add("cancelled")
                why = "the server is stopping" if self._stopping else "the client went away"
                self.log(f"{job.id}: {why}; generation stopped after {pieces} pieces of text")

    def _error_event(self, job: Job, e: Exception) -> None:
        self.stats.add("errors")
        self.log(f"{job.id}: generation failed:\n{traceback.format_exc().rstrip()}")
        job.emit("error", APIError(500, f"generation failed ({type(e).__name__}); see the server's log",
                                   code="generation_failed"))

    def _failed(self, e: Exception) -> None:
        """A step raised: every row of the batch fails with a ``500`` and a fresh batch takes its place."""
        old = self.batch
        for job, _ in old.rows.values():
            self._error_event(job, e)
        old.rows.clear()
        self.batch = self._new_batch()  # if this raises, _main's finally closes the old batch
        old.close()

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
