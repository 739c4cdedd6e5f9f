"""The report of a generation sweep (``mlx-persona sweep``): ``sweep.csv`` and ``sweep.md``, one row per
model and setting, rendered from what the sweep hands it (the caller has written ``sweep.png``), with
the formatting and definitions of :mod:`mlx_persona.eval.report`. It reads no file.
"""

from __future__ import annotations

import csv
from pathlib import Path

from mlx_persona.eval.markup import (
    fmt,
    md_cell,
    md_code,
    md_table,
    settings_line,
    written_at,
)
from mlx_persona.eval.report import definitions

SWEEP_COLUMNS = ["replies", "words_mean", "words_median", "words_min", "words_max", "mid_sentence", "early_end",
                 "length_stop", "with_catchphrase", "catchphrase_per_reply", "vocabulary_per_100_words", "breaking",
                 "undecodable", "distinct_1", "distinct_2", "rep_3", "style", "decode_tps"]
_SWEEP_MD = [("words_mean", "words mean", "num"), ("words_range", "min-max", "range"),
             ("mid_sentence", "mid-sentence", "pct"), ("early_end", "early end", "pct"),
             ("length_stop", "hit max", "pct"), ("with_catchphrase", "catchphrase", "pct"),
             ("vocabulary_per_100_words", "vocab/100w", "num"), ("breaking", "breaking", "pct"),
             ("undecodable", "U+FFFD", "pct"),
             ("distinct_2", "distinct-2", "num2"), ("rep_3", "rep-3", "pct"), ("style", "style", "num2")]


def write_sweep_report(out: Path, result: dict) -> None:
    """Writes ``sweep.csv`` and ``sweep.md`` into `out` (the caller has written ``sweep.png`` there)."""
    rows = result["rows"]
    grid_keys = list(result["grid"])
    with open(out / "sweep.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["model", "setting", *grid_keys, *SWEEP_COLUMNS])
        for r in rows:
            w.writerow([r["model"], r["setting"], *(r[k] for k in grid_keys),
                        *("" if r.get(c) is None else r[c] for c in SWEEP_COLUMNS)])
    early_tokens = result["options"]["early_tokens"]
    header = ["model", "setting"] + [label for _, label, _ in _SWEEP_MD]
    table = [[md_cell(r["model"]), md_cell(r["setting"])] + [fmt(r, k, kind) for k, _, kind in _SWEEP_MD]
             for r in rows]
    if result.get("reference"):
        table.append(["reference", "validation replies"] + [fmt(result["reference"], k, kind) for k, _, kind in _SWEEP_MD])
    o = result["options"]
    grid = "; ".join(f"{k} = {', '.join(map(str, v))}" for k, v in result["grid"].items())
    lines = ["# Generation sweep", "", f"- **command**: {md_code(result.get('command') or '–')}",
             f"- **written**: {written_at()}", f"- **base settings**: {md_cell(settings_line(result['generation']))}",
             f"- **grid**: {md_cell(grid)}",
             (f"- **prompts**: {len(result['prompts'])} from {md_cell(o['prompts'])}; "
              f"**seeds**: {md_cell(', '.join(map(str, o['seeds'])))}"),
             f"- **system prompt**: {'the persona card' if result.get('system') else 'none'}", ""]
    lines += md_table(header, table)
    lines += ["", "![sweep](sweep.png)", "", "## Definitions", ""] + [f"- {d}" for d in definitions(early_tokens)]
    lines += ["", "Every reply is in `results.jsonl` (its `setting` field names the row)."]
    (out / "sweep.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
