"""Known answers for batching.py at its edges, written to kill the mutants that the other tests let live
(`make mutate TARGETS=batching`): rounding exactly at a multiple, one-token examples, a batch with no
loss, exactly PAD_LOSS_TO loss tokens, the plan's order and shards, and which example a stand-in copies.
Small hand-made arrays, no model."""

import numpy as np
import pytest

from mlx_persona.tuner.batching import PAD_LEN_TO, PAD_LOSS_TO, _round_up, batch_plan, collate, shard_batch


def _ex(tokens, mask):
    return np.array(tokens, np.int32), np.array(mask, bool)


def test_round_up_known_values():
    assert PAD_LEN_TO == PAD_LOSS_TO == 16
    got = {n: _round_up(n, 16) for n in (0, 1, 2, 14, 15, 16, 17, 31, 32, 33)}
    assert got == {0: 0, 1: 16, 2: 16, 14: 16, 15: 16, 16: 16, 17: 32, 31: 32, 32: 32, 33: 48}
    assert _round_up(5, 4) == 8 and _round_up(8, 4) == 8 and _round_up(9, 3) == 9 and _round_up(10, 3) == 12


def test_collate_small_batch_exactly():
    t0, m0 = _ex([1, 2, 3, 4, 5], [0, 0, 1, 1, 0])
    t1, m1 = _ex([6, 7, 8], [1, 1, 1])  # mask[0] (the first token) is never a target
    b = collate([t0, t1], [m0, m1])
    assert b.inputs.shape == b.targets.shape == (2, 16)
    assert b.inputs.tolist() == [[1, 2, 3, 4] + [0] * 12, [6, 7] + [0] * 14]
    assert b.targets.tolist() == [[2, 3, 4, 5] + [0] * 12, [7, 8] + [0] * 14]
    # Loss where the *target* is masked in: row 0 targets 3 and 4 (columns 1, 2), row 1 targets 7 and 8.
    assert b.positions.tolist() == [1, 2, 16, 17] + [0] * 12
    assert b.weights.tolist() == [1.0] * 4 + [0.0] * 12
    assert (b.n_tokens, b.n_loss) == (6, 4)


def test_collate_lengths_at_the_padding_boundary():
    # 17 tokens -> 16 inputs: exactly one PAD_LEN_TO, not two; 18 tokens -> 17 inputs: two.
    for n_tok, width in ((17, 16), (18, 32), (2, 16)):
        t, m = _ex(list(range(1, n_tok + 1)), [1] * n_tok)
        b = collate([t], [m])
        n = n_tok - 1
        assert b.inputs.shape == (1, width)
        assert b.inputs[0].tolist() == list(range(1, n_tok)) + [0] * (width - n)
        assert b.targets[0].tolist() == list(range(2, n_tok + 1)) + [0] * (width - n)
        # n loss tokens: exactly 16 fit one PAD_LOSS_TO block, 17 need two.
        assert len(b.positions) == len(b.weights) == _round_up(n, 16)
        assert b.positions[:n].tolist() == list(range(n)) and (b.n_tokens, b.n_loss) == (n, n)


def test_collate_without_loss_and_one_token_examples():
    # One-token examples have no input at all; the batch still has one PAD_LEN_TO of width and one
    # PAD_LOSS_TO block of (zero-weight) positions, so a step can run on it.
    b = collate(*zip(_ex([9], [1]), _ex([4], [0])))
    assert b.inputs.shape == b.targets.shape == (2, 16) and not b.inputs.any() and not b.targets.any()
    assert b.positions.tolist() == [0] * 16 and b.weights.tolist() == [0.0] * 16
    assert (b.n_tokens, b.n_loss) == (0, 0)
    # Tokens but the loss off everywhere.
    b = collate(*zip(_ex([3, 4, 5], [0, 0, 0])))
    assert b.inputs[0].tolist() == [3, 4] + [0] * 14 and b.positions.tolist() == [0] * 16
    assert b.weights.tolist() == [0.0] * 16 and (b.n_tokens, b.n_loss) == (2, 0)


def test_batch_plan_sorts_by_length_then_index_and_shards():
    lengths = [5, 3, 5, 1, 3]
    assert batch_plan(lengths, 2) == [[3, 1], [4, 0], [2]]
    assert batch_plan(lengths, 3) == [[3, 1, 4], [0, 2]]
    assert batch_plan(lengths, 1) == [[3], [1], [4], [0], [2]]
    assert batch_plan(lengths, 2, shard=(0, 2)) == [[3], [4], [2]]
    assert batch_plan(lengths, 2, shard=(1, 2)) == [[1], [0], []]
    assert batch_plan(lengths, 3, shard=(1, 3)) == [[1], [2]]
    assert batch_plan(lengths, 3, shard=(2, 3)) == [[4], []]
    assert batch_plan([], 2) == []
    # `shard` is keyword-only (a positional (rank, size) is refused); the first two take keywords too.
    assert batch_plan(lengths=lengths, batch_size=2, shard=(1, 2)) == [[1], [0], []]
    with pytest.raises(TypeError):
        batch_plan(lengths, 2, (1, 2))


def test_shard_batch_slices_and_the_stand_in_copies_the_first_example():
    tokens, masks = zip(_ex([1, 2, 3], [0, 1, 1]), _ex([4, 5, 6, 7], [0, 0, 1, 1]), _ex([8, 9], [1, 1]))
    # Rank 1 of 2 over [2, 0, 1]: examples 0 (position 1 in idx).
    b = shard_batch(list(tokens), list(masks), [2, 0, 1], 1, 2)
    assert b.inputs.tolist() == [[1, 2] + [0] * 14] and b.positions[:b.n_loss].tolist() == [0, 1]
    assert (b.n_tokens, b.n_loss) == (2, 2)
    # Rank 0 of 2 over [2, 0, 1]: examples 2 and 1.
    b = shard_batch(list(tokens), list(masks), [2, 0, 1], 0, 2)
    assert b.inputs.tolist() == [[8] + [0] * 15, [4, 5, 6] + [0] * 13] and (b.n_tokens, b.n_loss) == (4, 3)
    # Rank 2 of 3 over [1, 0]: nothing of its own; the stand-in is idx[0] = example 1, loss off.
    b = shard_batch(list(tokens), list(masks), [1, 0], 2, 3)
    assert b.inputs.tolist() == [[4, 5, 6] + [0] * 13] and b.targets.tolist() == [[5, 6, 7] + [0] * 13]
    assert not b.weights.any() and (b.n_tokens, b.n_loss) == (0, 0)
    # Defaults: one process takes the whole batch.
    b = shard_batch(list(tokens), list(masks), [0, 2])
    assert b.inputs.shape == (2, 16) and (b.n_tokens, b.n_loss) == (3, 3)
