"""Shared machinery of the dataset readers: name/token cleaning, the deterministic train/eval split,
image conversion to RGB PNG, and writing one sequence in the concept folder format.

Besides ``concept.json``, ``train/`` and ``eval/`` every converted concept folder gets a
``sources.json`` (which source file became which PNG, so the split can be audited) and, when the
dataset has them, a ``prompts.txt`` of evaluation prompts with the token filled in. Both are extra
files that ``read_concept`` ignores. ``sequence.json`` is written last, so an interrupted
conversion leaves no readable sequence behind.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from PIL import Image

from conceptstream.concepts.folder import (
    IMAGE_SUFFIXES,
    ConceptFolder,
    list_images,
    read_sequence,
    validate_token,
    write_concept,
    write_sequence,
)
from conceptstream.concepts.images import load_image
from conceptstream.errors import UserInputError

T = TypeVar("T")
_NAME_BAD = re.compile(r"[^A-Za-z0-9_\-.]+")


@dataclass
class ConceptSource:
    """One concept found in a source dataset, before conversion."""

    name: str
    noun: str
    images: list[Path]
    prompts: list[str] = field(default_factory=list)  # templates with "{}" for "<token> noun"
    root: Path | None = None  # source paths in sources.json are written relative to this


def clean_name(text: str) -> str:
    """A folder/token-safe concept name: letters, digits, '-', '_', '.'; starts alphanumeric."""
    name = _NAME_BAD.sub("-", str(text).strip()).strip("-_.")
    if not name:
        raise UserInputError(f"cannot make a concept name from {text!r}; give names with letters or digits")
    validate_token(f"<{name}>")
    return name


def check_fraction(eval_fraction: float) -> float:
    value = float(eval_fraction)
    if not 0.0 <= value < 1.0:
        raise UserInputError(f"eval_fraction must be in [0, 1) (got {eval_fraction}); e.g. 0.25 holds out a quarter")
    return value


def check_size(size: int | None) -> int | None:
    if size is None:
        return None
    if int(size) < 8:
        raise UserInputError(f"--size must be at least 8 pixels (got {size})")
    return int(size)


def split_train_eval(items: Sequence[T], eval_fraction: float, seed: int | str = 0) -> tuple[list[T], list[T]]:
    """Deterministic split: a seeded shuffle, then the first ``round(n * eval_fraction)`` go to eval.

    At least one eval item when ``eval_fraction > 0`` and there are 2+ items; always at least one
    training item. The same items, fraction and seed give the same split on every machine.
    """
    items = list(items)
    n = len(items)
    fraction = check_fraction(eval_fraction)
    order = list(range(n))
    random.Random(str(seed)).shuffle(order)
    n_eval = 0 if fraction == 0.0 or n < 2 else max(1, min(n - 1, int(n * fraction + 0.5)))
    eval_idx = set(order[:n_eval])
    train = [items[k] for k in range(n) if k not in eval_idx]
    held = [items[k] for k in sorted(eval_idx)]
    return train, held


def subsample(items: Sequence[T], max_items: int | None, seed: int | str = 0) -> list[T]:
    """At most ``max_items`` of ``items`` (a seeded choice, kept in input order)."""
    items = list(items)
    if max_items is None or len(items) <= max_items:
        return items
    if max_items < 1:
        raise UserInputError(f"max_images must be at least 1 (got {max_items})")
    keep = sorted(random.Random(str(seed)).sample(range(len(items)), max_items))
    return [items[k] for k in keep]


def square_resize(img: Image.Image, size: int) -> Image.Image:
    """Scale the shorter side to ``size`` and centre-crop to ``size x size`` (training resolution)."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.LANCZOS)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def convert_image(src: Path, dst: Path, size: int | None = None) -> None:
    """Write ``src`` as an RGB PNG at ``dst`` (converted as ``learn`` converts it; optionally square-resized)."""
    img = load_image(src)
    if size is not None:
        img = square_resize(img, size)
    img.save(dst, format="PNG")


