"""Known-answer tests of the reply metrics (mlx_persona.eval.metrics) on hand-written replies."""

import pytest

from mlx_persona.eval.metrics import (
    BETTER,
    StyleModel,
    corpus_distinct_n,
    count_phrases,
    count_words,
    distinct_n,
    ends_mid_sentence,
    is_early_end,
    match_words,
    repetition,
    reply_metrics,
    summarize,
    word_count,
)
from mlx_persona.eval.persona import Persona

PERSONA = Persona(name="Bluey", description="a pup", catchphrases=["hooray", "i reckon", "pretend dollars"],
                  vocabulary=["mum", "dad", "bingo", "keepy", "ta"], breaking_phrases=["as an ai", "i'm sorry, but"])


def test_word_count_is_whitespace_split_like_data_stats():
    assert word_count("Hooray!  Let's   play\nKeepy-Uppy.") == 4
    assert word_count("") == 0
    assert word_count("   \n ") == 0
    assert word_count("one") == 1


def test_match_words_lowercase_keep_inner_apostrophes_split_hyphens():
    assert match_words("Hooray! Let’s play Keepy-Uppy, OK?") == ["hooray", "let's", "play", "keepy", "uppy", "ok"]
    assert match_words("...!") == []


@pytest.mark.parametrize("text, mid", [
    ("We went to the park.", False),
    ("We went to the", True),
    ("I reckon it's", True),
    ("Here's how:", True),
    ('She said "hooray!"', False),
    ("Yay! 🎉", False),
    ("Yay! 👍🏽", False),  # skin-tone modifier (Sk) after the emoji
    ("Let's play (pirates).", False),
    ("Wait for it…", False),
    ("**Hooray!**", False),
    ("Ta-da!\n\n", False),
    ("Really?!", False),
    ("", False),
    ("🎉", False),
    ("and then 🎉", True),
])
def test_ends_mid_sentence(text, mid):
    assert ends_mid_sentence(text) is mid


def test_early_end_needs_an_end_token_and_fewer_than_three_quarters_of_the_tokens_in_words():
    assert is_early_end("end_token", 30)  # threshold 0.75 * 50 = 37.5 words
    assert is_early_end("end_token", 37)
    assert not is_early_end("end_token", 38)
    assert not is_early_end("length", 5)  # cut by max_new_tokens: not the model's choice
    assert not is_early_end("stop_string", 5)
    assert is_early_end("end_token", 7, early_tokens=10) and not is_early_end("end_token", 8, early_tokens=10)


def test_marker_counts():
    text = "Hooray! HOORAY, I reckon we need pretend dollars. I’m sorry, but hoorays are free."
    # "hoorays" is another word: catchphrases match whole words.
    assert count_phrases(text, PERSONA.catchphrases) == {"hooray": 2, "i reckon": 1, "pretend dollars": 1}
    assert count_phrases(text, PERSONA.breaking_phrases) == {"i'm sorry, but": 1}  # curly apostrophe matches
    words = "Mum and Dad played Keepy-Uppy with Bingo and Mummy. Ta-da! Mum laughed."
    assert count_words(words, PERSONA.vocabulary) == {"mum": 2, "dad": 1, "bingo": 1, "keepy": 1, "ta": 1}
    assert count_words("Mummy and Daddy", ["mum", "dad"]) == {}  # whole words only


@pytest.mark.parametrize("text, phrase, n", [
    ("Bikkie!", "bikkie", 1),
    ("xbikkiex", "bikkie", 0),  # inside another word: random token soup does not count
    ("bikkies", "bikkie", 0),
    ("2bikkie", "bikkie", 0),
    ("a bikkie-time snack", "bikkie", 1),  # a hyphen ends a word
    ("_bikkie_ and 'bikkie' and (bikkie)", "bikkie", 3),  # emphasis, quotes, brackets
    ("bikkie bikkie", "bikkie", 2),
    ("I  reckon so", "i reckon", 1),  # multi-word, whitespace normalised
    ("I\nreckon so", "i reckon", 1),
    ("hi reckon", "i reckon", 0),
    ("I reckoned", "i reckon", 0),
    ("Ta-da! Ta-dah!", "ta-da", 1),
    ("Easy peasy lemon squeezy", "easy peasy", 1),
    ("as an aim", "as an ai", 0),
    ("I’m sorry, but no", "i'm sorry, but", 1),
    ("Wow!!!", "!!", 1),  # punctuation at the ends needs no word boundary
])
def test_phrases_match_on_word_boundaries(text, phrase, n):
    assert count_phrases(text, [phrase]) == ({phrase: n} if n else {})


def test_token_soup_has_no_catchphrase():
    soup = "xbikkiexhoorayz brekkiesand ireckonwackadoo"
    assert all(p in soup.replace(" ", "") for p in ("bikkie", "hooray", "brekkie", "wackadoo"))  # as substrings
    assert count_phrases(soup, ["bikkie", "hooray", "brekkie", "wackadoo", "i reckon"]) == {}
    assert reply_metrics(soup, "length", persona=PERSONA)["catchphrase_hits"] == 0


