"""Persona evaluation: run a prompt set through models, measure the replies, sweep generation settings,
and compare trained variants in one report.

* :func:`evaluate` -- prompts x seeds through each model; per-reply metrics (:mod:`mlx_persona.eval.metrics`),
  validation loss, and a report folder (:mod:`mlx_persona.eval.report`). ``mlx-persona eval``.
* :func:`sweep` -- the same reply metrics for every combination of a grid of generation settings.
  ``mlx-persona sweep``.
* :func:`compare` -- a YAML recipe that trains (or reuses) variants with :func:`mlx_persona.train.train`
  and evaluates them together. ``mlx-persona compare``.

Models are named entries ``[NAME=]SPEC[@ADAPTER]`` (:func:`parse_model_arg`). They are loaded one at a
time, so comparing several never holds more than one in memory.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mlx_persona.eval.metrics import (
    DEFAULT_EARLY_TOKENS,
    StyleModel,
    reply_metrics,
    summarize,
)
from mlx_persona.outputs import prepare_output_dir
from mlx_persona.paths import DEFAULT_DATA
from mlx_persona.sampling import GenerationConfig

DEFAULT_PROMPTS = DEFAULT_DATA / "eval_prompts.jsonl"
DEFAULT_PERSONA = DEFAULT_DATA / "persona.yaml"
DEFAULT_TRAIN = DEFAULT_DATA / "train.jsonl"
DEFAULT_VALID = DEFAULT_DATA / "valid.jsonl"

# Generation settings a sweep may vary (numbers only; `stop` and `seed` are not grid axes).
GRID_KEYS = ("min_new_tokens", "max_new_tokens", "temperature", "top_k", "top_p", "min_p",
             "repetition_penalty", "no_repeat_ngram_size")
_INT_KEYS = {"min_new_tokens", "max_new_tokens", "top_k", "no_repeat_ngram_size"}


class EvalError(ValueError):
    """A problem the user can fix (a model argument, prompt file, grid or recipe); the message says where."""


# ------------------------------------------------------------------------------------------- models
@dataclass
class ModelEntry:
    """A model to evaluate: its report name, spec (folder, hub id, ``builtin:NAME``) and adapter folder."""

    name: str
    model: str
    adapter: str | None = None
    note: str = ""  # how it was made (compare: the training run)


_NAMED = re.compile(r"^([A-Za-z0-9][\w.+-]*)=(.+)$")


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
    m = _NAMED.match(text)
    name, rest = (m.group(1), m.group(2)) if m else (None, text)
    spec, adapter = rest.rsplit("@", 1) if "@" in rest else (rest, None)
    if not spec or adapter == "":
        raise EvalError(f"--model {text!r}: expected [NAME=]SPEC[@ADAPTER], e.g. ft=google/gemma-3-1b-it@runs/bluey-1b-it")
    if adapter is not None and not Path(adapter).is_dir():
        raise EvalError(f"--model {text!r}: {adapter}: no such adapter folder")
    folder = Path(spec)
    if adapter is None and (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        recorded = json.loads((folder / "adapter_config.json").read_text())
        base = recorded.get("model")
        base = base if base and Path(base).is_dir() else recorded.get("model_spec") or base
        if not base:
            raise EvalError(f"--model {text!r}: {folder}/adapter_config.json names no base model; "
                            f"use BASE@{folder}")
        spec, adapter = base, str(folder)
    return ModelEntry(name or _default_name(spec, adapter), spec, adapter)


def check_names(models: list[ModelEntry]) -> None:
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


def _load(entry: ModelEntry):
    from mlx_persona.generation import end_token_ids
    from mlx_persona.models import load_model, resolve_model

    model, tok = load_model(entry.model, adapter_path=entry.adapter)
    return model, tok, end_token_ids(tok, resolve_model(entry.model))


def _release() -> None:
    import mlx.core as mx

    gc.collect()
    mx.clear_cache()


# ------------------------------------------------------------------------------------------- inputs
def load_prompts(path: str | Path, limit: int = 0) -> list[str]:
    """The ``{"prompt": "..."}`` lines of a JSONL file (first `limit` only when > 0)."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: no such prompt file")
    prompts, problems = [], []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            problems.append(f"{path}:{i}: invalid JSON: {e}")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            problems.append(f'{path}:{i}: expected {{"prompt": "a non-empty string"}}')
            continue
        prompts.append(row["prompt"])
    if problems:
        raise EvalError("\n".join(problems))
    if not prompts:
        raise EvalError(f"{path}: no prompts")
    return prompts[:limit] if limit > 0 else prompts


