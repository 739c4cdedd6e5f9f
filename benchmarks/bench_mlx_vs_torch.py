"""mlx_persona (MLX) against PyTorch (transformers + peft) on the same LoRA fine-tune and the same generation.

Training: the same model folder (random weights of a real Gemma 3 shape, fp32 on disk, loaded by
mlx-lm and by ``transformers.AutoModelForCausalLM``), the same examples, batches and loss masks (made
once with ``mlx_persona.data`` and the trainer's own batch iterator, ``tuner.batching.iterate_batches``,
gradient accumulation included), the same LoRA rank/alpha/modules/layers and *initial LoRA weights* (copied from MLX to peft),
the same AdamW, learning-rate schedule and gradient clipping. MLX's AdamW has no bias correction; the
PyTorch learning rate is multiplied by ``(1 - b1^t) / sqrt(1 - b2^t)`` so both take the same steps.
The MLX side is ``mlx_persona.tuner.run.run`` itself (a callback saves its initial adapters). Epoch 1 is
the warm-up (MLX compiles each batch shape once), the later epochs are timed. Equal first losses show the two do the same work; close
final losses show they keep doing it.

Generation: the same prompts (chat template, eval prompts plus one long multi-turn context) and the
persona preset (min_new_tokens=50, temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.1):
``generate``'s decode loop (``mlx_persona.generation.token_steps``, on mlx-lm's model and KV cache) with
``mlx_persona.sampling`` against ``transformers`` ``generate``.

Each framework runs in its own process, so its peak memory is its own. Peak memory is the process's
maximum resident set (``getrusage(RUSAGE_SELF).ru_maxrss``) for both -- weights, activations,
gradients, optimizer state, allocator caches, Python and libraries -- plus, for MLX,
``mx.get_peak_memory()`` (bytes held by MLX arrays only).

    python benchmarks/bench_mlx_vs_torch.py                                   # gemma-3-270m shape
    python benchmarks/bench_mlx_vs_torch.py --preset tiny --examples 8 --new-tokens 60
    python benchmarks/bench_mlx_vs_torch.py --part generate --torch-dtype bfloat16

Writes JSON under --out, a bar chart under --charts, and appends tables to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import cpu_model, machine_info, write_json, write_results  # noqa: E402

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PERSONA = dict(min_new_tokens=50, temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.1)


# ------------------------------------------------------------------------------------------ helpers
def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def max_rss_gb() -> float:
    """Peak resident set of this process (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1e9 if sys.platform == "darwin" else 1e6)


def bench_model(preset: str) -> Path:
    """The shared fp32 model folder of `preset` (random weights), built once."""
    import mlx_persona.backend

    mlx_persona.backend.setup()  # the Linux speed layer, before mlx loads
    from mlx_persona.models import init_model
    from mlx_persona.paths import cache_dir

    path = cache_dir() / "bench" / f"{preset}-fp32"
    if not (path / "config.json").exists():
        init_model(path, preset, dtype="float32", overwrite=True)
    return path


def subset(n: int, dst: Path, n_valid: int = 0) -> Path:
    """The first `n` training (and `n_valid` validation) conversations of the shipped data."""
    dst.mkdir(parents=True, exist_ok=True)
    for name, k in (("train.jsonl", n), ("valid.jsonl", n_valid)):
        lines = [l for l in (REPO / "data/bluey" / name).read_text().splitlines() if l.strip()][:k]
        if lines:
            (dst / name).write_text("\n".join(lines) + "\n")
    return dst


def torch_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def run_worker(kind: str, job: dict, tmp: Path, script: str = __file__) -> dict:
    """Runs one worker of `script` in a fresh process; returns its JSON result plus wall time and load average."""
    return run_workers([(kind, job)], tmp, script, parallel=False)[0]


def run_workers(specs: list[tuple[str, dict]], tmp: Path, script: str = __file__, parallel: bool = False) -> list[dict]:
    """Runs workers one after another (timings), or all at once (`parallel`: smoke tests, numbers meaningless)."""
    results, pending = [], []
    for kind, job in specs:
        jp = tmp / f"job-{kind}-{job.get('tag', '')}.json"
        rp = tmp / f"result-{kind}-{job.get('tag', '')}.json"
        write_json(jp, job)
        cmd = [sys.executable, script, "--worker", kind, "--job", str(jp), "--result", str(rp)]
        env = {**os.environ, **job["env"]} if job.get("env") else None  # read before mlx_persona is imported
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        pending.append((kind, rp, proc, load_avg(), time.perf_counter()))
        if not parallel:
            results.append(_finish(*pending.pop()))
    return results + [_finish(*p) for p in pending]


def _finish(kind: str, rp: Path, proc, before: list[float], start: float) -> dict:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"worker {kind} failed:\n{out[-2000:]}\n{err[-4000:]}")
    r = json.loads(rp.read_text())
    r.update(wall_sec=time.perf_counter() - start, load_avg_before=before, load_avg_after=load_avg())
    return r


