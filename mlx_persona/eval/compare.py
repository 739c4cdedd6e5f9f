"""Comparisons: a YAML recipe (``configs/compare-*.yaml``) whose variants are trained (or reused, or
loaded as they are) and then evaluated together in one report (``mlx-persona compare``).

The only evaluation module that trains: it calls :func:`mlx_persona.tuner.run.run`, lazily, so the
rest of :mod:`mlx_persona.eval` never imports the trainer.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mlx_persona.eval.entries import NAMED, ModelEntry, parse_model_arg, resolve_all
from mlx_persona.eval.evaluate import evaluate
from mlx_persona.eval.options import EvalError, EvalOptions, check_inputs
from mlx_persona.outputs import output_lock
from mlx_persona.safe_io import InputError, clip, load_yaml, shorten
from mlx_persona.sampling import GenerationConfig

_VARIANT_KEYS = ("name", "model", "adapter", "train", "set")
_RECIPE_KEYS = ("output", "variants", "eval", "generation")
# The type each ``eval:`` key must have (anything not listed: a string).
_EVAL_KINDS = {"seeds": list, "limit": int, "early_tokens": int, "max_seq_len": int, "persona_system": bool,
               "batch_size": int}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@dataclass
class Recipe:
    """A parsed comparison recipe (see :func:`load_recipe`)."""

    path: Path
    output: str
    variants: list[dict]
    options: EvalOptions
    generation: GenerationConfig


def _read_yaml(path: Path):
    if not path.is_file():
        raise EvalError(f"{path}: no such recipe file")
    try:  # no anchors or aliases, at most 64 kB, strict UTF-8 (see mlx_persona.safe_io)
        return load_yaml(path) or {}
    except InputError as e:
        raise EvalError(str(e)) from None


def _check_variants(variants, fail) -> None:
    if not isinstance(variants, list) or not variants:
        fail("variants", "required: a list of {name, model[, adapter]} or {name, train[, set]}")
    names = set()
    for i, v in enumerate(variants):
        where = f"variants[{i}]"
        if not isinstance(v, dict):
            fail(where, "expected a mapping")
        for key in v:
            if key not in _VARIANT_KEYS:
                fail(f"{where}.{key}", f"unknown key; known keys: {', '.join(_VARIANT_KEYS)}")
        for key in v:
            if key != "set" and not isinstance(v[key], str):
                fail(f"{where}.{key}", f"must be a string, got {shorten(v[key])}")
        if not v.get("name") or not NAMED.match(f"{v['name']}=x"):
            fail(f"{where}.name", "required: letters, digits, _ . + -")
        if v["name"] in names:
            fail(f"{where}.name", f"{shorten(v['name'])} is used twice")
        names.add(v["name"])
        if ("model" in v) == ("train" in v):
            fail(where, "give exactly one of model (load it) or train (a training config to run, then load)")
        if "train" in v and "adapter" in v:
            fail(f"{where}.adapter", "comes from the training run; remove it")
        if "set" in v and ("train" not in v or not isinstance(v["set"], dict)):
            fail(f"{where}.set", "a mapping of training-config overrides, only with train")


def _eval_options(ev, fail) -> EvalOptions:
    if not isinstance(ev, dict):
        fail("eval", "expected a mapping")
    fields = {f.name: f for f in dataclasses.fields(EvalOptions)}
    for key, value in ev.items():
        if key not in fields:
            fail(f"eval.{key}", f"unknown key; known keys: {', '.join(fields)}")
        kind = _EVAL_KINDS.get(key, str)
        if not (isinstance(value, kind) and not (kind is int and isinstance(value, bool))) and \
                not (key == "valid" and value is None):
            fail(f"eval.{key}", f"expected {kind.__name__}, got {shorten(value)}")
    try:
        return EvalOptions(**ev).validate()
    except EvalError as e:
        fail("eval", str(e))


def _generation(gen: dict, fail) -> GenerationConfig:
    from mlx_persona.sampling import preset as get_preset

    name = gen.pop("preset", "default")
    try:
        base = GenerationConfig() if name == "default" else get_preset(name)
        return GenerationConfig.from_dict({**base.to_dict(), **gen})
    except ValueError as e:
        fail("generation", str(e))


def load_recipe(path: str | Path) -> Recipe:
    """Reads and checks a comparison recipe (``configs/compare-*.yaml``).

    Keys: ``output`` (report folder), ``variants`` (a list of ``{name, model, adapter}`` to load, or
    ``{name, train, set}`` to train with a training config plus dotted-key overrides and then load),
    ``eval`` (:class:`~mlx_persona.eval.options.EvalOptions` fields) and ``generation`` (``preset`` plus
    any :class:`~mlx_persona.sampling.GenerationConfig` field).

    Raises:
        EvalError: ``path: key: reason`` for the first problem.
    """
    path = Path(path)
    data = _read_yaml(path)

    def fail(key, why):  # keys and reasons shortened: a recipe's value never becomes a huge message
        raise EvalError(f"{path}: {clip(key, 120)}: {clip(why, 400)}")

    if not isinstance(data, dict):
        fail("(top level)", f"expected a mapping with keys {', '.join(_RECIPE_KEYS)}")
    for key in data:
        if key not in _RECIPE_KEYS:
            fail(key, f"unknown key; known keys: {', '.join(_RECIPE_KEYS)}")
    output = data.get("output")
    if not isinstance(output, str) or not output:
        fail("output", "required: the report folder")
    _check_variants(data.get("variants"), fail)
    options = _eval_options(data.get("eval") or {}, fail)
    if not isinstance(data.get("generation") or {}, dict):
        fail("generation", "expected a mapping")
    generation = _generation(dict(data.get("generation") or {}), fail)
    return Recipe(path, output, data["variants"], options, generation)


def _train_config(v: dict, retrain: bool):
    """The validated training config of a ``train`` variant (its ``set`` applied)."""
    from mlx_persona.tuner.config import load_config

    overrides = _flatten(v.get("set") or {})
    if retrain:
        overrides["overwrite"] = True
    return load_config(v["train"], overrides)


def _trained_entry(v: dict, retrain: bool, log) -> ModelEntry:
    """Trains a ``train`` variant unless its output holds a finished run; the entry that loads the result."""
    from mlx_persona.tuner.run import run

    cfg = _train_config(v, retrain)
    out = Path(cfg.output)
    summary_path = out / "summary.json"
    with output_lock(out):  # reuse-or-train decided, and the summary read, while no one else writes it
        if summary_path.is_file() and not retrain:
            log(f"{v['name']}: using the finished run {out} (pass --retrain to train again)")
        else:
            log(f"{v['name']}: training {cfg.model} with {v['train']} -> {out}")
            run(cfg, resume=False, force=False, log=log)
        summary = json.loads(summary_path.read_text())
    sets = ", ".join(f"{k}={val}" for k, val in _flatten(v.get("set") or {}).items())
    best = summary.get("best_val_loss")
    note = (f"trained: {v['train']}" + (f" with {sets}" if sets else "") +
            f"; {cfg.method}, {summary.get('steps')} steps" + (f", best val_loss {best:.4f}" if best is not None else ""))
    if cfg.method == "full":
        return ModelEntry(v["name"], str(out), None, note, base=cfg.model)
    return ModelEntry(v["name"], cfg.model, str(out), note, base=cfg.model)


def compare(recipe_path: str | Path, *, out: str | None = None, overwrite: bool = False, retrain: bool = False,
            limit: int | None = None, seeds: list[int] | None = None, batch_size: int | None = None,
            command: str | None = None, log: Callable = print) -> dict:
    """Trains (or reuses) every variant of a recipe, then evaluates them all in one report.

    A ``train`` variant whose output folder already holds a finished run (``summary.json``) is reused
    unless `retrain`. `out`, `limit`, `seeds` and `batch_size` override the recipe's.

    Returns:
        What :func:`~mlx_persona.eval.evaluate.evaluate` returns.
    """
    from mlx_persona.models import resolve_model

    recipe = load_recipe(recipe_path)
    options = recipe.options
    if limit is not None:
        options = dataclasses.replace(options, limit=limit)
    if seeds:
        options = dataclasses.replace(options, seeds=list(seeds))
    if batch_size is not None:
        options = dataclasses.replace(options, batch_size=batch_size).validate()
    check_inputs(options)  # before any training
    target = Path(out or recipe.output)
    with output_lock(target):  # the report folder is ours from its check to evaluate's last file
        if target.exists() and any(target.iterdir()) and not overwrite:
            raise EvalError(f"{target}: already exists and is not empty; pass --overwrite to replace it")
        # Every config checked and every model resolved (fetched) before the first training run starts.
        loaded = {}
        for v in recipe.variants:
            if "train" in v:
                resolve_model(_train_config(v, retrain).model)
            else:
                entry = parse_model_arg(f"{v['name']}={v['model']}" + (f"@{v['adapter']}" if v.get("adapter") else ""))
                resolve_all([entry])
                loaded[v["name"]] = dataclasses.replace(entry, note="loaded as is")
        entries = [_trained_entry(v, retrain, log) if "train" in v else loaded[v["name"]] for v in recipe.variants]
        return evaluate(entries, recipe.generation, options, target, overwrite=overwrite,
                        command=command or f"mlx-persona compare {recipe_path}", log=log)