def test_undecodable_replies_are_counted():
    assert ends_mid_sentence("Hooray! \ufffd")  # broken bytes at the end are not an emoji
    assert ends_mid_sentence("\ufffd\ufffd")
    texts = ["Hooray! \ufffd\ufffd", "\ufffd", "Hooray!"]
    rows = [reply_metrics(t, "end_token") for t in texts]
    assert [r["replacement_chars"] for r in rows] == [2, 1, 0]
    assert summarize(texts, rows, ["end_token"] * 3)["undecodable"] == pytest.approx(2 / 3)


def test_every_summary_metric_declares_its_better_direction():
    rows = [reply_metrics("Hi.", "end_token")]
    keys = set(summarize(["Hi."], rows, ["end_token"])) - {"replies", "words_min", "words_max"}
    assert keys <= set(BETTER) and set(BETTER.values()) == {"reference", "higher", "lower"}
    assert (BETTER["words_mean"], BETTER["with_catchphrase"], BETTER["mid_sentence"]) == ("reference", "higher", "lower")


def test_distinct_n_and_repetition():
    w = "a b a b c".split()
    assert distinct_n(w, 1) == pytest.approx(3 / 5)
    assert distinct_n(w, 2) == pytest.approx(3 / 4)  # ab ba ab bc
    assert distinct_n([], 1) is None and distinct_n(["a"], 2) is None
    assert repetition("a b c a b c a b c".split(), 3) == pytest.approx(4 / 7)  # 7 trigrams, 3 distinct
    assert repetition("a b".split(), 3) == 0.0
    assert repetition("we played and we laughed".split(), 3) == 0.0
    # Pooled over replies, never across a reply boundary: ("a b", "a b") has one distinct bigram of two.
    assert corpus_distinct_n(["a b", "a b"], 2) == pytest.approx(0.5)
    assert corpus_distinct_n(["a b", "b a"], 2) == pytest.approx(1.0)
    assert corpus_distinct_n(["a", ""], 2) is None


def test_style_similarity():
    train = ["Hooray! Let's play Keepy Uppy in the backyard with Bingo!",
             "I reckon Mum would love a bikkie for brekkie. Heaps good!",
             "We're playing shops and you have to pay with pretend dollars."]
    style = StyleModel(train)
    same = StyleModel(["just one reference reply"])
    assert same.similarity("just one reference reply") == pytest.approx(1.0)
    assert same.similarity("Just  ONE reference reply") == pytest.approx(1.0)  # normalised
    assert style.similarity("") == 0.0
    assert style.similarity("zzqx vvkj") == 0.0  # no shared character n-gram
    in_style = style.similarity("Hooray! I reckon we should play in the backyard with Bingo and Mum!")
    off_style = style.similarity("The quarterly revenue report indicates substantial EBITDA growth.")
    assert 0.0 < off_style < in_style < 1.0
    with pytest.raises(ValueError):
        StyleModel(["", "  "])


def test_reply_metrics_and_summary_known_answers():
    replies = [
        ("Hooray! Mum said we can play Keepy Uppy. I reckon Bingo will win.", "end_token"),  # 13 words
        ("As an AI I cannot play, but the the the the", "length"),  # 11 words, mid-sentence
        ("Hi.", "end_token"),  # 1 word
    ]
    rows = [reply_metrics(t, s, persona=PERSONA) for t, s in replies]
    first = rows[0]
    assert first["words"] == 13 and not first["mid_sentence"] and first["early_end"]
    assert first["catchphrases"] == {"hooray": 1, "i reckon": 1} and first["catchphrase_hits"] == 2
    assert first["vocabulary"] == {"mum": 1, "bingo": 1, "keepy": 1} and first["vocabulary_hits"] == 3
    assert first["breaking_hits"] == 0 and first["rep_3"] == 0.0 and first["style"] is None
    second = rows[1]
    assert second["words"] == 11 and second["mid_sentence"] and not second["early_end"]
    assert second["breaking"] == {"as an ai": 1}
    # trigrams: as-an-ai an-ai-i ai-i-cannot i-cannot-play cannot-play-but play-but-the but-the-the the-the-the x2
    assert second["rep_3"] == pytest.approx(1 / 9)
    assert reply_metrics("Hi.", None)["early_end"] is None  # reference replies were not generated

    s = summarize([t for t, _ in replies], rows, [st for _, st in replies])
    assert s["replies"] == 3
    assert s["words_mean"] == pytest.approx(25 / 3) and s["words_median"] == 11
    assert (s["words_min"], s["words_max"]) == (1, 13)
    assert s["mid_sentence"] == pytest.approx(1 / 3)
    assert s["early_end"] == pytest.approx(2 / 3)
    assert s["length_stop"] == pytest.approx(1 / 3)
    assert s["with_catchphrase"] == pytest.approx(1 / 3) and s["catchphrase_per_reply"] == pytest.approx(2 / 3)
    assert s["vocabulary_per_100_words"] == pytest.approx(100 * 3 / 25)
    assert s["breaking"] == pytest.approx(1 / 3)
    assert s["rep_3"] == pytest.approx((0 + 1 / 9 + 0) / 3)
    assert s["style"] is None