# ------------------------------------------------------------------------------ FLOPs and bytes
def model_shape(model_path) -> dict:
    c = json.loads((Path(model_path) / "config.json").read_text())
    n = c["num_hidden_layers"]
    types = c.get("layer_types") or ["full_attention" if (i + 1) % c["sliding_window_pattern"] == 0
                                     else "sliding_attention" for i in range(n)]
    d, h, kv, hd, i = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], \
        c["intermediate_size"]
    dims = {"q_proj": (d, h * hd), "k_proj": (d, kv * hd), "v_proj": (d, kv * hd), "o_proj": (h * hd, d),
            "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}
    return {"layers": n, "hidden": d, "heads": h, "kv_heads": kv, "head_dim": hd, "vocab": c["vocab_size"],
            "window": c["sliding_window"], "layer_types": types, "dims": dims,
            "linear_params": n * sum(a * b for a, b in dims.values())}


def lora_params(shape: dict, rank: int, modules=MODULES) -> int:
    return shape["layers"] * sum(rank * sum(shape["dims"][m]) for m in modules)


def attention_flops(shape: dict, n: int, padded: bool = False) -> int:
    """Forward FLOPs of the score and value matmuls (2 * 2 * heads * head_dim per query-key pair).

    Useful work counts the keys each query may see: min(i + 1, window) on sliding layers, i + 1 on global
    ones. `padded` counts the full n x n matrices that an explicitly masked attention computes.
    """
    per_pair = 4 * shape["heads"] * shape["head_dim"]
    if padded:
        return per_pair * n * n * shape["layers"]
    full = n * (n + 1) // 2
    w = shape["window"]
    sliding = sum(min(i + 1, w) for i in range(n))
    return per_pair * sum(full if t == "full_attention" else sliding for t in shape["layer_types"])


TRAIN_FLOPS_FORMULA = (
    "per step, T = real input tokens, N = loss tokens, P = frozen linear weights ({linear_params:,}), "
    "R = LoRA weights ({lora_params:,}), D*V = LM head ({head:,}), A = causal attention forward FLOPs "
    "(4*heads*head_dim per query-key pair, window-limited on sliding layers). "
    "LoRA: forward 2PT + 2RT + A + 2DV*N; backward 2PT (activation grads only, frozen W) + 4RT (LoRA weight "
    "and activation grads) + 2A + 2DV*N (dh only, tied embedding frozen). "
    "Full fine-tune: forward 2PT + A + 2DV*N; backward 4PT + 2A + 4DV*N (+ embedding gradient, a scatter, "
    "not counted). Norms, activations, softmax and RoPE are not counted. "
    "'model' FLOPs count the LM head at loss positions only and attention over real tokens (the work any "
    "trainer needs; the same number for both frameworks); 'executed' FLOPs count what each one computes: "
    "every linear on the padded batch, full masked L x L attention, the head at {head_where}, and a second "
    "forward with gradient checkpointing.")


def train_flops(shape: dict, lengths: list[int], n_loss: int, padded_len: int, head_positions: int,
                method: str = "lora", rank: int = 8, recompute: bool = False) -> dict:
    """Model and executed FLOPs of one training step over sequences of `lengths` (input tokens)."""
    p, dv = shape["linear_params"], shape["hidden"] * shape["vocab"]
    r = lora_params(shape, rank) if method != "full" else 0
    t = sum(lengths)
    tp = len(lengths) * padded_len
    a = sum(attention_flops(shape, n) for n in lengths)
    ap = len(lengths) * attention_flops(shape, padded_len, padded=True)

    def total(tok, att, head_n):
        if method == "full":
            return 6 * p * tok + 3 * att + 6 * dv * head_n
        return 4 * p * tok + 6 * r * tok + 3 * att + 4 * dv * head_n

    model = total(t, a, n_loss)
    executed = total(tp, ap, head_positions)
    if recompute:
        executed += 2 * p * tp + ap
    return {"model": model, "executed": executed, "tokens": t}


def decode_bytes(shape: dict, bytes_per: int, ctx: int) -> int:
    """Bytes read per decoded token: every linear weight, the whole tied LM head, and the KV cache."""
    weights = (shape["linear_params"] + shape["hidden"] * shape["vocab"]) * bytes_per
    kv = 0
    for t in shape["layer_types"]:
        k = ctx if t == "full_attention" else min(ctx, shape["window"])
        kv += 2 * shape["kv_heads"] * shape["head_dim"] * k * bytes_per
    return weights + kv


# ------------------------------------------------------------------------------------------ data
def prepare_training(model_path: Path, data: Path, job: dict, tmp: Path) -> dict:
    """The batches mlx_persona's trainer will visit (its own iterator, accumulation included), saved for
    the PyTorch worker, and the MLX learning rates."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm.utils import load_tokenizer

    from mlx_persona import data as data_mod
    from mlx_persona.tuner.batching import batch_plan, iterate_batches
    from mlx_persona.tuner.config import load_config
    from mlx_persona.tuner.trainer import build_schedule

    tok = load_tokenizer(model_path)
    train_ex, _ = data_mod.load_splits(data, system_ok=data_mod.template_supports_system(tok))
    ds = data_mod.prepare_dataset(tok, train_ex, job["max_seq_len"], "truncate")
    cfg = load_config(None, {"batch_size": job["batch_size"], "seed": job["seed"], **job["mlx_overrides"]})
    accum = cfg.grad_accumulation
    steps_per_epoch = max(len(batch_plan([len(t) for t in ds.tokens], job["batch_size"])) // accum, 1)
    steps = job["epochs"] * steps_per_epoch
    batches = iterate_batches(ds, job["batch_size"], job["seed"])
    arrays, meta = {}, []
    for s in range(steps):
        micro = [next(batches) for _ in range(accum)]
        for m, mb in enumerate(micro):
            for k in ("inputs", "targets", "positions", "weights"):
                arrays[f"{s}_{m}_{k}"] = getattr(mb.batch, k)
        bs = [mb.batch for mb in micro]
        meta.append({"n_tokens": sum(b.n_tokens for b in bs), "n_loss": sum(b.n_loss for b in bs),
                     "micro": accum, "batch": sum(b.inputs.shape[0] for b in bs),
                     "padded_len": max(b.inputs.shape[1] for b in bs),
                     "head_positions": sum(len(b.positions) for b in bs),
                     "lengths": [len(ds.tokens[i]) - 1 for mb in micro for i in mb.indices],
                     "epoch": s // steps_per_epoch})
    np.savez(tmp / "batches.npz", **arrays)
    sched = build_schedule(cfg.optim, steps)
    lrs = [float(sched(mx.array(s)).item()) for s in range(steps)]
    return {"steps": steps, "steps_per_epoch": steps_per_epoch, "meta": meta, "lrs": lrs,
            "optim": {"betas": list(cfg.optim.betas), "eps": cfg.optim.eps, "weight_decay": cfg.optim.weight_decay,
                      "max_grad_norm": cfg.optim.max_grad_norm}, "data_report": ds.report}


# ------------------------------------------------------------------------------------------ workers
PEAK_SIZES = (1024, 2048, 3072)  # square matmuls; the best median of 5 is the peak
BF16_MM = " + bf16 matmul inputs"  # MLX_PERSONA_MATMUL=bf16 (oneMKL, AMX); see mlx_persona/sgemm.py
QUICK = os.environ.get("BENCH_QUICK") == "1"  # smoke tests: small probes, numbers not meaningful


def peak_matmul_mlx(dtype_name: str = "float32") -> float:
    import mlx.core as mx

    from mlx_persona.backend import matmul_gflops

    return max(matmul_gflops(n, getattr(mx, dtype_name), trials=5) for n in ((256,) if QUICK else PEAK_SIZES))


def peak_matmul_torch(dtype, device: str = "cpu") -> float:
    import torch

    best = 0.0
    for n in ((256,) if QUICK else PEAK_SIZES):
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        a @ b
        times = []
        for _ in range(5):
            _sync(device)
            t = time.perf_counter()
            a @ b
            _sync(device)
            times.append(time.perf_counter() - t)
        best = max(best, 2 * n**3 / statistics.median(times) / 1e9)
    return best


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


EXP_SHAPE = (840, 32768)  # one vocabulary chunk of logits at ~840 loss positions


def exp_rate_mlx() -> float:
    """Million exp()/s over fp32 logits-sized data: the elementwise cost of a softmax over the vocabulary."""
    import mlx.core as mx

    x = mx.random.normal((64, 1024) if QUICK else EXP_SHAPE)
    m = x.max(axis=-1, keepdims=True)
    mx.eval(x, m)
    # As the compiled training step computes it: exp(logits - running max), fused into one kernel.
    fused = mx.compile(lambda x, m: mx.exp(x - m))
    mx.eval(fused(x, m))
    times = []
    for _ in range(3):
        t = time.perf_counter()
        mx.eval(fused(x, m))
        times.append(time.perf_counter() - t)
    return x.size / statistics.median(times) / 1e6


def exp_rate_torch(device: str = "cpu") -> float:
    import torch

    x = torch.randn(*((64, 1024) if QUICK else EXP_SHAPE), device=device)
    torch.exp(x)
    times = []
    for _ in range(3):
        _sync(device)
        t = time.perf_counter()
        torch.exp(x)
        _sync(device)
        times.append(time.perf_counter() - t)
    return x.numel() / statistics.median(times) / 1e6


def read_bandwidth_mlx() -> float:
    """GB/s of a sum over a 1 GiB fp32 array (a read-bound reduction), median of 5."""
    import mlx.core as mx

    x = mx.full((1 << (20 if QUICK else 28),), 1.0)
    mx.eval(x)
    times = []
    for _ in range(6):
        t = time.perf_counter()
        mx.eval(x.sum())
        times.append(time.perf_counter() - t)
    return x.nbytes / statistics.median(times[1:]) / 1e9


def read_bandwidth_torch(device: str = "cpu") -> float:
    import torch

    x = torch.ones(1 << (20 if QUICK else 28), device=device)
    times = []
    for _ in range(6):
        _sync(device)
        t = time.perf_counter()
        x.sum().item()
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / statistics.median(times[1:]) / 1e9


def worker_train_mlx(job: dict) -> dict:
    """mlx_persona.tuner.run.run on the job's data; a callback saves its initial adapters for the PyTorch run."""
    import mlx_persona.backend

    mlx_persona.backend.setup()  # the Linux speed layer, before mlx loads
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    from mlx_persona.backend import dtype_from_name, sgemm
    from mlx_persona.tuner.config import load_config
    from mlx_persona.tuner.run import run
    from mlx_persona.tuner.trainer import TrainingCallback

    dtype = str(dtype_from_name(job["mlx_dtype"])).replace("mlx.core.", "")
    if job.get("env", {}).get(sgemm.ENV) == "bf16" and not sgemm.bf16_active():
        raise RuntimeError(f"bf16 matmuls were asked for but are off: {sgemm.bf16_status()}")
    peak = peak_matmul_mlx(dtype)  # through the same cblas_sgemm as training: the bf16 peak when it is on
    exp_rate = exp_rate_mlx()

    class SaveInitialAdapters(TrainingCallback):
        """The adapters the run starts from, for the PyTorch run to copy."""

        def on_start(self, model, loop):
            init = {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}
            np.savez(job["lora_init"], **init)

    out = Path(job["tmp"]) / "mlx-out"
    cfg = load_config(None, {"model": job["model"], "data": job["data"], "output": str(out), "overwrite": True,
                             "steps": job["steps"], "batch_size": job["batch_size"], "max_seq_len": job["max_seq_len"],
                             "seed": job["seed"], "log_every": 1, "save_every": 0, "eval_every": 0,
                             "progress": False, **job["mlx_overrides"]})
    wall, cpu = time.perf_counter(), time.process_time()
    summary = run(cfg, log=lambda *a, **k: None, callback=SaveInitialAdapters())
    cpu_share = (time.process_time() - cpu) / (time.perf_counter() - wall) / os.cpu_count()
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    if sgemm.bf16_active():
        dtype += BF16_MM
    return {"framework": "mlx_persona", "dtype": dtype, "device": str(mx.default_device()),
            "sec_per_step": [r["sec_per_step"] for r in rows], "loss": [r["loss"] for r in rows],
            "batches_seen": [[round(r["tokens_per_sec"] * r["sec_per_step"]),
                              round(r["loss_tokens_per_sec"] * r["sec_per_step"])] for r in rows],
            "peak_memory_gb_mlx": summary["peak_memory_gb"], "max_rss_gb": max_rss_gb(),
            "peak_matmul_gflops": peak, "trainable_parameters": summary["trainable_parameters"],
            "cpu_share": cpu_share, "exp_melem_per_sec": exp_rate}


def _torch_model(path, dtype_name: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count())
    weights = torch.bfloat16 if dtype_name == "bfloat16-weights" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=weights).to(device)
    return model


