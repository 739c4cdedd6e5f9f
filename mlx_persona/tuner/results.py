"""What a training run writes besides checkpoints: the metrics file and the result (adapters or a model).

``metrics.jsonl`` has one row every ``log_every`` steps (step, epoch, loss averaged over the window,
lr, grad_norm, tokens/s, loss tokens/s, s/step, peak memory) and one per validation (val_loss, val_ppl).
The result is mlx-lm's adapter layout (``adapters.safetensors`` + ``adapter_config.json``) or, for full
fine-tuning, a complete model folder; every file is written atomically.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_persona import safe_io
from mlx_persona.tuner import checkpoint as ckpt
from mlx_persona.tuner.adapters import save_adapters
from mlx_persona.tuner.trainer import TrainingCallback


class MetricsWriter(TrainingCallback):
    """Appends the loop's steps (averaged over ``log_every``) and evaluations to ``metrics.jsonl``."""

    def __init__(self, path: Path, log_every: int, total_steps: int, enabled: bool = True, report=None):
        self.path, self.log_every, self.total_steps, self.enabled = path, log_every, total_steps, enabled
        self.report = report  # the loss's stats (sums over the window) -> the row's extra values
        self._new_window()

    def _new_window(self):
        self.window = {"loss": 0.0, "n": 0, "tokens": 0, "loss_tokens": 0, "time": 0.0, "stats": {}}

    def _record(self, row: dict) -> None:
        if self.enabled:
            with safe_io.writing(self.path), open(self.path, "a") as f:  # a torn last line: see truncate
                f.write(json.dumps(row) + "\n")

    def on_step(self, info: dict) -> None:
        w = self.window
        w["loss"] += info["loss"]
        w["n"] += 1
        w["tokens"] += info["tokens"]
        w["loss_tokens"] += info["loss_tokens"]
        w["time"] += info["seconds"]
        for k, v in info.get("stats", {}).items():
            w["stats"][k] = w["stats"].get(k, 0.0) + v
        step = info["step"]
        if step % self.log_every == 0 or step == self.total_steps:
            self._record({"step": step, "epoch": info["epoch"], "loss": w["loss"] / w["n"], "lr": info["lr"],
                          "grad_norm": info["grad_norm"], "tokens_per_sec": w["tokens"] / w["time"],
                          "loss_tokens_per_sec": w["loss_tokens"] / w["time"], "sec_per_step": w["time"] / w["n"],
                          "peak_memory_gb": mx.get_peak_memory() / 1e9,
                          **(self.report(w["stats"]) if self.report is not None else {})})
            self._new_window()

    def on_eval(self, info: dict) -> None:
        self._record({"step": info["step"], "val_loss": info["val_loss"],
                      "val_ppl": math.exp(min(info["val_loss"], 50))})

    def truncate(self, step: int) -> None:
        """Drops rows after `step` (and a torn last line) so that a resumed run does not repeat them."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                keep.append(line + "\n")
        ckpt.write_text_atomic(self.path, "".join(keep))


def _write_model_folder(model, base: Path, out: Path) -> None:
    """A complete model folder (full fine-tuning): weights plus the base model's config and tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "tokenizer.model", "chat_template.jinja"):
        if (base / name).exists():
            shutil.copy2(base / name, out / name)


def save_result(model, cfg, adapter_config: dict, base: Path, out: Path) -> None:
    """Writes the adapters (or a model folder, for full fine-tuning) into `out`, each file atomically."""
    tmp = out / ".tmp-result"
    shutil.rmtree(tmp, ignore_errors=True)
    with safe_io.writing(out, tmp):  # a full disk: one line, and the temporary folder removed
        tmp.mkdir(parents=True)
        if cfg.adapter_kind == "full":
            _write_model_folder(model, base, tmp)
        else:
            save_adapters(model, tmp, adapter_config)
        ckpt.move_files_into(tmp, out)


def adapter_config_kind(cfg) -> str:
    """``lora``, ``dora`` or ``full``: what the run trained (``auto``: the start run's adapter kind)."""
    kind = cfg.adapter_kind
    if kind == "auto":  # the start run's adapter, trained on; new LoRA on a model (or a full run's weights)
        from mlx_persona.runs import adapter_config, is_adapter_folder

        start = cfg.preference.start_from
        kind = adapter_config(start).get("fine_tune_type", "lora") if start and is_adapter_folder(start) else "lora"
    return kind


def summarize(cfg, loop: dict, n_trainable: int, data_report: dict) -> dict:
    """The run's ``summary.json``: what was trained, how far, how fast, the best validation loss."""
    from mlx_persona.backend import sgemm

    return {
        "model": cfg.model, "method": cfg.method, "fine_tune_type": adapter_config_kind(cfg), "steps": loop["step"], "epochs": loop["epoch"],
        "stop_reason": loop["stop_reason"], "train_time_sec": round(loop["train_time"], 3),
        "tokens": loop["tokens"], "loss_tokens": loop["loss_tokens"],
        "tokens_per_sec": loop["tokens"] / max(loop["train_time"], 1e-9),
        "peak_memory_gb": mx.get_peak_memory() / 1e9, "trainable_parameters": n_trainable,
        "best_val_loss": loop["best_val"], "best_step": loop["best_step"], "data": data_report,
        "matmul_inputs": "bfloat16" if sgemm.bf16_active() else "exact",  # MLX_PERSONA_MATMUL
    }
