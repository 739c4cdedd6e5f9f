"""One decoding step of a batch, with each row's vocabulary-wide work spread over CPU streams.

mlx-lm's ``BatchGenerator`` runs a step as: the model on the batch, each row's logits processors, one
``mx.logsumexp`` over the whole ``[rows, vocab]`` block, each row's sampler. Everything after the model is
vocabulary-wide (Gemma's 262,144 entries a row) and, on MLX's CPU backend, one op runs on one core: at 16
rows of the gemma-3-270m shape the ``logsumexp`` alone took 41 ms a step (a scalar ``exp`` per entry) and
the samplers 13, against 106 for the model (2-core AMD EPYC). Here each row's processors, its
log-softmax (compiled, so that its ``exp`` fuses into a vectorised kernel:
:func:`mlx_persona.generation.log_softmax`, as ``generate`` normalises) and its draw go to one of a few CPU
streams in turn, which MLX runs on threads of their own. The tokens are those ``generate`` draws alone
(the same processed log-probabilities, the same sampler); only where the work runs changes.

:func:`batch_generator` builds mlx-lm's ``BatchGenerator`` with this step: the generator's long-lived
``GenerationBatch`` (the one new rows are merged into) becomes a :func:`streamed_step`. The new rows'
first token is still drawn by mlx-lm's own step, in their prefill batch.
"""

from __future__ import annotations

import functools
import os

MAX_STREAMS = 4


@functools.lru_cache(maxsize=1)
def _streams() -> tuple:
    """CPU streams for the rows' work: one per core, at most MAX_STREAMS (one on a GPU: it needs none)."""
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        return (mx.default_stream(mx.default_device()),)
    return tuple(mx.new_stream(mx.cpu) for _ in range(max(1, min(MAX_STREAMS, os.cpu_count() or 1))))


@functools.lru_cache(maxsize=1)
def streamed_step() -> type:
    """The class: mlx-lm's ``GenerationBatch`` whose ``_step`` spreads the rows' processors, log-softmax and
    draw over :func:`_streams` (the attributes and the return value are mlx-lm's own). Made on first use, so
    that importing this module imports neither MLX nor mlx-lm."""
    import mlx.core as mx
    from mlx_lm.generate import GenerationBatch

    from mlx_persona.generation import log_softmax

    class StreamedStep(GenerationBatch):
        __doc__ = streamed_step.__doc__

        def _row(self, e: int, logits, inputs, contexts: list):
            """Row `e`'s (token, processed log-probabilities), queued on its stream."""
            x = logits[e:e + 1]
            processors = self.logits_processors[e] if self.logits_processors else None
            if processors:
                context = self._token_context[e].update_and_fetch(inputs[e:e + 1])
                contexts.append(context)
                for processor in processors:
                    x = processor(context, x)
            x = log_softmax()(x)
            sampler = (self.samplers[e] if self.samplers else None) or self.fallback_sampler
            return sampler(x), x[0]

        def _step(self):
            self._current_tokens, self._current_logprobs = self._next_tokens, self._next_logprobs
            inputs = self._current_tokens
            logits = self.model(inputs[:, None], cache=self.prompt_cache)[:, -1, :]
            streams, contexts, tokens, logprobs = _streams(), [], [], []
            for e in range(len(self.uids)):
                with mx.stream(streams[e % len(streams)]):
                    token, row = self._row(e, logits, inputs, contexts)
                tokens.append(token.reshape(1))
                logprobs.append(row)
            self._next_tokens = mx.concatenate(tokens) if tokens else mx.array([], dtype=mx.uint32)
            self._next_logprobs = logprobs
            mx.async_eval(self._next_tokens, self._next_logprobs, contexts)
            mx.eval(inputs, self._current_logprobs)  # the step before's, as mlx-lm does
            inputs = inputs.tolist()
            for row_tokens, token in zip(self.tokens, inputs):
                row_tokens.append(token)
            return inputs, self._current_logprobs

    return StreamedStep


def batch_generator(model, width: int):
    """mlx-lm's ``BatchGenerator`` for `width` rows (prefilled `width` at a time), with :func:`streamed_step`."""
    from mlx_lm.generate import BatchGenerator, GenerationBatch

    gen = BatchGenerator(model, completion_batch_size=width, prefill_batch_size=width)
    batch = gen._generation_batch
    if type(batch) is not GenerationBatch:  # mlx-lm changed: keep its own step rather than guess
        return gen
    batch.__class__ = streamed_step()
    return gen
