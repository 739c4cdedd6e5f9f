"""The original recipe as a baseline: HF-Trainer full fine-tune against mlx_persona's default LoRA recipe.

The original experiment fine-tuned every weight with ``transformers.Trainer`` in fp32, every example
rendered with the chat template and padded to 512 tokens, gradient checkpointing on, batch 4, 5 epochs
over data/bluey (149 conversations: 38 steps per epoch, 190 steps). What we do not know of it we take
from transformers' defaults (and say so in the output): AdamW, learning rate 5e-5 with linear decay and
no warm-up, gradient clipping at 1.0, and the loss on every non-padding token
(``DataCollatorForLanguageModeling(mlm=False)``). mlx_persona's default recipe is
``configs/bluey-270m-pt.yaml``: LoRA r16/alpha 32/dropout 0.05 on the 7 linear layers of every block,
length-grouped batches of 4 without padding to a fixed length, loss on assistant turns, 5 epochs.

Two measurements:

1. **tiny, to the end.** Both recipes train the built-in tiny model for all 5 epochs; every
   ``--eval-every`` steps both are scored with the *same* metric (mean cross-entropy over the assistant
   tokens of data/bluey/valid.jsonl, which is what mlx_persona reports as val_loss). Evaluation time is
   left out of training time. With random weights the two recipes need not reach the same loss, so we
   report (a) the time mlx_persona takes to reach the original's final validation loss (or that it
   does not), and (b) time-to-target for both at the lowest loss both reach (the higher of the two
   best validation losses).
2. **gemma-3-270m shape, extrapolated.** 5 epochs at that shape take hours on 2 CPU cores, so a few
   steps of each are timed and the full run is extrapolated (clearly labelled): the original's steps all
   have the same shape (4 x 512), so its time is steps x the median step; mlx_persona's step time is fit
   as a + b * tokens over timed (post-compile) steps of the shortest, a median and the longest batches, summed
   over the 190 real batches, plus the measured one-time compile cost per distinct batch shape.

Peak memory is the worker process's max RSS (getrusage ru_maxrss) for both, plus mx.get_peak_memory()
for MLX.

    python benchmarks/bench_recipe.py                          # tiny to the end + 270m extrapolated
    python benchmarks/bench_recipe.py --skip-extrapolate       # tiny only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.bench_mlx_vs_torch import (  # noqa: E402
    _link,
    bench_model,
    chart,
    load_avg,
    max_rss_gb,
    model_shape,
    run_worker,
    run_workers,
    torch_device,
    train_flops,
)
from benchmarks.common import machine_info, write_json, write_results  # noqa: E402

DATA = REPO / "data" / "bluey"
RECIPE = REPO / "configs" / "bluey-270m-pt.yaml"
ORIGINAL = {"method": "full fine-tune (every weight, tied embedding included)", "framework": "transformers.Trainer",
            "dtype": "float32", "pad_to": 512, "gradient_checkpointing": True, "batch_size": 4, "epochs": 5,
            "learning_rate": 5e-5, "lr_schedule": "linear, no warm-up (Trainer default)",
            "optimizer": "AdamW (Trainer default adamw_torch_fused), weight decay 0", "max_grad_norm": 1.0,
            "loss": "every non-padding token (DataCollatorForLanguageModeling mlm=False)"}


# ------------------------------------------------------------------------------------------ data
def prepare(model_path: Path, data: Path, tmp: Path, batch_size: int) -> dict:
    """Rendered training texts for the original recipe and validation batches for the shared metric."""
    import numpy as np
    from mlx_lm.utils import load_tokenizer

    from mlx_persona import data as data_mod
    from mlx_persona.tuner.batching import batch_plan, collate

    tok = load_tokenizer(model_path)
    train_ex, valid_ex = data_mod.load_splits(data, system_ok=data_mod.template_supports_system(tok))
    texts = [data_mod.render(tok, ex) for ex in train_ex]
    lengths = [len(tok._tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    out = {"texts": texts, "token_lengths": lengths, "valid": None}
    if valid_ex:
        ds = data_mod.prepare_dataset(tok, valid_ex, 512, "truncate")
        arrays = {}
        plan = batch_plan([len(t) for t in ds.tokens], batch_size)
        for j, idx in enumerate(plan):
            b = collate([ds.tokens[i] for i in idx], [ds.masks[i] for i in idx])
            arrays[f"{j}_inputs"], arrays[f"{j}_targets"] = b.inputs, b.targets
            arrays[f"{j}_positions"] = b.positions[:b.n_loss]
        np.savez(tmp / "valid.npz", **arrays)
        out["valid"] = {"path": str(tmp / "valid.npz"), "batches": len(plan)}
    return out


def persona_plan(model_path: Path, data: Path, cfg) -> list[dict]:
    """Every step of an mlx_persona run over `data` (tokens, input shape) as train() will batch it."""
    from mlx_lm.utils import load_tokenizer

    from mlx_persona import data as data_mod
    from mlx_persona.tuner.batching import batch_plan, collate

    tok = load_tokenizer(model_path)
    train_ex, _ = data_mod.load_splits(data, system_ok=data_mod.template_supports_system(tok))
    ds = data_mod.prepare_dataset(tok, train_ex, cfg.max_seq_len, cfg.on_long)
    plan = batch_plan([len(t) for t in ds.tokens], cfg.batch_size)
    steps = []
    for idx in plan:
        b = collate([ds.tokens[i] for i in idx], [ds.masks[i] for i in idx])
        steps.append({"tokens": b.n_tokens, "loss_tokens": b.n_loss, "shape": [*b.inputs.shape, len(b.positions)],
                      "lengths": [len(ds.tokens[i]) - 1 for i in idx], "idx": idx})
    return steps


# ------------------------------------------------------------------------------------------ workers
def worker_original(job: dict) -> dict:
    """transformers.Trainer, full fine-tune, as the original experiment ran it."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    torch.set_num_threads(os.cpu_count())
    device = torch_device()
    tok = AutoTokenizer.from_pretrained(job["model"])
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    enc = tok(job["texts"], padding="max_length", max_length=512, truncation=True, add_special_tokens=False)
    train_set = [{"input_ids": i, "attention_mask": m} for i, m in zip(enc["input_ids"], enc["attention_mask"])]
    valid = np.load(job["valid"]["path"]) if job.get("valid") else None

    def val_loss():
        total, count = 0.0, 0
        model.eval()
        with torch.no_grad():
            for j in range(job["valid"]["batches"]):
                x = torch.from_numpy(valid[f"{j}_inputs"]).long().to(model.device)
                pos = torch.from_numpy(valid[f"{j}_positions"]).long().to(model.device)
                tgt = torch.from_numpy(valid[f"{j}_targets"]).long().to(model.device).view(-1)[pos]
                h = model.model(input_ids=x).last_hidden_state
                logits = model.lm_head(h.reshape(-1, h.shape[-1])[pos]).float()
                total += F.cross_entropy(logits, tgt, reduction="sum").item()
                count += len(pos)
        model.train()
        return total / max(count, 1)

    log = {"step_sec": [], "loss": [], "evals": [], "eval_sec": 0.0}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            log["step_sec"].append(time.perf_counter() - self.t)
            if valid is not None and job["eval_every"] and (state.global_step % job["eval_every"] == 0
                                                            or state.global_step == state.max_steps):
                t = time.perf_counter()
                log["evals"].append({"step": state.global_step, "train_sec": sum(log["step_sec"]),
                                     "val_loss": val_loss()})
                log["eval_sec"] += time.perf_counter() - t

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                log["loss"].append(logs["loss"])

    args = TrainingArguments(
        output_dir=str(Path(job["tmp"]) / "original-out"), per_device_train_batch_size=4,
        num_train_epochs=job["epochs"], max_steps=job.get("max_steps") or -1, learning_rate=ORIGINAL["learning_rate"],
        gradient_checkpointing=True, logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[],
        disable_tqdm=True, use_cpu=(device == "cpu"), bf16=False, fp16=False, seed=job["seed"],
        dataloader_drop_last=False)
    trainer = Trainer(model=model, args=args, train_dataset=train_set,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False), callbacks=[Clock()])
    if valid is not None and job["eval_every"]:
        t = time.perf_counter()
        log["evals"].append({"step": 0, "train_sec": 0.0, "val_loss": val_loss()})
        log["eval_sec"] += time.perf_counter() - t
    t, cpu = time.perf_counter(), time.process_time()
    trainer.train()
    wall = time.perf_counter() - t
    cpu_share = (time.process_time() - cpu) / wall / os.cpu_count()
    return {**log, "train_wall_sec": wall, "cpu_share": cpu_share, "max_rss_gb": max_rss_gb(), "device": device,
            "torch_threads": torch.get_num_threads(), "steps": len(log["step_sec"])}


