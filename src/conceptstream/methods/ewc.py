"""Elastic weight consolidation over adapter parameters, with the Fisher from either the plain
denoising loss ("LoRA EWC") or the DC log-likelihood ("EWC-DC").

State is one Fisher and one anchor, each the size of the adapter: constant in the number of
tasks. Fisher estimates are accumulated online, ``F <- gamma * F + F_n``. Each task's
``F_n`` is divided by its mean (``fisher_norm``) so that ``lambda`` has the same meaning for
every model size and loss scale; set ``fisher_norm=False`` for the raw squared gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from conceptstream.adapters.registry import adapter_parameters
from conceptstream.methods.base import TaskContext


class EWCState:
    """Fisher + anchor and the quadratic penalty."""

    def __init__(self) -> None:
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    def penalty(self, unet, ewc_lambda: float) -> torch.Tensor:
        params = adapter_parameters(unet)
        if not self.fisher:
            return next(iter(params.values())).new_zeros(())
        total = sum((self.fisher[n] * (p - self.anchor[n]).pow(2)).sum() for n, p in params.items())
        return 0.5 * ewc_lambda * total

    @torch.no_grad()
    def consolidate(self, unet, task_fisher: dict[str, torch.Tensor], gamma: float, normalise: bool) -> None:
        if normalise:
            mean = torch.cat([f.flatten() for f in task_fisher.values()]).mean().clamp_min(1e-30)
            task_fisher = {n: f / mean for n, f in task_fisher.items()}
        for n, f in task_fisher.items():
            self.fisher[n] = gamma * self.fisher[n] + f if n in self.fisher else f.clone()
        self.anchor = {n: p.detach().clone() for n, p in adapter_parameters(unet).items()}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"fisher.{n}": f for n, f in self.fisher.items()}
        out.update({f"anchor.{n}": a for n, a in self.anchor.items()})
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.fisher = {k[len("fisher."):]: v for k, v in tensors.items() if k.startswith("fisher.")}
        self.anchor = {k[len("anchor."):]: v for k, v in tensors.items() if k.startswith("anchor.")}


def estimate_fisher(ctx: TaskContext, log_likelihood: Callable[[torch.Tensor], torch.Tensor],
                    passes: int) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher: mean over images x passes of squared per-image gradients."""
    params = adapter_parameters(ctx.unet)
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    count = 0
    n_images = ctx.latent_mean.shape[0]
    for _ in range(passes):
        for i in range(n_images):
            eps = torch.randn(ctx.latent_mean[i : i + 1].shape, generator=ctx.generator)
            z = (ctx.latent_mean[i : i + 1] + ctx.latent_std[i : i + 1] * eps).to(ctx.device)
            ll = log_likelihood(z)
            grads = torch.autograd.grad(ll, list(params.values()), allow_unused=True)
            for (n, _), g in zip(params.items(), grads):
                if g is not None:
                    fisher[n] += g.detach().pow(2)
            count += 1
    return {n: f / max(count, 1) for n, f in fisher.items()}


def denoise_log_likelihood(ctx: TaskContext) -> Callable[[torch.Tensor], torch.Tensor]:
    """log-likelihood surrogate of plain EWC: the negative denoising loss."""

    def ll(z: torch.Tensor) -> torch.Tensor:
        from conceptstream.methods.base import ContinualMethod

        return -ContinualMethod.denoise_loss(ctx, z)

    return ll


def dc_log_likelihood(ctx: TaskContext, k: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """log p_theta(c_n | x) under DC scores (one shared (t, eps) draw per call)."""

    def ll(z: torch.Tensor) -> torch.Tensor:
        cond, _, pos = ctx.dc_candidates(k)
        return ctx.dc.train_log_probs(z, cond, ctx.generator)[:, pos].sum()

    return ll


def dc_term(ctx: TaskContext, z: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """The paper's DC regulariser: pull p toward the current concept, push it from c_0 and the past.

    ``sum_i (2*[i == n] - 1) * H(p, c_i)`` has an unbounded push term (``+log p_i`` -> -inf);
    we use the bounded surrogate ``-log(1 - p_i)`` for i != n (same direction, >= 0).
    Returns the term and the DC accuracy of the batch (for logs).
    """
    cond, _, pos = ctx.dc_candidates(k)
    logp = ctx.dc.train_log_probs(z, cond, ctx.generator)
    p = logp.exp()
    pull = -logp[:, pos]
    push = -torch.log1p(-p.clamp(max=1 - 1e-6))
    push = push.sum(-1) - push[:, pos]
    acc = (logp.argmax(-1) == pos).float().mean().item()
    return (pull + push).mean(), acc
