"""Adapters on the UNet through peft: LoRA and VeRA behind one small spec and a registry.

Default targets are the cross-attention key/value projections (``attn2.to_k``/``attn2.to_v``),
as in C-LoRA and Custom Diffusion: they map text features into the image stream, which is
where a new word's meaning lives. ``attention`` targets every attention projection.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from conceptstream.errors import UserInputError

TARGETS: dict[str, str] = {
    "cross-kv": r".*attn2\.(to_k|to_v)",
    "attention": r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)",
}
ADAPTER_MARKERS = ("lora_A", "lora_B", "vera_lambda_b", "vera_lambda_d")


@dataclass
class AdapterSpec:
    """What adapter to put on the UNet. ``alpha`` defaults to ``rank`` (scale 1).

    ``seed`` fixes the random part of the initialisation (LoRA's A, VeRA's shared projections);
    :func:`conceptstream.api.learn` sets it to the seed of the task that creates the stream, and a
    saved spec without it (older states) means seed 0.
    """

    kind: str = "lora"
    rank: int = 4
    alpha: float | None = None
    targets: str = "cross-kv"
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AdapterSpec:
        return cls(**{k: d[k] for k in ("kind", "rank", "alpha", "targets", "seed") if k in d})

    def validate(self) -> AdapterSpec:
        if self.kind not in ADAPTERS:
            raise UserInputError(f"unknown adapter {self.kind!r}; choose one of: {', '.join(ADAPTERS)}")
        if self.targets not in TARGETS:
            raise UserInputError(f"unknown adapter targets {self.targets!r}; choose one of: {', '.join(TARGETS)}")
        if self.rank < 1:
            raise UserInputError(f"adapter rank must be >= 1, got {self.rank}")
        return self


def _lora_config(spec: AdapterSpec):
    from peft import LoraConfig

    return LoraConfig(r=spec.rank, lora_alpha=spec.alpha or spec.rank, target_modules=TARGETS[spec.targets],
                      init_lora_weights=True)


def _vera_config(spec: AdapterSpec):
    from peft import VeraConfig

    # VeRA's frozen random projections are shared by all layers; its rank can be high because only
    # the scaling vectors are trained. save_projection keeps the state self-contained.
    return VeraConfig(r=spec.rank, target_modules=TARGETS[spec.targets], projection_prng_key=spec.seed,
                      save_projection=True, d_initial=0.1)


@dataclass(frozen=True)
class AdapterKind:
    """One tuner: how to build its peft config, and the learning rate its trainable part needs."""

    build_config: Callable[[AdapterSpec], Any]
    default_lr: float
    default_rank: int


ADAPTERS: dict[str, AdapterKind] = {
    "lora": AdapterKind(_lora_config, 1e-3, 4),
    # VeRA trains only per-layer scaling vectors over frozen random projections, so it takes larger steps
    # than LoRA: 3e-3 won its rate grid on tabletop-6's val views (3e-3 / 1e-2 / 3e-2, lora and ewc-dc,
    # 2 seeds; stage vera-lr-val, docs/DEFAULTS.md); v1's 1e-2 had been chosen on the views v1 reported.
    # Its rank can be high because only the scaling vectors are trained (the paper uses 64 too).
    "vera": AdapterKind(_vera_config, 3e-3, 64),
}


def adapter_default_lr(kind: str) -> float:
    """The adapter learning rate a method uses on this adapter kind unless ``lr`` is set."""
    AdapterSpec(kind=kind).validate()
    return ADAPTERS[kind].default_lr


def adapter_default_rank(kind: str) -> int:
    """The rank an adapter of this kind gets unless ``--rank`` is given."""
    AdapterSpec(kind=kind).validate()
    return ADAPTERS[kind].default_rank


def adapter_kinds() -> list[str]:
    """The registered adapter kinds (the choices of every ``--adapter`` flag)."""
    return list(ADAPTERS)


# VeRA's shared projections live on peft's tuner object, not in the layers' state; keep the tuner
# alive beside the UNet it modified (a weak map: no reference cycle through nn.Module).
_VERA_TUNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def attach_adapter(unet, spec: AdapterSpec) -> None:
    """Inject the adapter into the UNet (peft), trainable, base weights frozen; its random initialisation
    (LoRA's A, VeRA's projections) is a function of ``spec.seed`` alone."""
    spec.validate()
    unet.requires_grad_(False)
    torch.manual_seed(spec.seed)
    config = ADAPTERS[spec.kind].build_config(spec)
    if spec.kind == "vera":
        from peft.tuners.vera import VeraModel

        _VERA_TUNERS[unet] = VeraModel(unet, config, "default")  # injects in place
    else:
        unet.add_adapter(config)
    for name, p in unet.named_parameters():
        p.requires_grad_(any(m in name for m in ADAPTER_MARKERS))


def adapter_parameters(unet) -> dict[str, torch.nn.Parameter]:
    """The adapter's trainable parameters by name (what EWC, DSC and C-LoRA operate on)."""
    return {n: p for n, p in unet.named_parameters() if any(m in n for m in ADAPTER_MARKERS)}


def adapter_state(unet) -> dict[str, torch.Tensor]:
    """A detached copy of every adapter tensor (trainable and, for VeRA, the shared projections)."""
    state = trainable_values(unet)
    tuner = _VERA_TUNERS.get(unet)
    if tuner is not None:
        state["vera_A"] = tuner.vera_A["default"].detach().clone()
        state["vera_B"] = tuner.vera_B["default"].detach().clone()
    return state


@torch.no_grad()
def load_adapter_state(unet, tensors: dict[str, torch.Tensor]) -> None:
    """Load tensors saved by :func:`adapter_state` into an attached adapter (names must match)."""
    params = adapter_parameters(unet)
    tuner = _VERA_TUNERS.get(unet)
    shared = {"vera_A", "vera_B"} if tuner is not None else set()
    expected = set(params) | shared
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(f"adapter state does not fit this model/adapter (missing {missing[:2]}, unexpected {extra[:2]})")
    for n, p in params.items():
        p.copy_(tensors[n])
    if tuner is not None:
        tuner.vera_A["default"].copy_(tensors["vera_A"])
        tuner.vera_B["default"].copy_(tensors["vera_B"])


def trainable_values(unet) -> dict[str, torch.Tensor]:
    """A detached copy of the trainable adapter parameters (anchors, teachers, pool entries)."""
    return {n: p.detach().clone() for n, p in adapter_parameters(unet).items()}


@torch.no_grad()
def set_trainable_values(unet, values: dict[str, torch.Tensor]) -> None:
    params = adapter_parameters(unet)
    for n, v in values.items():
        params[n].copy_(v)
