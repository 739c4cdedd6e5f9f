"""Stopping well: Ctrl-C saves at the next step boundary and says how to resume; a second Ctrl-C exits at
once without writing; a non-finite loss or gradient stops the run without touching the last checkpoint."""

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from training_runs import SIGINT, Held, SignalAtStep, cli_args, config, metrics

import mlx_persona.tuner.batching as batching_mod
import mlx_persona.tuner.run as run_mod
import mlx_persona.tuner.trainer as train_mod
from mlx_persona.cli import main
from mlx_persona.tuner import checkpoint as ckpt
from mlx_persona.tuner.batching import shard_batch
from mlx_persona.tuner.run import run
from mlx_persona.tuner.trainer import TrainingError


def test_ctrl_c_saves_at_the_next_step_and_exits_130_with_the_resume_command(tiny_path, small_data, tmp_path,
                                                                            monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(run_mod, "Progress", SignalAtStep(SIGINT, 2))
    result = CliRunner().invoke(main, ["train", *cli_args(tiny_path, small_data, out, save_every=100)])
    assert result.exit_code == 130, result.output
    assert "SIGINT at step 3: checkpoint saved" in result.output
    assert f"mlx-persona train --config {out / 'config.yaml'} --resume" in result.output
    assert "Traceback" not in result.output
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step-00000003"]
    assert max(r["step"] for r in metrics(out)) == 3


def test_second_ctrl_c_exits_at_once_without_writing(tiny_path, small_data, tmp_path):
    """Two SIGINTs to a real process: the first (while it waits after step 1) asks for a save at the end of
    the next step; the second, sent while that save waits after its first file (a test hold point, not a
    race against a pause), exits at once; no checkpoint is completed."""
    out = tmp_path / "run"
    args = cli_args(tiny_path, small_data, out, steps=200, save_every=1000)
    with Held(args, ["step:1", "save:2:weights.safetensors"], tmp_path / "hold") as proc:
        proc.wait("step:1")
        proc.proc.send_signal(SIGINT)
        proc.release()
        proc.wait("save:2:weights.safetensors")  # the save the first Ctrl-C asked for has begun
        assert list((out / "checkpoints").glob(".tmp-step-*"))
        proc.proc.send_signal(SIGINT)
        code, err = proc.finish(timeout=60), proc.output()
    assert code == 130, err
    assert "second interrupt: exiting now without saving" in err
    assert ckpt.list_checkpoints(out / "checkpoints") == []
    assert not (out / "adapters.safetensors").exists()


def _poison_at(calls: int, value: float):
    """A `shard_batch` whose `calls`-th batch has a `value` loss weight (so the step's loss is `value`)."""
    count = {"n": 0}

    def poisoned(*args, **kwargs):
        b = shard_batch(*args, **kwargs)
        count["n"] += 1
        if count["n"] == calls:
            b.weights = b.weights.copy()
            b.weights[0] = value
        return b

    return poisoned


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_path, small_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    value = float("nan")
    monkeypatch.setattr(batching_mod, "shard_batch", _poison_at(4, value))
    cfg = config(tiny_path, small_data, out, save_every=1, keep_checkpoints=1)
    with pytest.raises(TrainingError) as info:
        run(cfg, log=lambda *a: None)
    msg = str(info.value)
    assert f"loss became {value} at step 4" in msg and "step-00000003" in msg and "untouched" in msg
    saved = ckpt.list_checkpoints(out / "checkpoints")
    assert saved[-1].name == "step-00000003" and all(ckpt.verify(p) is None for p in saved)  # (+ the best)
    state = ckpt.load_latest(out / "checkpoints", log=lambda m: None)
    assert state[3]["loop"]["step"] == 3 and all(np.isfinite(np.array(w)).all() for w in state[1].values())
    assert not (out / "adapters.safetensors").exists()
    assert max(r["step"] for r in metrics(out)) == 3
    assert all(np.isfinite(v) for r in metrics(out) for k, v in r.items() if isinstance(v, float))


def test_infinite_gradient_stops_before_the_update(tiny_path, small_data, tmp_path, monkeypatch):
    """A finite loss with an infinite gradient (injected into the gradient reduction) is caught by the norm
    check, through the CLI: a clear message, exit code 1, nothing written."""
    out = tmp_path / "run"
    monkeypatch.setattr(train_mod, "average_gradients", _inf_tree)
    result = CliRunner().invoke(main, ["train", *cli_args(tiny_path, small_data, out, save_every=1)])
    assert result.exit_code == 1, result.output
    assert "gradient norm became inf at step 1" in result.output
    assert "no checkpoint had been written yet" in result.output and "Traceback" not in result.output
    assert ckpt.list_checkpoints(out / "checkpoints") == [] and not (out / "adapters.safetensors").exists()


def _inf_tree(tree):
    from mlx.utils import tree_map

    return tree_map(lambda g: g + mx.array(float("inf"), dtype=g.dtype), tree)
