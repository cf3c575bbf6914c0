"""SDXL through the same code path: every method on a tiny random SDXL pipeline, token rows in both text
encoders (trained, frozen afterwards, saved and restored), the added conditioning of every UNet call, and
the export round trips through stock diffusers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conceptstream import api
from conceptstream.concepts.folder import read_concept
from conceptstream.methods.registry import get_method, method_names
from conceptstream.models.conditioning import Conditioning

SMALL = {"dsc_iters": 2, "fisher_passes": 1}


def rows(stream, token: str) -> list[torch.Tensor]:
    out = []
    for tok, enc in ((stream.pipe.tokenizer, stream.pipe.text_encoder),
                     (stream.pipe.tokenizer_2, stream.pipe.text_encoder_2)):
        out.append(enc.get_input_embeddings().weight[tok.convert_tokens_to_ids(token)].detach().clone())
    return out


@pytest.mark.parametrize("name", method_names())
def test_every_method_learns_two_tasks_on_sdxl(tmp_path, sdxl_model_path, concept_dirs, name):
    hparams = {k: v for k, v in SMALL.items() if k in get_method(name).all_defaults()}
    state = tmp_path / "state"
    api.learn(state, concept_dirs[0], method=name, model=str(sdxl_model_path), steps=2, progress=False,
              hparams=hparams)
    first = api.open_stream(state)
    token = first.tokens[0]
    before = rows(first, token)
    assert first.kind == "sdxl" and first.manifest["base_model"]["kind"] == "sdxl"
    assert [r.shape[-1] for r in before] == [32, 64]
    report = api.learn(state, concept_dirs[1], model=str(sdxl_model_path), steps=2, progress=False)
    assert report.task_index == 1 and math.isfinite(report.final_loss)
    stream = api.open_stream(state)
    assert stream.tokens == [read_concept(d).token for d in concept_dirs[:2]]
    after = rows(stream, token)
    for b, a in zip(before, after):
        assert torch.equal(b, a), "task 1's token rows changed in task 2"
    new = rows(stream, stream.tokens[1])
    assert all(bool(torch.isfinite(r).all()) for r in new)
    data = api.info(state)
    assert "tokens.safetensors" in data["files"]
    images = stream.generate(f"a photo of a {token}", n=1, steps=2, progress=False)
    assert images[0].size == (64, 64)


def test_new_token_rows_are_trained_in_both_encoders(tmp_path, sdxl_model_path, concept_dirs):
    from streams import learn_folder, new_stream

    stream = new_stream(sdxl_model_path, "textual-inversion")
    learn_folder(stream, concept_dirs[0], steps=2)
    token = stream.tokens[0]
    trained = rows(stream, token)
    noun = read_concept(concept_dirs[0]).noun
    for (tok, enc), row in zip(((stream.pipe.tokenizer, stream.pipe.text_encoder),
                                (stream.pipe.tokenizer_2, stream.pipe.text_encoder_2)), trained):
        emb = enc.get_input_embeddings().weight
        init = emb[tok(noun, add_special_tokens=False).input_ids].mean(0)
        assert not torch.equal(row, init), "a token row was not trained"


def test_dc_errors_use_pooled_embeds_and_time_ids(sdxl_model_path):
    from streams import new_stream

    stream = new_stream(sdxl_model_path, "ewc-dc")
    with torch.no_grad():
        cond = stream.encode_prompts(["a photo of a dog", "a photo of a mug"])
    assert isinstance(cond, Conditioning)
    assert cond.hidden.shape == (2, 77, 96) and cond.pooled.shape == (2, 32) and cond.time_ids.shape == (2, 6)
    assert cond.time_ids[0].tolist() == [64, 64, 0, 0, 64, 64]
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, 16, 16, generator=g)
    t = torch.tensor([300, 500, 700])
    noise = torch.randn(z.shape, generator=g)
    with torch.no_grad():
        err = stream.dc.errors(z, cond, t, noise)
        assert err.shape == (3, 2)
        # the batched call equals one UNet call per image x candidate with SDXL's added conditioning
        unet = stream.pipe.unet
        x_t = stream.dc.noisy(z, t, noise)
        for i in range(3):
            for k in range(2):
                pred = unet(x_t[i : i + 1], t[i : i + 1], cond.hidden[k : k + 1],
                            added_cond_kwargs={"text_embeds": cond.pooled[k : k + 1],
                                               "time_ids": cond.time_ids[k : k + 1]}).sample
                torch.testing.assert_close(err[i, k], (pred - noise[i : i + 1]).pow(2).mean(), rtol=1e-4, atol=1e-6)
        other_pooled = Conditioning(cond.hidden, cond.pooled.flip(0), cond.time_ids)
        assert not torch.allclose(stream.dc.errors(z, other_pooled, t, noise), err)
        other_ids = Conditioning(cond.hidden, cond.pooled, cond.time_ids * 2)
        assert not torch.allclose(stream.dc.errors(z, other_ids, t, noise), err)


def _stock_pipeline(model):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(str(model), use_safetensors=True, add_watermarker=False)


@pytest.mark.parametrize("method", ["lora", "custom-diffusion"])
@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_export_round_trip_reproduces_generate(tmp_path, sdxl_model_path, concept_dirs, method, fmt):
    from safetensors.torch import load_file

    state = tmp_path / "state"
    for i, d in enumerate(concept_dirs[:2]):
        api.learn(state, d, method=method if i == 0 else None, model=str(sdxl_model_path), steps=2,
                  progress=False, hparams={"lr": 5e-2} if i == 0 else None)
    stream = api.open_stream(state)
    out = tmp_path / "export"
    api.export(state, out, format=fmt)
    prompt = f"a photo of a {stream.tokens[0]} {read_concept(concept_dirs[0]).noun}"
    ours = stream.generate(prompt, n=1, seed=3, steps=3, guidance=5.0, progress=False)

    pipe = _stock_pipeline(sdxl_model_path)
    meta = json.loads((out / "export.json").read_text())
    if fmt == "diffusers":
        pipe.load_lora_weights(str(out))
        entries = [(t["token"], out / t["file"]) for t in meta["tokens"]]
    else:
        pipe.load_lora_weights(str(out), weight_name=meta["lora"])
        entries = [(e["token"], out / e["file"]) for e in meta["embeddings"]]
    for token, path in entries:
        f = load_file(str(path))
        if fmt == "kohya":
            f = {k: v[0] for k, v in f.items()}
        pipe.load_textual_inversion(f["clip_l"], token=token, text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(f["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe([prompt], num_inference_steps=3, guidance_scale=5.0,
                  generator=[torch.Generator().manual_seed(3)]).images
    a, b = np.asarray(ours[0], dtype=np.int16), np.asarray(theirs[0], dtype=np.int16)
    assert np.abs(a - b).max() <= 2, "the exported stream does not reproduce generate"
    # and the adapter/token matter: the bare base model gives another image
    bare = _stock_pipeline(sdxl_model_path)
    bare.set_progress_bar_config(disable=True)
    base_img = bare([f"a photo of a {read_concept(concept_dirs[0]).noun}"], num_inference_steps=3,
                    guidance_scale=5.0, generator=[torch.Generator().manual_seed(3)]).images[0]
    assert np.abs(a - np.asarray(base_img, dtype=np.int16)).max() > 2


def test_quick_bench_runs_on_sdxl(tmp_path, sdxl_model_path):
    from conceptstream.evaluation.bench import run_bench

    out = tmp_path / "bench"
    results = run_bench(out, sequence="tabletop-3", methods=["ewc-dc"], quick=True, steps=2,
                        model=str(sdxl_model_path), progress=False, log=lambda line: None)
    assert results["complete"] is True and results["failed"] == []
    summary = results["summary"]["ewc-dc"]
    assert 0.0 <= summary["DC_acc"]["mean"] <= 1.0 and isinstance(summary["A_MMD"]["mean"], float)
    run = results["runs"]["ewc-dc"]["seeds"]["0"]
    assert len(run["dc"]["confusion"]) == 2 and len(run["dc"]["confusion"][0]) == 4  # 2 concepts + 2 nouns
    assert len(run["dc"]["own_class"]["confusion"][0]) == 3  # c_0 + 2 concepts
    assert json.loads((out / "results.json").read_text())["complete"] is True


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_vera_export_round_trip_through_peft_reproduces_generate(tmp_path, random_model_path, sdxl_model_path,
                                                                 concept_dirs, family):
    """A VeRA stream exports peft's format (OUT/unet_vera) + the token embeddings; a stock pipeline with
    ``PeftModel.from_pretrained(pipe.unet, OUT/unet_vera)`` and the embeddings draws what generate draws."""
    from diffusers import StableDiffusionPipeline
    from peft import PeftModel
    from safetensors.torch import load_file

    model = sdxl_model_path if family == "sdxl" else random_model_path
    state = tmp_path / "state"
    # a large rate, so that 3 steps move VeRA's scaling vectors (lambda_b starts at 0) visibly
    api.learn(state, concept_dirs[0], method="lora", adapter="vera", model=str(model), steps=3, progress=False,
              hparams={"lr": 1.0})
    stream = api.open_stream(state)
    out = tmp_path / "export"
    api.export(state, out)
    assert (out / "unet_vera" / "adapter_config.json").is_file()
    prompt = f"a photo of a {stream.tokens[0]} {read_concept(concept_dirs[0]).noun}"
    ours = stream.generate(prompt, n=1, seed=3, steps=3, guidance=5.0, progress=False)

    if family == "sdxl":
        pipe = _stock_pipeline(model)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(str(model), safety_checker=None, requires_safety_checker=False)
    for t in json.loads((out / "export.json").read_text())["tokens"]:
        if family == "sdxl":
            f = load_file(str(out / t["file"]))
            pipe.load_textual_inversion(f["clip_l"], token=t["token"], text_encoder=pipe.text_encoder,
                                        tokenizer=pipe.tokenizer)
            pipe.load_textual_inversion(f["clip_g"], token=t["token"], text_encoder=pipe.text_encoder_2,
                                        tokenizer=pipe.tokenizer_2)
        else:
            pipe.load_textual_inversion(str(out / t["file"]))
    pipe.set_progress_bar_config(disable=True)

    def draw():
        image = pipe([prompt], num_inference_steps=3, guidance_scale=5.0,
                     generator=[torch.Generator().manual_seed(3)]).images[0]
        return np.asarray(image, dtype=np.int16)

    without_adapter = draw()
    pipe.unet = PeftModel.from_pretrained(pipe.unet, str(out / "unet_vera"))
    a, b = np.asarray(ours[0], dtype=np.int16), draw()
    assert a.std() > 5, "generate drew a blank image"
    assert np.abs(a - b).max() <= 2, "the exported VeRA stream does not reproduce generate"
    assert np.abs(a - without_adapter).max() > 2, "the VeRA adapter changed nothing: the check would be empty"
