"""Rendered tabletop concepts written in the concept folder format (:mod:`conceptstream.concepts.folder`)."""

from __future__ import annotations

from pathlib import Path

from conceptstream.concepts.folder import ConceptFolder, read_concept, write_concept, write_sequence


def export_sequence(concepts, root: Path, train_views: int = 12, eval_views: int = 12, seed: int = 0,
                    renderer=None, progress: bool = False, val_views: int = 0) -> list[ConceptFolder]:
    """Render world concepts into the concept folder format: ``train_views`` views into ``train/``,
    ``val_views`` into ``val/`` (validation) and ``eval_views`` into ``eval/`` (test), each split from
    its own render stream, so the three never share a view and a split's views do not depend on how
    many views the other splits have."""
    from tqdm.auto import tqdm

    from conceptstream.world.render import TabletopRenderer

    renderer = renderer or TabletopRenderer(64)
    root = Path(root)
    folders = []
    splits = (("train", train_views), ("val", val_views), ("eval", eval_views))
    total = len(concepts) * sum(n for _, n in splits)
    with tqdm(total=total, desc=f"export to {root}", disable=not progress) as bar:
        for concept in concepts:
            folder = write_concept(root / concept.name, concept.token, concept.noun)
            for split, n in splits:
                for i in range(n):
                    renderer.render_concept(concept, split, i, seed).image.save(folder / split / f"{i:03d}.png")
                    bar.update()
            folders.append(read_concept(folder))
    write_sequence(root, [c.name for c in concepts])
    return folders


def export_classes(root: Path, per_class: int, seed: int = 1, renderer=None, progress: bool = False,
                   offset: int = 100_000) -> dict[str, list[Path]]:
    """Write ``per_class`` real renders per base class as ``root/<noun>/*.png``.

    ``offset`` moves the render indices away from those used to train the base model, so these
    are held-out real images for evaluation.
    """
    from tqdm.auto import tqdm

    from conceptstream.world.catalogue import BASE_CLASSES
    from conceptstream.world.render import TabletopRenderer

    renderer = renderer or TabletopRenderer(64)
    out: dict[str, list[Path]] = {}
    with tqdm(total=per_class * len(BASE_CLASSES), desc=f"export classes to {root}", disable=not progress) as bar:
        for cls in BASE_CLASSES:
            folder = Path(root) / cls.noun
            folder.mkdir(parents=True, exist_ok=True)
            out[cls.noun] = []
            for i in range(per_class):
                path = folder / f"{i:03d}.png"
                renderer.render_class(cls, offset + i, seed).image.save(path)
                out[cls.noun].append(path)
                bar.update()
    return out


def _export_named(name: str, root: Path, train_views: int, eval_views: int, n_concepts: int, progress: bool,
                  val_views: int) -> None:
    from conceptstream.world.catalogue import get_sequence

    export_sequence(list(get_sequence(name))[:n_concepts], root, train_views, eval_views, seed=0, progress=progress,
                    val_views=val_views)


def _sequence_source():
    from conceptstream.concepts.sources import SequenceSource
    from conceptstream.world.catalogue import SEQUENCES

    return SequenceSource(names=tuple(SEQUENCES), concepts=lambda name: list(SEQUENCES[name]), export=_export_named)


# The tabletop world's named sequences, registered in pyproject.toml's "conceptstream.sequences" entry points.
SEQUENCE_SOURCE = _sequence_source()
