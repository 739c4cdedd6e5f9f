"""Preference pairs from rules over an evaluation's replies (``mlx-persona data pairs RESULTS --prefer RULE``).

A rule looks at two replies to the same prompt and may prefer one of them. The truncation definitions
are :mod:`mlx_persona.eval.metrics`' own (the eval report counts the same replies):

* ``complete``: a reply that ends its sentence over one that is cut. *Cut* is the eval's truncation: the
  reply hit ``max_new_tokens`` (stop reason ``length``) or it ends mid-sentence
  (:func:`~mlx_persona.eval.metrics.ends_mid_sentence`: no ``. ! ? …`` after trailing quotes, brackets,
  emphasis and emoji). Every other reply (stopped by its end token or a stop string, ending its sentence)
  is *complete*.
* ``longer-than N``: a reply of at least N words (:func:`~mlx_persona.eval.metrics.word_count`) over one
  that the model ended itself (stop reason ``end_token``, the eval's *early end*) before N words.
* ``in-character``: a reply with no breaking phrase over one with a breaking phrase; between two replies
  that do not break character, the one with more persona markers (catchphrase + vocabulary hits) wins.
  The counts are the eval's (each row's ``metrics``), or recounted from another card (``--persona``).

Pairs are formed among the replies to one prompt (every model, seed and setting of the results file);
empty replies and repeated texts take no part, and an undecodable reply (one holding U+FFFD, the eval's
*undecodable*) is never chosen. Rules given together apply in order: a pair that an
earlier rule orders the other way is left out (*overruled*), one it already wrote is a *duplicate*. Each
rule writes at most ``max_per_prompt`` pairs per prompt (0: no cap), chosen so that every reply is used
once before any reply is used twice (the strongest pairs first: for ``in-character``, breaking before
marker counts, larger differences first); the order is the file's, so the same input gives the same file.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from mlx_persona.eval.metrics import (
    REPLACEMENT,
    count_phrases,
    count_words,
    ends_mid_sentence,
    word_count,
)

RULES = ("complete", "longer-than N", "in-character")
DEFAULT_MAX_PER_PROMPT = 8
_LONGER = re.compile(r"longer-than(?:\s+|=|:)(\d+)")


class RuleError(ValueError):
    """A ``--prefer`` value that names no rule."""


@dataclass(frozen=True)
class Rule:
    """One preference rule; ``n`` is the word count of ``longer-than``."""

    name: str
    n: int | None = None

    @property
    def source(self) -> str:
        """The pairs file's ``source``: ``rule:complete``, ``rule:longer-than:40``, ``rule:in-character``."""
        return f"rule:{self.name}" + (f":{self.n}" if self.n is not None else "")


@dataclass(frozen=True)
class Reply:
    """One reply of a results file, with what the rules look at.

    ``breaking`` and ``markers`` are the persona counts (None when unknown); ``line`` is its line in the file.
    """

    prompt_key: str
    prompt: str
    text: str
    stop_reason: str
    line: int
    model: str = ""
    breaking: int | None = None
    markers: int | None = None


def parse_rule(text: str) -> Rule:
    """The rule a ``--prefer`` value names: ``complete``, ``in-character``, ``longer-than N`` (or ``=N``, ``:N``).

    Raises:
        RuleError: an unknown rule, or N not a whole number >= 1.
    """
    value = " ".join(str(text).split())
    if value in ("complete", "in-character"):
        return Rule(value)
    m = _LONGER.fullmatch(value)
    if m and int(m.group(1)) >= 1:
        return Rule("longer-than", int(m.group(1)))
    if value.startswith("longer-than"):
        raise RuleError(f"--prefer {text!r}: longer-than needs a word count >= 1, e.g. 'longer-than 40'")
    raise RuleError(f"--prefer {text!r}: unknown rule; the rules are {', '.join(RULES)}")


def persona_counts(text: str, persona) -> tuple[int, int]:
    """``(breaking phrases, persona markers)`` of `text` under a persona card, counted as the eval counts them."""
    breaking = sum(count_phrases(text, persona.breaking_phrases).values())
    markers = sum(count_phrases(text, persona.catchphrases).values()) + \
        sum(count_words(text, persona.vocabulary).values())
    return breaking, markers


def is_cut(reply: Reply) -> bool:
    """The eval's truncation: stopped by ``max_new_tokens``, or ending mid-sentence."""
    return reply.stop_reason == "length" or ends_mid_sentence(reply.text)