def worker_persona(job: dict) -> dict:
    """mlx_persona.tuner.run.run with the default LoRA recipe (configs/bluey-270m-pt.yaml) on another model."""
    import mlx_persona.backend

    mlx_persona.backend.setup()  # the Linux speed layer, before mlx loads
    import mlx.core as mx

    from mlx_persona.tuner.config import load_config
    from mlx_persona.tuner.run import run

    out = Path(job["tmp"]) / f"persona-out-{job['tag']}"
    cfg = load_config(job["config"], {"model": job["model"], "data": job["data"], "output": str(out),
                                      "overwrite": True, "progress": False, "log_every": 1, "save_every": 0,
                                      **job["overrides"]})
    if job.get("eval_at_start"):
        # Step-0 validation loss with the same function train() uses (not part of the timing).
        from mlx_persona import data as data_mod
        from mlx_persona.models import load_model
        from mlx_persona.tuner.adapters import attach_adapters
        from mlx_persona.tuner.losses import evaluate_loss

        model, tok = load_model(cfg.model, dtype=cfg.dtype)
        _, valid_ex = data_mod.load_splits(cfg.data, system_ok=data_mod.template_supports_system(tok))
        attach_adapters(model, cfg.method, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.modules,
                        cfg.lora.num_layers)
        model.eval()
        val0 = evaluate_loss(model, data_mod.prepare_dataset(tok, valid_ex, cfg.max_seq_len, cfg.on_long),
                             cfg.batch_size, cfg.loss_chunk)
        del model
    t, cpu = time.perf_counter(), time.process_time()
    summary = run(cfg, log=lambda *a, **k: None)
    wall = time.perf_counter() - t
    cpu_share = (time.process_time() - cpu) / wall / os.cpu_count()
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    cum, evals = {}, []
    total = 0.0
    for r in steps:
        total += r["sec_per_step"]
        cum[r["step"]] = total
    if job.get("eval_at_start"):
        evals.append({"step": 0, "train_sec": 0.0, "val_loss": val0})
    evals += [{"step": r["step"], "train_sec": cum[r["step"]], "val_loss": r["val_loss"]} for r in rows
              if "val_loss" in r]
    return {"step_sec": [r["sec_per_step"] for r in steps], "tokens": [r["tokens_per_sec"] * r["sec_per_step"]
                                                                        for r in steps],
            "loss": [r["loss"] for r in steps], "evals": evals, "train_wall_sec": wall, "cpu_share": cpu_share,
            "peak_memory_gb_mlx": summary["peak_memory_gb"], "max_rss_gb": max_rss_gb(),
            "device": str(mx.default_device()), "steps": len(steps),
            "trainable_parameters": summary["trainable_parameters"]}


