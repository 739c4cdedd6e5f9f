"""Data-parallel training: tokens/s with 1 process vs N processes (``mlx.launch``, ring backend, localhost).

Every run trains the same model on the same data with the same *global* batch, so the runs do the same
work and (up to float summation order) compute the same weights; N processes split each global batch
and average gradients. The cores are shared fairly: each process gets ``cpu_count // N`` BLAS threads.
Protocol: each run is two epochs; the first is the warm-up (it compiles every batch shape) and the
second is timed from rank 0's per-step times in ``metrics.jsonl`` (a step there includes waiting for
the gradient all-reduce). Several trials per process count; medians are reported. The final adapters
of the N-process runs are compared with the 1-process run.

    python benchmarks/bench_distributed.py                          # builtin tiny, 1 vs 2 processes
    python benchmarks/bench_distributed.py --preset gemma-3-270m --examples 16 --trials 1

Writes JSON and a markdown table under benchmarks/out/ and appends the table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.bench_train import bench_model, make_data  # noqa: E402
from benchmarks.common import free_ports, machine_info, write_results  # noqa: E402


def run(n: int, a, data: Path, out: Path) -> dict:
    """One training run with `n` processes; returns rank 0's timed numbers."""
    train = [sys.executable, "-m", "mlx_persona.train", "--model", str(a.model), "--data", str(data),
             "-o", str(out), "--overwrite", "--steps", str(a.steps), "--batch-size", str(a.batch_size),
             "--rank", str(a.rank), "--max-seq-len", str(a.max_seq_len), "--no-progress",
             "--set", "log_every=1", "--set", "eval_every=0", "--set", f"save_every={a.steps}",
             "--set", "lora.dropout=0.0"]
    threads = str(max((os.cpu_count() or 1) // n, 1))
    env = {**os.environ, "OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads}
    if n == 1:
        cmd = train
    else:
        launch = Path(sys.executable).parent / "mlx.launch"
        cmd = [str(launch), "-n", str(n), "--backend", "ring", "--starting-port", str(free_ports(n)), "--", *train]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    wall = time.perf_counter() - t
    # mlx.launch exits 0 even when a rank fails; it warns instead.
    if proc.returncode != 0 or "exited with code" in proc.stderr or not (out / "summary.json").exists():
        raise SystemExit(f"{n} process(es) failed:\n{proc.stderr[-4000:]}")
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "loss" in r and r["step"] > a.steps_per_epoch]
    secs = [r["sec_per_step"] for r in timed]
    tokens = [r["tokens_per_sec"] * r["sec_per_step"] for r in timed]
    return {"tokens_per_sec": sum(tokens) / sum(secs), "median_sec_per_step": statistics.median(secs),
            "timed_steps": len(timed), "wall_sec": wall, "final_loss": rows[-1].get("loss"),
            "blas_threads_per_process": int(threads)}


def max_rel_diff(a: Path, b: Path) -> float:
    import mlx_persona.backend

    mlx_persona.backend.setup()  # the Linux speed layer, before mlx loads
    import mlx.core as mx

    wa, wb = mx.load(str(a)), mx.load(str(b))
    return max((mx.abs(wa[k] - wb[k]).max() / mx.maximum(mx.abs(wa[k]).max(), 1e-12)).item() for k in wa)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=["tiny", "gemma-3-270m", "gemma-3-1b"])
    p.add_argument("--examples", type=int, default=32, help="training examples (one epoch = examples/batch steps)")
    p.add_argument("--batch-size", type=int, default=8, help="the global batch")
    p.add_argument("--processes", default="1,2", help="comma-separated process counts; 1 is the baseline")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "out"))
    a = p.parse_args()
    counts = [int(x) for x in a.processes.split(",")]
    if 1 not in counts:
        counts = [1, *counts]
    a.steps_per_epoch = a.examples // a.batch_size
    a.steps = 2 * a.steps_per_epoch

    tmp = Path(tempfile.mkdtemp(prefix="bench_distributed."))
    results: dict[int, list[dict]] = {n: [] for n in counts}
    diffs: dict[int, float] = {}
    try:
        a.model = bench_model(a.preset) if a.preset != "tiny" else "builtin:tiny"
        data = make_data(a.examples, tmp / "data")
        (data / "valid.jsonl").unlink()  # no evaluation in the timing
        for trial in range(a.trials):
            for n in counts:  # interleaved, so that a change in machine load hits every count alike
                out = tmp / f"run-{n}-{trial}"
                results[n].append(run(n, a, data, out))
                if n != 1 and trial == 0:
                    diffs[n] = max_rel_diff(tmp / "run-1-0" / "adapters.safetensors", out / "adapters.safetensors")
                print(f"trial {trial + 1}/{a.trials}, {n} process(es): "
                      f"{results[n][-1]['tokens_per_sec']:.0f} tokens/s", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    summary = {n: {"tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in rs),
                   "median_sec_per_step": statistics.median(r["median_sec_per_step"] for r in rs),
                   "blas_threads_per_process": rs[0]["blas_threads_per_process"], "trials": rs}
               for n, rs in results.items()}
    base = summary[1]["tokens_per_sec"]
    command = "python benchmarks/bench_distributed.py " + " ".join(sys.argv[1:])
    result = {"benchmark": "data-parallel training, 1 vs N processes (mlx.launch, ring, localhost)",
              "command": command.strip(), "machine": machine_info(), "preset": a.preset, "examples": a.examples,
              "global_batch": a.batch_size, "rank": a.rank, "steps": a.steps, "timed_steps": a.steps_per_epoch,
              "processes": {str(n): s for n, s in summary.items()},
              "speedup": {str(n): summary[n]["tokens_per_sec"] / base for n in counts},
              "adapters_max_rel_diff_vs_1": {str(n): d for n, d in diffs.items()}}
    table = [
        f"### Data-parallel training ({a.preset}, LoRA r{a.rank}, global batch {a.batch_size}, {a.examples} examples, "
        f"epoch 2 of 2 timed, median of {a.trials} trial(s), {os.cpu_count()} CPUs shared)",
        "",
        "| processes | BLAS threads each | tokens/s | s/step (median) | speed-up | adapters vs 1 process (max rel diff) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for n in counts:
        s = summary[n]
        diff = f"{diffs[n]:.1e}" if n in diffs else "—"
        table.append(f"| {n} | {s['blas_threads_per_process']} | {s['tokens_per_sec']:.0f} | "
                     f"{s['median_sec_per_step']:.3f} | {s['tokens_per_sec'] / base:.2f}x | {diff} |")
    md = "\n".join(table)
    write_results(Path(a.out), f"bench_distributed_{a.preset}", result, md)


if __name__ == "__main__":
    main()