def assistant_replies(path: str | Path) -> list[str]:
    """Every assistant message of a training-data JSONL (or a data folder's ``train.jsonl``)."""
    from mlx_persona.data import load_jsonl

    path = Path(path)
    if path.is_dir():
        path = path / "train.jsonl"
    return [m["content"] for ex in load_jsonl(path) for m in ex.messages if m["role"] == "assistant"]


@dataclass
class EvalOptions:
    """What an evaluation runs on, besides the models and the generation settings."""

    prompts: str = str(DEFAULT_PROMPTS)
    persona: str = str(DEFAULT_PERSONA)
    train: str = str(DEFAULT_TRAIN)  # style reference: its assistant replies
    valid: str | None = str(DEFAULT_VALID)  # validation loss (None: skip) and the reference row
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    limit: int = 0  # first N prompts; 0 = all
    persona_system: bool = False  # the training data has no system turn: off unless asked
    early_tokens: int = DEFAULT_EARLY_TOKENS
    max_seq_len: int = 1024  # validation examples are truncated to this, as in training

    def validate(self) -> "EvalOptions":
        if not self.seeds or not all(isinstance(s, int) and s >= 0 for s in self.seeds):
            raise EvalError(f"seeds: must be a non-empty list of integers >= 0, got {self.seeds!r}")
        if self.limit < 0:
            raise EvalError(f"limit: must be >= 0, got {self.limit}")
        if self.early_tokens < 1:
            raise EvalError(f"early_tokens: must be >= 1, got {self.early_tokens}")
        return self


def check_inputs(options: EvalOptions) -> None:
    """Checks the prompts, persona card and data files of `options` without building anything."""
    from mlx_persona.eval.persona import PersonaError, load_persona

    options.validate()
    load_prompts(options.prompts, options.limit)
    try:
        load_persona(options.persona)
    except PersonaError as e:
        raise EvalError(str(e)) from None
    for key in ("train", "valid"):
        path = getattr(options, key)
        if path is not None and not Path(path).exists():
            raise EvalError(f"eval.{key}: {path}: no such file")


@dataclass
class _Context:
    """What every reply is measured against, loaded once."""

    options: EvalOptions
    prompts: list[str]
    persona: object
    style: StyleModel
    system: str | None

    @classmethod
    def load(cls, options: EvalOptions) -> "_Context":
        from mlx_persona.eval.persona import load_persona

        check_inputs(options)
        persona = load_persona(options.persona)
        prompts = load_prompts(options.prompts, options.limit)
        style = StyleModel(assistant_replies(options.train))
        if options.persona_system and not persona.system_prompt.strip():
            raise EvalError(f"{options.persona}: system_prompt: empty, so --persona-system has nothing to add")
        return cls(options, prompts, persona, style, persona.system_prompt if options.persona_system else None)

    def measure(self, text: str, stop_reason: str | None) -> dict:
        return reply_metrics(text, stop_reason, persona=self.persona, style=self.style,
                             early_tokens=self.options.early_tokens)


# ------------------------------------------------------------------------------------------- generation
def _seeds_for(config: GenerationConfig, seeds: list[int], log) -> list[int]:
    if not config.do_sample and len(seeds) > 1:
        log(f"note: greedy decoding (temperature 0) gives the same reply for every seed; using seed {seeds[0]} only")
        return seeds[:1]
    return seeds


