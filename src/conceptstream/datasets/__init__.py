"""Readers that convert real personalization datasets into the concept folder format.

Every reader is ``convert_<dataset>(src, dst, ...) -> list[ConceptFolder]`` and shares the keyword
arguments ``eval_fraction`` (deterministic held-out share, at least one eval image when a concept
has two or more), ``size`` (optional square resize), ``seed`` (split/subsample seed),
``max_images`` (cap per concept) and ``overwrite``. Each module's docstring gives the exact input
layout it expects.
"""

from __future__ import annotations

from collections.abc import Callable

from conceptstream.concepts.folder import ConceptFolder
from conceptstream.datasets.celeba import convert_celeba
from conceptstream.datasets.customconcept101 import convert_customconcept101
from conceptstream.datasets.landmarks import convert_landmarks
from conceptstream.datasets.textual_inversion import TI_NOUNS, convert_textual_inversion
from conceptstream.errors import UserInputError

READERS: dict[str, Callable[..., list[ConceptFolder]]] = {
    "customconcept101": convert_customconcept101,
    "textual-inversion": convert_textual_inversion,
    "landmarks": convert_landmarks,
    "celeba": convert_celeba,
}


def get_reader(name: str) -> Callable[..., list[ConceptFolder]]:
    """The converter for a dataset name, with a one-line error listing the known names."""
    key = str(name).strip().lower().replace("_", "-")
    if key not in READERS:
        raise UserInputError(f"unknown dataset {name!r}; choose one of {', '.join(READERS)}")
    return READERS[key]


__all__ = [
    "READERS",
    "TI_NOUNS",
    "convert_celeba",
    "convert_customconcept101",
    "convert_landmarks",
    "convert_textual_inversion",
    "get_reader",
]
