"""Every plot of training and evaluation (PNG through matplotlib's Agg renderer: no display needed).

The evaluation plots are built as :class:`matplotlib.figure.Figure` objects (no pyplot state, nothing
to close) and turned into PNG bytes by :func:`png`: the caller writes them next to the results and
hands the same bytes to the report, which embeds them without reading anything back.

Two rules hold for every evaluation plot:

* **One colour per model.** :func:`model_colours` maps the evaluation's model names, in order, to a
  fixed palette (the reference, the human-written validation replies, is always :data:`REFERENCE_COLOUR`,
  drawn outlined or hatched), and :func:`eval_figures` builds that mapping once and hands the same
  mapping to every plot.
* **A zero is visible.** Every bar carries its value as a label; a value too small to see as a bar
  (below :data:`MIN_VISIBLE` of the axis) also gets a marker in its model's colour at its value, and a
  missing value is labelled ``n/a`` (never drawn as a zero).

Each artist drawn for a model has its name as ``gid`` (``NAME|metric`` for one metric's bar), so a
figure can be checked for what it shows.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from mlx_persona.eval.metrics import BETTER, BETTER_TEXT, WORDS_PER_TOKEN

REFERENCE = "reference (validation replies)"
REFERENCE_COLOUR = "#333333"
# Tableau's 10 colours without the grey (kept for the reference): blue, orange, green, red, teal, yellow,
# purple, pink, brown. A tenth model starts the cycle again.
PALETTE = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#eeca3b", "#b279a2", "#ff9da6", "#9d755d")
MIN_VISIBLE = 0.005  # share of the axis below which a bar gets a marker as well

# Shares and scores (0-1) plotted side by side per model (:func:`rates_figure`): key, label, kind.
RATE_ROWS = [("mid_sentence", "ends mid-sentence", "pct"), ("early_end", "early end", "pct"),
             ("length_stop", "hit max_new_tokens", "pct"), ("with_catchphrase", "with catchphrase", "pct"),
             ("breaking", "breaks character", "pct"), ("undecodable", "U+FFFD (not UTF-8)", "pct"),
             ("distinct_2", "distinct-2", "num2"), ("rep_3", "repeated 3-grams", "pct"),
             ("style", "style similarity", "num2")]


def model_colours(names: list[str]) -> dict[str, str]:
    """Model name -> colour, by position in `names`; :data:`REFERENCE` -> :data:`REFERENCE_COLOUR`."""
    colours = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}
    colours[REFERENCE] = REFERENCE_COLOUR
    return colours


def _figure(width: float, height: float, **subplots):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    return fig, fig.subplots(**subplots)


def png(fig) -> bytes:
    """`fig` as PNG bytes."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_loss(metrics_path: str | Path, out_png: str | Path) -> Path:
    """Training loss (and validation loss, if any) against step, from a metrics.jsonl."""
    train, val = [], []
    for line in Path(metrics_path).read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            train.append((row["step"], row["loss"]))
        if "val_loss" in row:
            val.append((row["step"], row["val_loss"]))
    fig, ax = _figure(7, 4)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    Path(out_png).write_bytes(png(fig))
    return Path(out_png)


def value_label(value: float | None, kind: str) -> str:
    """What a bar says: ``n/a``, ``12%`` (pct) or ``0.43`` (num2), else one decimal."""
    if value is None:
        return "n/a"
    return f"{100 * value:.0f}%" if kind == "pct" else f"{value:.2f}" if kind == "num2" else f"{value:.1f}"


def bar(ax, y: float, value: float | None, *, height: float, colour: str, gid: str, kind: str,
        span: float = 1.0, hatch: str | None = None, xerr=None) -> None:
    """One horizontal bar with its value as a label; a marker where the bar is too thin to see."""
    if value is None:
        ax.text(0.01 * span, y, "n/a", va="center", fontsize=7, color="#888", gid=gid)
        return
    ax.barh(y, value, height=height, color=colour, hatch=hatch, xerr=xerr, capsize=3 if xerr else 0,
            edgecolor="white" if hatch else None, gid=gid)
    if abs(value) < MIN_VISIBLE * span:
        # Not clipped: at x = 0 the axis edge would cut the marker in half.
        ax.plot([value], [y], marker="D", markersize=4, color=colour, linestyle="none", clip_on=False, gid=gid)
    end = value + (xerr[1][0] if xerr else 0)
    ax.text(end + 0.01 * span, y, value_label(value, kind), va="center", fontsize=7, color="#333", gid=gid)


