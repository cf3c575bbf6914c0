"""The report's tables over seeds: mean ± the 95% t-interval half-width, and paired differences with
their interval and a "separated" verdict that holds only when the interval excludes 0."""

from __future__ import annotations

import math

from conceptstream.evaluation.matrices import aggregate_over_seeds
from conceptstream.evaluation.report import paired_note, paired_table, summary_table, write_report


def summary(a: float, bwt: float, acc: float = 0.5) -> dict:
    return {"A_MMD": a, "BwT_MMD": bwt, "plasticity_MMD": a, "DC_acc": acc}


def results(runs: dict[str, list[dict]]) -> dict:
    """A results document with just what the tables read: per-seed summaries and their aggregates."""
    return {"runs": {lb: {"seeds": {str(k): {"summary": s} for k, s in enumerate(seeds)}} for lb, seeds in runs.items()},
            "summary": {lb: aggregate_over_seeds(seeds) for lb, seeds in runs.items()}}


# five seeds: ewc-dc's A_MMD is 4..6 below lora's on every seed although both spread by 40 over seeds
LORA = [summary(300.0 + 10 * k, -20.0 - k) for k in range(5)]
EWC = [summary(300.0 + 10 * k + d, -20.0 - k + b) for k, (d, b) in enumerate(zip([-4, -5, -6, -4.5, -5.5],
                                                                                   [3, -3, 2, -2, 1]))]


def test_summary_table_shows_mean_and_the_t_interval_half_width():
    doc = results({"lora": LORA, "ewc-dc": EWC})
    row = next(line for line in summary_table(doc) if line.startswith("| `lora` |"))
    sd = math.sqrt(sum((10 * k - 20) ** 2 for k in range(5)) / 4)  # 15.811
    half = 2.776445 * sd / math.sqrt(5)  # 19.632
    assert row.startswith(f"| `lora` | 5 | {320.0:.3f} ± {half:.3f} |")
    assert f"± {sd:.3f}" not in row  # the std itself is not what is shown


def test_summary_table_reads_older_results_without_ci95_and_one_seed():
    doc = results({"lora": LORA})
    for agg in doc["summary"]["lora"].values():
        for key in ("ci95", "ci_low", "ci_high"):
            agg.pop(key)
    row = summary_table(doc)[2]
    assert "320.000 ± 19.632" in row  # computed from the stored std and n
    one = results({"lora": LORA[:1]})
    assert summary_table(one)[2].startswith("| `lora` | 1 | 300.000 | ")  # one seed: no interval


def test_paired_table_separates_a_difference_that_holds_on_every_seed():
    doc = results({"lora": LORA, "ewc-dc": EWC})
    header, _, row = paired_table(doc)
    assert header.startswith("| method - `lora` | seeds | Δ A_MMD ↓ [95% CI] | Δ BwT_MMD ↑ [95% CI] |")
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:2] == ["`ewc-dc`", "5"]
    # A_MMD: -5.0 ± 2.776 * 0.79 / sqrt(5) = -5.0 ± 0.98
    assert cells[2] == "-5.0 [-6.0, -4.0] **separated** (5/5 better)"
    # BwT_MMD: +0.2 with differences of both signs: the interval spans 0
    assert cells[3].startswith("+0.2 [") and cells[3].endswith("] not separated (3/5 better)")
    # DC_acc identical on every seed: a zero difference is never separated
    assert cells[5] == "+0.000 [+0.000, +0.000] not separated (0/5 better)"


def test_paired_note_says_what_separated_means_with_the_seeds():
    note = paired_note(results({"lora": LORA, "ewc-dc": EWC}))
    assert "separated = the 95% t-interval of the per-seed paired difference excludes 0; with 5 seeds" in note
    assert "2.776" in note
    mixed = results({"lora": LORA, "ewc-dc": EWC, "c-lora": EWC[:3]})
    assert "with n seeds" in paired_note(mixed)


def test_paired_table_with_one_seed_shows_no_interval():
    doc = results({"lora": LORA[:2], "ewc-dc": [EWC[0]]})  # ewc-dc paired on one seed only
    doc["runs"]["c-lora"] = doc["runs"]["lora"]  # and another method on both, so the table is written
    row = next(line for line in paired_table(doc) if line.startswith("| `ewc-dc` |"))
    assert "| -4.0 (1/1 better) |" in row and "separated" not in row


