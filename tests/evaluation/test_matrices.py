"""Continual-matrix summaries on hand-made matrices with hand-computed values."""

from __future__ import annotations

import json
import math

import pytest

from conceptstream.evaluation.matrices import (
    ContinualMatrix,
    aggregate_over_seeds,
    backward_transfer,
    ci_half_width,
    final_average,
    forgetting,
    paired_differences,
    plasticity,
    regularized_beta,
    summarize,
    t_cdf,
    t_quantile,
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
    # mean 2, sd 1, n 3: half-width t(0.975, 2) * 1 / sqrt(3) = 4.3027 / 1.7321 = 2.4841
    assert agg["final_average"] == {"mean": 2.0, "std": pytest.approx(1.0), "n": 3, "ci95": pytest.approx(2.4841, abs=1e-4),
                                    "ci_low": pytest.approx(-0.4841, abs=1e-4), "ci_high": pytest.approx(4.4841, abs=1e-4)}
    # one value: no spread, so no interval
    assert agg["backward_transfer"] == {"mean": -1.0, "std": 0.0, "n": 1, "ci95": None, "ci_low": None, "ci_high": None}
    assert aggregate_over_seeds([{"x": None}]) == {"x": {"mean": None, "std": None, "n": 0, "ci95": None, "ci_low": None,
                                                         "ci_high": None}}
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
    assert none["A"] == {"mean": None, "std": None, "n": 0, "ci95": None, "ci_low": None, "ci_high": None, "wins": 0,
                         "separated": False, "better": None}


def test_report_pairs_each_method_with_lora_on_the_same_seed():
    from conceptstream.evaluation.report import paired_table

    def run(a, bwt):
        return {"summary": {"A_MMD": a, "BwT_MMD": bwt, "plasticity_MMD": a, "DC_acc": 0.5}}

    doc = {"runs": {"ewc-dc": {"seeds": {"0": run(300.0, -1.0), "1": run(350.0, 0.0)}},
                    "lora": {"seeds": {"0": run(310.0, -20.0), "1": run(370.0, -30.0)}}}}
    lines = paired_table(doc)
    assert lines[0].startswith("| method - `lora` |") and len(lines) == 3  # lora is the reference, not a row
    assert "Δ A_MMD ↓ [95% CI]" in lines[0]
    # two seeds: t(0.975, 1) = 12.706, so -15 ± 12.706 * 7.07 / sqrt(2) = -15 ± 63.5: not separated on two seeds
    assert lines[2].startswith("| `ewc-dc` | 2 | -15.0 [-78.5, +48.5] not separated (2/2 better) | "
                               "+24.5 [-45.4, +94.4] not separated (2/2 better) |")
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


# ------------------------------------------------------------------------------ statistics over seeds


@pytest.mark.parametrize(("df", "expected"), [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262),
                                              (29, 2.045), (30, 2.042), (120, 1.980)])
def test_t_quantile_matches_the_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=5e-4)


def test_t_quantile_tails_symmetry_and_normal_limit():
    assert t_quantile(0.995, 10) == pytest.approx(3.169, abs=5e-4)
    assert t_quantile(0.9, 1) == pytest.approx(3.078, abs=5e-4)  # Cauchy: tan(0.4 pi)
    assert t_quantile(0.9, 1) == pytest.approx(math.tan(0.4 * math.pi), rel=1e-9)
    assert t_quantile(0.025, 4) == pytest.approx(-t_quantile(0.975, 4), rel=1e-12)
    assert t_quantile(0.5, 7) == 0.0
    assert t_quantile(0.975, 1e7) == pytest.approx(1.959964, abs=1e-5)
    for df in (1, 3, 9):
        assert t_cdf(t_quantile(0.975, df), df) == pytest.approx(0.975, abs=1e-10)
    # df 2 has a closed form: t = (2p - 1) / sqrt(2 p (1 - p))
    assert t_quantile(0.975, 2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), rel=1e-9)
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError):
        t_quantile(0.975, 0)


def test_regularized_beta_known_values():
    assert regularized_beta(1.0, 1.0, 0.3) == pytest.approx(0.3)  # uniform
    assert regularized_beta(2.0, 3.0, 0.4) == pytest.approx(0.5248)  # 1 - sum_{j<2} C(4,j) .4^j .6^(4-j)
    assert regularized_beta(0.5, 0.5, 0.5) == pytest.approx(0.5)
    assert regularized_beta(3.0, 2.0, 0.0) == 0.0 and regularized_beta(3.0, 2.0, 1.0) == 1.0


def test_ci_half_width():
    assert ci_half_width(2.0, 5) == pytest.approx(2.776445 * 2.0 / math.sqrt(5), rel=1e-6)
    assert ci_half_width(2.0, 1) is None and ci_half_width(float("nan"), 4) is None


def test_paired_differences_separate_only_when_the_interval_excludes_zero():
    ref = {str(k): {"A": 100.0 + 10 * k, "acc": 0.5} for k in range(5)}
    # A: lower on every seed by 4..6 (sd 0.79): the interval is about -5 ± 0.98, it excludes 0
    # acc: +0.1, -0.1, +0.1, -0.1, +0.1 (mean +0.02, sd 0.11): the interval spans 0
    steps = [-4.0, -5.0, -6.0, -4.5, -5.5]
    method = {str(k): {"A": 100.0 + 10 * k + steps[k], "acc": 0.5 + (0.1 if k % 2 == 0 else -0.1)} for k in range(5)}
    out = paired_differences(method, ref, {"A": False, "acc": True})
    a = out["A"]
    assert a["n"] == 5 and a["mean"] == pytest.approx(-5.0)
    half = 2.776445 * a["std"] / math.sqrt(5)
    assert a["ci95"] == pytest.approx(half, rel=1e-6)
    assert (a["ci_low"], a["ci_high"]) == (pytest.approx(-5.0 - half), pytest.approx(-5.0 + half))
    assert a["separated"] is True and a["better"] == "method" and a["wins"] == 5
    acc = out["acc"]
    assert acc["ci_low"] < 0 < acc["ci_high"] and acc["separated"] is False and acc["better"] is None
    # the same differences with the roles swapped: still separated, the reference is now the better one
    swapped = paired_differences(ref, method, {"A": False, "acc": True})["A"]
    assert swapped["separated"] is True and swapped["better"] == "reference" and swapped["wins"] == 0
    # higher is better flips which side wins
    assert paired_differences(method, ref, {"A": True})["A"]["better"] == "reference"


def test_paired_differences_need_two_seeds_to_separate():
    one = paired_differences({"0": {"A": 1.0}}, {"0": {"A": 50.0}}, {"A": False})["A"]
    assert one["n"] == 1 and one["wins"] == 1 and one["ci_low"] is None and one["separated"] is False
    # identical nonzero differences: a zero-width interval away from 0 is separated
    same = paired_differences({"0": {"A": 1.0}, "1": {"A": 2.0}}, {"0": {"A": 3.0}, "1": {"A": 4.0}}, {"A": False})["A"]
    assert same["ci_low"] == same["ci_high"] == -2.0 and same["separated"] is True and same["better"] == "method"
    # no difference at all: not separated
    tie = paired_differences({"0": {"A": 3.0}, "1": {"A": 4.0}}, {"0": {"A": 3.0}, "1": {"A": 4.0}}, {"A": False})["A"]
    assert tie["ci_low"] == tie["ci_high"] == 0.0 and tie["separated"] is False and tie["better"] is None
