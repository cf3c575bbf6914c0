"""Export: stock diffusers loads the files and reproduces `generate`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from diffusers import StableDiffusionPipeline  # imported up front: its import-time warnings stay out of tests
from streams import pixels, stock_pixels

from conceptstream import api
from conceptstream.concepts.folder import read_concept


@pytest.mark.parametrize("method", ["lora", "c-lora", "custom-diffusion"])
def test_export_loads_in_stock_diffusers_and_reproduces_generate(tmp_path, bundled_model_path, concept_dirs,
                                                                 method, capsys):
    from conceptstream.cli import main

    state, out = tmp_path / "state", tmp_path / "export"
    lr = {"lora": 1e-2, "c-lora": 1e-2, "custom-diffusion": 1e-3}[method]
    for d in concept_dirs[:2]:
        api.learn(state, d, method=method, steps=8, progress=False, hparams={"lr": lr} if d == concept_dirs[0] else None)
    assert main(["export", str(state), str(out)]) == 0
    meta = json.loads((out / "export.json").read_text())
    assert meta["lora"] == "pytorch_lora_weights.safetensors" and len(meta["tokens"]) == 2
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    capsys.readouterr()

    concepts = [read_concept(d) for d in concept_dirs[:2]]
    if method == "c-lora":  # C-LoRA trains without the class noun
        prompts = [f"a photo of a {c.token}" for c in concepts]
    else:
        prompts = [f"a photo of a {c.token} {c.noun}" for c in concepts]
    prompts.append(f"a photo of a {concepts[0].token} {concepts[0].noun} and a {concepts[1].token}")
    n, seed, steps, guidance = 2, 21, 4, 5.0
    reference = api.generate(prompts, state=state, n=n, seed=seed, steps=steps, guidance=guidance, progress=False)

    pipe = StableDiffusionPipeline.from_pretrained(str(bundled_model_path))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(out))
    for t in meta["tokens"]:
        pipe.load_textual_inversion(str(out / t["file"]))

    def stock(p):
        return stock_pixels(p, prompts, n, seed, steps, guidance)

    ref = pixels(reference)
    diff = np.abs(stock(pipe) - ref)
    assert diff.mean() <= 2.0 and diff.max() <= 64, (diff.mean(), diff.max())
    # the LoRA file carries what was learned: without it the same tokens give other pictures
    pipe.unload_lora_weights()
    assert np.abs(stock(pipe) - ref).mean() > 4 * max(diff.mean(), 0.05)
