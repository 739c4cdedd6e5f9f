"""A DPO (and ORPO) step against an SFT step on the same tokens: time and peak memory.

The pairs are made from the shipped conversations (chosen: the reply; rejected: its first quarter). DPO
trains B pairs a step, which is 2B sequences; the SFT run trains the same 2B sequences (each pair's two
conversations as two examples) in batches of 2B, so both steps see the same tokens and the same loss
tokens, and the difference is what preference training adds (the per-sequence sums and the loss; DPO's
reference log-probabilities are computed once before the first step, timed separately). Each run is its
own process (its peak memory is its own). ``mlx_lm_lora``: mlx-lm-lora's DPO on the same pairs and batches
of pairs (it sorts by length and cuts the same way), when it is installed. Protocol: epoch 1 is the warm-up (every batch shape compiled),
the later epochs are timed; medians of s/step.

    python benchmarks/bench_preference.py                          # gemma-3-270m shape, 16 pairs, batch 2
    python benchmarks/bench_preference.py --preset tiny --pairs 8

Writes JSON and a markdown table under benchmarks/out/ and appends the table to benchmarks/RESULTS.md
(--no-results: not).
"""

from __future__ import annotations

import argparse
import importlib.util
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
from benchmarks.bench_train import bench_model
from benchmarks.common import cpu_model, machine_info, write_results


