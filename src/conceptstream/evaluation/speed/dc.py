"""Measurement 2, DC scoring: throughput of :class:`DiffusionClassifier` relative to a raw UNet forward.

Image x candidate x timestep evaluations per second of ``errors`` / ``eval_errors`` with cached text
embeddings, against the UNet alone on the same (images x candidates) batch (target >= ``DC_TARGET``).
"""

from __future__ import annotations

from typing import Any

from conceptstream.evaluation.speed.settings import DC_TARGET, NOUNS, SpeedSettings
from conceptstream.evaluation.speed.timing import interleaved


def bench_dc(stream, s: SpeedSettings) -> dict[str, Any]:
    """DiffusionClassifier.errors / eval_errors vs a raw UNet forward on the same (B*K) batch."""
    import torch

    from conceptstream.models.conditioning import per_image_candidates, unet_forward

    unet, dc, dev = stream.pipe.unet, stream.dc, stream.device
    b, k, n_t = s.dc_images, s.dc_candidates, s.dc_timesteps
    cfg = unet.config
    g = torch.Generator().manual_seed(0)
    shape = (b, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    latents = torch.randn(shape, generator=g).to(dev, unet.dtype)
    prompts = [f"a photo of a {NOUNS[i % len(NOUNS)]}" for i in range(k)]
    with torch.no_grad():  # cached candidate embeddings, as callers do for fixed prompts
        cond = stream.encode_prompts(prompts).to(unet.dtype)  # SDXL: with pooled embeds and time ids
    draws = [(torch.randint(0, dc.num_train_timesteps, (b,), generator=g).to(dev),
              torch.randn(shape, generator=g).to(dev, unet.dtype)) for _ in range(n_t)]
    raw_inputs = [(dc.noisy(latents, t, e).repeat_interleave(k, 0), t.repeat_interleave(k, 0),
                   per_image_candidates(cond, b).contiguous())
                  for t, e in draws]
    dc_eval = dc.config.eval_timesteps
    dc.config.eval_timesteps = n_t

    @torch.no_grad()
    def raw():
        for x, t, h in raw_inputs:
            unet_forward(unet, x, t, h)

    @torch.no_grad()
    def errors():
        for t, e in draws:
            dc.errors(latents, cond, t, e)

    def eval_errors():
        dc.eval_errors(latents, cond, seed=0)

    unet.eval()
    try:
        med = interleaved({"raw": raw, "errors": errors, "eval_errors": eval_errors}, s.trials, str(dev))
    finally:
        dc.config.eval_timesteps = dc_eval
    evals = b * k * n_t
    out = {"images": b, "candidates": k, "timesteps": n_t, "unet_batch": b * k,
           "seconds": med, "evals_per_s": {n: evals / v for n, v in med.items()},
           "errors_ratio": med["raw"] / med["errors"], "eval_errors_ratio": med["raw"] / med["eval_errors"],
           "target": DC_TARGET}
    out["meets_target"] = min(out["errors_ratio"], out["eval_errors_ratio"]) >= DC_TARGET
    return out
