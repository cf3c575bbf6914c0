"""C-LoRA: the locked sum of past deltas, its logs, and its reload."""

from __future__ import annotations

import math

import torch
from streams import commit, learn_folder, new_stream

from conceptstream import api
from conceptstream.methods.c_lora import lora_delta
from conceptstream.models.loading import load_pipeline


def test_clora_merged_weights_equal_base_plus_past_deltas(tmp_path, random_model_path, concept_dirs):
    stream = new_stream(random_model_path, "c-lora")
    reports = [learn_folder(stream, d, steps=3, seed=i) for i, d in enumerate(concept_dirs)]
    method = stream.method
    assert len(method.past) == 2  # tasks 1 and 2 are locked; task 3's LoRA is live
    w0 = dict(load_pipeline(str(random_model_path)).unet.named_parameters())
    assert method._modules
    for name, layer in method._modules.items():
        s = layer.scaling["default"]
        past = [lora_delta(entry, name, s) for entry in method.past]
        assert all(d.abs().sum() > 0 for d in past)
        torch.testing.assert_close(method.past_sum[name], past[0] + past[1], rtol=1e-6, atol=1e-9)
        merged = layer.base_layer.weight.detach()
        torch.testing.assert_close(merged, w0[f"{name}.weight"] + past[0] + past[1], rtol=1e-6, atol=1e-7)
    # logs: LoRA norm and L_forget every step; a fresh LoRA per task; no penalty without a past
    for rep in reports:
        steps = [e for e in rep.logs if "step" in e]
        assert len(steps) == 3 and all("lora_norm" in e and "l_forget" in e for e in steps)
        assert all(math.isfinite(e["lora_norm"]) and e["l_forget"] >= 0 for e in steps)
    assert all(e["l_forget"] == 0 for e in reports[0].logs)
    assert reports[1].logs[0]["lora_norm"] == 0.0  # the new LoRA starts at zero (B = 0)
    assert reports[2].logs[-1]["l_forget"] > 0 and reports[2].logs[-1]["lora_norm"] > 0
    # a reloaded stream rebuilds exactly the same merged weights
    commit(stream, tmp_path / "state")
    again = api.open_stream(tmp_path / "state")
    live, reloaded = stream.pipe.unet.state_dict(), again.pipe.unet.state_dict()
    assert all(torch.equal(live[k], reloaded[k]) for k in live)
