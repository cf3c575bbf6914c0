"""Helpers shared by the engine-level tests: a stream on a test model, learning a concept folder,
committing, and bitwise snapshots of a state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from conceptstream.adapters.registry import AdapterSpec
from conceptstream.concepts.folder import read_concept
from conceptstream.concepts.images import load_images
from conceptstream.engine import ConceptStream, StreamSettings
from conceptstream.state import StateStore

VOCAB = 49408  # CLIP's vocabulary: rows below this are ordinary words


def train_images(folder: Path) -> list[Image.Image]:
    return load_images(read_concept(folder).train_images(), 64)


def new_stream(model: Path, method: str, adapter: str = "lora", **hparams) -> ConceptStream:
    spec = AdapterSpec(kind=adapter, rank=4 if adapter == "lora" else 32)
    return ConceptStream.new(str(model), StreamSettings(method=method, adapter=spec, hparams=hparams))


def learn_folder(stream: ConceptStream, folder: Path, steps: int, seed: int = 0, **kw):
    c = read_concept(folder)
    return stream.learn(train_images(folder), c.token, c.noun, steps=steps, seed=seed, progress=False, **kw)


def commit(stream: ConceptStream, state: Path) -> None:
    store = StateStore(state)
    with store.lock():
        store.commit(stream.manifest, stream.state_tensors())


def snapshot(state: Path) -> dict:
    """Everything a state holds: generation, manifest and every tensor file (bitwise)."""
    store = StateStore(state)
    manifest = store.read_manifest()
    tensors = {p.stem: store.load_tensors(p.stem) for p in store.files() if p.suffix == ".safetensors"}
    return {"generation": store.generation(), "manifest": manifest, "tensors": tensors}


def assert_same_snapshot(a: dict, b: dict) -> None:
    assert a["generation"] == b["generation"]
    assert a["manifest"] == b["manifest"]
    assert a["tensors"].keys() == b["tensors"].keys()
    for name in a["tensors"]:
        ta, tb = a["tensors"][name], b["tensors"][name]
        assert ta.keys() == tb.keys(), name
        assert all(torch.equal(ta[k], tb[k]) for k in ta), name


def pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.int16) for im in images])


def encode_prompts_with(pipe, prompts: list[str]) -> torch.Tensor:
    tok = pipe.tokenizer
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def stock_pixels(pipe, prompts: list[str], n: int, seed: int, steps: int, guidance: float) -> np.ndarray:
    """Pixels of a stock diffusers pipeline's images, made as `generate` makes them (image i: seed + i)."""
    images = []
    for prompt in prompts:
        gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
        images += pipe([prompt] * n, num_inference_steps=steps, guidance_scale=guidance, generator=gens).images
    return pixels(images)
