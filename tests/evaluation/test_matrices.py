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
    paired_differences,
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


def test_paired_differences_pair_by_seed_and_count_wins():
    ref = {"0": {"A": 10.0, "acc": 0.5}, "1": {"A": 20.0, "acc": 0.6}, "2": {"A": 30.0, "acc": None}}
    method = {"0": {"A": 8.0, "acc": 0.7}, "1": {"A": 19.0, "acc": 0.6}, "3": {"A": 1.0, "acc": 0.9}}
    out = paired_differences(method, ref, {"A": False, "acc": True})
    # seed 3 has no reference run and seed 2 none of the method's: only seeds 0 and 1 pair
    assert out["A"]["n"] == 2 and out["A"]["mean"] == pytest.approx(-1.5) and out["A"]["std"] == pytest.approx(0.7071, abs=1e-4)
    assert out["A"]["wins"] == 2  # lower is better and the method is lower on both seeds
    assert out["acc"]["n"] == 2 and out["acc"]["wins"] == 1  # a tie is not a win
    # the spread of the means overlaps, the paired difference does not: pairing is what separates them
    assert out["A"]["mean"] + out["A"]["std"] < 0
    none = paired_differences({"0": {"A": None}}, ref, {"A": False})
    assert none["A"] == {"mean": None, "std": None, "n": 0, "wins": 0}


def test_report_pairs_each_method_with_lora_on_the_same_seed():
    from conceptstream.evaluation.report import paired_table

    def run(a, bwt):
        return {"summary": {"A_MMD": a, "BwT_MMD": bwt, "plasticity_MMD": a, "DC_acc": 0.5}}

    doc = {"runs": {"ewc-dc": {"seeds": {"0": run(300.0, -1.0), "1": run(350.0, 0.0)}},
                    "lora": {"seeds": {"0": run(310.0, -20.0), "1": run(370.0, -30.0)}}}}
    lines = paired_table(doc)
    assert lines[0].startswith("| method - `lora` |") and len(lines) == 3  # lora is the reference, not a row
    assert "| `ewc-dc` | 2 | -15.0 ± 7.1 (2/2 better) | +24.5 ± 7.8 (2/2 better) |" in lines[2]
    one_seed = {"runs": {lb: {"seeds": {"0": r["seeds"]["0"]}} for lb, r in doc["runs"].items()}}
    assert paired_table(one_seed) == []  # one seed: nothing to pair beyond the summary table


def test_forgetting_uses_the_rows_that_were_scored():
    # a bench with --eval-every 3 on 4 tasks: full rows after tasks 3 and 4, only the diagonal before
    m = ContinualMatrix.from_list([[10.0], [None, 12.0], [8.0, 11.0, 9.0], [15.0, 13.0, 9.5, 7.0]])
    # concept 0's best earlier score is 8 (row 2), not its diagonal 10; concept 1's is 11
    assert forgetting(m) == pytest.approx(((15 - 8) + (13 - 11) + (9.5 - 9)) / 3)
    assert backward_transfer(m) == pytest.approx(((10 - 15) + (12 - 13) + (9 - 9.5)) / 3)
    with pytest.raises(ValueError, match=r"M\[3\]\[1\]"):  # the last row is still required
        forgetting(ContinualMatrix.from_list([[10.0], [None, 12.0], [8.0, 11.0, 9.0], [15.0, None, 9.5, 7.0]]))
