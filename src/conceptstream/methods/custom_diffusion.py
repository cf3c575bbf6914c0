"""Custom Diffusion (Kumari et al. 2023), run sequentially: fine-tune the cross-attention K/V
projections directly (no adapter) together with the new token.

State is one dense delta per K/V weight (constant in the number of tasks). Export writes it as
an exact full-rank LoRA (``A = I``, ``B = delta``) that stock diffusers loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from conceptstream.methods.base import ContinualMethod, TaskContext
from conceptstream.methods.config import TrainConfig, setting
from conceptstream.methods.registration import register


@dataclass
class CustomDiffusionConfig(TrainConfig):
    """Training settings of Custom Diffusion: ``lr`` is the rate of the K/V weights themselves."""

    lr: float = setting(1e-4, "learning rate of the cross-attention K/V weights, trained directly without an adapter",
                        gt=0)


def cross_kv_layers(unet) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in unet.named_modules()
            if isinstance(m, torch.nn.Linear) and (n.endswith("attn2.to_k") or n.endswith("attn2.to_v"))}


@register
class CustomDiffusion(ContinualMethod):
    name = "custom-diffusion"
    uses_adapter = False
    state_growth = "constant (one delta per cross-attention K/V weight)"
    configs = (CustomDiffusionConfig,)
    # The winner of its equal tuning grid on tabletop-6's val views (benchmarks/results/tuning/, docs/DEFAULTS.md)
    defaults = {"token_lr": 2e-3}

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        self.delta: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def setup(self, unet, n_tasks_done: int) -> None:
        self._layers = cross_kv_layers(unet)
        self._original = {n: m.weight.detach().clone() for n, m in self._layers.items()}
        for n, d in self.delta.items():
            self._layers[n].weight += d.to(self._layers[n].weight.dtype)

    def trainable_groups(self, ctx: TaskContext, token_rows):
        for m in self._layers.values():
            m.weight.requires_grad_(True)
        groups = [{"params": [m.weight for m in self._layers.values()], "lr": self.hparams["lr"], "name": "kv"}]
        if token_rows is not None:
            groups.append({"params": [token_rows], "lr": self.hparams["token_lr"], "name": "token"})
        return groups

    @torch.no_grad()
    def after_task(self, ctx: TaskContext) -> None:
        self.delta = {n: (m.weight.detach() - self._original[n]).clone() for n, m in self._layers.items()}
        for n, m in self._layers.items():
            # W0 + (W - W0) can differ from W by round-off: use the weights a reload rebuilds, bit for bit
            m.weight.copy_(self._original[n] + self.delta[n].to(m.weight.dtype))
            m.weight.requires_grad_(False)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"delta.{n}": d for n, d in self.delta.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.delta = {k[len("delta."):]: v for k, v in tensors.items()}

    def export_lora(self, unet) -> dict[str, torch.Tensor]:
        out = {}
        for n, d in self.delta.items():
            out[f"{n}.lora_A.weight"] = torch.eye(d.shape[1], dtype=d.dtype)
            out[f"{n}.lora_B.weight"] = d.clone()
        return out
