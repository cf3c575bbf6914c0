"""`bench --shard K/N` and `bench --merge`: two local shards merged equal one unsharded bench.

One quick bench (2 methods x 2 seeds, 2 concepts, a tiny random pipeline) is run once whole and
once as shards 1/2 and 2/2 plus a merge, for the module; the tests compare them, then check how
reruns, bad ``--shard`` values and bad merges are treated.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch

from conceptstream import api
from conceptstream.errors import UserInputError
from conceptstream.evaluation.bench import merge_bench, resolve_settings, run_bench, shard_slice

torch.set_num_threads(1)

METHODS = ["lora", "lora-ewc"]


def _bench(out: Path, model: Path, **kwargs) -> dict:
    return run_bench(out, sequence="tabletop-3", methods=METHODS, seeds=2, quick=True, steps=2, model=str(model),
                     multi_pairs=1, progress=False, log=lambda line: None, **kwargs)


class LearnSpy:
    """Stands in for api.learn: records the run folder of each call and fails it (no run may train)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, state, images, **kwargs):
        self.calls.append(Path(state).parent.parent.name + "/" + Path(state).parent.name)
        raise RuntimeError("this run should have been reused")


@pytest.fixture(scope="module")
def benches(random_model_path, tmp_path_factory) -> dict[str, Path]:
    """An unsharded bench, the same bench as shards 1/2 and 2/2, and their merge."""
    root = tmp_path_factory.mktemp("shards")
    dirs = {"single": root / "single", "1": root / "shard1", "2": root / "shard2", "merged": root / "merged"}
    _bench(dirs["single"], random_model_path)
    _bench(dirs["1"], random_model_path, shard="1/2")
    _bench(dirs["2"], random_model_path, shard=(2, 2))
    import conceptstream

    conceptstream.merge_bench([dirs["1"], dirs["2"]], dirs["merged"], log=lambda line: None)  # the top-level name
    return dirs


def _doc(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def _scores(summary: dict) -> dict:
    """A summary without its timings (the only numbers that differ between two computations of a run)."""
    return {label: {k: v for k, v in s.items() if k != "learn_seconds"} for label, s in summary.items()}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("state"))
    return dst


# ------------------------------------------------------------------------------ cheap unit tests


def test_shard_slice_is_contiguous_balanced_and_covers_every_run():
    runs = list(range(10))
    slices = [shard_slice(runs, k, 3) for k in (1, 2, 3)]
    assert slices == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert shard_slice(runs, 1, 1) == runs
    seed_major = [(m, k) for k in range(3) for m in "abcd"]  # 4 methods x 3 seeds on 3 GPUs: one seed each
    assert [shard_slice(seed_major, k, 3) for k in (1, 2, 3)] == [seed_major[0:4], seed_major[4:8], seed_major[8:]]


def test_shard_values_are_parsed_and_not_part_of_a_run(tmp_path):
    from conceptstream.evaluation.bench import BENCH_OPTIONS

    assert resolve_settings(tmp_path, {"quick": True, "shard": "2/3"}).shard == (2, 3)
    assert resolve_settings(tmp_path, {"quick": True, "shard": [1, 1]}).shard == (1, 1)
    assert resolve_settings(tmp_path, {"quick": True}).shard is None
    assert next(o for o in BENCH_OPTIONS if o.name == "shard").check is None  # a shard's runs are anyone's runs


@pytest.mark.parametrize("value", ["3/2", "0/2", "x/y", "1/2/3", "2", "-1/2"])
def test_a_bad_shard_is_one_line_and_writes_nothing(tmp_path, capsys, value):
    from conftest import assert_one_line_error

    from conceptstream.cli import main

    out = tmp_path / "bench"
    assert main(["bench", "--out", str(out), "--methods", "lora", "--quick", f"--shard={value}"]) == 2
    line = assert_one_line_error(capsys.readouterr().err)
    assert "--shard takes K/N with 1 <= K <= N" in line and repr(value) in line and "SLURM_ARRAY_TASK_ID" in line
    assert not out.exists()


def test_more_shards_than_runs_is_refused_before_any_work(tmp_path, capsys):
    from conftest import assert_one_line_error

    from conceptstream.cli import main

    out = tmp_path / "bench"
    assert main(["bench", "--out", str(out), "--methods", "lora,lora-ewc", "--quick", "--shard", "3/3"]) == 2
    assert "only 2 run(s)" in assert_one_line_error(capsys.readouterr().err)
    assert not out.exists()


def test_merge_takes_no_bench_option(tmp_path, capsys):
    from conftest import assert_one_line_error

    from conceptstream.cli import main

    for extra in (["--steps", "3"], ["--quick"], ["--stop-on-error"], ["--set", "ewc_lambda=1"]):
        assert main(["bench", "--merge", "a", "b", "--out", str(tmp_path / "m"), *extra]) == 2
        assert f"drop {extra[0]}" in assert_one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "m").exists()


