"""Named concept sequences: sources that write a sequence, by name, in the concept-folder format.

``conceptstream bench --sequence NAME`` accepts a name where it accepts a sequence folder. A source
plugs in through the ``conceptstream.sequences`` entry-point group (the package's own synthetic
tabletop world is one, declared in ``pyproject.toml``), so this module never imports a source and
another package can add its own named sequences the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from conceptstream.errors import UserInputError

ENTRY_POINT_GROUP = "conceptstream.sequences"


@dataclass(frozen=True)
class SequenceSource:
    """What a source provides: its sequence names, each one's ordered concept names, and a writer."""

    names: tuple[str, ...]
    concepts: Callable[[str], list[str]]  # the ordered concept names of a sequence
    # export(name, root, train_views, eval_views, n_concepts, progress, val_views): write the first
    # n_concepts concepts of the sequence as a sequence folder at root, with train_views views in each
    # concept's train/, val_views in val/ and eval_views in eval/ (the test split), no view shared
    # between splits (deterministic: same arguments, same files)
    export: Callable[[str, Path, int, int, int, bool, int], None]


def sequence_sources() -> dict[str, SequenceSource]:
    """Every named sequence of every installed source, by name."""
    from importlib.metadata import entry_points

    found: dict[str, SequenceSource] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        source = ep.load()
        for name in source.names:
            found.setdefault(name, source)
    return found


def find_source(name: str) -> SequenceSource | None:
    """The source of a named sequence, or None if no installed source has that name."""
    return sequence_sources().get(name)


def unknown_sequence(text: str, what: str = "--sequence") -> UserInputError:
    names = ", ".join(sequence_sources()) or "none installed"
    return UserInputError(f"{what} {text!r} is neither a named sequence ({names}) nor a sequence folder with a "
                          "sequence.json")
