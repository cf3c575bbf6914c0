"""The base model's training data: rendered base-class images with captions, cached in the work directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from conceptstream.safeio import write_json_atomic
from conceptstream.world.catalogue import BASE_CLASSES


def render_dataset(workdir: Path, images_per_class: int, seed: int, progress: bool = True):
    """Render (or load the cached) base-class training set: uint8 images and captions."""
    from tqdm.auto import tqdm

    from conceptstream.world.render import TabletopRenderer

    img_path, cap_path = workdir / "data" / "images.npy", workdir / "data" / "captions.json"
    if img_path.exists() and cap_path.exists():
        images = np.load(img_path, allow_pickle=False)
        captions = json.loads(cap_path.read_text())
        if len(captions) == images.shape[0] == images_per_class * len(BASE_CLASSES):
            return images, captions
    renderer = TabletopRenderer(64)
    images, captions = [], []
    total = images_per_class * len(BASE_CLASSES)
    with tqdm(total=total, desc="render base classes", disable=not progress) as bar:
        for cls in BASE_CLASSES:
            for i in range(images_per_class):
                r = renderer.render_class(cls, i, seed)
                images.append(np.asarray(r.image))
                captions.append(r.caption)
                bar.update()
    renderer.close()
    arr = np.stack(images)
    img_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = img_path.with_suffix(".tmp.npy")
    np.save(tmp, arr, allow_pickle=False)
    tmp.replace(img_path)
    write_json_atomic(cap_path, captions)
    return arr, captions


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` images -> float ``[N, 3, H, W]`` in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def draw_latents(lat_mean: torch.Tensor, lat_std: torch.Tensor, n: int, g: torch.Generator):
    """A seeded batch: random dataset indices and one posterior sample of each image's latent."""
    idx = torch.randint(0, len(lat_mean), (n,), generator=g)
    return idx, lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=g)
