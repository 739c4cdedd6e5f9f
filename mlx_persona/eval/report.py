"""Reports of an evaluation or a sweep: markdown, a self-contained HTML page and CSV.

The last step of the pipeline: it renders what the evaluation hands it (the result dict, the reply
rows, the plots as PNG bytes from :mod:`mlx_persona.eval.plots`) and reads no file, so a report
always shows exactly what was measured. It imports nothing from the modules that call it.

The HTML page has its CSS inline and its plots embedded as base64 PNG: no script, no external URL, so
it opens anywhere (and can be mailed).
"""

from __future__ import annotations

import base64
import csv
import html
import re
from datetime import datetime, timezone
from pathlib import Path

from mlx_persona.eval.metrics import WORDS_PER_TOKEN

# (summary key, label, kind) -- kind: pct (0-1 shown as %), num, int, words (min-max).
SUMMARY_ROWS = [
    ("replies", "replies", "int"),
    ("words_mean", "words: mean", "num"),
    ("words_median", "words: median", "num"),
    ("words_range", "words: min-max", "range"),
    ("mid_sentence", "ends mid-sentence", "pct"),
    ("early_end", "early end (end token, < {early_words:g} words)", "pct"),
    ("length_stop", "hit max_new_tokens", "pct"),
    ("with_catchphrase", "replies with a catchphrase", "pct"),
    ("catchphrase_per_reply", "catchphrases per reply", "num2"),
    ("vocabulary_per_100_words", "persona vocabulary per 100 words", "num"),
    ("breaking", "replies breaking character", "pct"),
    ("distinct_1", "distinct-1 (pooled)", "num2"),
    ("distinct_2", "distinct-2 (pooled)", "num2"),
    ("rep_3", "repeated 3-grams within a reply", "pct"),
    ("style", "style similarity to training replies", "num2"),
    ("val_loss", "validation loss (nats/token)", "num3"),
    ("val_ppl", "validation perplexity", "num"),
    ("decode_tps", "decode tokens/s", "num"),
]

SWEEP_COLUMNS = ["replies", "words_mean", "words_median", "words_min", "words_max", "mid_sentence", "early_end",
                 "length_stop", "with_catchphrase", "catchphrase_per_reply", "vocabulary_per_100_words", "breaking",
                 "distinct_1", "distinct_2", "rep_3", "style", "decode_tps"]
_SWEEP_MD = [("words_mean", "words mean", "num"), ("words_range", "min-max", "range"),
             ("mid_sentence", "mid-sentence", "pct"), ("early_end", "early end", "pct"),
             ("length_stop", "hit max", "pct"), ("with_catchphrase", "catchphrase", "pct"),
             ("vocabulary_per_100_words", "vocab/100w", "num"), ("breaking", "breaking", "pct"),
             ("distinct_2", "distinct-2", "num2"), ("rep_3", "rep-3", "pct"), ("style", "style", "num2")]


def definitions(early_tokens: int) -> list[str]:
    """The metric definitions, one sentence each (shared by every report)."""
    words = WORDS_PER_TOKEN * early_tokens
    return [
        "**words**: whitespace-separated words, as `mlx-persona data stats` counts the training replies.",
        "**ends mid-sentence**: the last character, after trailing spaces, closing quotes/brackets, markdown "
        "emphasis and emoji, is not `.` `!` `?` `…`.",
        f"**early end**: the model chose to stop (`stop_reason == end_token`) with fewer than "
        f"{WORDS_PER_TOKEN:g} × {early_tokens} = {words:g} words ({early_tokens} tokens' worth at ~{WORDS_PER_TOKEN:g} "
        "English words per Gemma token). Replies cut by `max_new_tokens` are never early ends.",
        "**catchphrases / breaking character**: the persona card's `catchphrases` / `breaking_phrases` found as "
        "case-insensitive substrings; **vocabulary**: its `vocabulary` found as whole words.",
        "**distinct-n**: distinct word n-grams / all word n-grams, pooled over a model's replies (n-grams never "
        "cross replies). **repeated 3-grams**: per reply, the share of word 3-grams that repeat an earlier one "
        "(1 − distinct-3), averaged.",
        "**style similarity**: cosine between a reply's character 3-5-gram TF-IDF vector and the centroid of the "
        "training replies' vectors (IDF from the training replies; n-grams they never use count as rarest).",
        "**validation loss**: token-weighted cross-entropy of the assistant turns of the validation set, rendered "
        "with each model's own tokenizer and chat template (as in training); perplexity = exp(loss).",
        "**reference**: the same text metrics on the held-out human-written validation replies.",
    ]


