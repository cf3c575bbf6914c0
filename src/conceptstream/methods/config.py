"""Method settings as documented config dataclasses, and how user values are checked against them.

A method's settings are the union of the fields of the configs it declares (``ContinualMethod.configs``).
The configs shared by several methods are here; a method's own config lives in its module
(``CLoRAConfig`` in c_lora.py, ``CustomDiffusionConfig`` in custom_diffusion.py). Every field is made
by :func:`setting`: a type, a default and ``metadata`` with ``help`` (what it does), ``doc`` (the
section of docs/DEFAULTS.md with the evidence for the default) and the allowed range.
:meth:`SettingSpec.convert` turns a user value (``--set``, ``--sweep``, ``api.learn(hparams=...)``)
into the field's type or raises a one-line :class:`~conceptstream.errors.UserInputError`. This module
imports nothing heavy (the DC scorer reads it too).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import typing
from dataclasses import dataclass, field
from typing import Any

from conceptstream.errors import UserInputError

DEFAULTS_DOC = "docs/DEFAULTS.md"
TABLE = f"{DEFAULTS_DOC}#method-defaults-and-the-evidence-behind-them"  # the table of every default
SWEEPS = f"{DEFAULTS_DOC}#sweeps-on-tabletop-6-one-seed"
# Training steps of one task when the caller gives none; a method may set its own (ContinualMethod.default_steps).
DEFAULT_STEPS = 200


def setting(default: Any, help: str, doc: str = TABLE, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, choices: tuple[str, ...] | None = None) -> Any:
    """A config field: its default, what it does, where DEFAULTS.md documents it, and its allowed range
    (``ge``: >=, ``gt``: >, ``le``: <=, ``choices`` for a string)."""
    return field(default=default, metadata={"help": help, "doc": doc, "ge": ge, "gt": gt, "le": le,
                                            "choices": choices})


_INVALID = object()
_TRUE, _FALSE = ("true", "1"), ("false", "0")


@dataclass(frozen=True)
class SettingSpec:
    """One setting as a field of a config dataclass declares it."""

    name: str
    type: type
    default: Any
    help: str
    doc: str
    config: type
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    choices: tuple[str, ...] | None = None

    @property
    def allowed(self) -> str:
        """What the setting takes, in words: ``a number >= 0``, ``an integer >= 1``, ``true or false``."""
        if self.type is bool:
            return "true or false"
        if self.choices:
            return "one of " + ", ".join(self.choices)
        kind = "an integer" if self.type is int else "a number"
        if self.ge is not None and self.le is not None:
            return f"{kind} in [{_num(self.ge)}, {_num(self.le)}]"
        bounds = [f"{op} {_num(v)}" for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le)) if v is not None]
        return " ".join([kind, *bounds[:1]]) + "".join(f" and {b}" for b in bounds[1:])

    def convert(self, value: Any, flag: str = "--set") -> Any:
        """``value`` as the setting's type, within its range; a UserInputError naming key, value and range if not.

        Strings are parsed (``"1e-3"``, ``"4"``, ``"true"``); an int given for a number field stays an int
        (same arithmetic, and manifests keep what was given); an integral number is taken for an integer."""
        parsed = self._parse(value)
        if parsed is _INVALID or not self._in_range(parsed):
            shown = value if isinstance(value, str) else repr(value)
            raise UserInputError(f"{flag} {self.name}={shown}: {self.name} must be {self.allowed} ({self.help}), "
                                 f"got {value!r}")
        return parsed

    def _parse(self, value: Any) -> Any:
        if self.type is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower() if isinstance(value, (str, numbers.Integral)) else None
            return True if text in _TRUE else False if text in _FALSE else _INVALID
        if self.type is str:
            return value.strip() if isinstance(value, str) else _INVALID
        if isinstance(value, bool):
            return _INVALID
        if isinstance(value, str):
            number: Any = _number(value.strip())
        elif isinstance(value, numbers.Integral):
            number = int(value)
        elif isinstance(value, numbers.Real):
            number = float(value)
        else:
            return _INVALID
        if number is _INVALID or not math.isfinite(number):
            return _INVALID
        if self.type is int:
            return int(number) if float(number).is_integer() else _INVALID
        return number

    def _in_range(self, value: Any) -> bool:
        if self.type is bool:
            return True
        if self.choices:
            return value in self.choices
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le))


def _number(text: str) -> Any:
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            continue
    return _INVALID


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


@functools.cache
def config_specs(config: type) -> dict[str, SettingSpec]:
    """``{name: SettingSpec}`` of one config dataclass, in field order."""
    hints = typing.get_type_hints(config)
    out = {}
    for f in dataclasses.fields(config):
        meta = f.metadata
        if "help" not in meta or "doc" not in meta:
            raise TypeError(f"{config.__name__}.{f.name} is not declared with setting(...)")
        out[f.name] = SettingSpec(f.name, hints[f.name], f.default, meta["help"], meta["doc"], config,
                                  meta.get("ge"), meta.get("gt"), meta.get("le"), meta.get("choices"))
    return out


def setting_specs(configs: tuple[type, ...]) -> dict[str, SettingSpec]:
    """Every setting of a tuple of configs, in declaration order; a name declared twice is a bug."""
    out: dict[str, SettingSpec] = {}
    for config in configs:
        for name, spec in config_specs(config).items():
            if name in out:
                raise TypeError(f"setting {name!r} is declared by both {out[name].config.__name__} and "
                                f"{config.__name__}")
            out[name] = spec
    return out


# -- configs shared by several methods --------------------------------------------------------------
@dataclass
class TrainConfig:
    """Training settings every method has."""

    lr: float = setting(1e-3, "adapter learning rate; the method and the adapter kind set the default (docs/DEFAULTS.md)", gt=0)
    token_lr: float = setting(5e-3, "learning rate of the new token's embedding row", gt=0)
    batch_size: int = setting(4, "latent samples per training step", ge=1)


@dataclass
class EWCConfig:
    """EWC on the adapter (LoRA EWC, EWC-DC and the DSC+EWC methods)."""

    ewc_lambda: float = setting(100.0, "EWC penalty weight", SWEEPS, ge=0)
    ewc_gamma: float = setting(1.0, "decay of the past Fisher per task, F <- gamma * F + F_n; 1 = no decay", SWEEPS,
                               ge=0, le=1)
    fisher_passes: int = setting(2, "passes over the task's images when estimating the Fisher", SWEEPS, ge=1)
    fisher_norm: bool = setting(True, "divide each task's Fisher by its mean so lambda means the same at any scale")


@dataclass
class DCTermConfig:
    """The DC loss term (EWC-DC and DSC+EWC-DC): pull the DC posterior to the current concept."""

    dc_delta: float = setting(0.1, "weight of the DC loss term", SWEEPS, ge=0)


@dataclass
class DCScoresConfig:
    """How the DC-based regularisers score (EWC-DC's Fisher, the DC term, DSC's distillation)."""

    dc_k: int = setting(2, "seen concepts among the DC candidates besides c_0, the current one included",
                        SWEEPS, ge=1)
    dc_batch: int = setting(1, "images per step that get the DC term; each costs dc_k + 1 UNet rows", SWEEPS,
                            ge=1)
    # The one home of the DC temperature: scoring.dc.DCConfig.temperature defaults to this value and the
    # engine keeps a stream's DC config in step with this setting.
    dc_temperature: float = setting(0.005, "softmax temperature of DC scores: p(c|x) = softmax(-error / T)",
                                    SWEEPS, gt=0)


@dataclass
class DSCConfig:
    """Diffusion Scores Consolidation after each task from the second on (the DSC methods)."""

    dsc_iters: int = setting(25, "consolidation iterations after each task; 0 = none", f"{DEFAULTS_DOC}#dsc-dsc_iters",
                             ge=0)
    dsc_redraw_every: int = setting(1, "iterations between redraws of the past adapter used as teacher 2", ge=1)
    dsc_w_dc: float = setting(1.0, "weight of the DC cross-entropy to both teachers", ge=0)
    dsc_w_eps: float = setting(1.0, "weight of the noise-prediction MSE to both teachers", ge=0)