def strength(rule: Rule, x: Reply, y: Reply) -> int:
    """How strongly `rule` prefers `x` over `y`: 0 when it does not (then it may prefer `y`, or neither)."""
    if REPLACEMENT in x.text:
        return 0  # an undecodable reply (bytes that are not UTF-8) is never the one to learn from
    if rule.name == "complete":
        return int(not is_cut(x) and is_cut(y))
    if rule.name == "longer-than":
        return int(word_count(x.text) >= rule.n and y.stop_reason == "end_token" and word_count(y.text) < rule.n)
    if x.breaking is None or y.breaking is None:
        raise ValueError("in-character needs the persona counts of every reply")
    if x.breaking == 0 and y.breaking > 0:
        return 1_000_000 + max(x.markers - y.markers, 0)  # breaking character first, then the markers
    if x.breaking == 0 and y.breaking == 0 and x.markers > y.markers:
        return x.markers - y.markers
    return 0


def _select(candidates: list[tuple[int, int, int]], cap: int) -> list[tuple[int, int, int]]:
    """At most `cap` (all when 0) of `candidates` (``(-strength, chosen, rejected)``, sorted), taken in passes:
    in pass k a pair is taken only if neither of its replies was taken k times already."""
    taken, used, left, k = [], Counter(), list(candidates), 1
    while left and (not cap or len(taken) < cap):
        rest = []
        for c in left:
            if (not cap or len(taken) < cap) and used[c[1]] < k and used[c[2]] < k:
                taken.append(c)
                used[c[1]] += 1
                used[c[2]] += 1
            else:
                rest.append(c)
        left, k = rest, k + 1
    return taken


def prompt_pairs(replies: list[Reply], rules: list[Rule], max_per_prompt: int, counts: Counter) -> list:
    """The pairs of one prompt's replies: ``(chosen, rejected, rule)`` in order (see the module doc).

    `counts` gains ``overruled``, ``duplicates``, ``capped`` and one ``rule:...`` count per rule.
    """
    seen, unique = set(), []
    for r in replies:
        if r.text.strip() and r.text not in seen:
            seen.add(r.text)
            unique.append(r)
    ordered: dict[frozenset, int] = {}  # {i, j} -> the chosen index of the first rule that ordered the pair
    written, out = set(), []
    for rule in rules:
        mine = []
        for i, x in enumerate(unique):
            for j, y in enumerate(unique):
                s = strength(rule, x, y) if i != j else 0
                if s:
                    mine.append((-s, i, j))
        mine.sort()
        fresh = []
        for c in mine:
            first = ordered.get(frozenset(c[1:]))
            if first is not None and first != c[1]:
                counts["overruled"] += 1
            elif c[1:] in written:
                counts["duplicates"] += 1
            else:
                fresh.append(c)
        for c in mine:
            ordered.setdefault(frozenset(c[1:]), c[1])
        chosen = _select(fresh, max_per_prompt)
        counts["capped"] += len(fresh) - len(chosen)
        counts[rule.source] += len(chosen)
        for _, i, j in chosen:
            written.add((i, j))
            out.append((unique[i], unique[j], rule))
    return out


def rule_pairs(replies: list[Reply], rules: list[Rule], max_per_prompt: int = DEFAULT_MAX_PER_PROMPT,
               messages_for=None) -> tuple[list[dict], Counter]:
    """Preference pairs from `rules` over the replies of a results file.

    Args:
        replies: every reply, in file order.
        rules: the rules, in the order given.
        max_per_prompt: at most this many pairs per prompt and rule (0: no cap).
        messages_for: ``prompt -> list of messages`` when the replies answered more than the prompt (a
            system prompt); None writes ``{"prompt": ...}``.

    Returns:
        ``(pairs, counts)``: the pairs file's objects in order, and the counts (``prompts``, ``no_pair``
        prompts, ``empty_replies``, ``undecodable`` replies, ``overruled``, ``duplicates``, ``capped``, per rule
        source).
    """
    groups: dict[tuple[str, str], list[Reply]] = {}
    for r in replies:
        groups.setdefault((r.prompt_key, r.prompt), []).append(r)
    counts: Counter = Counter(prompts=len(groups), empty_replies=sum(not r.text.strip() for r in replies),
                              undecodable=sum(REPLACEMENT in r.text for r in replies))
    pairs = []
    for (key, prompt), group in groups.items():
        found = prompt_pairs(group, rules, max_per_prompt, counts)
        counts["no_pair"] += not found
        context = {"messages": messages_for(prompt)} if messages_for else {"prompt": prompt}
        for chosen, rejected, rule in found:
            pairs.append({**context, "chosen": chosen.text, "rejected": rejected.text, "source": rule.source,
                          "prompt_key": key})
    return pairs, counts
