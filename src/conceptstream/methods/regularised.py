"""One LoRA/VeRA trained through the stream, with optional EWC, DC term and DSC consolidation.

The paper's family (sequential LoRA, LoRA EWC, EWC-DC, DSC, DSC+EWC, DSC+EWC-DC) differs only
in which of three regularisers are switched on; each registered method is a subclass that sets
the switches (see lora.py, lora_ewc.py, ewc_dc.py, dsc.py).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from conceptstream.adapters.registry import trainable_values
from conceptstream.methods.base import ContinualMethod, TaskContext
from conceptstream.methods.config import DCScoresConfig, DCTermConfig, DSCConfig, EWCConfig, TrainConfig
from conceptstream.methods.consolidation import consolidate
from conceptstream.methods.ewc import (
    EWCState,
    dc_log_likelihood,
    dc_term,
    denoise_log_likelihood,
    estimate_fisher,
)


class RegularisedAdapterMethod(ContinualMethod):
    """Sequential adapter training + switchable regularisers.

    A subclass sets the switches and declares the configs they read (checked when it is defined):
    EWC -> ``EWCConfig``, the DC term -> ``DCTermConfig``, anything scored by DC (the DC term, the
    DC Fisher, DSC) -> ``DCScoresConfig``, DSC -> ``DSCConfig``.
    """

    ewc_source: ClassVar[str | None] = None  # None | "denoise" | "dc"
    use_dc_term: ClassVar[bool] = False
    use_dsc: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        needed = {TrainConfig: True, EWCConfig: cls.ewc_source is not None, DCTermConfig: cls.use_dc_term,
                  DCScoresConfig: cls.use_dc_term or cls.ewc_source == "dc" or cls.use_dsc, DSCConfig: cls.use_dsc}
        wanted = tuple(config for config, on in needed.items() if on)
        if tuple(cls.configs) != wanted:
            raise TypeError(f"{cls.__name__} switches on regularisers that read "
                            f"{[c.__name__ for c in wanted]} but declares configs {[c.__name__ for c in cls.configs]}")

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        self.ewc = EWCState()
        self.pool: list[dict[str, torch.Tensor]] = []  # DSC: adapter after each task

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
            penalty = None
            if self.ewc_source and self.ewc.fisher:
                def penalty():
                    return self.ewc.penalty(ctx.unet, self.hparams["ewc_lambda"])
            consolidate(ctx, self.pool, self.hparams, penalty)
        if self.use_dsc:
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
