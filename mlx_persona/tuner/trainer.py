"""The training loop. ``python -m mlx_persona.train`` is ``mlx-persona train``.

One function, :func:`train`, reads top to bottom: load the model and data, attach adapters, build
the compiled step, then loop over length-grouped batches with evaluation, checkpoints and logging.
Data-parallel runs (``mlx.launch -n N -- python -m mlx_persona.train ...``) split every global batch
across ranks, average gradients over them (each rank's loss is scaled so that the average is the
gradient of the global batch) and let only rank 0 touch the output folder.

Resume is exact: a checkpoint holds the trainable weights, the optimizer state (whose step count is
also the schedule position), the loop position (step, epoch, next batch of the epoch's order) and the
PRNG key, so a resumed run computes the same steps, bit for bit, as one that was never stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import yaml
from mlx.nn.utils import average_gradients
from mlx.utils import tree_flatten, tree_map

from mlx_persona import data as data_mod
from mlx_persona.backend import sgemm
from mlx_persona.models import load_model, resolve_model
from mlx_persona.outputs import prepare_output_dir
from mlx_persona.tuner import checkpoint as ckpt
from mlx_persona.tuner.adapters import (
    attach_adapters,
    save_adapters,
    trainable_parameter_count,
)
from mlx_persona.tuner.batching import batch_plan, epoch_order, shard_batch
from mlx_persona.tuner.config import ConfigError, TrainConfig, config_diff, to_dict
from mlx_persona.tuner.losses import evaluate_loss, loss_fn
from mlx_persona.tuner.progress import Progress


class TrainingError(Exception):
    """The run cannot go on (bad output folder, non-finite loss, interrupted); message says what to do."""

    exit_code = 1


class Interrupted(TrainingError):
    """Stopped by SIGINT or SIGTERM after saving a checkpoint; the exit code is 128 + the signal."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


# Config keys that may change between a run and its resume: they change no weight or result file.
RESUME_MAY_CHANGE = {"output", "overwrite", "progress", "log_every", "save_every", "keep_checkpoints"}


def build_schedule(cfg: TrainConfig, total_steps: int):
    """Linear warm-up to the learning rate, then cosine decay to ``min_lr_ratio`` of it."""
    o = cfg.optim
    warmup = min(o.warmup_steps, max(total_steps - 1, 0))
    decay = optim.cosine_decay(o.learning_rate, max(total_steps - warmup, 1), o.learning_rate * o.min_lr_ratio)
    if warmup == 0:
        return decay
    ramp = optim.linear_schedule(o.learning_rate / warmup, o.learning_rate, warmup)
    return optim.join_schedules([ramp, decay], [warmup])


def global_norm(grads) -> mx.array:
    """The L2 norm of all gradients together (float32), as ``torch.nn.utils.clip_grad_norm_`` computes it."""
    return mx.sqrt(sum((g.astype(mx.float32) ** 2).sum() for _, g in tree_flatten(grads)))


def clip_by_global_norm(grads, norm: mx.array, max_norm: float):
    """Scales `grads` by ``min(max_norm / (norm + 1e-6), 1)`` (torch's rule); ``max_norm <= 0``: unchanged."""
    if max_norm <= 0:
        return grads
    scale = mx.minimum(max_norm / (norm + 1e-6), 1.0)
    return tree_map(lambda g: g * scale.astype(g.dtype), grads)


def track_validation(loop: dict, val: float, step: int, patience: int) -> tuple[bool, bool]:
    """Records a validation loss in the loop state.

    Returns:
        (improved: this is the best so far, so ``best/`` should be written; stop: `patience` > 0
        evaluations in a row have not improved on the best).
    """
    if loop["best_val"] is None or val < loop["best_val"]:
        loop["best_val"], loop["best_step"], loop["bad_evals"] = val, step, 0
        return True, False
    loop["bad_evals"] += 1
    return False, bool(patience) and loop["bad_evals"] >= patience


