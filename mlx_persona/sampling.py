"""Generation settings and logits processing with Hugging Face transformers' semantics.

Settings tuned with ``transformers``' ``generate`` must behave the same here. mlx-lm's own
``make_sampler`` / ``make_logits_processors`` differ from transformers in ways that change the
output distribution: no ``min_new_tokens``, a repetition penalty that only looks at the last 20
tokens, top-p applied *before* top-k, and bf16 arithmetic on Metal. This module re-implements the
pieces of transformers' chain we support, in transformers' order, as vectorised MLX ops:

=====  ===============================================  ==========================================
step   transformers class (``generation/logits_process``)  here
=====  ===============================================  ==========================================
1      ``RepetitionPenaltyLogitsProcessor``             logits processor
2      ``NoRepeatNGramLogitsProcessor``                 logits processor
3      ``MinNewTokensLengthLogitsProcessor``            logits processor
4      ``TemperatureLogitsWarper``                      sampler (sampling only)
5      ``TopKLogitsWarper``                             sampler (sampling only)
6      ``TopPLogitsWarper``                             sampler (sampling only)
7      ``MinPLogitsWarper``                             sampler (sampling only)
8      ``torch.multinomial`` / ``torch.argmax``         sampler: categorical draw / argmax
=====  ===============================================  ==========================================

The order is the one ``GenerationMixin._get_logits_processor`` builds in transformers 5.x
(processors in the order above, then the "warpers" only when ``do_sample``). Steps 1-3 commute
anyway (each either rescales a logit monotonically or sets it to -inf, which the penalty keeps at
-inf), but the warpers do not, so their order matters.

Two entry points share the same building blocks:

* :func:`process_logits` -- one step, stateless: the log-probabilities the sampler draws from.
  Used by tests and anywhere a whole history is at hand.
* :func:`make_sampler_and_processors` -- a ``(sampler, logits_processors)`` pair for
  ``mlx_lm.generate.generate_step`` / ``mlx_lm.stream_generate``. Build a fresh pair for every
  generation call (they keep per-generation state: the token history bookkeeping and the PRNG key).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import mlx.core as mx
import numpy as np

__all__ = [
    "GenerationConfig",
    "PRESETS",
    "preset",
    "process_logits",
    "make_sampler_and_processors",
    "HFLogitsProcessor",
    "HFSampler",
]

_NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class GenerationConfig:
    """Generation settings with transformers' meaning.

    Attributes:
        max_new_tokens: Upper bound on generated tokens (used by the generation loop).
        min_new_tokens: While fewer new tokens than this exist, every end-of-sequence id is banned
            (transformers' ``MinNewTokensLengthLogitsProcessor``). May exceed ``max_new_tokens``,
            as in transformers (generation then simply runs to ``max_new_tokens``).
        temperature: 0 means greedy decoding (transformers' ``do_sample=False``); otherwise logits
            are divided by it before top-k/top-p/min-p.
        top_k: Keep the ``top_k`` highest logits (ties at the k-th value are all kept); 0 = off.
        top_p: Nucleus sampling: in (0, 1]; 1 = off.
        min_p: Drop tokens whose probability is below ``min_p`` times the top token's; 0 = off.
        repetition_penalty: Sign-aware penalty over every token of prompt + generated; 1 = off.
        no_repeat_ngram_size: Ban tokens that would repeat an n-gram of this size; 0 = off.
        stop: Stop strings; used by the generation loop, not by the logits processing.
        seed: Seed of the sampler's private PRNG key chain; None uses MLX's global RNG.
    """

    max_new_tokens: int = 256
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    @property
    def do_sample(self) -> bool:
        """True when tokens are drawn at random (temperature > 0), False for greedy decoding."""
        return self.temperature > 0

    def validate(self) -> "GenerationConfig":
        """Check every field for impossible values.

        Returns:
            ``self``, so that ``cfg = GenerationConfig(...).validate()`` reads naturally.

        Raises:
            ValueError: naming the offending field, its value and what is allowed.
        """

        def is_int(v: Any) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))

        def is_num(v: Any) -> bool:
            return (is_int(v) or isinstance(v, (float, np.floating))) and math.isfinite(float(v))

        def fail(name: str, rule: str) -> None:
            raise ValueError(f"GenerationConfig.{name} must be {rule}, got {getattr(self, name)!r}")

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            fail("max_new_tokens", "an integer >= 1")
        if not is_int(self.min_new_tokens) or self.min_new_tokens < 0:
            fail("min_new_tokens", "an integer >= 0")
        if not is_num(self.temperature) or self.temperature < 0:
            fail("temperature", "a finite number >= 0 (0 = greedy)")
        if not is_int(self.top_k) or self.top_k < 0:
            fail("top_k", "an integer >= 0 (0 = off)")
        if not is_num(self.top_p) or not 0.0 < self.top_p <= 1.0:
            fail("top_p", "a number in (0, 1] (1 = off)")
        if not is_num(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            fail("min_p", "a number in [0, 1] (0 = off)")
        if not is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            fail("repetition_penalty", "a finite number > 0 (1 = off)")
        if not is_int(self.no_repeat_ngram_size) or self.no_repeat_ngram_size < 0:
            fail("no_repeat_ngram_size", "an integer >= 0 (0 = off)")
        if not isinstance(self.stop, (list, tuple)) or not all(
            isinstance(s, str) and s for s in self.stop
        ):
            fail("stop", "a list of non-empty strings")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**64):
            fail("seed", "None or an integer in [0, 2**64)")
        return self

    def to_dict(self) -> dict[str, Any]:
        """All fields as a plain (JSON/YAML-serialisable) dict; inverse of :meth:`from_dict`."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GenerationConfig":
        """Build a validated config from a dict (e.g. a YAML section).

        Args:
            data: Field names to values; missing fields take their defaults.

        Returns:
            The validated :class:`GenerationConfig`.

        Raises:
            ValueError: for an unknown key (named in the message) or an invalid value.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown generation setting(s) {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(sorted(known))}"
            )
        values = dict(data)
        if "stop" in values and isinstance(values["stop"], tuple):
            values["stop"] = list(values["stop"])
        return cls(**values).validate()

    def to_hf_generation_config(self) -> dict[str, Any]:
        """The keys of transformers' ``generation_config.json`` that reproduce these settings.

        Sampling-only keys are always written explicitly when sampling, because transformers fills
        missing ones with its own defaults (notably ``top_k=50``). For greedy decoding they are
        left out: transformers ignores them with ``do_sample=False`` and warns about them, and
        ``temperature=0.0`` is not a value transformers accepts. ``min_p`` is written only when set.
        ``stop`` and ``seed`` have no generation_config.json counterpart (transformers'
        ``stop_strings`` needs the tokenizer passed to ``generate``), and end-of-sequence ids come
        from the model, so neither appears here.

        Returns:
            A dict suitable for ``transformers.GenerationConfig(**d)`` or ``json.dump``.
        """
        self.validate()
        out: dict[str, Any] = {"do_sample": self.do_sample}
        if self.do_sample:
            out["temperature"] = float(self.temperature)
            out["top_k"] = int(self.top_k)
            out["top_p"] = float(self.top_p)
            if self.min_p > 0:
                out["min_p"] = float(self.min_p)
        out["repetition_penalty"] = float(self.repetition_penalty)
        out["no_repeat_ngram_size"] = int(self.no_repeat_ngram_size)
        out["min_new_tokens"] = int(self.min_new_tokens)
        out["max_new_tokens"] = int(self.max_new_tokens)
        return out


PRESETS: dict[str, GenerationConfig] = {
    "persona": GenerationConfig(
        max_new_tokens=256,
        min_new_tokens=50,
        temperature=0.8,
        top_k=50,
        top_p=0.95,
        repetition_penalty=1.1,
    ),
    "greedy": GenerationConfig(temperature=0.0),
}


def preset(name: str) -> GenerationConfig:
    """A copy of a named preset (safe to modify).

    Args:
        name: A key of :data:`PRESETS`.

    Returns:
        A deep copy of the preset.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    try:
        return copy.deepcopy(PRESETS[name])
    except KeyError:
        raise ValueError(
            f"unknown generation preset {name!r}; known: {', '.join(sorted(PRESETS))}"
        ) from None


# --------------------------------------------------------------------------------------------
# Building blocks (vectorised, no host syncs)
# --------------------------------------------------------------------------------------------


def _to_float32(x: mx.array) -> mx.array:
    # transformers' generate upcasts the next-token logits to float32 before any processor
    # (`outputs.logits[:, -1].to(dtype=torch.float32)`); on Metal mlx-lm hands us bf16.
    return x if x.dtype == mx.float32 else x.astype(mx.float32)


def _eos_ids(eos_token_ids: int | Iterable[int] | None) -> list[int]:
    if eos_token_ids is None:
        return []
    if isinstance(eos_token_ids, (int, np.integer)):
        return [int(eos_token_ids)]
    return sorted({int(i) for i in eos_token_ids})


def _token_mask(ids: mx.array, vocab_size: int) -> mx.array:
    """Boolean [vocab] mask, True at every id in ``ids`` (duplicates fine).

    Ids >= vocab go to a spare column that is dropped, like transformers' clamp to ``vocab_size``
    in the repetition-penalty and n-gram processors (the model cannot emit them anyway).
    """
    ids = mx.minimum(ids.astype(mx.int32), vocab_size)
    mask = mx.zeros((vocab_size + 1,), dtype=mx.bool_)
    return mask.at[ids].maximum(mx.array(True))


def _apply_repetition_penalty(x: mx.array, seen: mx.array, penalty: float) -> mx.array:
    # RepetitionPenaltyLogitsProcessor: once per distinct token of prompt + generated,
    # score < 0 -> score * penalty, else score / penalty.
    penalized = mx.where(x < 0, x * penalty, x / penalty)
    return mx.where(seen, penalized, x)


def _no_repeat_ngram_mask(history: mx.array, ngram_size: int, vocab_size: int) -> mx.array | None:
    """Tokens that would complete an n-gram already present in ``history`` (None: nothing banned).

    Mirrors transformers 5.x ``NoRepeatNGramLogitsProcessor``: the last ``n-1`` tokens are matched
    against every window of the history; each matching window bans its last token. Cost is
    O(len(history) * n), independent of the vocabulary.
    """
    length = history.shape[0]
    if length < ngram_size:
        return None
    n_windows = length - ngram_size + 1
    matches = mx.ones((n_windows,), dtype=mx.bool_)
    for i in range(ngram_size - 1):
        # Window column i must equal the i-th token of the current (n-1)-token suffix.
        matches = matches & (history[i : i + n_windows] == history[n_windows + i])
    last = history[ngram_size - 1 :]
    # Non-matching windows scatter into the spare column, where they cannot un-ban anything.
    banned = mx.where(matches, mx.minimum(last.astype(mx.int32), vocab_size), vocab_size)
    return _token_mask(banned, vocab_size)[:vocab_size]


def _warp(
    x: mx.array, *, temperature: float, top_k: int, top_p: float, min_p: float
) -> mx.array:
    """Temperature -> top-k -> top-p -> min-p, as transformers' warpers; -inf where excluded.

    Args:
        x: float32 [..., vocab] processed logits (or log-probabilities: every step is invariant
            to a per-row constant shift, so mlx-lm's normalised logprobs give the same result).
        temperature: > 0.
        top_k: 0 or >= vocab = off.
        top_p: 1 = off.
        min_p: 0 = off.

    Returns:
        The warped logits, same shape.
    """
    vocab_size = x.shape[-1]
    if temperature != 1.0:
        # TemperatureLogitsWarper (only added by transformers when temperature != 1.0).
        x = x / temperature
    use_top_k = 0 < top_k < vocab_size  # TopKLogitsWarper clamps k to vocab: k >= vocab is a no-op
    use_top_p = top_p < 1.0  # generate only adds TopPLogitsWarper for top_p < 1.0
    if use_top_k or use_top_p:
        if use_top_k:
            # TopKLogitsWarper removes `scores < kth_largest`, so ties with the k-th value survive.
            # argpartition finds the k candidates in O(vocab) instead of a full-vocab sort.
            idx = mx.argpartition(-x, kth=top_k - 1, axis=-1)[..., :top_k]
            cand = mx.take_along_axis(x, idx, axis=-1)
            kth = mx.min(cand, axis=-1, keepdims=True)
            threshold = kth
        if use_top_p:
            # TopPLogitsWarper: sort ascending, softmax, cumsum; remove positions whose cumulative
            # probability is <= 1 - top_p, but never the last min_tokens_to_keep (=1) position.
            # After top-k only the survivors carry probability, so sorting the k candidates is
            # enough; survivors outside `cand` are ties with the k-th value (they sort first).
            s = mx.sort(cand if use_top_k else x, axis=-1)
            top = s[..., -1:]
            e = mx.exp(s - top)
            if use_top_k:
                n_extra = (x == kth).sum(axis=-1, keepdims=True) - (cand == kth).sum(
                    axis=-1, keepdims=True
                )
                extra = n_extra.astype(mx.float32) * mx.exp(kth - top)
                z = e.sum(axis=-1, keepdims=True) + extra
                cum = extra / z + mx.cumsum(e / z, axis=-1)
            else:
                z = e.sum(axis=-1, keepdims=True)
                cum = mx.cumsum(e / z, axis=-1)
            n_removed = (cum <= (1.0 - top_p)).sum(axis=-1, keepdims=True)
            n_removed = mx.minimum(n_removed, s.shape[-1] - 1)
            # Removal is a prefix of the ascending order, so it is a threshold on the value.
            # (Only a tie group straddling the cut differs: transformers keeps an arbitrary part
            # of it, per torch.sort's order; we keep all of it.)
            threshold = mx.take_along_axis(s, n_removed.astype(mx.int32), axis=-1)
        x = mx.where(x < threshold, _NEG_INF, x)
    if min_p > 0.0:
        # MinPLogitsWarper: remove probs < min_p * max_prob, i.e. x - max(x) < log(min_p) (applied
        # after temperature; the max token always survives, so min_tokens_to_keep=1 is implied).
        top = mx.max(x, axis=-1, keepdims=True)
        x = mx.where(x - top < math.log(min_p), _NEG_INF, x)
    return x


def _log_softmax(x: mx.array) -> mx.array:
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def _as_token_array(tokens: Any) -> mx.array:
    arr = tokens if isinstance(tokens, mx.array) else mx.array(np.asarray(tokens, dtype=np.int64))
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 1:
        raise ValueError(f"tokens must be 1-D (or [1, n]), got shape {tuple(arr.shape)}")
    return arr.astype(mx.int32)


# --------------------------------------------------------------------------------------------
# Stateless one-step API
# --------------------------------------------------------------------------------------------


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
        logits: Raw next-token logits, ``[vocab]`` or ``[1, vocab]``.
        prompt_length: How many leading ``tokens`` are the prompt (the rest count as new tokens
            for ``min_new_tokens``; all of them count for the repetition penalty and n-grams,
            as in transformers for decoder-only models).
        eos_token_ids: Every end id (e.g. Gemma's ``<eos>`` and ``<end_of_turn>``); all of them
            are banned while fewer than ``min_new_tokens`` new tokens exist.

    Returns:
        float32 log-probabilities with the shape of ``logits``; ``-inf`` where a token is
        excluded. For sampling this is ``log_softmax`` of the processed and warped logits; for
        greedy decoding (temperature 0) it is ``log_softmax`` of the processed logits without
        warpers, whose argmax is the greedy choice.
    """
    config.validate()
    history = _as_token_array(tokens)
    if not 0 <= prompt_length <= history.shape[0]:
        raise ValueError(
            f"prompt_length must be in [0, len(tokens)={history.shape[0]}], got {prompt_length}"
        )
    logits = logits if isinstance(logits, mx.array) else mx.array(np.asarray(logits))
    squeeze = logits.ndim == 1
    x = _to_float32(logits[None] if squeeze else logits)
    vocab_size = x.shape[-1]
    x = _process(
        x,
        history,
        vocab_size=vocab_size,
        n_new=history.shape[0] - prompt_length,
        config=config,
        eos_ids=_eos_ids(eos_token_ids),
        seen=None,
    )
    if config.do_sample:
        x = _warp(
            x,
            temperature=float(config.temperature),
            top_k=int(config.top_k),
            top_p=float(config.top_p),
            min_p=float(config.min_p),
        )
    out = _log_softmax(x)
    return out[0] if squeeze else out


def _process(
    x: mx.array,
    history: mx.array | Callable[[], mx.array],
    *,
    vocab_size: int,
    n_new: int,
    config: GenerationConfig,
    eos_ids: list[int],
    seen: mx.array | None,
    eos_mask: mx.array | None = None,
) -> mx.array:
    """Steps 1-3 (processors). ``history`` may be a thunk so it is only built when needed."""
    get_history = history if callable(history) else (lambda: history)
    if config.repetition_penalty != 1.0:
        if seen is None:
            seen = _token_mask(get_history(), vocab_size)[:vocab_size]
        x = _apply_repetition_penalty(x, seen, float(config.repetition_penalty))
    if config.no_repeat_ngram_size > 0:
        banned = _no_repeat_ngram_mask(get_history(), config.no_repeat_ngram_size, vocab_size)
        if banned is not None:
            x = mx.where(banned, _NEG_INF, x)
    if n_new < config.min_new_tokens and eos_ids:
        # MinNewTokensLengthLogitsProcessor: new = len(input_ids) - prompt length; every end id
        # (torch.isin over the vocab, so ids >= vocab are ignored) gets -inf below the threshold.
        if eos_mask is None:
            eos_mask = _token_mask(mx.array(eos_ids), vocab_size)[:vocab_size]
        x = mx.where(eos_mask, _NEG_INF, x)
    return x


# --------------------------------------------------------------------------------------------
# mlx-lm integration
# --------------------------------------------------------------------------------------------


class HFLogitsProcessor:
    """Steps 1-3 as one mlx-lm logits processor: ``processor(tokens, logits) -> logits``.

    mlx-lm 0.32 (``generate_step``) calls it once per step with ``tokens`` = every token *it* has
    seen (the prompt it was given, then one more generated token per call) and ``logits`` of shape
    ``[1, vocab]``. The first call is made on the prompt, before anything is generated; its
    length is remembered, so that the number of new tokens (for ``min_new_tokens``) is
    ``len(tokens) - first_length``. The full context for the repetition penalty and n-grams is
    ``prompt_tokens`` (given at construction) followed by the generated tokens, so it stays
    correct when the caller reuses a KV cache and hands mlx-lm only the last part of the prompt.

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
        prompt_tokens: The whole context before generation (what transformers' ``input_ids``
            would be), 1-D.
        eos_token_ids: Every end id.
        """
        self.config = config
        self._prompt_list = [int(t) for t in np.asarray(_as_token_array(prompt_tokens))]
        self._prompt = mx.array(self._prompt_list, dtype=mx.int32)
        self._eos_ids = _eos_ids(eos_token_ids)
        self._first_length: int | None = None
        self._seen: mx.array | None = None  # bool [vocab + 1]: tokens of prompt + generated
        self._seen_length = -1  # len(tokens) that _seen accounts for
        self._vocab_size: int | None = None
        self._eos_mask: mx.array | None = None

    def _start(self, tokens: mx.array) -> None:
        # One host sync, on the first call only, where `tokens` is the (already materialised)
        # prompt: it must be the tail of prompt_tokens, else the history would be wrong.
        given = tokens.tolist()
        n = len(given)
        if n > len(self._prompt_list) or self._prompt_list[len(self._prompt_list) - n :] != given:
            raise ValueError(
                "the first call must see the prompt (all of prompt_tokens, or its tail when a KV "
                f"cache holds the rest); got {n} tokens that are not a suffix of the "
                f"{len(self._prompt_list)} prompt_tokens. Build a new (sampler, processors) pair "
                "for every generation."
            )
        self._first_length = n

    def _history(self, tokens: mx.array) -> mx.array:
        """prompt_tokens followed by the generated tokens (what transformers calls input_ids)."""
        hidden = len(self._prompt_list) - self._first_length  # prompt part mlx-lm never saw
        if hidden == 0:
            return tokens
        return mx.concatenate([self._prompt[:hidden], tokens])

    def _seen_mask(self, tokens: mx.array, vocab_size: int) -> mx.array:
        length = tokens.shape[0]
        if self._seen is None or self._vocab_size != vocab_size or length != self._seen_length + 1:
            # First call, or a history that did not grow by exactly one token: rebuild.
            ids = self._history(tokens)
            self._seen = _token_mask(ids, vocab_size)
        else:
            # The usual step: one new token; O(1) update instead of rescanning the history.
            new = mx.minimum(tokens[-1:], vocab_size)
            self._seen = self._seen.at[new].maximum(mx.array(True))
        self._seen_length = length
        return self._seen[:vocab_size]

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        """Apply repetition penalty, no-repeat-ngram and min_new_tokens.

        Args:
            tokens: mlx-lm's token history (1-D).
            logits: ``[1, vocab]`` (or ``[vocab]``) next-token logits, any float dtype.

        Returns:
            float32 processed logits, same shape.
        """
        tokens = _as_token_array(tokens)
        if self._first_length is None:
            self._start(tokens)
        n_new = tokens.shape[0] - self._first_length
        if n_new < 0:
            raise ValueError(
                "token history shrank below the prompt; build a new (sampler, processors) pair "
                "for every generation"
            )
        x = _to_float32(logits)
        vocab_size = x.shape[-1]
        seen = None
        if self.config.repetition_penalty != 1.0:
            seen = self._seen_mask(tokens, vocab_size)
        if self._eos_ids and self.config.min_new_tokens > 0 and self._vocab_size != vocab_size:
            self._eos_mask = _token_mask(mx.array(self._eos_ids), vocab_size)[:vocab_size]
        self._vocab_size = vocab_size
        return _process(
            x,
            lambda: self._history(tokens),
            vocab_size=vocab_size,
            n_new=n_new,
            config=self.config,
            eos_ids=self._eos_ids,
            seen=seen,
            eos_mask=self._eos_mask,
        )


class HFSampler:
    """Steps 4-8 as an mlx-lm sampler: ``sampler(logprobs) -> token ids``.

    mlx-lm calls it with ``logprobs = logits - logsumexp(logits)`` of the *processed* logits,
    shape ``[1, vocab]``, and expects token ids of shape ``[1]``. Seeded samplers draw with their
    own key chain (``key, sub = split(key)`` per call), so the draws depend only on the seed and
    the number of calls, not on any other use of MLX's global RNG.
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

    def warp(self, logprobs: mx.array) -> mx.array:
        """The logits the draw is made from (-inf where excluded); identity for greedy."""
        x = _to_float32(logprobs)
        return x if self.greedy else _warp(x, **self._params)

    def __call__(self, logprobs: mx.array) -> mx.array:
        """Draw the next token.

        Args:
            logprobs: ``[1, vocab]`` (or ``[vocab]``) processed log-probabilities.

        Returns:
            uint32 token ids, shape ``logprobs.shape[:-1]``.
        """
        x = _to_float32(logprobs)
        if self.greedy:
            # do_sample=False: torch.argmax of the processed scores (first index on ties).
            return mx.argmax(x, axis=-1)
        x = _warp(x, **self._params)
        if self._key is None:
            return mx.random.categorical(x, axis=-1)
        self._key, sub = mx.random.split(self._key)
        return mx.random.categorical(x, axis=-1, key=sub)


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
        for token, logprobs in generate_step(mx.array(prompt), model, max_tokens=cfg.max_new_tokens,
                                             sampler=sampler, logits_processors=processors):
            ...

    Args:
        config: Generation settings (validated here).
        prompt_tokens: The whole context before generation, 1-D. Pass the same tokens (or, with a
            reused KV cache, their tail) to mlx-lm as ``prompt``.
        eos_token_ids: Every end id; banned while fewer than ``min_new_tokens`` new tokens exist.

    Returns:
        ``(sampler, [processor])``; single-use, one pair per generation. The processor always
        runs (it also upcasts logits to float32, which transformers does before processing).
    """
    config.validate()
    processor = HFLogitsProcessor(config, prompt_tokens=prompt_tokens, eos_token_ids=eos_token_ids)
    return HFSampler(config), [processor]