# ------------------------------------------------------------------------------ end to end


def test_shards_hold_their_slices(benches):
    for index in (1, 2):  # contiguous slices of the seed-major list: one seed each
        seed = index - 1
        doc = _doc(benches[str(index)])
        shard = doc["settings"]["shard"]
        assert (shard["index"], shard["count"], shard["total_runs"]) == (index, 2, 4)
        assert [(r["label"], r["seed"]) for r in shard["runs"]] == [("lora", seed), ("lora-ewc", seed)]
        assert doc["complete"] is True
        assert {lb: list(r["seeds"]) for lb, r in doc["runs"].items()} == {"lora": [str(seed)],
                                                                          "lora-ewc": [str(seed)]}
        assert (benches[str(index)] / "report.md").is_file()
    assert "shard" not in _doc(benches["single"])["settings"]


def test_merged_shards_equal_the_unsharded_bench(benches):
    single, merged = _doc(benches["single"]), _doc(benches["merged"])
    assert merged["complete"] is True and merged["failed"] == []
    assert set(merged) == set(single) | {"merged_from"}  # a new field of results.json needs merging too
    assert _scores(merged["summary"]) == _scores(single["summary"])
    assert merged["summary"]["lora"]["A_MMD"]["n"] == 2  # aggregated over the two shards' seeds
    assert merged["settings"] == single["settings"]
    assert merged["runs"].keys() == single["runs"].keys()
    for label, entry in single["runs"].items():
        got = merged["runs"][label]
        assert got["mean_matrices"] == entry["mean_matrices"]
        assert got["seeds"].keys() == entry["seeds"].keys() == {"0", "1"}
        for seed, run in entry["seeds"].items():
            for key in ("matrices", "dc", "config", "hparams", "run_dir"):
                assert got["seeds"][seed][key] == run[key], (label, seed, key)
            assert _scores({0: got["seeds"][seed]["summary"]}) == _scores({0: run["summary"]})
    assert [(m["dir"], m["shard"]) for m in merged["merged_from"]] == [("../shard1", "1/2"), ("../shard2", "2/2")]
    assert merged["wall_seconds"] == pytest.approx(sum(_doc(benches[k])["wall_seconds"] for k in "12"), abs=0.01)
    assert merged["report"] == "report.md"


def test_merged_folder_is_self_contained_without_states(benches):
    merged = benches["merged"]
    text = (merged / "report.md").read_text()
    links = [unquote(p) for p in re.findall(r"\]\(([^)]+)\)", text)]
    assert any("grid-final" in p for p in links) and any("multi/pair" in p for p in links)
    assert sum("result.json" in p for p in links) == 4
    for link in links:
        assert (merged / link).is_file(), link
    assert not list(merged.rglob("state"))  # the learned streams stay in the shards
    assert (merged / "runs/lora-lora/seed1/progress.json").is_file()
    assert (merged / _doc(merged)["settings"]["data"] / "bench-data.json").is_file()
    assert not list(merged.parent.glob(".merged.*"))  # no temporary folder left behind


def test_a_rerun_shard_resumes_and_an_unsharded_bench_reuses_shard_runs(benches, random_model_path, tmp_path,
                                                                      monkeypatch):
    spy = LearnSpy()
    monkeypatch.setattr(api, "learn", spy)
    before = (benches["1"] / "runs/lora-lora/seed0/result.json").stat().st_mtime_ns
    assert _bench(benches["1"], random_model_path, shard="1/2")["complete"] is True
    assert spy.calls == [] and (benches["1"] / "runs/lora-lora/seed0/result.json").stat().st_mtime_ns == before

    # shard 1's folder as an unsharded bench: its runs are reused, the other slice's are computed (here: fail)
    out = _copy(benches["1"], tmp_path / "whole")
    doc = _bench(out, random_model_path)
    assert spy.calls == ["lora-lora/seed1", "lora-ewc-lora/seed1"]
    assert [(f["label"], f["seed"]) for f in doc["failed"]] == [("lora", 1), ("lora-ewc", 1)]
    assert "shard" not in doc["settings"]
    assert doc["runs"]["lora"]["seeds"]["0"]["matrices"] == _doc(benches["1"])["runs"]["lora"]["seeds"]["0"]["matrices"]

    # the merged folder is a bench folder too: a rerun with the same options finds every run finished
    again = _bench(_copy(benches["merged"], tmp_path / "again"), random_model_path)
    assert spy.calls == ["lora-lora/seed1", "lora-ewc-lora/seed1"]  # no new calls
    assert again["summary"] == _doc(benches["merged"])["summary"] and again["complete"] is True


