"""Generation sweeps: the reply metrics of :mod:`mlx_persona.eval.evaluate` for every combination of a
grid of generation settings (``mlx-persona sweep``). No validation loss: it does not depend on how one
samples.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Callable

from mlx_persona.eval import plots
from mlx_persona.eval.entries import ModelEntry, check_names, load_entry, release, resolve_all
from mlx_persona.eval.evaluate import Context, generate_replies, reference_summary, summarize_rows, write_results
from mlx_persona.eval.options import EvalError, EvalOptions
from mlx_persona.outputs import output_lock, prepare_output_dir
from mlx_persona.sampling import GenerationConfig

# Generation settings a sweep may vary (numbers only; `stop` and `seed` are not grid axes).
GRID_KEYS = ("min_new_tokens", "max_new_tokens", "temperature", "top_k", "top_p", "min_p",
             "repetition_penalty", "no_repeat_ngram_size")
_INT_KEYS = {"min_new_tokens", "max_new_tokens", "top_k", "no_repeat_ngram_size"}


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
    """``min_new_tokens=0 temperature=0.8``: a setting's row name (``base`` for no change)."""
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in setting.items()) or "base"


def _configs(base: GenerationConfig, settings: list[dict]) -> list[GenerationConfig]:
    """`base` changed by each setting, every one validated before any model loads."""
    configs = []
    for s in settings:
        try:
            configs.append(dataclasses.replace(base, **s).validate())
        except ValueError as e:
            raise EvalError(f"grid setting {setting_label(s)}: {e}") from None
    return configs


def sweep(models: list[ModelEntry], base: GenerationConfig, grid: dict[str, list], options: EvalOptions,
          out: str | Path, *, overwrite: bool = False, command: str | None = None, log: Callable = print) -> list[dict]:
    """The reply metrics of every model x grid setting over the prompts x seeds.

    Args:
        models: the models (unique names).
        base: generation settings the grid changes.
        grid: setting -> values (:func:`parse_grid`).
        options: as in :func:`~mlx_persona.eval.evaluate.evaluate` (``valid`` only feeds the reference
            row; no loss is computed).
        out: the folder to write.

    Returns:
        One row per model x setting: ``model``, ``setting``, the grid values, and the aggregates of
        :func:`mlx_persona.eval.metrics.summarize`. Written as ``sweep.csv`` and ``sweep.md``, with
        ``sweep.png``, ``results.jsonl`` (every reply) and ``summary.json``.
    """
    from mlx_persona.eval import sweep_report

    check_names(models)
    settings = grid_settings(grid)
    configs = _configs(base, settings)
    with output_lock(out):  # one writer per folder, from before the check to the last file
        ctx = Context.load(options)
        resolve_all(models)
        out = prepare_output_dir(out, overwrite)
        table, all_rows = [], []
        for entry in models:
            model, tok, end_ids = load_entry(entry, log)
            for s, cfg in zip(settings, configs):
                label = setting_label(s)
                log(f"{entry.name}: {label}")
                rows = generate_replies(model, tok, end_ids, ctx, cfg, name=entry.name, extra={"setting": label},
                                        log=log)
                table.append({"model": entry.name, "setting": label, **s, **summarize_rows(rows)})
                all_rows += rows
            del model, tok
            release()
        result = {"command": command, "generation": base.to_dict(), "grid": grid,
                  "options": dataclasses.asdict(options), "prompts": ctx.prompts, "system": ctx.system, "rows": table,
                  "reference": reference_summary(ctx, ctx.reference_texts())}
        write_results(out, all_rows, result)
        colours = plots.model_colours([m.name for m in models])
        (out / "sweep.png").write_bytes(plots.png(plots.sweep_figure(table, colours)))
        sweep_report.write_sweep_report(out, result)
        return table
