"""Crash-safe checkpoints: SIGKILL at chosen points (after a step, inside a save after each of its files,
after the last checkpoint before the results), each followed by a --resume, ends with the weights and the
metrics of an uninterrupted run; damaged checkpoints are reported and skipped."""

import pytest
from training_runs import Held, bitwise_equal, cli_args, copy_run, metrics, reference_run

from mlx_persona.tuner import checkpoint as ckpt

# Where each process of the chain is killed (mlx_persona.testing's hold points), with save_every=1 and
# keep_checkpoints=2 over 6 steps: the newest complete checkpoint before the kill, where the next --resume
# must start, and the files the interrupted save had written to its temporary folder.
KILLS = [
    ("step:1", 0, None),  # after the first step: nothing saved yet, the resume starts from step 0
    ("save:2:weights.safetensors", 1, ["weights.safetensors"]),
    ("step:3", 2, None),
    ("save:4:optimizer.safetensors", 3, ["optimizer.safetensors", "weights.safetensors"]),
    ("save:5:state.json", 4, ["optimizer.safetensors", "state.json", "weights.safetensors"]),
    ("step:5", 4, None),  # the same step again, now before its save: the leftover of the last kill is there
    ("save:6:manifest.json", 5, ["manifest.json", "optimizer.safetensors", "state.json", "weights.safetensors"]),
    ("results", 6, None),  # the last checkpoint is in place, no result written: the resume only writes them
]


def _rows(out):
    return [(r["step"], r.get("loss"), r.get("grad_norm"), r.get("lr"), r.get("val_loss")) for r in metrics(out)]


def _resumed_at(log: str) -> int:
    if "no checkpoint yet; starting from step 0" in log:
        return 0
    line = next(l for l in log.splitlines() if l.startswith("resuming at step "))
    return int(line.split()[3])


def test_sigkill_at_chosen_points_then_resume_equals_the_uninterrupted_run(tiny_path, small_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    ref = reference_run(tiny_path, small_data, root)
    out = root / "killed"
    args = cli_args(tiny_path, small_data, out, save_every=1, keep_checkpoints=2)
    history = []
    for i, (point, newest, in_save) in enumerate(KILLS + [(None, 6, None)]):
        resume = i > 0
        with Held(args + (["--resume"] if resume else []), [point] if point else [], root / "holds") as run:
            if point is None:
                assert run.finish() == 0, run.output()
            else:
                run.wait(point)
                assert run.kill() == -9
                saved = [p.name for p in ckpt.list_checkpoints(out / "checkpoints")]
                assert (saved[-1] if saved else None) == (f"step-{newest:08d}" if newest else None), (point, saved)
                if in_save:  # killed inside the save of step N: its temporary folder holds what it had written
                    tmp = out / "checkpoints" / f".tmp-step-{int(point.split(':')[1]):08d}"
                    assert sorted(p.name for p in tmp.iterdir()) == in_save, point
                assert not (out / "adapters.safetensors").exists()  # no result before the end
            log = run.output()
        if resume:  # each resume starts from the newest complete checkpoint the kill before it left
            history.append((KILLS[i - 1][0], _resumed_at(log)))
            assert _resumed_at(log) == KILLS[i - 1][1], (history, log)
        # Whatever the moment, every checkpoint that exists under its final name is complete.
        for path in ckpt.list_checkpoints(out / "checkpoints"):
            assert ckpt.verify(path) is None, (path, history)
    print("killed at, resumed from:", history)
    mid_run = [p for p, _, _ in KILLS if p.startswith(("step:", "save:"))]
    assert len(mid_run) >= 3
    assert bitwise_equal(ref / "adapters.safetensors", out / "adapters.safetensors"), history
    # Rows of the killed runs past their checkpoint were dropped; every recomputed step matches the reference.
    assert _rows(out) == _rows(ref)
    assert not list((out / "checkpoints").glob(".tmp-*"))  # leftovers of the killed saves are cleaned up


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
