"""One decoding step of a batch, with each row's vocabulary-wide work off MLX's one-core path.

mlx-lm's ``BatchGenerator`` runs a step as: the model on the batch, each row's logits processors, one
``mx.logsumexp`` over the whole ``[rows, vocab]`` block, each row's sampler. Everything after the model is
vocabulary-wide (Gemma's 262,144 entries a row) and, on MLX's CPU backend, one op runs on one core: at 16
rows of the gemma-3-270m shape the ``logsumexp`` alone took 41 ms a step (a scalar ``exp`` per entry) and
the samplers 13, against 106 for the model (2-core AMD EPYC). Here:

* each row's processors are queued on one of a few CPU streams in turn (MLX runs each on a thread of its
  own);
* rows whose sampler draws with the CPU kernel (:mod:`mlx_persona.backend.draw`: on the CPU, greedy or
  top-k sampling) are drawn by one call for all of them, from their processed logits; their
  log-probabilities (what ``on_logits`` hooks read) are left lazy, computed only if read;
* any other row is normalised (compiled log-softmax, :func:`mlx_persona.generation.log_softmax`, as
  ``generate`` normalises) and drawn by its sampler on its stream, as before.

The tokens are those ``generate`` draws alone (the same processed logits, the same sampler and seed chain);
only where the work runs changes.

:func:`batch_generator` builds mlx-lm's ``BatchGenerator`` with this step: the generator's long-lived
``GenerationBatch`` (the one new rows are merged into) becomes a :func:`streamed_step`. The new rows'
first token is still drawn by mlx-lm's own step, in their prefill batch (with the same samplers).
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


def _cpu_draw(sampler, vocab: int) -> bool:
    cpu_draw = getattr(sampler, "cpu_draw", None)
    return cpu_draw is not None and cpu_draw(vocab)


def _draw_on_cpu(rows: list[int], samplers: list, tokens: list, logprobs: list, contexts: list) -> None:
    """Rows `rows` (their processed logits in `logprobs`, queued on the streams) drawn by one call of the CPU
    kernel: their `tokens` filled in, their `logprobs` made the (lazy) log-softmax of what they were."""
    import mlx.core as mx

    from mlx_persona.backend import draw
    from mlx_persona.generation import log_softmax

    processed = [logprobs[e] for e in rows]
    mx.eval(processed, contexts)
    drawn = mx.array(draw.draw(processed, [s.next_settings(1)[0] for s in samplers]).astype("uint32"))
    for j, e in enumerate(rows):
        tokens[e] = drawn[j:j + 1]
        logprobs[e] = log_softmax()(processed[j])[0]


@functools.lru_cache(maxsize=1)
def streamed_step() -> type:
    """The class: mlx-lm's ``GenerationBatch`` whose ``_step`` spreads the rows' processors over
    :func:`_streams` and draws them as the module says (the attributes and the return value are mlx-lm's
    own). Made on first use, so that importing this module imports neither MLX nor mlx-lm."""
    import mlx.core as mx
    from mlx_lm.generate import GenerationBatch

    from mlx_persona.generation import log_softmax

    class StreamedStep(GenerationBatch):
        __doc__ = streamed_step.__doc__

        def _processed(self, e: int, logits, inputs, contexts: list):
            """Row `e`'s processed logits (lazy)."""
            x = logits[e:e + 1]
            processors = self.logits_processors[e] if self.logits_processors else None
            if processors:
                context = self._token_context[e].update_and_fetch(inputs[e:e + 1])
                contexts.append(context)
                for processor in processors:
                    x = processor(context, x)
            return x

        def _sampler(self, e: int):
            return (self.samplers[e] if self.samplers else None) or self.fallback_sampler

        def _step(self):
            self._current_tokens, self._current_logprobs = self._next_tokens, self._next_logprobs
            inputs = self._current_tokens
            logits = self.model(inputs[:, None], cache=self.prompt_cache)[:, -1, :]
            streams, contexts, tokens, logprobs, cpu = _streams(), [], [], [], []
            for e in range(len(self.uids)):
                with mx.stream(streams[e % len(streams)]):
                    x, sampler = self._processed(e, logits, inputs, contexts), self._sampler(e)
                    if _cpu_draw(sampler, x.shape[-1]):
                        cpu.append(e)
                        tokens.append(None)
                        logprobs.append(x)
                    else:
                        x = log_softmax()(x)
                        tokens.append(sampler(x).reshape(1))
                        logprobs.append(x[0])
            if cpu:
                _draw_on_cpu(cpu, [self._sampler(e) for e in cpu], tokens, logprobs, contexts)
            self._next_tokens = mx.concatenate(tokens) if tokens else mx.array([], dtype=mx.uint32)
            self._next_logprobs = logprobs
            on_cpu = set(cpu)  # their log-probabilities stay lazy: computed only if a caller reads them
            mx.async_eval(self._next_tokens, [x for e, x in enumerate(logprobs) if e not in on_cpu], contexts)
            return self._hand_out(inputs)

        def _hand_out(self, inputs):
            """The current tokens (the step before's), appended to the rows' histories, as mlx-lm's step
            returns them."""
            mx.eval(inputs)
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
