"""The training loop: :func:`train` runs the steps, evaluations, checkpoints, signals, non-finite checks
and data parallelism, and nothing else (loading and writing results is :mod:`mlx_persona.tuner.run`).

Its shape is mlx-lm's ``train(model, optimizer, train_dataset, val_dataset, args, loss, iterate_batches,
training_callback)``: the loss and the batch iterator are arguments, and a :class:`TrainingCallback`
sees every step and evaluation (the metrics file, the progress bar, ``best/`` and the benchmarks are
callbacks).

Data-parallel runs (``mlx.launch -n N -- python -m mlx_persona.train ...``) split every global batch
across ranks, average gradients over them (each rank's loss is scaled so that the average is the
gradient of the global batch) and let only rank 0 write checkpoints.

Resume is exact: a checkpoint holds the trainable weights, the optimizer state (whose step count is
also the schedule position), the loop position (step, epoch, next batch of the epoch's order) and the
PRNG key, so a resumed run computes the same steps, bit for bit, as one that was never stopped.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.nn.utils import average_gradients
from mlx.utils import tree_flatten, tree_map

from mlx_persona.tuner import checkpoint as ckpt
from mlx_persona.tuner.batching import iterate_batches as default_iterate_batches
from mlx_persona.tuner.losses import evaluate_loss, loss_fn


class TrainingError(Exception):
    """The run cannot go on (bad output folder, non-finite loss, interrupted); message says what to do."""

    exit_code = 1


class Interrupted(TrainingError):
    """Stopped by SIGINT or SIGTERM after saving a checkpoint; the exit code is 128 + the signal."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


class TrainingCallback:
    """What the loop reports; override any method (they do nothing here).

    ``on_start(model, loop)`` once, before the first step (the weights it starts from, e.g. after a
    resume). ``on_step(info)`` after every optimizer step, on every rank: ``step``, ``epoch``, ``loss`` (mean over
    the step's loss tokens, all ranks), ``grad_norm``, ``lr``, ``tokens``, ``loss_tokens`` (all ranks),
    ``seconds``, ``batches`` (the global batches of the step, as example indices), ``stats`` (the loss's
    named sums over the step, all ranks; empty for SFT).
    ``on_eval(info)`` after every validation: ``step``, ``val_loss``, ``improved`` (the best so far).
    """

    def on_start(self, model, loop: dict) -> None:
        pass

    def on_step(self, info: dict) -> None:
        pass

    def on_eval(self, info: dict) -> None:
        pass


class Callbacks(TrainingCallback):
    """Several callbacks as one, called in order."""

    def __init__(self, *callbacks: TrainingCallback | None):
        self.callbacks = [c for c in callbacks if c is not None]

    def on_start(self, model, loop: dict) -> None:
        for c in self.callbacks:
            c.on_start(model, loop)

    def on_step(self, info: dict) -> None:
        for c in self.callbacks:
            c.on_step(info)

    def on_eval(self, info: dict) -> None:
        for c in self.callbacks:
            c.on_eval(info)


@dataclass
class TrainingArgs:
    """The loop's settings (:meth:`from_config` takes them from a ``TrainConfig``)."""

    total_steps: int
    batch_size: int = 4
    grad_accumulation: int = 1
    seed: int = 0
    max_grad_norm: float = 1.0
    eval_every: int = 0  # and at the end
    eval_batches: int = -1
    early_stopping_patience: int = 0
    save_every: int = 0  # and at the end, on a stop request, and on early stopping
    keep_checkpoints: int = 2
    loss_chunk: int = 8192
    checkpoint_dir: Path | None = None  # None: no checkpoints
    checkpoint_meta: dict = field(default_factory=dict)  # saved in every checkpoint's state.json
    resume_command: str = "mlx-persona train --resume"  # shown when a signal stops the run

    @classmethod
    def from_config(cls, cfg, total_steps: int, **extra) -> "TrainingArgs":
        return cls(total_steps=total_steps, batch_size=cfg.batch_size, grad_accumulation=cfg.grad_accumulation,
                   seed=cfg.seed, max_grad_norm=cfg.optim.max_grad_norm, eval_every=cfg.eval_every,
                   eval_batches=cfg.eval_batches, early_stopping_patience=cfg.early_stopping_patience,
                   save_every=cfg.save_every, keep_checkpoints=cfg.keep_checkpoints, loss_chunk=cfg.loss_chunk,
                   **extra)


