"""Continual-matrix summaries on hand-made matrices with hand-computed values."""

from __future__ import annotations

import json
import math

import pytest

from conceptstream.evaluation.matrices import (
    ContinualMatrix,
    aggregate_over_seeds,
    backward_transfer,
    final_average,
    forgetting,
    plasticity,
    summarize,
)

# MMD-like (lower is better):   concept 0 gets worse 1 -> 2 -> 4, concept 1 improves 3 -> 2
ROWS = [[1.0, None, None], [2.0, 3.0, None], [4.0, 2.0, 5.0]]


def _matrix() -> ContinualMatrix:
    return ContinualMatrix.from_list(ROWS)


def test_lower_is_better_summaries():
    m = _matrix()
    assert final_average(m) == pytest.approx((4 + 2 + 5) / 3)
    assert plasticity(m) == pytest.approx((1 + 3 + 5) / 3)
    # BwT = mean(M[0][0]-M[2][0], M[1][1]-M[2][1]) = mean(1-4, 3-2) = -1 : net forgetting -> negative
    assert backward_transfer(m) == pytest.approx(-1.0)
    # F = mean(4 - min(1, 2), 2 - min(3)) = mean(3, -1) = 1
    assert forgetting(m) == pytest.approx(1.0)


def test_higher_is_better_flips_signs():
    m = _matrix()
    assert backward_transfer(m, higher_is_better=True) == pytest.approx(1.0)  # mean(4-1, 2-3)
    assert forgetting(m, higher_is_better=True) == pytest.approx(-0.5)  # mean(max(1,2)-4, 3-2)
    acc = ContinualMatrix.from_list([[0.9], [0.6, 0.8]])
    assert backward_transfer(acc, higher_is_better=True) == pytest.approx(-0.3)  # forgot -> negative
    assert forgetting(acc, higher_is_better=True) == pytest.approx(0.3)
    assert summarize(acc, higher_is_better=True) == pytest.approx(
        {"final_average": 0.7, "backward_transfer": -0.3, "forgetting": 0.3, "plasticity": 0.85})


def test_mmd_forgetting_gives_negative_bwt():
    m = ContinualMatrix(2)
    m.set(0, 0, 10.0)
    m.set(1, 0, 30.0)  # concept 0 drifted away after task 1
    m.set(1, 1, 12.0)
    assert backward_transfer(m) == pytest.approx(-20.0)
    assert forgetting(m) == pytest.approx(20.0)


def test_single_task_has_undefined_transfer():
    m = ContinualMatrix.from_list([[2.5]])
    s = m.summary()
    assert s["final_average"] == 2.5 and s["plasticity"] == 2.5
    assert math.isnan(s["backward_transfer"]) and math.isnan(s["forgetting"])


def test_round_trip_json_and_nan_as_none():
    m = _matrix()
    rows = m.to_list()
    assert rows == ROWS
    assert ContinualMatrix.from_list(json.loads(json.dumps(rows))) == m
    assert ContinualMatrix.from_list([[1.0], [2.0, 3.0], [4.0, 2.0, 5.0]]) == m  # ragged rows
    assert math.isnan(m.get(0, 2))


def test_invalid_entries_and_missing_values():
    m = ContinualMatrix(3)
    with pytest.raises(IndexError):
        m.set(0, 1, 1.0)
    with pytest.raises(IndexError):
        m.set(3, 0, 1.0)
    with pytest.raises(ValueError):
        ContinualMatrix.from_list([[1.0, 2.0]])
    m.set(0, 0, 1.0)
    assert m.completed_tasks() == 1 and not m.is_complete()
    with pytest.raises(ValueError, match=r"M\[2\]\[0\]"):
        final_average(m)
    assert final_average(m.truncated(1)) == 1.0


def test_aggregate_over_seeds():
    runs = [
        {"final_average": 1.0, "backward_transfer": None},
        {"final_average": 2.0, "backward_transfer": float("nan")},
        {"final_average": 3.0, "backward_transfer": -1.0},
    ]
    agg = aggregate_over_seeds(runs)
    assert agg["final_average"] == {"mean": 2.0, "std": pytest.approx(1.0), "n": 3}
    assert agg["backward_transfer"] == {"mean": -1.0, "std": 0.0, "n": 1}
    assert aggregate_over_seeds([{"x": None}]) == {"x": {"mean": None, "std": None, "n": 0}}
    with pytest.raises(ValueError):
        aggregate_over_seeds([{"x": "high"}])
