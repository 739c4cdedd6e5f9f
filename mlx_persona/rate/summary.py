"""What the ratings say, per rater (``human``, each ``judge:NAME``): for every pair of models, the wins of
each, the ties and the both-bad, and the first model's win rate over the decisive judgements with its
95% Wilson interval; Bradley-Terry strengths when more than two models were rated
(:mod:`mlx_persona.rate.stats`); human-judge agreement (percent and Cohen's kappa over the four verdicts,
on the pairs both judged); and what became of each judge's answers (stored, unparsable, failed).

Undone judgements count nowhere. Where a rater judged one pair more than once, its latest judgement is
the one agreement compares.
"""

from __future__ import annotations

from collections import Counter

from mlx_persona.rate.stats import bradley_terry, cohen_kappa, wilson
from mlx_persona.rate.store import HUMAN, has_table


def _pair_rows(rows) -> list[dict]:
    counts: dict[tuple[str, str], Counter] = {}
    for r in rows:
        counts.setdefault((r["model_a"], r["model_b"]), Counter())[r["verdict"]] += 1
    out = []
    for (a, b), c in sorted(counts.items()):
        decisive = c["a"] + c["b"]
        ci = wilson(c["a"], decisive)
        out.append({"model_a": a, "model_b": b, "wins_a": c["a"], "wins_b": c["b"], "ties": c["tie"],
                    "both_bad": c["both_bad"], "n": sum(c.values()),
                    "win_rate_a": c["a"] / decisive if decisive else None, "ci_a": list(ci) if ci else None})
    return out


def _rater(rows) -> dict:
    pairs = _pair_rows(rows)
    models = sorted({p["model_a"] for p in pairs} | {p["model_b"] for p in pairs})
    wins = {}
    for p in pairs:
        wins[(p["model_a"], p["model_b"])] = p["wins_a"]
        wins[(p["model_b"], p["model_a"])] = p["wins_b"]
    bt = bradley_terry(models, wins) if len(models) > 2 else None
    return {"judgements": len(rows), "models": models, "pairs": pairs, "bradley_terry": bt,
            "bradley_terry_note": None if len(models) <= 2 or bt is not None else
            "not estimable: some model never won (or never lost) against the others"}


def _agreement(by_rater: dict[str, list]) -> list[dict]:
    latest = {r: {(x["prompt_key"], x["model_a"], x["model_b"]): x["verdict"] for x in rows}
              for r, rows in by_rater.items()}
    human = latest.get(HUMAN, {})
    out = []
    for rater in sorted(r for r in latest if r != HUMAN):
        both = sorted(set(human) & set(latest[rater]))
        h, j = [human[k] for k in both], [latest[rater][k] for k in both]
        agree = sum(x == y for x, y in zip(h, j))
        out.append({"judge": rater, "pairs": len(both), "agree": agree,
                    "percent": 100 * agree / len(both) if both else None, "kappa": cohen_kappa(h, j)})
    return out


def summarize(conn) -> dict:
    """The summary of a ratings database (module docstring) as a JSON-ready dict."""
    rows = conn.execute("SELECT * FROM judgements WHERE undone=0 ORDER BY id").fetchall()
    by_rater: dict[str, list] = {}
    for r in rows:
        by_rater.setdefault(r["rater"], []).append(r)
    log = Counter((r[0], r[1]) for r in conn.execute("SELECT rater, outcome FROM judge_log")) \
        if has_table(conn, "judge_log") else Counter()
    judges = sorted({rater for rater, _ in log})
    return {"raters": {r: _rater(v) for r, v in sorted(by_rater.items())},
            "agreement": _agreement(by_rater) if HUMAN in by_rater else [],
            "judge_answers": {j: {k: log[(j, k)] for k in ("stored", "unparsable", "failed")} for j in judges},
            "undone": conn.execute("SELECT COUNT(*) FROM judgements WHERE undone=1").fetchone()[0]}


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


PAIR_HEADER = ["A", "B", "A wins", "B wins", "ties", "both bad", "A's win rate (95% Wilson)"]


def tables(summary: dict) -> tuple[list[dict], list[str]]:
    """The summary as plain tables (``{"title", "header", "rows", "notes"}``, cells as text) and closing
    lines, for any renderer (:func:`markdown`, the eval report)."""
    out = []
    for rater, s in summary["raters"].items():
        rows = []
        for p in s["pairs"]:
            ci = f"{_pct(p['win_rate_a'])} ({_pct(p['ci_a'][0])}–{_pct(p['ci_a'][1])})" if p["ci_a"] else "–"
            rows.append([p["model_a"], p["model_b"], *(str(p[k]) for k in ("wins_a", "wins_b", "ties", "both_bad")),
                         ci])
        notes = []
        if s["bradley_terry"]:
            ranked = sorted(s["bradley_terry"].items(), key=lambda kv: -kv[1])
            notes.append("Bradley-Terry strength (geometric mean 1; P(i beats j) = s_i / (s_i + s_j)): "
                         + ", ".join(f"{m} {v:.3g}" for m, v in ranked))
        elif s["bradley_terry_note"]:
            notes.append(f"Bradley-Terry strength: {s['bradley_terry_note']}")
        out.append({"title": f"{rater}: {s['judgements']} judgements", "header": PAIR_HEADER, "rows": rows,
                    "notes": notes})
    lines = []
    for a in summary["agreement"]:
        kappa = "–" if a["kappa"] is None else f"{a['kappa']:.2f}"
        pct = "–" if a["percent"] is None else f"{a['percent']:.0f}%"
        lines.append(f"human vs {a['judge']}: {a['agree']} of {a['pairs']} pairs agree ({pct}), Cohen's kappa {kappa}")
    for judge, c in summary["judge_answers"].items():
        lines.append(f"{judge} answers: {c['stored']} stored, {c['unparsable']} unparsable, {c['failed']} failed")
    if not summary["raters"]:
        lines.append("no judgements yet")
    return out, lines


def markdown(summary: dict) -> str:
    """The summary as markdown tables (what ``rate --summary`` prints)."""
    found, closing = tables(summary)
    lines = []
    for t in found:
        lines += [f"### {t['title']}", "", "| " + " | ".join(t["header"]) + " |",
                  "|---|---|" + "---:|" * 4 + "---|"]
        lines += ["| " + " | ".join(r) + " |" for r in t["rows"]]
        lines += [x for n in t["notes"] for x in ("", n)] + [""]
    return "\n".join(lines + closing).rstrip() + "\n"


def report_section(path) -> dict:
    """What the eval report shows of the ratings database at `path`: ``{"db", "tables", "lines"}``."""
    from mlx_persona.rate.store import connect

    conn = connect(path, create=False)
    try:
        found, closing = tables(summarize(conn))
    finally:
        conn.close()
    return {"db": str(path), "tables": found, "lines": closing}
