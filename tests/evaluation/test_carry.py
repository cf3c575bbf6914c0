"""benchmarks/carry.py: a campaign's finished runs survive a lost work dir, and only what a bench needs travels."""

import json
from pathlib import Path

import pytest
from conftest import benchmark_script


@pytest.fixture(scope="module")
def carry():
    return benchmark_script("carry")


def _run(folder: Path, finished: bool = True) -> None:
    """A bench run's folder: its state, logs and samples, and its result.json once finished."""
    (folder / "state").mkdir(parents=True)
    (folder / "state" / "adapter.safetensors").write_bytes(b"weights")
    (folder / "samples").mkdir()
    (folder / "samples" / "task000_concept000.png").write_bytes(b"png")
    (folder / "multi").mkdir()
    (folder / "multi" / "pair000-001.png").write_bytes(b"png")
    (folder / "progress.json").write_text("{}")
    if finished:
        (folder / "result.json").write_text(json.dumps({"config": {"seed": folder.name}}))


def test_save_carries_finished_runs_and_the_first_seeds_samples_only(carry, tmp_path):
    out, kept = tmp_path / "bench", tmp_path / "carried"
    _run(out / "v2-t6.shards" / "1" / "runs" / "lora-lora" / "seed0")
    _run(out / "v2-t6.shards" / "2" / "runs" / "lora-lora" / "seed1")
    _run(out / "v2-t6.shards" / "2" / "runs" / "lora-lora" / "seed3", finished=False)  # cut off: restarts
    _run(out / "tuning" / "dsc" / "runs" / "dsc-lora" / "seed0")
    _run(out / "v2-t6" / "runs" / "lora-lora" / "seed0")  # the merge of v2-t6.shards: redone from them
    assert carry.main(["save", str(out), str(kept), "--images"]) == 0
    got = sorted(str(p.relative_to(kept)) for p in kept.rglob("*") if p.is_file())
    assert got == ["tuning/dsc/runs/dsc-lora/seed0/result.json",  # a tuning bench's images are never published
                   "v2-t6.shards/1/runs/lora-lora/seed0/multi/pair000-001.png",
                   "v2-t6.shards/1/runs/lora-lora/seed0/result.json",
                   "v2-t6.shards/1/runs/lora-lora/seed0/samples/task000_concept000.png",
                   "v2-t6.shards/2/runs/lora-lora/seed1/result.json"]


def test_restore_fills_a_new_work_dir_and_never_overwrites(carry, tmp_path, capsys):
    out, kept, fresh = tmp_path / "bench", tmp_path / "carried", tmp_path / "fresh"
    _run(out / "tuning" / "dsc" / "runs" / "dsc-lora" / "seed0")
    _run(out / "tuning" / "dsc" / "runs" / "dsc-lora" / "seed1")
    carry.main(["save", str(out), str(kept)])
    newer = fresh / "tuning" / "dsc" / "runs" / "dsc-lora" / "seed1" / "result.json"
    newer.parent.mkdir(parents=True)
    newer.write_text('{"config": "recomputed"}')
    assert carry.main(["restore", str(kept), str(fresh)]) == 0
    assert json.loads((fresh / "tuning/dsc/runs/dsc-lora/seed0/result.json").read_text()) == {"config": {"seed": "seed0"}}
    assert newer.read_text() == '{"config": "recomputed"}'
    out = capsys.readouterr().out
    assert "2 finished run(s)" in out and "wrote 1 file(s)" in out
    assert not list(fresh.rglob("*.part"))
    assert carry.main(["restore", str(tmp_path / "none"), str(fresh)]) == 0  # nothing carried yet: not an error
    with pytest.raises(SystemExit):
        carry.main(["save", str(tmp_path / "none"), str(kept)])
    # a run deleted and recomputed in the campaign folder (say, under new settings) replaces its carried copy
    (fresh / "tuning/dsc/runs/dsc-lora/seed0/result.json").write_text('{"config": "new settings"}')
    assert carry.main(["save", str(fresh), str(kept)]) == 0
    assert (kept / "tuning/dsc/runs/dsc-lora/seed0/result.json").read_text() == '{"config": "new settings"}'
    assert "wrote 2 file(s)" in capsys.readouterr().out  # seed1 differs from the carried copy too


def _state(path: Path, n: int) -> None:
    """A real state of ``n`` concepts (one commit per concept, as a run's tasks make)."""
    import torch

    from conceptstream.state import StateStore

    store = StateStore(path)
    for k in range(1, n + 1):
        manifest = {"format_version": 1, "base_model": {"reference": "tiny", "fingerprint": "f00d"},
                    "method": {"name": "lora", "adapter": {"kind": "lora", "rank": 4}, "hyperparameters": {}},
                    "concepts": [{"token": f"<c{i}>", "noun": "dog", "task_index": i, "steps": 10, "seed": i,
                                  "created_at": "2026-12-06T00:00:00+00:00"} for i in range(k)],
                    "created_at": "2026-12-06T00:00:00+00:00", "updated_at": "2026-12-06T00:00:00+00:00",
                    "versions": {"conceptstream": "0.1.0"}}
        with store.lock():
            store.commit(manifest, {"tokens": {f"<c{i}>": torch.full((8,), float(i)) for i in range(k)},
                                    "adapter": {"w": torch.full((4, 4), float(k))}})


