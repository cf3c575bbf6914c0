"""Deterministic, seeded renders of the tabletop world from the real meshes in ``pybullet_data``.

Every image is a pure function of (seed, what, index): the same call gives the same pixels on
any machine with the same pybullet build. Objects are rendered with pybullet's CPU TinyRenderer
and composited over photographic textures bundled with scikit-image and pybullet.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from conceptstream.world.catalogue import (
    BACKGROUNDS,
    BASE_CLASSES,
    COLOURS,
    PATTERN_WORDS,
    Concept,
    ObjectClass,
)

RENDER_OVERSAMPLE = 2  # render at 2x then downsample with a Lanczos filter (anti-aliased edges)
# The view streams of a personal concept, named as the concept folder's sub-folders ('eval' = test).
CONCEPT_SPLITS: tuple[str, ...] = ("train", "val", "eval")


@dataclass(frozen=True)
class Render:
    """One rendered image with the caption that describes it."""

    image: Image.Image
    caption: str
    noun: str


def stable_rng(*key: object) -> np.random.Generator:
    """A numpy generator seeded from a key, identical across processes and Python versions."""
    text = "\x1f".join(str(k) for k in key)
    return np.random.default_rng([zlib.crc32(text.encode()), len(text)])


@contextmanager
def _quiet_c_stdout():
    """Silence output that C code writes to fd 1 (pybullet's build banner), keeping stdout clean."""
    import ctypes

    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        yield
    finally:
        try:
            ctypes.CDLL(None).fflush(None)  # drain C's stdio buffer while it still points at /dev/null
        except (OSError, AttributeError):
            pass
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _pybullet():
    import pybullet  # imported lazily: only rendering needs it
    import pybullet_data

    return pybullet, Path(pybullet_data.getDataPath())


def _uv_mapped_copy(src: Path, dst: Path) -> None:
    """Write a copy of an OBJ mesh with spherical UV coordinates, so patterns can be painted on it."""
    vertices, faces = [], []
    for line in src.read_text(errors="replace").splitlines():
        if line.startswith("v "):
            vertices.append([float(x) for x in line.split()[1:4]])
        elif line.startswith("f "):
            idx = [int(tok.split("/")[0]) for tok in line.split()[1:]]
            faces.append([i if i > 0 else len(vertices) + 1 + i for i in idx])
    v = np.asarray(vertices)
    centred = v - (v.min(0) + v.max(0)) / 2
    radius = np.linalg.norm(centred, axis=1) + 1e-9
    u = np.arctan2(centred[:, 1], centred[:, 0]) / (2 * math.pi) + 0.5
    w = np.arccos(np.clip(centred[:, 2] / radius, -1, 1)) / math.pi
    lines = [f"v {a:.6f} {b:.6f} {c:.6f}" for a, b, c in v]
    lines += [f"vt {a:.6f} {b:.6f}" for a, b in zip(u, w)]
    lines += ["f " + " ".join(f"{i}/{i}" for i in face) for face in faces]
    dst.write_text("\n".join(lines) + "\n")


def _pattern_texture(pattern: str, colours: tuple[str, str], size: int = 128) -> np.ndarray:
    """A bold two-colour texture; patterns are reserved for personal concepts."""
    a = np.array(COLOURS[colours[0]]) * 255
    b = np.array(COLOURS[colours[1]]) * 255
    yy, xx = np.mgrid[0:size, 0:size] / size
    if pattern == "stripes":
        mask = (xx * 6) % 1 < 0.5
    elif pattern == "checks":
        mask = ((xx * 4).astype(int) + (yy * 4).astype(int)) % 2 == 0
    elif pattern == "dots":
        mask = ((xx * 5) % 1 - 0.5) ** 2 + ((yy * 5) % 1 - 0.5) ** 2 > 0.09
    elif pattern == "zigzag":
        mask = ((yy * 4 + np.abs((xx * 8) % 2 - 1)) % 1) < 0.5
    elif pattern == "halves":
        mask = yy < 0.5
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    return np.where(mask[..., None], a, b).astype(np.uint8)


class TabletopRenderer:
    """Renders base-class photos and personal-concept views. Not thread-safe; one per process."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._client: int | None = None
        # UV-mapped meshes and texture PNGs for pybullet; removed when the renderer is garbage-collected or at exit
        self._cache_dir = tempfile.TemporaryDirectory(prefix="conceptstream-world-")
        self._cache = Path(self._cache_dir.name)
        self._textures: dict[str, int] = {}

    # -- resources -----------------------------------------------------------------------------
    @property
    def client(self) -> int:
        if self._client is None:
            pb, _ = _pybullet()
            with _quiet_c_stdout():
                self._client = pb.connect(pb.DIRECT)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            pb, _ = _pybullet()
            pb.disconnect(self._client)
            self._client = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    @cached_property
    def _backgrounds(self) -> dict[str, np.ndarray]:
        """Background name -> a large float RGB image in [0, 1] to crop from."""
        import skimage

        _, data = _pybullet()
        sk = Path(skimage.__file__).parent / "data"

        def grey(path: Path, tint: tuple[float, float, float]) -> np.ndarray:
            img = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255
            return img[..., None] * np.asarray(tint, dtype=np.float32)[None, None]

        wood = np.asarray(Image.open(data / "table" / "table.png").convert("RGB"), dtype=np.float32) / 255
        rng = stable_rng("backgrounds")
        noise = rng.normal(0, 0.03, size=(256, 256, 1)).astype(np.float32)
        return {
            "grass": grey(sk / "grass.png", (0.45, 0.95, 0.35)),
            "gravel": grey(sk / "gravel.png", (0.95, 0.92, 0.88)),
            "bricks": grey(sk / "brick.png", (1.0, 0.55, 0.40)),
            "a wooden table": wood,
            "a white table": np.clip(np.full((256, 256, 3), 0.88, np.float32) + noise, 0, 1),
            "a blue cloth": np.clip(np.asarray([0.2, 0.35, 0.75], np.float32) + 2 * noise, 0, 1),
        }

    def _mesh_path(self, cls: ObjectClass, need_uv: bool) -> str:
        _, data = _pybullet()
        src = data / cls.path
        if cls.urdf or not need_uv or cls.textured:
            return str(src)
        dst = self._cache / f"{cls.key}-uv.obj"
        if not dst.exists():
            _uv_mapped_copy(src, dst)
        return str(dst)

    def _texture(self, key: str, pixels: np.ndarray) -> int:
        if key not in self._textures:
            pb, _ = _pybullet()
            path = self._cache / f"{key}.png"
            Image.fromarray(pixels).save(path)
            self._textures[key] = pb.loadTexture(str(path), physicsClientId=self.client)
        return self._textures[key]

    # -- drawing -------------------------------------------------------------------------------
    def _draw(
        self,
        cls: ObjectClass,
        rng: np.random.Generator,
        tint: tuple[float, float, float] | None,
        background: str,
        pattern: tuple[str, tuple[str, str]] | None = None,
        stretch: tuple[float, float, float] = (1.0, 1.0, 1.0),
        texture: tuple[str, np.ndarray] | None = None,
    ) -> Image.Image:
        pb, data = _pybullet()
        cid = self.client
        pb.resetSimulation(physicsClientId=cid)
        self._textures.clear()  # resetSimulation drops loaded textures
        orientation = pb.getQuaternionFromEuler(cls.upright)
        scale = float(rng.uniform(0.85, 1.15))
        if cls.urdf:
            body = pb.loadURDF(str(data / cls.path), baseOrientation=orientation, globalScaling=scale,
                               flags=pb.URDF_USE_MATERIAL_COLORS_FROM_MTL, physicsClientId=cid)
        else:
            mesh = self._mesh_path(cls, need_uv=pattern is not None or texture is not None)
            shape = pb.createVisualShape(pb.GEOM_MESH, fileName=mesh, meshScale=[scale * s for s in stretch],
                                         physicsClientId=cid)
            body = pb.createMultiBody(baseVisualShapeIndex=shape, baseOrientation=orientation, physicsClientId=cid)
        links = list(range(-1, pb.getNumJoints(body, physicsClientId=cid)))
        if pattern is not None:
            name, colours = pattern
            tex = self._texture(f"{name}-{colours[0]}-{colours[1]}", _pattern_texture(name, colours))
            for i, link in enumerate(links):
                rgba = [1, 1, 1, 1] if not cls.urdf else [*COLOURS[colours[i % 2]], 1]
                pb.changeVisualShape(body, link, rgbaColor=rgba, textureUniqueId=tex, physicsClientId=cid)
        elif texture is not None:
            tex = self._texture(*texture)
            for link in links:
                pb.changeVisualShape(body, link, rgbaColor=[1, 1, 1, 1], textureUniqueId=tex, physicsClientId=cid)
        elif tint is not None:
            white = self._texture("white", np.full((4, 4, 3), 255, np.uint8))
            for link in links:
                pb.changeVisualShape(body, link, rgbaColor=[*tint, 1], textureUniqueId=white, physicsClientId=cid)
        lo, hi = self._bounds(body, cls, scale, stretch, orientation)
        centre = (lo + hi) / 2
        extent = float(np.linalg.norm(hi - lo))
        yaw = float(rng.uniform(0, 360))
        pitch = float(rng.uniform(-45, -10))
        distance = extent * float(rng.uniform(1.05, 1.45))
        px = self.size * RENDER_OVERSAMPLE
        view = pb.computeViewMatrixFromYawPitchRoll(centre.tolist(), distance, yaw, pitch, 0, 2)
        proj = pb.computeProjectionMatrixFOV(40, 1.0, 0.01, 100 * max(extent, 1e-3))
        light = [float(rng.uniform(-1, 1)), float(rng.uniform(-1, 1)), float(rng.uniform(0.8, 2.0))]
        _, _, rgb, _, seg = pb.getCameraImage(
            px, px, view, proj, renderer=pb.ER_TINY_RENDERER, lightDirection=light,
            lightAmbientCoeff=float(rng.uniform(0.45, 0.7)), lightDiffuseCoeff=float(rng.uniform(0.4, 0.7)),
            lightSpecularCoeff=0.05, shadow=0, physicsClientId=cid,
        )
        rgb = np.reshape(np.asarray(rgb, dtype=np.uint8), (px, px, 4))[..., :3].astype(np.float32) / 255
        mask = (np.reshape(np.asarray(seg), (px, px)) >= 0)[..., None]
        back = self._background_crop(background, px, rng)
        out = np.where(mask, rgb, back)
        img = Image.fromarray((out * 255).round().astype(np.uint8))
        return img.resize((self.size, self.size), Image.Resampling.LANCZOS)

    def _bounds(self, body, cls, scale, stretch, orientation) -> tuple[np.ndarray, np.ndarray]:
        pb, data = _pybullet()
        if cls.urdf:
            cid = self.client
            lo, hi = (np.asarray(v) for v in pb.getAABB(body, physicsClientId=cid))
            for j in range(pb.getNumJoints(body, physicsClientId=cid)):
                a, b = (np.asarray(v) for v in pb.getAABB(body, j, physicsClientId=cid))
                lo, hi = np.minimum(lo, a), np.maximum(hi, b)
            return lo, hi
        verts = _obj_vertices(str(data / cls.path)) * np.asarray(stretch) * scale
        rot = np.asarray(pb.getMatrixFromQuaternion(orientation)).reshape(3, 3)
        world = verts @ rot.T
        return world.min(0), world.max(0)

    def _background_crop(self, name: str, px: int, rng: np.random.Generator) -> np.ndarray:
        src = self._backgrounds[name]
        h, w = src.shape[:2]
        side = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
        y = int(rng.integers(0, h - side + 1))
        x = int(rng.integers(0, w - side + 1))
        crop = Image.fromarray((src[y:y + side, x:x + side] * 255).astype(np.uint8))
        crop = crop.resize((px, px), Image.Resampling.BILINEAR)
        shade = float(rng.uniform(0.8, 1.1))
        return np.clip(np.asarray(crop, np.float32) / 255 * shade, 0, 1)

    # -- public API ----------------------------------------------------------------------------
    def render_class(self, cls: ObjectClass, index: int, seed: int = 0) -> Render:
        """The index-th photo of a base class, with a caption naming colour and background."""
        rng = stable_rng("class", seed, cls.key, index)
        background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        colour = None
        if not cls.textured or rng.random() < 0.5:
            colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        tint = COLOURS[colour] if colour else None
        image = self._draw(cls, rng, tint, background)
        words = ["a photo of a"]
        if colour and rng.random() < 0.75:
            words.append(colour)
        words.append(cls.noun)
        if rng.random() < 0.6:
            words.append(f"on {background}")
        return Render(image, " ".join(words), cls.noun)

    def render_concept(self, concept: Concept, split: str, index: int, seed: int = 0) -> Render:
        """A view of a personal concept. ``split`` is ``'train'``, ``'val'`` or ``'eval'`` (the test
        views): each draws from its own random stream, keyed by the split's name, so the three are
        disjoint and adding ``'val'`` left every train and eval view unchanged."""
        if split not in CONCEPT_SPLITS:
            raise ValueError(f"split must be one of {', '.join(map(repr, CONCEPT_SPLITS))}, got {split!r}")
        rng = stable_rng("concept", seed, concept.name, split, index)
        background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        image = self._draw(concept.object_class, rng, None, background,
                           pattern=(concept.pattern, concept.colours), stretch=concept.stretch)
        return Render(image, f"a photo of a {concept.token} {concept.noun}", concept.noun)

    def render_patterned(self, cls: ObjectClass, pattern: str, colours: tuple[str, str], index: int, seed: int = 0,
                         stretch: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> Render:
        """A base-class object painted in a concept pattern and two catalogue colours, captioned with
        them ("a photo of a red and white striped mug on grass"; the colours are left out of a quarter of
        the captions). Optional base-model data (``base_data.pattern_dataset``), which keeps every
        (class, pattern, colour pair) of a personal concept out."""
        rng = stable_rng("patterned", seed, cls.key, index)
        background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        image = self._draw(cls, rng, None, background, pattern=(pattern, colours), stretch=stretch)
        words = ["a photo of a"]
        if rng.random() < 0.75:
            words.append(f"{colours[0]} and {colours[1]}")
        words += [PATTERN_WORDS[pattern], cls.noun]
        if rng.random() < 0.6:
            words.append(f"on {background}")
        return Render(image, " ".join(words), cls.noun)

    def render_textured(self, cls: ObjectClass, texture: np.ndarray, index: int, seed: int = 0,
                        stretch: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> Image.Image:
        """A base-class object painted with an arbitrary RGB ``texture`` (uint8 ``[H, W, 3]``) on a
        random background: generic autoencoder training data (see ``base_data.generic_dataset``)."""
        rng = stable_rng("textured", seed, cls.key, index)
        background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        return self._draw(cls, rng, None, background, stretch=stretch, texture=(f"generic-{index}", texture))


_VERTEX_CACHE: dict[str, np.ndarray] = {}


def _obj_vertices(path: str) -> np.ndarray:
    if path not in _VERTEX_CACHE:
        with open(path, errors="replace") as fh:
            rows = [line.split()[1:4] for line in fh if line.startswith("v ")]
        _VERTEX_CACHE[path] = np.asarray(rows, dtype=np.float64)
    return _VERTEX_CACHE[path]


def class_sheet(renderer: TabletopRenderer, per_class: int = 6, seed: int = 0) -> Image.Image:
    """A contact sheet: one row per base class (handy for eyeballing the world)."""
    s = renderer.size
    sheet = Image.new("RGB", (s * per_class, s * len(BASE_CLASSES)))
    for r, cls in enumerate(BASE_CLASSES):
        for c in range(per_class):
            sheet.paste(renderer.render_class(cls, c, seed).image, (c * s, r * s))
    return sheet

