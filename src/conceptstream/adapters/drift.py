"""How far an adapter moved: the change of what it adds to the model's weights, for the bench's per-task record.

For a LoRA layer that is ``dW = B @ A`` (its scale is the same before and after, so it cancels in a ratio);
A alone is a random initialisation that moves little, so the raw parameters would understate the change.
Tensors that are not LoRA factors (VeRA's scaling vectors, Custom Diffusion's deltas) are compared as they
are. Every layer goes into one vector, by sorted name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

_LORA = re.compile(r"(.+)\.lora_([AB])\.[^.]+\.weight")


def weight_delta(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One float64 vector of every LoRA layer's ``B @ A`` and every other tensor, flattened, by sorted name."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    rest = []
    for name in sorted(tensors):
        m = _LORA.fullmatch(name)
        if m:
            layers.setdefault(m.group(1), {})[m.group(2)] = tensors[name].detach().double().cpu()
        else:
            rest.append(tensors[name].detach().double().cpu().flatten())
    parts = []
    for _, ab in sorted(layers.items()):
        if set(ab) == {"A", "B"}:
            parts.append((ab["B"] @ ab["A"]).flatten())
        else:  # a lone factor: compared as it is
            parts += [t.flatten() for t in ab.values()]
    return torch.cat(parts + rest) if parts or rest else torch.zeros(0, dtype=torch.float64)


def relative_change(new: torch.Tensor, old: torch.Tensor) -> float | None:
    """``||new - old|| / ||old||``; None when ``old`` is zero or the two differ in size (another adapter)."""
    ref = float(old.norm())
    if ref == 0 or new.shape != old.shape:
        return None
    return float((new - old).norm()) / ref
