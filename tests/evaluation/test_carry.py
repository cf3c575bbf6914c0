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
