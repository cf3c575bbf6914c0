"""`conceptstream bench` end to end in --quick mode on a tiny random pipeline (2 methods, 2 concepts).

One bench folder is built once for the module, through an interrupted first attempt and a resume;
the tests then check its files and how reruns treat finished, deleted and mismatched runs.
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
from conceptstream.errors import StateError, UserInputError
from conceptstream.evaluation import bench as bench_mod
from conceptstream.evaluation.bench import expand_variants, parse_sweep, prepare_data, run_bench

torch.set_num_threads(1)

METHODS = ["lora", "ewc-dc"]
LABEL_DIRS = {"lora": "runs/lora-lora/seed0", "ewc-dc": "runs/ewc-dc-lora/seed0"}


@pytest.fixture(scope="module")
def tiny_model(random_model_path) -> str:
    return str(random_model_path)  # an untrained tiny pipeline (tests/conftest.py)


class LearnSpy:
    """Wraps api.learn: records (run folder, task index) per call; can fail one chosen call."""

    def __init__(self, real, fail_on: tuple[str, int] | None = None) -> None:
        self.real = real
        self.fail_on = fail_on
        self.calls: list[tuple[str, int]] = []

    def __call__(self, state, images, **kwargs):
        run = Path(state).parent.parent.name
        task = _n_learned(Path(state))
        self.calls.append((run, task))
        if self.fail_on == (run, task):
            raise RuntimeError("simulated crash inside learn")
        return self.real(state, images, **kwargs)


def _n_learned(state: Path) -> int:
    from conceptstream.state import StateStore

    store = StateStore(state)
    return len(store.read_manifest()["concepts"]) if store.exists() else 0


def _bench(out: Path, model: str, **kwargs):
    return run_bench(out, sequence="tabletop-3", methods=METHODS, quick=True, steps=2, model=model,
                     progress=False, log=lambda line: None, **kwargs)


@pytest.fixture(scope="module")
def bench_dir(tiny_model, tmp_path_factory):
    """A finished quick bench, produced by a first attempt that crashes at ewc-dc's task 2 and a rerun."""
    out = tmp_path_factory.mktemp("bench") / "out"
    mp = pytest.MonkeyPatch()
    try:
        spy = LearnSpy(api.learn, fail_on=("ewc-dc-lora", 1))
        mp.setattr(api, "learn", spy)
        with pytest.raises(RuntimeError, match="simulated crash"):
            _bench(out, tiny_model, keep_going=False)
        assert spy.calls == [("lora-lora", 0), ("lora-lora", 1), ("ewc-dc-lora", 0), ("ewc-dc-lora", 1)]
        lora_result = out / LABEL_DIRS["lora"] / "result.json"
        ewc_dir = out / LABEL_DIRS["ewc-dc"]
        # The finished run is intact; the interrupted one kept its first task and has no result.
        assert json.loads(lora_result.read_text())["status"] == "complete"
        assert not (ewc_dir / "result.json").exists()
        assert len(json.loads((ewc_dir / "progress.json").read_text())["tasks"]) == 1
        partial = json.loads((out / "results.json").read_text())
        assert partial["complete"] is False and "lora" in partial["summary"]
        mtime = lora_result.stat().st_mtime_ns

        spy = LearnSpy(spy.real)
        mp.setattr(api, "learn", spy)
        results = _bench(out, tiny_model)
        assert spy.calls == [("ewc-dc-lora", 1)]  # only the task in flight is redone
        assert lora_result.stat().st_mtime_ns == mtime
        assert results["complete"] is True
    finally:
        mp.undo()
    return out


def _mtimes(out: Path) -> dict[str, int]:
    return {label: (out / d / "result.json").stat().st_mtime_ns for label, d in LABEL_DIRS.items()}


# ------------------------------------------------------------------------------ cheap unit tests


def test_parse_sweep_values_are_json_when_possible():
    assert parse_sweep("ewc_lambda=1,10,100") == ("ewc_lambda", [1, 10, 100])
    assert parse_sweep("dc-delta=0.1, 1e-2") == ("dc_delta", [0.1, 0.01])
    assert parse_sweep("targets=cross-kv") == ("targets", ["cross-kv"])
    with pytest.raises(UserInputError, match="KEY=V1"):
        parse_sweep("ewc_lambda")


