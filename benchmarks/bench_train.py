"""mlx_persona's trainer against mlx-lm's own (`mlx_lm lora`), on the same work, in one run.

Same model folder (random weights of a real Gemma 3 shape, fp32), same data subset, batch size, LoRA
rank, adapted modules and layers, same number of steps. Both trainers sort examples by length and cut
batches the same way, so over a whole epoch they process exactly the same batches. Protocol: epoch 1
is the warm-up (it compiles every batch shape), epoch 2 is timed. Each trainer runs in its own process
so that peak memory is its own.

    python benchmarks/bench_train.py                       # gemma-3-270m shape, 32 examples, 2 epochs
    python benchmarks/bench_train.py --preset tiny --examples 16

Writes JSON and a markdown table under benchmarks/out/ and appends the table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import machine_info, write_results  # noqa: E402


def make_data(n: int, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    lines = [l for l in (REPO / "data/bluey/train.jsonl").read_text().splitlines() if l.strip()][:n]
    (dst / "train.jsonl").write_text("\n".join(lines) + "\n")
    valid = [l for l in (REPO / "data/bluey/valid.jsonl").read_text().splitlines() if l.strip()][:4]
    (dst / "valid.jsonl").write_text("\n".join(valid) + "\n")
    return dst


def bench_model(preset: str) -> Path:
    import mlx_persona.backend

    mlx_persona.backend.setup()  # the Linux speed layer, before mlx loads
    from mlx_persona.models import init_model
    from mlx_persona.paths import cache_dir

    path = cache_dir() / "bench" / f"{preset}-fp32"
    if not (path / "config.json").exists():
        init_model(path, preset, dtype="float32", overwrite=True)
    return path


# ------------------------------------------------------------------------------------------ workers
def worker_mlx_persona(a) -> dict:
    import mlx_persona.backend

    mlx_persona.backend.setup()  # the Linux speed layer, before mlx loads
    from mlx_persona.tuner.config import load_config
    from mlx_persona.tuner.run import run

    out = Path(a.tmp) / "persona-out"
    (Path(a.data) / "valid.jsonl").rename(Path(a.data) / "valid.hold")  # no evaluation in the timing
    try:
        cfg = load_config(None, {"model": a.model, "data": a.data, "output": str(out), "overwrite": True,
                                 "method": "lora", "lora.rank": a.rank, "lora.num_layers": -1,
                                 "batch_size": a.batch_size, "steps": a.steps, "log_every": 1,
                                 "save_every": 0, "eval_every": 0, "progress": False, "max_seq_len": a.max_seq_len,
                                 "grad_checkpoint": a.grad_checkpoint})
        run(cfg, log=lambda *x: None)
    finally:
        (Path(a.data) / "valid.hold").rename(Path(a.data) / "valid.jsonl")
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    return {"sec_per_step": [r["sec_per_step"] for r in rows],
            "tokens": [r["tokens_per_sec"] * r["sec_per_step"] for r in rows],
            "loss_tokens": [r["loss_tokens_per_sec"] * r["sec_per_step"] for r in rows],
            "loss": [r["loss"] for r in rows], "peak_memory_gb": max(r["peak_memory_gb"] for r in rows)}


def worker_mlx_lm(a) -> dict:
    import mlx_persona.backend

    mlx_persona.backend.setup()  # before mlx loads: the same BLAS and kernel flags for both trainers
    import types

    import mlx.core as mx
    import numpy as np
    from mlx_lm import load
    from mlx_lm import lora as mlx_lora
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.datasets import load_dataset

    rows = []

    class Capture(TrainingCallback):
        def on_train_loss_report(self, info):
            rows.append(info)

    parser = mlx_lora.build_parser()
    args = parser.parse_args(["--model", a.model, "--train", "--data", a.data, "--batch-size", str(a.batch_size),
                              "--iters", str(a.steps), "--steps-per-report", "1", "--steps-per-eval", "100000",
                              "--val-batches", "1", "--num-layers", "-1", "--max-seq-length", str(a.max_seq_len),
                              "--adapter-path", str(Path(a.tmp) / "mlxlm-out"), "--save-every", "100000"]
                             + (["--grad-checkpoint"] if a.grad_checkpoint else []))
    for k, v in mlx_lora.CONFIG_DEFAULTS.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.lora_parameters = {"rank": a.rank, "dropout": 0.0, "scale": 2.0}
    args = types.SimpleNamespace(**vars(args))
    # What `mlx_lm lora --train` runs (mlx_lora.run), with our callback attached: run() itself drops
    # the callback it is given in 0.32.
    np.random.seed(args.seed)
    model, tokenizer = load(args.model, tokenizer_config={"trust_remote_code": False})
    train_set, valid_set, _ = load_dataset(args, tokenizer)
    mx.reset_peak_memory()
    mlx_lora.train_model(args, model, train_set, valid_set, Capture())
    return {"sec_per_step": [1.0 / r["iterations_per_second"] for r in rows],
            "tokens": [r["tokens_per_second"] / r["iterations_per_second"] for r in rows],
            "loss": [r["train_loss"] for r in rows], "peak_memory_gb": max(r["peak_memory"] for r in rows)}


# ------------------------------------------------------------------------------------------ driver
def run_worker(kind: str, a, tmp: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--model", str(a.model), "--data", str(a.data),
           "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--rank", str(a.rank),
           "--max-seq-len", str(a.max_seq_len), "--tmp", str(tmp)] + (["--grad-checkpoint"] if a.grad_checkpoint else [])
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_sec"] = time.perf_counter() - t
    return result


def summarise(r: dict, timed: slice, loss_tokens_per_step: list[float] | None) -> dict:
    secs = r["sec_per_step"][timed]
    toks = r["tokens"][timed]
    lt = (r.get("loss_tokens") or loss_tokens_per_step)[timed]
    return {"median_sec_per_step": statistics.median(secs), "tokens_per_sec": sum(toks) / sum(secs),
            "loss_tokens_per_sec": sum(lt) / sum(secs), "peak_memory_gb": r["peak_memory_gb"],
            "first_loss": r["loss"][0], "last_loss": r["loss"][-1], "timed_steps": len(secs)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gemma-3-270m", choices=["tiny", "gemma-3-270m", "gemma-3-1b"])
    p.add_argument("--examples", type=int, default=32, help="training examples (one epoch = examples/batch steps)")
    p.add_argument("--epochs", type=int, default=2, help="the first is warm-up, the rest are timed")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--grad-checkpoint", action="store_true")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "out"))
    p.add_argument("--worker", choices=["mlx_persona", "mlx_lm"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        fn = worker_mlx_persona if a.worker == "mlx_persona" else worker_mlx_lm
        print(json.dumps(fn(a)))
        return

    tmp = Path(tempfile.mkdtemp(prefix="bench_train."))
    try:
        a.model = bench_model(a.preset)
        a.data = make_data(a.examples, tmp / "data")
        per_epoch = a.examples // a.batch_size
        a.steps = per_epoch * a.epochs
        timed = slice(per_epoch, a.steps)
        ours = run_worker("mlx_persona", a, tmp)
        theirs = run_worker("mlx_lm", a, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # Over a whole epoch both process the same batches: their loss tokens are ours.
    ours_s = summarise(ours, timed, None)
    theirs_s = summarise(theirs, timed, ours["loss_tokens"])
    ratios = {"tokens_per_sec": ours_s["tokens_per_sec"] / theirs_s["tokens_per_sec"],
              "loss_tokens_per_sec": ours_s["loss_tokens_per_sec"] / theirs_s["loss_tokens_per_sec"],
              "peak_memory": ours_s["peak_memory_gb"] / theirs_s["peak_memory_gb"]}
    command = "python benchmarks/bench_train.py " + " ".join(sys.argv[1:])
    result = {"benchmark": "train: mlx_persona vs mlx-lm lora", "command": command.strip(),
              "machine": machine_info(), "preset": a.preset, "examples": a.examples, "epochs": a.epochs,
              "batch_size": a.batch_size, "rank": a.rank, "modules": "all 7 linear", "layers": "all",
              "dtype": "float32", "mlx_persona": ours_s, "mlx_lm": theirs_s, "ratios": ratios,
              "targets": {"tokens_per_sec": ">= 1.3", "peak_memory": "<= 0.6"}}
    table = [
        f"### Training: mlx_persona vs mlx-lm ({a.preset}, random weights, fp32, LoRA r{a.rank} all layers, "
        f"batch {a.batch_size}, {a.examples} examples, epoch 2 of {a.epochs} timed)",
        "",
        "| trainer | tokens/s (all) | loss tokens/s | s/step (median) | peak memory GB | first loss |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, s in (("mlx_persona", ours_s), ("mlx-lm lora", theirs_s)):
        table.append(f"| {name} | {s['tokens_per_sec']:.0f} | {s['loss_tokens_per_sec']:.0f} | "
                     f"{s['median_sec_per_step']:.3f} | {s['peak_memory_gb']:.2f} | {s['first_loss']:.4f} |")
    table.append(f"| **ratio** | **{ratios['tokens_per_sec']:.2f}x** | **{ratios['loss_tokens_per_sec']:.2f}x** | | "
                 f"**{ratios['peak_memory']:.2f}x** | |")
    md = "\n".join(table)
    write_results(Path(a.out), f"bench_train_{a.preset}", result, md)


if __name__ == "__main__":
    main()