def _report_doc() -> dict:
    doc = results({"lora": LORA, "ewc-dc": EWC})
    for runs in doc["runs"].values():
        for k, run in runs["seeds"].items():
            run.update(tasks=[{"learn_seconds": 1.0, "eval_seconds": 1.0}], run_dir=f"runs/x/seed{k}")
    doc.update(complete=True, t2i={"available": False, "reason": "no CLIP model"}, failed=[], versions={},
               settings={"sequence": "tabletop-1",
                         "concepts": [{"name": "c0", "token": "<c0>", "noun": "mug", "train_images": 1, "eval_images": 1}],
                         "model": {"reference": "tiny", "fingerprint": "f"},
                         "adapter": "lora", "steps": 2, "seeds": [0, 1, 2, 3, 4],
                         "generation": {"images_per_concept": 2, "images_per_prompt": 2, "contexts": [],
                                        "sampler": "ddim", "steps": 2, "guidance": 3.0},
                         "features": {"name": "f", "dim": 8}, "dc_eval": {"candidates": 2, "eval_timesteps": 2},
                         "data": "data"})
    return doc


def test_write_report_explains_the_intervals(tmp_path):
    text = write_report(_report_doc(), tmp_path).read_text()
    assert "## Summary (mean ± 95% t-interval half-width over seeds)" in text
    lines = text.splitlines()
    note = next(i for i, line in enumerate(lines) if line.startswith("How to read: separated = the 95% t-interval"))
    table = next(i for i, line in enumerate(lines) if line.startswith("| method - `lora` |"))
    assert note < table  # read before the table
    assert "| `ewc-dc` | 5 | -5.0 [-6.0, -4.0] **separated** (5/5 better) |" in text


def test_the_report_also_pairs_every_method_with_the_papers_method(tmp_path):
    """A second paired table answers "ewc-dc against each baseline" (e.g. c-lora), not only against lora."""
    from conceptstream.evaluation.report import paired_references

    doc = _report_doc()
    doc["runs"]["c-lora"] = {**doc["runs"]["lora"]}
    doc["summary"]["c-lora"] = doc["summary"]["lora"]
    for label, run in doc["runs"].items():
        run["method"] = label
    assert paired_references(doc) == ["lora", "ewc-dc"]
    text = write_report(doc, tmp_path).read_text()
    assert "### Paired with `ewc-dc` (same seed)" in text
    # lora and c-lora (lora's numbers) are 5.0 worse than ewc-dc on A_MMD on every seed
    assert "| `c-lora` | 5 | +5.0 [+4.0, +6.0] **separated** (0/5 better) |" in text
    assert "| `lora` | 5 | +5.0 [+4.0, +6.0] **separated** (0/5 better) |" in text
    only = {"runs": {"ewc-dc": {"method": "ewc-dc"}}}
    assert paired_references(only) == ["ewc-dc"]  # the first label is the reference: no second table


def test_the_printed_summary_shows_the_interval_and_the_own_class_dc_accuracy():
    from conceptstream.evaluation.bench.results import format_summary

    text = format_summary(results({"lora": LORA, "one-seed": LORA[:1]}))
    header, lora, one, note = text.splitlines()
    assert header.split()[-2:] == ["DC_acc", "DC_acc_own_class"]
    assert "320.000 ± 19.632" in lora and "± 15.811" not in lora  # the interval, not the std
    assert "300.000" in one and "±" not in one  # one seed: no interval
    assert note.startswith("± : half-width of the 95% t-interval") and note.endswith("over 5 seeds")


def test_publish_snippet_names_split_model_seeds_command_and_has_both_paired_tables():
    from pathlib import Path

    from conftest import benchmark_script

    publish = benchmark_script("publish")
    doc = _report_doc()
    doc["settings"]["split"] = "test"
    doc["runs"]["c-lora"] = {**doc["runs"]["lora"]}
    doc["summary"]["c-lora"] = doc["summary"]["lora"]
    for label, run in doc["runs"].items():
        run["method"] = label
    text = publish.snippet(doc, Path("benchmarks/results/x"), "STAGES=t6-v2 bash benchmarks/run_tabletop.sh")
    first = text.splitlines()[0]
    assert first.startswith("Split **test**, `tabletop-1` (1 concepts), base model `tiny` (fingerprint `f`)")
    assert "seeds [0, 1, 2, 3, 4]" in first and "`STAGES=t6-v2 bash benchmarks/run_tabletop.sh`" in first
    assert "benchmarks/results/x/report.md" in first and "incomplete" not in first
    assert "| method - `lora` |" in text and "| method - `ewc-dc` |" in text
    # methods with their own budgets (Textual Inversion's 1000 steps): each run's, as the report says them
    doc["settings"].update(steps=None, steps_per_task={"lora": 200, "textual-inversion": 1000})
    first = publish.snippet(doc, Path("benchmarks/results/x"), "x").splitlines()[0]
    assert "`lora` 200, `textual-inversion` 1000 steps per task" in first


