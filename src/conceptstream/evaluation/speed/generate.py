"""Measurement 3, generation: :meth:`ConceptStream.generate` relative to the bare base pipeline.

A learned stream per adapter kind, fused (the default; target <= ``GENERATE_TARGET``) and unfused,
against the base pipeline with the same prompt length, steps and seeds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from conceptstream.evaluation.speed.settings import GENERATE_TARGET, SpeedSettings
from conceptstream.evaluation.speed.timing import adapter_spec, interleaved, synthetic_images, token


def bench_generate(base_pipe, streams: dict[str, Any], s: SpeedSettings) -> dict[str, Any]:
    """ConceptStream.generate (fused / unfused adapter) vs the bare base pipeline, same work."""
    import torch

    n, steps, guidance = s.gen_images, s.gen_steps, s.gen_guidance
    base_pipe.set_progress_bar_config(disable=True)

    def base():
        gens = [torch.Generator().manual_seed(i) for i in range(n)]
        base_pipe(["a photo of a mug"] * n, num_inference_steps=steps, guidance_scale=guidance, generator=gens)

    fns: dict[str, Callable[[], Any]] = {"base": base}
    for kind, stream in streams.items():
        prompt = f"a photo of a {stream.tokens[0]} mug"  # same padded length (77) as the base prompt
        for fuse in (True, False):
            fns[f"{kind}-{'fused' if fuse else 'unfused'}"] = (
                lambda st=stream, p=prompt, f=fuse: st.generate(p, n=n, seed=0, steps=steps, guidance=guidance,
                                                                progress=False, fuse=f))
    med = interleaved(fns, s.trials, s.device)
    out: dict[str, Any] = {"images": n, "steps": steps, "guidance": guidance, "base_s": med["base"],
                           "target": GENERATE_TARGET}
    for kind in streams:
        fused, unfused = med[f"{kind}-fused"], med[f"{kind}-unfused"]
        out[kind] = {"fused_s": fused, "unfused_s": unfused, "fused_ratio": fused / med["base"],
                     "unfused_ratio": unfused / med["base"]}
    out["meets_target"] = all(out[k]["fused_ratio"] <= GENERATE_TARGET for k in streams)
    return out


def inference_streams(s: SpeedSettings) -> dict[str, Any]:
    """One learned single-concept stream per adapter kind (a few steps: sampling cost ignores values)."""
    from conceptstream.adapters.registry import adapter_kinds
    from conceptstream.engine import ConceptStream, StreamSettings

    streams = {}
    for kind in dict.fromkeys([s.adapter, *adapter_kinds()]):
        stream = ConceptStream.new(s.model, StreamSettings(method="lora", adapter=adapter_spec(kind)), device=s.device)
        stream.learn(synthetic_images(2, seed=7), token(0), "mug", steps=2, progress=False)
        streams[kind] = stream
    return streams
