"""Every plot of training and evaluation (PNG, matplotlib's Agg backend: no display needed).

The evaluation plots return PNG bytes: the caller writes them next to the results and hands the same
bytes to the report, which embeds them without reading anything back.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

# Shares plotted side by side per model (:func:`plot_rates`).
RATE_ROWS = [("mid_sentence", "ends mid-sentence"), ("early_end", "early end"), ("length_stop", "hit max_new_tokens"),
             ("with_catchphrase", "with catchphrase"), ("breaking", "breaks character"), ("distinct_2", "distinct-2"),
             ("rep_3", "repeated 3-grams"), ("style", "style similarity")]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    """`fig` as PNG bytes; the figure is closed (pyplot keeps every open one alive)."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    _pyplot().close(fig)
    return buf.getvalue()


def plot_loss(metrics_path: str | Path, out_png: str | Path) -> Path:
    """Training loss (and validation loss, if any) against step, from a metrics.jsonl."""
    plt = _pyplot()
    train, val = [], []
    for line in Path(metrics_path).read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            train.append((row["step"], row["loss"]))
        if "val_loss" in row:
            val.append((row["step"], row["val_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return Path(out_png)


def plot_lengths(rows: list[dict], names: list[str], early_words: float,
                 reference_words: list[int] | None = None) -> bytes:
    """One histogram of reply length (words) per model, as shares of its replies; the reference outlined."""
    import numpy as np

    plt = _pyplot()
    words = {n: [r["metrics"]["words"] for r in rows if r["model"] == n] for n in names}
    top = max([max(w, default=0) for w in words.values()] + [max(reference_words or [0])] + [10])
    width = max(5, int(np.ceil(top / 25 / 5) * 5))
    bins = np.arange(0, top + width + 1, width)
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 1.9 * len(names) + 0.8), dpi=100, sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        w = words[name]
        if w:
            ax.hist(w, bins=bins, weights=np.full(len(w), 1 / len(w)), color="#4c78a8", label=name)
        if reference_words:
            ax.hist(reference_words, bins=bins, weights=np.full(len(reference_words), 1 / len(reference_words)),
                    histtype="step", color="#e45756", linewidth=1.5, label="reference (validation replies)")
        ax.axvline(early_words, color="#555", linestyle="--", linewidth=1)
        mean = f"mean {np.mean(w):.0f}, min {min(w)}, max {max(w)}" if w else "no replies"
        ax.set_title(f"{name}: {mean} words", fontsize=10, loc="left")
        ax.set_ylabel("share")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8, loc="upper right")
    axes[-1, 0].set_xlabel(f"reply length (words); dashed: early-end threshold ({early_words:g} words)")
    return _png(fig)


def _share_axis(ax, xlabel: str) -> None:
    """A horizontal bar panel of shares (0-1): first row on top, grid, legend."""
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")


def plot_rates(summaries: dict[str, dict]) -> bytes:
    """Grouped horizontal bars of the 0-1 metrics, one bar per model (and the reference)."""
    import numpy as np

    plt = _pyplot()
    names = list(summaries)
    y = np.arange(len(RATE_ROWS))
    h = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(RATE_ROWS) * max(1, len(names) / 2) + 1.2), dpi=100)
    for i, name in enumerate(names):
        vals = [summaries[name].get(k) for k, _ in RATE_ROWS]
        ax.barh(y + (i - (len(names) - 1) / 2) * h, [v if v is not None else 0 for v in vals], height=h,
                label=name, hatch="//" if name.startswith("reference") else None)
    ax.set_yticks(y, [label for _, label in RATE_ROWS])
    _share_axis(ax, "share of replies / score (0-1)")
    return _png(fig)


def plot_sweep(rows: list[dict]) -> bytes:
    """Per setting: mean reply words with min-max whiskers, and the truncation shares."""
    import numpy as np

    plt = _pyplot()
    models = list(dict.fromkeys(r["model"] for r in rows))
    labels = [r["setting"] if len(models) == 1 else f"{r['model']}: {r['setting']}" for r in rows]
    x = np.arange(len(rows))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 0.45 * len(rows) + 2.2), dpi=100)
    mean = np.array([r["words_mean"] or 0 for r in rows])
    lo = mean - np.array([r["words_min"] or 0 for r in rows])
    hi = np.array([r["words_max"] or 0 for r in rows]) - mean
    a1.barh(x, mean, xerr=[lo, hi], color="#4c78a8", capsize=3)
    a1.set_yticks(x, labels, fontsize=8)
    a1.invert_yaxis()
    a1.set_xlabel("reply length, words (mean; whiskers: min-max)")
    a1.grid(axis="x", alpha=0.3)
    h = 0.27
    for i, (key, label) in enumerate((("early_end", "early end"), ("mid_sentence", "ends mid-sentence"),
                                      ("length_stop", "hit max_new_tokens"))):
        a2.barh(x + (i - 1) * h, [r[key] or 0 for r in rows], height=h, label=label)
    a2.set_yticks(x, [""] * len(rows))
    _share_axis(a2, "share of replies")
    return _png(fig)