def test_variants_labels_dirs_and_sweeps():
    vs = expand_variants(["lora", "ewc-dc", "c-lora", "textual-inversion"], "lora", {"ewc_lambda": [1, 10]})
    assert [v.label for v in vs] == ["lora", "ewc-dc[ewc_lambda=1]", "ewc-dc[ewc_lambda=10]", "c-lora",
                                     "textual-inversion"]
    assert [v.dirname for v in vs] == ["lora-lora", "ewc-dc-lora_ewc_lambda=1", "ewc-dc-lora_ewc_lambda=10",
                                       "c-lora-lora", "textual-inversion"]
    assert vs[1].hparams == (("ewc_lambda", 1),)
    vera = expand_variants(["ewc-dc", "c-lora"], "vera")
    assert [v.label for v in vera] == ["ewc-dc-vera", "c-lora"]  # C-LoRA is defined on LoRA
    # a run's recorded settings carry the adapter's learning rate (so runs under another default are refused)
    from conceptstream.methods.registry import method_defaults

    assert method_defaults("ewc-dc", "vera")["lr"] == 3e-3 and method_defaults("ewc-dc", "lora")["lr"] == 3e-4
    assert method_defaults("custom-diffusion", None)["lr"] == 1e-4  # no adapter: the method's own rate
    with pytest.raises(UserInputError, match="no_such_setting"):
        expand_variants(["lora"], "lora", {"no_such_setting": [1]})
    with pytest.raises(UserInputError, match="unknown method"):
        expand_variants(["nope"], "lora")


def test_user_sequence_folder_needs_held_out_images(tmp_path):
    from conceptstream.world.catalogue import get_sequence
    from conceptstream.world.folders import export_sequence

    root = tmp_path / "mine"
    export_sequence(get_sequence("tabletop-3")[:2], root, train_views=2, eval_views=2)
    data = prepare_data(root, tmp_path / "out", 3, 3)
    assert not data.named and [c.token for c in data.concepts] == [c.token for c in get_sequence("tabletop-3")[:2]]
    for p in (root / data.concepts[1].name / "eval").iterdir():
        p.unlink()
    with pytest.raises(UserInputError, match="held-out"):
        prepare_data(root, tmp_path / "out", 3, 3)


def test_split_val_scores_val_views_and_needs_them_in_a_user_folder(tmp_path, capsys):
    from conftest import assert_one_line_error

    from conceptstream.cli import main
    from conceptstream.world.catalogue import get_sequence
    from conceptstream.world.folders import export_sequence

    root = tmp_path / "mine"
    export_sequence(get_sequence("tabletop-3")[:2], root, train_views=1, eval_views=2, val_views=2)
    val, test = prepare_data(root, tmp_path / "o", 1, 2, split="val"), prepare_data(root, tmp_path / "o", 1, 2)
    assert (val.split, test.split) == ("val", "test")
    assert val.heldout_images(1) == val.concepts[1].val_images() and len(val.heldout_images(1)) == 2
    assert test.heldout_images(1) == test.concepts[1].eval_images()
    assert not set(val.heldout_images(1)) & set(test.heldout_images(1))
    name = val.concepts[1].name
    (root / name / "val" / "001.png").unlink()  # one validation view left: too few for MMD/KID
    with pytest.raises(UserInputError, match=f"concept {name} has 1 validation image"):
        prepare_data(root, tmp_path / "o", 1, 2, split="val")
    assert prepare_data(root, tmp_path / "o", 1, 2).split == "test"  # the test split does not need val/
    out = tmp_path / "bench"
    assert main(["bench", "--out", str(out), "--sequence", str(root), "--split", "val", "--quick"]) == 2
    line = assert_one_line_error(capsys.readouterr().err)
    assert f"concept {name} has 1 validation image(s) in {root / name / 'val'}" in line
    assert "add them to" in line and "or use --split test" in line
    assert not out.exists()
    with pytest.raises(UserInputError, match="--split must be one of val, test, got 'eval'"):
        run_bench(out, split="eval", quick=True)
    assert not out.exists()


def test_a_named_sequence_is_rendered_with_val_views(tmp_path):
    data = prepare_data("tabletop-3", tmp_path, 1, 2, max_concepts=1, progress=False, log=lambda line: None,
                        val_views=3, split="val")
    assert data.root.name == "tabletop-3-1c-train1-val3-eval2"
    marker = json.loads((data.root / "bench-data.json").read_text())
    assert (marker["train_views"], marker["val_views"], marker["eval_views"]) == (1, 3, 2)
    c = data.concepts[0]
    assert (len(c.train_images()), len(c.val_images()), len(c.eval_images())) == (1, 3, 2)
    assert data.heldout_images(0) == c.val_images()