WORKERS = {"original": worker_original, "persona": worker_persona}


# ------------------------------------------------------------------------------------------ driver
def time_to(evals: list[dict], target: float) -> float | None:
    for e in evals:
        if e["val_loss"] <= target + 1e-9:
            return e["train_sec"]
    return None


def run_tiny(a, tmp: Path) -> dict:
    model = bench_model("tiny")
    prep = prepare(model, DATA, tmp, 4)
    print("recipe: tiny, original (transformers.Trainer), then mlx_persona's default LoRA recipe ...", file=sys.stderr)
    overrides = {"epochs": a.epochs, "eval_every": a.eval_every}
    if a.max_steps:
        overrides["steps"] = a.max_steps
    orig, ours = run_workers([
        ("original", {"model": str(model), "texts": prep["texts"], "valid": prep["valid"], "epochs": a.epochs,
                      "eval_every": a.eval_every, "seed": 42, "tmp": str(tmp), "tag": "tiny", "max_steps": a.max_steps}),
        ("persona", {"model": str(model), "data": str(DATA), "config": str(RECIPE), "tmp": str(tmp), "tag": "tiny",
                     "overrides": overrides, "eval_at_start": True})], tmp, __file__, parallel=a.quick)
    o_final, p_final = orig["evals"][-1]["val_loss"], ours["evals"][-1]["val_loss"]
    o_best, p_best = min(e["val_loss"] for e in orig["evals"]), min(e["val_loss"] for e in ours["evals"])
    common = max(o_best, p_best)
    o_train, p_train = sum(orig["step_sec"]), sum(ours["step_sec"])
    res = {
        "original": {"steps": orig["steps"], "train_sec": o_train, "train_wall_sec": orig["train_wall_sec"],
                     "eval_sec": orig["eval_sec"], "final_val_loss": o_final, "best_val_loss": o_best,
                     "max_rss_gb": orig["max_rss_gb"], "evals": orig["evals"], "device": orig["device"],
                     "time_to_common_target_sec": time_to(orig["evals"], common), "cpu_share": orig["cpu_share"],
                     "load_avg": [orig["load_avg_before"], orig["load_avg_after"]]},
        "mlx_persona": {"steps": ours["steps"], "train_sec": p_train, "train_wall_sec": ours["train_wall_sec"],
                        "final_val_loss": p_final, "best_val_loss": p_best, "max_rss_gb": ours["max_rss_gb"],
                        "peak_memory_gb_mlx": ours["peak_memory_gb_mlx"], "evals": ours["evals"],
                        "device": ours["device"], "time_to_common_target_sec": time_to(ours["evals"], common),
                        "time_to_original_final_sec": time_to(ours["evals"], o_final), "cpu_share": ours["cpu_share"],
                        "load_avg": [ours["load_avg_before"], ours["load_avg_after"]]},
        "common_target_val_loss": common, "original_final_val_loss": o_final,
    }
    tt_o, tt_p = res["original"]["time_to_common_target_sec"], res["mlx_persona"]["time_to_common_target_sec"]
    res["ratios"] = {"train_time_to_finish": o_train / p_train,
                     "time_to_common_target": (tt_o / tt_p) if tt_o and tt_p else None,
                     "peak_rss": orig["max_rss_gb"] / ours["max_rss_gb"]}
    return res


