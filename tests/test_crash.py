"""Crash-safe checkpoints: SIGKILL at random moments (one of them inside a save), then resume, ends with
the weights of an uninterrupted run; damaged checkpoints are reported and skipped."""

import random
import time

import pytest
from training_runs import (
    bitwise_equal,
    cli_args,
    copy_run,
    metrics,
    reference_run,
    train_process,
)

from mlx_persona.tuner import checkpoint as ckpt

SEED = 20261122


def _wait(cond, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            return False  # finished (or failed) before the moment came
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
    return True


def _saving_since(out, t0):
    """Whether a checkpoint save (a temporary folder) has begun since time `t0`."""
    for p in (out / "checkpoints").glob(".tmp-step-*"):
        try:
            if p.stat().st_mtime >= t0:
                return True
        except FileNotFoundError:
            pass
    return False


def _rows(out):
    try:
        return (out / "metrics.jsonl").read_text().count("\n")
    except FileNotFoundError:
        return 0


def test_sigkill_at_random_moments_then_resume_equals_the_uninterrupted_run(tiny_path, small_data,
                                                                            tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    ref = reference_run(tiny_path, small_data, root)
    out = root / "killed"
    rng = random.Random(SEED)
    args = cli_args(tiny_path, small_data, out, save_every=1, keep_checkpoints=2)
    log = []
    # 1: a random moment from launch (usually while loading); 2: inside a save, held open by the test-only
    # pause; 3: a random moment after the next step. Then a last resume runs to the end.
    for moment in ("from-launch", "in-save", "after-a-step", None):
        resume = (out / "config.yaml").exists()
        env = {"MLX_PERSONA_TEST_PAUSE_IN_SAVE": "0.4"} if moment == "in-save" else {}
        t0 = time.time()
        proc = train_process(args + (["--resume"] if resume else ["--overwrite"]), env=env)
        try:
            rows = _rows(out)
            if moment == "from-launch":
                time.sleep(rng.uniform(1.0, 4.0))
            elif moment == "in-save":
                if _wait(lambda: _saving_since(out, t0), proc):
                    time.sleep(rng.uniform(0.0, 1.1))
            elif moment == "after-a-step":
                if _wait(lambda: _rows(out) > rows, proc):
                    time.sleep(rng.uniform(0.0, 1.0))
            if moment:
                proc.kill()
            _, err = proc.communicate(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
        done = [p.name for p in ckpt.list_checkpoints(out / "checkpoints")]
        log.append((moment, proc.returncode, done, sorted(p.name for p in (out / "checkpoints").glob(".tmp-*"))
                    if (out / "checkpoints").exists() else []))
        if moment is None:
            assert proc.returncode == 0, err
        # Whatever the moment, every checkpoint that exists under its final name is complete.
        for path in ckpt.list_checkpoints(out / "checkpoints"):
            assert ckpt.verify(path) is None, (path, log)
    print("kills:", log)
    assert any(r == -9 for _, r, _, _ in log), log
    assert bitwise_equal(ref / "adapters.safetensors", out / "adapters.safetensors"), log
    steps = [r["step"] for r in metrics(out) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6], steps  # rows of the killed runs past their checkpoint were dropped
    assert not list((out / "checkpoints").glob(".tmp-*"))  # leftovers of the killed save are cleaned up


def test_corrupted_or_truncated_checkpoints_are_reported_and_skipped(tiny_path, small_data, tmp_path_factory,
                                                                     tmp_path):
    ref = reference_run(tiny_path, small_data, tmp_path_factory.mktemp("crash"))
    root = copy_run(ref, tmp_path / "run") / "checkpoints"
    names = [p.name for p in ckpt.list_checkpoints(root)]
    assert names == ["step-00000002", "step-00000004", "step-00000006"]
    # Same size, one byte flipped: only the checksum can tell.
    opt = root / "step-00000006" / "optimizer.safetensors"
    data = bytearray(opt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    opt.write_bytes(bytes(data))
    # Truncated.
    w = root / "step-00000004" / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:10])
    # An interrupted save (no manifest) with a higher step.
    copy_run(root / "step-00000002", root / "step-00000008")
    (root / "step-00000008" / "manifest.json").unlink()
    lines = []
    path, weights, opt_state, state = ckpt.load_latest(root, log=lines.append)
    assert path.name == "step-00000002" and state["loop"]["step"] == 2
    assert len(lines) == 3
    assert "step-00000008" in lines[0] and "no manifest" in lines[0]
    assert "step-00000006" in lines[1] and "optimizer.safetensors checksum mismatch (corrupted)" in lines[1]
    assert "step-00000004" in lines[2] and "weights.safetensors has 10 bytes" in lines[2] and "truncated" in lines[2]
    (root / "step-00000002" / "manifest.json").write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match="every checkpoint is damaged"):
        ckpt.load_latest(root, log=lines.append)


def test_prune_keeps_the_last_n_and_the_best(tmp_path):
    import mlx.core as mx

    root = tmp_path / "checkpoints"
    for step in range(1, 7):
        ckpt.save_checkpoint(root, step, {"w": mx.array([float(step)])}, {"step": mx.array(step)}, {"loop": {}})
        ckpt.prune(root, keep_last=2, keep_steps={2})
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-00000002", "step-00000005", "step-00000006"]
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000005", "step-00000006"]