def test_the_data_fingerprint_covers_val_images(tmp_path):
    import hashlib

    from conceptstream.evaluation.bench.data import folder_fingerprint
    from conceptstream.world.catalogue import get_sequence
    from conceptstream.world.folders import export_sequence

    concepts = export_sequence(get_sequence("tabletop-3")[:1], tmp_path, train_views=1, eval_views=2)
    h = hashlib.sha256()  # the fingerprint as it was before val/ existed: a folder without val keeps it
    for c in concepts:
        h.update(f"{c.name}|{c.token}|{c.noun}".encode())
        for split, paths in (("train", c.train_images()), ("eval", c.eval_images())):
            for p in paths:
                h.update(f"{split}/{p.name}:{p.stat().st_size}".encode())
    before = folder_fingerprint(concepts)
    assert before == h.hexdigest()[:16]
    shutil.copy(concepts[0].eval_images()[0], concepts[0].val_dir / "000.png")
    with_val = folder_fingerprint(concepts)
    assert with_val != before
    shutil.copy(concepts[0].eval_images()[1], concepts[0].val_dir / "001.png")
    assert folder_fingerprint(concepts) not in (before, with_val)


def test_the_split_enters_the_run_config_and_results_settings(tmp_path):
    """A run made on val is refused for test (and the other way round); a test run's config is the
    one saved before --split existed, so finished test runs stay valid."""
    from types import SimpleNamespace

    from conceptstream.evaluation.bench import BenchContext, BenchData, BenchRun, resolve_settings
    from conceptstream.evaluation.bench.results import compile_results

    def context(split, hparams=None):
        s = resolve_settings(tmp_path / "o", {"quick": True, "methods": "lora", "split": split, "hparams": hparams})
        data = BenchData([], s.sequence, True, "f" * 16, tmp_path / "o" / "data", s.split)
        return BenchContext(s, data, SimpleNamespace(name="feat", dim=3),
                            SimpleNamespace(t2i_available=False, t2i_reason="no text"),
                            {"reference": "tiny", "fingerprint": "m"}, "DDIMScheduler", print)

    variant = expand_variants(["lora"], "lora")[0]
    val, test = BenchRun(context("val"), variant, 0), BenchRun(context(None), variant, 0)
    assert test.ctx.settings.split == "test" and "split" not in test.config()
    assert val.config() == {**test.config(), "split": "val"}
    with pytest.raises(StateError, match=r"\(split differ\)"):
        test._check_config(val.config(), tmp_path / "progress.json")
    with pytest.raises(StateError, match=r"\(split differ\)"):
        val._check_config(test.config(), tmp_path / "progress.json")
    # a setting given explicitly at the value it has by default is the same run; at another value it is not
    token_lr = test.effective_hparams()["token_lr"]
    BenchRun(context(None, {"token_lr": token_lr}), variant, 0)._check_config(test.config(), tmp_path / "r.json")
    with pytest.raises(StateError, match=r"\(settings differ\)"):
        BenchRun(context(None, {"token_lr": token_lr * 2}), variant, 0)._check_config(test.config(), tmp_path / "r.json")
    for run, split in ((val, "val"), (test, "test")):
        doc = compile_results(run.ctx, [variant], 1, {}, [], 0.0)
        assert doc["settings"]["split"] == split


def test_cli_bench_is_a_thin_wrapper(monkeypatch, capsys):
    from conceptstream import cli

    seen = {}

    def fake(out, **kwargs):
        seen.update(kwargs, out=out)
        return {"summary": {}, "failed": []}

    monkeypatch.setattr(bench_mod, "run_bench", fake)
    code = cli.main(["bench", "--sequence", "tabletop-6", "--methods", "lora,ewc-dc", "--adapter", "vera",
                     "--seeds", "2", "--out", "x", "--steps", "5", "--quick", "--sweep", "ewc_lambda=1,10",
                     "--set", "dsc_iters=5", "--features", "efficientnet-lite0", "--model", "tiny", "--eval-every", "5"])
    assert code == 0 and seen["eval_every"] == 5
    assert seen["out"] == "x" and seen["methods"] == "lora,ewc-dc" and seen["adapter"] == "vera"
    assert seen["seeds"] == 2 and seen["steps"] == 5 and seen["quick"] is True
    assert seen["sweep"] == ["ewc_lambda=1,10"] and seen["model"] == "tiny" and seen["keep_going"] is True
    assert seen["hparams"] == ["dsc_iters=5"]


def test_settings_no_method_has_are_refused_before_any_work(tmp_path):
    with pytest.raises(UserInputError, match="no_such_setting"):
        run_bench(tmp_path / "o", methods=["lora"], hparams=["no_such_setting=1"], quick=True)
    with pytest.raises(UserInputError, match="both"):
        run_bench(tmp_path / "o", methods=["ewc-dc"], hparams={"ewc_lambda": 1}, sweep=["ewc_lambda=1,2"])
    assert not (tmp_path / "o").exists()


