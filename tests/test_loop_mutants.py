"""Known answers for the training loop itself (`tuner.trainer.train`), written to kill the mutants that the
trainer, golden-loss and resume tests let live (`make mutate TARGETS=train-loop`): which checkpoints a run
leaves (the last step when `save_every` does not divide it, the best one past `keep_checkpoints`, none from a
rank other than 0, the step an early stop ends at), the exit code of a rank stopped by another rank's Ctrl-C, the loss of a step with a single loss token, and the step a non-finite loss or gradient
is reported at, the step times, the loop position after an accumulated step, and a step without loss
tokens."""

import json
import textwrap
import time
from types import SimpleNamespace

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx import nn
from training_runs import two_process_script

from mlx_persona.models import load_model
from mlx_persona.tuner import checkpoint as ckpt
from mlx_persona.tuner import trainer
from mlx_persona.tuner.batching import MicroBatch, collate
from mlx_persona.tuner.losses import loss_fn
from mlx_persona.tuner.trainer import TrainingArgs, TrainingError, new_loop_state, train


def _dataset(n=6):
    rng = np.random.default_rng(3)
    tokens = [rng.integers(3, 2000, size=8 + i).astype(np.int32) for i in range(n)]
    masks = [np.array([j >= 4 for j in range(len(t))]) for t in tokens]
    return SimpleNamespace(tokens=tokens, masks=masks)


def _fit(tiny_path, args, *, loop=None, loss=loss_fn, iterate_batches=None, steps=None):
    model, _ = load_model(tiny_path)
    steps = steps if steps is not None else []
    callback = trainer.TrainingCallback()
    callback.on_step = steps.append
    extra = {"iterate_batches": iterate_batches} if iterate_batches else {}
    final = train(model, optim.SGD(learning_rate=1e-3), _dataset(), None, args, loss=loss, callback=callback,
                  loop=loop, **extra)
    return final, steps


def _saved(root):
    return [int(p.name[len(ckpt.PREFIX):]) for p in ckpt.list_checkpoints(root)]


def test_the_last_step_is_saved_when_save_every_does_not_divide_it(tiny_path, tmp_path):
    _fit(tiny_path, TrainingArgs(total_steps=3, batch_size=2, save_every=2, checkpoint_dir=tmp_path))
    assert _saved(tmp_path) == [2, 3]


def test_the_best_checkpoint_outlives_keep_checkpoints(tiny_path, tmp_path):
    first, _ = _fit(tiny_path, TrainingArgs(total_steps=1, batch_size=2, save_every=1, checkpoint_dir=tmp_path))
    # Step 1 is the best validation so far; no later evaluation (no valid set) can replace it.
    loop = {**first, "best_step": 1, "best_val": 0.5}
    _fit(tiny_path, TrainingArgs(total_steps=4, batch_size=2, save_every=1, keep_checkpoints=1,
                                 checkpoint_dir=tmp_path), loop=loop)
    assert _saved(tmp_path) == [1, 4]


def test_a_rank_other_than_0_writes_no_checkpoint(tiny_path, tmp_path, monkeypatch):
    # The rank is the only thing changed: one process that calls itself rank 1 of a world of one.
    world = SimpleNamespace(rank=lambda: 1, size=lambda: 1)
    monkeypatch.setattr(trainer.mx.distributed, "init", lambda *a, **k: world)
    _fit(tiny_path, TrainingArgs(total_steps=2, batch_size=2, save_every=1, checkpoint_dir=tmp_path))
    assert _saved(tmp_path) == []


def test_a_step_with_one_loss_token_has_that_tokens_loss(tiny_path):
    tokens = np.array([5, 17, 29, 41], dtype=np.int32)
    mask = np.array([False, False, True, False])  # one loss token: 29, predicted from position 1
    batch = collate([tokens], [mask])
    assert batch.n_loss == 1

    def one_token_batches(dataset, batch_size, seed, start=(0, 0), shard=(0, 1)):
        while True:
            yield MicroBatch(batch, [0], 1, (0, 0))

    model, _ = load_model(tiny_path)
    logits = model(mx.array(tokens[None, :-1]))[0].astype(mx.float32)
    want = nn.losses.cross_entropy(logits[1], mx.array(29)).item()
    _, steps = _fit(tiny_path, TrainingArgs(total_steps=1, batch_size=1), iterate_batches=one_token_batches)
    # Measured: relative difference 1.3e-7, also with MLX_PERSONA_SGEMM=0 MLX_PERSONA_JIT=0 (the loss's
    # chunked log-sum-exp against cross_entropy); the mutant that clamps the count at 2 halves it.
    np.testing.assert_allclose(steps[0]["loss"], want, rtol=1e-5)


def _nan_loss(model, *args, chunk):
    value, n = loss_fn(model, *args, chunk=chunk)
    return value * mx.array(float("nan")), n


def _nan_gradient_loss(model, *args, chunk):
    # A finite loss (sqrt(0) = 0) whose gradient is not: d sqrt(x)/dx at 0 is inf, times 0 is nan.
    value, n = loss_fn(model, *args, chunk=chunk)
    return value + mx.sqrt(0.0 * model.model.norm.weight.sum()), n


