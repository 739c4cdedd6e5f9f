"""The loop demo's training data (benchmarks/bench_loop.py): every reply cut into one length band, each
still ending its sentence, each a cut of the original reply (its first words)."""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_loop import HIGH, LOW, short_reply, write_short_data
from mlx_persona.eval.metrics import ends_mid_sentence


def test_whole_sentences_when_they_fit():
    text = "Hooray! I love the beach so much. We built a sandcastle with a moat and a flag on top. Then it rained."
    # 1 + 6 + 12 words fit in 20; the fourth sentence would make 22.
    assert short_reply(text) == "Hooray! I love the beach so much. We built a sandcastle with a moat and a flag on top."


def test_cut_after_a_clause_when_no_sentence_end_fits():
    text = ("Hmm. Mum says people go to work and earn money and then they can buy food, clothes and toys and "
            "pay for the house we live in.")  # "Hmm." alone is under 12 words, the next sentence goes past 20
    assert short_reply(text) == "Hmm. Mum says people go to work and earn money and then they can buy food."


def test_cut_at_the_limit_without_trailing_small_words():
    text = "Well I can talk and I'm a dog so yes but I think you mean animals like the birds in the big tree."
    # the 20th word is "in": dropped, and no comma past the 12th word
    assert short_reply(text) == "Well I can talk and I'm a dog so yes but I think you mean animals like the birds."
    early_comma = "Mum says people go to work to earn money, so they can buy food and clothes and pay for the house."
    # the comma is the 9th word (a cut there would be under 12): the limit, less "the" and "for"
    assert short_reply(early_comma) == "Mum says people go to work to earn money, so they can buy food and clothes and pay."


def test_short_replies_stay_as_they_are():
    assert short_reply("Yes! I love it.") == "Yes! I love it."


def test_shipped_data_cut_into_the_band(tmp_path):
    band = write_short_data(tmp_path)
    assert (band["min_words"], band["max_words"]) == (LOW, HIGH) and band["replies"] == 218
    for split in ("train", "valid"):
        originals = (REPO / "data/bluey" / f"{split}.jsonl").read_text().splitlines()
        cut = (tmp_path / f"{split}.jsonl").read_text().splitlines()
        assert len(cut) == len(originals)
        for a, b in zip(originals, cut):
            before, after = json.loads(a)["messages"], json.loads(b)["messages"]
            assert [m["role"] for m in before] == [m["role"] for m in after]
            for m0, m1 in zip(before, after):
                if m0["role"] != "assistant":
                    assert m1 == m0
                    continue
                words, original = m1["content"].split(), m0["content"].split()
                assert LOW <= len(words) <= HIGH and not ends_mid_sentence(m1["content"])
                assert words[:-1] == original[:len(words) - 1]  # a cut of the original; only the last word's end changes
                assert original[len(words) - 1].startswith(words[-1].rstrip(".!?…\"'”’)"))
