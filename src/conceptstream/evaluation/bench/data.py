"""The bench's concepts: a named world sequence rendered once into ``OUT/data``, or a user's sequence folder.

Each concept has training views (``train/``) and two held-out splits: ``val`` (``val/``, for tuning
and sweeps) and ``test`` (``eval/``, for published tables). A bench scores against the views of one
split (``--split``); a named sequence is rendered with both, so one data folder serves both.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from conceptstream.errors import UserInputError

SPLITS = ("val", "test")  # the held-out splits a bench can score against
MIN_HELDOUT = 2  # held-out real images per concept that MMD/KID need


@dataclass
class BenchData:
    """The concepts of the bench, where they came from, and the held-out split it scores against."""

    concepts: list  # ConceptFolder
    source: str
    named: bool
    fingerprint: str
    root: Path
    split: str = "test"

    def heldout_images(self, i: int) -> list[Path]:
        """Concept ``i``'s held-out real images of the bench's split (``val/`` or ``eval/``)."""
        return self.concepts[i].heldout_images(self.split)


def folder_fingerprint(concepts) -> str:
    """A hash of the concepts' names, tokens, nouns and image file names/sizes of every split (a run's
    data identity). A concept without validation images hashes as it did before ``val/`` existed."""
    h = hashlib.sha256()
    for c in concepts:
        h.update(f"{c.name}|{c.token}|{c.noun}".encode())
        for split, paths in (("train", c.train_images()), ("val", c.val_images()), ("eval", c.eval_images())):
            for p in paths:
                h.update(f"{split}/{p.name}:{p.stat().st_size}".encode())
    return h.hexdigest()[:16]


def check_heldout(concepts, split: str) -> None:
    """Refuse concepts without training images or with fewer than 2 held-out images of ``split``."""
    for c in concepts:
        if split == "val":
            n_val = len(c.val_images())
            if n_val < MIN_HELDOUT:
                raise UserInputError(
                    f"concept {c.name} has {n_val} validation image(s) in {c.val_dir}; --split val compares "
                    f"generated images with at least {MIN_HELDOUT} validation views per concept: add them to "
                    f"{c.val_dir}/, or use --split test")
        else:
            n_eval = len(c.eval_images())
            if n_eval < MIN_HELDOUT:
                raise UserInputError(
                    f"concept {c.name} has {n_eval} held-out image(s) in {c.eval_dir}; the bench compares "
                    f"generated images with at least {MIN_HELDOUT} held-out real images per concept")
        if not c.train_images():
            raise UserInputError(f"concept {c.name} has no training images in {c.train_dir}")


def check_sequence_folder(sequence: str | Path, split: str, max_concepts: int | None = None) -> None:
    """Refuse a user's sequence folder whose concepts lack the held-out views of ``split``, before any
    work starts (a named sequence is rendered with every split; anything else is left to
    :func:`prepare_data`)."""
    from conceptstream.concepts.folder import read_sequence
    from conceptstream.concepts.sources import find_source

    text = str(sequence)
    path = Path(text).expanduser()
    if find_source(text) is None and path.is_dir():
        check_heldout(read_sequence(path)[: max_concepts or None], split)


def prepare_data(sequence: str | Path, out: Path, train_views: int, eval_views: int,
                 max_concepts: int | None = None, progress: bool = True, log: Callable[[str], None] = print,
                 *, val_views: int | None = None, split: str = "test") -> BenchData:
    """A named world sequence (rendered once into ``out/data`` with ``train_views`` training,
    ``val_views`` validation (None: as many as ``eval_views``) and ``eval_views`` test views per
    concept) or a user's sequence folder, checked to have at least 2 held-out images of ``split``
    (``"val"`` or ``"test"``) per concept."""
    from conceptstream.concepts.folder import read_sequence
    from conceptstream.concepts.sources import find_source, unknown_sequence
    from conceptstream.safeio import write_json_atomic

    if split not in SPLITS:
        raise UserInputError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    val_views = eval_views if val_views is None else val_views
    text = str(sequence)
    path = Path(text).expanduser()
    source = find_source(text)
    if source is not None:
        names = source.concepts(text)[: max_concepts or None]
        root = out / "data" / f"{text}-{len(names)}c-train{train_views}-val{val_views}-eval{eval_views}"
        marker = root / "bench-data.json"
        want = {"sequence": text, "concepts": names, "train_views": train_views, "val_views": val_views,
                "eval_views": eval_views, "seed": 0}
        done = marker.is_file() and json.loads(marker.read_text()) == want
        if not done:
            if root.exists():
                shutil.rmtree(root)
            log(f"[bench] rendering {len(names)} concepts of {text} into {root}")
            source.export(text, root, train_views, eval_views, len(names), progress, val_views)
            write_json_atomic(marker, want)
        concepts = read_sequence(root)
        named = True
    elif path.is_dir():
        concepts = read_sequence(path)[: max_concepts or None]
        root = path
        named = False
    else:
        raise unknown_sequence(text)
    check_heldout(concepts, split)
    return BenchData(concepts, text, named, folder_fingerprint(concepts), root, split)


def relative_data_path(root: Path, out: Path) -> str:
    """``root`` as results.json records it: relative to the bench's out folder (``data/...`` for a
    named sequence), so a results folder can move; absolute where no relative path exists."""
    try:
        return Path(os.path.relpath(Path(root).resolve(), Path(out).resolve())).as_posix()
    except ValueError:  # another drive (Windows)
        return str(root)

