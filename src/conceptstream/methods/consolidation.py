"""Diffusion Scores Consolidation (the paper's function-space method): the double-distillation phase.

After task n (n > 1): teacher 1 = the adapter just trained (frozen copy), student = initialised
from it, teacher 2 = a past adapter drawn from the pool (redrawn every ``dsc_redraw_every``
iterations). Inputs are noisy *current* images only; one x_t goes to all three models.

``L = w_dc * [H(p_T1, p_S) + H(p_T2, p_S)] + w_eps * [||eps_T1(c_n) - eps_S(c_n)||^2 + ||eps_T2(c_j) - eps_S(c_j)||^2]``

with DC distributions over c_0 + a subset of seen concepts that contains n and j. Teachers run
through ``torch.func.functional_call`` with their own adapter values on the same UNet, so no
model copies are made. The pool grows by one adapter per task (stored in the method state).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

from conceptstream.adapters.registry import adapter_parameters, trainable_values
from conceptstream.methods.base import TaskContext
from conceptstream.models.conditioning import unet_call, unet_forward


def _teacher_forward(unet, values: dict[str, torch.Tensor]):
    def forward(x, t, h):
        args, kwargs = unet_call(h)  # SDXL: the pooled embeds and time ids as added_cond_kwargs
        with torch.no_grad():
            return functional_call(unet, values, (x, t, *args), kwargs, strict=False).sample

    return forward


def consolidate(ctx: TaskContext, pool: list[dict[str, torch.Tensor]], h: Mapping[str, Any],
                penalty: Callable[[], torch.Tensor] | None = None) -> None:
    """Run the DSC phase in place on the UNet's adapter (the student), distilling the adapter just
    trained and the ``pool`` of past adapters; ``penalty`` (e.g. EWC's) is added to every step's loss."""
    from tqdm.auto import tqdm

    unet, dc = ctx.unet, ctx.dc
    teacher1 = trainable_values(unet)
    params = list(adapter_parameters(unet).values())
    opt = torch.optim.AdamW(params, lr=h["lr"], weight_decay=0.0)
    n_past = len(pool)
    cur = ctx.n_seen - 1
    j = 0
    bar = tqdm(range(h["dsc_iters"]), desc="DSC consolidation", leave=False, disable=not ctx.progress)
    for it in bar:
        if it % max(1, h["dsc_redraw_every"]) == 0:
            j = int(torch.randint(0, n_past, (1,), generator=ctx.generator))
        teacher2 = pool[j]
        z = ctx.sample_latents(h["batch_size"])
        with torch.no_grad():
            cond, concept_of, _ = ctx.dc_candidates(h["dc_k"], required=(j,))
        pos_n, pos_j = concept_of.index(cur), concept_of.index(j)
        t, noise = dc.sample_draw(z, ctx.generator)
        err_s, pred_s = _errors_and_preds(dc, z, cond, t, noise, None)
        err_1, pred_1 = _errors_and_preds(dc, z, cond, t, noise, _teacher_forward(unet, teacher1))
        err_2, pred_2 = _errors_and_preds(dc, z, cond, t, noise, _teacher_forward(unet, teacher2))
        logp_s = dc.log_probs(err_s)
        ce = -(dc.log_probs(err_1).exp() * logp_s).sum(-1).mean() - (dc.log_probs(err_2).exp() * logp_s).sum(-1).mean()
        mse = F.mse_loss(pred_s[:, pos_n], pred_1[:, pos_n]) + F.mse_loss(pred_s[:, pos_j], pred_2[:, pos_j])
        loss = h["dsc_w_dc"] * ce + h["dsc_w_eps"] * mse
        if penalty is not None:
            loss = loss + penalty()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ctx.logs.append({"phase": "dsc", "iter": it, "dsc_ce": ce.item(), "dsc_mse": mse.item(), "teacher2": j})


def _errors_and_preds(dc, z, cond, t, noise, forward):
    """DC errors [B, K] plus the noise predictions [B, K, C, H, W] they came from."""
    preds = {}

    def capture(x, tt, hh):
        out = forward(x, tt, hh) if forward is not None else unet_forward(dc.unet, x, tt, hh)
        preds["p"] = out
        return out

    err = dc.errors(z, cond, t, noise, capture)
    b, k = err.shape
    return err, preds["p"].view(b, k, *z.shape[1:])
