"""The statistics of the ratings: Wilson intervals, Bradley-Terry strengths, Cohen's kappa.

* :func:`wilson` -- the 95% Wilson score interval of `wins` out of `n`: centre
  ``(p + z²/2n) / (1 + z²/n)``, half-width ``z·sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n)``, ``z = 1.95996``.
* :func:`bradley_terry` -- strengths ``s_i`` with ``P(i beats j) = s_i / (s_i + s_j)``, the maximum-likelihood
  fit of the decisive results (ties and both-bad left out) by the MM algorithm of Hunter (2004):
  ``s_i <- W_i / sum_j n_ij / (s_i + s_j)``, then scaled to a geometric mean of 1, until no strength
  moves by more than 1e-12 (relative). The fit exists only when every model has beaten, directly or
  through others, every other one (the win graph is strongly connected); otherwise none is given.
* :func:`cohen_kappa` -- ``(p_o - p_e) / (1 - p_e)`` over the verdict categories.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959963984540054


def wilson(wins: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion (None when `n` is 0)."""
    if n <= 0:
        return None
    p = wins / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _connected(models: Sequence[str], wins: dict[tuple[str, str], int]) -> bool:
    """Whether the graph "i beat j at least once" is strongly connected."""
    def reach(start: str, forward: bool) -> set[str]:
        seen, todo = {start}, [start]
        while todo:
            i = todo.pop()
            for j in models:
                edge = wins.get((i, j), 0) if forward else wins.get((j, i), 0)
                if j not in seen and edge > 0:
                    seen.add(j)
                    todo.append(j)
        return seen

    return len(reach(models[0], True)) == len(models) == len(reach(models[0], False))


def bradley_terry(models: Sequence[str], wins: dict[tuple[str, str], int], *, max_iter: int = 100_000,
                  tol: float = 1e-12) -> dict[str, float] | None:
    """Bradley-Terry strengths (geometric mean 1) from ``wins[(i, j)]`` = times i beat j; None when the
    maximum-likelihood fit does not exist (module docstring)."""
    models = list(models)
    if len(models) < 2 or not _connected(models, wins):
        return None
    s = {m: 1.0 for m in models}
    for _ in range(max_iter):
        new = {}
        for i in models:
            w = sum(wins.get((i, j), 0) for j in models if j != i)
            d = sum((wins.get((i, j), 0) + wins.get((j, i), 0)) / (s[i] + s[j]) for j in models if j != i)
            new[i] = w / d
        g = math.exp(sum(math.log(v) for v in new.values()) / len(new))
        new = {m: v / g for m, v in new.items()}
        moved = max(abs(new[m] - s[m]) / s[m] for m in models)
        s = new
        if moved < tol:
            break
    return s


def cohen_kappa(first: Sequence[str], second: Sequence[str]) -> float | None:
    """Cohen's kappa of two raters' labels of the same items (None when undefined: no items, or both
    raters always gave one and the same label)."""
    n = len(first)
    if n == 0 or n != len(second):
        return None
    observed = sum(a == b for a, b in zip(first, second)) / n
    labels = set(first) | set(second)
    expected = sum((list(first).count(k) / n) * (list(second).count(k) / n) for k in labels)
    if expected >= 1:
        return None
    return (observed - expected) / (1 - expected)
