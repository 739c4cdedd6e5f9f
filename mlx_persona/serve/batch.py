"""The requests the worker decodes together: one mlx-lm ``BatchGenerator`` whose rows are jobs.

A job joins with :meth:`Batch.join` (its prompt ids and settings, already checked), decodes one token per
:meth:`Batch.step` alongside every other row (:mod:`mlx_persona.batch_generation`: each row keeps its own
sampler, seed, ``min_new_tokens``, penalties, end ids, stop strings and finish reason, and its greedy
tokens are the unbatched generation's), streams its own text (a tail that may begin a stop string is held
back, as :class:`~mlx_persona.generation.ReplyText` does for the unbatched stream) and leaves as soon as
it is finished or its job is cancelled (:meth:`Batch.leave`), costing no more work.

Every method runs on the worker's thread (MLX is driven from that thread only).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from mlx_persona.batch_generation import (
    Row,
    advance,
    greedy_sampler,
    insert_rows,
    row_result,
)
from mlx_persona.testing import hold


class Batch:
    """The running batch of `model` (at most `width` rows; the worker sees to it)."""

    def __init__(self, model, tokenizer, end_ids: list[int], width: int):
        from mlx_persona.batch_step import batch_generator

        self.tokenizer, self.end_ids, self.width = tokenizer, list(end_ids), width
        self._gen = batch_generator(model, width)
        self._greedy = greedy_sampler()  # shared by every greedy row: one argmax over them all
        self.rows: dict[int, tuple[object, Row]] = {}  # uid -> (job, row)
        self._sent: dict[int, tuple[int, int]] = {}  # uid -> (characters sent, pieces sent)

    def __len__(self) -> int:
        return len(self.rows)

    def join(self, job, ids: list[int], config) -> None:
        """Adds `job` (prompt `ids`, validated `config`); it is prefilled at the next :meth:`step`."""
        (uid, row), = insert_rows(self._gen, self.tokenizer, [ids], [config], self.end_ids,
                                  greedy=self._greedy).items()
        self.rows[uid] = (job, row)
        self._sent[uid] = (0, 0)

    def leave(self, uid: int) -> None:
        """Takes a row out of the batch now."""
        self._gen.remove([uid])
        del self.rows[uid], self._sent[uid]

    def step(self, finished: Callable[[object, object], None]) -> None:
        """Decodes one token for every row (prefilling the rows that just joined): each job gets its new
        text as ``text`` events; a finished row leaves and ``finished(job, GenerationResult)`` is called."""
        responses = self._gen.next_generated()
        now = time.perf_counter()
        for r in responses:
            job, row = self.rows[r.uid]
            piece, done = advance(row, r.token, r.finish_reason, now)
            if done is not None:
                result = row_result(row, done)
                if r.finish_reason is None:  # a stop string: mlx-lm still holds the row
                    self._gen.remove([r.uid])
                sent = self._sent.pop(r.uid)[0]
                del self.rows[r.uid]
                if result.text[sent:]:
                    job.emit("text", result.text[sent:])
                finished(job, result)
            elif piece:
                sent, pieces = self._sent[r.uid]
                self._sent[r.uid] = (sent + len(piece), pieces + 1)
                job.emit("text", piece)
                hold(f"serve:token:{pieces + 1}")

    def pieces(self, uid: int) -> int:
        """Pieces of text the row has handed out."""
        return self._sent[uid][1]

    def close(self) -> None:
        self._gen.close()