def worker_train_torch(job: dict) -> dict:
    """transformers Gemma3ForCausalLM + peft LoRA, stepping through the saved batches."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model

    device = torch_device()
    dtype_name = job["torch_dtype"]
    torch.manual_seed(job["seed"])
    autocast = dtype_name == "bfloat16"
    peak = peak_matmul_torch(torch.bfloat16 if autocast else torch.float32, device)
    exp_rate = exp_rate_torch(device)  # the loss upcasts logits to fp32 either way
    model = _torch_model(job["model"], "float32", device)
    model.config.use_cache = False
    lcfg = LoraConfig(r=job["rank"], lora_alpha=job["alpha"], lora_dropout=job["dropout"], bias="none",
                      target_modules=MODULES, task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    # The same initial adapters as the MLX run (lora_a: [in, r] there, lora_A.weight: [r, in] here).
    init = np.load(job["lora_init"])
    with torch.no_grad():
        for key in init.files:
            path, name = key.rsplit(".", 1)
            mod = model.base_model.model.get_submodule(path)
            target = mod.lora_A["default"].weight if name == "lora_a" else mod.lora_B["default"].weight
            target.copy_(torch.from_numpy(init[key].T.copy()))
    params = [p for p in model.parameters() if p.requires_grad]
    o = job["optim"]
    opt = torch.optim.AdamW(params, lr=job["lrs"][0], betas=tuple(o["betas"]), eps=o["eps"],
                            weight_decay=o["weight_decay"], fused=(device != "mps"))
    model.train()
    batches = np.load(job["batches"])
    b1, b2 = o["betas"]
    secs, losses = [], []
    lm = model.base_model.model
    wall, cpu = time.perf_counter(), time.process_time()
    for s in range(job["steps"]):
        tic = time.perf_counter()
        n_loss = job["meta"][s]["n_loss"]  # over the step's micro-batches: the mean over the whole step
        step_loss = 0.0
        for m in range(job["meta"][s]["micro"]):
            x = torch.from_numpy(batches[f"{s}_{m}_inputs"]).long().to(device)
            tgt = torch.from_numpy(batches[f"{s}_{m}_targets"]).long().to(device)
            pos = torch.from_numpy(batches[f"{s}_{m}_positions"]).long()
            w = torch.from_numpy(batches[f"{s}_{m}_weights"])
            pos = pos[w > 0].to(device)
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast):
                if job["torch_loss"] == "all":
                    # What transformers does: logits at every position, the loss where labels != -100.
                    labels = torch.full_like(tgt, -100).view(-1)
                    labels[pos] = tgt.view(-1)[pos]
                    logits = model(input_ids=x).logits
                    loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels,
                                           ignore_index=-100, reduction="sum") / n_loss
                else:
                    h = lm.model(input_ids=x).last_hidden_state
                    logits = lm.lm_head(h.reshape(-1, h.shape[-1])[pos])
                    loss = F.cross_entropy(logits.float(), tgt.view(-1)[pos], reduction="sum") / n_loss
            loss.backward()
            step_loss += loss.item()
        if o["max_grad_norm"] > 0:
            torch.nn.utils.clip_grad_norm_(params, o["max_grad_norm"])
        t = s + 1  # undo torch's bias correction: MLX's AdamW has none
        for g in opt.param_groups:
            g["lr"] = job["lrs"][s] * (1 - b1**t) / (1 - b2**t) ** 0.5
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(step_loss)
        _sync(device)
        secs.append(time.perf_counter() - tic)
    cpu_share = (time.process_time() - cpu) / (time.perf_counter() - wall) / os.cpu_count()
    return {"framework": "torch", "dtype": "bfloat16 autocast (fp32 weights)" if autocast else "float32",
            "cpu_share": cpu_share, "exp_melem_per_sec": exp_rate,
            "device": device, "sec_per_step": secs, "loss": losses, "max_rss_gb": max_rss_gb(),
            "peak_matmul_gflops": peak, "trainable_parameters": sum(p.numel() for p in params),
            "torch_threads": torch.get_num_threads(), "loss_positions": job["torch_loss"]}


def worker_generate_mlx(job: dict) -> dict:
    """mlx_persona's decode loop and sampler, timed exactly as benchmarks/bench_generate.py does."""
    import mlx_persona.backend

    mlx_persona.backend.setup()  # the Linux speed layer, before mlx loads
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from benchmarks.bench_generate import _time_mlx
    from mlx_persona.models import load_model
    from mlx_persona.sampling import GenerationConfig, make_sampler_and_processors

    from mlx_persona.backend import pinned, sgemm

    if job.get("env", {}).get(sgemm.ENV) == "bf16" and not sgemm.bf16_active():
        raise RuntimeError(f"bf16 matmuls were asked for but are off: {sgemm.bf16_status()}")
    bw = read_bandwidth_mlx()
    model, tok = load_model(job["model"], dtype=job["mlx_dtype"])  # bf16 on: every weight pinned
    pinned_gb = pinned.pinned_bytes() / 1e9
    cfg = GenerationConfig(max_new_tokens=job["new_tokens"], seed=job["seed"], **PERSONA)
    mx.reset_peak_memory()

    def pair(prompt):
        return make_sampler_and_processors(cfg, prompt_tokens=prompt, eos_token_ids=job["eos"])

    _time_mlx(model, job["prompts"][0], 8, *pair(job["prompts"][0]))  # warm-up
    runs = []
    for prompt in job["prompts"]:
        prompt_tps, decode_tps = _time_mlx(model, prompt, job["new_tokens"], *pair(prompt))
        runs.append({"prompt_tokens": len(prompt), "first_token_sec": len(prompt) / prompt_tps,
                     "decode_tps": decode_tps})
    return {"framework": "mlx_persona (token_steps + mlx_persona.sampling)",
            "dtype": str(next(iter(dict(tree_flatten(model.parameters())).values())).dtype).replace("mlx.core.", ""),
            "device": str(mx.default_device()), "runs": runs, "peak_memory_gb_mlx": mx.get_peak_memory() / 1e9,
            "max_rss_gb": max_rss_gb(), "read_bandwidth_gbs": bw, "pinned_bf16_gb": pinned_gb}


