"""The two entry points, built from the processors and warpers:

* :func:`process_logits` -- one step, stateless: the log-probabilities the sampler draws from.
* :func:`make_sampler_and_processors` -- the ``(HFSampler, [HFLogitsProcessor])`` pair mlx-lm's
  ``generate_step`` takes, with per-generation state (where the prompt ends, the PRNG key).

The sampler is step 8 (the categorical draw or argmax) and where ``seed`` is applied.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import mlx.core as mx
import numpy as np

from mlx_persona.sampling.config import GenerationConfig
from mlx_persona.sampling.inputs import (
    as_token_array,
    eos_ids,
    ids_in_vocab,
    to_float32,
)
from mlx_persona.sampling.processors import apply_processors
from mlx_persona.sampling.warpers import sample_top_k, warp


def _log_softmax(x: mx.array) -> mx.array:
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def process_logits(
    config: GenerationConfig,
    tokens: Sequence[int] | np.ndarray | mx.array,
    logits: mx.array,
    *,
    prompt_length: int,
    eos_token_ids: int | Iterable[int] | None,
) -> mx.array:
    """The log-probabilities transformers' ``generate`` would draw the next token from.

    Args:
        config: Generation settings.
        tokens: Every token id so far, prompt then generated (1-D).
        logits: Raw next-token logits, ``[vocab]`` or ``[1, vocab]`` (any float dtype).
        prompt_length: How many leading ``tokens`` are the prompt. The rest are the new tokens
            ``min_new_tokens`` counts; all tokens count for the repetition penalty and n-grams,
            as in transformers for decoder-only models.
        eos_token_ids: Every end id (e.g. Gemma's ``<eos>`` and ``<end_of_turn>``); all of them
            are banned while fewer than ``min_new_tokens`` new tokens exist.

    Returns:
        float32 log-probabilities shaped like ``logits``, ``-inf`` where a token is excluded.
        When sampling: ``log_softmax`` of the processed and warped logits. For greedy decoding
        (temperature 0): ``log_softmax`` of the processed logits without warpers (transformers
        skips warpers when ``do_sample=False``); its argmax is the greedy choice.
    """
    config.validate()
    history = as_token_array(tokens)
    if not 0 <= prompt_length <= history.shape[0]:
        raise ValueError(
            f"prompt_length must be in [0, len(tokens)={history.shape[0]}], got {prompt_length}"
        )
    logits = logits if isinstance(logits, mx.array) else mx.array(np.asarray(logits))
    squeeze = logits.ndim == 1
    x = to_float32(logits[None] if squeeze else logits)
    vocab_size = x.shape[-1]
    x = apply_processors(
        x,
        config=config,
        penalty_ids=lambda: ids_in_vocab(np.asarray(history).tolist(), vocab_size),
        history=lambda: history,
        n_new=history.shape[0] - prompt_length,
        eos=ids_in_vocab(eos_ids(eos_token_ids), vocab_size),
    )
    if config.do_sample:
        x = warp(
            x,
            temperature=float(config.temperature),
            top_k=int(config.top_k),
            top_p=float(config.top_p),
            min_p=float(config.min_p),
        )
    out = _log_softmax(x)
    return out[0] if squeeze else out



class HFLogitsProcessor:
    """Steps 1-3 as one mlx-lm logits processor: ``processor(tokens, logits) -> logits``.

    mlx-lm 0.32's ``generate_step`` calls it once per step with ``tokens`` = every token *it*
    has seen (the ``prompt`` it was given, then one more generated token per call) and
    ``logits`` of shape ``[1, vocab]``. The first call comes on the prompt, before anything is
    generated; its length is remembered, so the number of new tokens (for ``min_new_tokens``) is
    ``len(tokens) - first_length``, a host-side shape (no sync). The context for the repetition
    penalty and n-grams is ``prompt_tokens`` (given here) followed by the generated tokens, so it
    stays right when a reused KV cache means mlx-lm was given only the tail of the prompt.

    State is per generation: build a new instance for every ``generate_step`` call.
    """

    def __init__(
        self,
        config: GenerationConfig,
        *,
        prompt_tokens: Sequence[int] | np.ndarray | mx.array,
        eos_token_ids: int | Iterable[int] | None,
    ):
        """Args:
        config: Validated generation settings.
        prompt_tokens: The whole context before generation, 1-D (what transformers'
            ``input_ids`` would be).
        eos_token_ids: Every end id.
        """
        self.config = config
        self._prompt_list: list[int] = np.asarray(as_token_array(prompt_tokens)).tolist()
        self._prompt = mx.array(self._prompt_list, dtype=mx.int32)
        self._eos_list = eos_ids(eos_token_ids)
        self._first_length: int | None = None
        self._vocab_size: int | None = None
        self._prompt_ids = mx.array([], dtype=mx.int32)  # distinct prompt ids < vocab
        self._eos = mx.array([], dtype=mx.int32)

    def _start(self, tokens: mx.array) -> None:
        # One host sync, on the first call only, where `tokens` is the already-materialised
        # prompt: it must be the tail of prompt_tokens, else our history would be wrong.
        given = tokens.tolist()
        n, total = len(given), len(self._prompt_list)
        if n > total or self._prompt_list[total - n :] != given:
            raise ValueError(
                "the first logits-processor call must see the prompt (all of prompt_tokens, or "
                f"its tail when a KV cache holds the rest); got {n} tokens that are not a suffix "
                f"of the {total} prompt_tokens. Build a new (sampler, processors) pair for every "
                "generation."
            )
        self._first_length = n

    def _set_vocab(self, vocab_size: int) -> None:
        # The distinct prompt ids are computed once on the host: the per-step penalty then
        # gathers/scatters over them plus the generated tokens, never rescanning the prompt.
        self._vocab_size = vocab_size
        self._prompt_ids = ids_in_vocab(self._prompt_list, vocab_size)
        self._eos = ids_in_vocab(self._eos_list, vocab_size)

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        """Apply repetition penalty, no-repeat-ngram and min_new_tokens.

        Args:
            tokens: mlx-lm's token history (1-D).
            logits: ``[1, vocab]`` (mlx-lm) or ``[vocab]`` next-token logits, any float dtype.

        Returns:
            float32 processed logits, shaped like ``logits``.
        """
        tokens = as_token_array(tokens)
        if self._first_length is None:
            self._start(tokens)
        n_new = tokens.shape[0] - self._first_length
        if n_new < 0:
            raise ValueError(
                "the token history shrank below the prompt; build a new (sampler, processors) "
                "pair for every generation"
            )
        x = to_float32(logits)
        if x.ndim == 1:
            x = x[None]
        if x.shape[-1] != self._vocab_size:
            self._set_vocab(x.shape[-1])
        generated = tokens[self._first_length :]  # a view; no copy of the history

        def penalty_ids() -> mx.array:
            return mx.concatenate([self._prompt_ids, generated]) if n_new else self._prompt_ids

        def history() -> mx.array:
            hidden = len(self._prompt_list) - self._first_length  # prompt mlx-lm never saw
            return mx.concatenate([self._prompt[:hidden], tokens]) if hidden else tokens

        out = apply_processors(
            x,
            config=self.config,
            penalty_ids=penalty_ids,
            history=history,
            n_new=n_new,
            eos=self._eos,
        )
        return out if logits.ndim == 2 else out[0]


class HFSampler:
    """Steps 4-8 as an mlx-lm sampler: ``sampler(logprobs) -> token ids``.

    mlx-lm calls it with ``logprobs = logits - logsumexp(logits)`` of the *processed* logits,
    shape ``[1, vocab]``, and expects token ids of shape ``[1]``. A seeded sampler draws with its
    own key chain (one ``split`` per call), so its draws depend only on the seed and the number
    of calls, not on any other use of MLX's global RNG. Without a seed it uses the global RNG.
    Where :meth:`cpu_draw` holds (MLX on the CPU), the draw is :mod:`mlx_persona.backend.draw`'s kernel,
    evaluated at once, with a counter-based generator of its own in place of the key chain.
    """

    def __init__(self, config: GenerationConfig):
        """Args:
        config: Validated generation settings.
        """
        self.greedy = not config.do_sample
        self._params = dict(
            temperature=float(config.temperature),
            top_k=int(config.top_k),
            top_p=float(config.top_p),
            min_p=float(config.min_p),
        )
        self._key = None if config.seed is None else mx.random.key(int(config.seed))
        self._seed = config.seed
        self._draws = 0  # the CPU draw's counter
        self._cpu = None  # whether draws go to mlx_persona.backend.draw: decided on the first call

    def cpu_draw(self, vocab: int) -> bool:
        """Whether this sampler's draws over `vocab` logits go to the CPU kernel
        (:mod:`mlx_persona.backend.draw`: the CPU is MLX's device and the native layer is loaded; greedy, or
        sampling with 0 < top_k < vocab). Its input then need not be normalised (the draw is invariant to a
        shift of the row), and a seeded sampler draws with the kernel's generator instead of MLX's keys."""
        if self._cpu is None:
            from mlx_persona.backend import draw

            self._cpu = draw.available()
        return self._cpu and (self.greedy or 0 < self._params["top_k"] < vocab)

    def next_settings(self, rows: int = 1) -> list:
        """The CPU draw's settings for the next call's `rows` rows (:class:`mlx_persona.backend.draw.Settings`),
        counting the call. Seeded: (seed + row, calls so far); unseeded: fresh bits of MLX's global generator."""
        from mlx_persona.backend.draw import Settings

        p = self._params
        temperature = 0.0 if self.greedy else p["temperature"]
        if self.greedy:
            seeds, counter = [0] * rows, 0
        elif self._seed is None:
            bits = mx.random.randint(0, (1 << 31) - 1, (rows, 2)).tolist()
            seeds = [(hi << 31) | lo for hi, lo in bits]
            counter = 0
        else:
            seeds = [(int(self._seed) + r) % (1 << 64) for r in range(rows)]
            counter = self._draws
        self._draws += 1
        return [Settings(temperature, p["top_k"], p["top_p"], p["min_p"], seed, counter) for seed in seeds]

    def warp(self, logprobs: mx.array) -> mx.array:
        """The logits the draw is made from (-inf where excluded); the identity for greedy.

        Args:
            logprobs: ``[batch, vocab]`` processed log-probabilities.

        Returns:
            float32 warped logits, same shape.
        """
        x = to_float32(logprobs)
        return x if self.greedy else warp(x, **self._params)

    def __call__(self, logprobs: mx.array) -> mx.array:
        """Draw the next token (one per row).

        Args:
            logprobs: ``[batch, vocab]`` (mlx-lm: ``[1, vocab]``) or ``[vocab]`` processed
                log-probabilities.

        Returns:
            uint32 token ids of shape ``logprobs.shape[:-1]``.
        """
        x = to_float32(logprobs)
        squeeze = x.ndim == 1
        if squeeze:
            x = x[None]
        if self.cpu_draw(x.shape[-1]):
            from mlx_persona.backend import draw

            tokens = draw.draw([x[i] for i in range(x.shape[0])], self.next_settings(x.shape[0]))
            out = mx.array(tokens.astype(np.uint32))
        elif self.greedy:
            # do_sample=False: torch.argmax of the processed scores (first index on ties).
            out = mx.argmax(x, axis=-1)
        else:
            key = None
            if self._key is not None:
                self._key, key = mx.random.split(self._key)
            if 0 < self._params["top_k"] < x.shape[-1]:
                out = sample_top_k(x, key, **self._params)
            else:
                # torch.multinomial(softmax(scores)) == a categorical draw from the warped logits.
                out = mx.random.categorical(warp(x, **self._params), axis=-1, key=key)
        return out[0] if squeeze else out


def make_sampler_and_processors(
    config: GenerationConfig,
    *,
    prompt_tokens: Sequence[int] | np.ndarray | mx.array,
    eos_token_ids: int | Iterable[int] | None,
) -> tuple[HFSampler, list[HFLogitsProcessor]]:
    """A ``(sampler, logits_processors)`` pair for ``mlx_lm.generate.generate_step``.

    Usage::

        sampler, processors = make_sampler_and_processors(
            cfg, prompt_tokens=prompt, eos_token_ids=[eos_id, end_of_turn_id])
        for token, logprobs in generate_step(mx.array(prompt), model,
                                             max_tokens=cfg.max_new_tokens,
                                             sampler=sampler, logits_processors=processors):
            ...

    Args:
        config: Generation settings (validated here).
        prompt_tokens: The whole context before generation, 1-D. Give mlx-lm the same tokens as
            ``prompt`` (or only their tail when a reused KV cache already holds the rest).
        eos_token_ids: Every end id; all are banned while fewer than ``min_new_tokens`` new
            tokens exist.

    Returns:
        ``(sampler, [processor])``, single-use: one pair per generation. The processor is always
        present, even with every penalty off: it upcasts the logits to float32 (as transformers
        does) before mlx-lm normalises them.
    """
    config.validate()
    processor = HFLogitsProcessor(config, prompt_tokens=prompt_tokens, eos_token_ids=eos_token_ids)
    return HFSampler(config), [processor]
