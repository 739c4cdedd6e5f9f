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

__all__ = ["ADAPTER_CONFIG", "RunFolderError", "adapter_config", "is_adapter_folder", "is_run_folder",
           "recorded_base", "resolve_run", "where"]


class RunFolderError(ValueError):
    """A model/adapter pair that names nothing loadable; the message says why and what to pass."""


def where(path: str | Path) -> str:
    """`path` for a message about it not being found: a relative one says what it was resolved against."""
    return str(path) if Path(path).expanduser().is_absolute() else f"{path} (resolved against {Path.cwd()})"


def adapter_config(folder: str | Path | None) -> dict:
    """The run's ``adapter_config.json``; ``{"fine_tune_type": "full"}`` for a folder without one
    (a full fine-tune), ``{}`` for no folder."""
    if folder is None:
        return {}
    path = Path(folder) / ADAPTER_CONFIG
    if not path.exists():
        return {"fine_tune_type": "full"}
    from mlx_persona import safe_io

    try:
        config = json.loads(safe_io.read_text(path, 1 << 16))
    except safe_io.InputError as e:
        raise RunFolderError(str(e)) from None
    except (ValueError, RecursionError) as e:
        raise RunFolderError(f"{path}: not valid JSON ({safe_io.clip(str(e), 120)})") from None
    if not isinstance(config, dict):
        raise RunFolderError(f"{path}: expected a JSON object (an adapter folder's adapter_config.json)")
    return config


def is_adapter_folder(folder: str | Path) -> bool:
    """True for an adapter run (``adapter_config.json`` and no ``config.json``), which needs its base model."""
    folder = Path(folder)
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file()


def is_run_folder(folder: str | Path) -> bool:
    """True for an output folder of ``mlx-persona train`` (adapter or full): it holds ``config.yaml`` and
    a result (``adapter_config.json`` or ``config.json``)."""
    folder = Path(folder)
    return (folder / "config.yaml").is_file() and ((folder / ADAPTER_CONFIG).is_file()
                                                    or (folder / "config.json").is_file())


def resolve_run(model: str | None, adapter: str | None, *,
                model_flag: str = "--model") -> tuple[str, str | None]:
    """The model spec and adapter folder a ``--model``/``--adapter`` pair means, run folders unfolded
    (what ``eval --model RUN`` does).

    - ``adapter`` a LoRA/DoRA run, no ``model``: the run's recorded base, with the run as the adapter;
    - ``adapter`` a full fine-tune's folder (a whole model), no ``model``: that folder as the model;
    - ``model`` a LoRA/DoRA run, no ``adapter``: its recorded base, with the run as the adapter;
    - otherwise as given (``model`` + ``adapter`` applies the adapter, LoRA or full weights, to that model).

    Args:
        model, adapter: as typed (either may be None).
        model_flag: how a message names the model (a command's flag).

    Returns:
        ``(model spec, adapter folder or None)``.

    Raises:
        RunFolderError: no model, a missing folder, or an adapter run that names no base model.
    """
    if adapter is not None:
        folder = Path(adapter).expanduser()
        if not folder.is_dir():
            raise RunFolderError(f"{where(adapter)}: no such adapter folder")
        if not (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file():
            raise RunFolderError(f"{adapter}: not an output folder of `mlx-persona train` (it holds neither "
                                 f"{ADAPTER_CONFIG} nor a model's config.json)")
        if model is not None:
            return model, adapter
        if not is_adapter_folder(folder):  # a full fine-tune: the folder is a whole model
            return adapter, None
        return _base_of(folder, model_flag), adapter
    if model is None:
        raise RunFolderError(f"no model: pass {model_flag} (a model, or an output folder of `mlx-persona train`)")
    if is_adapter_folder(Path(model).expanduser()):
        return _base_of(Path(model).expanduser(), model_flag), model
    return model, None


def _base_of(folder: Path, model_flag: str) -> str:
    base = recorded_base(adapter_config(folder))
    if not base:
        raise RunFolderError(f"{folder / ADAPTER_CONFIG}: names no base model; pass {model_flag} BASE")
    return base


def recorded_base(config: dict) -> str | None:
    """The base model an adapter run records, as a model spec; None when it names none.

    The folder trained on if it is still here, else the spec it came from (a hub id or builtin), so a
    run copied to another machine still finds its base.

    Args:
        config: the run's adapter config (see :func:`adapter_config`).
    """
    recorded = config.get("model")
    return recorded if recorded and Path(recorded).is_dir() else config.get("model_spec") or recorded
