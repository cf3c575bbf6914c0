"""Sampling with adapters merged into the base weights (a step costs what a bare base-model step costs)."""

from __future__ import annotations

from typing import Any

import torch


def fused_adapters(module: torch.nn.Module):
    """Context manager: every peft adapter layer (LoRA, VeRA) of ``module`` merged into its base layer.

    peft's ``merge()`` adds the adapter's dense delta to the base weight and switches the layer to
    the plain base forward. The merge runs on a copy of each base parameter; on exit the layers are
    unmerged and the original parameter tensors are put back, so base weights are bitwise what they
    were and the adapter parameters are never touched (training after sampling is unaffected).
    Costs one copy of each adapted base weight while active.
    """
    import contextlib
    import warnings

    from peft.tuners.tuners_utils import BaseTunerLayer

    @contextlib.contextmanager
    def fused():
        layers = [m for m in module.modules()
                  if isinstance(m, BaseTunerLayer) and not m.merged and not m.disable_adapters]
        saved: list[tuple[Any, torch.nn.Module, dict[str, torch.Tensor]]] = []
        try:
            with torch.no_grad():
                for layer in layers:
                    base = layer.get_base_layer()
                    params = dict(base.named_parameters(recurse=False))
                    saved.append((layer, base, {name: p.data for name, p in params.items()}))
                    for p in params.values():
                        p.data = p.data.clone()
                    layer.merge()
            yield module
        finally:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for layer, base, originals in reversed(saved):
                    if layer.merged:
                        layer.unmerge()  # clears peft's merged flag (the arithmetic hits the copy)
                    for name, p in base.named_parameters(recurse=False):
                        p.data = originals[name]

    return fused()
