"""The method-variant grammar shared by ``bench`` and ``bench-speed``: values, settings, method lists.

- a value is JSON when it parses (``10``, ``0.1``, ``true``, ``[1, 2]``), else the string itself;
- a setting is ``KEY=VALUE``; ``--sweep`` takes ``KEY=V1,V2,...``; keys may use ``-`` for ``_``;
- a method list is comma-separated; a method may carry settings in brackets,
  ``lora,ewc-dc[dc_k=2,dc_batch=1]`` (commas inside brackets belong to the method);
- a bench :class:`Variant` is labelled ``ewc-dc``, ``ewc-dc-vera``, ``ewc-dc[ewc_lambda=10]`` and
  stored in ``runs/<method>-<adapter>[_key=value...]``, made file-name safe by :func:`slug`;
- the reference bounds ``single-task`` and ``joint`` (:data:`BOUNDS`) are accepted where a method is:
  plain adapter training (``lora``'s loss, the bench's adapter) of each concept alone from the base model,
  or of all the stream's concepts together.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from conceptstream.errors import UserInputError


def slug(text: str) -> str:
    """``text`` with every character outside ``A-Za-z0-9._=+-`` replaced by ``-`` (file names)."""
    return re.sub(r"[^A-Za-z0-9._=+-]", "-", text)


def parse_value(text: str) -> Any:
    """A setting's value from the command line: JSON when it parses (numbers, booleans, lists), else the string."""
    text = text.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def format_value(value: Any) -> str:
    """The inverse of :func:`parse_value` for labels: strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def setting_key(text: str) -> str:
    """A setting name as typed -> its canonical form (``dc-k`` -> ``dc_k``)."""
    return text.strip().replace("-", "_")


def parse_sweep(text: str) -> tuple[str, list[Any]]:
    """``"ewc_lambda=1,10,100"`` -> ``("ewc_lambda", [1, 10, 100])`` (values parsed as JSON when they can be)."""
    if "=" not in text:
        raise UserInputError(f"--sweep takes KEY=V1,V2,..., got {text!r} (e.g. --sweep ewc_lambda=1,10,100)")
    key, values = text.split("=", 1)
    key = setting_key(key)
    items = [v for v in values.split(",") if v.strip()]
    if not key or not items:
        raise UserInputError(f"--sweep {text!r}: give a setting name and at least one value, e.g. ewc_lambda=1,10")
    return key, [parse_value(v) for v in items]


def parse_setting(text: str) -> tuple[str, Any]:
    """``"dsc_iters=50"`` -> ``("dsc_iters", 50)``: one ``--set`` value."""
    key, values = parse_sweep(text)
    if len(values) != 1:
        raise UserInputError(f"--set {text!r} takes one value; use --sweep for several")
    return key, values[0]


def split_methods(text: str) -> list[str]:
    """``"lora,ewc-dc[dc_k=2,dc_batch=1]"`` -> ``["lora", "ewc-dc[dc_k=2,dc_batch=1]"]`` (commas inside [] kept)."""
    return [m.strip() for m in re.findall(r"[^,\[\]]+(?:\[[^\]]*\])?", text) if m.strip()]


def parse_variant(label: str) -> tuple[str, dict[str, Any]]:
    """``"ewc-dc[dc_k=2,dc_batch=1]"`` -> ``("ewc-dc", {"dc_k": 2, "dc_batch": 1})``; a plain name has no settings."""
    from conceptstream.methods.registry import get_method, method_names, validate_settings

    match = re.fullmatch(r"\s*([\w-]+)\s*(?:\[(.*)\])?\s*", label)
    if match is None or match.group(1) not in method_names():
        raise UserInputError(f"unknown method {label!r} in --methods; choose from: {', '.join(method_names())}, "
                             "optionally with settings, e.g. ewc-dc[dc_k=2,dc_batch=1]")
    method, hparams = match.group(1), {}
    known = get_method(method).all_defaults()
    for item in filter(str.strip, (match.group(2) or "").split(",")):
        key, _, value = item.partition("=")
        key = setting_key(key)
        if key not in known or not value.strip():
            raise UserInputError(f"--methods {label!r}: {method} has no setting {key!r} or it has no value; "
                                 f"its settings: {', '.join(sorted(known))}")
        hparams[key] = parse_value(value)
    validate_settings(method, hparams, adapter=None, flag=f"--methods {label!r}:")
    return method, hparams


# Reference rows of a bench table: not continual methods, but what a continual method is measured against.
BOUNDS: dict[str, str] = {
    "single-task": "each concept learned alone from the base model with a fresh adapter (the plasticity "
                   "ceiling: one model per concept, nothing to forget)",
    "joint": "all concepts of the stream learned together in one run of len(stream) x steps (not "
             "continual: the usual upper bound)",
}
BOUND_METHOD = "lora"  # how a bound trains: the plain denoising loss on the adapter and the tokens


@dataclass(frozen=True)
class Variant:
    """One row of the bench's results: a method, its adapter and the swept settings it runs with.

    A reference bound (``bound`` in :data:`BOUNDS`) trains with :data:`BOUND_METHOD`'s loss."""

    method: str
    adapter: str | None  # None for methods without an adapter (Custom Diffusion, Textual Inversion)
    hparams: tuple[tuple[str, Any], ...] = ()
    bound: str | None = None

    @property
    def sweep_suffix(self) -> str:
        return "[" + ",".join(f"{k}={format_value(v)}" for k, v in self.hparams) + "]" if self.hparams else ""

    @property
    def label(self) -> str:
        """``ewc-dc``, ``ewc-dc[ewc_lambda=10]``; VeRA runs read ``ewc-dc-vera`` (LoRA is the default)."""
        adapter = f"-{self.adapter}" if self.adapter not in (None, "lora") else ""
        return f"{self.bound or self.method}{adapter}{self.sweep_suffix}"

    def task_steps(self, steps: int | None) -> int:
        """Training steps of one task: the bench's ``steps`` when given, else the method's ``default_steps``."""
        from conceptstream.methods.registry import default_steps

        return steps if steps is not None else default_steps(self.method)

    @property
    def dirname(self) -> str:
        """``<method>[-<adapter>][_key=value...]`` with file-name-safe characters only."""
        name = (self.bound or self.method) + (f"-{self.adapter}" if self.adapter else "")
        for k, v in self.hparams:
            name += f"_{k}={format_value(v)}"
        return slug(name)


