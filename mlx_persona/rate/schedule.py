"""Which pair to rate next: among the pairs the rater has not judged, the one whose two models have been
compared least, then whose prompt has been judged least, then an order fixed by the seed; and which side
each reply is shown on.

Both choices are hashes of the seed and the pair (SHA-256), so a restarted ``rate`` with the same
database and seed shows the same next pair, and the sides do not depend on when a pair comes up.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable

from mlx_persona.rate.store import Pair


def _hash(seed: int, *parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\0".join((str(seed), *parts)).encode()).digest()[:8], "big")


def left_is(seed: int, pair: Pair, purpose: str = "page") -> str:
    """``'a'`` or ``'b'``: which reply goes on the left (first) for `purpose` (the page, a judge)."""
    return "ab"[_hash(seed, purpose, *pair.key) & 1]


def next_pair(pairs: list[Pair], judged: Iterable[tuple[str, str, str]], seed: int) -> Pair | None:
    """The next pair to judge (module docstring), or None when every pair is judged."""
    done = set(judged)
    by_models = Counter((m_a, m_b) for _, m_a, m_b in done)
    by_prompt = Counter(p for p, _, _ in done)
    todo = [p for p in pairs if p.key not in done]
    if not todo:
        return None
    return min(todo, key=lambda p: (by_models[(p.model_a, p.model_b)], by_prompt[p.prompt_key],
                                    _hash(seed, "order", *p.key)))


def progress(pairs: list[Pair], judged: Iterable[tuple[str, str, str]]) -> tuple[int, int]:
    """(pairs judged, pairs in all)."""
    keys = {p.key for p in pairs}
    return len(keys & set(judged)), len(keys)
