"""Length-grouped batches with loss positions, deterministic from (seed, epoch).

Examples are sorted by length and cut into batches of similar length, so there is no padding to a
fixed length; each epoch shuffles the *order of batches* with a generator seeded by (seed, epoch).
The order is a pure function of those two numbers, which is what makes resuming exact: a checkpoint
only needs the epoch and the index of the next batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAD_LEN_TO = 16  # pad sequence length up to a multiple of this (bounds recompilation of the step)
PAD_LOSS_TO = 16  # pad the number of loss positions likewise (each one costs a 262k-wide head row)


@dataclass
class Batch:
    inputs: np.ndarray  # [B, L] int32
    targets: np.ndarray  # [B, L] int32
    positions: np.ndarray  # [N] int32 flat indices into B*L where the loss is on (padded)
    weights: np.ndarray  # [N] float32: 1 real, 0 padding
    n_tokens: int  # real (unpadded) input tokens
    n_loss: int  # real loss tokens
    extra: tuple = ()  # more arrays the loss takes after `denom` (preference pairs: their references)


def _round_up(n: int, m: int) -> int:
    return ((n + m - 1) // m) * m


def batch_plan(lengths: list[int], batch_size: int, *, shard: tuple[int, int] = (0, 1)) -> list[list[int]]:
    """Groups example indices into batches of similar length (sorted, then cut).

    With `shard=(rank, size)`, each batch of `batch_size` is the global batch and this returns the
    rank's slice of it (examples rank, rank+size, ...), so that `size` processes together see exactly
    the batches a single process would.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    rank, size = shard
    return [order[i:i + batch_size][rank::size] for i in range(0, len(order), batch_size)]


def shard_batch(tokens: list[np.ndarray], masks: list[np.ndarray], idx: list[int], rank: int = 0,
                size: int = 1) -> Batch:
    """Collates this process's slice (examples rank, rank+size, ...) of the global batch `idx`.

    A global batch with fewer examples than processes (the last, short batch of an epoch) leaves
    some ranks nothing. They get a stand-in, the batch's first example with the loss off everywhere,
    so that every rank still runs the step and joins the gradient all-reduce, adding exactly zero.
    """
    mine = idx[rank::size]
    if mine:
        return collate([tokens[i] for i in mine], [masks[i] for i in mine])
    stand_in = collate([tokens[idx[0]]], [np.zeros_like(masks[idx[0]])])
    stand_in.n_tokens = 0
    return stand_in


def epoch_order(n_batches: int, seed: int, epoch: int) -> list[int]:
    """The order in which batches are visited in `epoch`."""
    rng = np.random.default_rng([seed, epoch])
    return rng.permutation(n_batches).tolist()


def collate(tokens: list[np.ndarray], masks: list[np.ndarray]) -> Batch:
    """Pads a list of examples into one batch; loss positions come from the masks.

    The mask marks tokens that are *predicted* with loss; target t is input t+1, so the loss at input
    position t is on when mask[t + 1] is.
    """
    b = len(tokens)
    max_len = max(len(t) for t in tokens) - 1
    seq = _round_up(max(max_len, 1), PAD_LEN_TO)
    inputs = np.zeros((b, seq), np.int32)
    targets = np.zeros((b, seq), np.int32)
    on = np.zeros((b, seq), bool)
    n_tokens = 0
    for i, (t, m) in enumerate(zip(tokens, masks)):
        n = len(t) - 1
        inputs[i, :n] = t[:-1]
        targets[i, :n] = t[1:]
        on[i, :n] = m[1:]
        n_tokens += n
    flat = np.flatnonzero(on.reshape(-1)).astype(np.int32)
    n_loss = len(flat)
    padded = _round_up(max(n_loss, 1), PAD_LOSS_TO)
    positions = np.zeros(padded, np.int32)
    positions[:n_loss] = flat
    weights = np.zeros(padded, np.float32)
    weights[:n_loss] = 1.0
    return Batch(inputs, targets, positions, weights, n_tokens, n_loss)


@dataclass
class MicroBatch:
    """One global batch of training, as one rank sees it.

    Attributes:
        batch: this rank's slice, collated.
        indices: the example indices of the whole global batch.
        global_loss_tokens: what the loss of the whole global batch (every rank's part) is averaged over:
            its loss tokens, or for preference pairs (:mod:`mlx_persona.tuner.preference`) its pairs.
        next: ``(epoch, batch)``: the position after this batch (what a checkpoint saves).
    """

    batch: Batch
    indices: list[int]
    global_loss_tokens: int
    next: tuple[int, int]


def iterate_batches(dataset, batch_size: int, seed: int, *, start: tuple[int, int] = (0, 0),
                    shard: tuple[int, int] = (0, 1)):
    """The training batches in the order the trainer visits them, forever, from position `start`.

    Length-grouped global batches (:func:`batch_plan`), visited in :func:`epoch_order` of each epoch;
    each rank gets its slice (:func:`shard_batch`). A pure function of (dataset, batch_size, seed,
    start), which is what makes resuming exact and lets a benchmark give another framework the same
    batches.

    Args:
        dataset: ``data.EncodedDataset`` (``tokens`` and ``masks``), or a data set with a
            ``batching(rank, size)`` method returning ``(lengths, units, shard)``: each example's length,
            what its loss is averaged over, and ``shard(indices) -> Batch`` for this rank's slice.
        batch_size: examples per global batch.
        seed: the run's seed (the epoch order is drawn from ``(seed, epoch)``).
        start: ``(epoch, batch)`` to start from.
        shard: ``(rank, size)`` of a data-parallel run.

    Yields:
        :class:`MicroBatch`.
    """
    rank, size = shard
    if hasattr(dataset, "batching"):
        lengths, units, take = dataset.batching(rank, size)
    else:
        lengths, units = [len(t) for t in dataset.tokens], [int(m[1:].sum()) for m in dataset.masks]
        take = lambda idx: shard_batch(dataset.tokens, dataset.masks, idx, rank, size)
    plan = batch_plan(lengths, batch_size)
    epoch, j = start
    while True:
        order = epoch_order(len(plan), seed, epoch)
        while j < len(order):
            idx = plan[order[j]]
            j += 1
            nxt = (epoch, j) if j < len(order) else (epoch + 1, 0)
            yield MicroBatch(take(idx), idx, sum(units[i] for i in idx), nxt)
        epoch, j = epoch + 1, 0
