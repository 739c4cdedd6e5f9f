"""The report of an evaluation: markdown and a self-contained HTML page (and the formatting the sweep's
report, :mod:`mlx_persona.eval.sweep_report`, shares).

The last step of the pipeline: it renders what the evaluation hands it (the result dict, the reply
rows, the plots as PNG bytes from :mod:`mlx_persona.eval.plots`) and reads no file, so a report
always shows exactly what was measured. It imports nothing from the modules that call it.

The HTML page has its CSS inline and its plots embedded as base64 PNG: no script, no external URL, so
it opens anywhere (and can be mailed).
"""

from __future__ import annotations

import base64
from pathlib import Path

from mlx_persona.eval.markup import (
    fmt,
    fmt_delta,
    h,
    html_table,
    md_cell,
    md_code,
    md_inline,
    md_table,
    settings_line,
    written_at,
)
from mlx_persona.eval.metrics import BETTER, BETTER_TEXT, REPLACEMENT, WORDS_PER_TOKEN

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
    ("undecodable", "replies with U+FFFD (bytes not UTF-8)", "pct"),
    ("distinct_1", "distinct-1 (pooled)", "num2"),
    ("distinct_2", "distinct-2 (pooled)", "num2"),
    ("rep_3", "repeated 3-grams within a reply", "pct"),
    ("style", "style similarity to training replies", "num2"),
    ("val_loss", "validation loss (nats/token)", "num3"),
    ("val_ppl", "validation perplexity", "num"),
    ("decode_tps", "decode tokens/s", "num"),
]

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
        "case-insensitive whole words (no letter or digit touching either end: `bikkie` counts in `Bikkie!`, not in "
        "`xbikkiex` or `bikkies`); **vocabulary**: its `vocabulary` found as whole words.",
        ("**U+FFFD**: the reply holds the replacement character: the model emitted bytes that are not UTF-8 and "
        "decoding replaced them (marked in the replies below)."),
        "**distinct-n**: distinct word n-grams / all word n-grams, pooled over a model's replies (n-grams never "
        "cross replies). **repeated 3-grams**: per reply, the share of word 3-grams that repeat an earlier one "
        "(1 − distinct-3), averaged.",
        "**style similarity**: cosine between a reply's character 3-5-gram TF-IDF vector and the centroid of the "
        "training replies' vectors (IDF from the training replies; n-grams they never use count as rarest).",
        "**validation loss**: token-weighted cross-entropy of the assistant turns of the validation set, rendered "
        "with each model's own tokenizer and chat template (as in training); perplexity = exp(loss).",
        "**reference**: the same text metrics on the held-out human-written validation replies.",
        ("**better**: closer to the reference for reply length and distinct-n (more is not better in itself); "
        "higher for catchphrases, vocabulary and style similarity; lower for truncation (mid-sentence, early end, "
        "max_new_tokens), breaking character, U+FFFD, repeated 3-grams and the validation loss."),
        ("**verdict**: a fine-tuned model against its base model as published (when the evaluation holds it). "
        "**spread**: each metric computed on one seed's replies alone, max − min over the seeds, the larger of "
        "the two models' (0 for the validation loss, which involves no sampling). A move no larger than the "
        "spread is **not distinguishable** from a reseed."),
    ]


# ------------------------------------------------------------------------------------------- eval report
def _summary_table(result: dict) -> tuple[list[str], list[list[str]]]:
    early_words = WORDS_PER_TOKEN * result["options"]["early_tokens"]
    cols = dict(result["models"])
    if result.get("reference"):
        cols["reference"] = result["reference"]
    header = ["metric", "better"] + list(cols)
    rows = [[label.format(early_words=early_words), BETTER_TEXT.get(BETTER.get(key), "–")]
            + [fmt(s, key, kind) for s in cols.values()] for key, label, kind in SUMMARY_ROWS]
    return header, rows


# ------------------------------------------------------------------------------------------- verdict
_KIND = {key: kind for key, _, kind in SUMMARY_ROWS}
_CALL_TEXT = {"better": "better", "worse": "worse", "within spread": "not distinguishable", "same": "same",
              "n/a": "–"}
VERDICT_HEADER = ["metric", "better", "base", "model", "reference", "change", "closer to reference by", "spread",
                  "verdict"]


def short_label(key: str) -> str:
    """A metric's summary label without its parenthesis (``early end``, ``validation loss``)."""
    return next(label for k, label, _ in SUMMARY_ROWS if k == key).split(" (")[0]


