"""The table of registered method classes and the ``@register`` decorator that fills it.

Kept apart from :mod:`conceptstream.methods.registry` (lookups, defaults, validation), which loads
the built-in method modules: a method module imports only this table, so no import cycle forms.
"""

from __future__ import annotations

METHODS: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make a :class:`~conceptstream.methods.base.ContinualMethod` known by its ``name``."""
    METHODS[cls.name] = cls
    return cls