def expand_variants(methods: Sequence[str], adapter: str = "lora",
                    sweep: Mapping[str, Sequence[Any]] | None = None) -> list[Variant]:
    """Methods x sweep values. A swept key applies to the methods that have that setting; the other
    methods run once with their defaults. Several keys form a grid (every combination). A bound
    (``single-task``, ``joint``) runs once, unswept, on ``adapter``."""
    from conceptstream.methods.registry import adapter_kind_for, get_method

    sweep = dict(sweep or {})
    seen: list[str] = []
    for m in methods:
        m = m.strip()
        if m and m not in seen:
            seen.append(m)
    if not seen:
        raise UserInputError("--methods is empty; give at least one method, e.g. --methods lora,ewc-dc")
    used: set[str] = set()
    variants: list[Variant] = []
    for m in seen:
        if m in BOUNDS:
            variants.append(Variant(BOUND_METHOD, adapter_kind_for(BOUND_METHOD, adapter), bound=m))
            continue
        cls = get_method(m)
        kind = adapter_kind_for(m, adapter) if cls.uses_adapter else None
        keys = [k for k in sweep if k in cls.all_defaults()]
        used.update(keys)
        if not keys:
            variants.append(Variant(m, kind))
            continue
        for combo in itertools.product(*(sweep[k] for k in keys)):
            variants.append(Variant(m, kind, tuple(zip(keys, combo))))
    unused = [k for k in sweep if k not in used]
    if unused:
        raise UserInputError(f"--sweep {unused[0]}: none of the methods {', '.join(seen)} has that setting")
    return variants