def verdict_rows(v: dict) -> list[list[str]]:
    """The verdict table of one model (plain text cells)."""
    rows = []
    for j in v["metrics"]:
        kind = _KIND[j["key"]]
        call = _CALL_TEXT[j["call"]]
        if j["call"] in ("better", "worse") and j["distinguishable"] is None:
            call += " (one seed)"
        rows.append([short_label(j["key"]), BETTER_TEXT[j["direction"]],
                     *(fmt({"x": j[k]}, "x", kind) for k in ("base", "value", "reference")),
                     fmt_delta(j["change"], kind), fmt_delta(j["closer_by"], kind),
                     fmt_delta(j["spread"], kind, signed=False), call])
    return rows


def verdict_sentence(name: str, v: dict, bases_of: list[str], esc, strong) -> str:
    """One model's verdict in a sentence; `esc` escapes text and `strong` a model name for the output format."""
    if v["base"] is None:
        if bases_of:
            return f"{strong(name)}: a base model, set against its fine-tunes ({', '.join(map(strong, bases_of))})."
        return f"{strong(name)}: no base model in this evaluation to set it against."
    parts = []
    for call, text in (("better", "better on"), ("worse", "worse on"),
                       ("within spread", "not distinguishable from the seed-to-seed spread on"), ("same", "same on")):
        keys = [short_label(j["key"]) for j in v["metrics"] if j["call"] == call]
        if keys:
            parts.append(f"{text} {len(keys)} ({esc(', '.join(keys))})")
    seeds = f"{v['seeds']} seed{'s' if v['seeds'] != 1 else ''}"
    line = f"{strong(name)} against its base {strong(v['base'])} ({seeds}): {'; '.join(parts) or 'nothing to judge'}"
    line += f"; moved towards the reference on {v['towards_reference']} of {v['with_reference']} metrics with a " \
            "reference value."
    if v["seeds"] < 2:
        line += esc(" One seed only: the seed-to-seed spread is unknown, so no move is tested against it.")
    return line


def _verdicts(result: dict) -> list[tuple[str, dict, list[str]]]:
    """(name, verdict, the names of the models it is the base of), in the models' order."""
    verdicts = result.get("verdict") or {}
    return [(n, v, [m for m, w in verdicts.items() if w["base"] == n]) for n, v in verdicts.items()]


def _verdict_md(result: dict) -> list[str]:
    if not result.get("verdict"):
        return []
    lines = ["## Verdict", ""]
    for name, v, bases_of in _verdicts(result):
        lines.append("- " + verdict_sentence(name, v, bases_of, md_cell, lambda t: f"**{md_cell(t)}**"))
    for name, v, _ in _verdicts(result):
        if v["base"] is not None:
            lines += ["", f"### {md_cell(name)} against {md_cell(v['base'])}", ""]
            lines += md_table(VERDICT_HEADER, [[md_cell(c) for c in r] for r in verdict_rows(v)])
    return lines + [""]


def _verdict_html(result: dict) -> list[str]:
    if not result.get("verdict"):
        return []
    parts = ["<h2>Verdict</h2>", "<ul>"]
    parts += [f"<li>{verdict_sentence(n, v, b, h, lambda t: f'<strong>{h(t)}</strong>')}</li>"
              for n, v, b in _verdicts(result)]
    parts.append("</ul>")
    for name, v, _ in _verdicts(result):
        if v["base"] is not None:
            parts += [f"<h3>{h(name)} against {h(v['base'])}</h3>",
                      html_table(VERDICT_HEADER, verdict_rows(v), "summary verdict")]
    return parts


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
    if m.get("replacement_chars"):
        bits.append(f"{m['replacement_chars']} × U+FFFD (not UTF-8)")
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
        ("written", written_at()),
        ("generation", settings_line(result["generation"])),
        ("seeds", ", ".join(map(str, seeds))),
        ("prompts", f"{len(result['prompts'])} from {o['prompts']}"),
        ("system prompt", "the persona card's system_prompt" if result.get("system") else
         "none (the training data has no system turn; --persona-system adds the card's)"),
        ("persona card", o["persona"]),
        ("style reference", o["train"]),
        ("validation data", o["valid"] or "none"),
    ]


def _ratings_md(ratings: dict | None) -> list[str]:
    """The blind ratings' summary (``mlx-persona rate``), when the report was given the database."""
    if not ratings:
        return []
    lines = ["", "## Blind ratings", "", f"From {md_code(ratings['db'])}.", ""]
    for t in ratings["tables"]:
        lines += [f"**{md_cell(t['title'])}**", ""] + md_table(t["header"], [[md_cell(c) for c in r] for r in t["rows"]])
        lines += [x for n in t["notes"] for x in ("", md_cell(n))] + [""]
    return lines + [f"- {md_cell(line)}" for line in ratings["lines"]]