@pytest.mark.parametrize("loss, what", [(_nan_loss, "the loss"), (_nan_gradient_loss, "the gradient norm")])
def test_a_non_finite_step_is_reported_at_its_step(tiny_path, tmp_path, loss, what):
    loop = {**new_loop_state(), "step": 2}  # continuing a run: the failing step is the third
    with pytest.raises(TrainingError) as err:
        _fit(tiny_path, TrainingArgs(total_steps=5, batch_size=2, checkpoint_dir=tmp_path), loop=loop, loss=loss)
    assert f"{what} became nan at step 3;" in str(err.value)
    assert _saved(tmp_path) == []


TWO_RANKS = textwrap.dedent("""
    import json, os, signal, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_persona.models import load_model
    from mlx_persona.tuner.trainer import Interrupted, TrainingArgs, TrainingCallback, train
    from test_loop_mutants import _dataset
    rank = mx.distributed.init().rank()

    losses = []

    class SignalRank1(TrainingCallback):
        def on_step(self, info):  # rank 1 asks to stop after step 1, as a Ctrl-C on its terminal would
            losses.append(info["loss"])
            if rank == 1 and info["step"] == 1:
                os.kill(os.getpid(), signal.SIGINT)

    model, _ = load_model(sys.argv[1])
    args = TrainingArgs(total_steps=5, batch_size=2)
    try:
        train(model, optim.SGD(learning_rate=1e-3), _dataset(), None, args, callback=SignalRank1())
        got = {"stopped": None}
    except Interrupted as e:
        got = {"stopped": str(e), "exit_code": e.exit_code}
    got["losses"] = losses
    Path(sys.argv[2], f"rank{rank}.json").write_text(json.dumps(got))
""")


def test_a_stop_requested_on_another_rank_stops_this_one_with_143(tiny_path, tmp_path):
    """Rank 1 gets Ctrl-C after step 1: both ranks stop after step 2 (the flag travels in that step's
    all-reduce); rank 1 exits 130 (its SIGINT), rank 0, which saw no signal, 143 (a termination request).
    Until then both log the losses one process logs."""

    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    two_process_script(script, str(tiny_path), str(tmp_path))
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert got[1]["exit_code"] == 130 and got[1]["stopped"].startswith("SIGINT at step 2")
    assert got[0]["exit_code"] == 143
    assert got[0]["stopped"].startswith("a stop request on another process at step 2")
    # Every rank logs the loss of the whole global batch: that of one process with the same batch size.
    _, steps = _fit(tiny_path, TrainingArgs(total_steps=2, batch_size=2))
    for rank in (0, 1):
        # Measured: relative difference 1.2e-7 (each rank sums its half; the halves are then added).
        np.testing.assert_allclose(got[rank]["losses"], [s["loss"] for s in steps], rtol=1e-5)


def test_the_loop_settings_are_keyword_only(tiny_path):
    model, _ = load_model(tiny_path)
    with pytest.raises(TypeError):
        train(model, optim.SGD(learning_rate=1e-3), _dataset(), None, TrainingArgs(total_steps=1), loss_fn)


def test_an_early_stop_saves_the_step_it_stopped_at(tiny_path, tmp_path):
    # No evaluation can beat a best loss of -1: patience 1 stops the run after its first evaluation (step 1),
    # which save_every 0 would not otherwise save.
    loop = {**new_loop_state(), "best_val": -1.0, "best_step": 0}
    model, _ = load_model(tiny_path)
    args = TrainingArgs(total_steps=5, batch_size=2, eval_every=1, early_stopping_patience=1, save_every=0,
                        checkpoint_dir=tmp_path)
    final = train(model, optim.SGD(learning_rate=1e-3), _dataset(), _dataset(3), args, loop=loop)
    assert final["step"] == 1 and final["stop_reason"].startswith("early stopping")
    assert _saved(tmp_path) == [1]


def test_step_seconds_are_spans_of_the_run(tiny_path):
    """Each step's `seconds` and the run's `train_time` are elapsed times inside the call (not sums of clock
    readings): positive, and together no longer than the call itself."""
    tic = time.perf_counter()
    final, steps = _fit(tiny_path, TrainingArgs(total_steps=3, batch_size=2))
    wall = time.perf_counter() - tic
    assert all(s["seconds"] > 0 for s in steps)
    assert sum(s["seconds"] for s in steps) == pytest.approx(final["train_time"])
    assert final["train_time"] <= wall


def test_an_accumulated_step_saves_the_position_after_its_last_micro_batch(tiny_path):
    # 6 examples in batches of 2: 3 batches an epoch; one step of 2 micro-batches ends before the third.
    final, steps = _fit(tiny_path, TrainingArgs(total_steps=1, batch_size=2, grad_accumulation=2))
    assert (final["epoch"], final["batch"]) == (0, 2)
    assert len(steps[0]["batches"]) == 2


def test_a_step_without_loss_tokens_has_loss_zero(tiny_path):
    # E.g. a batch whose replies were all cut by truncation: nothing to learn, not a 0/0.
    tokens = np.array([5, 17, 29, 41], dtype=np.int32)
    batch = collate([tokens], [np.zeros(4, dtype=bool)])
    assert batch.n_loss == 0

    def empty_batches(dataset, batch_size, seed, start=(0, 0), shard=(0, 1)):
        while True:
            yield MicroBatch(batch, [0], 0, (0, 0))

    final, steps = _fit(tiny_path, TrainingArgs(total_steps=2, batch_size=1), iterate_batches=empty_batches)
    assert final["step"] == 2 and [s["loss"] for s in steps] == [0.0, 0.0]
    assert [s["grad_norm"] for s in steps] == [0.0, 0.0]
