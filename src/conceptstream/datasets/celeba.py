"""CelebA identities (Liu et al., mmlab.ie.cuhk.edu.hk/projects/CelebA.html) -> concept folders,
one concept per identity.

Expected input layout (either the flat layout or the official Google Drive one)::

    SRC/identity_CelebA.txt           or SRC/Anno/identity_CelebA.txt
        lines "<image> <identity>", e.g. "000001.jpg 2880"
    SRC/img_align_celeba/*.jpg        or SRC/Img/img_align_celeba/*.jpg
                                      or SRC/img_align_celeba/img_align_celeba/*.jpg (Kaggle zip)

Identities are either the given ``identities`` (in that order) or the first ``num_identities`` in
ascending identity number with at least ``min_images`` images on disk. Identity ``K`` becomes
concept ``celeb-K`` (token ``<celeb-K>``) with noun ``noun`` (default "person").
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from conceptstream.concepts.folder import ConceptFolder
from conceptstream.datasets.common import ConceptSource, subsample, write_sources
from conceptstream.errors import UserInputError

_IDENTITY_FILES = ("identity_CelebA.txt", "Anno/identity_CelebA.txt")
_IMAGE_DIRS = ("img_align_celeba/img_align_celeba", "img_align_celeba", "Img/img_align_celeba")


def _find(src: Path, options: Sequence[str], is_dir: bool) -> Path | None:
    for rel in options:
        path = src / rel
        if (path.is_dir() and any(path.glob("*.jpg"))) if is_dir else path.is_file():
            return path
    return None


def read_identities(path: Path) -> dict[int, list[str]]:
    """``identity -> [image file names]`` from ``identity_CelebA.txt``."""
    out: dict[int, list[str]] = {}
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise UserInputError(f"{path}:{line_no}: expected '<image> <identity>', got {line.strip()!r}")
            try:
                identity = int(parts[1])
            except ValueError:
                raise UserInputError(f"{path}:{line_no}: identity {parts[1]!r} is not an integer") from None
            out.setdefault(identity, []).append(parts[0])
    return out


def convert_celeba(src: str | Path, dst: str | Path, identities: Sequence[int] | None = None,
                   num_identities: int = 10, min_images: int = 10, noun: str = "person",
                   eval_fraction: float = 0.25, size: int | None = None, seed: int = 0,
                   max_images: int | None = None, overwrite: bool = False) -> list[ConceptFolder]:
    """Convert chosen CelebA identities (``identities`` or the first ``num_identities`` with ``min_images``)."""
    src = Path(src).expanduser()
    id_file = _find(src, _IDENTITY_FILES, is_dir=False)
    if id_file is None:
        raise UserInputError(f"no identity_CelebA.txt in {src} (looked for {', '.join(_IDENTITY_FILES)}); "
                             "download it from the CelebA Anno/ folder")
    image_dir = _find(src, _IMAGE_DIRS, is_dir=True)
    if image_dir is None:
        raise UserInputError(f"no img_align_celeba/*.jpg in {src}; unzip img_align_celeba.zip there")
    table = read_identities(id_file)

    def present(identity: int) -> list[Path]:
        return [p for p in (image_dir / name for name in sorted(table.get(identity, []))) if p.is_file()]

    chosen: list[tuple[int, list[Path]]] = []
    if identities is not None:
        wanted = [int(x) for x in identities]
        if not wanted:
            raise UserInputError("identities is empty; give at least one CelebA identity number")
        for identity in wanted:
            if identity not in table:
                raise UserInputError(f"identity {identity} is not in {id_file}")
            images = present(identity)
            if not images:
                raise UserInputError(f"identity {identity} has no images on disk in {image_dir}")
            chosen.append((identity, images))
    else:
        if num_identities < 1 or min_images < 1:
            raise UserInputError("num_identities and min_images must be at least 1")
        for identity in sorted(table):
            if len(table[identity]) < min_images:
                continue
            images = present(identity)
            if len(images) >= min_images:
                chosen.append((identity, images))
                if len(chosen) == num_identities:
                    break
        if len(chosen) < num_identities:
            raise UserInputError(f"only {len(chosen)} identities have at least {min_images} images in {image_dir} "
                                 f"(asked for {num_identities}); lower min_images or num_identities")
    sources = []
    for identity, images in chosen:
        name = f"celeb-{identity}"
        sources.append(ConceptSource(name=name, noun=noun, images=subsample(images, max_images, seed=f"{seed}:{name}"),
                                     root=src))
    return write_sources(dst, sources, eval_fraction=eval_fraction, size=size, seed=seed, overwrite=overwrite)
