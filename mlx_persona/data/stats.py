"""Length statistics of a data set, and warnings: a model learns the length of its training replies."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from mlx_persona.data.formats import Example
from mlx_persona.data.masks import _hf, encode_example

# The narrow-band warning: replies whose p90/p10 ratio is below this, or whose central 80% fit in
# a band this many words wide that is also relatively tight, teach the model one reply length.
_NARROW_RATIO = 2.0
_NARROW_BAND_WORDS = 30
_NARROW_BAND_SHARE = 0.8
_NARROW_MIN_REPLIES = 5
_FEW_EXAMPLES = 50
_HIST_BINS = 10
_BAR_WIDTH = 40


def compute_stats(examples: Sequence[Example], tokenizer=None) -> dict:
    """Summarize a dataset, focusing on the length of assistant replies.

    Reply length matters most for a persona: a model fine-tuned on replies of one length learns to
    stop at that length whatever it is asked.

    Args:
        examples: the examples.
        tokenizer: optional; adds token lengths of replies and of whole rendered examples.

    Returns:
        ``{"examples", "conversations", "text_examples", "turns" (user + assistant messages),
        "assistant_replies", "system_messages", "reply_words", "reply_tokens", "example_tokens",
        "warnings"}``. Each length entry is None or ``{"count", "min", "p10", "median", "p90",
        "max", "mean", "histogram": {"bins": edges, "counts": counts}}`` with integer-aligned
        half-open bins ``[bins[k], bins[k+1])``; the token entries are None without a tokenizer.
    """
    replies = [m["content"].strip() for ex in examples for m in ex.messages if m["role"] == "assistant"]
    words = [len(r.split()) for r in replies]
    stats = {
        "examples": len(examples),
        "conversations": sum(1 for ex in examples if ex.text is None),
        "text_examples": sum(1 for ex in examples if ex.text is not None),
        "turns": sum(1 for ex in examples for m in ex.messages if m["role"] != "system"),
        "assistant_replies": len(replies),
        "system_messages": sum(1 for ex in examples for m in ex.messages if m["role"] == "system"),
        "reply_words": _distribution(words),
        "reply_tokens": None,
        "example_tokens": None,
    }
    if tokenizer is not None:
        hf = _hf(tokenizer)
        stats["reply_tokens"] = _distribution([len(hf.encode(r, add_special_tokens=False)) for r in replies])
        stats["example_tokens"] = _distribution([len(encode_example(tokenizer, ex)[0]) for ex in examples])
    stats["warnings"] = _warnings(stats, words)
    return stats


def _distribution(values: list[int]) -> dict | None:
    """Order statistics and an integer-aligned histogram of non-negative integers."""
    if not values:
        return None
    arr = np.asarray(values, dtype=np.float64)
    p10, median, p90 = (float(x) for x in np.percentile(arr, [10, 50, 90]))
    return {
        "count": len(values),
        "min": int(arr.min()),
        "p10": p10,
        "median": median,
        "p90": p90,
        "max": int(arr.max()),
        "mean": float(arr.mean()),
        "histogram": _histogram(values),
    }


def _histogram(values: list[int]) -> dict:
    """At most `_HIST_BINS` equal integer-width bins covering ``[min, max]``."""
    lo, hi = min(values), max(values)
    n_bins = min(_HIST_BINS, hi - lo + 1)
    width = math.ceil((hi - lo + 1) / n_bins)
    edges = [lo + k * width for k in range(n_bins + 1)]
    counts = [0] * n_bins
    for v in values:
        counts[(v - lo) // width] += 1
    return {"bins": edges, "counts": counts}


def _warnings(stats: dict, words: list[int]) -> list[str]:
    """Human-readable warnings about the dataset."""
    warnings = []
    if stats["examples"] < _FEW_EXAMPLES:
        warnings.append(
            f"only {stats['examples']} examples; teaching a persona usually takes a few hundred conversations"
        )
    if stats["assistant_replies"] == 0:
        warnings.append("no assistant replies (text-format data): reply-length statistics are not available")
    band = _narrow_band(words)
    if band is not None:
        lo, hi, median = band
        warnings.append(
            f"assistant replies cluster in a narrow band ({lo:g}-{hi:g} words, median {median:g}): the model "
            f"will learn to stop at about {median:g} words whatever it is asked; vary reply lengths (short "
            "answers and longer ones) if it should adapt its length to the question"
        )
    return warnings


def _narrow_band(words: list[int]) -> tuple[float, float, float] | None:
    """``(low, high, median)`` in words when reply lengths are clustered, else None.

    Clustered means p90/p10 below `_NARROW_RATIO`, or `_NARROW_BAND_SHARE` of the replies within a
    band at most `_NARROW_BAND_WORDS` wide that is itself tight (high < ratio x low): 5-30 words is
    not one length, 100-125 is.
    """
    if len(words) < _NARROW_MIN_REPLIES:
        return None
    p10, median, p90 = (float(x) for x in np.percentile(words, [10, 50, 90]))
    if p90 / max(p10, 1.0) < _NARROW_RATIO:
        return p10, p90, median
    lo, hi = _densest_band(sorted(words), math.ceil(_NARROW_BAND_SHARE * len(words)))
    if hi - lo <= _NARROW_BAND_WORDS and hi < _NARROW_RATIO * max(lo, 1):
        return lo, hi, median
    return None


def _densest_band(values: list[int], k: int) -> tuple[int, int]:
    """The narrowest ``(low, high)`` window of sorted `values` that holds `k` of them."""
    windows = ((values[i], values[i + k - 1]) for i in range(len(values) - k + 1))
    return min(windows, key=lambda band: band[1] - band[0])


def format_stats(stats: dict) -> str:
    """Format `compute_stats` output for a terminal.

    Args:
        stats: the dict returned by `compute_stats`.

    Returns:
        Multi-line text: counts, each length distribution with an ASCII histogram, and warnings.
    """
    lines = [
        f"examples: {stats['examples']} ({stats['conversations']} conversations, {stats['text_examples']} text)",
        f"turns: {stats['turns']} ({stats['assistant_replies']} assistant replies, "
        f"{stats['system_messages']} system messages)",
    ]
    titles = (
        ("reply_words", "assistant reply length (words)"),
        ("reply_tokens", "assistant reply length (tokens)"),
        ("example_tokens", "example length (tokens, as trained)"),
    )
    for key, title in titles:
        if stats.get(key):
            lines += ["", *_format_distribution(title, stats[key])]
    lines += ["", "warnings:" if stats["warnings"] else "warnings: none"]
    lines += [f"  - {w}" for w in stats["warnings"]]
    return "\n".join(lines)


def _format_distribution(title: str, dist: dict) -> list[str]:
    """A title line with order statistics, then one histogram row per bin."""
    lines = [
        f"{title}: min {dist['min']}, p10 {dist['p10']:g}, median {dist['median']:g}, "
        f"p90 {dist['p90']:g}, max {dist['max']}, mean {dist['mean']:.1f}"
    ]
    edges, counts = dist["histogram"]["bins"], dist["histogram"]["counts"]
    label_width = len(f"{edges[-1] - 1}") * 2 + 1
    peak = max(counts)
    for k, count in enumerate(counts):
        lo, hi = edges[k], edges[k + 1] - 1
        label = f"{lo}" if lo == hi else f"{lo}-{hi}"
        bar = "#" * max(round(_BAR_WIDTH * count / peak), 1 if count else 0)
        lines.append(f"  {label:>{label_width}} | {bar + ' ' if bar else ''}{count}")
    return lines
