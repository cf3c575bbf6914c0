"""Textual Inversion dataset (Gal et al.; the concept photos released with the paper) -> concept folders.

Expected input layout: one folder per concept holding its 4-6 photos, nothing else required::

    SRC/
      cat_statue/*.jpg|*.jpeg|*.png
      clock/...
      colorful_teapot/  elephant/  mug_skulls/  physics_mug/  red_teapot/  round_bird/  thin_bird/

The noun comes from ``nouns`` (``{"folder": "noun"}``) or, for the released concepts, from
``TI_NOUNS``; a folder with neither is an error naming the fix. Concepts are converted in
``concepts`` order, else in sorted folder-name order (sub-folders without images are skipped).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from conceptstream.concepts.folder import ConceptFolder
from conceptstream.datasets.common import ConceptSource, clean_name, image_files, select, subsample, write_sources
from conceptstream.errors import UserInputError

# Class nouns for the concepts released with Textual Inversion (the objects shown in the paper).
TI_NOUNS: dict[str, str] = {
    "cat_statue": "cat figurine",
    "clock": "clock",
    "colorful_teapot": "teapot",
    "elephant": "elephant figurine",
    "mug_skulls": "mug",
    "physics_mug": "mug",
    "red_teapot": "teapot",
    "round_bird": "bird figurine",
    "thin_bird": "bird figurine",
}


def convert_textual_inversion(src: str | Path, dst: str | Path, nouns: Mapping[str, str] | None = None,
                              concepts: Sequence[str] | None = None, limit: int | None = None,
                              eval_fraction: float = 0.25, size: int | None = None, seed: int = 0,
                              max_images: int | None = None, overwrite: bool = False) -> list[ConceptFolder]:
    """Convert Textual Inversion concept folders; ``nouns`` overrides/extends ``TI_NOUNS``."""
    src = Path(src).expanduser()
    if not src.is_dir():
        raise UserInputError(f"Textual Inversion folder {src} does not exist (expected SRC/<concept>/*.jpg)")
    table = {**TI_NOUNS, **dict(nouns or {})}
    folders = {p.name: p for p in sorted(src.iterdir()) if p.is_dir() and image_files(p)}
    if not folders:
        raise UserInputError(f"{src} has no concept folders with images (expected SRC/<concept>/*.jpg, "
                             "e.g. SRC/cat_statue/1.jpeg)")
    names = select(folders, concepts, "Textual Inversion concept")
    if limit is not None:
        names = names[: max(0, int(limit))]
    sources = []
    for raw in names:
        noun = table.get(raw)
        if not noun:
            raise UserInputError(f"no noun known for Textual Inversion concept {raw!r}; pass nouns={{'{raw}': "
                                 "'toy'}} (--noun) with its class noun")
        name = clean_name(raw)
        images = subsample(image_files(folders[raw]), max_images, seed=f"{seed}:{name}")
        sources.append(ConceptSource(name=name, noun=noun, images=images, root=src))
    return write_sources(dst, sources, eval_fraction=eval_fraction, size=size, seed=seed, overwrite=overwrite)