def image_files(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    return list_images(folder) if folder.is_dir() else []


def _prepare(dst: Path, names: list[str], overwrite: bool) -> None:
    """Refuse to mix a new sequence into an old one unless ``overwrite``; then clear our folders."""
    if dst.exists() and not dst.is_dir():
        raise UserInputError(f"destination {dst} is a file; give a folder for the converted sequence")
    if (dst / "sequence.json").exists() and not overwrite:
        raise UserInputError(f"{dst} already holds a sequence (sequence.json); choose an empty folder "
                             "or pass overwrite=True (--overwrite)")
    for name in names:
        folder = dst / name
        if not folder.exists():
            continue
        if not overwrite:
            raise UserInputError(f"{folder} already exists; choose an empty destination or pass overwrite=True")
        if not (folder / "concept.json").is_file() and any(folder.iterdir()):
            raise UserInputError(f"{folder} exists and is not a concept folder; refusing to overwrite it")
        shutil.rmtree(folder)
    if overwrite and (dst / "sequence.json").exists():
        (dst / "sequence.json").unlink()


def write_sources(dst: str | Path, sources: Sequence[ConceptSource], eval_fraction: float = 0.25,
                  size: int | None = None, seed: int = 0, overwrite: bool = False) -> list[ConceptFolder]:
    """Convert found concepts into ``dst`` in the concept folder format and read it back."""
    dst = Path(dst).expanduser()
    fraction = check_fraction(eval_fraction)
    size = check_size(size)
    if not sources:
        raise UserInputError("no concepts were selected; nothing to convert")
    names = [s.name for s in sources]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserInputError(f"concept names repeat ({', '.join(dupes)}); each concept needs its own name")
    for source in sources:
        if not source.images:
            raise UserInputError(f"concept {source.name!r} has no images")
        if not source.noun.strip():
            raise UserInputError(f"concept {source.name!r} has an empty noun; give a class noun such as 'dog'")
    _prepare(dst, names, overwrite)
    for source in sources:
        token = f"<{source.name}>"
        folder = write_concept(dst / source.name, token, source.noun.strip())
        images = sorted(source.images)
        train, held = split_train_eval(images, fraction, seed=f"{seed}:{source.name}")
        record: dict[str, dict[str, str]] = {"train": {}, "eval": {}}
        for split, paths in (("train", train), ("eval", held)):
            for k, path in enumerate(paths):
                out_name = f"{k:04d}.png"
                convert_image(path, folder / split / out_name, size)
                rel = path.relative_to(source.root) if source.root and path.is_relative_to(source.root) else path
                record[split][out_name] = rel.as_posix()
        (folder / "sources.json").write_text(json.dumps(record, indent=2) + "\n")
        if source.prompts:
            subject = f"{token} {source.noun.strip()}"
            lines = [p.replace("{}", subject) if "{}" in p else p for p in source.prompts]
            (folder / "prompts.txt").write_text("\n".join(lines) + "\n")
    write_sequence(dst, names)
    return read_sequence(dst)


def select(available: dict[str, T], wanted: Sequence[str] | None, what: str) -> list[str]:
    """Names to convert: ``wanted`` in its order (each must exist) or all available in their order."""
    if wanted is None:
        return list(available)
    wanted = [str(w) for w in wanted]
    unknown = [w for w in wanted if w not in available]
    if unknown:
        shown = ", ".join(list(available)[:8])
        more = ", ..." if len(available) > 8 else ""
        raise UserInputError(f"unknown {what} {unknown[0]!r}; available: {shown}{more}")
    return wanted


__all__ = [
    "IMAGE_SUFFIXES",
    "ConceptSource",
    "check_fraction",
    "check_size",
    "clean_name",
    "convert_image",
    "image_files",
    "select",
    "split_train_eval",
    "square_resize",
    "subsample",
    "write_sources",
]
