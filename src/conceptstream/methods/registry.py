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


def fixed_adapter(name: str) -> str | None:
    """The adapter kind a method runs on whatever ``--adapter`` says, where it is defined on one kind
    only (C-LoRA's locked buffer is LoRA's B A); None where it follows ``--adapter``."""
    kinds = get_method(name).adapter_kinds
    return kinds[0] if kinds is not None and len(kinds) == 1 else None


def adapter_kind_for(name: str, requested: str) -> str:
    """The adapter kind a method runs on when ``requested`` is asked for (bench and bench-speed)."""
    return fixed_adapter(name) or requested


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