def new_loop_state() -> dict:
    """The loop position a checkpoint saves, at the start of a run."""
    return {"step": 0, "epoch": 0, "batch": 0, "best_val": None, "best_step": None, "bad_evals": 0,
            "stop_reason": "completed", "tokens": 0, "loss_tokens": 0, "train_time": 0.0}


def build_schedule(optim_cfg, total_steps: int):
    """Linear warm-up to the learning rate, then cosine decay to ``min_lr_ratio`` of it."""
    o = optim_cfg
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


def _nonfinite(what: str, value: float, step: int, checkpoint_dir: Path | None) -> TrainingError:
    saved = ckpt.list_checkpoints(checkpoint_dir) if checkpoint_dir else []
    kept = f"the last checkpoint, {saved[-1]}, is untouched" if saved else "no checkpoint had been written yet"
    return TrainingError(f"the {what} became {value} at step {step}; stopping without saving ({kept}). "
                         "Try a lower optim.learning_rate or optim.max_grad_norm, or check the data.")


def _compiled_step(model, optimizer, loss, args: TrainingArgs):
    """The compiled pieces of a step: gradients of one micro-batch, the all-reduce and norm, the update."""
    state = [model.state, optimizer.state, mx.random.state]
    value_and_grad = nn.value_and_grad(model, partial(loss, chunk=args.loss_chunk))

    @partial(mx.compile, inputs=state, outputs=state)
    def grad_step(inputs, targets, positions, weights, denom, *extra):
        out, grads = value_and_grad(model, inputs, targets, positions, weights, denom, *extra)
        # A loss may return a third value: a small array of sums to report (see `train`'s `loss`).
        return out[0], out[2] if len(out) > 2 else mx.zeros((0,)), grads

    @mx.compile
    def reduce_grads(grads):
        grads = average_gradients(grads)  # the identity for one process
        return grads, global_norm(grads)

    @partial(mx.compile, inputs=state, outputs=state)
    def apply_update(grads, norm):
        optimizer.update(model, clip_by_global_norm(grads, norm, args.max_grad_norm))

    return state, grad_step, reduce_grads, apply_update


