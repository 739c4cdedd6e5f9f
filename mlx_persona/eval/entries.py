"""The models an evaluation compares: named entries ``[NAME=]SPEC[@ADAPTER]``, checked and resolved up
front, then loaded one at a time (and released before the next), so comparing several never holds more
than one in memory.
"""

from __future__ import annotations

import gc
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


def _default_name(spec: str, adapter: str | None) -> str:
    if adapter:
        return Path(adapter).name
    if spec.startswith("builtin:"):
        return spec
    return Path(spec).name or spec


def parse_model_arg(text: str) -> ModelEntry:
    """Parses ``[NAME=]SPEC[@ADAPTER]``.

    ``SPEC`` is a model folder, hub id or ``builtin:NAME``; ``@ADAPTER`` an output folder of
    ``mlx-persona train`` applied to it. A LoRA/DoRA output folder given as ``SPEC`` alone stands for
    its recorded base model plus itself as the adapter; a ``method: full`` output is a model folder.
    ``NAME`` (letters, digits, ``_ . + -``) labels the model in the report; by default the adapter's
    folder name, else the spec's last path component.

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
    return ModelEntry(name or _default_name(spec, adapter), spec, adapter)


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
