"""Google Landmarks Dataset v2 (GLDv2, Weyand et al.; github.com/cvdfoundation/google-landmark) subset
-> concept folders, one concept per landmark.

Expected input layout (``train.csv`` plus any number of extracted ``images_XXX.tar`` shards)::

    SRC/
      train.csv                     header "id,url,landmark_id", e.g. "6e158a47eb2ca3f6,https://...,142820"
      train/<a>/<b>/<c>/<id>.jpg    a, b, c = the first three characters of the image id

Only images present on disk count, so a partial download works. Landmarks are either the given
``landmark_ids`` (in that order) or the first ``num_landmarks`` in ascending landmark id that have
at least ``min_images`` images on disk. A landmark ``L`` becomes concept ``landmark-L`` (token
``<landmark-L>``); GLDv2 has no class names, so the noun is ``nouns[L]`` if given, else ``noun``
(e.g. "waterfall" when every chosen landmark is one).

The CSV is streamed, never held whole in memory (the full file has 4.1M rows).
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from conceptstream.concepts.folder import ConceptFolder
from conceptstream.datasets.common import ConceptSource, subsample, write_sources
from conceptstream.errors import UserInputError


def image_path(src: Path, image_id: str) -> Path:
    """Where GLDv2 stores image ``image_id``: ``train/a/b/c/<id>.jpg``."""
    return src / "train" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"


def _rows(csv_path: Path) -> Iterator[tuple[str, int]]:
    """``(image_id, landmark_id)`` pairs with one-line errors for a malformed file."""
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        if "id" not in fields or "landmark_id" not in fields:
            raise UserInputError(f"{csv_path} must have a header with columns id and landmark_id "
                                 f"(GLDv2 train.csv: id,url,landmark_id); found {', '.join(fields) or 'none'}")
        for line, row in enumerate(reader, start=2):
            image_id = (row.get("id") or "").strip()
            try:
                landmark = int((row.get("landmark_id") or "").strip())
            except ValueError:
                raise UserInputError(f"{csv_path}:{line}: landmark_id {row.get('landmark_id')!r} "
                                     "is not an integer") from None
            if len(image_id) < 3:
                raise UserInputError(f"{csv_path}:{line}: image id {image_id!r} is too short for a GLDv2 id")
            yield image_id, landmark


def _collect(csv_path: Path, wanted: set[int]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {lm: [] for lm in wanted}
    for image_id, landmark in _rows(csv_path):
        if landmark in wanted:
            out[landmark].append(image_id)
    return out


def _present(src: Path, ids: Iterable[str]) -> list[Path]:
    return [p for p in (image_path(src, i) for i in sorted(set(ids))) if p.is_file()]


def convert_landmarks(src: str | Path, dst: str | Path, landmark_ids: Sequence[int] | None = None,
                      num_landmarks: int = 10, min_images: int = 10, noun: str = "landmark",
                      nouns: Mapping[int, str] | None = None, csv_path: str | Path | None = None,
                      eval_fraction: float = 0.25, size: int | None = None, seed: int = 0,
                      max_images: int | None = None, overwrite: bool = False) -> list[ConceptFolder]:
    """Convert chosen GLDv2 landmarks (``landmark_ids`` or the first ``num_landmarks`` with ``min_images``)."""
    src = Path(src).expanduser()
    table = Path(csv_path).expanduser() if csv_path else src / "train.csv"
    if not table.is_file():
        raise UserInputError(f"{table} not found; GLDv2 needs train.csv (id,url,landmark_id) beside train/")
    if not (src / "train").is_dir():
        raise UserInputError(f"{src / 'train'} not found; extract the GLDv2 images_XXX.tar shards into {src}")
    nouns = {int(k): str(v) for k, v in (nouns or {}).items()}
    chosen: list[tuple[int, list[Path]]] = []
    if landmark_ids is not None:
        wanted = [int(x) for x in landmark_ids]
        if not wanted:
            raise UserInputError("landmark_ids is empty; give at least one landmark id")
        ids = _collect(table, set(wanted))
        for lm in wanted:
            if not ids[lm]:
                raise UserInputError(f"landmark {lm} is not in {table}")
            images = _present(src, ids[lm])
            if not images:
                raise UserInputError(f"landmark {lm} has no images on disk under {src / 'train'}; "
                                     "extract the shards that hold them")
            chosen.append((lm, images))
    else:
        if num_landmarks < 1 or min_images < 1:
            raise UserInputError("num_landmarks and min_images must be at least 1")
        counts = Counter(lm for _, lm in _rows(table))
        candidates = sorted(lm for lm, c in counts.items() if c >= min_images)
        window = max(64, 4 * num_landmarks)
        for start in range(0, len(candidates), window):
            block = candidates[start:start + window]
            ids = _collect(table, set(block))
            for lm in block:
                images = _present(src, ids[lm])
                if len(images) >= min_images:
                    chosen.append((lm, images))
                    if len(chosen) == num_landmarks:
                        break
            if len(chosen) == num_landmarks:
                break
        if len(chosen) < num_landmarks:
            raise UserInputError(f"only {len(chosen)} landmarks have at least {min_images} images on disk under "
                                 f"{src / 'train'} (asked for {num_landmarks}); lower min_images/num_landmarks "
                                 "or extract more shards")
    sources = []
    for lm, images in chosen:
        name = f"landmark-{lm}"
        sources.append(ConceptSource(name=name, noun=nouns.get(lm, noun),
                                     images=subsample(images, max_images, seed=f"{seed}:{name}"), root=src))
    return write_sources(dst, sources, eval_fraction=eval_fraction, size=size, seed=seed, overwrite=overwrite)