def train(model, optimizer, train_set, valid_set, args: TrainingArgs, *, loss=loss_fn,
          iterate_batches=default_iterate_batches, callback: TrainingCallback | None = None,
          loop: dict | None = None, evaluate=None) -> dict:
    """Trains `model` in place for ``args.total_steps`` optimizer steps.

    Args:
        model, optimizer: an mlx-lm model (adapters attached) and an initialised MLX optimizer.
        train_set, valid_set: ``data.EncodedDataset`` (tokens and loss masks); `valid_set` may be None.
        args: the loop's settings.
        loss: ``loss(model, inputs, targets, positions, weights, denom, *batch.extra, chunk=) -> (loss,
            n_tokens)``, or ``(loss, n_tokens, stats)`` with `stats` a [K] array of sums over the batch that
            are summed over micro-batches and ranks and reported as ``info["stats"]``, named by the
            loss's ``stat_names`` (preference training: rewards, margins, accuracy).
        iterate_batches: ``iterate_batches(dataset, batch_size, seed, start=(epoch, batch),
            shard=(rank, size))`` yielding ``tuner.batching.MicroBatch`` forever, in training order.
        callback: sees every step and evaluation.
        loop: the loop state to continue from (a checkpoint's, on resume); default: a new run.
        evaluate: ``evaluate(model, valid_set, batch_size, chunk, max_batches, shard) -> float``, the
            validation loss (lower is better); default: ``losses.evaluate_loss``.

    Returns:
        The final loop state (``step``, ``epoch``, ``best_val``, ``best_step``, ``stop_reason``, token
        counts and ``train_time``).

    Raises:
        Interrupted: a SIGINT or SIGTERM stopped the run after a checkpoint was saved.
        TrainingError: the loss or the gradient norm became non-finite (nothing was saved).
    """
    world = mx.distributed.init()
    rank, size = world.rank(), world.size()
    callback = callback or TrainingCallback()
    loop = dict(loop or new_loop_state())
    state, grad_step, reduce_grads, apply_update = _compiled_step(model, optimizer, loss, args)
    stat_names = tuple(getattr(loss, "stat_names", ()))
    evaluate = evaluate or evaluate_loss
    batches = iterate_batches(train_set, args.batch_size, args.seed, start=(loop["epoch"], loop["batch"]),
                              shard=(rank, size))

    def sum_over_ranks(values: list[float]) -> list[float]:
        return mx.distributed.all_sum(mx.array(values)).tolist() if size > 1 else values

    def save_checkpoint():
        if rank != 0 or args.checkpoint_dir is None:
            return
        weights = dict(tree_flatten(model.trainable_parameters()))
        saved = {"loop": loop, "rng": ckpt.rng_state(), **args.checkpoint_meta}
        ckpt.save_checkpoint(args.checkpoint_dir, loop["step"], weights, optimizer.state, saved)
        keep = {loop["best_step"]} if loop["best_step"] is not None else set()
        ckpt.prune(args.checkpoint_dir, args.keep_checkpoints, keep)

    model.train()
    mx.reset_peak_memory()
    callback.on_start(model, loop)
    with _StopFlag() as stop:
        while loop["step"] < args.total_steps and loop["stop_reason"] == "completed":
            tic = time.perf_counter()
            micro = [next(batches) for _ in range(args.grad_accumulation)]
            loop["epoch"], loop["batch"] = micro[-1].next
            # Each rank's loss is its part of the sum over every loss token of the step, divided by
            # `denom`; averaging the ranks' gradients then gives those of the mean over the step.
            denom = mx.array(max(sum(m.global_loss_tokens for m in micro), 1) / size)
            grads, loss_sum, n_loss, n_tok, stats = None, 0.0, 0, 0, [0.0] * len(stat_names)
            for m in micro:
                b = m.batch
                value, s, g = grad_step(mx.array(b.inputs), mx.array(b.targets), mx.array(b.positions),
                                        mx.array(b.weights), denom, *(mx.array(x) for x in b.extra))
                grads = g if grads is None else tree_map(mx.add, grads, g)
                mx.eval(value, s, grads)
                loss_sum, n_loss, n_tok = loss_sum + value.item(), n_loss + b.n_loss, n_tok + b.n_tokens
                stats = [a + v for a, v in zip(stats, s.tolist())]
            grads, norm = reduce_grads(grads)
            # One small all-reduce: the step's loss, its tokens, the loss's stats, and whether any rank was
            # asked to stop.
            loss_sum, n_loss, n_tok, stopping, *stats = sum_over_ranks(
                [loss_sum / size, n_loss, n_tok, float(stop.requested is not None), *stats])
            # Checked before the update, so that nothing non-finite ever reaches the weights or a file.
            if not math.isfinite(loss_sum):
                raise _nonfinite("loss", loss_sum, loop["step"] + 1, args.checkpoint_dir)
            if not math.isfinite(norm.item()):
                raise _nonfinite("gradient norm", norm.item(), loop["step"] + 1, args.checkpoint_dir)
            apply_update(grads, norm)
            mx.eval(state)
            dt = time.perf_counter() - tic
            loop["step"] += 1
            loop["tokens"] += int(n_tok)
            loop["loss_tokens"] += int(n_loss)
            loop["train_time"] += dt
            step = loop["step"]
            callback.on_step({"step": step, "epoch": loop["epoch"], "loss": loss_sum, "grad_norm": norm.item(),
                              "lr": float(optimizer.learning_rate.item()), "tokens": int(n_tok),
                              "loss_tokens": int(n_loss), "seconds": dt, "batches": [m.indices for m in micro],
                              "stats": dict(zip(stat_names, stats))})
            if valid_set is not None and ((args.eval_every and step % args.eval_every == 0)
                                          or step == args.total_steps):
                model.eval()
                val = evaluate(model, valid_set, args.batch_size, args.loss_chunk, args.eval_batches, (rank, size))
                model.train()
                improved, stop_now = track_validation(loop, val, step, args.early_stopping_patience)
                callback.on_eval({"step": step, "val_loss": val, "improved": improved})
                if stop_now:
                    loop["stop_reason"] = f"early stopping: no improvement in {loop['bad_evals']} evaluations"
            if (args.save_every and step % args.save_every == 0) or step == args.total_steps or \
                    stopping or loop["stop_reason"] != "completed":
                save_checkpoint()
            if stopping:
                raise Interrupted(f"{stop.requested or 'a stop request on another process'} at step {step}: "
                                  f"checkpoint saved in {args.checkpoint_dir}. Resume with:\n"
                                  f"  {args.resume_command}", stop.exit_code or 143)
    return loop
