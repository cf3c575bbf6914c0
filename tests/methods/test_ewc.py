"""EWC: the Fisher estimate and the penalty."""

from __future__ import annotations

import pytest
import torch
from streams import learn_folder, new_stream

from conceptstream.adapters.registry import adapter_parameters
from conceptstream.methods.ewc import dc_log_likelihood, denoise_log_likelihood, estimate_fisher


def test_fisher_is_nonnegative_over_adapter_params_and_penalty_is_zero_at_anchor(random_model_path, concept_dirs):
    stream = new_stream(random_model_path, "ewc-dc", fisher_passes=1)
    captured = {}
    original_after = stream.method.after_task

    def after(ctx):
        captured["ctx"] = ctx
        original_after(ctx)

    stream.method.after_task = after
    learn_folder(stream, concept_dirs[0], steps=3)
    unet, ctx = stream.pipe.unet, captured["ctx"]
    params = adapter_parameters(unet)
    for ll in (dc_log_likelihood(ctx, 5), denoise_log_likelihood(ctx)):
        fisher = estimate_fisher(ctx, ll, passes=1)
        assert fisher.keys() == params.keys()
        for n, f in fisher.items():
            assert f.shape == params[n].shape and torch.isfinite(f).all() and (f >= 0).all(), n
        assert sum(float(f.sum()) for f in fisher.values()) > 0
    ewc = stream.method.ewc
    assert ewc.fisher.keys() == params.keys() == ewc.anchor.keys()
    assert all((f >= 0).all() for f in ewc.fisher.values())
    flat = torch.cat([f.flatten() for f in ewc.fisher.values()])
    assert flat.mean().item() == pytest.approx(1.0, rel=1e-4)  # fisher_norm: each task's Fisher has mean 1

    lam = 3.0
    assert ewc.penalty(unet, lam).item() == 0.0
    name, p = next((n, q) for n, q in params.items() if ".lora_B." in n)
    with torch.no_grad():
        p.add_(0.05)
    try:
        pen = ewc.penalty(unet, lam)
        assert pen.item() > 0
        expected = 0.5 * lam * (ewc.fisher[name] * (p.detach() - ewc.anchor[name]).pow(2)).sum()
        torch.testing.assert_close(pen.detach(), expected, rtol=1e-4, atol=0)
        pen.backward()
        assert p.grad is not None and (p.grad * 0.05 >= 0).all()  # the penalty pulls back toward the anchor
    finally:
        with torch.no_grad():
            p.sub_(0.05)
        p.grad = None
    assert ewc.penalty(unet, lam).item() == pytest.approx(0.0, abs=1e-12)
