"""Steps 1-3 of transformers' chain, the logits *processors*: ``repetition_penalty``,
``no_repeat_ngram_size`` and ``min_new_tokens``. They run for greedy decoding and sampling alike.

Vectorised MLX ops on [batch, vocab] float32 logits; no host syncs.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

from mlx_persona.sampling.config import GenerationConfig
from mlx_persona.sampling.inputs import NEG_INF


def apply_repetition_penalty(x: mx.array, ids: mx.array, penalty: float) -> mx.array:
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


def apply_no_repeat_ngram(x: mx.array, history: mx.array, ngram_size: int) -> mx.array:
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
    return _ban(x, ids, mx.where(valid, NEG_INF, 0.0))


def apply_min_new_tokens(x: mx.array, eos: mx.array, n_new: int, min_new_tokens: int) -> mx.array:
    """MinNewTokensLengthLogitsProcessor: every end id in ``eos`` gets -inf while ``n_new`` < ``min_new_tokens``.

    new = len(input_ids) - prompt length, as in transformers. ``n_new`` is a host int (a shape), no sync.
    """
    if n_new < min_new_tokens and eos.size > 0:
        return _ban(x, eos, NEG_INF)
    return x


def apply_processors(
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
        x = apply_repetition_penalty(x, penalty_ids(), float(config.repetition_penalty))
    if config.no_repeat_ngram_size > 0:
        x = apply_no_repeat_ngram(x, history(), int(config.no_repeat_ngram_size))
    return apply_min_new_tokens(x, eos, n_new, int(config.min_new_tokens))

