"""The bench's concepts: a named world sequence rendered once into ``OUT/data``, or a user's sequence folder."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from conceptstream.errors import UserInputError


@dataclass
class BenchData:
    """The concepts of the bench and where they came from."""

    concepts: list  # ConceptFolder
    source: str
    named: bool
    fingerprint: str
    root: Path


def folder_fingerprint(concepts) -> str:
    """A hash of the concepts' names, tokens, nouns and image file names/sizes (a run's data identity)."""
    h = hashlib.sha256()
    for c in concepts:
        h.update(f"{c.name}|{c.token}|{c.noun}".encode())
        for split, paths in (("train", c.train_images()), ("eval", c.eval_images())):
            for p in paths:
                h.update(f"{split}/{p.name}:{p.stat().st_size}".encode())
    return h.hexdigest()[:16]


def prepare_data(sequence: str | Path, out: Path, train_views: int, eval_views: int,
                 max_concepts: int | None = None, progress: bool = True, log: Callable[[str], None] = print
                 ) -> BenchData:
    """A named world sequence (rendered once into ``out/data``) or a user's sequence folder."""
    from conceptstream.concepts.folder import read_sequence
    from conceptstream.concepts.sources import find_source, unknown_sequence
    from conceptstream.safeio import write_json_atomic

    text = str(sequence)
    path = Path(text).expanduser()
    source = find_source(text)
    if source is not None:
        names = source.concepts(text)[: max_concepts or None]
        root = out / "data" / f"{text}-{len(names)}c-train{train_views}-eval{eval_views}"
        marker = root / "bench-data.json"
        want = {"sequence": text, "concepts": names, "train_views": train_views, "eval_views": eval_views, "seed": 0}
        done = marker.is_file() and json.loads(marker.read_text()) == want
        if not done:
            if root.exists():
                shutil.rmtree(root)
            log(f"[bench] rendering {len(names)} concepts of {text} into {root}")
            source.export(text, root, train_views, eval_views, len(names), progress)
            write_json_atomic(marker, want)
        concepts = read_sequence(root)
        named = True
    elif path.is_dir():
        concepts = read_sequence(path)[: max_concepts or None]
        root = path
        named = False
    else:
        raise unknown_sequence(text)
    for c in concepts:
        n_eval = len(c.eval_images())
        if n_eval < 2:
            raise UserInputError(f"concept {c.name} has {n_eval} held-out image(s) in {c.eval_dir}; the bench "
                                 "compares generated images with at least 2 held-out real images per concept")
        if not c.train_images():
            raise UserInputError(f"concept {c.name} has no training images in {c.train_dir}")
    return BenchData(concepts, text, named, folder_fingerprint(concepts), root)


def relative_data_path(root: Path, out: Path) -> str:
    """``root`` as results.json records it: relative to the bench's out folder (``data/...`` for a
    named sequence), so a results folder can move; absolute where no relative path exists."""
    try:
        return Path(os.path.relpath(Path(root).resolve(), Path(out).resolve())).as_posix()
    except ValueError:  # another drive (Windows)
        return str(root)

