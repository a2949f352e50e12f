"""The accuracy/sparsity Pareto front of a sweep, and the per-sparsity-level choice.

Objectives: minimise validation perplexity, maximise achieved sparsity. A trial dominates
another when it is at least as good in both and strictly better in one; identical points do
not dominate each other, so ties all stay on the front. Trials without a finite perplexity or
sparsity (errored before their first evaluation) take no part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


def _finite(x) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """True when point a = (ppl, sparsity) Pareto-dominates point b."""
    ppl_a, sp_a = a
    ppl_b, sp_b = b
    return ppl_a <= ppl_b and sp_a >= sp_b and (ppl_a < ppl_b or sp_a > sp_b)


def pareto_front(ppl: Sequence[float], sparsity: Sequence[float]) -> list[int]:
    """Indices of the non-dominated points, ordered by sparsity then perplexity (ascending).

    O(n log n): sort by sparsity descending (ppl ascending within equal sparsity); walking
    that order, a point is on the front iff its ppl is below every ppl seen at strictly
    higher sparsity and no point of its own sparsity has lower ppl.
    """
    if len(ppl) != len(sparsity):
        raise ValueError(f"ppl has {len(ppl)} values but sparsity has {len(sparsity)}")
    pts = [(float(p), float(s), i) for i, (p, s) in enumerate(zip(ppl, sparsity))
           if _finite(p) and _finite(s)]
    pts.sort(key=lambda t: (-t[1], t[0]))
    front: list[int] = []
    best_higher = math.inf  # lowest ppl among points of strictly higher sparsity
    k = 0
    while k < len(pts):
        s = pts[k][1]
        group = []
        while k < len(pts) and pts[k][1] == s:
            group.append(pts[k])
            k += 1
        lowest = group[0][0]  # group is sorted by ppl
        if lowest < best_higher:
            front.extend(i for p, _, i in group if p == lowest)
        best_higher = min(best_higher, lowest)
    front.sort(key=lambda i: (float(sparsity[i]), float(ppl[i]), i))
    return front


@dataclass(frozen=True)
class LevelChoice:
    """The best trial reaching a sparsity level, and what it costs against the densest trial."""

    level: float
    index: int | None          # row of the chosen trial; None when no trial reached the level
    ppl: float | None
    sparsity: float | None
    dense_index: int
    dense_ppl: float
    dense_sparsity: float

    @property
    def ppl_cost(self) -> float | None:
        return None if self.ppl is None else self.ppl - self.dense_ppl

    @property
    def ppl_cost_rel(self) -> float | None:
        return None if self.ppl is None else self.ppl / self.dense_ppl - 1.0


def densest_index(ppl: Sequence[float], sparsity: Sequence[float]) -> int:
    """The trial with the lowest achieved sparsity (lowest ppl among equals): the baseline."""
    valid = [i for i in range(len(ppl)) if _finite(ppl[i]) and _finite(sparsity[i])]
    if not valid:
        raise ValueError("no trial has both a finite perplexity and a finite sparsity")
    return min(valid, key=lambda i: (float(sparsity[i]), float(ppl[i]), i))


def best_at_levels(ppl: Sequence[float], sparsity: Sequence[float],
                   levels: Sequence[float], *, tolerance: float = 0.0) -> list[LevelChoice]:
    """For each level, the lowest-ppl trial whose achieved sparsity is >= level - tolerance."""
    dense = densest_index(ppl, sparsity)
    out = []
    for level in levels:
        ok = [i for i in range(len(ppl)) if _finite(ppl[i]) and _finite(sparsity[i])
              and float(sparsity[i]) >= float(level) - tolerance]
        if ok:
            i = min(ok, key=lambda j: (float(ppl[j]), -float(sparsity[j]), j))
            out.append(LevelChoice(float(level), i, float(ppl[i]), float(sparsity[i]),
                                   dense, float(ppl[dense]), float(sparsity[dense])))
        else:
            out.append(LevelChoice(float(level), None, None, None,
                                   dense, float(ppl[dense]), float(sparsity[dense])))
    return out