# ------------------------------------------------------------------------------------------- formatting
def fmt(summary: dict | None, key: str, kind: str) -> str:
    if summary is None:
        return "–"
    if kind == "range":
        lo, hi = summary.get("words_min"), summary.get("words_max")
        return "–" if lo is None else f"{lo}–{hi}"
    v = summary.get(key)
    if v is None:
        return "–"
    if kind == "pct":
        return f"{100 * v:.0f}%"
    if kind == "int":
        return str(int(v))
    if kind == "num2":
        return f"{v:.2f}"
    if kind == "num3":
        return f"{v:.3f}"
    return f"{v:.1f}"


# Markdown's inline punctuation: emphasis, code, links and images, tables, strike-through, escapes.
_MD_ESCAPE = str.maketrans({c: "\\" + c for c in "\\`*_[]!|~"})


def _md_cell(text) -> str:
    """`text` shown as is in markdown, on one line (a table cell, a heading): what it shows is never markup.

    ``<``, ``>``, ``&`` become entities (no raw HTML: a model folder named ``run<img onerror=…>`` runs
    nothing), markdown punctuation is backslash-escaped (no link, image, emphasis, or ``|`` cell break),
    line breaks become ``<br>``.
    """
    text = html.escape(str(text), quote=False).translate(_MD_ESCAPE)
    return "<br>".join(text.splitlines()) or " "


def _md_code(text) -> str:
    """`text` in ``<code>``, on one line, escaped as :func:`_md_cell` does (no code span: a backtick in
    `text` would end one, and a renderer that is not CommonMark may take its content as HTML)."""
    return f"<code>{_md_cell(' '.join(str(text).splitlines()))}</code>"


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _settings_line(gen: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in gen.items() if k != "seed" and v not in ([], None))


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# ------------------------------------------------------------------------------------------- eval report
def _summary_table(result: dict) -> tuple[list[str], list[list[str]]]:
    early_words = WORDS_PER_TOKEN * result["options"]["early_tokens"]
    cols = dict(result["models"])
    if result.get("reference"):
        cols["reference"] = result["reference"]
    header = ["metric"] + list(cols)
    rows = [[label.format(early_words=early_words)] + [fmt(s, key, kind) for s in cols.values()]
            for key, label, kind in SUMMARY_ROWS]
    return header, rows


def _by_prompt(rows: list[dict]) -> dict[int, dict]:
    """prompt id -> {"prompt", "cells": {(seed, model): row}}."""
    grouped: dict[int, dict] = {}
    for r in rows:
        g = grouped.setdefault(r["prompt_id"], {"prompt": r["prompt"], "cells": {}})
        g["cells"][(r["seed"], r["model"])] = r
    return grouped


def _meta(r: dict) -> str:
    m = r["metrics"]
    bits = [f"{m['words']} words", r["stop_reason"]]
    if m["mid_sentence"]:
        bits.append("mid-sentence")
    if m["early_end"]:
        bits.append("early end")
    found = list(m["catchphrases"]) + [f"!{b}" for b in m["breaking"]]
    if found:
        bits.append(", ".join(found))
    return " · ".join(bits)


