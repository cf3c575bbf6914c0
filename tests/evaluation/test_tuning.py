"""benchmarks/tuning.py: the equal tuning grids, on the val split only, and how a winner is chosen."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import BENCHMARKS, benchmark_script


@pytest.fixture(scope="module")
def tuning():
    return benchmark_script("tuning")


def _doc(points: dict[tuple[float, float], list[float]], split: str = "val") -> dict:
    """A results.json of an ewc-dc tuning bench: per (lr, ewc_lambda) the val A_MMD of each seed."""
    runs = {}
    for (lr, lam), values in points.items():
        seeds = {str(k): {"config": {"settings": {"lr": lr, "ewc_lambda": lam}},
                          "summary": {"A_MMD": v, "plasticity_MMD": v - 1, "BwT_MMD": -1.0, "DC_acc": 0.5}}
                 for k, v in enumerate(values)}
        runs[f"ewc-dc[lr={lr},ewc_lambda={lam}]"] = {"method": "ewc-dc", "seeds": seeds}
    return {"settings": {"split": split, "steps": 200}, "runs": runs}


def test_every_method_gets_three_learning_rates_by_three_knob_values(tuning):
    from conceptstream.methods.registry import method_defaults, method_names

    assert set(tuning.GRIDS) == set(method_names())
    for method, grid in tuning.GRIDS.items():
        assert len(grid.lr_values) == 3 and len(grid.knob_values) == 3, method
        known = method_defaults(method, "lora")
        assert grid.lr_key in known and (grid.knob in known or grid.knob == "steps"), method
    jobs = tuning.bench_jobs(Path("root"), ["ewc-dc", "textual-inversion"])
    assert [(out.name, opts.get("steps")) for out, opts in jobs] == [
        ("ewc-dc", None), ("textual-inversion-steps200", 200), ("textual-inversion-steps500", 500),
        ("textual-inversion-steps1000", 1000)]
    assert all(opts["split"] == "val" and opts["seeds"] == 2 for _, opts in jobs)
    # a grid without the token rate runs at the one it was started at, whatever the token round later made
    # the method's default (a finished grid point is then still the same run, not refused as changed)
    assert jobs[0][1]["hparams"] == {"token_lr": tuning.GRID_TOKEN_LR}
    assert all("hparams" not in opts for _, opts in jobs[1:])


def test_the_winner_has_the_lowest_mean_val_a_mmd_and_ties_go_to_the_smaller_rate(tuning):
    doc = _doc({(1e-3, 100.0): [300.0, 310.0], (3e-3, 100.0): [290.0, 330.0], (3e-4, 10.0): [305.0, 306.0],
                (1e-3, 10.0): [305.0, 306.0]})
    points = tuning.grid_points(doc, "ewc-dc")
    assert tuning.winner(points, "ewc-dc")["lr"] == 1e-3 and tuning.winner(points, "ewc-dc")["ewc_lambda"] == 100.0
    tie = tuning.grid_points(_doc({(1e-3, 10.0): [305.0, 306.0], (3e-4, 10.0): [306.0, 305.0]}), "ewc-dc")
    assert tuning.winner(tie, "ewc-dc")["lr"] == 3e-4
    doc_table, md = tuning.table({"ewc-dc": points})
    assert doc_table["methods"]["ewc-dc"]["winner"] == {"lr": 1e-3, "ewc_lambda": 100.0, "A_MMD": 305.0}
    assert not doc_table["methods"]["ewc-dc"]["complete"]  # 4 of the 9 grid points
    nine = {(lr, lam): [300.0, 301.0] for lr in (3e-4, 1e-3, 3e-3) for lam in (10.0, 100.0, 1000.0)}
    assert tuning.table({"ewc-dc": tuning.grid_points(_doc(nine), "ewc-dc")})[0]["methods"]["ewc-dc"]["complete"]
    nine[(3e-3, 1000.0)] = [300.0]  # every point ran, one of them on seed 0 only: not complete
    doc_table, _ = tuning.table({"ewc-dc": tuning.grid_points(_doc(nine), "ewc-dc")})
    assert not doc_table["methods"]["ewc-dc"]["complete"] and "final" not in doc_table["methods"]["ewc-dc"]
    assert md.count("**") == 2 * 8  # one bold row of 8 cells


def test_a_bench_scored_on_the_test_split_is_refused(tuning, tmp_path):
    with pytest.raises(ValueError, match="val split"):
        tuning.grid_points(_doc({(1e-3, 100.0): [300.0]}, split="test"), "ewc-dc")
    (tmp_path / "ewc-dc").mkdir()
    (tmp_path / "ewc-dc" / "results.json").write_text(json.dumps(_doc({(1e-3, 100.0): [300.0, 302.0]})))
    assert tuning.main(["table", "--root", str(tmp_path), "--methods", "ewc-dc", "--out", str(tmp_path / "t")]) == 0
    assert json.loads((tmp_path / "t" / "tuning.json").read_text())["methods"]["ewc-dc"]["winner"]["A_MMD"] == 301.0


def test_a_method_without_benches_keeps_its_points_from_the_committed_table(tuning, tmp_path):
    """A later session (work dir lost) tabulates its new method; an earlier method stays from tuning.json."""
    root, out = tmp_path / "root", tmp_path / "t"
    (root / "ewc-dc").mkdir(parents=True)
    (root / "ewc-dc" / "results.json").write_text(json.dumps(_doc({(1e-3, 100.0): [300.0, 302.0]})))
    assert tuning.main(["table", "--root", str(root), "--out", str(out)]) == 0
    (root / "ewc-dc" / "results.json").unlink()
    lora = {"settings": {"split": "val", "steps": 200}, "runs": {"lora[lr=0.001,token_lr=0.005]": {
        "method": "lora", "seeds": {"0": {"config": {"settings": {"lr": 1e-3, "token_lr": 5e-3}},
                                          "summary": {"A_MMD": 280.0}}}}}}
    (root / "lora").mkdir()
    (root / "lora" / "results.json").write_text(json.dumps(lora))
    assert tuning.main(["table", "--root", str(root), "--out", str(out)]) == 0
    methods = json.loads((out / "tuning.json").read_text())["methods"]
    assert list(methods) == ["lora", "ewc-dc"]  # the grids' order
    assert methods["ewc-dc"]["winner"]["A_MMD"] == 301.0 and methods["lora"]["winner"]["A_MMD"] == 280.0
    head = (out / "tuning.md").read_text().split("\n\n")[0]
    assert "Grids not yet complete: lora, ewc-dc." in head and "Not started: lora-ewc, c-lora, dsc," in head


def test_shards_split_the_tuning_benches_between_processes(tuning, tmp_path, monkeypatch):
    """`run --shard K/N`: the N shards run every tuning bench exactly once between them."""
    import conceptstream.evaluation.bench as bench

    ran: list[list[str]] = []
    monkeypatch.setattr(bench, "run_bench", lambda out, **kw: ran[-1].append(Path(out).name))
    for k in (1, 2):
        ran.append([])
        assert tuning.main(["run", "--root", str(tmp_path), "--shard", f"{k}/2",
                            "--winners", str(tmp_path / "no-table.json")]) == 0
    every = [out.name for out, _ in tuning.bench_jobs(tmp_path, list(tuning.GRIDS))]
    assert sorted(ran[0] + ran[1]) == sorted(every) and not set(ran[0]) & set(ran[1])
    assert ran[0] and ran[1]
    # a later session (its work dir lost) skips the grids complete in the committed table, unless named
    (tmp_path / "t.json").write_text(json.dumps({"methods": {"ewc-dc": {"complete": True}, "dsc": {"complete": False}}}))
    ran.append([])
    assert tuning.main(["run", "--root", str(tmp_path), "--winners", str(tmp_path / "t.json")]) == 0
    assert "ewc-dc" not in ran[-1] and "dsc" in ran[-1] and len(ran[-1]) == len(every) - 1
    ran.append([])
    assert tuning.main(["run", "--root", str(tmp_path), "--winners", str(tmp_path / "t.json"),
                        "--methods", "ewc-dc"]) == 0
    assert ran[-1] == ["ewc-dc"]
    with pytest.raises(SystemExit):
        tuning.main(["run", "--root", str(tmp_path), "--shard", "3/2"])


def test_the_table_names_the_base_model_and_the_command(tuning):
    doc = _doc({(1e-3, 100.0): [300.0, 302.0]})
    doc["settings"]["model"] = {"reference": "tiny", "fingerprint": "abc"}
    table_doc, _ = tuning.table({"ewc-dc": tuning.grid_points(doc, "ewc-dc")})
    assert table_doc["models"] == [{"reference": "tiny", "fingerprint": "abc"}]
    assert table_doc["command"].startswith("python benchmarks/tuning.py run")


RESULTS = BENCHMARKS / "results" / "tuning"
DEFAULTS_DOC = BENCHMARKS.parent / "docs" / "DEFAULTS.md"


def test_every_complete_grid_s_final_setting_is_its_method_s_default(tuning):
    """The committed table's ``final`` (grid winner, then the token round's rate once it ran) is in the code."""
    from conceptstream.methods.registry import default_steps, method_defaults

    doc = json.loads((RESULTS / "tuning.json").read_text())
    final = {m: e["final"] for m, e in doc["methods"].items() if e["complete"]}
    assert {"lora", "lora-ewc", "c-lora", "ewc-dc", "textual-inversion"} <= set(final)
    for method, best in final.items():
        defaults = {**method_defaults(method, "lora"), "steps": default_steps(method)}
        for key, value in best.items():
            if key != tuning.CRITERION:
                assert defaults[key] == pytest.approx(value), (method, key, defaults[key], value)


def _token_doc(method: str, lr: float, knob: str, value: float, rates: dict[float, list[float]]) -> dict:
    """A results.json of a token-round bench: per token rate the val A_MMD of each seed."""
    runs = {}
    for rate, values in rates.items():
        seeds = {str(k): {"config": {"settings": {"lr": lr, knob: value, "token_lr": rate}},
                          "summary": {"A_MMD": v, "plasticity_MMD": v, "BwT_MMD": 0.0, "DC_acc": 1.0}}
                 for k, v in enumerate(values)}
        runs[f"{method}[token_lr={rate}]"] = {"method": method, "seeds": seeds}
    return {"settings": {"split": "val", "steps": 200}, "runs": runs}


def test_the_token_round_reruns_each_winner_of_a_grid_without_the_token_rate(tuning, tmp_path):
    assert set(tuning.token_round_methods()) == {"lora-ewc", "c-lora", "ewc-dc", "dsc", "dsc-ewc", "dsc-ewc-dc"}
    winners = {"ewc-dc": {"lr": 3e-4, "ewc_lambda": 10.0, "A_MMD": 274.0},
               "lora": {"lr": 3e-4, "token_lr": 2e-3, "A_MMD": 246.0}}
    (out, opts), = tuning.token_jobs(tmp_path, ["lora", "ewc-dc", "dsc"], winners)  # dsc: no complete grid yet
    assert out == tmp_path / "ewc-dc-token"
    assert opts["hparams"] == {"lr": 3e-4, "ewc_lambda": 10.0} and opts["sweep"] == {"token_lr": [2e-3, 2e-2]}
    assert opts["split"] == "val" and opts["seeds"] == 2 and opts["methods"] == ["ewc-dc"]
    (tmp_path / "t.json").write_text(json.dumps({"methods": {
        "ewc-dc": {"complete": True, "winner": winners["ewc-dc"]},
        "dsc": {"complete": False, "winner": {"lr": 1e-3, "dsc_iters": 10, "A_MMD": 227.0}}}}))
    assert tuning.complete_winners(tmp_path / "t.json") == {"ewc-dc": winners["ewc-dc"]}
    # a session whose work dir is lost resumes from the committed table: complete rounds are not rerun
    assert tuning.complete_rounds(tmp_path / "t.json", "grid") == ["ewc-dc"]
    assert tuning.complete_rounds(tmp_path / "t.json", "token") == []
    assert tuning.complete_rounds(tmp_path / "missing.json", "grid") == []


def test_the_final_setting_is_the_best_of_the_grid_winner_and_the_token_round(tuning):
    grid = {(lr, lam): [300.0 + 10 * i + j, 301.0 + 10 * i + j] for i, lr in enumerate((3e-4, 1e-3, 3e-3))
            for j, lam in enumerate((10.0, 100.0, 1000.0))}
    points = tuning.grid_points(_doc(grid), "ewc-dc")  # winner: lr 3e-4, lambda 10, 300.5 at token_lr 5e-3
    better = tuning.grid_points(_token_doc("ewc-dc", 3e-4, "ewc_lambda", 10.0, {2e-3: [290.0, 292.0]}), "ewc-dc")
    doc, md = tuning.table({"ewc-dc": points}, {"ewc-dc": better})
    entry = doc["methods"]["ewc-dc"]
    assert entry["final"] == {"lr": 3e-4, "ewc_lambda": 10.0, "A_MMD": 300.5}  # the round is not complete yet
    assert not entry["token_round"]["complete"] and "Token-rate round" in md
    both = tuning.grid_points(_token_doc("ewc-dc", 3e-4, "ewc_lambda", 10.0, {2e-3: [290.0, 292.0],
                                                                              2e-2: [310.0, 312.0]}), "ewc-dc")
    doc, md = tuning.table({"ewc-dc": points}, {"ewc-dc": both})
    assert doc["methods"]["ewc-dc"]["final"] == {"lr": 3e-4, "ewc_lambda": 10.0, "token_lr": 2e-3, "A_MMD": 291.0}
    assert "| **`ewc-dc`** | **lr=0.0003** | **ewc_lambda=10.0** | **token_lr=0.002** |" in md
    assert "| `ewc-dc` | lr=0.0003 | ewc_lambda=10.0 | token_lr=0.005 | 2 | 300.5 |" in md  # the grid's own rate
    worse = tuning.grid_points(_token_doc("ewc-dc", 3e-4, "ewc_lambda", 10.0, {2e-3: [320.0, 322.0],
                                                                               2e-2: [310.0, 312.0]}), "ewc-dc")
    doc, _ = tuning.table({"ewc-dc": points}, {"ewc-dc": worse})
    assert doc["methods"]["ewc-dc"]["final"]["token_lr"] == 5e-3  # the grid's rate stays


def test_the_token_round_is_kept_from_the_committed_table_when_its_benches_are_gone(tuning, tmp_path):
    root, out = tmp_path / "root", tmp_path / "t"
    grid = {(lr, lam): [300.0 + 10 * i + j] * 2 for i, lr in enumerate((3e-4, 1e-3, 3e-3))
            for j, lam in enumerate((10.0, 100.0, 1000.0))}
    for name, doc in (("ewc-dc", _doc(grid)), ("ewc-dc-token", _token_doc(
            "ewc-dc", 3e-4, "ewc_lambda", 10.0, {2e-3: [290.0, 290.0], 2e-2: [299.0, 299.0]}))):
        (root / name).mkdir(parents=True)
        (root / name / "results.json").write_text(json.dumps(doc))
    assert tuning.main(["table", "--root", str(root), "--out", str(out)]) == 0
    (root / "ewc-dc-token" / "results.json").unlink()
    assert tuning.main(["table", "--root", str(root), "--out", str(out)]) == 0
    entry = json.loads((out / "tuning.json").read_text())["methods"]["ewc-dc"]
    assert entry["final"]["token_lr"] == 2e-3 and entry["token_round"]["complete"]


def test_the_defaults_doc_holds_the_committed_tuning_table(tuning):
    text = DEFAULTS_DOC.read_text()
    assert tuning.with_table(text, (RESULTS / "tuning.md").read_text()) == text


def test_the_table_replaces_only_the_text_between_the_markers(tuning):
    doc = "# Defaults\n\n{begin}| {table} |\n{end}\n## Later\n"
    old = doc.format(begin=tuning.DOCS_BEGIN, table="old", end=tuning.DOCS_END)
    assert tuning.with_table(old, "| new |\n") == doc.format(begin=tuning.DOCS_BEGIN, table="new", end=tuning.DOCS_END)
    with pytest.raises(ValueError, match="needs one"):
        tuning.with_table("# no markers\n", "| new |\n")
