"""What a UNet call is conditioned on, for SD 1.x/2.x and SDXL alike.

SD 1.x/2.x conditioning is a plain tensor of text-encoder hidden states ``[..., L, D]``: every function
here passes it through exactly as the code did before SDXL existed (same ops, bit-identical results).

SDXL conditioning is a :class:`Conditioning`: the prompt embedding (both encoders' penultimate hidden
states concatenated on the last dim, ``[..., L, 768 + 1280]``), the pooled embedding of the second
encoder's projection ``[..., 1280]`` and the micro-conditioning time ids ``[..., 6]`` (original size,
crop (0, 0), target size), as ``StableDiffusionXLPipeline.encode_prompt`` / ``_get_add_time_ids`` build
them. Leading dims (prompts, candidates, images x candidates) are the same for all three fields.

Every UNet call of the package goes through :func:`unet_forward` (or :func:`unet_call` for
``torch.func.functional_call``), so both kinds reach the UNet with what it needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Conditioning:
    """SDXL conditioning: hidden states ``[..., L, D]``, pooled embeds ``[..., P]``, time ids ``[..., 6]``."""

    hidden: torch.Tensor
    pooled: torch.Tensor
    time_ids: torch.Tensor

    def __getitem__(self, index) -> Conditioning:
        """Index the leading (prompt/candidate) dims of every field."""
        return Conditioning(self.hidden[index], self.pooled[index], self.time_ids[index])

    def to(self, *args: Any, **kwargs: Any) -> Conditioning:
        return Conditioning(self.hidden.to(*args, **kwargs), self.pooled.to(*args, **kwargs),
                            self.time_ids.to(*args, **kwargs))

    def contiguous(self) -> Conditioning:
        return Conditioning(self.hidden.contiguous(), self.pooled.contiguous(), self.time_ids.contiguous())

    def detach(self) -> Conditioning:
        return Conditioning(self.hidden.detach(), self.pooled.detach(), self.time_ids.detach())

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def dtype(self) -> torch.dtype:
        return self.hidden.dtype


Cond = torch.Tensor | Conditioning


def stack(items: list[Cond]) -> Cond:
    """``torch.stack`` of per-prompt conditionings (e.g. candidates -> ``[K, L, D]``)."""
    if isinstance(items[0], Conditioning):
        return Conditioning(torch.stack([c.hidden for c in items]), torch.stack([c.pooled for c in items]),
                            torch.stack([c.time_ids for c in items]))
    return torch.stack(items)


def cat(items: list[Cond]) -> Cond:
    """``torch.cat`` along the first (prompt) dim."""
    if isinstance(items[0], Conditioning):
        return Conditioning(torch.cat([c.hidden for c in items]), torch.cat([c.pooled for c in items]),
                            torch.cat([c.time_ids for c in items]))
    return torch.cat(items)


def candidate_count(cond: Cond) -> int:
    """K of candidates ``[K, L, D]`` or ``[B, K, L, D]``."""
    hidden = cond.hidden if isinstance(cond, Conditioning) else cond
    return hidden.shape[-3]


def per_image_candidates(cond: Cond, b: int) -> Cond:
    """Candidates ``[K, ...]`` (shared by all images) or ``[B, K, ...]`` flattened to ``[B * K, ...]``,
    image-major, as the DC batch (images x candidates) lines them up."""
    if isinstance(cond, Conditioning):
        shared = cond.hidden.dim() == 3
        k = cond.hidden.shape[-3]

        def flat(x: torch.Tensor, tail: int) -> torch.Tensor:
            if shared:
                x = x.unsqueeze(0).expand(b, *([-1] * x.dim()))
            return x.reshape(b * k, *x.shape[x.dim() - tail:])

        return Conditioning(flat(cond.hidden, 2), flat(cond.pooled, 1), flat(cond.time_ids, 1))
    k = cond.shape[-3]
    if cond.dim() == 3:
        cond = cond.unsqueeze(0).expand(b, -1, -1, -1)
    return cond.reshape(b * k, *cond.shape[-2:])


def unet_call(cond: Cond) -> tuple[tuple, dict[str, Any]]:
    """The conditioning's positional args (after ``x, t``) and keyword args of a UNet call."""
    if isinstance(cond, Conditioning):
        return (cond.hidden,), {"added_cond_kwargs": {"text_embeds": cond.pooled, "time_ids": cond.time_ids}}
    return (cond,), {}


def unet_forward(unet, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    """The UNet's prediction for ``x`` at ``t`` under ``cond`` (SD 1.x: ``unet(x, t, cond).sample``)."""
    if isinstance(cond, Conditioning):
        args, kwargs = unet_call(cond)
        return unet(x, t, *args, **kwargs).sample
    return unet(x, t, cond).sample


def sdxl_time_ids(resolution: int) -> tuple[int, ...]:
    """SDXL's micro-conditioning for a square image of the model's resolution: original size, crop (0, 0),
    target size (``StableDiffusionXLPipeline._get_add_time_ids`` with the pipeline's defaults)."""
    return (resolution, resolution, 0, 0, resolution, resolution)


def encode_sdxl_prompts(tokenizers: list, text_encoders: list, prompts: list[str], time_ids: tuple[int, ...],
                        device: torch.device | str = "cpu") -> Conditioning:
    """SDXL's prompt conditioning as ``StableDiffusionXLPipeline.encode_prompt`` builds it (no clip skip):
    each encoder's penultimate hidden states, concatenated on the last dim; the pooled embedding of the
    last encoder with a projection."""
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        out = encoder(ids, output_hidden_states=True)
        if out[0].ndim == 2:
            pooled = out[0]
        hidden.append(out.hidden_states[-2])
    if pooled is None:
        raise ValueError("the SDXL text encoders give no pooled embedding (text_encoder_2 needs a projection)")
    h = torch.cat(hidden, dim=-1)
    ids = torch.tensor([list(time_ids)] * len(prompts), dtype=h.dtype, device=h.device)
    return Conditioning(h, pooled, ids)


def encode_conditioning(pairs: list[tuple], prompts: list[str], time_ids: tuple[int, ...] | None,
                        device: torch.device | str = "cpu") -> Cond:
    """The UNet conditioning of ``prompts`` from the pipeline's ``(tokenizer, text encoder)`` pairs
    (:func:`~conceptstream.models.tokens.encoder_pairs`): hidden states ``[N, L, D]`` for one encoder (SD
    1.x/2.x), a :class:`Conditioning` (hidden states, pooled embeds, ``time_ids``) for SDXL's two."""
    if len(pairs) == 1:
        from conceptstream.models.tokens import encode_prompts

        (tokenizer, encoder), = pairs
        return encode_prompts(tokenizer, encoder, prompts, device)
    return encode_sdxl_prompts([t for t, _ in pairs], [e for _, e in pairs], prompts, time_ids, device)
