"""Steps 4-7 of transformers' chain, the logits *warpers*: ``temperature``, ``top_k``, ``top_p``
and ``min_p``, in that order. They run only when sampling (``temperature > 0``).

:func:`warp` applies them over the whole vocabulary; :func:`sample_top_k` draws from exactly the
distribution :func:`warp` defines without masking the vocabulary (the fast path for top-k).
"""

from __future__ import annotations

import math

import mlx.core as mx

from mlx_persona.sampling.inputs import NEG_INF

BLOCK = 64  # entries per block in the first pass of _top_k_candidates


def _top_k_indices(x: mx.array, k: int) -> mx.array:
    """Indices of k largest entries of each row (unordered; which of several entries tied with the k-th).

    ``argpartition`` is O(vocab) but costs ~10 ns an entry on the CPU, 2.8 ms a row at Gemma's 262,144-token
    vocabulary. So a first pass takes the maximum of every block of ``BLOCK`` entries, and argpartition runs
    over the k blocks with the largest maxima only (k * 64 entries): 0.15 ms. Exact: with v the k-th largest
    value, fewer than k entries exceed v, so fewer than k blocks have a maximum above v and all of them are
    taken, with every entry above v; the other blocks taken have a maximum >= v, one entry each at least, so
    the blocks taken hold at least k entries >= v. Their k largest values are the row's.
    """
    vocab = x.shape[-1]
    if vocab % BLOCK or 4 * k * BLOCK > vocab:  # small vocabularies: one argpartition is cheap
        return mx.argpartition(-x, kth=k - 1, axis=-1)[..., :k]
    lead = x.shape[:-1]
    blocks = x.reshape(*lead, vocab // BLOCK, BLOCK)
    top_blocks = mx.argpartition(-blocks.max(axis=-1), kth=k - 1, axis=-1)[..., :k]
    inside = mx.take_along_axis(blocks, top_blocks[..., None], axis=-2).reshape(*lead, k * BLOCK)
    local = mx.argpartition(-inside, kth=k - 1, axis=-1)[..., :k]
    return mx.take_along_axis(top_blocks, local // BLOCK, axis=-1) * BLOCK + local % BLOCK


def _top_k_candidates(x: mx.array, k: int) -> tuple[mx.array, mx.array, mx.array]:
    """Indices and values of the k largest entries (unordered) and the k-th largest value.

    O(vocab), unlike the full sort a naive top-k/top-p needs (:func:`_top_k_indices`).
    """
    idx = _top_k_indices(x, k)
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


def warp(x: mx.array, *, temperature: float, top_k: int, top_p: float, min_p: float) -> mx.array:
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
        x = mx.where(x < threshold, NEG_INF, x)
    if min_p > 0.0:
        # MinPLogitsWarper: remove probs < min_p * max_prob <=> x - max(x) < log(min_p). It runs
        # after temperature (so the threshold sees scaled logits); the max always survives, so
        # min_tokens_to_keep = 1 needs nothing extra.
        x = mx.where(x - mx.max(x, axis=-1, keepdims=True) < math.log(min_p), NEG_INF, x)
    return x


def sample_top_k(
    x: mx.array, key: mx.array | None, *, temperature: float, top_k: int, top_p: float, min_p: float
) -> mx.array:
    """Draw from exactly the distribution ``warp`` defines, when 0 < top_k < vocab.

    Instead of masking the vocabulary and drawing a Gumbel variate per vocabulary entry, draw
    among k + 1 slots: one per top-k candidate above the k-th value, and one for the whole group
    of tokens tied with the k-th value (weight = group size * its probability; ties are common
    with bf16 logits and transformers keeps all of them). If the tie slot wins, a uniform member
    of the group is picked. The only vocabulary-wide work is the argpartition, a comparison and
    a cumulative count.

    Args:
        x: float32 [batch, vocab] processed logits or log-probabilities, as for :func:`warp`.
        key: a PRNG key, or None for MLX's global generator.
        temperature, top_k, top_p, min_p: as for :func:`warp`, with 0 < top_k < vocab.

    Returns:
        uint32 [batch] token ids.
    """
    if temperature != 1.0:
        x = x / temperature  # before top-k, as transformers orders it
    idx, _, kth = _top_k_candidates(x, top_k)
    # argpartition returns the candidates in an order that follows their values, so logits that differ in
    # the last bit (a batched matmul against an unbatched one) can permute them, and a seeded draw would then
    # pick another token from the same distribution. In token-id order the draw depends on the distribution
    # and the key alone.
    idx = mx.sort(idx, axis=-1)
    cand = mx.take_along_axis(x, idx, axis=-1)
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
            mx.where(keep & ~cand_tie, cand, NEG_INF),
            mx.where(tie_keep, kth + mx.log(n_ties.astype(mx.float32)), NEG_INF),
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

