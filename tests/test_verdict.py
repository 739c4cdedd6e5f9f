"""The verdict of an evaluation on hand-built results whose answer is computed by hand (mlx_persona.eval.verdict),
and how the report opens with it (mlx_persona.eval.report)."""

from __future__ import annotations

import pytest

from mlx_persona.eval.metrics import reply_metrics, summarize
from mlx_persona.eval.persona import Persona
from mlx_persona.eval.report import verdict_sentence, write_eval_report
from mlx_persona.eval.verdict import judge, verdict

PERSONA = Persona(name="Bluey", description="a pup", catchphrases=["hooray", "i reckon"], vocabulary=["park"])

# model -> seed -> replies (every one ends with an end token). Worked out by hand:
#   words        base: seed 0 [2, 2] -> 2, seed 1 [4, 4] -> 4 (range 2), all 3.0;  ft: 4, 5 (range 1), all 4.5
#   catchphrase  base: 0 and 1/2 (range 0.5), all 0.25;                          ft: 1 and 1 (range 0), all 1.0
#   mid-sentence base: 0 and 0 (range 0), all 0;          ft: 1/2 and 1/2 (range 0), all 0.5 (no final stop)
REPLIES = {
    "base": {0: ["Hi there.", "Hi there."], 1: ["Hooray, we play outside.", "We can play outside."]},
    "ft": {0: ["Hooray! I reckon so.", "Hooray for the park"], 1: ["Hooray! We went outside.",
                                                                   "Hooray! We went to the park"]},
}
REFERENCE = {"words_mean": 10.0, "with_catchphrase": 0.5, "mid_sentence": 0.0, "breaking": 0.0}


def make_rows(replies: dict, seeds=(0, 1)) -> list[dict]:
    rows = []
    for model, by_seed in replies.items():
        for seed in seeds:
            for i, text in enumerate(by_seed[seed]):
                rows.append({"model": model, "seed": seed, "prompt_id": i, "prompt": f"prompt {i}", "text": text,
                             "stop_reason": "end_token", "metrics": reply_metrics(text, "end_token", persona=PERSONA)})
    return rows


def make_result(rows: list[dict], bases: dict, losses: dict) -> dict:
    models = {}
    for name, base in bases.items():
        mine = [r for r in rows if r["model"] == name]
        models[name] = {"model": f"spec-{name}", "adapter": None, "note": "", "base": base,
                        **summarize([r["text"] for r in mine], [r["metrics"] for r in mine],
                                    [r["stop_reason"] for r in mine]),
                        "val_loss": losses[name]}
    return {"models": models, "reference": dict(REFERENCE), "command": None, "generation": {"temperature": 0.8},
            "prompts": ["prompt 0", "prompt 1"], "system": None,
            "options": {"early_tokens": 50, "prompts": "p.jsonl", "persona": "card.yaml", "train": "t.jsonl",
                        "valid": "v.jsonl"}}


@pytest.fixture
def judged():
    rows = make_rows(REPLIES)
    result = make_result(rows, {"base": None, "ft": "base"}, {"base": 2.0, "ft": 1.5})
    return result, rows, verdict(result, rows)


def by_key(v: dict) -> dict:
    return {m["key"]: m for m in v["metrics"]}


def test_a_move_within_the_seed_spread_is_not_distinguishable(judged):
    _, _, v = judged
    words = by_key(v["ft"])["words_mean"]
    # 3.0 -> 4.5 towards the reference's 10 (7 -> 5.5 away), but the base moves 2 words between its seeds.
    assert (words["base"], words["value"], words["reference"]) == (3.0, 4.5, 10.0)
    assert words["change"] == pytest.approx(1.5) and words["closer_by"] == pytest.approx(1.5)
    assert words["towards_reference"] is True and words["spread"] == pytest.approx(2.0)
    assert words["distinguishable"] is False and words["call"] == "within spread"
    assert words["direction"] == "reference"