def generate_replies(model, tokenizer, end_ids, ctx: _Context, config: GenerationConfig, *,
                     name: str, extra: dict | None = None, log=print) -> list[dict]:
    """Every prompt x seed through one loaded model; one measured row per reply."""
    from mlx_persona.generation import generate

    seeds = _seeds_for(config, ctx.options.seeds, log)
    total = len(ctx.prompts) * len(seeds)
    rows, every, tic = [], max(total // 10, 1), time.perf_counter()
    for i, prompt in enumerate(ctx.prompts):
        for seed in seeds:
            r = generate(model, tokenizer, prompt, dataclasses.replace(config, seed=seed),
                         system=ctx.system, end_ids=end_ids)
            rows.append({"model": name, **(extra or {}), "prompt_id": i, "prompt": prompt, "seed": seed,
                         "text": r.text, "tokens": r.tokens, "generated_tokens": r.generated_tokens,
                         "stop_reason": r.stop_reason, "decode_tps": round(r.decode_tps, 2),
                         "metrics": ctx.measure(r.text, r.stop_reason)})
            if len(rows) % every == 0 or len(rows) == total:
                log(f"  {name}: {len(rows)}/{total} replies ({time.perf_counter() - tic:.0f}s)")
    return rows


def _summary(rows: list[dict]) -> dict:
    summary = summarize([r["text"] for r in rows], [r["metrics"] for r in rows], [r["stop_reason"] for r in rows])
    tps = [r["decode_tps"] for r in rows if r["decode_tps"]]
    summary["decode_tps"] = sum(tps) / len(tps) if tps else None
    return summary


def _reference(ctx: _Context) -> dict | None:
    """The same metrics on the held-out human-written replies: what in-character looks like."""
    if not ctx.options.valid:
        return None
    texts = assistant_replies(ctx.options.valid)
    return summarize(texts, [ctx.measure(t, None) for t in texts])


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------------------------- eval
def evaluate(models: list[ModelEntry], config: GenerationConfig, options: EvalOptions, out: str | Path, *,
             overwrite: bool = False, command: str | None = None, log: Callable = print) -> dict:
    """Runs the prompt set through each model and writes a report folder.

    Args:
        models: the models (unique names).
        config: generation settings; its ``seed`` is replaced by each of ``options.seeds``.
        options: prompts, persona card, style/validation data, seeds.
        out: the report folder (must be empty or absent unless `overwrite`).
        command: the command line, quoted in the report.
        log: progress lines.

    Returns:
        The dict written to ``summary.json``: settings, ``models`` (name -> aggregates + validation
        loss) and ``reference`` (the validation replies' aggregates, or None).

    Writes ``results.jsonl`` (one row per reply: model, prompt, seed, text, tokens, stop_reason,
    metrics), ``summary.json``, ``report.md``, ``report.html`` and the plots (``lengths.png``,
    ``rates.png``).
    """
    from mlx_persona.eval import report

    check_names(models)
    from mlx_persona.tuner import losses

    config.validate()
    ctx = _Context.load(options)
    resolve_all(models)
    out = prepare_output_dir(out, overwrite)
    all_rows, per_model = [], {}
    for entry in models:
        log(f"{entry.name}: loading {entry.model}" + (f" + {entry.adapter}" if entry.adapter else ""))
        model, tok, end_ids = _load(entry)
        rows = generate_replies(model, tok, end_ids, ctx, config, name=entry.name, log=log)
        summary = _summary(rows)
        if options.valid:
            summary.update(losses.validation_loss(model, tok, options.valid, max_seq_len=options.max_seq_len))
            log(f"  {entry.name}: validation loss {summary['val_loss']:.4f} (perplexity {summary['val_ppl']:.1f})")
        per_model[entry.name] = {"model": entry.model, "adapter": entry.adapter, "note": entry.note, **summary}
        all_rows += rows
        del model, tok
        _release()
    result = {
        "out": str(out), "command": command, "generation": config.to_dict(), "options": dataclasses.asdict(options),
        "prompts": ctx.prompts, "system": ctx.system, "models": per_model, "reference": _reference(ctx),
    }
    _write_jsonl(out / "results.jsonl", all_rows)
    (out / "summary.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    report.write_eval_report(out, result, all_rows)
    return result


# ------------------------------------------------------------------------------------------- sweep
def parse_grid(items: list[str] | tuple[str, ...]) -> dict[str, list]:
    """``["min_new_tokens=0,50", "temperature=0.8"]`` -> ``{"min_new_tokens": [0, 50], "temperature": [0.8]}``."""
    grid: dict[str, list] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not raw.strip():
            raise EvalError(f"--grid {item!r}: expected KEY=V1,V2,..., e.g. --grid min_new_tokens=0,50")
        if key not in GRID_KEYS:
            raise EvalError(f"--grid {item!r}: unknown setting {key!r}; choose from {', '.join(GRID_KEYS)}")
        if key in grid:
            raise EvalError(f"--grid {key} is given twice; list every value once: --grid {key}=V1,V2")
        kind = int if key in _INT_KEYS else float
        try:
            values = [kind(v) for v in raw.split(",") if v.strip()]
        except ValueError:
            raise EvalError(f"--grid {item!r}: {key} takes {'integers' if kind is int else 'numbers'}") from None
        if len(set(values)) != len(values):
            raise EvalError(f"--grid {item!r}: a value is listed twice")
        grid[key] = values
    return grid


def grid_settings(grid: dict[str, list]) -> list[dict]:
    """Every combination, the first key varying slowest; ``[{}]`` for an empty grid."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def setting_label(setting: dict) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in setting.items()) or "base"


def sweep(models: list[ModelEntry], base: GenerationConfig, grid: dict[str, list], options: EvalOptions,
          out: str | Path, *, overwrite: bool = False, command: str | None = None, log: Callable = print) -> list[dict]:
    """The reply metrics of every model x grid setting over the prompts x seeds.

    Args:
        models: the models (unique names).
        base: generation settings the grid changes.
        grid: setting -> values (:func:`parse_grid`).
        options: as in :func:`evaluate` (``valid`` only feeds the reference row; no loss is computed).
        out: the folder to write.

    Returns:
        One row per model x setting: ``model``, ``setting``, the grid values, and the aggregates of
        :func:`mlx_persona.eval.metrics.summarize`. Written as ``sweep.csv`` and ``sweep.md``, with
        ``sweep.png``, ``results.jsonl`` (every reply) and ``summary.json``.
    """
    from mlx_persona.eval import report

    check_names(models)
    settings = grid_settings(grid)
    configs = []
    for s in settings:
        try:
            configs.append(dataclasses.replace(base, **s).validate())
        except ValueError as e:
            raise EvalError(f"grid setting {setting_label(s)}: {e}") from None
    ctx = _Context.load(options)
    resolve_all(models)
    out = prepare_output_dir(out, overwrite)
    table, all_rows = [], []
    for entry in models:
        log(f"{entry.name}: loading {entry.model}" + (f" + {entry.adapter}" if entry.adapter else ""))
        model, tok, end_ids = _load(entry)
        for s, cfg in zip(settings, configs):
            label = setting_label(s)
            log(f"{entry.name}: {label}")
            rows = generate_replies(model, tok, end_ids, ctx, cfg, name=entry.name, extra={"setting": label}, log=log)
            table.append({"model": entry.name, "setting": label, **s, **_summary(rows)})
            all_rows += rows
        del model, tok
        _release()
    result = {"command": command, "generation": base.to_dict(), "grid": grid, "options": dataclasses.asdict(options),
              "prompts": ctx.prompts, "system": ctx.system, "rows": table, "reference": _reference(ctx)}
    _write_jsonl(out / "results.jsonl", all_rows)
    (out / "summary.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    report.write_sweep_report(out, result)
    return table


# ------------------------------------------------------------------------------------------- compare
_VARIANT_KEYS = ("name", "model", "adapter", "train", "set")
_RECIPE_KEYS = ("output", "variants", "eval", "generation")


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


def load_recipe(path: str | Path) -> Recipe:
    """Reads and checks a comparison recipe (``configs/compare-*.yaml``).

    Keys: ``output`` (report folder), ``variants`` (a list of ``{name, model, adapter}`` to load, or
    ``{name, train, set}`` to train with a training config plus dotted-key overrides and then load),
    ``eval`` (:class:`EvalOptions` fields) and ``generation`` (``preset`` plus any
    :class:`~mlx_persona.sampling.GenerationConfig` field).

    Raises:
        EvalError: ``path: key: reason`` for the first problem.
    """
    import yaml

    from mlx_persona.sampling import preset as get_preset

    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: no such recipe file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise EvalError(f"{path}:{mark.line + 1 if mark else '?'}: invalid YAML: {getattr(e, 'problem', e)}") from None

    def fail(key, why):
        raise EvalError(f"{path}: {key}: {why}")

    if not isinstance(data, dict):
        fail("(top level)", f"expected a mapping with keys {', '.join(_RECIPE_KEYS)}")
    for key in data:
        if key not in _RECIPE_KEYS:
            fail(key, f"unknown key; known keys: {', '.join(_RECIPE_KEYS)}")
    output = data.get("output")
    if not isinstance(output, str) or not output:
        fail("output", "required: the report folder")
    variants = data.get("variants")
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
                fail(f"{where}.{key}", f"must be a string, got {v[key]!r}")
        if not v.get("name") or not _NAMED.match(f"{v['name']}=x"):
            fail(f"{where}.name", "required: letters, digits, _ . + -")
        if v["name"] in names:
            fail(f"{where}.name", f"{v['name']!r} is used twice")
        names.add(v["name"])
        if ("model" in v) == ("train" in v):
            fail(where, "give exactly one of model (load it) or train (a training config to run, then load)")
        if "train" in v and "adapter" in v:
            fail(f"{where}.adapter", "comes from the training run; remove it")
        if "set" in v and ("train" not in v or not isinstance(v["set"], dict)):
            fail(f"{where}.set", "a mapping of training-config overrides, only with train")
    ev = data.get("eval") or {}
    if not isinstance(ev, dict):
        fail("eval", "expected a mapping")
    fields = {f.name: f for f in dataclasses.fields(EvalOptions)}
    for key, value in ev.items():
        if key not in fields:
            fail(f"eval.{key}", f"unknown key; known keys: {', '.join(fields)}")
        kind = {"seeds": list, "limit": int, "early_tokens": int, "max_seq_len": int, "persona_system": bool}.get(key, str)
        if not (isinstance(value, kind) and not (kind is int and isinstance(value, bool))) and \
                not (key == "valid" and value is None):
            fail(f"eval.{key}", f"expected {kind.__name__}, got {value!r}")
    try:
        options = EvalOptions(**ev).validate()
    except EvalError as e:
        fail("eval", str(e))
    gen = dict(data.get("generation") or {})
    name = gen.pop("preset", "default")
    try:
        base = GenerationConfig() if name == "default" else get_preset(name)
        generation = GenerationConfig.from_dict({**base.to_dict(), **gen})
    except ValueError as e:
        fail("generation", str(e))
    return Recipe(path, output, variants, options, generation)


def _train_config(v: dict, retrain: bool):
    """The validated training config of a ``train`` variant (its ``set`` applied)."""
    from mlx_persona.tuner.config import load_config

    overrides = _flatten(v.get("set") or {})
    if retrain:
        overrides["overwrite"] = True
    return load_config(v["train"], overrides)


def _trained_entry(v: dict, retrain: bool, log) -> ModelEntry:
    """Trains a ``train`` variant unless its output holds a finished run; the entry that loads the result."""
    from mlx_persona.tuner.trainer import train

    cfg = _train_config(v, retrain)
    out = Path(cfg.output)
    summary_path = out / "summary.json"
    if summary_path.is_file() and not retrain:
        log(f"{v['name']}: using the finished run {out} (pass --retrain to train again)")
    else:
        log(f"{v['name']}: training {cfg.model} with {v['train']} -> {out}")
        train(cfg, log=log)
    summary = json.loads(summary_path.read_text())
    sets = ", ".join(f"{k}={val}" for k, val in _flatten(v.get("set") or {}).items())
    best = summary.get("best_val_loss")
    note = (f"trained: {v['train']}" + (f" with {sets}" if sets else "") +
            f"; {cfg.method}, {summary.get('steps')} steps" + (f", best val_loss {best:.4f}" if best is not None else ""))
    if cfg.method == "full":
        return ModelEntry(v["name"], str(out), None, note)
    return ModelEntry(v["name"], cfg.model, str(out), note)


def compare(recipe_path: str | Path, *, out: str | None = None, overwrite: bool = False, retrain: bool = False,
            limit: int | None = None, seeds: list[int] | None = None, command: str | None = None,
            log: Callable = print) -> dict:
    """Trains (or reuses) every variant of a recipe, then evaluates them all in one report.

    A ``train`` variant whose output folder already holds a finished run (``summary.json``) is reused
    unless `retrain`. `out`, `limit` and `seeds` override the recipe's.

    Returns:
        What :func:`evaluate` returns.
    """
    from mlx_persona.models import resolve_model

    recipe = load_recipe(recipe_path)
    options = recipe.options
    if limit is not None:
        options = dataclasses.replace(options, limit=limit)
    if seeds:
        options = dataclasses.replace(options, seeds=list(seeds))
    check_inputs(options)  # before any training
    target = Path(out or recipe.output)
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