class _StopFlag:
    """SIGINT/SIGTERM ask the loop to save at the next step boundary; a second SIGINT exits at once."""

    def __init__(self):
        self.requested = None  # the signal's name
        self.exit_code = None  # 128 + the signal's number
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested is not None and signum == signal.SIGINT:
            sys.stderr.write("\nsecond interrupt: exiting now without saving\n")
            sys.stderr.flush()
            os._exit(130)
        self.requested = signal.Signals(signum).name
        self.exit_code = 128 + signum
        sys.stderr.write(f"\n{self.requested}: saving a checkpoint at the end of this step "
                         "(press Ctrl-C again to exit at once without saving)\n")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _prepare_output(out: Path, cfg: TrainConfig, resume: bool, force: bool) -> None:
    """Checks the output folder (on resume, that the config is the run's); makes it if needed."""
    if resume:
        saved = out / "config.yaml"
        if not saved.exists():
            raise TrainingError(f"{out}: nothing to resume (no config.yaml); run without --resume")
        old = yaml.safe_load(saved.read_text())
        diff = [k for k in config_diff(old, to_dict(cfg)) if k not in RESUME_MAY_CHANGE]
        if diff and not force:
            raise TrainingError(f"{out}: the config differs from the run being resumed in: {', '.join(diff)}. "
                                "Use the same config (e.g. --config OUT/config.yaml), or pass --force to "
                                "resume anyway.")
    else:  # --overwrite deletes earlier runs (a folder with config.yaml), nothing else
        prepare_output_dir(out, cfg.overwrite, must_hold="config.yaml", hint=", --resume to continue it")
    out.mkdir(parents=True, exist_ok=True)


def _data_id(ds) -> str:
    """A fingerprint of the encoded training set (tokens and loss masks): what the batch plan depends on."""
    h = hashlib.sha256()
    for tokens, mask in zip(ds.tokens, ds.masks):
        h.update(np.int64(len(tokens)).tobytes() + tokens.astype(np.int32).tobytes())
        h.update(mask.astype(np.uint8).tobytes())
    return h.hexdigest()[:16]


def _resume(out: Path, model, optimizer, data_id: str, force: bool, rank: int, size: int, log) -> dict | None:
    """Loads the newest intact checkpoint into the model, the optimizer and the PRNG.

    Rank 0 reads it and checks that it fits this model and data (unless `force`); other ranks receive it
    from rank 0.

    Returns:
        The checkpoint's loop state, or None when there is no checkpoint yet (a run stopped before its
        first save starts again from step 0, which is the same thing).
    """
    weights_like = dict(tree_flatten(model.trainable_parameters()))
    found = None
    if rank == 0:
        try:
            found = ckpt.load_latest(out / "checkpoints", log=log)
        except ckpt.CheckpointError as e:
            raise TrainingError(str(e)) from None
        problem = found and ckpt.mismatch(found[1], found[2], weights_like, optimizer.state)
        if problem:
            raise TrainingError(f"{found[0]}: cannot resume from it: {problem}")
        if found and found[3].get("data") != data_id and not force:
            raise TrainingError(f"{found[0]}: the training data (its tokens or loss masks) differ from the run "
                                "being resumed. Use the same data and model, or pass --force to resume anyway.")
    if size > 1:
        found = ckpt.broadcast(found, weights_like, optimizer.state)
    if found is None:
        log(f"{out}: no checkpoint yet; starting from step 0")
        return None
    path, weights, opt_state, saved = found
    model.load_weights(list(weights.items()), strict=False)  # keys checked by ckpt.mismatch
    optimizer.state = opt_state
    ckpt.set_rng_state(saved["rng"])
    return saved["loop"]


def _truncate_metrics(path: Path, step: int) -> None:
    """Drops metrics rows after `step` (and a torn last line) so that a resumed run does not repeat them."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            keep.append(line + "\n")
    ckpt.write_text_atomic(path, "".join(keep))


def _nonfinite(what: str, value: float, step: int, out: Path) -> TrainingError:
    saved = ckpt.list_checkpoints(out / "checkpoints")
    kept = f"the last checkpoint, {saved[-1]}, is untouched" if saved else "no checkpoint had been written yet"
    return TrainingError(f"the {what} became {value} at step {step}; stopping without saving ({kept}). "
                         "Try a lower optim.learning_rate or optim.max_grad_norm, or check the data.")


def _write_model_folder(model, base: Path, out: Path) -> None:
    """A complete model folder (full fine-tuning): weights plus the base model's config and tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "tokenizer.model", "chat_template.jinja"):
        if (base / name).exists():
            shutil.copy2(base / name, out / name)