def test_better_and_worse_follow_each_metrics_direction(judged):
    _, _, v = judged
    m = by_key(v["ft"])
    catch = m["with_catchphrase"]  # higher is better: 0.25 -> 1.0, past the reference's 0.5
    assert (catch["base"], catch["value"], catch["change"], catch["spread"]) == (0.25, 1.0, 0.75, 0.5)
    assert catch["closer_by"] == pytest.approx(-0.25) and catch["towards_reference"] is False
    assert catch["gain"] == pytest.approx(0.75) and catch["distinguishable"] is True and catch["call"] == "better"
    mid = m["mid_sentence"]  # lower is better: 0 -> 0.5 with no spread at all
    assert (mid["base"], mid["value"], mid["spread"], mid["gain"]) == (0.0, 0.5, 0.0, -0.5)
    assert mid["towards_reference"] is False and mid["call"] == "worse"
    loss = m["val_loss"]  # not sampled: spread 0; the reference has no loss
    assert (loss["change"], loss["spread"], loss["reference"], loss["towards_reference"]) == (-0.5, 0.0, None, None)
    assert loss["call"] == "better"
    assert m["breaking"]["call"] == "same" and m["breaking"]["change"] == 0.0
    assert m["length_stop"]["reference"] is None and m["length_stop"]["call"] == "same"
    assert v["ft"]["base"] == "base" and v["ft"]["seeds"] == 2
    assert v["ft"]["counts"]["within spread"] >= 1 and v["ft"]["counts"]["worse"] >= 1


def test_a_model_without_its_base_is_not_judged(judged):
    _, _, v = judged
    assert v["base"]["base"] is None
    assert {m["call"] for m in v["base"]["metrics"]} == {"n/a"}
    assert all(m["change"] is None for m in v["base"]["metrics"])


def test_one_seed_leaves_the_spread_unknown():
    rows = make_rows(REPLIES, seeds=(0,))
    result = make_result(rows, {"base": None, "ft": "base"}, {"base": 2.0, "ft": 1.5})
    v = verdict(result, rows)["ft"]
    catch = by_key(v)["with_catchphrase"]  # 0 -> 1 on seed 0 alone
    assert catch["spread"] is None and catch["distinguishable"] is None and catch["call"] == "better"
    assert by_key(v)["val_loss"]["spread"] == 0.0 and v["seeds"] == 1
    sentence = verdict_sentence("ft", v, [], str, lambda t: f"**{t}**")
    assert "One seed only" in sentence and "(1 seed)" in sentence


def test_judge_edge_cases():
    # The same distance on the other side of the reference: no closer, no further.
    assert judge("words_mean", 12.0, 8.0, 10.0, 1.0)["call"] == "same"
    # No reference value for a closer-to-reference metric: nothing to judge.
    assert judge("words_mean", 12.0, 8.0, None, 1.0)["call"] == "n/a"
    assert judge("rep_3", 0.1, 0.3, None, 0.05)["call"] == "better"
    assert judge("rep_3", 0.1, 0.3, None, 0.2)["call"] == "within spread"  # |change| == spread: not past it
    assert judge("style", None, 0.3, 0.5, 0.1)["call"] == "n/a"


def test_the_report_opens_with_the_verdict(judged, tmp_path):
    result, rows, v = judged
    result["verdict"] = v
    write_eval_report(tmp_path, result, rows, {})
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# Persona evaluation\n\n## Verdict\n")
    assert md.index("## Verdict") < md.index("## Models") < md.index("## Summary")
    line = next(t for t in md.splitlines() if t.startswith("- **ft** against its base **base** (2 seeds): "))
    assert "better on" in line and "worse on" in line and "ends mid-sentence" in line
    assert "not distinguishable from the seed-to-seed spread on" in line and "words: mean" in line
    assert "- **base**: a base model, set against its fine-tunes (**ft**)." in md
    assert "| words: mean | closer to reference | 3.0 | 4.5 | 10.0 | +1.5 | +1.5 | 2.0 | not distinguishable |" in md
    assert "| replies with a catchphrase | higher | 25% | 100% | 50% | +75 pt | -25 pt | 50 pt | better |" in md
    assert "| metric | better | base | ft | reference |" in md  # the summary says which way is better
    page = (tmp_path / "report.html").read_text()
    assert page.index("<h2>Verdict</h2>") < page.index("<h2>Models</h2>")
    assert "<li><strong>ft</strong> against its base <strong>base</strong> (2 seeds): " in page


def test_undecodable_replies_are_counted_and_shown(tmp_path):
    replies = {"ft": {0: ["Hooray! \ufffd\ufffd", "Hooray!"]}}
    rows = make_rows(replies, seeds=(0,))
    result = make_result(rows, {"ft": None}, {"ft": 1.0})
    assert result["models"]["ft"]["undecodable"] == 0.5
    result["verdict"] = verdict(result, rows)
    write_eval_report(tmp_path, result, rows, {})
    md = (tmp_path / "report.md").read_text()
    assert "2 × U+FFFD (not UTF-8)" in md and "| replies with U+FFFD (bytes not UTF-8) | lower | 50% |" in md
    page = (tmp_path / "report.html").read_text()
    assert page.count('<mark class="fffd"') == 2
