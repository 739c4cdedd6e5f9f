"""``run(cfg)``: what ``mlx-persona train`` does around the loop.

It locks the output folder for the run's life (:func:`mlx_persona.outputs.output_lock`: a second
writer fails at once, before it reads or changes anything), checks it, loads the model and the data,
attaches adapters, builds the optimizer, restores a checkpoint on ``--resume``, calls
:func:`mlx_persona.tuner.trainer.train` with callbacks that write ``metrics.jsonl``, the progress bar
and ``best/``, then writes the results (adapters or a model folder, ``summary.json``, ``loss.png``).
Only rank 0 of a data-parallel run touches the folder (and takes its lock).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import yaml
from mlx.utils import tree_flatten

from mlx_persona import data as data_mod
from mlx_persona import testing
from mlx_persona.backend import sgemm
from mlx_persona.backend.pinned import pin_frozen
from mlx_persona.models import load_model, resolve_model
from mlx_persona.outputs import check_output_dir, output_lock, prepare_output_dir
from mlx_persona.tuner import checkpoint as ckpt
from mlx_persona.tuner.adapters import attach_adapters, trainable_parameter_count
from mlx_persona.tuner.batching import batch_plan
from mlx_persona.tuner.config import (PREFERENCE_METHODS, ConfigError, TrainConfig, absolute_paths,
                                       absolute_saved_paths, config_diff, to_dict)
from mlx_persona.tuner.losses import loss_fn
from mlx_persona.tuner.progress import Progress
from mlx_persona.tuner.results import MetricsWriter, save_result, summarize
from mlx_persona.tuner.trainer import (Callbacks, TrainingArgs, TrainingCallback, TrainingError, build_schedule,
                                       new_loop_state, train)

# Config keys that may change between a run and its resume: they change no weight or result file.
RESUME_MAY_CHANGE = {"output", "overwrite", "progress", "log_every", "save_every", "keep_checkpoints"}
_RESUME_HINT = ", --resume to continue it"


def _check_output(out: Path, cfg: TrainConfig, resume: bool, force: bool) -> None:
    """Checks the output folder (on resume, that the config is the run's); changes nothing on disk."""
    if resume:
        saved = out / "config.yaml"
        if not saved.exists():
            raise TrainingError(f"{out}: nothing to resume (no config.yaml); run without --resume")
        from mlx_persona.safe_io import load_yaml  # no aliases, bounded; its InputError is one line

        old = load_yaml(saved)
        if not isinstance(old, dict):
            raise TrainingError(f"{saved}: not a training config (expected a mapping)")
        diff = [k for k in config_diff(absolute_saved_paths(old), to_dict(cfg)) if k not in RESUME_MAY_CHANGE]
        if diff and not force:
            raise TrainingError(f"{out}: the config differs from the run being resumed in: {', '.join(diff)}. "
                                "Use the same config (e.g. --config OUT/config.yaml), or pass --force to "
                                "resume anyway.")
    else:  # --overwrite deletes earlier runs (a folder with config.yaml), nothing else
        check_output_dir(out, cfg.overwrite, must_hold="config.yaml", hint=_RESUME_HINT)


def _make_output(out: Path, cfg: TrainConfig) -> bool:
    """Empties (``--overwrite``) and creates the folder of a new run, once everything it needs has loaded.

    Returns:
        Whether a failure before the first step should remove it again (False for a folder that was
        already there and empty: someone else's).
    """
    theirs = out.is_dir() and not any(out.iterdir())
    prepare_output_dir(out, cfg.overwrite, must_hold="config.yaml", hint=_RESUME_HINT)
    return not theirs


def _data_id(ds) -> str:
    """A fingerprint of the encoded training set (tokens and loss masks): what the batch plan depends on."""
    if hasattr(ds, "fingerprint"):  # preference pairs (their reference log-probabilities included)
        return ds.fingerprint()
    h = hashlib.sha256()
    for tokens, mask in zip(ds.tokens, ds.masks):
        h.update(np.int64(len(tokens)).tobytes() + tokens.astype(np.int32).tobytes())
        h.update(mask.astype(np.uint8).tobytes())
    return h.hexdigest()[:16]


def _resume(out: Path, model, optimizer, data_id: str, force: bool, rank: int, size: int, log,
            limits: tuple[int, int]) -> dict | None:
    """Loads the newest intact checkpoint into the model, the optimizer and the PRNG.

    Rank 0 reads it and checks that it fits this model and data (unless `force`); other ranks receive it
    from rank 0. A checkpoint whose state is impossible for this run (`limits`: its total steps and the
    batches of an epoch; see ``checkpoint.check_state``) is skipped like a damaged one, for an older one.

    Returns:
        The checkpoint's loop state, or None when there is no checkpoint yet (a run stopped before its
        first save starts again from step 0, which is the same thing).
    """
    weights_like = dict(tree_flatten(model.trainable_parameters()))
    found = None
    if rank == 0:
        try:
            total_steps, n_batches = limits
            found = ckpt.load_latest(out / "checkpoints", log=log, check=lambda step, state: ckpt.check_state(
                state, step, total_steps, n_batches if state.get("data") == data_id else None))
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


def _load_data(cfg: TrainConfig, tokenizer, log):
    train_ex, valid_ex = data_mod.load_splits(Path(cfg.data), cfg.valid_data,
                                              system_ok=data_mod.template_supports_system(tokenizer))
    train_ds = data_mod.prepare_dataset(tokenizer, train_ex, cfg.max_seq_len, cfg.on_long)
    valid_ds = data_mod.prepare_dataset(tokenizer, valid_ex, cfg.max_seq_len, cfg.on_long) if valid_ex else None
    r = train_ds.report
    log(f"data: {r['kept']} training examples ({r['truncated']} truncated, {r['dropped']} dropped), "
        f"{r['loss_tokens']} loss tokens of {r['tokens']}; "
        f"{len(valid_ds.tokens) if valid_ds else 0} validation examples")
    if len(train_ds.tokens) < cfg.batch_size:
        raise ConfigError(f"batch_size: {cfg.batch_size} is larger than the {len(train_ds.tokens)} training examples")
    return train_ds, valid_ds


def _attach(model, cfg: TrainConfig, base: Path, log) -> tuple[dict, int]:
    try:
        adapter_config = attach_adapters(model, cfg.method, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout,
                                         cfg.lora.modules, cfg.lora.num_layers)
    except ValueError as e:  # e.g. lora.modules names a layer this model does not have
        raise ConfigError(str(e)) from None
    adapter_config.update({"model": str(base), "model_spec": cfg.model})
    n_trainable = trainable_parameter_count(model)
    log(f"model: {cfg.model} ({base}); method {cfg.method}; {n_trainable:,} trainable parameters"
        + (f"; matmuls: {sgemm.bf16_status()}" if sgemm.bf16_active() else ""))
    return adapter_config, n_trainable


class _ProgressBar(TrainingCallback):
    def __init__(self, progress: Progress, report=None):
        self.progress, self.tokens, self.time, self.report = progress, 0, 0.0, report

    def on_step(self, info):
        self.tokens, self.time = self.tokens + info["tokens"], self.time + info["seconds"]
        extra = {}
        if self.report is not None:  # preference training: the step's reward margin and accuracy
            r = self.report(info["stats"])
            extra = {"extra": f"margin {r['reward_margin']:.3f}  acc {r['reward_accuracy']:.2f}"}
        self.progress.update(info["step"], loss=info["loss"], tps=self.tokens / max(self.time, 1e-9), **extra)

    def on_eval(self, info):
        self.progress.note(f"step {info['step']}: val_loss {info['val_loss']:.4f}")


class _TestHold(TrainingCallback):
    """Test-only (:mod:`mlx_persona.testing`): ``MLX_PERSONA_TEST_HOLD=step:N`` holds the run after step N."""

    def on_step(self, info):
        testing.hold(f"step:{info['step']}")


class _BestWriter(TrainingCallback):
    """Writes ``OUT/best/`` whenever the validation loss is the best so far."""

    def __init__(self, model, cfg, adapter_config, base: Path, out: Path):
        self.args = (model, cfg, adapter_config, base, out / "best")

    def on_eval(self, info):
        if info["improved"]:
            save_result(*self.args)


def run(cfg: TrainConfig, *, resume: bool = False, force: bool = False, log=print,
        callback: TrainingCallback | None = None) -> dict:
    """Fine-tunes a model as `cfg` says and writes the output folder.

    Its local paths are made absolute first (:func:`~mlx_persona.tuner.config.absolute_paths`), so the
    ``config.yaml`` it saves, and the resume command it prints, work from any folder.

    Args:
        cfg: a validated :class:`TrainConfig`.
        resume: continue from the newest intact checkpoint in ``cfg.output``.
        force: resume even if the config changed.
        log: where progress lines go (rank 0 only).
        callback: also sees every step and evaluation (e.g. a benchmark's timer).

    Returns:
        The summary dict also written to ``summary.json``.
    """
    world = mx.distributed.init()
    rank, size = world.rank(), world.size()
    if rank != 0:
        log = lambda *a, **k: None  # noqa: E731
    if cfg.batch_size < size:
        raise ConfigError(f"batch_size: {cfg.batch_size} is smaller than the number of processes ({size})")
    cfg = absolute_paths(cfg)
    out = Path(cfg.output)
    # One writer per folder: taken before the folder is first looked at (the "already exists" check,
    # --resume's checkpoints), held until the last result is written. Other ranks never touch OUT.
    with output_lock(out) if rank == 0 else nullcontext():
        testing.hold("start")
        return _run(cfg, out, rank, size, resume, force, log, callback)


@dataclass
class _Loaded:
    """What a run has loaded and built before its folder is made."""

    model: object
    optimizer: object
    train_ds: object
    valid_ds: object
    adapter_config: dict
    base: Path
    n_trainable: int
    loop: dict
    data_id: str
    total_steps: int
    loss: object = loss_fn
    evaluate: object = None  # the trainer's default: losses.evaluate_loss


def _load(cfg: TrainConfig, out: Path, rank: int, size: int, resume: bool, force: bool, log) -> _Loaded:
    """The model with its adapters, the data, the optimizer and (on resume) the checkpoint's state."""
    mx.random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    base = resolve_model(cfg.model)
    model, tokenizer = load_model(base, dtype=cfg.dtype)
    loss, evaluate = loss_fn, None
    if cfg.method in PREFERENCE_METHODS:
        from mlx_persona.tuner import preference_run

        train_ds, valid_ds = preference_run.load_pair_data(cfg, tokenizer, log)
        adapter_config, n_trainable = preference_run.attach(model, cfg, base, log)
        # DPO's reference: the starting model's log-probabilities, before a checkpoint's weights replace it.
        loss, evaluate, train_ds, valid_ds = preference_run.prepare(model, cfg, train_ds, valid_ds, log)
        lengths = train_ds.lengths()
    else:
        train_ds, valid_ds = _load_data(cfg, tokenizer, log)
        adapter_config, n_trainable = _attach(model, cfg, base, log)
        lengths = [len(t) for t in train_ds.tokens]
    pin_frozen(model)  # MLX_PERSONA_MATMUL=bf16: a bf16 copy of each frozen weight (none for full)
    if cfg.grad_checkpoint:
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(model.layers[0])

    n_batches = len(batch_plan(lengths, cfg.batch_size))
    steps_per_epoch = max(n_batches // cfg.grad_accumulation, 1)
    total_steps = cfg.steps or cfg.epochs * steps_per_epoch
    optimizer = optim.AdamW(learning_rate=build_schedule(cfg.optim, total_steps), betas=cfg.optim.betas,
                            eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    optimizer.init(model.trainable_parameters())

    loop, data_id = new_loop_state(), _data_id(train_ds)
    if resume:
        loop = _resume(out, model, optimizer, data_id, force, rank, size, log, (total_steps, n_batches)) or loop
        log(f"resuming at step {loop['step']} of {total_steps} (epoch {loop['epoch']}, batch {loop['batch']})")
    return _Loaded(model, optimizer, train_ds, valid_ds, adapter_config, base, n_trainable, loop, data_id,
                   total_steps, loss, evaluate)


def _run(cfg: TrainConfig, out: Path, rank: int, size: int, resume: bool, force: bool, log,
         callback: TrainingCallback | None) -> dict:
    """:func:`run` once the output folder is this process's: check it, load everything, then make it."""
    if rank == 0:
        _check_output(out, cfg, resume, force)
    loaded = _load(cfg, out, rank, size, resume, force, log)
    loop = loaded.loop
    if resume and (loop["step"] >= loaded.total_steps or loop["stop_reason"] != "completed") and \
            (out / "summary.json").is_file():
        log(f"{out}: the run is finished; its results stay as they are")  # nothing to train or rewrite
        return json.loads((out / "summary.json").read_text())
    # A new run's folder is made (or emptied, with --overwrite) only now: a bad model, data or config
    # fails before it, and a failure before the first step removes it again.
    removable = rank == 0 and not resume and _make_output(out, cfg)
    started = _Started()
    try:
        return _train_and_save(loaded, cfg, out, rank, size, resume, log, Callbacks(started, callback))
    except BaseException:
        if removable and not started.seen:
            shutil.rmtree(out, ignore_errors=True)
        raise


class _Started(TrainingCallback):
    """Notes that a step has run."""

    seen = False

    def on_step(self, info):
        self.seen = True


def _train_and_save(loaded: _Loaded, cfg: TrainConfig, out: Path, rank: int, size: int, resume: bool, log,
                    callback: TrainingCallback) -> dict:
    """Writes the config, runs the loop from the loaded state and writes the results."""
    model, loop, total_steps, base = loaded.model, loaded.loop, loaded.total_steps, loaded.base
    report = getattr(loaded.loss, "report", None)
    metrics = MetricsWriter(out / "metrics.jsonl", cfg.log_every, total_steps, enabled=rank == 0, report=report)
    if rank == 0:
        if resume:
            metrics.truncate(loop["step"])
        ckpt.write_text_atomic(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))

    how = f"mlx.launch -n {size} -- python -m mlx_persona.train" if size > 1 else "mlx-persona train"
    args = TrainingArgs.from_config(cfg, total_steps, checkpoint_dir=out / "checkpoints",
                                    checkpoint_meta={"config": to_dict(cfg), "data": loaded.data_id},
                                    resume_command=f"{how} --config {out / 'config.yaml'} --resume")
    progress = Progress(total_steps, enabled=cfg.progress and rank == 0)
    progress.start(loop["step"])
    best = _BestWriter(model, cfg, loaded.adapter_config, base, out) if rank == 0 else None
    try:
        loop = train(model, loaded.optimizer, loaded.train_ds, loaded.valid_ds, args, loop=loop, loss=loaded.loss,
                     evaluate=loaded.evaluate,
                     callback=Callbacks(metrics, _ProgressBar(progress, report), best, callback,
                                        _TestHold() if testing.requested() else None))
    finally:
        progress.close()

    summary = summarize(cfg, loop, loaded.n_trainable, loaded.train_ds.report)
    if rank == 0:
        # A resumed run's process saw only its own part: the peak is the largest any part recorded.
        summary["peak_memory_gb"] = max(summary["peak_memory_gb"], _recorded_peak(out / "metrics.jsonl"))
        testing.hold("results")
        save_result(model, cfg, loaded.adapter_config, base, out)
        ckpt.write_json_atomic(out / "summary.json", summary)
        try:
            from mlx_persona.eval.plots import plot_loss

            plot_loss(out / "metrics.jsonl", out / "loss.png")
        except (ImportError, OSError) as e:  # matplotlib is a core dependency; keep training results regardless
            log(f"warning: no loss plot ({e})")
    log(f"done: {loop['step']} steps in {loop['train_time']:.1f}s, {summary['tokens_per_sec']:.0f} tokens/s, "
        f"peak memory {summary['peak_memory_gb']:.2f} GB"
        + (f", best val_loss {loop['best_val']:.4f} at step {loop['best_step']}" if loop["best_val"] is not None else "")
        + f"; wrote {out}")
    return summary


def _recorded_peak(path: Path) -> float:
    """The largest ``peak_memory_gb`` of the rows of ``metrics.jsonl`` (0 without any)."""
    peak = 0.0
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                value = json.loads(line).get("peak_memory_gb")
            except (ValueError, AttributeError):
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                peak = max(peak, float(value))
    return peak
