"""Known answers for train.py's small functions, written to kill the mutants that the trainer tests let live
(`make mutate TARGETS=train-math`): the learning-rate schedule step by step (warm-up, cosine decay, the
clamps for short runs), and the validation loss as a token-weighted mean (batches cut by `max_batches`, a
rank's shard, a dataset without loss tokens), each against a hand computation."""

import json
import math
import textwrap
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from mlx import nn
from training_runs import two_process_script

from mlx_persona.models import load_model
from mlx_persona.tuner.config import OptimConfig, TrainConfig
from mlx_persona.tuner.losses import evaluate_loss
from mlx_persona.tuner.trainer import build_schedule, clip_by_global_norm, global_norm


def _lr(lr, warmup, total, ratio, step):
    """The schedule by hand: linear from lr / warmup to lr over `warmup` steps, then cosine to ratio * lr."""
    warmup = min(warmup, max(total - 1, 0))
    if step < warmup:
        return lr / warmup + (lr - lr / warmup) * step / warmup
    decay_steps = max(total - warmup, 1)
    t = min(step - warmup, decay_steps)
    return ratio * lr + (lr - ratio * lr) * 0.5 * (1 + math.cos(math.pi * t / decay_steps))


@pytest.mark.parametrize("warmup, total", [(3, 10), (0, 5), (4, 4), (9, 4), (2, 1), (0, 1), (1, 2)])
def test_schedule_known_values(warmup, total):
    cfg = TrainConfig(optim=OptimConfig(learning_rate=1e-3, warmup_steps=warmup, min_lr_ratio=0.1))
    schedule = build_schedule(cfg.optim, total)
    for step in range(total + 2):
        # float32 schedule arithmetic: measured relative error <= 3.4e-7.
        np.testing.assert_allclose(float(schedule(mx.array(step))), _lr(1e-3, warmup, total, 0.1, step),
                                   rtol=3e-6, err_msg=f"step {step}")


def test_schedule_first_step_and_end():
    cfg = TrainConfig(optim=OptimConfig(learning_rate=2e-3, warmup_steps=4, min_lr_ratio=0.25))
    s = build_schedule(cfg.optim, 12)
    got = [float(s(mx.array(i))) for i in (0, 2, 4, 8, 12, 20)]
    want = [5e-4, 1.25e-3, 2e-3, 2e-3 * (0.25 + 0.75 * 0.5 * (1 + math.cos(math.pi / 2))), 5e-4, 5e-4]
    np.testing.assert_allclose(got, want, rtol=3e-6)


@pytest.fixture(scope="module")
def tiny(tiny_path):
    model, _ = load_model(tiny_path)
    return model


def _dataset():
    rng = np.random.default_rng(7)
    lengths = [9, 4, 12, 6, 4]
    tokens = [rng.integers(3, 2000, size=n).astype(np.int32) for n in lengths]
    masks = [np.array([i >= n // 2 for i in range(n)]) for n in lengths]
    return SimpleNamespace(tokens=tokens, masks=masks)


def _by_hand(model, ds, examples):
    """Sum of per-token losses and their count over `examples`, one example at a time."""
    total, count = 0.0, 0
    for i in examples:
        t, m = ds.tokens[i], ds.masks[i]
        logits = model(mx.array(t[None, :-1]))[0].astype(mx.float32)
        ce = np.array(nn.losses.cross_entropy(logits, mx.array(t[1:])))
        total += float(ce[m[1:]].sum())
        count += int(m[1:].sum())
    return total, count


def test_validation_loss_is_the_token_weighted_mean(tiny):
    ds = _dataset()
    # batch_plan sorts by (length, index): [1, 4], [3, 0], [2] with batch_size 2.
    total, count = _by_hand(tiny, ds, range(5))
    # Measured: relative difference <= 6.2e-8 (batched and padded vs one example at a time).
    np.testing.assert_allclose(evaluate_loss(tiny, ds, 2, 512), total / count, rtol=1e-6)
    first = _by_hand(tiny, ds, [1, 4])
    np.testing.assert_allclose(evaluate_loss(tiny, ds, 2, 512, max_batches=1), first[0] / first[1], rtol=1e-6)
    two = _by_hand(tiny, ds, [1, 4, 3, 0])
    np.testing.assert_allclose(evaluate_loss(tiny, ds, 2, 512, max_batches=2), two[0] / two[1], rtol=1e-6)
    np.testing.assert_allclose(evaluate_loss(tiny, ds, 2, 512, max_batches=0), total / count, rtol=1e-6)


def test_validation_loss_of_a_shard_and_without_loss_tokens(tiny):
    ds = _dataset()
    # Rank 1 of 2 over batches [1, 4], [3, 0], [2]: examples 4 and 0 (and nothing of the last batch).
    # One process: the all-reduce over the singleton group is the identity.
    mine = _by_hand(tiny, ds, [4, 0])
    np.testing.assert_allclose(evaluate_loss(tiny, ds, 2, 512, shard=(1, 2)), mine[0] / mine[1], rtol=1e-6)
    none = SimpleNamespace(tokens=ds.tokens[:2], masks=[np.zeros_like(m) for m in ds.masks[:2]])
    assert evaluate_loss(tiny, none, 2, 512) == 0.0
    # A single loss token: the mean is that token's loss (the count is clamped at 1, not more).
    one = SimpleNamespace(tokens=ds.tokens[:1], masks=[np.array([False] * 8 + [True])])
    total, count = _by_hand(tiny, one, [0])
    assert count == 1
    np.testing.assert_allclose(evaluate_loss(tiny, one, 2, 512), total, rtol=1e-6)


def test_clipping_adds_the_epsilon_to_the_norm():
    # torch's rule scale = max_norm / (norm + 1e-6) matters when the norm is small: norm 5e-6, max 1e-6.
    grads = {"a": mx.array([3e-6, 4e-6]), "b": [mx.array([[0.0]])]}
    norm = global_norm(grads)
    np.testing.assert_allclose(norm.item(), 5e-6, rtol=1e-6)
    clipped = clip_by_global_norm(grads, norm, 1e-6)
    # Measured: relative error <= 1.1e-7 in float32.
    np.testing.assert_allclose(np.array(clipped["a"]), [3e-6 / 6, 4e-6 / 6], rtol=1e-6)
    assert clipped["b"][0].tolist() == [[0.0]]


TWO_RANKS = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    import mlx.core as mx
    from mlx_persona.models import load_model
    from mlx_persona.tuner.losses import evaluate_loss
    from test_train_mutants import _dataset
    group = mx.distributed.init()
    model, _ = load_model(sys.argv[1])
    val = evaluate_loss(model, _dataset(), 2, 512, shard=(group.rank(), group.size()))
    Path(sys.argv[2], f"rank{group.rank()}.json").write_text(json.dumps(val))
""")


def test_validation_loss_over_two_processes_is_the_whole_datasets(tiny, tiny_path, tmp_path):
    """Each rank evaluates its shard; the all-reduce makes both report the loss of the whole dataset."""
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    two_process_script(script, str(tiny_path), str(tmp_path))
    whole = evaluate_loss(tiny, _dataset(), 2, 512)
    for rank in (0, 1):
        # Measured: relative difference <= 6.2e-8 (the sums grouped by rank).
        np.testing.assert_allclose(json.loads((tmp_path / f"rank{rank}.json").read_text()), whole, rtol=1e-6)
