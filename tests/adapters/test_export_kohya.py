"""Export --format kohya: A1111/ComfyUI/kohya files that stock diffusers (which converts kohya keys) loads and
that reproduce `generate`; key names and alphas; the embedding files; VeRA refused; the README."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli
from diffusers import StableDiffusionPipeline  # imported up front: its import-time warnings stay out of tests
from safetensors import safe_open
from safetensors.torch import load_file
from streams import commit, learn_folder, pixels, stock_pixels

from conceptstream import api
from conceptstream.adapters.registry import AdapterSpec
from conceptstream.concepts.folder import read_concept
from conceptstream.engine import ConceptStream, StreamSettings
from conceptstream.errors import UserInputError

ALPHA, RANK = 16.0, 4  # LoRA scale alpha / rank = 4: exported at the wrong strength unless the scale is carried


def _learn(state, model, concept_dirs, method):
    """Two concepts, a few steps; plain LoRA with alpha != rank (set through the stream's AdapterSpec)."""
    if method == "lora":
        spec = AdapterSpec(kind="lora", rank=RANK, alpha=ALPHA)
        stream = ConceptStream.new(str(model), StreamSettings(method="lora", adapter=spec, hparams={"lr": 1e-2}))
        learn_folder(stream, concept_dirs[0], steps=8)
        commit(stream, state)
        api.learn(state, concept_dirs[1], steps=8, progress=False)
        return
    lr = {"c-lora": 1e-2, "custom-diffusion": 1e-3}[method]
    for d in concept_dirs[:2]:
        api.learn(state, d, method=method, steps=8, progress=False, hparams={"lr": lr} if d == concept_dirs[0] else None)


@pytest.mark.parametrize("method", ["lora", "c-lora", "custom-diffusion"])
def test_kohya_export_loads_in_stock_diffusers_and_reproduces_generate(tmp_path, bundled_model_path, concept_dirs,
                                                                       method, capsys):
    from conceptstream.cli import main

    state, out = tmp_path / "my stream", tmp_path / "export"
    _learn(state, bundled_model_path, concept_dirs, method)
    assert main(["export", str(state), str(out), "--format", "kohya"]) == 0
    capsys.readouterr()
    meta = json.loads((out / "export.json").read_text())
    assert meta["format"] == "kohya" and meta["lora"] == "my-stream.safetensors"  # default name: the state folder
    assert not (out / "pytorch_lora_weights.safetensors").exists() and not (out / "tokens").exists()
    concepts = [read_concept(d) for d in concept_dirs[:2]]

    # kohya keys: lora_unet_<module path with '_'>.lora_down/.lora_up/.alpha, alpha = rank (scale folded into up)
    kohya = load_file(str(out / meta["lora"]))
    downs = sorted(k for k in kohya if k.endswith(".lora_down.weight"))
    assert downs and len(kohya) == 3 * len(downs)
    unet = StableDiffusionPipeline.from_pretrained(str(bundled_model_path)).unet
    modules = {n.replace(".", "_"): m for n, m in unet.named_modules()}
    for k in downs:
        base = k.removesuffix(".lora_down.weight")
        assert base.startswith("lora_unet_") and "_attn2_to_" in base, base
        layer = modules[base.removeprefix("lora_unet_")]
        down, up, alpha = kohya[k], kohya[f"{base}.lora_up.weight"], kohya[f"{base}.alpha"]
        assert alpha.ndim == 0 and alpha.item() == down.shape[0] == up.shape[1]
        assert down.shape[1] == layer.in_features and up.shape[0] == layer.out_features
        expected_rank = {"lora": RANK, "c-lora": 2 * RANK, "custom-diffusion": layer.in_features}[method]
        assert down.shape[0] == expected_rank
        if method == "custom-diffusion":  # dense delta written exactly as up = W, down = I
            assert torch.equal(down, torch.eye(layer.in_features))
    with safe_open(str(out / meta["lora"]), "pt") as f:
        assert f.metadata()["ss_network_module"] == "networks.lora"

    # embeddings: A1111/ComfyUI form, file name = prompt word = token without brackets
    assert [e["word"] for e in meta["embeddings"]] == [c.token.strip("<>") for c in concepts]
    for e in meta["embeddings"]:
        assert e["file"] == f"embeddings/{e['word']}.safetensors"
        emb = load_file(str(out / e["file"]))
        assert list(emb) == ["emb_params"] and emb["emb_params"].shape == (1, unet.config.cross_attention_dim)

    # the README says where each file goes and uses the exported words
    readme = (out / "README.md").read_text()
    word = meta["embeddings"][0]["word"]
    for text in ("models/Lora", "stable-diffusion-webui/embeddings", "ComfyUI/models/loras", "LoraLoader",
                 "ComfyUI/models/embeddings", "<lora:my-stream:1>", f"embedding:{word}",
                 f"embeddings/{word}.safetensors", f"a photo of a {word}"):
        assert text in readme, text
    assert f"`{concepts[0].token}`" in readme  # the token -> word mapping table

    # stock diffusers: kohya LoRA (converted by load_lora_weights) + A1111 embeddings reproduce `generate`
    if method == "c-lora":  # C-LoRA trains without the class noun
        prompts = [f"a photo of a {c.token}" for c in concepts]
    else:
        prompts = [f"a photo of a {c.token} {c.noun}" for c in concepts]
    n, seed, steps, guidance = 2, 21, 4, 5.0
    reference = pixels(api.generate(prompts, state=state, n=n, seed=seed, steps=steps, guidance=guidance,
                                    progress=False))
    pipe = StableDiffusionPipeline.from_pretrained(str(bundled_model_path))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(out), weight_name=meta["lora"])
    for e in meta["embeddings"]:
        pipe.load_textual_inversion(str(out / e["file"]), token=e["token"])

    def stock(p):
        return stock_pixels(p, prompts, n, seed, steps, guidance)

    diff = np.abs(stock(pipe) - reference)
    assert diff.mean() <= 2.0 and diff.max() <= 64, (diff.mean(), diff.max())
    # the LoRA carries what was learned (for lora: at the right strength, alpha/rank = 4 included)
    pipe.unload_lora_weights()
    assert np.abs(stock(pipe) - reference).mean() > 4 * max(diff.mean(), 0.05)