def make_data(n: int, dst: Path) -> tuple[Path, Path]:
    """``pairs.jsonl`` (n pairs) and ``sft.jsonl`` (their 2n conversations), in `dst`."""
    dst.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in (REPO / "data/bluey/train.jsonl").read_text().splitlines() if line.strip()]
    pairs, convs = [], []
    for row in rows[:n]:
        user, reply = row["messages"][0]["content"], row["messages"][1]["content"]
        words = reply.split()
        short = " ".join(words[:max(3, len(words) // 4)])
        pairs.append({"prompt": user, "chosen": reply, "rejected": short})
        convs += [{"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": r}]}
                  for r in (reply, short)]
    (dst / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (dst / "sft.jsonl").write_text("".join(json.dumps(c) + "\n" for c in convs))
    return dst / "pairs.jsonl", dst / "sft.jsonl"


def worker(a) -> dict:
    import mlx_persona.backend

    mlx_persona.backend.setup()  # the Linux speed layer, before mlx loads
    from mlx_persona.tuner.config import load_config
    from mlx_persona.tuner.run import run

    out = Path(a.tmp) / f"out-{a.worker}"
    lines = []
    t0 = time.perf_counter()
    sft = a.worker == "sft"
    cfg = load_config(None, {"model": a.model, "data": a.sft if sft else a.pairs_file, "output": str(out),
                             "overwrite": True, "method": "lora" if sft else a.worker, "lora.rank": a.rank,
                             "batch_size": 2 * a.batch_size if sft else a.batch_size, "steps": a.steps,
                             "log_every": 1, "save_every": 0, "eval_every": 0, "progress": False,
                             "max_seq_len": a.max_seq_len})

    def log(*x):
        lines.append((time.perf_counter() - t0, " ".join(map(str, x))))

    run(cfg, log=log)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    # The reference pass: from its log line to the next (the optimizer set-up is negligible).
    ref = [t for t, text in lines if text.startswith("reference:")]
    return {"sec_per_step": [r["sec_per_step"] for r in rows],
            "tokens": [r["tokens_per_sec"] * r["sec_per_step"] for r in rows],
            "loss_tokens": [r["loss_tokens_per_sec"] * r["sec_per_step"] for r in rows],
            "loss": [r["loss"] for r in rows], "peak_memory_gb": max(r["peak_memory_gb"] for r in rows),
            "margin": [r.get("reward_margin") for r in rows], "log": [text for _, text in lines][:4],
            "reference_logged_at_sec": ref[0] if ref else None}


def worker_mlx_lm_lora(a) -> dict:
    """mlx-lm-lora's DPO (``train_dpo``) on the same model, pairs, batch size and LoRA layers. It computes the
    full logits and runs the reference model every step; its Metal-only wired-memory call is skipped on CPU."""
    import mlx_persona.backend

    mlx_persona.backend.setup()  # the same BLAS and kernel flags for both trainers
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm import load
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm_lora.trainer.datasets import DPODataset
    from mlx_lm_lora.trainer.dpo_trainer import DPOTrainingArgs, train_dpo

    from mlx_persona.tuner.config import DEFAULT_LORA_MODULES

    if "max_recommended_working_set_size" not in mx.device_info():  # the CPU backend has no such limit
        info = mx.device_info
        mx.device_info = lambda: {**info(), "max_recommended_working_set_size": 0}
        mx.set_wired_limit = lambda limit: 0
    rows = []

    class Capture(TrainingCallback):
        def on_train_loss_report(self, info):
            rows.append(info)

    model, tokenizer = load(a.model)
    reference, _ = load(a.model)
    reference.freeze()
    model.freeze()
    keys = sorted({p for layer in model.layers for p, _ in layer.named_modules()
                   if p.split(".")[-1] in DEFAULT_LORA_MODULES})
    linear_to_lora_layers(model, len(model.layers), {"rank": a.rank, "dropout": 0.0, "scale": 2.0, "keys": keys})
    data = DPODataset([json.loads(line) for line in Path(a.pairs_file).read_text().splitlines()], tokenizer)
    args = DPOTrainingArgs(batch_size=a.batch_size, iters=a.steps, steps_per_report=1, steps_per_eval=10**9,
                           steps_per_save=10**9, max_seq_length=a.max_seq_len,
                           adapter_file=str(Path(a.tmp) / "mlx-lm-lora.safetensors"))
    mx.reset_peak_memory()
    train_dpo(model, reference, optim.Adam(learning_rate=1e-5), data, None, args=args, training_callback=Capture())
    return {"sec_per_step": [1.0 / r["iterations_per_second"] for r in rows],
            "tokens": [r["tokens_per_second"] / r["iterations_per_second"] for r in rows],
            "loss_tokens": [float("nan")] * len(rows), "loss": [r["train_loss"] for r in rows],
            "peak_memory_gb": max(r["peak_memory"] for r in rows)}


def run_worker(kind: str, a, tmp: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--model", str(a.model), "--pairs-file", str(a.pairs_file),
           "--sft", str(a.sft), "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--rank", str(a.rank),
           "--max-seq-len", str(a.max_seq_len), "--tmp", str(tmp)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_sec"] = time.perf_counter() - t
    return result


def summarise(r: dict, timed: slice) -> dict:
    secs, toks, lt = r["sec_per_step"][timed], r["tokens"][timed], r["loss_tokens"][timed]
    return {"median_sec_per_step": statistics.median(secs), "tokens_per_sec": sum(toks) / sum(secs),
            "loss_tokens_per_step": sum(lt) / len(lt), "peak_memory_gb": r["peak_memory_gb"],
            "timed_steps": len(secs), "first_loss": r["loss"][0], "last_loss": r["loss"][-1],
            "wall_sec": r["wall_sec"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gemma-3-270m", choices=["tiny", "gemma-3-270m", "gemma-3-1b"])
    p.add_argument("--pairs", type=int, default=16, help="training pairs (one epoch = pairs/batch steps)")
    p.add_argument("--epochs", type=int, default=2, help="the first is warm-up, the rest are timed")
    p.add_argument("--batch-size", type=int, default=2, help="pairs per step (SFT: twice as many sequences)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--methods", default="sft,dpo,orpo,mlx_lm_lora",
                   help="mlx_lm_lora: mlx-lm-lora's DPO (pip install --no-deps mlx-lm-lora), skipped when missing")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "out"))
    p.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md")
    p.add_argument("--worker", choices=["sft", "dpo", "orpo", "mlx_lm_lora"], help=argparse.SUPPRESS)
    for hidden in ("--model", "--pairs-file", "--sft", "--tmp"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker_mlx_lm_lora(a) if a.worker == "mlx_lm_lora" else worker(a)))
        return

    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench_preference."))
    try:
        a.model = bench_model(a.preset)
        n_pairs = a.pairs
        a.pairs_file, a.sft = make_data(n_pairs, tmp / "data")
        per_epoch = n_pairs // a.batch_size
        a.steps = per_epoch * a.epochs
        timed = slice(per_epoch, a.steps)
        methods = a.methods.split(",")
        if "mlx_lm_lora" in methods and importlib.util.find_spec("mlx_lm_lora") is None:
            print("mlx-lm-lora is not installed (pip install --no-deps mlx-lm-lora): left out", file=sys.stderr)
            methods.remove("mlx_lm_lora")
        results = {m: run_worker(m, a, tmp) for m in methods}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = os.getloadavg()
    summary = {m: summarise(r, timed) for m, r in results.items()}
    base = summary.get("sft")
    command = "python benchmarks/bench_preference.py " + " ".join(sys.argv[1:])
    result = {"benchmark": "preference step vs SFT step, same tokens", "command": command.strip(),
              "machine": machine_info(), "preset": a.preset, "pairs": n_pairs, "epochs": a.epochs,
              "batch_pairs": a.batch_size, "rank": a.rank, "dtype": "float32", "results": summary,
              "raw": results}
    title = (f"### Preference training vs SFT ({a.preset}, random weights, fp32, LoRA r{a.rank}, {a.batch_size} "
             f"pairs = {2 * a.batch_size} sequences a step, {n_pairs} pairs, epoch 2 of {a.epochs} timed)")
    table = [title, "",
             "| method | s/step (median) | tokens/s | loss tokens/step | peak memory GB | vs SFT (time, memory) |",
             "|---|---:|---:|---:|---:|---:|"]
    for m, s in summary.items():
        vs = f"{s['median_sec_per_step'] / base['median_sec_per_step']:.2f}x, " \
             f"{s['peak_memory_gb'] / base['peak_memory_gb']:.2f}x" if base else ""
        table.append(f"| {m} | {s['median_sec_per_step']:.3f} | {s['tokens_per_sec']:.0f} | "
                     f"{s['loss_tokens_per_step']:.0f} | {s['peak_memory_gb']:.2f} | {vs} |")
    machine = result["machine"]
    result["load_average"] = {"before": load_before, "after": load_after}
    loads = [" ".join(f"{x:.1f}" for x in load) for load in (load_before, load_after)]
    where = (f"{cpu_model()}, {machine.get('cpu_count')} CPUs ({machine.get('cpu')}); load average (1/5/15 min) "
             f"{loads[0]} before, {loads[1]} after.")
    table += ["", where]
    write_results(Path(a.out), f"bench_preference_{a.preset}", result, "\n".join(table), append=not a.no_results)


if __name__ == "__main__":
    main()