def _save_result(model, cfg, adapter_config, base: Path, out: Path) -> None:
    """Writes the adapters (or a model folder, for full fine-tuning) into `out`, each file atomically."""
    tmp = out / ".tmp-result"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if cfg.method == "full":
        _write_model_folder(model, base, tmp)
    else:
        save_adapters(model, tmp, adapter_config)
    ckpt.move_files_into(tmp, out)


def train(cfg: TrainConfig, *, resume: bool = False, force: bool = False, log=print) -> dict:
    """Fine-tunes a model as `cfg` says and writes the output folder.

    Args:
        cfg: a validated :class:`TrainConfig`.
        resume: continue from the newest intact checkpoint in ``cfg.output``.
        force: resume even if the config changed.
        log: where progress lines go (rank 0 only).

    Returns:
        The summary dict also written to ``summary.json``.
    """
    world = mx.distributed.init()
    rank, size = world.rank(), world.size()
    if rank != 0:
        log = lambda *a, **k: None  # noqa: E731
    if cfg.batch_size < size:
        raise ConfigError(f"batch_size: {cfg.batch_size} is smaller than the number of processes ({size})")
    out = Path(cfg.output)
    if rank == 0:
        _prepare_output(out, cfg, resume, force)
    mx.random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    # --- model and data -----------------------------------------------------------------------------
    base = resolve_model(cfg.model)
    model, tokenizer = load_model(base, dtype=cfg.dtype)
    data_path = Path(cfg.data)
    train_ex, valid_ex = data_mod.load_splits(data_path, cfg.valid_data,
                                              system_ok=data_mod.template_supports_system(tokenizer))
    train_ds = data_mod.prepare_dataset(tokenizer, train_ex, cfg.max_seq_len, cfg.on_long)
    valid_ds = data_mod.prepare_dataset(tokenizer, valid_ex, cfg.max_seq_len, cfg.on_long) if valid_ex else None
    r = train_ds.report
    log(f"data: {r['kept']} training examples ({r['truncated']} truncated, {r['dropped']} dropped), "
        f"{r['loss_tokens']} loss tokens of {r['tokens']}; "
        f"{len(valid_ds.tokens) if valid_ds else 0} validation examples")
    if len(train_ds.tokens) < cfg.batch_size:
        raise ConfigError(f"batch_size: {cfg.batch_size} is larger than the {len(train_ds.tokens)} training examples")

    try:
        adapter_config = attach_adapters(model, cfg.method, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout,
                                         cfg.lora.modules, cfg.lora.num_layers)
    except ValueError as e:  # e.g. lora.modules names a layer this model does not have
        raise ConfigError(str(e)) from None
    adapter_config.update({"model": str(base), "model_spec": cfg.model})
    n_trainable = trainable_parameter_count(model)
    log(f"model: {cfg.model} ({base}); method {cfg.method}; {n_trainable:,} trainable parameters"
        + (f"; matmuls: {sgemm.bf16_status()}" if sgemm.bf16_active() else ""))
    if cfg.grad_checkpoint:
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(model.layers[0])

    # Global batches (every rank computes the same plan and takes its slice of each batch).
    lengths = [len(t) for t in train_ds.tokens]
    plan = batch_plan(lengths, cfg.batch_size)
    loss_tokens = [int(m[1:].sum()) for m in train_ds.masks]
    plan_loss_tokens = [sum(loss_tokens[i] for i in idx) for idx in plan]
    accum = cfg.grad_accumulation
    steps_per_epoch = max(len(plan) // accum, 1)
    total_steps = cfg.steps or cfg.epochs * steps_per_epoch

    optimizer = optim.AdamW(learning_rate=build_schedule(cfg, total_steps), betas=cfg.optim.betas,
                            eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    optimizer.init(model.trainable_parameters())

    loop = {"step": 0, "epoch": 0, "batch": 0, "best_val": None, "best_step": None, "bad_evals": 0,
            "stop_reason": "completed", "tokens": 0, "loss_tokens": 0, "train_time": 0.0}
    data_id = _data_id(train_ds)
    if resume:
        loop = _resume(out, model, optimizer, data_id, force, rank, size, log) or loop
        log(f"resuming at step {loop['step']} of {total_steps} (epoch {loop['epoch']}, batch {loop['batch']})")
        if rank == 0:
            _truncate_metrics(out / "metrics.jsonl", loop["step"])
    if rank == 0:
        ckpt.write_text_atomic(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))

    # --- the compiled step --------------------------------------------------------------------------
    state = [model.state, optimizer.state, mx.random.state]
    value_and_grad = nn.value_and_grad(model, partial(loss_fn, chunk=cfg.loss_chunk))

    @partial(mx.compile, inputs=state, outputs=state)
    def grad_step(inputs, targets, positions, weights, denom):
        (loss, _), grads = value_and_grad(model, inputs, targets, positions, weights, denom)
        return loss, grads

    @mx.compile
    def reduce_grads(grads):
        grads = average_gradients(grads)  # the identity for one process
        return grads, global_norm(grads)

    @partial(mx.compile, inputs=state, outputs=state)
    def apply_update(grads, norm):
        optimizer.update(model, clip_by_global_norm(grads, norm, cfg.optim.max_grad_norm))

    def sum_over_ranks(values: list[float]) -> list[float]:
        return mx.distributed.all_sum(mx.array(values)).tolist() if size > 1 else values

    def run_eval():
        model.eval()
        val = evaluate_loss(model, valid_ds, cfg.batch_size, cfg.loss_chunk, cfg.eval_batches, (rank, size))
        model.train()
        return val

    def save_state():
        if rank != 0:
            return
        weights = dict(tree_flatten(model.trainable_parameters()))
        saved = {"loop": loop, "rng": ckpt.rng_state(), "config": to_dict(cfg), "data": data_id}
        ckpt.save_checkpoint(out / "checkpoints", loop["step"], weights, optimizer.state, saved)
        keep = {loop["best_step"]} if loop["best_step"] is not None else set()
        ckpt.prune(out / "checkpoints", cfg.keep_checkpoints, keep)

    def record(row):
        if rank == 0:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    # --- the loop -----------------------------------------------------------------------------------
    model.train()
    progress = Progress(total_steps, enabled=cfg.progress and rank == 0)
    progress.start(loop["step"])
    mx.reset_peak_memory()
    window = {"loss": 0.0, "n": 0, "tokens": 0, "loss_tokens": 0, "time": 0.0}
    stop_reason = loop.get("stop_reason", "completed")  # an early-stopped run stays stopped when resumed
    with _StopFlag() as stop:
        while loop["step"] < total_steps and stop_reason == "completed":
            tic = time.perf_counter()
            # The global batches of this step's micro-batches, in the epoch's order.
            micro = []
            for _ in range(accum):
                order = epoch_order(len(plan), cfg.seed, loop["epoch"])
                micro.append(order[loop["batch"]])
                loop["batch"] += 1
                if loop["batch"] >= len(order):
                    loop["epoch"], loop["batch"] = loop["epoch"] + 1, 0
            # Each rank's loss is its part of the sum over every loss token of the step, divided by
            # `denom`; averaging the ranks' gradients then gives those of the mean over the step.
            denom = mx.array(max(sum(plan_loss_tokens[j] for j in micro), 1) / size)
            grads, loss_sum, n_loss, n_tok = None, 0.0, 0, 0
            for j in micro:
                b = shard_batch(train_ds.tokens, train_ds.masks, plan[j], rank, size)
                loss, g = grad_step(mx.array(b.inputs), mx.array(b.targets), mx.array(b.positions),
                                    mx.array(b.weights), denom)
                grads = g if grads is None else tree_map(mx.add, grads, g)
                mx.eval(loss, grads)
                loss_sum, n_loss, n_tok = loss_sum + loss.item(), n_loss + b.n_loss, n_tok + b.n_tokens
            grads, norm = reduce_grads(grads)
            # One small all-reduce: the step's loss, its tokens, and whether any rank was asked to stop.
            loss_sum, n_loss, n_tok, stopping = sum_over_ranks(
                [loss_sum / size, n_loss, n_tok, float(stop.requested is not None)])
            # Checked before the update, so that nothing non-finite ever reaches the weights or a file.
            if not math.isfinite(loss_sum):
                raise _nonfinite("loss", loss_sum, loop["step"] + 1, out)
            if not math.isfinite(norm.item()):
                raise _nonfinite("gradient norm", norm.item(), loop["step"] + 1, out)
            apply_update(grads, norm)
            mx.eval(state)
            dt = time.perf_counter() - tic
            loop["step"] += 1
            loop["tokens"] += int(n_tok)
            loop["loss_tokens"] += int(n_loss)
            loop["train_time"] += dt
            for k, v in (("loss", loss_sum), ("n", 1), ("tokens", n_tok), ("loss_tokens", n_loss), ("time", dt)):
                window[k] += v
            progress.update(loop["step"], loss=loss_sum, tps=window["tokens"] / max(window["time"], 1e-9))

            step = loop["step"]
            if step % cfg.log_every == 0 or step == total_steps:
                row = {"step": step, "epoch": loop["epoch"], "loss": window["loss"] / window["n"],
                       "lr": float(optimizer.learning_rate.item()), "grad_norm": float(norm.item()),
                       "tokens_per_sec": window["tokens"] / window["time"],
                       "loss_tokens_per_sec": window["loss_tokens"] / window["time"],
                       "sec_per_step": window["time"] / window["n"],
                       "peak_memory_gb": mx.get_peak_memory() / 1e9}
                record(row)
                window = {"loss": 0.0, "n": 0, "tokens": 0, "loss_tokens": 0, "time": 0.0}
            if valid_ds and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps):
                val = run_eval()
                record({"step": step, "val_loss": val, "val_ppl": math.exp(min(val, 50))})
                progress.note(f"step {step}: val_loss {val:.4f}")
                improved, stop_now = track_validation(loop, val, step, cfg.early_stopping_patience)
                if improved and rank == 0:
                    _save_result(model, cfg, adapter_config, base, out / "best")
                if stop_now:
                    stop_reason = f"early stopping: no improvement in {loop['bad_evals']} evaluations"
                    loop["stop_reason"] = stop_reason
            if (cfg.save_every and step % cfg.save_every == 0) or step == total_steps or \
                    stopping or stop_reason != "completed":
                save_state()
            if stopping:
                progress.close()
                how = f"mlx.launch -n {size} -- python -m mlx_persona.train" if size > 1 else "mlx-persona train"
                raise Interrupted(f"{stop.requested or 'a stop request on another process'} at step {step}: "
                                  f"checkpoint saved in {out / 'checkpoints'}. Resume with:\n"
                                  f"  {how} --config {out / 'config.yaml'} --resume",
                                  stop.exit_code or 143)
    progress.close()

    # --- results ------------------------------------------------------------------------------------
    summary = {
        "model": cfg.model, "method": cfg.method, "steps": loop["step"], "epochs": loop["epoch"],
        "stop_reason": stop_reason, "train_time_sec": round(loop["train_time"], 3),
        "tokens": loop["tokens"], "loss_tokens": loop["loss_tokens"],
        "tokens_per_sec": loop["tokens"] / max(loop["train_time"], 1e-9),
        "peak_memory_gb": mx.get_peak_memory() / 1e9, "trainable_parameters": n_trainable,
        "best_val_loss": loop["best_val"], "best_step": loop["best_step"], "data": train_ds.report,
        "matmul_inputs": "bfloat16" if sgemm.bf16_active() else "exact",  # MLX_PERSONA_MATMUL
    }
    if rank == 0:
        _save_result(model, cfg, adapter_config, base, out)
        ckpt.write_json_atomic(out / "summary.json", summary)
        try:
            from mlx_persona.eval.plots import plot_loss

            plot_loss(out / "metrics.jsonl", out / "loss.png")
        except ImportError as e:  # matplotlib is a core dependency; keep training results regardless
            log(f"warning: no loss plot ({e})")
    log(f"done: {loop['step']} steps in {loop['train_time']:.1f}s, {summary['tokens_per_sec']:.0f} tokens/s, "
        f"peak memory {summary['peak_memory_gb']:.2f} GB"
        + (f", best val_loss {loop['best_val']:.4f} at step {loop['best_step']}" if loop["best_val"] is not None else "")
        + f"; wrote {out}")
    return summary

