"""The base model's training data: rendered base-class images with captions, cached in the work directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from conceptstream.safeio import write_json_atomic
from conceptstream.world.catalogue import BASE_CLASSES


def render_dataset(workdir: Path, images_per_class: int, seed: int, progress: bool = True, workers: int = 1):
    """Render (or load the cached) base-class training set: uint8 images and captions.

    ``workers`` > 1 renders in that many processes; every render is a pure function of (class,
    index, seed), so the result is the same bit for bit."""
    jobs = [(c, i, seed) for c in range(len(BASE_CLASSES)) for i in range(images_per_class)]
    return _cached_captioned(workdir / "data" / "images.npy", workdir / "data" / "captions.json", _class_render, jobs,
                             workers, "render base classes", progress)


def _cached_captioned(img_path: Path, cap_path: Path, fn, jobs: list, workers: int, desc: str,
                      progress: bool) -> tuple[np.ndarray, list[str]]:
    """``fn(job) -> (image, caption)`` for every job, cached as ``img_path`` and ``cap_path`` (a cache of
    another length is rendered again)."""
    if img_path.exists() and cap_path.exists():
        images = np.load(img_path, allow_pickle=False)
        captions = json.loads(cap_path.read_text())
        if len(captions) == images.shape[0] == len(jobs):
            return images, captions
    rendered = _render_all(fn, jobs, workers, desc, progress)
    images = np.stack([image for image, _ in rendered]) if jobs else np.zeros((0, 64, 64, 3), np.uint8)
    _save_npy(img_path, images)
    write_json_atomic(cap_path, [caption for _, caption in rendered])
    return images, [caption for _, caption in rendered]


# -- rendering in worker processes ---------------------------------------------------------------
# One renderer (a pybullet connection) and one copy of the pictures per process, made on first use.
_PROCESS: dict = {}


def _renderer():
    from conceptstream.world.render import TabletopRenderer

    if "renderer" not in _PROCESS:
        _PROCESS["renderer"] = TabletopRenderer(64)
    return _PROCESS["renderer"]


def _class_render(job: tuple[int, int, int]) -> tuple[np.ndarray, str]:
    c, i, seed = job
    r = _renderer().render_class(BASE_CLASSES[c], i, seed)
    return np.asarray(r.image), r.caption


def _render_all(fn, jobs: list, workers: int, desc: str, progress: bool) -> list:
    """``[fn(job) for job in jobs]``, in ``workers`` spawned processes when > 1, with a progress bar."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc=desc, disable=not progress)
    try:
        if workers <= 1:
            out = []
            for job in jobs:
                out.append(fn(job))
                bar.update()
            return out
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            out = []
            for result in pool.map(fn, jobs, chunksize=max(1, min(64, len(jobs) // (4 * workers)))):
                out.append(result)
                bar.update()
            return out
    finally:
        bar.close()
        _PROCESS.pop("pictures", None)
        renderer = _PROCESS.pop("renderer", None)
        if renderer is not None:
            renderer.close()


def _save_npy(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, arr, allow_pickle=False)
    tmp.replace(path)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` images -> float ``[N, 3, H, W]`` in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def draw_latents(lat_mean: torch.Tensor, lat_std: torch.Tensor, n: int, g: torch.Generator):
    """A seeded batch: random dataset indices and one posterior sample of each image's latent."""
    idx = torch.randint(0, len(lat_mean), (n,), generator=g)
    return idx, lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=g)


# -- generic autoencoder data: textures and patterns, never a personal concept ---------------------

GENERIC_PATTERNS = ("stripes", "checks", "dots", "zigzag", "halves", "rings", "noise")
# scikit-image's bundled pictures (no download): photos and textures, cropped at random scales
SKIMAGE_PICTURES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "immunohistochemistry",
                    "colorwheel", "logo", "brick", "grass", "gravel", "camera", "text", "page", "coins", "moon",
                    "horse", "cell", "clock", "microaneurysms")


def _named_colour(rgb: np.ndarray) -> str:
    """The catalogue colour name nearest to an RGB triple in [0, 1]."""
    from conceptstream.world.catalogue import COLOURS

    names = list(COLOURS)
    d = ((np.asarray([COLOURS[n] for n in names]) - rgb[None]) ** 2).sum(1)
    return names[int(d.argmin())]


def is_concept_look(class_key: str | None, pattern: str, colours: tuple[np.ndarray, ...]) -> bool:
    """True when (class, pattern, colour pair) could describe a personal concept of the catalogue:
    the pattern is one of a concept's with the same class (any class when ``class_key`` is None, as
    for a whole-image pattern) and the colours' nearest catalogue names are the concept's pair."""
    from conceptstream.world.catalogue import CONCEPTS

    names = frozenset(_named_colour(np.asarray(c)) for c in colours)
    return any(c.pattern == pattern and frozenset(c.colours) == names and class_key in (None, c.class_key)
               for c in CONCEPTS)


def procedural_pattern(rng: np.random.Generator, size: int = 64, class_key: str | None = None) -> np.ndarray:
    """A random two- or three-colour pattern (any orientation, frequency and colours), uint8 ``[size, size, 3]``.

    Colour pairs are redrawn while :func:`is_concept_look` holds, so the result is never a catalogue
    concept's look (its pattern in its colours, on its class)."""
    kind = GENERIC_PATTERNS[int(rng.integers(len(GENERIC_PATTERNS)))]
    while True:
        colours = rng.uniform(0, 1, size=(3, 3))
        if not is_concept_look(class_key, kind, (colours[0], colours[1])):
            break
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    angle = rng.uniform(0, np.pi)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    f = rng.uniform(1.5, 10.0)
    phase = rng.uniform(0, 1, size=2)
    if kind == "stripes":
        mask = (u * f + phase[0]) % 1 < rng.uniform(0.3, 0.7)
    elif kind == "checks":
        mask = (np.floor(u * f + phase[0]) + np.floor(v * f + phase[1])) % 2 == 0
    elif kind == "dots":
        r = rng.uniform(0.15, 0.4)
        mask = ((u * f + phase[0]) % 1 - 0.5) ** 2 + ((v * f + phase[1]) % 1 - 0.5) ** 2 > r * r
    elif kind == "zigzag":
        mask = ((v * f / 2 + np.abs((u * f + phase[0]) % 2 - 1) * rng.uniform(0.5, 2)) % 1) < 0.5
    elif kind == "halves":
        mask = u < rng.uniform(-0.3, 0.3)
    elif kind == "rings":
        mask = (np.hypot(u - phase[0] + 0.5, v - phase[1] + 0.5) * f) % 1 < 0.5
    else:  # blocky noise
        cells = int(rng.integers(2, 12))
        mask = _nearest_upscale(rng.uniform(0, 1, (cells, cells)) < 0.5, size)
    out = np.where(mask[..., None], colours[0], colours[1])
    if rng.random() < 0.3:  # a third colour in a random region
        region = (u * rng.uniform(-2, 2) + v * rng.uniform(-2, 2)) > rng.uniform(-0.5, 0.5)
        out = np.where((region & mask)[..., None], colours[2], out)
    return (out * 255).round().astype(np.uint8)


def _nearest_upscale(mask: np.ndarray, size: int) -> np.ndarray:
    reps = -(-size // mask.shape[0])
    return np.kron(mask, np.ones((reps, reps), bool))[:size, :size]


def _skimage_picture(name: str) -> np.ndarray:
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.dtype != np.uint8:
        img = (255 * (img.astype(np.float64) - img.min()) / max(1e-9, float(img.max() - img.min()))).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return img[..., :3]


def picture_crop(rng: np.random.Generator, pictures: list[np.ndarray], size: int = 64) -> np.ndarray:
    """A random crop of a scikit-image picture at a random scale, flip, channel order and (for grey) tint."""
    from PIL import Image

    img = pictures[int(rng.integers(len(pictures)))]
    h, w = img.shape[:2]
    side = int(rng.integers(max(16, min(h, w) // 16), min(h, w) + 1))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = np.asarray(Image.fromarray(img[y:y + side, x:x + side]).resize((size, size), Image.Resampling.LANCZOS))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    crop = crop[..., rng.permutation(3)]
    if (img[..., 0] == img[..., 1]).all():
        crop = np.clip(crop * rng.uniform(0.3, 1.0, size=3), 0, 255)
    return np.ascontiguousarray(crop).astype(np.uint8)


def generic_dataset(workdir: Path, n: int, seed: int, progress: bool = True, workers: int = 1) -> np.ndarray:
    """``n`` generic 64x64 images for the autoencoder, cached in the work directory: a third whole-image
    patterns (:func:`procedural_pattern`), a third scikit-image photo/texture crops, a third base-class
    objects painted with a procedural pattern on the world's backgrounds. None is a personal concept:
    patterned objects never take a catalogue concept's (class, pattern, colour pair) look. ``workers``
    as in :func:`render_dataset` (the same images)."""
    path = workdir / "data" / f"generic-{n}-seed{seed}.npy"
    if path.exists():
        return np.load(path, allow_pickle=False)
    out = np.stack(_render_all(_generic_image, [(i, seed) for i in range(n)], workers, "generic VAE images",
                               progress)) if n else np.zeros((0, 64, 64, 3), np.uint8)
    _save_npy(path, out)
    return out


def _generic_image(job: tuple[int, int]) -> np.ndarray:
    from conceptstream.world.render import stable_rng

    i, seed = job
    rng = stable_rng("generic", seed, i)
    kind = i % 3
    if kind == 0:
        return procedural_pattern(rng)
    if kind == 1:
        if "pictures" not in _PROCESS:
            _PROCESS["pictures"] = [_skimage_picture(name) for name in SKIMAGE_PICTURES]
        return picture_crop(rng, _PROCESS["pictures"])
    cls = BASE_CLASSES[int(rng.integers(len(BASE_CLASSES)))]
    texture = procedural_pattern(rng, 128, class_key=cls.key)
    stretch = tuple(float(s) for s in rng.uniform(0.8, 1.3, size=3))
    return np.asarray(_renderer().render_textured(cls, texture, i, seed, stretch=stretch))


# -- patterned objects with pattern captions, for the UNet: never a personal concept's look --------

def pattern_dataset(workdir: Path, n: int, seed: int, progress: bool = True,
                    workers: int = 1) -> tuple[np.ndarray, list[str]]:
    """``n`` renders of base-class objects painted in a concept pattern and two catalogue colours,
    captioned with both (``TabletopRenderer.render_patterned``), cached in the work directory.

    Each draws a class, a pattern and an ordered pair of distinct colours, redrawn while
    :func:`is_concept_look` holds, and a random stretch; so no image shows a personal concept (its
    class in its pattern and colour pair), while every pattern, colour pair and class appears in other
    combinations: a concept becomes a new combination of attributes the model knows, as a user's object
    is for Stable Diffusion. ``workers`` as in :func:`render_dataset` (the same images)."""
    img_path = workdir / "data" / f"patterned-{n}-seed{seed}.npy"
    return _cached_captioned(img_path, img_path.with_suffix(".json"), _patterned_render, [(i, seed) for i in range(n)],
                             workers, "render patterned objects", progress)


def patterned_look(i: int, seed: int) -> tuple:
    """The (class, pattern, colour pair, stretch) of the i-th patterned render: never a concept's look."""
    from conceptstream.world.catalogue import COLOURS, PATTERNS
    from conceptstream.world.render import stable_rng

    rng = stable_rng("patterned-look", seed, i)
    names = list(COLOURS)
    while True:
        cls = BASE_CLASSES[int(rng.integers(len(BASE_CLASSES)))]
        pattern = PATTERNS[int(rng.integers(len(PATTERNS)))]
        a, b = rng.choice(len(names), size=2, replace=False)
        pair = (names[int(a)], names[int(b)])
        if not is_concept_look(cls.key, pattern, tuple(np.asarray(COLOURS[c]) for c in pair)):
            break
    stretch = tuple(float(x) for x in rng.uniform(0.8, 1.3, size=3))
    return cls, pattern, pair, stretch


def _patterned_render(job: tuple[int, int]) -> tuple[np.ndarray, str]:
    i, seed = job
    cls, pattern, pair, stretch = patterned_look(i, seed)
    r = _renderer().render_patterned(cls, pattern, pair, i, seed, stretch=stretch)
    return np.asarray(r.image), r.caption