def lengths_figure(rows: list[dict], names: list[str], early_words: float, reference_words: list[int] | None,
                   colours: dict[str, str]):
    """One histogram of reply length (words) per model, as shares of its replies; the reference outlined."""
    import numpy as np

    words = {n: [r["metrics"]["words"] for r in rows if r["model"] == n] for n in names}
    top = max([max(w, default=0) for w in words.values()] + [max(reference_words or [0])] + [10])
    width = max(5, int(np.ceil(top / 25 / 5) * 5))
    bins = np.arange(0, top + width + 1, width)
    fig, axes = _figure(8, 1.9 * len(names) + 0.8, nrows=len(names), ncols=1, sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        w = words[name]
        if w:
            ax.hist(w, bins=bins, weights=np.full(len(w), 1 / len(w)), color=colours[name], label=name, gid=name)
        if reference_words:
            ax.hist(reference_words, bins=bins, weights=np.full(len(reference_words), 1 / len(reference_words)),
                    histtype="step", color=colours[REFERENCE], linewidth=1.5, label=REFERENCE, gid=REFERENCE)
        ax.axvline(early_words, color="#555", linestyle="--", linewidth=1)
        mean = f"mean {np.mean(w):.0f}, min {min(w)}, max {max(w)}" if w else "no replies"
        ax.set_title(f"{name}: {mean} words", fontsize=10, loc="left", color=colours[name])
        ax.set_ylabel("share")
        ax.grid(alpha=0.3)
        if w or reference_words:
            ax.legend(fontsize=8, loc="upper right")
    axes[-1, 0].set_xlabel(f"reply length (words); dashed: early-end threshold ({early_words:g} words)")
    return fig


def _share_axis(ax, xlabel: str) -> None:
    """A horizontal bar panel of shares (0-1, room for the labels): first row on top, grid."""
    ax.invert_yaxis()
    ax.set_xlim(0, 1.12)
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)


def _legend(ax, entries: list[tuple[str, str, str | None]]) -> None:
    """A legend of (label, colour, hatch) swatches, independent of which bars exist."""
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(facecolor=c, hatch=h, edgecolor="white" if h else c, label=lbl)
                       for lbl, c, h in entries], fontsize=8, loc="lower right")


def rates_figure(summaries: dict[str, dict], colours: dict[str, str]):
    """Grouped horizontal bars of the 0-1 metrics, one bar per model (and the reference, hatched)."""
    import numpy as np

    names = list(summaries)
    y = np.arange(len(RATE_ROWS))
    h = 0.8 / max(len(names), 1)
    fig, ax = _figure(8, 0.5 * len(RATE_ROWS) * max(1, len(names) / 2) + 1.2)
    for i, name in enumerate(names):
        hatch = "//" if name == REFERENCE else None
        for j, (key, _, kind) in enumerate(RATE_ROWS):
            bar(ax, y[j] + (i - (len(names) - 1) / 2) * h, summaries[name].get(key), height=h, colour=colours[name],
                gid=f"{name}|{key}", kind=kind, hatch=hatch)
    ax.set_yticks(y, [f"{label}\n({BETTER_TEXT[BETTER[key]]} is better)" for key, label, _ in RATE_ROWS], fontsize=8)
    _share_axis(ax, "share of replies / score (0-1)")
    _legend(ax, [(n, colours[n], "//" if n == REFERENCE else None) for n in names])
    return fig


_SWEEP_SHARES = (("early_end", "early end", None), ("mid_sentence", "ends mid-sentence", "//"),
                 ("length_stop", "hit max_new_tokens", ".."))


def sweep_figure(rows: list[dict], colours: dict[str, str]):
    """Per setting: mean reply words with min-max whiskers, and the truncation shares (hatch per share),
    every bar in its model's colour."""
    import numpy as np

    multi = len({r["model"] for r in rows}) > 1
    labels = [f"{r['model']}: {r['setting']}" if multi else r["setting"] for r in rows]
    x = np.arange(len(rows))
    fig, (a1, a2) = _figure(12, 0.45 * len(rows) + 2.2, nrows=1, ncols=2)
    top = max([r["words_max"] or 0 for r in rows] + [1])
    for i, r in enumerate(rows):
        mean = r["words_mean"]
        err = None if mean is None else [[mean - r["words_min"]], [r["words_max"] - mean]]
        bar(a1, x[i], mean, height=0.8, colour=colours[r["model"]], gid=f"{r['model']}|words_mean", kind="num",
            span=top, xerr=err)
        for k, (key, _, hatch) in enumerate(_SWEEP_SHARES):
            bar(a2, x[i] + (k - 1) * 0.27, r.get(key), height=0.27, colour=colours[r["model"]],
                gid=f"{r['model']}|{key}", kind="pct", hatch=hatch)
    a1.set_yticks(x, labels, fontsize=8)
    a1.invert_yaxis()
    a1.set_xlim(0, top * 1.15)
    a1.set_xlabel("reply length, words (mean; whiskers: min-max)")
    a1.grid(axis="x", alpha=0.3)
    a2.set_yticks(x, [""] * len(rows))
    _share_axis(a2, "share of replies (all three: lower is better)")
    _legend(a2, [(label, "#777", hatch) for _, label, hatch in _SWEEP_SHARES])
    return fig


def eval_figures(result: dict, rows: list[dict], reference_words: list[int] | None) -> dict:
    """The eval report's plots, by file name, every one coloured by the one :func:`model_colours` mapping.

    Args:
        result: the evaluation's summary (``models``, ``reference``, ``options.early_tokens``).
        rows: every measured reply.
        reference_words: the reference replies' word counts (None: no reference).
    """
    names = list(result["models"])
    colours = model_colours(names)
    rates = dict(result["models"])
    if result.get("reference"):
        rates[REFERENCE] = result["reference"]
    early_words = WORDS_PER_TOKEN * result["options"]["early_tokens"]
    return {"lengths.png": lengths_figure(rows, names, early_words, reference_words, colours),
            "rates.png": rates_figure(rates, colours)}
