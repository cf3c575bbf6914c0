"""Timing helpers shared by the measurements: interleaved medians, device sync, synthetic inputs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def sync(device: str) -> None:
    """Wait for queued CUDA work (a no-op on the CPU)."""
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], Any]], trials: int, device: str, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each callable; trials are interleaved (order rotated) so drift hits all alike."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for trial in range(trials):
        order = names[trial % len(names):] + names[: trial % len(names)]
        for name in order:
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {n: statistics.median(v) for n, v in times.items()}


def synthetic_images(n: int, seed: int, size: int = 64) -> list:
    """Deterministic blobby test images (speed does not depend on what they show)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        img = np.zeros((size, size, 3), np.float32) + rng.uniform(0.2, 0.8, 3)
        for _ in range(3):
            cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.25)
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
            img[mask] = rng.uniform(0, 1, 3)
        img += rng.normal(0, 0.03, img.shape)
        out.append(Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)))
    return out


def token(i: int) -> str:
    return f"<speed-{i}>"


def hparams_for(method: str, hparams: dict[str, Any]) -> dict[str, Any]:
    """The settings of ``hparams`` that ``method`` has."""
    from conceptstream.methods.registry import get_method

    known = get_method(method).all_defaults()
    return {k: v for k, v in hparams.items() if k in known}


def adapter_spec(kind: str):
    """An adapter of ``kind`` at its default rank."""
    from conceptstream.adapters.registry import AdapterSpec, adapter_default_rank

    return AdapterSpec(kind=kind, rank=adapter_default_rank(kind))
