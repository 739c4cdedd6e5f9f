"""What the reports share to write numbers and text: a metric's value and a difference as text, markdown
that shows text as it is (never as markup), HTML escaping and tables, the settings line, the time.
"""

from __future__ import annotations

import html
import re
from datetime import datetime, timezone


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


def md_cell(text) -> str:
    """`text` shown as is in markdown, on one line (a table cell, a heading): what it shows is never markup.

    ``<``, ``>``, ``&`` become entities (no raw HTML: a model folder named ``run<img onerror=…>`` runs
    nothing), markdown punctuation is backslash-escaped (no link, image, emphasis, or ``|`` cell break),
    line breaks become ``<br>``.
    """
    text = html.escape(str(text), quote=False).translate(_MD_ESCAPE)
    return "<br>".join(text.splitlines()) or " "


def md_code(text) -> str:
    """`text` in ``<code>``, on one line, escaped as :func:`md_cell` does (no code span: a backtick in
    `text` would end one, and a renderer that is not CommonMark may take its content as HTML)."""
    return f"<code>{md_cell(' '.join(str(text).splitlines()))}</code>"


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def settings_line(gen: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in gen.items() if k != "seed" and v not in ([], None))


def written_at() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def fmt_delta(value: float | None, kind: str, signed: bool = True) -> str:
    """A difference of a metric: percentage points for shares (``+12 pt``), else the metric's precision."""
    if value is None:
        return "–"
    sign = "+" if signed and abs(value) > 1e-12 else ""  # no "+0"
    value = value if abs(value) > 1e-12 else 0.0
    if kind == "pct":
        return f"{100 * value:{sign}.0f} pt"
    digits = {"num2": 2, "num3": 3}.get(kind, 1)
    return f"{value:{sign}.{digits}f}"


def h(text) -> str:
    return html.escape(str(text))


def md_inline(text: str) -> str:
    """The definitions' **bold** and `code` as HTML (everything else escaped)."""
    s = h(text)
    s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", s)


def html_table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{h(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{h(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
