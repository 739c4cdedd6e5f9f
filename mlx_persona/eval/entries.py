"""The models an evaluation compares: named entries ``[NAME=]SPEC[@ADAPTER]``, checked and resolved up
front, then loaded one at a time (and released before the next), so comparing several never holds more
than one in memory. A fine-tuned entry knows the model it was trained from (``base``), so the report can
set it against that model when the evaluation holds it too (:func:`find_bases`).
"""

from __future__ import annotations

import gc
import json
import re
from dataclasses import dataclass
from pathlib import Path

from mlx_persona.eval.options import EvalError
from mlx_persona.runs import adapter_config, is_adapter_folder, recorded_base

# A report name: letters, digits, ``_ . + -`` (also what a recipe's variant names must be).
NAMED = re.compile(r"^([A-Za-z0-9][\w.+-]*)=(.+)$")


@dataclass
class ModelEntry:
    """A model to evaluate: its report name, spec (folder, hub id, ``builtin:NAME``) and adapter folder."""

    name: str
    model: str
    adapter: str | None = None
    note: str = ""  # how it was made (compare: the training run)
    base: str | None = None  # the spec it was fine-tuned from (an adapter's model, a full run's recorded model)


def _default_name(spec: str, adapter: str | None) -> str:
    if adapter:
        return Path(adapter).name
    if spec.startswith("builtin:"):
        return spec
    return Path(spec).name or spec


def _full_run_base(folder: Path) -> str | None:
    """The model a full fine-tune's output folder of ``train`` (SFT or preference) was trained from (its ``summary.json``)."""
    try:
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or not isinstance(summary.get("model"), str):
        return None
    # `method` is what was trained for (sft's "full", or "dpo"/"orpo"); `fine_tune_type`, what was trained
    if summary.get("fine_tune_type", summary.get("method")) != "full":
        return None
    return summary["model"]


def parse_model_arg(text: str) -> ModelEntry:
    """Parses ``[NAME=]SPEC[@ADAPTER]``.

    ``SPEC`` is a model folder, hub id or ``builtin:NAME``; ``@ADAPTER`` an output folder of
    ``mlx-persona train`` applied to it. A LoRA/DoRA output folder given as ``SPEC`` alone stands for
    its recorded base model plus itself as the adapter; a ``method: full`` output is a model folder.
    ``NAME`` (letters, digits, ``_ . + -``) labels the model in the report; by default the adapter's
    folder name, else the spec's last path component. The entry's ``base`` is the spec an adapter is
    applied to, or the model a full fine-tune's ``summary.json`` names.

    Examples: ``builtin:tiny``, ``base=google/gemma-3-1b-it``, ``ft=google/gemma-3-1b-it@runs/bluey-1b-it``,
    ``ft=runs/bluey-1b-it``.
    """
    text = text.strip()
    m = NAMED.match(text)
    name, rest = (m.group(1), m.group(2)) if m else (None, text)
    spec, adapter = rest.rsplit("@", 1) if "@" in rest else (rest, None)
    if not spec or adapter == "":
        raise EvalError(f"--model {text!r}: expected [NAME=]SPEC[@ADAPTER], e.g. ft=google/gemma-3-1b-it@runs/bluey-1b-it")
    if adapter is not None and not Path(adapter).is_dir():
        raise EvalError(f"--model {text!r}: {adapter}: no such adapter folder")
    folder = Path(spec)
    if adapter is None and is_adapter_folder(folder):
        base = recorded_base(adapter_config(folder))
        if not base:
            raise EvalError(f"--model {text!r}: {folder}/adapter_config.json names no base model; "
                            f"use BASE@{folder}")
        spec, adapter = base, str(folder)
    base = spec if adapter is not None else _full_run_base(folder)
    return ModelEntry(name or _default_name(spec, adapter), spec, adapter, base=base)


def check_names(models: list[ModelEntry]) -> None:
    """At least one model, and no two with the same report name (they key every table)."""
    if not models:
        raise EvalError("no model to evaluate; pass --model (repeatable)")
    seen = set()
    for m in models:
        if m.name in seen:
            raise EvalError(f"two models are named {m.name!r}; name them with --model NAME=SPEC[@ADAPTER]")
        seen.add(m.name)


def resolve_all(models: list[ModelEntry]) -> None:
    """Resolves (builds, fetches) every model before any work, so a bad spec fails first, not last."""
    from mlx_persona.models import resolve_model

    for m in models:
        resolve_model(m.model)
        if m.adapter is not None and not Path(m.adapter).is_dir():
            raise EvalError(f"{m.name}: {m.adapter}: no such adapter folder")


def _folder(spec: str) -> Path | None:
    """The local folder a spec names, fetching nothing: an existing folder, or a built-in's cache folder."""
    from mlx_persona.models import ModelError, resolve_model

    if spec.startswith("builtin:"):
        try:
            return resolve_model(spec).resolve()
        except ModelError:  # a built-in this version does not have: not in this evaluation
            return None
    local = Path(spec).expanduser()
    return local.resolve() if local.is_dir() else None


def find_bases(models: list[ModelEntry]) -> dict[str, str | None]:
    """Report name -> the name of the entry that is its base model as published (no adapter, not itself
    fine-tuned from anything), or None when the evaluation does not hold it.

    The same spec text wins (``builtin:tiny-it`` is ``builtin:tiny``'s folder under another name), then the
    same local folder (an adapter folder alone records its base as the folder it was trained on; a
    built-in is its cache folder); hub ids match by text only, so nothing is fetched.
    """
    plain = [m for m in models if m.adapter is None and m.base is None]
    folders = {p.name: _folder(p.model) for p in plain}
    found: dict[str, str | None] = {}
    for m in models:
        found[m.name] = None
        if m.base is None:
            continue
        same = [p.name for p in plain if p.model == m.base]
        if not same and (folder := _folder(m.base)) is not None:
            same = [p.name for p in plain if folders[p.name] == folder]
        found[m.name] = same[0] if same else None
    return found


def load_entry(entry: ModelEntry, log=print):
    """``(model, tokenizer, end_ids)`` of one entry. The caller drops them and calls :func:`release`
    before loading the next."""
    from mlx_persona.generation import end_token_ids
    from mlx_persona.models import load_model, resolve_model

    log(f"{entry.name}: loading {entry.model}" + (f" + {entry.adapter}" if entry.adapter else ""))
    model, tok = load_model(entry.model, adapter_path=entry.adapter)
    return model, tok, end_token_ids(tok, resolve_model(entry.model))


def release() -> None:
    """Frees what the last model held (Python objects, then MLX's buffer cache)."""
    import mlx.core as mx

    gc.collect()
    mx.clear_cache()
