"""Modifier tokens: one new token per concept, trained in its own task and frozen afterwards.

The text encoder's embedding table stays frozen. The token being learned lives in a separate
parameter spliced into the embedding output (:class:`ConceptEmbedding`), so rows of earlier
concepts cannot change, not even by optimizer round-off: they are never part of any optimizer.

SDXL has two tokenizers and text encoders (CLIP-L, CLIP-G): a new token is added to both
(:func:`encoder_pairs`), and its two rows are trained as one parameter ``[n, D1 + D2]`` whose column
slices each encoder's :class:`ConceptEmbedding` reads (AdamW is elementwise, so this trains exactly
as two parameters would).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from conceptstream.concepts.folder import validate_token
from conceptstream.errors import UserInputError

TOKEN_IN_PROMPT = re.compile(r"<[^<>\s]+>")


class ConceptEmbedding(nn.Module):
    """Wraps the frozen token embedding; rows of ``trainable_ids`` come from ``self.rows``."""

    def __init__(self, base: nn.Embedding, trainable_ids: list[int], rows: nn.Parameter | None = None,
                 columns: slice | None = None) -> None:
        """``rows``/``columns``: read this encoder's rows as ``rows[:, columns]`` of a parameter shared with
        the other encoder's wrapper (SDXL); by default the wrapper owns a copy of the base rows."""
        super().__init__()
        self.base = base
        self.trainable_ids = list(trainable_ids)
        self.rows = nn.Parameter(base.weight.detach()[self.trainable_ids].clone()) if rows is None else rows
        self.columns = columns

    def own_rows(self) -> torch.Tensor:
        return self.rows if self.columns is None else self.rows[:, self.columns]

    @property
    def weight(self) -> torch.Tensor:  # some callers (resize, peft) look for .weight
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)
        rows = self.own_rows()
        for k, tid in enumerate(self.trainable_ids):
            mask = (input_ids == tid).unsqueeze(-1)
            out = torch.where(mask, rows[k].to(out.dtype), out)
        return out

    @torch.no_grad()
    def write_back(self) -> nn.Embedding:
        """Copy the trained rows into the base table and return it (unwrapped)."""
        self.base.weight[self.trainable_ids] = self.own_rows().detach().to(self.base.weight.dtype)
        return self.base


def encoder_pairs(pipe) -> list[tuple]:
    """``(tokenizer, text_encoder)`` of every text encoder of a pipeline: one for SD 1.x/2.x, two for SDXL."""
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


SECOND_ENCODER_KEY = "text_encoder_2:"  # SDXL: key prefix of a token's CLIP-G row in the state's tokens file


def token_key(token: str, encoder: int) -> str:
    """A token's key in the state's ``tokens`` file: the token itself for the first text encoder (the SD 1.x
    format), ``text_encoder_2:<token>`` for SDXL's second."""
    return token if encoder == 0 else f"{SECOND_ENCODER_KEY}{token}"


def encode_prompts(tokenizer, text_encoder, prompts: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
    """CLIP hidden states ``[len(prompts), max_length, dim]`` for prompts padded as Stable Diffusion pads them."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    return text_encoder(ids)[0]


def check_new_token(tokenizer, token: str) -> None:
    """Refuse tokens that already exist (in the vocabulary or the stream)."""
    validate_token(token)
    vocab = tokenizer.get_vocab()
    if token in vocab or f"{token}</w>" in vocab:
        suggestion = f"<my-{token.strip('<>')}>"
        raise UserInputError(f"token {token!r} already exists in the tokenizer; choose a new name, e.g. {suggestion!r}")


def add_tokens(tokenizer, text_encoder, tokens: list[str]) -> list[int]:
    """Add tokens (new rows appended to the embedding table); returns their ids."""
    for t in tokens:
        check_new_token(tokenizer, t)
    added = tokenizer.add_tokens(tokens)
    if added != len(tokens):
        raise UserInputError(f"could not add tokens {tokens}: some already exist")
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


@torch.no_grad()
def init_token_rows(tokenizer, text_encoder, token_ids: list[int], noun: str | None, seed: int = 0) -> None:
    """Initialise new rows from the class noun's mean embedding, or randomly (C-LoRA)."""
    emb = text_encoder.get_input_embeddings().weight
    if noun:
        ids = tokenizer(noun, add_special_tokens=False).input_ids
        if not ids:
            raise UserInputError(f"class noun {noun!r} has no tokens; give a word such as 'teddy bear'")
        value = emb[ids].mean(0)
        for tid in token_ids:
            emb[tid] = value
    else:
        g = torch.Generator().manual_seed(seed)
        std = emb[: min(len(emb), 49406)].std().item()
        for tid in token_ids:
            emb[tid] = torch.randn(emb.shape[1], generator=g).to(emb.dtype) * std


def set_rows(text_encoder, rows: dict[int, torch.Tensor]) -> None:
    """Write saved token rows back into the embedding table (loading a state)."""
    emb = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for tid, value in rows.items():
            emb[tid] = value.to(emb.device, emb.dtype)


def unknown_tokens(prompt: str, tokenizer, known: list[str]) -> list[str]:
    """``<tokens>`` in a prompt that the stream has not learned (an error, not silent garbage)."""
    return [t for t in TOKEN_IN_PROMPT.findall(prompt) if t not in known]
