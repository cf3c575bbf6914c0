"""One LoRA/VeRA trained through the stream, with optional EWC, DC term and DSC consolidation.

The paper's family (sequential LoRA, LoRA EWC, EWC-DC, DSC, DSC+EWC, DSC+EWC-DC) differs only
in which of three regularisers are switched on; each registered method is a subclass that sets
the switches (see lora.py, lora_ewc.py, ewc_dc.py, dsc.py).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from conceptstream.methods.base import ContinualMethod, TaskContext
from conceptstream.methods.ewc import (
    EWC_DEFAULTS,
    EWCState,
    dc_log_likelihood,
    dc_term,
    denoise_log_likelihood,
    estimate_fisher,
)

# dc_temperature mirrors DCConfig.temperature so that --set/--sweep can reach it (the engine keeps both in step)
DC_DEFAULTS = {"dc_delta": 0.1, "dc_k": 2, "dc_batch": 1, "dc_temperature": 0.005}
DSC_DEFAULTS = {"dsc_iters": 25, "dsc_redraw_every": 1, "dsc_w_dc": 1.0, "dsc_w_eps": 1.0}


class RegularisedAdapterMethod(ContinualMethod):
    """Sequential adapter training + switchable regularisers."""

    ewc_source: ClassVar[str | None] = None  # None | "denoise" | "dc"
    use_dc_term: ClassVar[bool] = False
    use_dsc: ClassVar[bool] = False

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        self.ewc = EWCState()
        self.pool: list[dict[str, torch.Tensor]] = []  # DSC: adapter after each task

    @classmethod
    def all_defaults(cls) -> dict[str, Any]:
        d = super().all_defaults()
        if cls.ewc_source:
            d.update(EWC_DEFAULTS)
        if cls.use_dc_term or cls.ewc_source == "dc" or cls.use_dsc:
            d.update({k: v for k, v in DC_DEFAULTS.items() if k != "dc_delta" or cls.use_dc_term})
        if cls.use_dsc:
            d.update(DSC_DEFAULTS)
        return d

    @property
    def state_growth(self) -> str:  # type: ignore[override]
        if self.use_dsc:
            return "one adapter copy per task (the DSC pool of past adapters)"
        return "constant (one Fisher and one anchor the size of the adapter)" if self.ewc_source else "none"

    # -- training ------------------------------------------------------------------------------
    def loss(self, ctx: TaskContext, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        h = self.hparams
        z = ctx.sample_latents(h["batch_size"])
        loss = self.denoise_loss(ctx, z)
        logs = {"denoise": loss.item()}
        if self.use_dc_term:
            term, acc = dc_term(ctx, z[: h["dc_batch"]], h["dc_k"])
            loss = loss + h["dc_delta"] * term
            logs.update(dc=term.item(), dc_acc=acc)
        if self.ewc_source and self.ewc.fisher:
            pen = self.ewc.penalty(ctx.unet, h["ewc_lambda"])
            loss = loss + pen
            logs["ewc"] = pen.item()
        return loss, logs

    def after_task(self, ctx: TaskContext) -> None:
        if self.use_dsc and self.pool:
            from conceptstream.methods.dsc import consolidate

            consolidate(self, ctx)
        if self.use_dsc:
            from conceptstream.adapters.registry import trainable_values

            self.pool.append(trainable_values(ctx.unet))
        if self.ewc_source:
            h = self.hparams
            ll = dc_log_likelihood(ctx, h["dc_k"]) if self.ewc_source == "dc" else denoise_log_likelihood(ctx)
            fisher = estimate_fisher(ctx, ll, h["fisher_passes"])
            self.ewc.consolidate(ctx.unet, fisher, h["ewc_gamma"], h["fisher_norm"])

    # -- state ---------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = self.ewc.state_tensors()
        for j, entry in enumerate(self.pool):
            out.update({f"pool.{j}.{n}": v for n, v in entry.items()})
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.ewc.load_state_tensors(tensors)
        pool: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("pool."):
                _, j, name = k.split(".", 2)
                pool.setdefault(int(j), {})[name] = v
        self.pool = [pool[j] for j in sorted(pool)]