def test_every_bench_option_is_declared_once_with_help():
    """The CLI flags, the settings' fields and the run config all come from BENCH_OPTIONS."""
    import argparse
    import dataclasses

    from conceptstream.evaluation.bench import BENCH_OPTIONS, BenchSettings
    from conceptstream.evaluation.options import add_arguments

    assert all(o.help for o in BENCH_OPTIONS)
    fields = {f.name for f in dataclasses.fields(BenchSettings)}
    assert {o.name for o in BENCH_OPTIONS} <= fields
    parser = argparse.ArgumentParser()
    add_arguments(parser, BENCH_OPTIONS)
    flags = {a.option_strings[0]: a for a in parser._actions if a.option_strings and a.dest != "help"}
    assert set(flags) == {o.cli_flag for o in BENCH_OPTIONS if o.cli_flag}
    assert all(a.help for a in flags.values())
    assert flags["--set"].dest == "hparams" and flags["--stop-on-error"].dest == "keep_going"
    run_keys = {o.name for o in BENCH_OPTIONS if o.check == "run"}
    assert run_keys == {"steps", "rank", "targets", "dc_eval_timesteps", "multi_pairs", "eval_every", "split",
                        "dc_elimination"}


def test_run_summary_reports_both_dc_accuracies():
    from conceptstream.evaluation.bench import run_summary
    from conceptstream.evaluation.bench.results import SUMMARY_KEYS, matrix_from_rows

    matrices = {k: matrix_from_rows([[1.0, None], [2.0, 3.0]], 2) for k in ("MMD", "KID", "I2I")}
    summary = run_summary(matrices, 0.25, [{"learn_seconds": 2.0}], 0.1, dc_acc_own_class=0.75)
    assert (summary["DC_acc"], summary["DC_acc_own_class"], summary["DC_ECE"]) == (0.25, 0.75, 0.1)
    assert set(summary) == set(SUMMARY_KEYS) and summary["T2I"] is None
    assert "favours methods trained against c_0" in SUMMARY_KEYS["DC_acc_own_class"]
    assert run_summary(matrices, 0.25, [])["DC_acc_own_class"] is None


def test_quick_values_apply_only_to_options_not_given(tmp_path):
    from conceptstream.evaluation.bench import resolve_settings

    s = resolve_settings(tmp_path, {"quick": True, "ddim_steps": 7, "methods": "lora, dsc"})
    assert (s.ddim_steps, s.images_per_prompt, s.seeds, s.contexts, s.max_concepts) == (7, 2, [0], (), 2)
    assert s.methods == ["lora", "dsc"] and s.hparams == {"dsc_iters": 2} and s.steps == 3
    full = resolve_settings(tmp_path, {})
    # steps None: each method's own default_steps (Variant.task_steps)
    assert (full.ddim_steps, full.seeds, full.steps, full.model, full.keep_going) == (30, [0, 1, 2], None, "tiny", True)
    assert full.contexts == ("on grass", "on a wooden table") and len(full.methods) == 8
    with pytest.raises(TypeError, match="no_such_option"):
        resolve_settings(tmp_path, {"no_such_option": 1})
    with pytest.raises(UserInputError, match="--eval-every must be >= 1"):
        resolve_settings(tmp_path, {"eval_every": 0})
    with pytest.raises(UserInputError, match="through --set"):
        resolve_settings(tmp_path, {"methods": "ewc-dc[dc_k=2]"})


def test_generation_options_change_the_run_config(tmp_path):
    """An option declared check='generation' changes generation_settings, so a saved run made with
    another value is refused."""
    import dataclasses

    from conceptstream.evaluation.bench import BENCH_OPTIONS, BenchContext, resolve_settings

    base = resolve_settings(tmp_path, {"quick": True})
    ctx = BenchContext(base, None, None, None, {}, "DDIMScheduler", print)
    for o in BENCH_OPTIONS:
        if o.check != "generation":
            continue
        value = getattr(base, o.name)
        other = value + ("on sand",) if isinstance(value, tuple) else value + 1
        changed = BenchContext(dataclasses.replace(base, **{o.name: other}), None, None, None, {}, "DDIMScheduler",
                               print)
        assert changed.generation_settings() != ctx.generation_settings(), o.name


# ------------------------------------------------------------------------------ end to end