def test_a_shard_refuses_an_out_of_another_shard(benches, random_model_path):
    with pytest.raises(UserInputError, match=r"holds the results of shard 1/2; give each shard its own --out"):
        _bench(benches["1"], random_model_path, shard="2/2")
    with pytest.raises(UserInputError, match="ran without --shard"):
        _bench(benches["single"], random_model_path, shard="1/2")
    assert _doc(benches["1"])["settings"]["shard"]["index"] == 1


def test_cli_merge_writes_and_replaces_an_earlier_merge(benches, tmp_path, capsys):
    from conceptstream.cli import main

    out = tmp_path / "m"
    for _ in range(2):  # the second merge replaces the first
        assert main(["bench", "--merge", str(benches["2"]), str(benches["1"]), "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        assert "lora-ewc" in printed and "merged 2 shard(s), 4 run(s)" in printed
    assert _doc(out)["summary"] == _doc(benches["merged"])["summary"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_bad_merges_are_refused_and_write_nothing(benches, tmp_path, capsys):
    from conftest import assert_one_line_error

    from conceptstream.cli import main

    s1, s2 = str(benches["1"]), str(benches["2"])
    dup = str(_copy(benches["1"], tmp_path / "dup"))
    steps = _copy(benches["2"], tmp_path / "steps")
    doc = _doc(steps)
    doc["settings"]["steps"] = 3
    (steps / "results.json").write_text(json.dumps(doc))
    split = _copy(benches["2"], tmp_path / "split")
    doc = _doc(split)
    doc["settings"]["shard"]["count"] = 3
    (split / "results.json").write_text(json.dumps(doc))
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    out = tmp_path / "out"
    cases = [
        ([s1], out, "shard(s) 2/2 missing"),
        ([s1, dup, s2], out, "are both shard 1/2; give each shard once"),
        ([s1, str(steps)], out, "was made under other settings than"),
        ([s1, str(split)], out, "shards of different splits"),
        ([str(benches["single"]), s2], out, "not a shard"),
        ([s1, str(tmp_path / "nope")], out, "no such folder"),
        ([s1, s2], benches["1"], "overlaps the shard folder"),
        ([s1, s2], junk, "already holds other files"),
    ]
    for dirs, target, needle in cases:
        assert main(["bench", "--merge", *dirs, "--out", str(target)]) == 2, needle
        line = assert_one_line_error(capsys.readouterr().err)
        assert needle in line, line
    assert "(steps differ)" in str(pytest.raises(UserInputError, merge_bench, [s1, str(steps)], out).value)
    assert not out.exists() and sorted(p.name for p in junk.iterdir()) == ["notes.txt"]
    assert _doc(benches["1"])["settings"]["shard"]["index"] == 1


def test_an_incomplete_shard_makes_an_incomplete_merge(benches, tmp_path):
    """A shard still running (or with a failed run) merges into an incomplete result that says so."""
    part = _copy(benches["2"], tmp_path / "part")
    doc = _doc(part)
    del doc["runs"]["lora-ewc"]["seeds"]["1"]
    doc["summary"]["lora-ewc"] = {}
    doc["complete"] = False
    doc["failed"] = [{"label": "lora-ewc", "seed": 1, "run": "runs/lora-ewc-lora/seed1", "error": "RuntimeError: x"}]
    (part / "results.json").write_text(json.dumps(doc))
    merged = merge_bench([benches["1"], part], tmp_path / "m", log=lambda line: None)
    assert merged["complete"] is False
    assert merged["failed"] == [{**doc["failed"][0], "shard": "../part"}]
    assert list(merged["runs"]["lora-ewc"]["seeds"]) == ["0"] and merged["summary"]["lora-ewc"]["A_MMD"]["n"] == 1
    assert merged["summary"]["lora"]["A_MMD"]["n"] == 2
    assert "**Incomplete**" in (tmp_path / "m" / "report.md").read_text()


def test_runs_carried_across_a_lost_work_dir_are_not_recomputed(benches, random_model_path, tmp_path, monkeypatch):
    """benchmarks/carry.py: the finished runs' result.json files alone (no state, data or logs) let a new
    work dir resume a shard without training anything, with the same numbers."""
    from conftest import benchmark_script

    carry = benchmark_script("carry")
    kept, fresh = tmp_path / "carried", tmp_path / "fresh"
    assert carry.main(["save", str(benches["1"].parent), str(kept)]) == 0
    assert not list(kept.rglob("state")) and not list(kept.rglob("*.safetensors"))
    assert carry.main(["restore", str(kept), str(fresh)]) == 0
    spy = LearnSpy()
    monkeypatch.setattr(api, "learn", spy)
    doc = _bench(fresh / benches["1"].name, random_model_path, shard="1/2")
    assert spy.calls == [] and doc["complete"] is True
    assert doc["summary"] == _doc(benches["1"])["summary"]
