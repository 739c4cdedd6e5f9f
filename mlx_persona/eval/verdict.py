"""The verdict of an evaluation, as data: per model and metric, where it stands against its base model
and the human-written reference, and whether the move is larger than sampling noise.

For a fine-tuned model whose base model (as published) is in the same evaluation
(:func:`mlx_persona.eval.entries.find_bases`), every metric of :data:`KEYS` gets:

* ``value``, ``base``, ``reference`` -- the model's, its base's and the validation replies' aggregate
  (``reference`` is None where the reference has none: early end, hit max_new_tokens, validation loss);
* ``change`` = value - base; ``closer_by`` = \\|base - reference\\| - \\|value - reference\\| and
  ``towards_reference`` = closer_by > 0 (None without a reference value);
* ``gain`` -- the move in the metric's better direction (:data:`mlx_persona.eval.metrics.BETTER`):
  ``closer_by`` for "reference", ``change`` for "higher", ``-change`` for "lower";
* ``spread`` -- the seed-to-seed spread: the metric computed on each seed's replies alone, max - min over
  the seeds, the larger of the model's and the base's (0 for the validation loss, which involves no
  sampling; None with a single seed);
* ``distinguishable`` = \\|change\\| > spread (None when the spread is unknown);
* ``call`` -- ``better`` / ``worse`` (a move past the spread, or with an unknown spread), ``within spread``
  (\\|change\\| <= spread: not distinguishable from a reseed), ``same`` (no change, or no closer nor further),
  ``n/a`` (a value, the base or the reference it needs is missing).

A model without its base in the evaluation gets the same rows with ``base`` None and every call ``n/a``.
"""

from __future__ import annotations

from mlx_persona.eval.metrics import BETTER, summarize

# The metrics judged, in the summary table's order (not: replies, min-max, perplexity = exp(loss), speed).
KEYS = ("words_mean", "words_median", "mid_sentence", "early_end", "length_stop", "with_catchphrase",
        "catchphrase_per_reply", "vocabulary_per_100_words", "breaking", "undecodable", "distinct_1", "distinct_2",
        "rep_3", "style", "val_loss")
UNSEEDED = {"val_loss"}  # measured once, not sampled: no seed-to-seed spread
_TINY = 1e-12


def per_seed(rows: list[dict], name: str) -> dict[int, dict]:
    """Seed -> the aggregates of `name`'s replies of that seed alone."""
    by_seed: dict[int, list[dict]] = {}
    for r in rows:
        if r["model"] == name:
            by_seed.setdefault(r["seed"], []).append(r)
    return {seed: summarize([r["text"] for r in rs], [r["metrics"] for r in rs], [r["stop_reason"] for r in rs])
            for seed, rs in sorted(by_seed.items())}


def seed_range(seeds: dict[int, dict], key: str) -> float | None:
    """max - min of `key` over the seeds; None with fewer than two seeds that have a value."""
    values = [s[key] for s in seeds.values() if s.get(key) is not None]
    return max(values) - min(values) if len(values) > 1 else None


def _spread(key: str, *seeds: dict[int, dict]) -> float | None:
    if key in UNSEEDED:
        return 0.0
    ranges = [seed_range(s, key) for s in seeds]
    return None if any(r is None for r in ranges) else max(ranges)


def judge(key: str, value, base, reference, spread: float | None) -> dict:
    """One metric's row of the verdict (see the module doc)."""
    direction = BETTER[key]
    row = {"key": key, "direction": direction, "value": value, "base": base, "reference": reference,
           "change": None, "closer_by": None, "towards_reference": None, "gain": None, "spread": spread,
           "distinguishable": None, "call": "n/a"}
    if value is None or base is None:
        return row
    change = value - base
    row["change"] = change
    if reference is not None:
        row["closer_by"] = abs(base - reference) - abs(value - reference)
        row["towards_reference"] = row["closer_by"] > _TINY
    row["gain"] = {"reference": row["closer_by"], "higher": change, "lower": -change}[direction]
    if spread is not None:
        row["distinguishable"] = abs(change) > spread + _TINY
    if row["gain"] is None:
        return row
    if abs(change) <= _TINY or abs(row["gain"]) <= _TINY:
        row["call"] = "same"
    elif row["distinguishable"] is False:
        row["call"] = "within spread"
    else:
        row["call"] = "better" if row["gain"] > 0 else "worse"
    return row


def verdict(result: dict, rows: list[dict]) -> dict[str, dict]:
    """Per model: its base's name (or None), the number of seeds, and one :func:`judge` row per metric.

    Args:
        result: what :func:`mlx_persona.eval.evaluate.evaluate` writes to ``summary.json``: ``models``
            (name -> aggregates, with ``base``: the name of its base entry or None) and ``reference``.
        rows: every measured reply (``model``, ``seed``, ``text``, ``stop_reason``, ``metrics``).

    Returns:
        name -> ``{"base", "seeds", "metrics": [row, ...], "counts": {call: n}, "towards_reference",
        "with_reference"}`` (the last two: how many metrics moved towards the reference, of those it has).
    """
    reference = result.get("reference") or {}
    seeds = {name: per_seed(rows, name) for name in result["models"]}
    out = {}
    for name, summary in result["models"].items():
        base = summary.get("base")
        base_summary = result["models"].get(base) if base else None
        judged = []
        for key in KEYS:
            spread = _spread(key, seeds[name], *([seeds[base]] if base_summary else []))
            judged.append(judge(key, summary.get(key), base_summary.get(key) if base_summary else None,
                                reference.get(key), spread))
        counts = {}
        for j in judged:
            counts[j["call"]] = counts.get(j["call"], 0) + 1
        out[name] = {"base": base if base_summary else None, "seeds": len(seeds[name]), "metrics": judged,
                     "counts": counts,
                     "towards_reference": sum(j["towards_reference"] is True for j in judged),
                     "with_reference": sum(j["towards_reference"] is not None for j in judged)}
    return out