def test_results_json_has_summary_matrices_and_settings(bench_dir):
    doc = json.loads((bench_dir / "results.json").read_text())
    assert doc["format"] == "conceptstream-bench" and doc["complete"] is True and doc["failed"] == []
    assert set(doc["summary"]) == set(METHODS)
    for label in METHODS:
        s = doc["summary"][label]
        for key in ("A_MMD", "BwT_MMD", "forgetting_MMD", "plasticity_MMD", "KID", "I2I", "DC_acc", "DC_ECE"):
            assert set(s[key]) == {"mean", "std", "n", "ci95", "ci_low", "ci_high"}, key
            assert s[key]["n"] == 1 and isinstance(s[key]["mean"], float) and s[key]["std"] == 0.0
        assert s["T2I"] == {"mean": None, "std": None, "n": 0, "ci95": None, "ci_low": None,
                            "ci_high": None}  # no CLIP: unavailable, not made up
        assert 0.0 <= s["DC_acc"]["mean"] <= 1.0
        run = doc["runs"][label]["seeds"]["0"]
        for metric in ("MMD", "KID", "I2I"):
            m = run["matrices"][metric]
            assert len(m) == 2 and m[0][1] is None  # above the diagonal: not defined
            assert all(isinstance(m[n][i], float) for n in range(2) for i in range(n + 1))
        assert run["matrices"]["T2I"] is None
        a_mmd = sum(run["matrices"]["MMD"][1]) / 2
        assert s["A_MMD"]["mean"] == pytest.approx(a_mmd)
        bwt = run["matrices"]["MMD"][0][0] - run["matrices"]["MMD"][1][0]
        assert s["BwT_MMD"]["mean"] == pytest.approx(bwt)
        # the fixed set: 2 concepts + the class prompts of their 2 nouns; own class: c_0 + 2 concepts
        assert len(run["dc"]["confusion"]) == 2 and len(run["dc"]["confusion"][0]) == 4
        assert run["dc"]["candidates"][2:] == [f"a photo of a {c['noun']}" for c in doc["settings"]["concepts"]]
        own = run["dc"]["own_class"]
        assert len(own["confusion"]) == 2 and len(own["confusion"][0]) == 3 and 0.0 <= own["accuracy"] <= 1.0
        assert s["DC_acc"]["mean"] == pytest.approx(run["dc"]["accuracy"])
        cal = run["dc"]["calibration"]
        assert 0.0 <= cal["ece"] <= 1.0 and 0.0 <= cal["true_prob"] <= 1.0 and cal["nll"] >= 0.0
        assert s["DC_ECE"]["mean"] == pytest.approx(cal["ece"])
        assert cal["best_temperature"] == pytest.approx(run["dc"]["dc"]["temperature"] / cal["best_logit_scale"])
        assert run["hparams"]["lr"] > 0 and run["config"]["steps"] == 2
        for t in run["tasks"]:
            assert t["eval_seconds"] > 0 and t["memory"]["peak_rss_mib"] > 0
        assert all(t["learn_seconds"] is not None for t in run["tasks"])
        # how far task 2 moved the adapter that task 1 left (none for the task that made it)
        changes = [t["adapter_change"] for t in run["tasks"]]
        assert changes[0] is None and isinstance(changes[1], float) and changes[1] > 0
        mean = doc["runs"][label]["mean_matrices"]["MMD"]
        assert mean[0][1] is None and mean == run["matrices"]["MMD"]
    assert doc["runs"]["ewc-dc"]["seeds"]["0"]["hparams"]["ewc_lambda"] is not None
    settings = doc["settings"]
    assert settings["steps"] == 2 and settings["quick"] is True and settings["seeds"] == [0]
    assert settings["data"] == "data/tabletop-3-2c-train3-val3-eval3"  # relative to the out folder
    assert settings["split"] == "test" and all("split" not in r["seeds"]["0"]["config"] for r in doc["runs"].values())
    assert len(settings["concepts"]) == 2 and settings["features"]["name"] == "efficientnet-lite0"
    assert settings["generation"]["images_per_concept"] == 2 and settings["generation"]["sampler"]
    assert "torch" in doc["versions"] and "diffusers" in doc["versions"]
    assert doc["t2i"]["available"] is False and "CLIP" in doc["t2i"]["reason"]


def test_report_links_point_to_existing_files(bench_dir):
    text = (bench_dir / "report.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", text)
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(images) >= 8  # heatmaps, curves, grids, multi-concept samples
    for link in links:
        assert (bench_dir / unquote(link)).is_file(), link
    assert "## Summary" in text and "`ewc-dc`" in text and "T2I is not reported" in text
    assert any("heatmap-MMD" in p for p in images) and any("grid-final" in p for p in images)
    assert any("multi/pair" in p for p in images)
    assert "### How far each task moved the shared adapter" in text
    settings_row = next(line for line in text.splitlines() if line.startswith("| `ewc-dc` | `"))
    assert "`lr=0.0003`" in settings_row and "`ewc_lambda=" in settings_row  # every setting, defaults included


def test_rerun_skips_finished_runs(bench_dir, tiny_model, monkeypatch):
    spy = LearnSpy(api.learn)
    monkeypatch.setattr(api, "learn", spy)
    before = _mtimes(bench_dir)
    _bench(bench_dir, tiny_model)
    assert spy.calls == [] and _mtimes(bench_dir) == before