# Alt text of the eval report's figures, by file name.
FIGURE_ALT = {"lengths.png": "reply lengths", "rates.png": "rates"}


def write_eval_report(out: Path, result: dict, rows: list[dict], figures: dict[str, bytes]) -> None:
    """Writes ``report.md`` and ``report.html`` into `out`.

    Args:
        result: what :func:`mlx_persona.eval.evaluate.evaluate` writes to ``summary.json``.
        rows: one measured row per reply.
        figures: file name -> PNG bytes, already written to `out` by the caller: the markdown links the
            files, the HTML page embeds the bytes.
    """
    names = list(result["models"])
    early_tokens = result["options"]["early_tokens"]
    header, table = _summary_table(result)
    grouped = _by_prompt(rows)
    seeds = sorted({r["seed"] for r in rows})
    (out / "report.md").write_text(_eval_md(result, header, table, grouped, seeds, names, early_tokens, figures),
                                   encoding="utf-8")
    (out / "report.html").write_text(_eval_html(result, header, table, grouped, seeds, names, early_tokens, figures),
                                     encoding="utf-8")


def _intro(result: dict, seeds: list[int]) -> list[tuple[str, str]]:
    o = result["options"]
    return [
        ("command", result.get("command") or "–"),
        ("written", _now()),
        ("generation", _settings_line(result["generation"])),
        ("seeds", ", ".join(map(str, seeds))),
        ("prompts", f"{len(result['prompts'])} from {o['prompts']}"),
        ("system prompt", "the persona card's system_prompt" if result.get("system") else
         "none (the training data has no system turn; --persona-system adds the card's)"),
        ("persona card", o["persona"]),
        ("style reference", o["train"]),
        ("validation data", o["valid"] or "none"),
    ]


def _eval_md(result, header, table, grouped, seeds, names, early_tokens, figures) -> str:
    lines = ["# Persona evaluation", ""]
    lines += [f"- **{k}**: {_md_code(v) if k == 'command' else _md_cell(v)}" for k, v in _intro(result, seeds)]
    lines += ["", "## Models", ""]
    lines += _md_table(["name", "model", "adapter", "how"],
                       [[_md_cell(n), _md_code(m["model"]),
                         _md_code(m["adapter"]) if m["adapter"] else "–", _md_cell(m["note"] or "–")]
                        for n, m in result["models"].items()])
    lines += ["", "## Summary", ""] + _md_table([_md_cell(c) for c in header], table)
    for png in figures:
        lines += ["", f"![{FIGURE_ALT.get(png, png)}]({png})"]
    lines += ["", "## Definitions", ""]
    lines += [f"- {d}" for d in definitions(early_tokens)]
    lines += ["", "## Replies side by side", ""]
    for pid, g in sorted(grouped.items()):
        lines += [f"### {pid + 1}. {_md_cell(g['prompt'])}", ""]
        body = []
        for seed in seeds:
            cells = []
            for n in names:
                r = g["cells"].get((seed, n))
                cells.append("–" if r is None else f"{_md_cell(r['text'])}<br>*{_md_cell(_meta(r))}*")
            body.append([str(seed)] + cells)
        lines += _md_table(["seed"] + [_md_cell(n) for n in names], body) + [""]
    return "\n".join(lines) + "\n"


_CSS = """
body{font:15px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;
padding:0 1rem;color:#222}
h1,h2,h3{line-height:1.2}h3{margin-top:1.6rem;font-size:1.05rem}
table{border-collapse:collapse;margin:.6rem 0;width:100%}
th,td{border:1px solid #ddd;padding:.35rem .5rem;vertical-align:top;text-align:left}
th{background:#f3f5f8}
table.summary td:not(:first-child),table.summary th:not(:first-child){text-align:right;white-space:nowrap}
table.side{table-layout:fixed}table.side th:first-child{width:3.5rem}
td.reply{white-space:pre-wrap;overflow-wrap:anywhere;font-size:.92rem}
.meta{display:block;color:#667;font-size:.8rem;margin-top:.3rem;white-space:normal}
dl.intro{display:grid;grid-template-columns:max-content auto;gap:.2rem 1rem}
dl.intro dt{font-weight:600}dl.intro dd{margin:0}
code{background:#f3f5f8;padding:0 .2rem;border-radius:3px}
img{max-width:100%;height:auto;border:1px solid #eee}
"""