def run_extrapolated(a, tmp: Path) -> dict:
    """A few timed steps of each recipe at `a.preset`, extrapolated to 5 epochs over data/bluey."""
    import numpy as np

    from mlx_persona.tuner.config import load_config

    model = bench_model(a.preset)
    shape = model_shape(model)
    cfg = load_config(str(RECIPE), {"model": str(model)})
    plan = persona_plan(model, DATA, cfg)
    n_examples = sum(len(s["idx"]) for s in plan)
    steps_per_epoch = math.ceil(n_examples / 4)
    total_steps = a.epochs * steps_per_epoch

    # The original: every batch is 4 x 512; time a few steps after one warm-up step.
    prep = prepare(model, DATA, tmp, 4)
    print(f"recipe: {a.preset}, original (transformers.Trainer), {a.original_steps} steps ...", file=sys.stderr)
    orig = run_worker("original", {"model": str(model), "texts": prep["texts"][:4 * a.original_steps], "valid": None,
                                   "epochs": 1, "eval_every": 0, "seed": 42, "tmp": str(tmp), "tag": a.preset,
                                   "max_steps": a.original_steps}, tmp, __file__)
    o_step = statistics.median(orig["step_sec"][1:])
    last = n_examples - 4 * (steps_per_epoch - 1)  # the last batch of each epoch is smaller
    o_total = a.epochs * ((steps_per_epoch - 1) * o_step + o_step * last / 4)

    # mlx_persona: the shortest, the median and the two longest batches (the last holds the remainder),
    # 3 epochs (the first compiles each shape). Each pick is a run of consecutive examples in length
    # order, so the subset is cut into exactly these batches again.
    picks = sorted({0, len(plan) // 2, len(plan) - 2, len(plan) - 1})
    rows = [l for l in (DATA / "train.jsonl").read_text().splitlines() if l.strip()]
    if n_examples != len(rows):
        raise SystemExit(f"{DATA}: {len(rows) - n_examples} examples dropped; the subset would not line up")
    sub = tmp / "persona-subset"
    sub.mkdir()
    (sub / "train.jsonl").write_text("".join(rows[i] + "\n" for j in picks for i in plan[j]["idx"]))
    print(f"recipe: {a.preset}, mlx_persona default LoRA recipe, {3 * len(picks)} steps ...", file=sys.stderr)
    ours = run_worker("persona", {"model": str(model), "data": str(sub), "config": str(RECIPE), "tmp": str(tmp),
                                  "tag": a.preset, "overrides": {"steps": 3 * len(picks), "eval_every": 0}},
                      tmp, __file__)
    k = len(picks)
    first, later = ours["step_sec"][:k], ours["step_sec"][k:]
    toks = ours["tokens"][k:]
    b, a0 = np.polyfit(toks, later, 1)
    by_tokens = {}
    for t_, s_ in zip(ours["tokens"], ours["step_sec"]):
        by_tokens.setdefault(int(t_), []).append(s_)
    # First step of a shape minus its later ones; noise can make it negative, and it cannot be.
    compile_cost = max(0.0, statistics.mean(v[0] - statistics.median(v[1:]) for v in by_tokens.values()
                                            if len(v) > 1))
    distinct = len({tuple(s["shape"]) for s in plan})
    p_steady = a.epochs * sum(a0 + b * s["tokens"] for s in plan)
    p_total = p_steady + distinct * compile_cost
    # Model FLOPs per epoch of each recipe (see bench_mlx_vs_torch.TRAIN_FLOPS_FORMULA).
    f_ours = sum(train_flops(shape, s["lengths"], s["loss_tokens"], s["shape"][1], s["shape"][2], "lora", 16)["model"]
                 for s in plan)
    real_tokens = [min(n, 512) for n in prep["token_lengths"]]
    return {
        "preset": a.preset, "epochs": a.epochs, "steps": total_steps,
        "original": {"timed_steps": len(orig["step_sec"]) - 1, "step_sec": orig["step_sec"],
                     "median_step_sec": o_step, "extrapolated_train_sec": o_total, "max_rss_gb": orig["max_rss_gb"],
                     "tokens_per_step_padded": 2048, "device": orig["device"], "cpu_share": orig["cpu_share"],
                     "load_avg": [orig["load_avg_before"], orig["load_avg_after"]]},
        "mlx_persona": {"step_sec": ours["step_sec"], "tokens": ours["tokens"], "fit_sec": [a0, b],
                        "compile_sec_per_shape": compile_cost, "distinct_shapes": distinct,
                        "extrapolated_train_sec": p_total, "max_rss_gb": ours["max_rss_gb"],
                        "peak_memory_gb_mlx": ours["peak_memory_gb_mlx"], "device": ours["device"],
                        "model_tflops_per_epoch": f_ours / 1e12, "cpu_share": ours["cpu_share"],
                        "load_avg": [ours["load_avg_before"], ours["load_avg_after"]]},
        "ratios": {"train_time_to_finish": o_total / p_total, "peak_rss": orig["max_rss_gb"] / ours["max_rss_gb"]},
        "note": (f"EXTRAPOLATED from {len(orig['step_sec']) - 1} timed original steps and {len(later)} timed "
                 f"mlx_persona steps; with random weights the two do not reach a comparable validation loss at this "
                 f"shape, so this compares the time to finish each 5-epoch recipe. The original pads "
                 f"{sum(real_tokens)} real tokens per epoch to {4 * 512 * steps_per_epoch}."),
    }


def _load_line(o: dict, p: dict) -> str:
    return ("1-min load average before→after (2 cores, shared machine) and the share of the cores each got while "
            f"training: original {o['load_avg'][0][0]}→{o['load_avg'][1][0]}, {100 * o['cpu_share']:.0f}%; "
            f"mlx_persona {p['load_avg'][0][0]}→{p['load_avg'][1][0]}, {100 * p['cpu_share']:.0f}%.")


def markdown(res: dict, chart_rel: str | None) -> str:
    lines = []
    t = res.get("tiny")
    if t:
        o, p = t["original"], t["mlx_persona"]
        fmt = lambda x: "not reached" if x is None else f"{x:.1f}"  # noqa: E731
        lines += [
            "### Recipe: original (transformers.Trainer full FT, fp32, pad 512, grad checkpointing, batch 4) vs "
            "mlx_persona default LoRA recipe (configs/bluey-270m-pt.yaml), tiny model, data/bluey, to the end",
            "",
            "| recipe | device | steps | train s (to finish) | val loss final / best | time to common target s | "
            "peak RSS GB | MLX peak GB |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
            f"| original | {o['device']} | {o['steps']} | {o['train_sec']:.1f} | {o['final_val_loss']:.4f} / "
            f"{o['best_val_loss']:.4f} | {fmt(o['time_to_common_target_sec'])} | {o['max_rss_gb']:.2f} | |",
            f"| mlx_persona | {p['device']} | {p['steps']} | {p['train_sec']:.1f} | {p['final_val_loss']:.4f} / "
            f"{p['best_val_loss']:.4f} | {fmt(p['time_to_common_target_sec'])} | {p['max_rss_gb']:.2f} | "
            f"{p['peak_memory_gb_mlx']:.2f} |",
            f"| **original / mlx_persona** | | | **{t['ratios']['train_time_to_finish']:.2f}x** | | "
            + (f"**{t['ratios']['time_to_common_target']:.2f}x**" if t["ratios"]["time_to_common_target"] else "n/a")
            + f" | **{t['ratios']['peak_rss']:.2f}x** | |",
            "",
            f"Validation metric for both: mean cross-entropy over the assistant tokens of data/bluey/valid.jsonl "
            f"(mlx_persona's val_loss), evaluation time excluded. Common target = the higher of the two best "
            f"validation losses ({t['common_target_val_loss']:.4f}). mlx_persona reaches the original's final "
            f"validation loss ({t['original_final_val_loss']:.4f}): "
            + (f"after {p['time_to_original_final_sec']:.1f} s." if p["time_to_original_final_sec"] is not None
               else "no (random weights: LoRA adapts a random network).")
            + f" {_load_line(o, p)}"]
    e = res.get("extrapolated")
    if e:
        o, p = e["original"], e["mlx_persona"]
        lines += [
            "", f"### Recipe at the {e['preset']} shape (random weights): **EXTRAPOLATED** to {e['epochs']} epochs "
            f"({e['steps']} steps) from a few timed steps",
            "",
            "| recipe | device | timed step s | extrapolated train time | peak RSS GB | MLX peak GB |",
            "|---|---|---|---:|---:|---:|",
            f"| original (4 x 512 tokens/step) | {o['device']} | median {o['median_step_sec']:.1f} over "
            f"{o['timed_steps']} | {o['extrapolated_train_sec'] / 3600:.2f} h | {o['max_rss_gb']:.2f} | |",
            f"| mlx_persona LoRA | {p['device']} | {p['fit_sec'][0]:.2f} + {1000 * p['fit_sec'][1]:.2f} ms/token, "
            f"compile {p['compile_sec_per_shape']:.1f} s x {p['distinct_shapes']} shapes | "
            f"{p['extrapolated_train_sec'] / 3600:.2f} h | {p['max_rss_gb']:.2f} | {p['peak_memory_gb_mlx']:.2f} |",
            f"| **original / mlx_persona** | | | **{e['ratios']['train_time_to_finish']:.1f}x** | "
            f"**{e['ratios']['peak_rss']:.2f}x** | |",
            "", e["note"] + f" {_load_line(o, p)}"]
    lines += ["", "Original recipe, as assumed where the original is silent: "
              + "; ".join(f"{k}: {v}" for k, v in ORIGINAL.items()) + "."]
    if chart_rel:
        lines += ["", f"![recipe chart]({chart_rel})"]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gemma-3-270m", choices=["gemma-3-270m", "gemma-3-1b"],
                   help="shape for the extrapolated measurement")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--max-steps", type=int, default=0, help="stop the tiny runs early (smoke tests)")
    p.add_argument("--original-steps", type=int, default=3, help="original steps at --preset (the first is warm-up)")
    p.add_argument("--skip-tiny", action="store_true")
    p.add_argument("--skip-extrapolate", action="store_true")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "out"))
    p.add_argument("--charts", default=str(REPO / "benchmarks" / "charts"))
    p.add_argument("--no-results", action="store_true", help="do not append to benchmarks/RESULTS.md")
    p.add_argument("--quick", action="store_true", help="smoke tests only: the two tiny runs at once")
    p.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--job", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        write_json(Path(a.result), WORKERS[a.worker](json.loads(Path(a.job).read_text())))
        return None

    command = "python benchmarks/bench_recipe.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"benchmark": "recipe: original vs mlx_persona", "command": command.strip(), "machine": machine_info(),
              "original_recipe": ORIGINAL, "mlx_persona_recipe": str(RECIPE.relative_to(REPO)),
              "load_avg_start": load_avg()}
    tmp = Path(tempfile.mkdtemp(prefix="bench_recipe."))
    try:
        if not a.skip_tiny:
            result["tiny"] = run_tiny(a, tmp)
        if not a.skip_extrapolate:
            result["extrapolated"] = run_extrapolated(a, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["load_avg_end"] = load_avg()
    panels = []
    if "tiny" in result:
        t = result["tiny"]
        panels.append(("tiny: train s to finish", {"original": t["original"]["train_sec"],
                                                   "mlx_persona": t["mlx_persona"]["train_sec"]}))
        panels.append(("tiny: peak RSS GB", {"original": t["original"]["max_rss_gb"],
                                             "mlx_persona": t["mlx_persona"]["max_rss_gb"]}))
    if "extrapolated" in result:
        e = result["extrapolated"]
        panels.append((f"{e['preset']}: hours to finish (extrapolated)",
                       {"original": e["original"]["extrapolated_train_sec"] / 3600,
                        "mlx_persona": e["mlx_persona"]["extrapolated_train_sec"] / 3600}))
        panels.append((f"{e['preset']}: peak RSS GB", {"original": e["original"]["max_rss_gb"],
                                                      "mlx_persona": e["mlx_persona"]["max_rss_gb"]}))
    png = Path(a.charts) / "recipe.png"
    chart(png, "Original recipe (HF Trainer full FT) vs mlx_persona default LoRA recipe", panels)
    text = markdown(result, _link(png))
    write_results(Path(a.out), "bench_recipe", result, text, append=not a.no_results)
    return result


if __name__ == "__main__":
    main()