def test_deleted_result_file_recomputes_only_that_run(bench_dir, tiny_model, monkeypatch):
    spy = LearnSpy(api.learn)
    monkeypatch.setattr(api, "learn", spy)
    before = _mtimes(bench_dir)
    (bench_dir / LABEL_DIRS["lora"] / "result.json").unlink()
    _bench(bench_dir, tiny_model)
    after = _mtimes(bench_dir)
    assert after["ewc-dc"] == before["ewc-dc"] and after["lora"] != before["lora"]
    assert spy.calls == []  # re-finalised from its saved per-task evaluations

    import shutil

    shutil.rmtree(bench_dir / LABEL_DIRS["lora"])
    results = _bench(bench_dir, tiny_model)
    assert spy.calls == [("lora-lora", 0), ("lora-lora", 1)]  # that run only, from scratch
    assert _mtimes(bench_dir)["ewc-dc"] == before["ewc-dc"]
    assert results["complete"] is True


def test_an_interrupted_final_dc_evaluation_resumes_at_its_next_concept(bench_dir, tiny_model, monkeypatch):
    from conceptstream.scoring.dc import DiffusionClassifier

    run = bench_dir / LABEL_DIRS["lora"]
    before = json.loads((run / "result.json").read_text())["dc"]
    (run / "result.json").unlink()
    real, calls = DiffusionClassifier.eval_errors_per_draw, []

    def counted(self, *args, **kwargs):
        calls.append(1)
        if fail and len(calls) > 1:
            raise KeyboardInterrupt  # Ctrl-C in the second concept's classification
        return real(self, *args, **kwargs)

    monkeypatch.setattr(DiffusionClassifier, "eval_errors_per_draw", counted)
    fail = True
    with pytest.raises(KeyboardInterrupt):
        _bench(bench_dir, tiny_model)
    assert (run / "dc_partial.safetensors").is_file() and not (run / "result.json").exists()
    fail, calls[:] = False, []
    _bench(bench_dir, tiny_model)
    after = json.loads((run / "result.json").read_text())
    n = len(before["per_concept"])
    assert len(calls) == n - 1 and after["dc"]["resumed"]["concepts"] == 1
    assert after["dc"]["accuracy"] == before["accuracy"] and after["dc"]["confusion"] == before["confusion"]
    assert not (run / "dc_partial.safetensors").exists()  # result.json holds it now


def test_rerun_with_other_settings_is_refused(bench_dir, tiny_model):
    before = _mtimes(bench_dir)
    with pytest.raises(StateError, match="steps"):
        run_bench(bench_dir, sequence="tabletop-3", methods=METHODS, quick=True, steps=3, model=tiny_model,
                  progress=False, log=lambda line: None)
    assert _mtimes(bench_dir) == before


def test_rerun_after_a_default_changed_is_refused(bench_dir, tiny_model, monkeypatch):
    """A finished run made under other library defaults is not silently reused."""
    from conceptstream.methods.registry import get_method

    before = _mtimes(bench_dir)
    cls = get_method("lora")
    monkeypatch.setattr(cls, "defaults", {**cls.defaults, "token_lr": cls.defaults.get("token_lr", 5e-3) * 2})
    with pytest.raises(StateError, match="settings"):
        _bench(bench_dir, tiny_model)
    assert _mtimes(bench_dir) == before


