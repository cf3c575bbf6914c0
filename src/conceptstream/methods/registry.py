"""Registry of continual methods: a new method is one module plus one ``@register`` line."""

from __future__ import annotations

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
