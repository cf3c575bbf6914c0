"""One declaration per setting of a bench command, and the argparse arguments built from it.

An :class:`Option` names a setting once: its keyword, command-line flag, type, default, value under
``--quick``, help text and, for ``bench``, how it takes part in a saved run's compatibility check.
Everything else (the CLI arguments, the settings' defaults, the resume check) is read from it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()  # an Option without a --quick value of its own


class LazyChoices:
    """argparse ``choices`` computed on first use, so building the parser imports nothing heavy."""

    def __init__(self, source: Callable[[], Iterable[str]]) -> None:
        self._source = source

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._source()))

    def __contains__(self, value: object) -> bool:
        return value in list(self._source())


def adapter_choices() -> LazyChoices:
    """The registered adapter kinds (:func:`conceptstream.adapters.registry.adapter_kinds`), lazily."""

    def kinds() -> list[str]:
        from conceptstream.adapters.registry import adapter_kinds

        return adapter_kinds()

    return LazyChoices(kinds)


@dataclass(frozen=True)
class Option:
    """One setting. ``flag=None``: keyword only (not on the command line).

    ``check`` says how a ``bench`` setting enters a saved run's config (a run made with other values
    is refused): ``"run"`` under its own name, ``"generation"``/``"data"``/``"model"``/``"features"``
    through that record of the config, ``"variant"``/``"seed"`` through the run's folder, ``None``
    not at all (it does not change the numbers). ``omit_default``: left out of the config at its
    default, so runs saved before the option existed stay valid."""

    name: str
    help: str
    default: Any = None
    quick: Any = UNSET
    type: Callable[[str], Any] | None = None
    flag: str | None = ""  # "" = "--" + name with dashes
    choices: Any = None
    metavar: str | None = None
    action: str | None = None  # "store_true", "store_false", "append"
    required: bool = False
    check: str | None = None
    omit_default: bool = False
    minimum: int | None = None
    shown_default: str | None = None  # the default as help shows it, where it is resolved later (None)

    @property
    def cli_flag(self) -> str | None:
        if self.flag is None:
            return None
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def label(self) -> str:
        """How errors name the option: its flag, or its keyword where it has none."""
        return self.cli_flag or self.name

    def value(self, given: Any, quick: bool) -> Any:
        """``given`` unless it is None; else the ``--quick`` value in quick mode; else the default."""
        if given is not None:
            return given
        if quick and self.quick is not UNSET:
            return self.quick
        return self.default

    def help_text(self, for_argparse: bool = False) -> str:
        """The help with its default and --quick value; for argparse also the choices (``%`` escaped)."""
        text = self.help.replace("%", "%%") if for_argparse else self.help
        if self.action in ("store_true", "store_false", "append"):
            return text
        notes = ["one of %(choices)s"] if for_argparse and self.choices is not None else []
        if self.shown_default is not None:
            notes.append(f"default {self.shown_default}")
        elif self.default is not None:
            notes.append(f"default {_shown(self.default)}")
        if self.quick is not UNSET:
            notes.append(f"{_shown(self.quick)} with --quick")
        return f"{text} ({'; '.join(notes)})" if notes else text


def _shown(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ", ".join(map(str, value)) if value else "none"
    return str(value)


def add_arguments(parser: argparse.ArgumentParser, options: Sequence[Option]) -> None:
    """One argparse argument per option with a flag; its dest is the option's name and its default
    None (resolved later, so that --quick values apply only to options not given)."""
    for o in options:
        if o.cli_flag is None:
            continue
        kwargs: dict[str, Any] = {"dest": o.name, "help": o.help_text(for_argparse=True)}
        if o.action == "store_true":
            kwargs.update(action="store_true", default=False)
        elif o.action == "store_false":
            kwargs.update(action="store_false", default=True)
        elif o.action == "append":
            kwargs.update(action="append", default=[])
        else:
            kwargs["default"] = None
            if o.type is not None:
                kwargs["type"] = o.type
        if o.choices is not None:  # with a metavar, so that argparse lists lazy choices only in --help
            kwargs["choices"] = o.choices
            kwargs["metavar"] = o.metavar or o.name.upper()
        elif o.metavar is not None:
            kwargs["metavar"] = o.metavar
        if o.required:
            kwargs["required"] = True
        parser.add_argument(o.cli_flag, **kwargs)


def cli_values(args: argparse.Namespace, options: Sequence[Option]) -> dict[str, Any]:
    """The values of the options that have a flag, by option name (what the command passes on)."""
    return {o.name: getattr(args, o.name) for o in options if o.cli_flag is not None}
