"""Generation settings and logits processing with Hugging Face transformers' semantics.

Settings tuned with ``transformers``' ``generate`` must behave the same here. mlx-lm's own
``make_sampler`` / ``make_logits_processors`` change the output distribution: no
``min_new_tokens``, a repetition penalty over the last 20 tokens only, top-p and min-p computed
before temperature and before top-k, and bf16 arithmetic on Metal. This module re-implements the
part of transformers' chain we support, in transformers' order, as vectorised MLX ops:

1. ``RepetitionPenaltyLogitsProcessor``    -- logits processor
2. ``NoRepeatNGramLogitsProcessor``        -- logits processor
3. ``MinNewTokensLengthLogitsProcessor``   -- logits processor
4. ``TemperatureLogitsWarper``             -- sampler, sampling only
5. ``TopKLogitsWarper``                    -- sampler, sampling only
6. ``TopPLogitsWarper``                    -- sampler, sampling only
7. ``MinPLogitsWarper``                    -- sampler, sampling only
8. ``torch.multinomial(softmax)`` / ``torch.argmax`` -- sampler: categorical draw / argmax

(classes from ``transformers/generation/logits_process.py``). The order is the one
``GenerationMixin._get_logits_processor`` builds in transformers 5.x: processors first, then
the "warpers" only when ``do_sample``. Steps 1-3 commute anyway (each rescales a logit
monotonically or sets it to -inf, which the penalty keeps at -inf); the warpers do not.

Known, deliberate differences (all at float-rounding or tie level):

* A group of exactly tied logits straddling the top-p cut is kept whole; transformers keeps an
  arbitrary part of it (whatever ``torch.sort`` puts last). Ties at the top-k cut are exact
  (transformers keeps them all, so do we).
* The sampler sees mlx-lm's ``logits - logsumexp(logits)`` rather than the logits; every step is
  shift-invariant, so only rounding differs (e.g. two logits 1 ulp apart could become equal).

Two entry points share the same building blocks:

* :func:`process_logits` -- one step, stateless: the log-probabilities the sampler draws from.
  Used by tests and anywhere a whole history is at hand.
* :func:`make_sampler_and_processors` -- a ``(sampler, logits_processors)`` pair for
  ``mlx_lm.generate.generate_step`` / ``mlx_lm.stream_generate``. Build a fresh pair for every
  generation call (they keep per-generation state: where the prompt ends, and the PRNG key).
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
# Building blocks (vectorised MLX ops on [batch, vocab] float32 logits; no host syncs)
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


def _ids_in_vocab(ids: Iterable[int], vocab_size: int) -> mx.array:
    """Distinct ids in [0, vocab) as int32 (host-side; for prompt and end ids, known up front).

    Ids >= vocab are dropped, as transformers does (it clamps them to a spare column in the
    repetition-penalty and n-gram processors, and `torch.isin` over the vocab ignores them for
    min_new_tokens); the model cannot emit them anyway.
    """
    arr = np.unique(np.asarray(list(ids), dtype=np.int64))
    arr = arr[(arr >= 0) & (arr < vocab_size)]
    return mx.array(arr.astype(np.int32))


def _apply_repetition_penalty(x: mx.array, ids: mx.array, penalty: float) -> mx.array:
    """RepetitionPenaltyLogitsProcessor on the tokens ``ids`` (1-D, duplicates allowed).

    Gather, penalise (score < 0 -> score * penalty, else score / penalty), scatter back. A token
    listed twice gets the same value written twice, so each distinct token is penalised exactly
    once, as in transformers' gather/scatter. Cost O(len(ids)) plus one copy of the row.
    """
    if ids.size == 0:
        return x
    idx = mx.broadcast_to(ids, (*x.shape[:-1], ids.size))
    vals = mx.take_along_axis(x, idx, axis=-1)
    vals = mx.where(vals < 0, vals * penalty, vals / penalty)
    return mx.put_along_axis(x, idx, vals, axis=-1)


def _ban(x: mx.array, ids: mx.array, add: mx.array | float) -> mx.array:
    # Scatter-add -inf (x + -inf = -inf; x + 0 = x exactly), so duplicate ids and "no-op" slots
    # are harmless, and no full-vocabulary mask or `where` pass is needed.
    return x.at[:, ids].add(add)


def _apply_no_repeat_ngram(x: mx.array, history: mx.array, ngram_size: int) -> mx.array:
    """NoRepeatNGramLogitsProcessor: ban tokens that would repeat an n-gram of ``history``.

    Mirrors transformers 5.x: the last ``n-1`` tokens are matched against every window of the
    history; each matching window bans its last token. O(len(history) * n), vocabulary-free.
    """
    length = history.shape[0]
    if length < ngram_size:  # no complete n-gram yet
        return x
    vocab_size = x.shape[-1]
    n_windows = length - ngram_size + 1
    matches = mx.ones((n_windows,), dtype=mx.bool_)
    for i in range(ngram_size - 1):
        # Column i of every window must equal the i-th token of the current (n-1)-token suffix.
        matches = matches & (history[i : i + n_windows] == history[n_windows + i])
    last = history[ngram_size - 1 :]
    valid = matches & (last < vocab_size)
    ids = mx.where(valid, last, 0)
    return _ban(x, ids, mx.where(valid, _NEG_INF, 0.0))


def _process(
    x: mx.array,
    *,
    config: GenerationConfig,
    penalty_ids: Callable[[], mx.array],
    history: Callable[[], mx.array],
    n_new: int,
    eos: mx.array,
) -> mx.array:
    """Steps 1-3 (transformers' processors), in `_get_logits_processor`'s order.

    ``penalty_ids`` and ``history`` are thunks so that nothing is built for disabled steps.
    """
    if config.repetition_penalty != 1.0:
        x = _apply_repetition_penalty(x, penalty_ids(), float(config.repetition_penalty))
    if config.no_repeat_ngram_size > 0:
        x = _apply_no_repeat_ngram(x, history(), int(config.no_repeat_ngram_size))
    if n_new < config.min_new_tokens and eos.size > 0:
        # MinNewTokensLengthLogitsProcessor: new = len(input_ids) - prompt length; every end id
        # gets -inf while new < min_new_tokens. `n_new` is a host int (a shape), no sync.
        x = _ban(x, eos, _NEG_INF)
    return x


def _top_k_candidates(x: mx.array, k: int) -> tuple[mx.array, mx.array, mx.array]:
    """Indices and values of the k largest entries (unordered) and the k-th largest value.

    argpartition is O(vocab), unlike the full sort a naive top-k/top-p needs.
    """
    idx = mx.argpartition(-x, kth=k - 1, axis=-1)[..., :k]
    cand = mx.take_along_axis(x, idx, axis=-1)
    return idx, cand, mx.min(cand, axis=-1, keepdims=True)


def _top_p_threshold(
    s: mx.array,
    top_p: float,
    extra_count: mx.array | None = None,
    extra_value: mx.array | None = None,
) -> mx.array:
    """Smallest value TopPLogitsWarper keeps, given the surviving values ``s`` sorted ascending.

    TopPLogitsWarper: sort ascending, softmax, cumsum, remove positions whose cumulative
    probability is <= 1 - top_p, never the last min_tokens_to_keep (= 1) position. Tokens that
    are already -inf carry no mass, so when top-k ran first only its survivors need sorting:
    the k candidates plus ``extra_count`` tokens tied with the k-th value ``extra_value`` that
    argpartition left out (they sort first among the survivors). Removal is a prefix of the
    ascending order, hence a threshold on the value. (Only a tie group straddling the cut can
    differ: transformers keeps an arbitrary part of it, by torch.sort's order; we keep all.)
    """
    top = s[..., -1:]
    e = mx.exp(s - top)
    if extra_count is None:
        z = e.sum(axis=-1, keepdims=True)
        cum = mx.cumsum(e / z, axis=-1)
    else:
        extra = extra_count.astype(mx.float32) * mx.exp(extra_value - top)
        z = e.sum(axis=-1, keepdims=True) + extra
        cum = extra / z + mx.cumsum(e / z, axis=-1)
    n_removed = (cum <= (1.0 - top_p)).sum(axis=-1, keepdims=True)
    n_removed = mx.minimum(n_removed, s.shape[-1] - 1).astype(mx.int32)
    return mx.take_along_axis(s, n_removed, axis=-1)


def _warp(x: mx.array, *, temperature: float, top_k: int, top_p: float, min_p: float) -> mx.array:
    """Temperature -> top-k -> top-p -> min-p over the whole vocabulary; -inf where excluded.

    Args:
        x: float32 [batch, vocab] processed logits, or log-probabilities: every step is
            invariant to a per-row constant shift, so mlx-lm's normalised logprobs work too.
        temperature: > 0 (1 = off).
        top_k: 0 or >= vocab = off.
        top_p: 1 = off.
        min_p: 0 = off.

    Returns:
        The warped logits, same shape.
    """
    vocab_size = x.shape[-1]
    if temperature != 1.0:
        # TemperatureLogitsWarper (generate adds it only for temperature != 1.0).
        x = x / temperature
    threshold = None
    if 0 < top_k < vocab_size:
        # TopKLogitsWarper removes `scores < kth largest` (ties with it survive); k >= vocab is
        # clamped to the vocab by transformers, i.e. a no-op.
        _, cand, kth = _top_k_candidates(x, top_k)
        threshold = kth
        if top_p < 1.0:
            n_extra = (x == kth).sum(axis=-1, keepdims=True) - (cand == kth).sum(
                axis=-1, keepdims=True
            )
            threshold = _top_p_threshold(mx.sort(cand, axis=-1), top_p, n_extra, kth)
    elif top_p < 1.0:  # generate adds TopPLogitsWarper only for top_p < 1.0
        threshold = _top_p_threshold(mx.sort(x, axis=-1), top_p)
    if threshold is not None:
        x = mx.where(x < threshold, _NEG_INF, x)
    if min_p > 0.0:
        # MinPLogitsWarper: remove probs < min_p * max_prob <=> x - max(x) < log(min_p). It runs
        # after temperature (so the threshold sees scaled logits); the max always survives, so
        # min_tokens_to_keep = 1 needs nothing extra.
        x = mx.where(x - mx.max(x, axis=-1, keepdims=True) < math.log(min_p), _NEG_INF, x)
    return x


def _sample_top_k(
    x: mx.array, key: mx.array | None, *, temperature: float, top_k: int, top_p: float, min_p: float
) -> mx.array:
    """Draw from exactly the distribution ``_warp`` defines, when 0 < top_k < vocab.

    Instead of masking the vocabulary and drawing a Gumbel variate per vocabulary entry, draw
    among k + 1 slots: one per top-k candidate above the k-th value, and one for the whole group
    of tokens tied with the k-th value (weight = group size * its probability; ties are common
    with bf16 logits and transformers keeps all of them). If the tie slot wins, a uniform member
    of the group is picked. The only vocabulary-wide work is the argpartition, a comparison and
    a cumulative count.
    """
    if temperature != 1.0:
        x = x / temperature  # before top-k, as transformers orders it
    idx, cand, kth = _top_k_candidates(x, top_k)
    is_tie = x == kth
    n_ties = is_tie.sum(axis=-1, keepdims=True)  # >= 1: the k-th token itself
    cand_tie = cand == kth
    threshold = kth
    if top_p < 1.0:
        n_extra = n_ties - cand_tie.sum(axis=-1, keepdims=True)
        threshold = _top_p_threshold(mx.sort(cand, axis=-1), top_p, n_extra, kth)
    keep = cand >= threshold
    tie_keep = kth >= threshold
    if min_p > 0.0:
        top = mx.max(cand, axis=-1, keepdims=True)  # the global max is always a candidate
        log_min_p = math.log(min_p)
        keep = keep & (cand - top >= log_min_p)
        tie_keep = tie_keep & (kth - top >= log_min_p)
    slots = mx.concatenate(
        [
            mx.where(keep & ~cand_tie, cand, _NEG_INF),
            mx.where(tie_keep, kth + mx.log(n_ties.astype(mx.float32)), _NEG_INF),
        ],
        axis=-1,
    )
    if key is None:
        slot = mx.random.categorical(slots, axis=-1)
        r = mx.random.randint(0, n_ties, n_ties.shape)
    else:
        k_slot, k_tie = mx.random.split(key)
        slot = mx.random.categorical(slots, axis=-1, key=k_slot)
        r = mx.random.randint(0, n_ties, n_ties.shape, key=k_tie)
    # Index of the r-th (0-based) tied token = how many positions precede it in vocab order.
    tie_token = (mx.cumsum(is_tie.astype(mx.int32), axis=-1) <= r).sum(axis=-1)
    cand_token = mx.take_along_axis(idx, mx.minimum(slot, top_k - 1)[..., None], axis=-1)[..., 0]
    return mx.where(slot == top_k, tie_token, cand_token).astype(mx.uint32)


def _log_softmax(x: mx.array) -> mx.array:
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def _as_token_array(tokens: Any) -> mx.array:
    arr = tokens if isinstance(tokens, mx.array) else mx.array(np.asarray(tokens, dtype=np.int64))
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 1:
        raise ValueError(f"tokens must be 1-D (or [1, n]), got shape {tuple(arr.shape)}")
    return arr if arr.dtype == mx.int32 else arr.astype(mx.int32)


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
        config=config,
        penalty_ids=lambda: _ids_in_vocab(np.asarray(history).tolist(), vocab_size),
        history=lambda: history,
        n_new=history.shape[0] - prompt_length,
        eos=_ids_in_vocab(_eos_ids(eos_token_ids), vocab_size),
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


# --------------------------------------------------------------------------------------------
# mlx-lm integration
# --------------------------------------------------------------------------------------------


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
        self._prompt_list: list[int] = np.asarray(_as_token_array(prompt_tokens)).tolist()
        self._prompt = mx.array(self._prompt_list, dtype=mx.int32)
        self._eos_list = _eos_ids(eos_token_ids)
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
        self._prompt_ids = _ids_in_vocab(self._prompt_list, vocab_size)
        self._eos = _ids_in_vocab(self._eos_list, vocab_size)

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        """Apply repetition penalty, no-repeat-ngram and min_new_tokens.

        Args:
            tokens: mlx-lm's token history (1-D).
            logits: ``[1, vocab]`` next-token logits, any float dtype.

        Returns:
            float32 processed logits, ``[1, vocab]``.
        """
        tokens = _as_token_array(tokens)
        if self._first_length is None:
            self._start(tokens)
        n_new = tokens.shape[0] - self._first_length
        if n_new < 0:
            raise ValueError(
                "the token history shrank below the prompt; build a new (sampler, processors) "
                "pair for every generation"
            )
        x = _to_float32(logits)
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

        out = _process(
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
        """The logits the draw is made from (-inf where excluded); the identity for greedy.

        Args:
            logprobs: ``[batch, vocab]`` processed log-probabilities.

        Returns:
            float32 warped logits, same shape.
        """
        x = _to_float32(logprobs)
        return x if self.greedy else _warp(x, **self._params)

    def __call__(self, logprobs: mx.array) -> mx.array:
        """Draw the next token (one per row).

        Args:
            logprobs: ``[batch, vocab]`` (mlx-lm: ``[1, vocab]``) or ``[vocab]`` processed
                log-probabilities.

        Returns:
            uint32 token ids of shape ``logprobs.shape[:-1]``.
        """
        x = _to_float32(logprobs)
        squeeze = x.ndim == 1
        if squeeze:
            x = x[None]
        if self.greedy:
            # do_sample=False: torch.argmax of the processed scores (first index on ties).
            out = mx.argmax(x, axis=-1)
        else:
            key = None
            if self._key is not None:
                self._key, key = mx.random.split(self._key)
            if 0 < self._params["top_k"] < x.shape[-1]:
                out = _sample_top_k(x, key, **self._params)
            else:
                # torch.multinomial(softmax(scores)) == a categorical draw from the warped logits.
                out = mx.random.categorical(_warp(x, **self._params), axis=-1, key=key)
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