def _unfinished(run: Path, tasks: int) -> None:
    """A run cut off after ``tasks`` evaluated tasks: progress, logs, samples, its state, a lock and a checkpoint."""
    _state(run / "state", tasks)
    (run / "state" / "checkpoint").mkdir(exist_ok=True)
    (run / "state" / "checkpoint" / "checkpoint.json").write_text("{}")
    for i in range(tasks):
        (run / "logs").mkdir(exist_ok=True)
        (run / "logs" / f"task{i:03d}.json").write_text("[]")
        (run / "samples").mkdir(exist_ok=True)
        (run / "samples" / f"task{i:03d}_concept000.png").write_bytes(b"png")
    (run / "progress.json").write_text(json.dumps({"tasks": list(range(tasks))}))


def test_an_unfinished_run_travels_with_its_state_and_resumes_in_a_new_work_dir(carry, tmp_path, capsys):
    from conceptstream.state import StateStore

    out, kept, fresh = tmp_path / "bench", tmp_path / "carried", tmp_path / "fresh"
    rel = Path("v2-t50.shards/1/runs/ewc-dc-lora/seed0")
    _unfinished(out / rel, 3)
    _unfinished(out / "v2-t50.shards/1/runs/ewc-dc-lora/seed1", 2)
    assert carry.main(["save", str(out), str(kept), "--images"]) == 0  # without --partial: nothing unfinished
    assert not kept.exists() or not list(kept.rglob("*.json"))
    assert carry.main(["save", str(out), str(kept), "--images", "--partial"]) == 0
    assert "2 unfinished run(s), 2 snapshot(s) taken" in capsys.readouterr().out
    generation = (out / rel / "state" / "CURRENT").read_text().strip()
    got = sorted(str(p.relative_to(kept / rel)) for p in (kept / rel).rglob("*") if p.is_file())
    assert got == ["logs/task000.json", "logs/task001.json", "logs/task002.json", "progress.json",
                   "samples/task000_concept000.png", "samples/task001_concept000.png", "samples/task002_concept000.png",
                   "state/CURRENT", *(f"state/{generation}/{f}" for f in
                                      ("adapter.safetensors", "manifest.json", "tokens.safetensors"))]
    assert not list((kept / "v2-t50.shards/1/runs/ewc-dc-lora/seed1").glob("samples"))  # only the first seed's
    assert carry.main(["save", str(out), str(kept), "--partial"]) == 0
    assert "0 snapshot(s) taken" in capsys.readouterr().out  # nothing moved: nothing copied
    (out / rel / "dc_partial.safetensors").write_bytes(b"concept 0 classified")  # the final DC evaluation began
    assert carry.main(["save", str(out), str(kept), "--partial"]) == 0
    assert "1 snapshot(s) taken" in capsys.readouterr().out
    assert (kept / rel / "dc_partial.safetensors").read_bytes() == b"concept 0 classified"

    # a new work dir gets the run back whole; the state opens at the task it had reached
    assert carry.main(["restore", str(kept), str(fresh)]) == 0
    assert "2 unfinished run(s) restored" in capsys.readouterr().out
    store = StateStore(fresh / rel / "state")
    assert [c["token"] for c in store.read_manifest()["concepts"]] == ["<c0>", "<c1>", "<c2>"]
    assert float(store.load_tensors("adapter")["w"][0, 0]) == 3.0
    assert json.loads((fresh / rel / "progress.json").read_text()) == {"tasks": [0, 1, 2]}
    assert (fresh / rel / "dc_partial.safetensors").read_bytes() == b"concept 0 classified"

    # a work dir with its own progress of the run keeps it, and gets none of the carried files
    own = tmp_path / "own"
    (own / rel).mkdir(parents=True)
    (own / rel / "progress.json").write_text('{"tasks": [0, 1, 2, 3]}')
    assert carry.main(["restore", str(kept), str(own)]) == 0
    assert "1 left to the work dir's own progress" in capsys.readouterr().out
    assert sorted(p.name for p in (own / rel).rglob("*")) == ["progress.json"]

    # the run moves on: the snapshot is replaced whole (the old generation goes); once finished, only its result stays
    _unfinished(out / rel, 4)
    assert carry.main(["save", str(out), str(kept), "--partial"]) == 0
    assert sorted(p.name for p in (kept / rel / "state").iterdir()) == sorted(
        ["CURRENT", (out / rel / "state" / "CURRENT").read_text().strip()])
    (out / rel / "result.json").write_text('{"config": "done"}')
    assert carry.main(["save", str(out), str(kept), "--partial"]) == 0
    assert sorted(str(p.relative_to(kept / rel)) for p in (kept / rel).rglob("*")) == ["result.json"]


def test_a_snapshot_is_taken_again_when_the_run_moves_on_while_it_is_copied(carry, tmp_path, monkeypatch):
    out, kept = tmp_path / "bench", tmp_path / "carried"
    run = out / "t50" / "runs" / "lora-lora" / "seed0"
    _unfinished(run, 2)
    listed = carry.snapshot_files
    calls = []

    def moving(r, samples):
        files = listed(r, samples)
        if not calls:  # the run evaluates a task between the listing and the check
            (run / "progress.json").write_text(json.dumps({"tasks": [0, 1, "new"]}))
        calls.append(r)
        return files

    monkeypatch.setattr(carry, "snapshot_files", moving)
    assert carry.main(["save", str(out), str(kept), "--partial"]) == 0
    assert len(calls) == 2
    assert json.loads((kept / "t50/runs/lora-lora/seed0/progress.json").read_text()) == {"tasks": [0, 1, "new"]}
    assert not list(kept.rglob("*.part"))