def _ratings_html(ratings: dict | None) -> list[str]:
    if not ratings:
        return []
    parts = ["<h2>Blind ratings</h2>", f"<p>From <code>{h(ratings['db'])}</code>.</p>"]
    for t in ratings["tables"]:
        parts += [f"<h3>{h(t['title'])}</h3>", html_table(t["header"], t["rows"], "summary")]
        parts += [f"<p>{h(n)}</p>" for n in t["notes"]]
    return parts + [f"<p>{h(line)}</p>" for line in ratings["lines"]]


def _eval_md(result, header, table, grouped, seeds, names, early_tokens, figures) -> str:
    lines = ["# Persona evaluation", ""] + _verdict_md(result)
    lines += [f"- **{k}**: {md_code(v) if k == 'command' else md_cell(v)}" for k, v in _intro(result, seeds)]
    lines += ["", "## Models", ""]
    lines += md_table(["name", "model", "adapter", "how"],
                      [[md_cell(n), md_code(m["model"]),
                        md_code(m["adapter"]) if m["adapter"] else "–", md_cell(m["note"] or "–")]
                       for n, m in result["models"].items()])
    lines += ["", "## Summary", ""] + md_table([md_cell(c) for c in header], table)
    for png in figures:
        lines += ["", f"![{FIGURE_ALT.get(png, png)}]({png})"]
    lines += _ratings_md(result.get("ratings"))
    lines += ["", "## Definitions", ""]
    lines += [f"- {d}" for d in definitions(early_tokens)]
    lines += ["", "## Replies side by side", ""]
    for pid, g in sorted(grouped.items()):
        lines += [f"### {pid + 1}. {md_cell(g['prompt'])}", ""]
        body = []
        for seed in seeds:
            cells = []
            for n in names:
                r = g["cells"].get((seed, n))
                cells.append("–" if r is None else f"{md_cell(r['text'])}<br>*{md_cell(_meta(r))}*")
            body.append([str(seed)] + cells)
        lines += md_table(["seed"] + [md_cell(n) for n in names], body) + [""]
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
mark.fffd{background:#fde2e1;color:#a00;outline:1px solid #e45756}
"""


def _reply_html(text: str) -> str:
    """A reply, escaped, with every U+FFFD marked (bytes the model emitted that are not UTF-8)."""
    return h(text).replace(REPLACEMENT, f'<mark class="fffd" title="U+FFFD: bytes that are not UTF-8">{REPLACEMENT}</mark>')


def _eval_html(result, header, table, grouped, seeds, names, early_tokens, figures) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             "<title>Persona evaluation</title>", f"<style>{_CSS}</style></head><body>",
             "<h1>Persona evaluation</h1>", *_verdict_html(result), '<dl class="intro">']
    parts += [f"<dt>{h(k)}</dt><dd>{'<code>' + h(v) + '</code>' if k == 'command' else h(v)}</dd>"
              for k, v in _intro(result, seeds)]
    parts += ["</dl>", "<h2>Models</h2>",
              html_table(["name", "model", "adapter", "how"],
                          [[n, m["model"], m["adapter"] or "–", m["note"] or "–"] for n, m in result["models"].items()]),
              "<h2>Summary</h2>", html_table(header, table, "summary")]
    for png, data in figures.items():
        b64 = base64.b64encode(data).decode("ascii")
        parts.append(f'<p><img alt="{h(FIGURE_ALT.get(png, png))}" src="data:image/png;base64,{b64}"></p>')
    parts += _ratings_html(result.get("ratings"))
    parts += ["<h2>Definitions</h2>", "<ul>"] + [f"<li>{md_inline(d)}</li>" for d in definitions(early_tokens)]
    parts += ["</ul>", "<h2>Replies side by side</h2>"]
    for pid, g in sorted(grouped.items()):
        parts.append(f'<h3 id="prompt-{pid + 1}">{pid + 1}. {h(g["prompt"])}</h3>')
        head = "<th>seed</th>" + "".join(f"<th>{h(n)}</th>" for n in names)
        body = []
        for seed in seeds:
            cells = []
            for n in names:
                r = g["cells"].get((seed, n))
                cells.append("<td>–</td>" if r is None else
                             f'<td class="reply">{_reply_html(r["text"])}<span class="meta">{h(_meta(r))}</span></td>')
            body.append(f"<tr><td>{seed}</td>{''.join(cells)}</tr>")
        parts.append(f'<table class="side"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
