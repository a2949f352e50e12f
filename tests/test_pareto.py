"""Pareto front and per-level choice against a hand-computed set (no Ray)."""

from __future__ import annotations

import math
import random

import pytest

from sparsebk.tune.pareto import best_at_levels, densest_index, dominates, pareto_front

# (ppl, achieved sparsity); comments give the hand verdict.
POINTS = [
    (100.0, 0.10),        # 0 front
    (120.0, 0.30),        # 1 front (tie with 2)
    (120.0, 0.30),        # 2 front (identical to 1: neither dominates)
    (130.0, 0.25),        # 3 dominated by 1
    (150.0, 0.50),        # 4 front
    (150.0, 0.45),        # 5 dominated by 4 (same ppl, less sparse)
    (200.0, 0.50),        # 6 dominated by 4 (same sparsity, worse ppl)
    (90.0, 0.05),         # 7 front (best ppl)
    (math.nan, 0.90),     # 8 no evaluation: excluded
    (300.0, 0.70),        # 9 front (sparsest)
    (100.0, 0.10),        # 10 front (identical to 0)
    (310.0, 0.70),        # 11 dominated by 9
]
HAND_FRONT = [7, 0, 10, 1, 2, 4, 9]  # ordered by sparsity, then ppl, then index


def test_front_matches_hand_computed_set():
    ppl, sp = zip(*POINTS)
    assert pareto_front(ppl, sp) == HAND_FRONT


def test_front_matches_quadratic_definition_on_random_sets():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 25)
        # few distinct values so ties are frequent
        pts = [(float(rng.randint(1, 6)), rng.randint(0, 5) / 5) for _ in range(n)]
        want = [i for i in range(n)
                if not any(dominates(pts[j], pts[i]) for j in range(n) if j != i)]
        got = pareto_front([p for p, _ in pts], [s for _, s in pts])
        assert sorted(got) == want


def test_best_at_levels_and_cost_against_densest():
    ppl, sp = zip(*POINTS)
    assert densest_index(ppl, sp) == 7
    c30, c50, c80 = best_at_levels(ppl, sp, [0.3, 0.5, 0.8])
    assert (c30.index, c30.ppl, c30.sparsity) == (1, 120.0, 0.30)
    assert c30.ppl_cost == pytest.approx(30.0) and c30.ppl_cost_rel == pytest.approx(1 / 3)
    assert (c50.index, c50.ppl) == (4, 150.0) and c50.ppl_cost == pytest.approx(60.0)
    assert c80.index is None and c80.ppl_cost is None
    assert all(c.dense_index == 7 and c.dense_ppl == 90.0 for c in (c30, c50, c80))


def test_bad_inputs():
    with pytest.raises(ValueError, match="ppl has 2 values but sparsity has 1"):
        pareto_front([1.0, 2.0], [0.1])
    with pytest.raises(ValueError, match="no trial"):
        densest_index([math.nan], [0.5])
    assert pareto_front([], []) == []


def test_front_table_keeps_stopped_and_failed_trials_out():
    """A trial whose training stopped on non-finite losses (stop_reason "stopped") never
    enters the front, even when it looks best and even when no trial completed."""
    import pandas as pd

    from sparsebk.tune.report import front_table

    def table(reasons):
        return pd.DataFrame({
            "trial_id": ["nan", "ok", "err", "early"],
            "best_val_ppl": [50.0, 100.0, 40.0, 120.0],
            "achieved_sparsity": [0.9, 0.3, 0.95, 0.2],
            "status": ["TERMINATED", "TERMINATED", "ERROR", "TERMINATED"],
            "stop_reason": reasons})

    assert front_table(table(["stopped", "completed", "error", "early_stopped"]))[
        "trial_id"].tolist() == ["ok"]
    # with no completed trial the early-stopped ones are compared, the stopped one still not
    assert set(front_table(table(["stopped", "early_stopped", "error", "early_stopped"]))[
        "trial_id"]) == {"ok"}