def _diag_run(diagonal: list[float], final: list[float] | None = None) -> dict:
    """A run whose MMD matrix has ``diagonal`` (each concept right after it was learned)."""
    n = len(diagonal)
    rows = [[diagonal[i] if i == r else (final or diagonal)[i] if i < r else None for i in range(n)]
            for r in range(n)]
    return {"matrices": {"MMD": rows}}


def test_transfer_table_sets_each_concept_against_single_task_on_the_same_seed(tmp_path):
    from conceptstream.evaluation.report import transfer_lines, transfer_rows

    single = [[300.0, 250.0, 260.0], [320.0, 240.0, 270.0], [310.0, 255.0, 250.0]]
    later_gain = [[10.0, 20.0], [12.0, 18.0], [14.0, 16.0]]  # lora draws tasks 2-3 better by these, every seed
    doc = {"runs": {
        "single-task": {"bound": "single-task", "seeds": {str(k): _diag_run(d) for k, d in enumerate(single)}},
        "joint": {"bound": "joint", "seeds": {str(k): _diag_run(d) for k, d in enumerate(single)}},
        "lora": {"bound": None, "seeds": {str(k): _diag_run([d[0], d[1] - g[0], d[2] - g[1]])
                                          for k, (d, g) in enumerate(zip(single, later_gain))}},
        # seed 0: 5 worse on task 1, equal later; seed 1: equal on task 1, 10 worse later; seed 7: not paired
        "c-lora": {"bound": None, "seeds": {"0": _diag_run([305.0, 250.0, 260.0]), "1": _diag_run([320.0, 250.0, 280.0]),
                                            "7": _diag_run([1.0, 1.0, 1.0])}},
    }}
    rows = transfer_rows(doc)
    assert set(rows) == {"lora", "c-lora"}  # bounds are not rows
    lora = rows["lora"]
    assert lora["first"]["mean"] == 0.0 and lora["first"]["n"] == 3 and not lora["first"]["separated"]
    assert lora["later"]["mean"] == 15.0 and lora["later"]["separated"] and lora["later"]["wins"] == 3
    assert lora["per_task"] == {0: 0.0, 1: 12.0, 2: 18.0}  # mean d per task over the seeds
    clora = rows["c-lora"]
    assert clora["first"]["n"] == 2 and clora["first"]["mean"] == -2.5  # seed 7 has no single-task run
    assert clora["later"]["mean"] == (0.0 + (-10.0)) / 2
    lines = transfer_lines(doc)
    assert lines[0] == "### Each concept right after it was learned, against `single-task` (same seed)"
    assert "| `lora` | 3 | +0.0 [+0.0, +0.0] not separated (0/3 better) | +15.0 [" in "\n".join(lines)
    assert any(line.startswith("| method | seeds | d task 1 [95% CI] | mean d tasks 2..N [95% CI] | d task 1 |")
               for line in lines)
    assert transfer_lines({"runs": {"lora": doc["runs"]["lora"]}}) == []  # no single-task row: no section


def test_adapter_change_table_is_the_mean_over_seeds_per_task():
    from conceptstream.evaluation.report import adapter_change_lines

    tasks = lambda *c: [{"adapter_change": x} for x in c]  # noqa: E731
    doc = {"runs": {"lora": {"seeds": {"0": {"tasks": tasks(None, 0.5, 0.25)}, "1": {"tasks": tasks(None, 0.3, 0.35)}}},
                    "ewc-dc": {"seeds": {"0": {"tasks": tasks(None, 0.0, 0.0)}}},
                    "textual-inversion": {"seeds": {"0": {"tasks": tasks(None, None, None)}}}}}
    lines = adapter_change_lines(doc)
    assert lines[0] == "### How far each task moved the shared adapter"
    assert "| `lora` | 0.3500 | 0.4000 | 0.3000 |" in lines  # tasks 2, 3: (0.5+0.3)/2, (0.25+0.35)/2
    assert "| `ewc-dc` | 0.0000 | 0.0000 | 0.0000 |" in lines
    assert not any("textual-inversion" in line for line in lines)  # no adapter: no row
    assert adapter_change_lines({"runs": {"x": {"seeds": {"0": {"tasks": tasks(None)}}}}}) == []
