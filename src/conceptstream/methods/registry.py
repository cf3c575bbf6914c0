"""Registry of continual methods: a new method is one module plus one ``@register`` line."""

from __future__ import annotations

from typing import Any

from conceptstream.errors import UserInputError

METHODS: dict[str, type] = {}


def register(cls: type) -> type:
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type:
    _load_builtin()
    if name not in METHODS:
        raise UserInputError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def method_defaults(name: str, adapter: str | None = "lora") -> dict[str, Any]:
    """Every setting of a method with its default, where the adapter kind sets ``lr`` (VeRA's vectors
    need a larger step than LoRA's matrices)."""
    from conceptstream.adapters.registry import adapter_default_lr

    cls = get_method(name)
    defaults = cls.all_defaults()
    if cls.uses_adapter and adapter is not None:
        defaults["lr"] = adapter_default_lr(adapter)
    return defaults


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