def worker_generate_torch(job: dict) -> dict:
    import torch
    from transformers.generation.streamers import BaseStreamer

    device = torch_device()
    bw = read_bandwidth_torch(device)
    dtype_name = job["torch_dtype"]
    model = _torch_model(job["model"], "bfloat16-weights" if dtype_name == "bfloat16" else "float32", device)
    model.eval()

    class Clock(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    runs = []
    for i, prompt in enumerate([job["prompts"][0]] + job["prompts"]):
        torch.manual_seed(job["seed"])
        clock = Clock()
        ids = torch.tensor([prompt], device=device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                           max_new_tokens=8 if i == 0 else job["new_tokens"], eos_token_id=job["eos"],
                           pad_token_id=job["pad"], streamer=clock, **PERSONA)
        t = clock.times[1:]  # the first put() is the prompt
        if i:
            runs.append({"prompt_tokens": len(prompt), "first_token_sec": t[0] - t0,
                         "decode_tps": (len(t) - 1) / (t[-1] - t[0]), "new_tokens": len(t)})
    return {"framework": "torch (transformers generate)", "dtype": dtype_name, "device": device, "runs": runs,
            "max_rss_gb": max_rss_gb(), "read_bandwidth_gbs": bw, "torch_threads": torch.get_num_threads()}


WORKERS = {"train_mlx": worker_train_mlx, "train_torch": worker_train_torch,
           "generate_mlx": worker_generate_mlx, "generate_torch": worker_generate_torch}


# ------------------------------------------------------------------------------------------ driver
def summarise_train(r: dict, prep: dict, timed: range, shape: dict, rank: int, head_where: str) -> dict:
    meta = [prep["meta"][s] for s in timed]
    secs = [r["sec_per_step"][s] for s in timed]
    tokens = sum(m["n_tokens"] for m in meta)
    loss_tokens = sum(m["n_loss"] for m in meta)
    model_flops = executed = exps = 0
    # exp() calls per logit: mlx_persona's fused loss reuses its forward exp for the gradient; torch's
    # log_softmax takes one in the forward and one more in its backward (exp of the saved output).
    exps_per_logit = 1 if r["framework"] == "mlx_persona" else 2
    for m in meta:
        head = m["head_positions"] if head_where == "loss" else m["batch"] * m["padded_len"]
        exps += exps_per_logit * head * shape["vocab"]
        f = train_flops(shape, m["lengths"], m["n_loss"], m["padded_len"], head, "lora", rank)
        model_flops += f["model"]
        executed += f["executed"]
    t = sum(secs)
    peak = r["peak_matmul_gflops"] * 1e9
    out = {"framework": r["framework"], "dtype": r["dtype"], "device": r["device"],
           "median_sec_per_step": statistics.median(secs), "timed_steps": len(secs),
           "tokens_per_sec": tokens / t, "loss_tokens_per_sec": loss_tokens / t,
           "first_loss": r["loss"][0], "final_loss": r["loss"][-1], "losses": r["loss"],
           "max_rss_gb": r["max_rss_gb"], "peak_matmul_gflops": r["peak_matmul_gflops"],
           "model_tflops_per_step": model_flops / len(secs) / 1e12, "achieved_model_gflops": model_flops / t / 1e9,
           "mfu": model_flops / t / peak, "executed_gflops": executed / t / 1e9, "hfu": executed / t / peak,
           "trainable_parameters": r["trainable_parameters"], "wall_sec": r["wall_sec"], "cpu_share": r["cpu_share"],
           "exp_melem_per_sec": r["exp_melem_per_sec"],
           "lm_head_exp_sec_per_step": exps / len(secs) / (r["exp_melem_per_sec"] * 1e6),
           "load_avg_before": r["load_avg_before"], "load_avg_after": r["load_avg_after"]}
    if "peak_memory_gb_mlx" in r:
        out["peak_memory_gb_mlx"] = r["peak_memory_gb_mlx"]
    return out


def mlx_matmul_modes(a) -> list[str]:
    """Which MLX runs: exact fp32 matmuls, bf16 matmul inputs (our kernel or oneMKL, per CPU), or both ('auto':
    both where possible)."""
    if a.mlx_matmul != "auto":
        return ["fp32", "bf16"] if a.mlx_matmul == "both" else [a.mlx_matmul]
    from mlx_persona.backend import sgemm

    cpu_only = a.mlx_dtype in ("auto", "float32") and torch_device() == "cpu"
    support = sgemm.cpu_support()
    engine_ok = support != "" and (sgemm.choose_engine(support) == "own" or sgemm.find_mkl() is not None)
    possible = (sys.platform == "linux" and platform.machine() == "x86_64" and engine_ok
                and not sgemm._layer_off())  # MLX_PERSONA_SGEMM=0: no bf16
    return ["fp32", "bf16"] if cpu_only and possible else ["fp32"]


def run_train(a, tmp: Path) -> dict:
    model = bench_model(a.preset)
    data = subset(a.examples, tmp / "data")
    overrides = {"lora.rank": a.rank, "lora.alpha": a.alpha, "lora.dropout": 0.0, "lora.modules": MODULES,
                 "lora.num_layers": -1, "method": "lora", "dtype": a.mlx_dtype,
                 "grad_accumulation": a.grad_accumulation}
    job = {"model": str(model), "data": str(data), "tmp": str(tmp), "batch_size": a.batch_size, "epochs": a.epochs,
           "max_seq_len": a.max_seq_len, "seed": 0, "rank": a.rank, "alpha": a.alpha, "dropout": 0.0,
           "mlx_overrides": overrides, "lora_init": str(tmp / "lora_init.npz"), "batches": str(tmp / "batches.npz"),
           "torch_loss": a.torch_loss, "mlx_dtype": a.mlx_dtype}
    prep = prepare_training(model, data, job, tmp)
    job.update(steps=prep["steps"], lrs=prep["lrs"], optim=prep["optim"], meta=prep["meta"])
    shape = model_shape(model)
    timed = range(prep["steps_per_epoch"] if a.epochs > 1 else 1, prep["steps"])
    dtypes = ["float32", "bfloat16"] if a.torch_dtype == "both" else [a.torch_dtype]
    expected = [[m["n_tokens"], m["n_loss"]] for m in prep["meta"]]
    mlx_runs = {"fp32": ("mlx_persona", {}), "bf16": ("mlx_persona_bf16mm", {"MLX_PERSONA_MATMUL": "bf16"})}
    mlx_runs = {k: mlx_runs[k] for k in mlx_matmul_modes(a)}
    trials = {k: [] for k in [name for name, _ in mlx_runs.values()] + [f"torch_{dt}" for dt in dtypes]}
    # Trials take turns (mlx, torch, mlx, torch, ...) so that a change in the machine's load hits both.
    for trial in range(a.trials):
        for mode, (name, env) in mlx_runs.items():
            print(f"train: {a.preset}, {prep['steps']} steps ({len(timed)} timed), trial {trial + 1} of {a.trials}: "
                  f"mlx_persona, {mode} matmuls ...", file=sys.stderr)
            mlx_r = run_worker("train_mlx", {**job, "tag": f"mlx-{mode}", "env": env}, tmp)
            if mlx_r["batches_seen"] != expected:
                raise SystemExit("mlx_persona.train visited different batches than the ones prepared for PyTorch: "
                                 f"{mlx_r['batches_seen']} != {expected}")
            trials[name].append(summarise_train(mlx_r, prep, timed, shape, a.rank, "loss"))
        for dt in dtypes:
            print(f"train: torch {dt} ...", file=sys.stderr)
            r = run_worker("train_torch", {**job, "torch_dtype": dt, "tag": dt}, tmp)
            trials[f"torch_{dt}"].append(summarise_train(r, prep, timed, shape, a.rank,
                                                         "all" if a.torch_loss == "all" else "loss"))
    results = {}
    for k, runs in trials.items():  # the median trial by tokens/s (the lower one of two)
        median = sorted(runs, key=lambda v: v["tokens_per_sec"])[(len(runs) - 1) // 2]
        results[k] = {**median, "trials_tokens_per_sec": [v["tokens_per_sec"] for v in runs]}
    mlx_names = [name for name, _ in mlx_runs.values()]
    trial_ratios = [max(trials[n][i]["tokens_per_sec"] for n in mlx_names)
                    / max(trials[f"torch_{dt}"][i]["tokens_per_sec"] for dt in dtypes) for i in range(a.trials)]
    torch_runs = [v for k, v in results.items() if k.startswith("torch")]
    best_torch = max(torch_runs, key=lambda v: v["tokens_per_sec"])
    best_mlx_key = max(mlx_names, key=lambda n: results[n]["tokens_per_sec"])
    ours = results[best_mlx_key]
    ref_key = mlx_names[0]  # loss agreement against the exact (fp32-matmul) run when there is one
    ref = results[ref_key]
    # Like against like: MLX fp32 against torch fp32; MLX with bf16 matmul inputs against torch's bf16 autocast.
    pairs = {}
    for n in mlx_names:
        want = "bfloat16" if n.endswith("bf16mm") else results[n]["dtype"].split(" ")[0]
        peer = results.get(f"torch_{want}")
        if peer:
            pairs[f"{n}_vs_torch_{want}"] = results[n]["tokens_per_sec"] / peer["tokens_per_sec"]
    same = results.get("torch_float32") if "mlx_persona" in results else None
    checks = {f"first_loss_abs_diff_{k}": abs(v["first_loss"] - ref["first_loss"]) for k, v in results.items()
              if k != ref_key}
    checks.update({f"final_loss_abs_diff_{k}": abs(v["final_loss"] - ref["final_loss"]) for k, v in results.items()
                   if k != ref_key})
    from mlx_persona.tuner.batching import PAD_LOSS_TO

    formula = TRAIN_FLOPS_FORMULA.format(linear_params=shape["linear_params"],
                                         lora_params=lora_params(shape, a.rank),
                                         head=shape["hidden"] * shape["vocab"],
                                         head_where=f"loss positions (padded to a multiple of {PAD_LOSS_TO}) for mlx_persona, "
                                                    + ("every position for torch" if a.torch_loss == "all"
                                                       else "loss positions for torch"))
    return {"preset": a.preset, "examples": a.examples, "epochs": a.epochs, "batch_size": a.batch_size,
            "rank": a.rank, "alpha": a.alpha, "modules": MODULES, "layers": "all", "max_seq_len": a.max_seq_len,
            "steps": prep["steps"], "timed_steps": list(timed), "optimizer": "AdamW " + json.dumps(prep["optim"])
            + ", lr: mlx_persona default warm-up + cosine (torch lr rescaled to undo its bias correction)",
            "torch_loss_positions": a.torch_loss, "results": results, "trials": a.trials,
            "trial_ratios_tokens_per_sec_vs_best_torch": trial_ratios,
            "ratio_tokens_per_sec_vs_best_torch": ours["tokens_per_sec"] / best_torch["tokens_per_sec"],
            "best_torch": f"{best_torch['framework']} {best_torch['dtype']}", "checks": checks,
            "best_mlx": best_mlx_key, "ratios_like_for_like": pairs,
            "ratio_tokens_per_sec_vs_same_dtype_torch": same and results["mlx_persona"]["tokens_per_sec"]
            / same["tokens_per_sec"],
            "flops_formula": formula, "shape": {k: v for k, v in shape.items() if k != "layer_types"},
            "targets": {"mlx_vs_torch_tokens_per_sec": ">= 1.0", "mfu_gemma-3-270m": ">= 0.40"}}


def run_generate(a, tmp: Path) -> dict:
    from mlx_lm.utils import load_tokenizer

    from mlx_persona.generation import build_prompt, end_token_ids

    model = bench_model(a.preset)
    tok = load_tokenizer(model)
    prompts = [json.loads(l)["prompt"] for l in (REPO / "data/bluey/eval_prompts.jsonl").read_text().splitlines()
               if l.strip()][:a.prompts]
    convs = [json.loads(l)["messages"] for l in (REPO / "data/bluey/valid.jsonl").read_text().splitlines() if l.strip()]
    long_conv = max(convs, key=lambda m: sum(len(x["content"]) for x in m)) + [{"role": "user", "content": prompts[0]}]
    ids = [build_prompt(tok, p) for p in prompts] + [build_prompt(tok, long_conv)]
    job = {"model": str(model), "prompts": ids, "new_tokens": a.new_tokens, "seed": 0,
           "eos": end_token_ids(tok, model), "pad": tok._tokenizer.pad_token_id or 0, "mlx_dtype": a.mlx_dtype}
    shape = model_shape(model)
    results = {}
    print(f"generate: {a.preset}, mlx_persona and torch ...", file=sys.stderr)
    dtypes = ["float32", "bfloat16"] if a.torch_dtype == "both" else [a.torch_dtype]
    # MLX_PERSONA_MATMUL=bf16: every weight read from its bf16 copy (backend.pinned), as torch's bf16 weights.
    mlx_specs = {"mlx_persona": ("generate_mlx", {**job, "tag": "mlx"}),
                 "mlx_persona_bf16mm": ("generate_mlx", {**job, "tag": "mlx-bf16", "env": {"MLX_PERSONA_MATMUL": "bf16"}})}
    mlx_specs = {k: mlx_specs[k] for k in (["mlx_persona"] + (["mlx_persona_bf16mm"] if "bf16" in mlx_matmul_modes(a) else []))}
    specs = list(mlx_specs.values()) + [("generate_torch", {**job, "torch_dtype": dt, "tag": dt}) for dt in dtypes]
    done = run_workers(specs, tmp, parallel=a.quick)
    runs = dict(zip(list(mlx_specs) + [f"torch_{dt}" for dt in dtypes], done))
    n_short = len(prompts)
    for k, r in runs.items():
        short, long_ = r["runs"][:n_short], r["runs"][n_short]
        bytes_per = 2 if r["dtype"] == "bfloat16" or k.endswith("bf16mm") else 4
        decode_tps = statistics.median(x["decode_tps"] for x in r["runs"])
        ctx = statistics.mean(x["prompt_tokens"] for x in r["runs"]) + a.new_tokens / 2
        per_token = decode_bytes(shape, bytes_per, int(ctx))
        results[k] = {"framework": r["framework"], "dtype": r["dtype"], "device": r["device"],
                      "decode_tokens_per_sec": decode_tps,
                      "prompt_tokens_per_sec_short": statistics.median(x["prompt_tokens"] / x["first_token_sec"]
                                                                       for x in short),
                      "prompt_tokens_per_sec_long": long_["prompt_tokens"] / long_["first_token_sec"],
                      "first_token_sec_short_median": statistics.median(x["first_token_sec"] for x in short),
                      "short_prompt_tokens": [x["prompt_tokens"] for x in short],
                      "long_prompt_tokens": long_["prompt_tokens"], "runs": r["runs"],
                      "bytes_per_decoded_token": per_token, "decode_bandwidth_gbs": per_token * decode_tps / 1e9,
                      "read_bandwidth_gbs": r["read_bandwidth_gbs"], "max_rss_gb": r["max_rss_gb"],
                      "wall_sec": r["wall_sec"], "load_avg_before": r["load_avg_before"],
                      "load_avg_after": r["load_avg_after"]}
        if "peak_memory_gb_mlx" in r:
            results[k]["peak_memory_gb_mlx"] = r["peak_memory_gb_mlx"]
    return {"preset": a.preset, "settings": PERSONA, "max_new_tokens": a.new_tokens, "results": results,
            "timing": "prompt tokens/s = prompt tokens / time to the first new token; decode tokens/s = "
                      "(new tokens - 1) / time from the first to the last new token (as bench_generate.py); "
                      "medians over the prompts",
            "bytes_formula": "bytes per decoded token = (linear weights + the whole tied LM head V*D) * bytes per "
                             "weight + KV cache read (2 * kv_heads * head_dim * context per layer, window-limited "
                             "on sliding layers) at the mean context; bandwidth = that * decode tokens/s. "
                             "Read bandwidth = a sum over a 1 GiB fp32 array in the same framework."}


def chart(path: Path, title: str, panels: list[tuple[str, dict[str, float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    axes = axes if len(panels) > 1 else [axes]
    colors = ["#2b6cb0", "#dd6b20", "#d69e2e", "#38a169", "#805ad5"]
    for ax, (label, values) in zip(axes, panels):
        names = list(values)
        bars = ax.bar(range(len(names)), [values[n] for n in names], color=colors[:len(names)])
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.margins(y=0.15)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _link(png: Path) -> str:
    """The chart's path as RESULTS.md (in benchmarks/) links it."""
    try:
        return str(png.resolve().relative_to(REPO / "benchmarks"))
    except ValueError:
        return str(png.resolve())


def _name(k: str, v: dict) -> str:
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    if k == "mlx_persona_bf16mm":
        return "mlx_persona bf16 pinned" if "decode_tokens_per_sec" in v else "mlx_persona fp32+bf16mm"
    return f"mlx_persona {short.get(v['dtype'], v['dtype'])}" if k == "mlx_persona" else f"torch {v['dtype'].split(' ')[0]}"


def train_markdown(t: dict, chart_rel: str | None) -> str:
    res = t["results"]
    lines = [f"### Training: mlx_persona vs PyTorch (transformers + peft), {t['preset']} (random weights), LoRA "
             f"r{t['rank']} alpha {t['alpha']} on {len(t['modules'])} linear layers of every block, batch "
             f"{t['batch_size']}, {t['examples']} examples x {t['epochs']} epochs, {len(t['timed_steps'])} timed steps",
             "", "| framework | device | dtype | tokens/s (all) | loss tokens/s | s/step (median) | peak RSS GB "
             "| MLX peak GB | first loss | final loss | peak matmul GFLOP/s | model GFLOP/s | MFU | executed GFLOP/s "
             "| exp Melem/s | LM-head exp s/step |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k, v in res.items():
        lines.append(f"| {_name(k, v)} | {v['device']} | {v['dtype']} | {v['tokens_per_sec']:.0f} | "
                     f"{v['loss_tokens_per_sec']:.0f} | {v['median_sec_per_step']:.3f} | {v['max_rss_gb']:.2f} | "
                     f"{v.get('peak_memory_gb_mlx', float('nan')):.2f} | {v['first_loss']:.4f} | {v['final_loss']:.4f} | "
                     f"{v['peak_matmul_gflops']:.0f} | {v['achieved_model_gflops']:.1f} | {100 * v['mfu']:.1f}% | "
                     f"{v['executed_gflops']:.1f} | {v['exp_melem_per_sec']:.0f} | {v['lm_head_exp_sec_per_step']:.2f} |")
    if t["trials"] > 1:
        lines += ["", f"{t['trials']} trials, taking turns; each row is the median trial. tokens/s per trial: "
                  + "; ".join(f"{_name(k, v)} " + ", ".join(f"{x:.0f}" for x in v["trials_tokens_per_sec"])
                              for k, v in res.items())
                  + ". best mlx_persona / best PyTorch per trial: "
                  + ", ".join(f"{x:.2f}x" for x in t["trial_ratios_tokens_per_sec_vs_best_torch"]) + "."]
    loads = ", ".join(f"{_name(k, v)} {v['load_avg_before'][0]}→{v['load_avg_after'][0]} (got "
                      f"{100 * v['cpu_share']:.0f}% of the cores while training)" for k, v in res.items())
    best = t.get("best_mlx", "mlx_persona")
    mlx_keys = [k for k in res if k.startswith("mlx_persona")]
    where = f"{os.cpu_count()} cores, shared machine" if "cpu" in res[best]["device"].lower() else "host CPU"
    like = "; ".join(f"{_name(k.split('_vs_')[0], res[k.split('_vs_')[0]])} / torch {k.split('_vs_torch_')[1]}: "
                     f"**{v:.2f}x**" for k, v in t.get("ratios_like_for_like", {}).items())
    lines += ["", f"best mlx_persona ({_name(best, res[best])}) / best PyTorch ({t['best_torch']}) tokens/s: "
              f"**{t['ratio_tokens_per_sec_vs_best_torch']:.2f}x** (target >= 1.0)"
              + (f"; like for like: {like}" if like else "")
              + "; MFU " + ", ".join(f"{_name(k, res[k])} **{100 * res[k]['mfu']:.1f}%**" for k in mlx_keys)
              + " (target >= 40% at gemma-3-270m). "
              f"Loss agreement: " + ", ".join(f"{k} {v:.2g}" for k, v in t["checks"].items()) + ".",
              f"1-min load average before→after each run ({where}): {loads}. CPU: {_cpu()}.",
              f"FLOPs: {t['flops_formula']} MFU = model FLOP/s / peak matmul FLOP/s measured in the same process "
              "(same framework and dtype) just before training. Peak RSS = getrusage ru_maxrss of the worker process; "
              "MLX peak = mx.get_peak_memory() (MLX arrays only). LM-head exp s/step = the exp() calls of the softmax "
              "over the vocabulary (head positions x vocab; one exp per logit for mlx_persona's fused loss, two for torch's "
              "log_softmax forward and backward) at the exp rate measured in the same process: elementwise work that no "
              "matmul FLOP count sees."]
    if chart_rel:
        lines += ["", f"![training chart]({chart_rel})"]
    return "\n".join(lines)


def _cpu() -> str:
    from mlx_persona.backend.cpu import describe_flags

    return f"{cpu_model()} ({describe_flags()}), {os.cpu_count()} CPUs"


def generate_markdown(g: dict, chart_rel: str | None) -> str:
    res = g["results"]
    any_r = next(iter(res.values()))
    lines = [f"### Generation: mlx_persona vs PyTorch, {g['preset']} (random weights), persona preset "
             f"({', '.join(f'{k}={v}' for k, v in g['settings'].items())}), up to {g['max_new_tokens']} new tokens, "
             f"batch 1; {len(any_r['short_prompt_tokens'])} eval prompts ({min(any_r['short_prompt_tokens'])}-"
             f"{max(any_r['short_prompt_tokens'])} tokens) + one {any_r['long_prompt_tokens']}-token multi-turn prompt",
             "", "| framework | device | dtype | decode tokens/s | prompt tokens/s (short, median) | prompt tokens/s (long) | "
             "first token s (short, median) | weight+KV bytes/token | decode GB/s | read GB/s (1 GiB sum) | "
             "peak RSS GB |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k, v in res.items():
        lines.append(f"| {_name(k, v)} | {v['device']} | {v['dtype']} | {v['decode_tokens_per_sec']:.1f} | "
                     f"{v['prompt_tokens_per_sec_short']:.0f} | {v['prompt_tokens_per_sec_long']:.0f} | "
                     f"{v['first_token_sec_short_median']:.3f} | {v['bytes_per_decoded_token'] / 1e6:.0f} MB | "
                     f"{v['decode_bandwidth_gbs']:.1f} | {v['read_bandwidth_gbs']:.1f} | {v['max_rss_gb']:.2f} |")
    loads = ", ".join(f"{_name(k, v)} {v['load_avg_before'][0]}→{v['load_avg_after'][0]}" for k, v in res.items())
    lines += ["", f"{g['timing']}. {g['bytes_formula']} 1-min load average before→after: {loads}. "
              f"CPU: {_cpu()}."]
    if chart_rel:
        lines += ["", f"![generation chart]({chart_rel})"]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["train", "generate", "all"], default="all")
    p.add_argument("--preset", default="gemma-3-270m", choices=["tiny", "gemma-3-270m", "gemma-3-1b"])
    p.add_argument("--examples", type=int, default=12, help="training examples (one epoch = examples/batch steps)")
    p.add_argument("--epochs", type=int, default=2, help="epoch 1 is the warm-up, the rest are timed")
    p.add_argument("--trials", type=int, default=1,
                   help="training runs per framework, taking turns; the median trial is reported")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accumulation", type=int, default=1, help="micro-batches per optimizer step (both frameworks)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--mlx-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="auto: float32 on the CPU backend, bfloat16 on a GPU (Metal or CUDA)")
    p.add_argument("--mlx-matmul", choices=["auto", "fp32", "bf16", "both"], default="auto",
                   help="MLX training runs with exact fp32 matmuls, with bf16 matmul inputs (MLX_PERSONA_MATMUL=bf16, "
                        "oneMKL; x86-64 Linux), or both; auto: both where the CPU has AMX or AVX512-BF16 and oneMKL "
                        "is installed, else fp32")
    p.add_argument("--torch-dtype", choices=["float32", "bfloat16", "both"], default="both",
                   help="bfloat16 = autocast with fp32 weights in training, bf16 weights in generation")
    p.add_argument("--torch-loss", choices=["all", "loss"], default="all",
                   help="all: logits at every position as transformers does; loss: only at loss positions")
    p.add_argument("--prompts", type=int, default=3, help="eval prompts for generation (plus one long prompt)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "out"))
    p.add_argument("--charts", default=str(REPO / "benchmarks" / "charts"))
    p.add_argument("--no-results", action="store_true", help="do not append to benchmarks/RESULTS.md")
    p.add_argument("--quick", action="store_true",
                   help="smoke tests only: tiny peak/bandwidth probes, independent workers run at once")
    p.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--job", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        write_json(Path(a.result), WORKERS[a.worker](json.loads(Path(a.job).read_text())))
        return None

    if a.quick:
        os.environ["BENCH_QUICK"] = "1"  # read by the workers
    command = "python benchmarks/bench_mlx_vs_torch.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out, charts = Path(a.out), Path(a.charts)
    result = {"benchmark": "mlx_persona vs PyTorch", "command": command.strip(), "machine": machine_info(),
              "load_avg_start": load_avg()}
    tmp = Path(tempfile.mkdtemp(prefix="bench_mlx_vs_torch."))
    md = []
    try:
        if a.part in ("train", "all"):
            t = run_train(a, tmp)
            result["train"] = t
            png = charts / f"mlx_vs_torch_train_{a.preset}.png"
            res = t["results"]
            chart(png, f"LoRA training, {a.preset}, {next(iter(res.values()))['device']}", [
                ("tokens/s (all tokens)", {_name(k, v): v["tokens_per_sec"] for k, v in res.items()}),
                ("peak RSS GB", {_name(k, v): v["max_rss_gb"] for k, v in res.items()}),
                ("MFU %", {_name(k, v): 100 * v["mfu"] for k, v in res.items()})])
            md.append(train_markdown(t, _link(png)))
        if a.part in ("generate", "all"):
            g = run_generate(a, tmp)
            result["generate"] = g
            png = charts / f"mlx_vs_torch_generate_{a.preset}.png"
            res = g["results"]
            chart(png, f"Generation (persona preset), {a.preset}", [
                ("decode tokens/s", {_name(k, v): v["decode_tokens_per_sec"] for k, v in res.items()}),
                ("prompt tokens/s (long prompt)", {_name(k, v): v["prompt_tokens_per_sec_long"] for k, v in res.items()}),
                ("decode GB/s", {_name(k, v): v["decode_bandwidth_gbs"] for k, v in res.items()})])
            md.append(generate_markdown(g, _link(png)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if a.quick:
            os.environ.pop("BENCH_QUICK", None)
    result["load_avg_end"] = load_avg()
    text = "\n\n".join(md)
    write_results(out, f"bench_mlx_vs_torch_{a.preset}", result, text, append=not a.no_results)
    return result


if __name__ == "__main__":
    main()