def test_kohya_scale_is_folded_exactly(tmp_path, bundled_model_path, concept_dirs):
    """alpha != rank: the exported up @ down * alpha/rank is the stream's effective delta, scale included."""
    from conceptstream.adapters.export import export_stream
    from conceptstream.adapters.registry import adapter_parameters

    spec = AdapterSpec(kind="lora", rank=RANK, alpha=ALPHA)
    stream = ConceptStream.new(str(bundled_model_path), StreamSettings(method="lora", adapter=spec,
                                                                       hparams={"lr": 1e-2}))
    learn_folder(stream, concept_dirs[0], steps=2)
    export_stream(stream, tmp_path, format="kohya", name="dog.v1")
    kohya = load_file(str(tmp_path / "dog.v1.safetensors"))
    params = adapter_parameters(stream.pipe.unet)
    for name in (n for n in params if ".lora_A." in n):
        module = name.split(".lora_A.")[0]
        base = "lora_unet_" + module.replace(".", "_")
        got = kohya[f"{base}.lora_up.weight"] @ kohya[f"{base}.lora_down.weight"] * (
            kohya[f"{base}.alpha"] / kohya[f"{base}.lora_down.weight"].shape[0])
        want = (ALPHA / RANK) * params[name.replace("lora_A", "lora_B")] @ params[name]
        torch.testing.assert_close(got, want.detach())


def test_kohya_export_refuses_vera_and_writes_nothing(tmp_path, concept_dirs):
    state, out = tmp_path / "state", tmp_path / "export"
    api.learn(state, concept_dirs[0], method="lora", adapter="vera", steps=1, progress=False)
    r = run_cli("export", str(state), str(out), "--format", "kohya")
    assert r.returncode == 2, r.stderr
    line = assert_one_line_error(r.stderr)
    assert "VeRA" in line and "--format diffusers" in line
    assert not out.exists()


def test_kohya_name_is_checked_and_only_for_kohya(tmp_path, bundled_model_path):
    from conceptstream.adapters.export import export_stream

    stream = ConceptStream.new(str(bundled_model_path), StreamSettings(method="lora"))
    for fmt, name in (("kohya", "bad:name"), ("kohya", "a b"), ("diffusers", "x"), ("safetensors", None)):
        with pytest.raises(UserInputError):
            export_stream(stream, tmp_path / "out", format=fmt, name=name)
    assert not (tmp_path / "out").exists()
