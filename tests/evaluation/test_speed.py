"""bench-speed smoke test and the fused-adapter sampling path of ConceptStream.generate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_cli

from conceptstream.adapters.fuse import fused_adapters
from conceptstream.adapters.registry import AdapterSpec, adapter_parameters, trainable_values
from conceptstream.engine import ConceptStream, StreamSettings
from conceptstream.errors import UserInputError
from conceptstream.evaluation.speed import format_table, parse_variant, split_methods, synthetic_images


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and x > 0 and np.isfinite(x)


def test_bench_speed_quick_writes_json(random_model_path, tmp_path):
    out = tmp_path / "results"
    proc = run_cli("bench-speed", "--quick", "--methods", "lora,dsc-ewc-dc", "--model", str(random_model_path),
                   "--out", str(out), "--machine", "ci", "--json", "--timed-tasks", "3", timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = out / "speed-ci-quick.json"
    data = json.loads(path.read_text())
    assert json.loads(proc.stdout)["training"].keys() == data["training"].keys()
    assert data["format"] == "conceptstream-speed"
    for key in ("cpu_model", "cpu_usable", "torch_threads", "loadavg_start", "name"):
        assert key in data["machine"]
    # CPU time of *other* processes, in cores: the bench's own workers are not counted
    assert 0.0 <= data["machine"]["other_cpu_cores"] <= data["machine"]["cpu_usable"]
    assert {"torch", "diffusers", "transformers", "peft", "conceptstream"} <= set(data["versions"])
    assert data["settings"]["quick"] and data["settings"]["steps"] >= 1 and data["settings"]["timed_tasks"] == 3

    training = data["training"]
    assert set(training) == {"lora", "dsc-ewc-dc"}
    assert training["lora"]["wall_ratio"] == pytest.approx(1.0)
    for entry in training.values():
        assert len(entry["tasks"]) == 3
        for task in entry["tasks"]:
            assert _positive(task["wall_s"]) and _positive(task["peak_rss_mb"]) and task["state_bytes"] > 0
        for key in ("wall_ratio", "train_ratio", "peak_rss_ratio"):
            assert _positive(entry[key]), (key, entry)

    dc = data["dc"]
    assert _positive(dc["errors_ratio"]) and _positive(dc["eval_errors_ratio"])
    assert all(_positive(v) for v in dc["evals_per_s"].values())
    gen = data["generate"]
    assert _positive(gen["base_s"])
    for kind in ("lora", "vera"):
        assert _positive(gen[kind]["fused_ratio"]) and _positive(gen[kind]["unfused_ratio"])
    for method, sizes in data["state_size"].items():
        assert all(sizes[str(n)] > 0 for n in data["settings"]["size_tasks"]), method
    # DSC keeps one adapter per task: its state grows; lora's does not (beyond a token row)
    assert data["state_size"]["dsc-ewc-dc"]["2"] > data["state_size"]["dsc-ewc-dc"]["1"]
    assert "| lora |" in format_table(data)


def test_method_variants_parse_and_errors():
    assert split_methods("lora, ewc-dc[dc_k=2,dc_batch=1],dsc") == ["lora", "ewc-dc[dc_k=2,dc_batch=1]", "dsc"]
    assert parse_variant("ewc-dc[dc_k=2,dc_batch=1]") == ("ewc-dc", {"dc_k": 2, "dc_batch": 1})
    assert parse_variant("lora") == ("lora", {})
    for bad, needle in (("ewc-dcx", "unknown method"), ("lora[dc_k=2]", "no setting 'dc_k'"),
                        ("ewc-dc[dc_k=]", "no value")):
        with pytest.raises(UserInputError, match=needle):
            parse_variant(bad)


def test_bench_speed_times_variants_with_their_settings(random_model_path, tmp_path):
    """A variant's settings reach its stream; --parts training skips the other measurements."""
    out = tmp_path / "results"
    proc = run_cli("bench-speed", "--quick", "--methods", "ewc-dc[dc_k=1,fisher_passes=1]", "--parts", "training",
                   "--model", str(random_model_path), "--out", str(out), "--machine", "ci", "--label", "levers",
                   "--json", "--timed-tasks", "1", timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "speed-ci-levers-quick.json").read_text())
    assert list(data["training"]) == ["lora", "ewc-dc[dc_k=1,fisher_passes=1]"]
    assert data["parts"] == ["training"] and "dc" not in data and data["state_size"] == {}
    variant = data["training"]["ewc-dc[dc_k=1,fisher_passes=1]"]
    assert _positive(variant["wall_ratio"])
    assert variant["tasks"][0]["hyperparameters"]["dc_k"] == 1
    assert variant["tasks"][0]["hyperparameters"]["fisher_passes"] == 1
    assert data["training"]["lora"]["tasks"][0]["hyperparameters"].get("dc_k") is None
    assert "| ewc-dc[dc_k=1,fisher_passes=1] |" in format_table(data)
    bad = run_cli("bench-speed", "--quick", "--methods", "lora[dc_k=2]", "--out", str(out))
    assert bad.returncode == 2 and "no setting 'dc_k'" in bad.stderr


def _learned_stream(model, kind: str) -> ConceptStream:
    spec = AdapterSpec(kind=kind, rank=4 if kind == "lora" else 32)
    stream = ConceptStream.new(str(model), StreamSettings(method="lora", adapter=spec))
    stream.learn(synthetic_images(2, seed=0), "<a>", "mug", steps=1, progress=False)
    with torch.no_grad():  # a clearly non-zero adapter, so fusing has something to get right
        g = torch.Generator().manual_seed(1)
        for p in adapter_parameters(stream.pipe.unet).values():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return stream


@pytest.mark.parametrize("kind", ["lora", "vera"])
def test_fused_generate_matches_unfused_and_restores_weights(random_model_path, kind):
    from peft.tuners.tuners_utils import BaseTunerLayer

    stream = _learned_stream(random_model_path, kind)
    unet = stream.pipe.unet
    before = {n: t.detach().clone() for n, t in unet.state_dict().items()}
    storage = {n: p.data_ptr() for n, p in unet.named_parameters()}
    adapters = trainable_values(unet)

    with fused_adapters(unet):
        layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
        assert layers and all(m.merged for m in layers)
    assert not any(m.merged for m in layers)

    kw = dict(n=2, seed=3, steps=4, progress=False)
    fused = stream.generate("a photo of a <a> mug", fuse=True, **kw)
    unfused = stream.generate("a photo of a <a> mug", fuse=False, **kw)
    for a, b in zip(fused, unfused):
        diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
        assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())

    after = unet.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before), "base or adapter weights changed"
    assert all(p.data_ptr() == storage[n] for n, p in unet.named_parameters()), "parameter storage was swapped"
    assert all(torch.equal(adapters[n], v) for n, v in trainable_values(unet).items())
    assert not any(m.merged for m in unet.modules() if isinstance(m, BaseTunerLayer))


def test_training_after_generate_is_unaffected(random_model_path):
    a, b = _learned_stream(random_model_path, "lora"), _learned_stream(random_model_path, "lora")
    a.generate("a photo of a <a> mug", n=1, steps=2, progress=False)
    for stream in (a, b):
        stream.learn(synthetic_images(2, seed=5), "<b>", "bowl", steps=2, seed=1, progress=False)
    va, vb = trainable_values(a.pipe.unet), trainable_values(b.pipe.unet)
    assert all(torch.equal(va[n], vb[n]) for n in va)
    ua, ub = a.pipe.unet.state_dict(), b.pipe.unet.state_dict()
    assert all(torch.equal(ua[n], ub[n]) for n in ua)
