"""CustomConcept101 (Kumari et al., Custom Diffusion; github.com/adobe-research/custom-diffusion,
folder ``customconcept101``) -> concept folder format.

Expected input layout (the repository folder with the unzipped ``benchmark_dataset.zip`` inside)::

    SRC/
      dataset.json                  [{"instance_prompt": "photo of a <new1> cat",
                                      "class_prompt": "cat",
                                      "instance_data_dir": "./benchmark_dataset/pet_cat1",
                                      "class_data_dir": "./regularization/pet_cat",
                                      "prompt_filename": "prompts/cat.txt"}, ...]
      benchmark_dataset/<concept>/*.jpg|*.png     3-15 photos per concept (e.g. pet_cat1, scene_barn)
      prompts/<name>.txt            optional: one evaluation prompt per line, "{}" marks the subject

``instance_data_dir`` and ``prompt_filename`` are resolved relative to ``dataset.json``; the image
folder is also looked for as ``SRC/benchmark_dataset/<concept>`` and ``SRC/<concept>``. The concept
name is the image folder's name (``pet_cat1`` -> token ``<pet_cat1>``); the noun is the text after
``<new1>`` in ``instance_prompt`` ("photo of a <new1> dice plushie" -> "dice plushie"), else
``class_prompt``. Without ``dataset.json`` pass ``nouns={"pet_cat1": "cat", ...}``: every image
folder of ``SRC/benchmark_dataset`` (or ``SRC``) named in it is converted.

Prompts, when found, are written to ``<concept>/prompts.txt`` with "{}" replaced by "<token> noun".
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from conceptstream.concepts.folder import ConceptFolder
from conceptstream.datasets.common import ConceptSource, clean_name, image_files, select, subsample, write_sources
from conceptstream.errors import UserInputError

_NOUN_RE = re.compile(r"<new\d*>\s+(.+?)[\s.]*$")


def _noun_from(entry: dict) -> str:
    match = _NOUN_RE.search(str(entry.get("instance_prompt", "")))
    if match:
        return match.group(1).strip()
    return str(entry.get("class_prompt", "")).strip()


def _read_prompts(path: Path | None) -> list[str]:
    if path is None or not path.is_file():
        return []
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _image_roots(src: Path) -> list[Path]:
    return [src / "benchmark_dataset", src]


def _find_images_dir(candidates: list[Path]) -> Path | None:
    for folder in candidates:
        if folder.is_dir() and image_files(folder):
            return folder
    return None


def index_customconcept101(src: str | Path, dataset_json: str | Path | None = None,
                           nouns: Mapping[str, str] | None = None) -> dict[str, ConceptSource]:
    """All concepts listed by ``dataset.json`` (or by ``nouns``), in file order, keyed by name."""
    src = Path(src).expanduser()
    if not src.is_dir():
        raise UserInputError(f"CustomConcept101 folder {src} does not exist")
    json_path = Path(dataset_json).expanduser() if dataset_json else src / "dataset.json"
    nouns = dict(nouns or {})
    found: dict[str, ConceptSource] = {}
    if json_path.is_file():
        try:
            entries = json.loads(json_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserInputError(f"{json_path} is not valid JSON ({exc})") from None
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise UserInputError(f"{json_path} must be a list of objects with instance_data_dir and instance_prompt")
        base = json_path.parent
        for k, entry in enumerate(entries):
            rel = entry.get("instance_data_dir")
            if not isinstance(rel, str) or not rel.strip():
                raise UserInputError(f"{json_path}: entry {k} has no instance_data_dir")
            raw_name = Path(rel.rstrip("/")).name
            name = clean_name(raw_name)
            if name in found:
                continue
            noun = nouns.get(raw_name) or nouns.get(name) or _noun_from(entry)
            folder = _find_images_dir([base / rel] + [r / raw_name for r in _image_roots(src)])
            prompt_file = entry.get("prompt_filename")
            prompts = _read_prompts(base / prompt_file) if isinstance(prompt_file, str) else []
            found[name] = ConceptSource(name=name, noun=noun, images=image_files(folder) if folder else [],
                                        prompts=prompts, root=src)
        return found
    if not nouns:
        raise UserInputError(f"{src} has no dataset.json; copy customconcept101/dataset.json from "
                             "adobe-research/custom-diffusion there, or pass nouns={'concept': 'noun', ...}")
    for raw_name, noun in nouns.items():
        folder = _find_images_dir([r / raw_name for r in _image_roots(src)])
        name = clean_name(raw_name)
        found[name] = ConceptSource(name=name, noun=str(noun), images=image_files(folder) if folder else [],
                                    root=src)
    return found


def convert_customconcept101(src: str | Path, dst: str | Path, concepts: Sequence[str] | None = None,
                             limit: int | None = None, nouns: Mapping[str, str] | None = None,
                             dataset_json: str | Path | None = None, eval_fraction: float = 0.25,
                             size: int | None = None, seed: int = 0, max_images: int | None = None,
                             overwrite: bool = False) -> list[ConceptFolder]:
    """Convert CustomConcept101 concepts (``concepts`` in that order, else all; ``limit`` keeps the first K)."""
    src = Path(src).expanduser()
    index = index_customconcept101(src, dataset_json, nouns)
    names = select(index, [clean_name(c) for c in concepts] if concepts is not None else None,
                   "CustomConcept101 concept")
    if limit is not None:
        names = names[: max(0, int(limit))]
    sources = []
    for name in names:
        source = index[name]
        if not source.images:
            raise UserInputError(f"no images for CustomConcept101 concept {name!r}: unzip benchmark_dataset.zip "
                                 f"into {src} (expected {src / 'benchmark_dataset' / name}/*.jpg)")
        source.images = subsample(source.images, max_images, seed=f"{seed}:{name}")
        sources.append(source)
    return write_sources(dst, sources, eval_fraction=eval_fraction, size=size, seed=seed, overwrite=overwrite)
