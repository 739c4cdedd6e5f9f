"""Data-parallel training with mx.distributed: two local processes over the ring backend compute what one
process computes for the same global batch, and only rank 0 writes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from benchmarks.common import free_ports
from mlx_persona.tuner import checkpoint as ckpt
from mlx_persona.tuner.run import run
from training_runs import REPO, bitwise_equal, cli_args, config, metrics, pairs_folder, reference_run

LAUNCH = Path(sys.executable).parent / "mlx.launch"
# Dropout off: the two runs draw different random numbers. 9 examples in batches of 4 make global batches of
# 4, 4 and 1: the last leaves rank 1 with nothing (it joins with a zero-loss stand-in), the others split 2/2.
# optim.eps 1e-4 instead of 1e-8: two processes add a batch's two halves in another order than one process
# (~1e-7 apart), and MLX's AdamW (no bias correction) turns that into a large change of the update of any
# weight whose gradient is within a few orders of eps: with eps 1e-8 the adapters were already 1e-3 apart
# (relative) after step 1 while the gradient norms agreed to 2e-7, and 5e-3 apart after 4 steps, which moved
# the step-4 gradient norm by 1.2e-3 (AMD EPYC, 2026-12-01). With eps 1e-4 the same runs agree to 4e-7 in
# every loss and gradient norm, the step with the stand-in included, and to 3.6e-5 in the adapters.
DIST = {"steps": 4, "lora.dropout": 0.0, "eval_every": 2, "optim.eps": 1e-4}


@pytest.fixture(scope="module")
def nine(small_data, tmp_path_factory):
    data = tmp_path_factory.mktemp("nine")
    lines = (small_data / "train.jsonl").read_text().splitlines()[:9]
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    shutil.copy(small_data / "valid.jsonl", data / "valid.jsonl")
    return data


def _launch(args: list[str], timeout: int = 300, python=("-m", "mlx_persona.train")) -> subprocess.CompletedProcess:
    """`mlx.launch -n 2 --backend ring -- python -m mlx_persona.train ARGS` (or `python PYTHON... ARGS`) on
    localhost."""
    cmd = [str(LAUNCH), "-n", "2", "--backend", "ring", "--starting-port", str(free_ports(2)), "--",
           sys.executable, *python, *args]
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}  # one BLAS thread per process: they share the cores
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)
    # mlx.launch exits 0 even when a rank fails; it prints a warning naming the rank instead.
    assert proc.returncode == 0 and "exited with code" not in proc.stderr and "was killed" not in proc.stderr, \
        proc.stderr[-3000:]
    return proc


def _rel(a: mx.array, b: mx.array) -> float:
    return (mx.abs(a - b).max() / mx.maximum(mx.abs(b).max(), 1e-12)).item()


@pytest.mark.skipif(not LAUNCH.exists(), reason="mlx.launch is not installed next to this Python")
def test_two_ring_processes_match_one_process(tiny_path, nine, tmp_path_factory):
    _two_match_one(tiny_path, nine, tmp_path_factory.mktemp("dist"), DIST, ("loss", "val_loss", "grad_norm"), 1e-5)


@pytest.mark.skipif(not LAUNCH.exists(), reason="mlx.launch is not installed next to this Python")
def test_two_ring_processes_match_one_process_for_dpo(tiny_path, nine, tmp_path_factory):
    """DPO: the last global batch of 1 pair leaves rank 1 a stand-in pair with every weight 0; the loss is the
    mean over the global batch's pairs, and the rewards (summed over ranks) are those of one process.

    Looser than SFT (1e-4 relative, rewards 2e-5 absolute): a pair's loss and rewards are beta times a
    difference of log-probability sums in the hundreds, whose float32 rounding (~3e-5) moves with the
    summation order; measured: rewards 2.7e-6 apart, the step-4 loss 1.2e-5 relative."""
    pairs = pairs_folder(nine, tmp_path_factory.mktemp("nine-pairs"))
    _two_match_one(tiny_path, pairs, tmp_path_factory.mktemp("dist-dpo"), {**DIST, "method": "dpo"},
                   ("loss", "val_loss", "grad_norm", "reward_margin", "reward_chosen", "logp_rejected"), 1e-4)


def _two_match_one(tiny_path, data, root, changes, keys, rel):
    ref = reference_run(tiny_path, data, root, **changes)
    out = root / "two"
    proc = _launch(cli_args(tiny_path, data, out, **changes), timeout=600)
    assert (out / "summary.json").exists(), proc.stderr[-3000:]
    one, two = json.loads((ref / "summary.json").read_text()), json.loads((out / "summary.json").read_text())
    assert two["steps"] == one["steps"] == 4
    assert two["tokens"] == one["tokens"] and two["loss_tokens"] == one["loss_tokens"]  # every example, once

    m1, m2 = metrics(ref), metrics(out)
    assert [(r["step"], "loss" in r) for r in m1] == [(r["step"], "loss" in r) for r in m2]
    for r1, r2 in zip(m1, m2):
        for key in keys:
            if key in r1:
                # SFT: measured <= 4.4e-7 relative
                assert r2[key] == pytest.approx(r1[key], rel=rel, abs=2e-5 if "reward" in key else 0), (key, r1, r2)
    w1, w2 = mx.load(str(ref / "adapters.safetensors")), mx.load(str(out / "adapters.safetensors"))
    assert sorted(w1) == sorted(w2)
    worst = max(_rel(w2[k], w1[k]) for k in w1)
    print(f"2 processes vs 1: adapters max relative diff {worst:.2e}")
    assert worst <= 3e-4  # measured 3.6e-5
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())


def test_rank_other_than_0_writes_nothing(tiny_path, nine, tmp_path, monkeypatch):
    """The same run as rank 1 (of a stand-in group of one, so no collectives): nothing is created,
    including on resume."""

    class Rank1:
        def rank(self):
            return 1

        def size(self):
            return 1

    monkeypatch.setattr(mx.distributed, "init", lambda *a, **k: Rank1())
    out = tmp_path / "out"
    cfg = config(tiny_path, nine, out, steps=2, save_every=1, eval_every=1)
    lines = []
    summary = run(cfg, log=lines.append)
    assert summary["steps"] == 2 and lines == []  # rank != 0 does not log either
    assert not out.exists()
    run(cfg, resume=True, log=lines.append)
    assert not out.exists()


def test_broadcast_of_a_checkpoint_is_exact_for_one_process(tmp_path):
    """`checkpoint.broadcast` in a group of one returns what it was given (the all_sum with zeros is exact)."""
    w = {"a": mx.array([1.5, -2.25]), "b": mx.ones((2, 3), mx.bfloat16)}
    opt = {"step": mx.array(7, mx.uint64), "learning_rate": mx.array(1e-3), "a": {"m": mx.array([0.1, 0.2])}}
    found = (tmp_path / "step-00000007", w, opt, {"loop": {"step": 7}, "rng": [1, 2]})
    path, w2, opt2, state = ckpt.broadcast(found, w, opt)
    assert path == found[0] and state == found[3]
    assert all(mx.array_equal(w[k], w2[k]) and w[k].dtype == w2[k].dtype for k in w)
    assert opt2["step"].item() == 7 and opt2["step"].dtype == mx.uint64
    assert mx.array_equal(opt2["a"]["m"], opt["a"]["m"])
    assert ckpt.broadcast(None, w, opt) is None


# Both runs in one launch: each rank process starts once (importing mlx-lm and transformers is most of a
# rank's time here), trains the full run, then rank 0 cuts a copy back to its step-2 checkpoint and both
# resume it, as `mlx-persona train --resume` does. train() builds everything afresh from the config and the
# checkpoint, so what the first run left in the process cannot stand in for what the checkpoint restores.
TWICE = r"""
import shutil, sys
from pathlib import Path
import mlx.core as mx
from mlx_persona.cli import main
full, cut, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
args = sys.argv[4:4 + n]
main(["train", *args, "-o", str(full)], standalone_mode=False)
group = mx.distributed.init()
if group.rank() == 0:
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step-00000004")
    (cut / "adapters.safetensors").unlink()
mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))  # the copy is there for every rank
main(["train", *args, "-o", str(cut), "--resume"], standalone_mode=False)
"""


@pytest.mark.skipif(not LAUNCH.exists(), reason="mlx.launch is not installed next to this Python")
def test_two_process_resume_is_exact(tiny_path, nine, tmp_path):
    """With dropout on: every rank seeds the same key and draws as often, so rank 0's saved key is every
    rank's; rank 0 reads the checkpoint and broadcasts it."""
    changes = {**DIST, "lora.dropout": 0.1, "save_every": 2}
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = cli_args(tiny_path, nine, tmp_path / "unused", **changes)
    i = args.index("-o")
    args = args[:i] + args[i + 2:]
    proc = _launch([str(full), str(cut), str(len(args)), *args], python=["-c", TWICE])
    assert "resuming at step 2" in proc.stdout + proc.stderr, proc.stdout[-3000:]
    assert bitwise_equal(full / "adapters.safetensors", cut / "adapters.safetensors")
    assert [(r["step"], r.get("loss")) for r in metrics(cut)] == [(r["step"], r.get("loss")) for r in metrics(full)]
