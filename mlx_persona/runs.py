"""Run folders: what an output folder of ``mlx-persona train`` holds, read back by the commands that use one.

A LoRA/DoRA run holds mlx-lm's adapter layout: ``adapters.safetensors`` and ``adapter_config.json``,
which also records the base model twice: ``model``, the folder it was trained on, and ``model_spec``,
what was asked for (a hub id, ``builtin:NAME`` or a folder). A full fine-tune holds a whole model
folder (``config.json`` and weights) and no ``adapter_config.json``.

Nothing heavy is imported here (no mlx), so eval and export can both use it.
"""

from __future__ import annotations

import json
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"

__all__ = ["ADAPTER_CONFIG", "adapter_config", "is_adapter_folder", "recorded_base"]


def adapter_config(folder: str | Path | None) -> dict:
    """The run's ``adapter_config.json``; ``{"fine_tune_type": "full"}`` for a folder without one
    (a full fine-tune), ``{}`` for no folder."""
    if folder is None:
        return {}
    path = Path(folder) / ADAPTER_CONFIG
    return json.loads(path.read_text()) if path.exists() else {"fine_tune_type": "full"}


def is_adapter_folder(folder: str | Path) -> bool:
    """True for an adapter run (``adapter_config.json`` and no ``config.json``), which needs its base model."""
    folder = Path(folder)
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file()


def recorded_base(config: dict) -> str | None:
    """The base model an adapter run records, as a model spec; None when it names none.

    The folder trained on if it is still here, else the spec it came from (a hub id or builtin), so a
    run copied to another machine still finds its base.

    Args:
        config: the run's adapter config (see :func:`adapter_config`).
    """
    recorded = config.get("model")
    return recorded if recorded and Path(recorded).is_dir() else config.get("model_spec") or recorded