def test_keep_going_records_a_failed_run(tmp_path, tiny_model, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(api, "learn", broken)
    out = tmp_path / "b"
    results = run_bench(out, sequence="tabletop-3", methods=["lora"], quick=True, steps=2, model=tiny_model,
                        progress=False, log=lambda line: None)
    assert results["complete"] is False
    assert [(f["label"], f["seed"]) for f in results["failed"]] == [("lora", 0)]
    assert "boom" in results["failed"][0]["error"]
    assert json.loads((out / "results.json").read_text())["failed"][0]["label"] == "lora"
    assert "Failed runs" in (out / "report.md").read_text()


def test_a_method_list_as_typed_on_the_command_line_records_the_fixed_adapter(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setattr(api, "learn", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("not needed")))
    results = run_bench(tmp_path / "b", sequence="tabletop-3", methods="lora, c-lora", adapter="vera", quick=True,
                        steps=2, model=tiny_model, progress=False, log=lambda line: None)
    assert results["settings"]["methods"] == ["lora-vera", "c-lora"]
    assert results["settings"]["fixed_adapter"] == {"c-lora": "lora"}  # C-LoRA is defined on LoRA only


def test_t2i_uses_prompts_without_the_token_when_the_extractor_has_text(tmp_path):
    from types import SimpleNamespace

    from PIL import Image

    from conceptstream.evaluation.bench import Evaluator
    from conceptstream.evaluation.features import FeatureExtractor
    from conceptstream.world.catalogue import get_sequence
    from conceptstream.world.folders import export_sequence

    class TextFeatures(FeatureExtractor):
        name, dim, supports_text = "stub-clip", 3, True

        def __init__(self):
            self.texts: list[str] = []

        def _embed(self, batch):
            return torch.tensor([[float(im.getpixel((0, 0))[0]) + 1.0, 1.0, float(k)] for k, im in enumerate(batch)])

        def text_features(self, prompts):
            self.texts += list(prompts)
            return torch.ones(len(prompts), 3)

    class Stream:
        def __init__(self):
            self.prompts: list[str] = []

        def generate(self, prompt, n, seed, steps, guidance, progress):
            self.prompts.append(prompt)
            return [Image.new("RGB", (8, 8), (10 * (seed % 7) + k, 0, 0)) for k in range(n)]

    export_sequence(get_sequence("tabletop-3")[:1], tmp_path / "d", train_views=1, eval_views=2)
    data = prepare_data(tmp_path / "d", tmp_path / "o", 1, 2)
    settings = SimpleNamespace(contexts=("on grass",), images_per_prompt=2, gen_seed=0, ddim_steps=2, guidance=5.0)
    extractor = TextFeatures()
    ev = Evaluator(settings, data, extractor)
    assert ev.t2i_available and ev.t2i_reason is None
    c = data.concepts[0]
    stream = Stream()
    scores, first = ev.score_concept(stream, 0, include_noun=True)
    assert stream.prompts == [f"a photo of a {c.token} {c.noun}", f"a photo of a {c.token} {c.noun} on grass"]
    assert extractor.texts == [f"a photo of a {c.noun}"] * 2 + [f"a photo of a {c.noun} on grass"] * 2
    assert isinstance(scores["T2I"], float) and -1.0 <= scores["T2I"] <= 1.0 and len(first) == 2
    stream = Stream()
    ev.score_concept(stream, 0, include_noun=False)  # C-LoRA's prompts carry no class noun
    assert stream.prompts[0] == f"a photo of a {c.token}"


def test_eval_every_scores_the_new_concept_each_task_and_all_concepts_at_the_end(tmp_path, tiny_model):
    # 3 concepts, full rows every 3rd task: after task 2 only concept 2 is scored (the diagonal)
    doc = run_bench(tmp_path / "sparse", sequence="tabletop-3", methods=["lora"], quick=True, steps=2,
                    model=tiny_model, max_concepts=3, eval_every=3, multi_pairs=0, progress=False,
                    log=lambda line: None)
    run = doc["runs"]["lora"]["seeds"]["0"]
    mmd = run["matrices"]["MMD"]
    assert mmd[1][0] is None and mmd[1][1] is not None  # sparse row: the new concept only
    assert all(v is not None for v in mmd[2]) and mmd[0][0] is not None
    assert run["config"]["eval_every"] == 3 and doc["settings"]["eval_every"] == 3
    s = run["summary"]
    assert s["A_MMD"] == pytest.approx(sum(mmd[2]) / 3)
    assert s["plasticity_MMD"] == pytest.approx((mmd[0][0] + mmd[1][1] + mmd[2][2]) / 3)
    assert s["forgetting_MMD"] == pytest.approx(((mmd[2][0] - mmd[0][0]) + (mmd[2][1] - mmd[1][1])) / 2)
    assert run["tasks"][1]["samples"][0] is None and run["tasks"][1]["samples"][1]
    assert (tmp_path / "sparse" / "report.md").is_file()
    # a rerun with full rows is another experiment: refused, not mixed in
    with pytest.raises(StateError, match="eval_every"):
        run_bench(tmp_path / "sparse", sequence="tabletop-3", methods=["lora"], quick=True, steps=2,
                  model=tiny_model, max_concepts=3, multi_pairs=0, progress=False, log=lambda line: None)


@pytest.mark.parametrize("args,needle", [
    (["--set", "ewc_lambda=abc"], "--set ewc_lambda=abc: ewc_lambda must be a number >= 0"),
    (["--sweep", "ewc_lambda=10,-1"], "--sweep ewc_lambda=-1"),
    (["--sweep", "dc_k=0"], "dc_k must be an integer >= 1"),
    (["--set", "dc_temperature=0"], "dc_temperature must be a number > 0"),
])
def test_a_bad_method_setting_is_one_line_and_writes_nothing(tmp_path, capsys, args, needle):
    from conftest import assert_one_line_error

    from conceptstream.cli import main

    out = tmp_path / "bench"
    assert main(["bench", "--out", str(out), "--methods", "lora,ewc-dc", "--quick", *args]) == 2
    assert needle in assert_one_line_error(capsys.readouterr().err)
    assert not out.exists()


def test_split_val_scores_the_val_views_and_elimination_is_recorded(tmp_path, tiny_model, monkeypatch):
    """--split val: generated images and the DC classification use val/ (2 views), never eval/ (3 views);
    --dc-elimination runs the final classification by successive elimination and says so."""
    from conceptstream.world.catalogue import get_sequence
    from conceptstream.world.folders import export_sequence

    export_sequence(list(get_sequence("tabletop-3"))[:2], tmp_path / "seq", train_views=2, eval_views=3,
                    val_views=2)
    doc = run_bench(tmp_path / "out", sequence=str(tmp_path / "seq"), methods=["lora"], quick=True, steps=1,
                    model=tiny_model, split="val", dc_elimination="1:2", progress=False, log=lambda line: None)
    run = doc["runs"]["lora"]["seeds"]["0"]
    assert run["dc"]["images"] == [2, 2]
    assert run["dc"]["elimination"] is not None and run["config"]["dc_elimination"] == "1:2"
    assert doc["settings"]["split"] == "val" and doc["settings"]["dc_eval"]["elimination"] == "1:2"
    assert [c["val_images"] for c in doc["settings"]["concepts"]] == [2, 2]

    # benchmarks/dc_elimination.py on that run's state: the schedule is chosen on val, reported on test
    from conftest import benchmark_script

    out = tmp_path / "elim.json"
    elim = benchmark_script("dc_elimination").main([
        "--state", str(tmp_path / "out" / "runs" / "lora-lora" / "seed0" / "state"), "--data", str(tmp_path / "seq"),
        "--draws", "2", "--schedule", "1:1", "--schedule", "1:3", "--choose-on", "val", "--out", str(out)])
    choice = elim["choice"]
    assert choice["split"] == "val" and choice["full"]["images"] == 4 and elim["full"]["images"] == 6
    assert [r["schedule"] for r in choice["schedules"]] == [[[1, 1]], [[1, 3]]]
    assert choice["chosen"] in ([[1, 1]], [[1, 3]]) and elim["elimination"]["schedule"] == choice["chosen"]
    assert elim["other_schedules"] == [] and elim["split"] == "test"
    assert elim["full"]["unet_evaluations"] == 6 * 4 * 2  # 2 concepts + 2 class prompts (2 nouns), 2 draws
    assert str(tmp_path) not in out.read_text() and elim["state"] == "lora-lora/seed0/state"

    # or: one full pass on val keeps every draw's errors (resumable: a rerun scores nothing), every schedule is
    # simulated from them, and dc_elimination.py takes its choice from that table
    state = str(tmp_path / "out" / "runs" / "lora-lora" / "seed0" / "state")
    draws_args = ["--state", state, "--data", str(tmp_path / "seq"), "--draws", "2", "--errors",
                  str(tmp_path / "draws.safetensors"), "--schedule", "1:1", "--schedule", "1:3"]
    sim = benchmark_script("dc_draws").main([*draws_args, "--out", str(tmp_path / "draws.json")])
    assert sim["split"] == "val" and sim["images"] == 4 and sim["candidates"] == 4 and len(sim["stratum_accuracy"]) == 2
    assert [(r["schedule"], r["order"]) for r in sim["rows"]] == [
        ("1:1", "bit-reversed"), ("1:1", "middle-out"), ("1:3", "bit-reversed"), ("1:3", "middle-out")]
    assert [r["evaluations_per_image"] for r in sim["rows"]] == [5, 5, 7, 7]  # 4 candidates x 1 draw + survivors
    assert sim["full_accuracy"] == pytest.approx(choice["full"]["accuracy"])  # the same draws as the full pass
    from conceptstream.scoring.dc import DiffusionClassifier
    with monkeypatch.context() as m:  # resumed: every concept's errors are in the file
        m.setattr(DiffusionClassifier, "errors", lambda *a, **k: pytest.fail("scored again"))
        assert benchmark_script("dc_draws").main(draws_args)["rows"] == sim["rows"]
    elim = benchmark_script("dc_elimination").main([
        "--state", state, "--data", str(tmp_path / "seq"), "--draws", "2", "--choose-from", str(tmp_path / "draws.json")])
    assert elim["choice"]["from"].startswith("benchmarks/dc_draws.py")
    assert elim["choice"]["chosen"] in ([[1, 1]], [[1, 3]]) and elim["elimination"]["schedule"] == elim["choice"]["chosen"]
    assert "--schedule" not in elim["command"] and "--choose-from" in elim["command"]
    with pytest.raises(SystemExit):  # another draw count than the simulation's
        benchmark_script("dc_elimination").main([
            "--state", state, "--data", str(tmp_path / "seq"), "--draws", "4", "--choose-from", str(tmp_path / "draws.json")])
    with pytest.raises(UserInputError, match="elimination"):
        run_bench(tmp_path / "bad", sequence=str(tmp_path / "seq"), methods=["lora"], quick=True,
                  model=tiny_model, dc_elimination="2:x", progress=False, log=lambda line: None)
    assert not (tmp_path / "bad").exists()