def _h(text) -> str:
    return html.escape(str(text))


def _md_inline(text: str) -> str:
    """The definitions' **bold** and `code` as HTML (everything else escaped)."""
    s = _h(text)
    s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", s)


def _html_table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{_h(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{_h(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _eval_html(result, header, table, grouped, seeds, names, early_tokens, figures) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             "<title>Persona evaluation</title>", f"<style>{_CSS}</style></head><body>",
             "<h1>Persona evaluation</h1>", '<dl class="intro">']
    parts += [f"<dt>{_h(k)}</dt><dd>{'<code>' + _h(v) + '</code>' if k == 'command' else _h(v)}</dd>"
              for k, v in _intro(result, seeds)]
    parts += ["</dl>", "<h2>Models</h2>",
              _html_table(["name", "model", "adapter", "how"],
                          [[n, m["model"], m["adapter"] or "–", m["note"] or "–"] for n, m in result["models"].items()]),
              "<h2>Summary</h2>", _html_table(header, table, "summary")]
    for png, data in figures.items():
        b64 = base64.b64encode(data).decode("ascii")
        parts.append(f'<p><img alt="{_h(FIGURE_ALT.get(png, png))}" src="data:image/png;base64,{b64}"></p>')
    parts += ["<h2>Definitions</h2>", "<ul>"] + [f"<li>{_md_inline(d)}</li>" for d in definitions(early_tokens)]
    parts += ["</ul>", "<h2>Replies side by side</h2>"]
    for pid, g in sorted(grouped.items()):
        parts.append(f'<h3 id="prompt-{pid + 1}">{pid + 1}. {_h(g["prompt"])}</h3>')
        head = "<th>seed</th>" + "".join(f"<th>{_h(n)}</th>" for n in names)
        body = []
        for seed in seeds:
            cells = []
            for n in names:
                r = g["cells"].get((seed, n))
                cells.append("<td>–</td>" if r is None else
                             f'<td class="reply">{_h(r["text"])}<span class="meta">{_h(_meta(r))}</span></td>')
            body.append(f"<tr><td>{seed}</td>{''.join(cells)}</tr>")
        parts.append(f'<table class="side"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------- sweep report
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
    table = [[_md_cell(r["model"]), _md_cell(r["setting"])] + [fmt(r, k, kind) for k, _, kind in _SWEEP_MD]
             for r in rows]
    if result.get("reference"):
        table.append(["reference", "validation replies"] + [fmt(result["reference"], k, kind) for k, _, kind in _SWEEP_MD])
    o = result["options"]
    grid = "; ".join(f"{k} = {', '.join(map(str, v))}" for k, v in result["grid"].items())
    lines = ["# Generation sweep", "", f"- **command**: {_md_code(result.get('command') or '–')}",
             f"- **written**: {_now()}", f"- **base settings**: {_md_cell(_settings_line(result['generation']))}",
             f"- **grid**: {_md_cell(grid)}",
             (f"- **prompts**: {len(result['prompts'])} from {_md_cell(o['prompts'])}; "
              f"**seeds**: {_md_cell(', '.join(map(str, o['seeds'])))}"),
             f"- **system prompt**: {'the persona card' if result.get('system') else 'none'}", ""]
    lines += _md_table(header, table)
    lines += ["", "![sweep](sweep.png)", "", "## Definitions", ""] + [f"- {d}" for d in definitions(early_tokens)]
    lines += ["", "Every reply is in `results.jsonl` (its `setting` field names the row)."]
    (out / "sweep.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
