"""Text metrics of generated replies: length, truncation, persona markers, diversity and style.

Pure Python + numpy, no model: every function takes text and returns numbers, so the definitions can be
tested on hand-written replies and reused by ``eval``, ``sweep`` and ``compare``.

Definitions (the report repeats them):

* **words** -- ``len(text.split())``, whitespace-separated pieces, the count ``mlx-persona data stats``
  uses for the training replies, so the two compare directly.
* **mid-sentence** -- the reply is not empty and, after trailing whitespace, closing quotes/brackets,
  markdown emphasis (``*`` ``_`` ``~``) and emoji/symbols are stripped, its last character is not one of
  ``. ! ? …`` (or the full-width ``。！？``).
* **early end** -- the model *chose* to stop (``stop_reason == "end_token"``) with fewer than
  ``WORDS_PER_TOKEN * early_tokens`` words: ``early_tokens`` (default 50, the ``persona`` preset's
  ``min_new_tokens``) in words at ~0.75 English words per Gemma token, i.e. fewer than 37.5 words.
  Replies cut by ``max_new_tokens`` or a stop string are never early ends.
* **persona markers** (from a :class:`mlx_persona.eval.persona.Persona`), on text lower-cased with curly
  apostrophes made straight and whitespace runs made one space: catchphrases and breaking phrases are
  counted as whole words (non-overlapping occurrences that no letter or digit touches on either side:
  ``bikkie`` counts in ``Bikkie!`` and ``bikkie-time``, not in ``xbikkiex`` or ``bikkies``), vocabulary
  as whole words of :func:`match_words`.
* **undecodable** -- the reply holds U+FFFD (REPLACEMENT CHARACTER): the model emitted bytes that are not
  UTF-8 and decoding replaced them. Counted per reply (``replacement_chars``); a trailing U+FFFD is not
  decoration, so such a reply ends mid-sentence.
* **distinct-n** -- distinct n-grams / all n-grams of :func:`match_words` (per reply; and over every
  reply of a model, n-grams never crossing a reply boundary). None when there is no n-gram.
* **repetition (rep-3)** -- the share of a reply's word 3-grams that repeat an earlier 3-gram of the same
  reply, ``1 - distinct-3``; 0 when it has fewer than three words.
* **style similarity** -- cosine between the reply's character n-gram (3-5) TF-IDF vector and the centroid
  of the training replies' vectors (see :class:`StyleModel`).

Which way is better (:data:`BETTER`, used by the verdict): *closer to the reference* (the human-written
validation replies) for reply length and distinct-n, where more or less is not better in itself; *higher*
for the persona markers (catchphrases, vocabulary) and style similarity; *lower* for truncation (ends
mid-sentence, early end, hit ``max_new_tokens``), breaking character, undecodable replies, repeated
3-grams and the validation loss.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from typing import Iterable, Sequence

import numpy as np

WORDS_PER_TOKEN = 0.75
DEFAULT_EARLY_TOKENS = 50

_TERMINAL = set(".!?…。！？")
_CLOSERS = set("\"'”’»)]}*_~`")
_APOSTROPHES = str.maketrans({"’": "'", "‘": "'", "ʼ": "'", "“": '"', "”": '"'})
_MATCH_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")
REPLACEMENT = "\ufffd"  # what decoding puts in place of bytes that are not UTF-8

# The better direction of each summary metric: "reference" (closer to the reference's value), "higher", "lower".
BETTER = {
    "words_mean": "reference", "words_median": "reference", "mid_sentence": "lower", "early_end": "lower",
    "length_stop": "lower", "with_catchphrase": "higher", "catchphrase_per_reply": "higher",
    "vocabulary_per_100_words": "higher", "breaking": "lower", "undecodable": "lower", "distinct_1": "reference",
    "distinct_2": "reference", "rep_3": "lower", "style": "higher", "val_loss": "lower", "val_ppl": "lower",
    "decode_tps": "higher",
}
BETTER_TEXT = {"reference": "closer to reference", "higher": "higher", "lower": "lower"}


# ------------------------------------------------------------------------------------------- words
def word_count(text: str) -> int:
    """Whitespace-separated words (the count ``data stats`` uses)."""
    return len(text.split())


def normalize(text: str) -> str:
    """Lower case, curly apostrophes/quotes made straight, runs of whitespace made one space."""
    return " ".join(text.translate(_APOSTROPHES).lower().split())


def match_words(text: str) -> list[str]:
    """Lower-cased words without punctuation, for vocabulary matching and distinct-n.

    Letters and digits, with inner apostrophes kept (``don't``); hyphens and other punctuation split
    (``Keepy-Uppy`` -> ``keepy``, ``uppy``).
    """
    return _MATCH_WORD.findall(normalize(text))


def _is_trailing_decoration(ch: str) -> bool:
    if ch.isspace() or ch in _CLOSERS:
        return True
    if ch == REPLACEMENT:  # a symbol (So) too, but it stands for broken bytes, not an emoji
        return False
    # Emoji and other symbols (So/Sk), and the joiners/variation selectors (Mn/Cf) emoji come with.
    return unicodedata.category(ch) in ("So", "Sk", "Mn", "Cf")


def ends_mid_sentence(text: str) -> bool:
    """True when a non-empty reply does not end with sentence-final punctuation (see module doc)."""
    end = len(text)
    while end and _is_trailing_decoration(text[end - 1]):
        end -= 1
    if end == 0:
        return False  # empty (or only emoji): nothing was cut
    return text[end - 1] not in _TERMINAL


def is_early_end(stop_reason: str, words: int, early_tokens: int = DEFAULT_EARLY_TOKENS) -> bool:
    """The model ended its reply itself with fewer than ``WORDS_PER_TOKEN * early_tokens`` words."""
    return stop_reason == "end_token" and words < WORDS_PER_TOKEN * early_tokens


# ------------------------------------------------------------------------------------------- markers
def phrase_pattern(phrase: str) -> re.Pattern:
    """The normalised `phrase` as a regular expression that no letter or digit may touch on either side.

    Where the phrase itself starts or ends with punctuation (``ta-da!``), that end needs no boundary.
    """
    norm = normalize(phrase)
    before = r"(?<![^\W_])" if _MATCH_WORD.match(norm[:1]) else ""
    after = r"(?![^\W_])" if _MATCH_WORD.match(norm[-1:]) else ""
    return re.compile(before + re.escape(norm) + after)


def count_phrases(text: str, phrases: Iterable[str]) -> dict[str, int]:
    """Non-overlapping, case-insensitive whole-word occurrences of each phrase (only those found)."""
    norm = normalize(text)
    found = {}
    for phrase in phrases:
        n = len(phrase_pattern(phrase).findall(norm)) if phrase.strip() else 0
        if n:
            found[phrase] = n
    return found


def count_words(text: str, vocabulary: Iterable[str]) -> dict[str, int]:
    """Whole-word, case-insensitive occurrences of each vocabulary word (only those found)."""
    counts = Counter(match_words(text))
    found = {}
    for word in vocabulary:
        n = counts.get(normalize(word), 0)
        if n:
            found[word] = n
    return found


# ------------------------------------------------------------------------------------------- diversity
def ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def distinct_n(words: Sequence[str], n: int) -> float | None:
    """Distinct n-grams / all n-grams; None when there is none."""
    grams = ngrams(words, n)
    return len(set(grams)) / len(grams) if grams else None


def corpus_distinct_n(texts: Iterable[str], n: int) -> float | None:
    """distinct-n over many replies: n-grams are taken within each reply, then pooled."""
    grams = [g for t in texts for g in ngrams(match_words(t), n)]
    return len(set(grams)) / len(grams) if grams else None


def repetition(words: Sequence[str], n: int = 3) -> float:
    """Share of n-gram occurrences that repeat an earlier one in the same reply (0 without n-grams)."""
    d = distinct_n(words, n)
    return 0.0 if d is None else 1.0 - d


# ------------------------------------------------------------------------------------------- style
class StyleModel:
    """Character n-gram TF-IDF of a reference corpus (the training replies) and its centroid.

    Each text becomes the lower-cased, whitespace-normalised string padded with one space, cut into
    character n-grams of lengths ``ngram_range``. Weights are sublinear TF (``1 + log tf``) times smoothed
    IDF (``log((1 + N) / (1 + df)) + 1``, as scikit-learn's ``TfidfVectorizer``), L2-normalised. An
    n-gram the reference never uses gets the largest IDF (df = 0) instead of being dropped, so text
    unlike the reference is not flattered by ignoring what makes it different. The style similarity is
    the cosine between a text's vector and the mean of the reference vectors.
    """

    def __init__(self, texts: Sequence[str], ngram_range: tuple[int, int] = (3, 5)):
        texts = [t for t in texts if t.strip()]
        if not texts:
            raise ValueError("StyleModel needs at least one non-empty reference text")
        self.ngram_range = ngram_range
        self.n_docs = len(texts)
        counts = [self._grams(t) for t in texts]
        df = Counter(g for c in counts for g in c)
        self.idf = {g: math.log((1 + self.n_docs) / (1 + d)) + 1.0 for g, d in df.items()}
        self.unseen_idf = math.log(1 + self.n_docs) + 1.0
        centroid: Counter = Counter()
        for c in counts:
            for g, w in self._vector(c).items():
                centroid[g] += w / self.n_docs
        self.centroid = dict(centroid)
        self.centroid_norm = math.sqrt(sum(w * w for w in centroid.values()))

    def _grams(self, text: str) -> Counter:
        s = f" {normalize(text)} "
        lo, hi = self.ngram_range
        return Counter(s[i:i + n] for n in range(lo, hi + 1) for i in range(len(s) - n + 1))

    def _vector(self, counts: Counter) -> dict[str, float]:
        vec = {g: (1.0 + math.log(tf)) * self.idf.get(g, self.unseen_idf) for g, tf in counts.items()}
        norm = math.sqrt(sum(w * w for w in vec.values()))
        return {g: w / norm for g, w in vec.items()} if norm else {}

    def similarity(self, text: str) -> float:
        """Cosine in [0, 1] between `text` and the reference centroid; 0 for empty text."""
        vec = self._vector(self._grams(text)) if text.strip() else {}
        if not vec or not self.centroid_norm:
            return 0.0
        return sum(w * self.centroid.get(g, 0.0) for g, w in vec.items()) / self.centroid_norm


# ------------------------------------------------------------------------------------------- per reply
def reply_metrics(text: str, stop_reason: str | None = None, *, persona=None, style: StyleModel | None = None,
                  early_tokens: int = DEFAULT_EARLY_TOKENS) -> dict:
    """Every per-reply metric of the module doc.

    Args:
        text: the reply.
        stop_reason: ``end_token`` | ``stop_string`` | ``length``, or None for a reference reply that
            was not generated (then ``early_end`` is None).
        persona: a :class:`mlx_persona.eval.persona.Persona` for the marker counts (None: no markers).
        style: a :class:`StyleModel` for ``style`` (None: no style similarity).
        early_tokens: see :func:`is_early_end`.

    Returns:
        A flat dict: ``words``, ``mid_sentence``, ``early_end``, ``replacement_chars`` (U+FFFD count),
        ``catchphrases`` (phrase -> count),
        ``catchphrase_hits``, ``vocabulary`` (word -> count), ``vocabulary_hits``, ``breaking``
        (phrase -> count), ``breaking_hits``, ``distinct_1``, ``distinct_2``, ``rep_3``, ``style``.
    """
    words = word_count(text)
    mw = match_words(text)
    out = {
        "words": words,
        "mid_sentence": ends_mid_sentence(text),
        "early_end": None if stop_reason is None else is_early_end(stop_reason, words, early_tokens),
        "replacement_chars": text.count(REPLACEMENT),
    }
    for key, hits, field, counter in (("catchphrases", "catchphrase_hits", "catchphrases", count_phrases),
                                      ("vocabulary", "vocabulary_hits", "vocabulary", count_words),
                                      ("breaking", "breaking_hits", "breaking_phrases", count_phrases)):
        found = counter(text, getattr(persona, field, None) or [])
        out[key] = found
        out[hits] = sum(found.values())
    out["distinct_1"] = distinct_n(mw, 1)
    out["distinct_2"] = distinct_n(mw, 2)
    out["rep_3"] = repetition(mw, 3)
    out["style"] = style.similarity(text) if style is not None else None
    return out


def _mean(values) -> float | None:
    values = [float(v) for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summarize(texts: Sequence[str], rows: Sequence[dict], stop_reasons: Sequence[str | None] | None = None) -> dict:
    """Per-model aggregates of :func:`reply_metrics` rows.

    Args:
        texts: the replies (for corpus distinct-n).
        rows: their :func:`reply_metrics` dicts, same order.
        stop_reasons: their stop reasons (None entries for reference replies).

    Returns:
        ``replies``; ``words_mean``, ``words_median``, ``words_min``, ``words_max``; the shares (0-1)
        ``mid_sentence``, ``early_end``, ``length_stop`` (hit ``max_new_tokens``), ``with_catchphrase``,
        ``breaking`` (replies with at least one breaking phrase), ``undecodable`` (replies holding U+FFFD);
        ``catchphrase_per_reply``,
        ``vocabulary_per_100_words``; ``distinct_1``, ``distinct_2`` (pooled over the replies),
        ``rep_3``, ``style`` (means over replies). A share is None when nothing it needs exists.
    """
    n = len(rows)
    words = [r["words"] for r in rows]
    stops = list(stop_reasons) if stop_reasons is not None else [None] * n
    generated = [s for s in stops if s is not None]
    early = [r["early_end"] for r in rows if r["early_end"] is not None]
    total_words = sum(words)
    return {
        "replies": n,
        "words_mean": _mean(words),
        "words_median": float(np.median(words)) if words else None,
        "words_min": min(words) if words else None,
        "words_max": max(words) if words else None,
        "mid_sentence": _mean(r["mid_sentence"] for r in rows),
        "early_end": _mean(early),
        "length_stop": _mean(s == "length" for s in generated) if generated else None,
        "with_catchphrase": _mean(r["catchphrase_hits"] > 0 for r in rows),
        "catchphrase_per_reply": _mean(r["catchphrase_hits"] for r in rows),
        "vocabulary_per_100_words": 100.0 * sum(r["vocabulary_hits"] for r in rows) / total_words
        if total_words else None,
        "breaking": _mean(r["breaking_hits"] > 0 for r in rows),
        "undecodable": _mean(r["replacement_chars"] > 0 for r in rows),
        "distinct_1": corpus_distinct_n(texts, 1),
        "distinct_2": corpus_distinct_n(texts, 2),
        "rep_3": _mean(r["rep_3"] for r in rows),
        "style": _mean(r["style"] for r in rows),
    }
