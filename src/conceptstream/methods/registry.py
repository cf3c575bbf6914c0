"""Looking up continual methods: by name, their defaults, and validation of user settings.

A new method is one module (with its config dataclass) plus one ``@register`` line
(:mod:`conceptstream.methods.registration`) and its import in ``_load_builtin`` below.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from conceptstream.errors import UserInputError
from conceptstream.methods.registration import METHODS


def get_method(name: str) -> type:
    _load_builtin()
    if name not in METHODS:
        raise UserInputError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def method_defaults(name: str, adapter: str | None = "lora") -> dict[str, Any]:
    """Every setting of a method with its default, where the adapter kind sets ``lr`` (VeRA's vectors
    need a larger step than LoRA's matrices) unless the method has its own rate for that kind."""
    from conceptstream.adapters.registry import adapter_default_lr

    cls = get_method(name)
    defaults = cls.all_defaults()
    if cls.uses_adapter and adapter is not None:
        if cls.adapter_kinds is not None and adapter not in cls.adapter_kinds:
            raise UserInputError(f"method {name!r} is defined on {' or '.join(cls.adapter_kinds)} adapters, not "
                                 f"{adapter!r}; use --adapter {cls.adapter_kinds[0]} or another method")
        defaults["lr"] = cls.adapter_lr[adapter] if adapter in cls.adapter_lr else adapter_default_lr(adapter)
    return defaults


def validate_settings(method: str, settings: Mapping[str, Any], adapter: str | None = "lora", *,
                      flag: str = "--set") -> dict[str, Any]:
    """``settings`` converted to their fields' types (``"1e-3"``, ``"4"``, ``"true"`` from the command line)
    and checked against their ranges; only the given keys are returned.

    An unknown key, a wrong type or an out-of-range value raises a one-line UserInputError naming the key,
    the value and what is allowed (``flag`` names where it came from: ``--set``, ``--sweep``). ``adapter``
    also refuses a method not defined on that adapter kind (None: not checked).
    """
    method_defaults(method, adapter)  # unknown method, or a method not defined on this adapter kind
    specs = get_method(method).setting_specs()
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if key not in specs:
            raise UserInputError(f"{flag} {key}={value}: method {method!r} has no setting {key!r}; it takes: "
                                 f"{', '.join(sorted(specs))}")
        out[key] = specs[key].convert(value, flag)
    return out


def fixed_adapter(name: str) -> str | None:
    """The adapter kind a method runs on whatever ``--adapter`` says, where it is defined on one kind
    only (C-LoRA's locked buffer is LoRA's B A); None where it follows ``--adapter``."""
    kinds = get_method(name).adapter_kinds
    return kinds[0] if kinds is not None and len(kinds) == 1 else None


def adapter_kind_for(name: str, requested: str) -> str:
    """The adapter kind a method runs on when ``requested`` is asked for (bench and bench-speed)."""
    return fixed_adapter(name) or requested


def default_steps(name: str) -> int:
    """Training steps of one task of ``name`` when the caller gives none."""
    return get_method(name).default_steps


def method_names() -> list[str]:
    _load_builtin()
    return list(METHODS)


def _load_builtin() -> None:
    # Importing the modules runs their @register decorators.
    from conceptstream.methods import (  # noqa: F401
        c_lora,
        custom_diffusion,
        dsc,
        ewc_dc,
        lora,
        lora_ewc,
        textual_inversion,
    )
