"""The engine: DC scores, EWC/Fisher, frozen tokens, C-LoRA's locked sum, state round trips, export
interop with stock diffusers, a learning-quality smoke test, divergence handling, every method, errors."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import assert_error_after_progress, assert_one_line_error
from diffusers import StableDiffusionPipeline  # imported up front: its import-time warnings stay out of tests
from PIL import Image

from conceptstream import api
from conceptstream.adapters.registry import AdapterSpec, adapter_parameters
from conceptstream.data import load_images
from conceptstream.engine import ConceptStream, StreamSettings, TrainingDiverged
from conceptstream.errors import StateError, UserInputError
from conceptstream.methods.c_lora import lora_delta
from conceptstream.methods.ewc import dc_log_likelihood, denoise_log_likelihood, estimate_fisher
from conceptstream.methods.registry import get_method, method_names
from conceptstream.models.loading import load_pipeline
from conceptstream.scoring.dc import DCConfig, DiffusionClassifier
from conceptstream.state import StateStore
from conceptstream.world.catalogue import get_sequence
from conceptstream.world.folders import read_concept
from conceptstream.world.render import TabletopRenderer

VOCAB = 49408  # CLIP's vocabulary: rows below this are ordinary words


# -- helpers -------------------------------------------------------------------------------------
def _train_images(folder: Path) -> list[Image.Image]:
    return load_images(read_concept(folder).train_images(), 64)


def _new_stream(model: Path, method: str, adapter: str = "lora", **hparams) -> ConceptStream:
    spec = AdapterSpec(kind=adapter, rank=4 if adapter == "lora" else 32)
    return ConceptStream.new(str(model), StreamSettings(method=method, adapter=spec, hparams=hparams))


def _learn(stream: ConceptStream, folder: Path, steps: int, seed: int = 0, **kw):
    c = read_concept(folder)
    return stream.learn(_train_images(folder), c.token, c.noun, steps=steps, seed=seed, progress=False, **kw)


def _commit(stream: ConceptStream, state: Path) -> None:
    store = StateStore(state)
    with store.lock():
        store.commit(stream.manifest, stream.state_tensors())


def _snapshot(state: Path) -> dict:
    """Everything a state holds: generation, manifest and every tensor file (bitwise)."""
    store = StateStore(state)
    manifest = store.read_manifest()
    tensors = {p.stem: store.load_tensors(p.stem) for p in store.files() if p.suffix == ".safetensors"}
    return {"generation": store.generation(), "manifest": manifest, "tensors": tensors}


def _assert_same_snapshot(a: dict, b: dict) -> None:
    assert a["generation"] == b["generation"]
    assert a["manifest"] == b["manifest"]
    assert a["tensors"].keys() == b["tensors"].keys()
    for name in a["tensors"]:
        ta, tb = a["tensors"][name], b["tensors"][name]
        assert ta.keys() == tb.keys(), name
        assert all(torch.equal(ta[k], tb[k]) for k in ta), name


def _px(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.int16) for im in images])


def _encode(pipe, prompts: list[str]) -> torch.Tensor:
    tok = pipe.tokenizer
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


@pytest.fixture(scope="module")
def base_pipe(bundled_model_path):
    return load_pipeline(str(bundled_model_path))


# -- DC scores -----------------------------------------------------------------------------------
def test_dc_identical_candidates_share_noise_and_scores(base_pipe):
    dc = DiffusionClassifier(base_pipe.unet, base_pipe.scheduler, DCConfig(temperature=0.01))
    cond = _encode(base_pipe, ["a photo of a mug", "a photo of a toy car", "a photo of a mug"])
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, 16, 16, generator=g)
    with torch.no_grad():
        t, noise = dc.sample_draw(z, g)
        err = dc.errors(z, cond, t, noise)
        assert err.shape == (3, 3)
        # the same prompt at positions 0 and 2 sees the same (t, eps): the same errors and scores, up to the
        # float rounding of a batched matmul (rows at different batch positions may take other kernel paths)
        torch.testing.assert_close(err[:, 0], err[:, 2], rtol=1e-5, atol=1e-7)
        logp = dc.log_probs(err)
        torch.testing.assert_close(logp[:, 0], logp[:, 2], rtol=1e-4, atol=1e-5)
        assert torch.allclose(logp.exp().sum(-1), torch.ones(3))
        assert torch.allclose(logp, torch.log_softmax(-err / 0.01, -1))
        assert not torch.equal(err[:, 0], err[:, 1])  # a different prompt scores differently
        # one batched call == one UNet call per candidate with the shared draw of each image
        x_t = dc.noisy(z, t, noise)
        for i in range(3):
            pred = base_pipe.unet(x_t, t, cond[i : i + 1].expand(3, -1, -1)).sample
            torch.testing.assert_close(err[:, i], (pred - noise).pow(2).flatten(1).mean(1), rtol=1e-5, atol=1e-7)
        # evaluation mode: several stratified draws, still shared across candidates, seeded
        ev = dc.eval_errors(z, cond, seed=0)
        torch.testing.assert_close(ev[:, 0], ev[:, 2], rtol=1e-5, atol=1e-7)
        assert torch.equal(ev, dc.eval_errors(z, cond, seed=0))
        assert not torch.equal(ev, dc.eval_errors(z, cond, seed=1))
        assert dc.classify(z, cond, seed=0).tolist() == ev.argmin(-1).tolist()
    # the scale is explicit: "sum" is "mean" times the number of latent elements
    dc_sum = DiffusionClassifier(base_pipe.unet, base_pipe.scheduler, DCConfig(reduction="sum"))
    with torch.no_grad():
        torch.testing.assert_close(dc_sum.errors(z, cond, t, noise), err * z[0].numel(), rtol=1e-5, atol=1e-5)


def test_dc_temperature_is_one_setting_reachable_by_set_and_sweep(random_model_path):
    """--set/--sweep dc_temperature drives the DC scores; without it the DC config's value is recorded."""
    stream = _new_stream(random_model_path, "ewc-dc", dc_temperature=0.02)
    assert stream.dc.config.temperature == 0.02 == stream.manifest["method"]["dc"]["temperature"]
    assert stream.manifest["method"]["hyperparameters"]["dc_temperature"] == 0.02
    plain = ConceptStream.new(str(random_model_path), StreamSettings(method="dsc", dc=DCConfig(temperature=0.03)))
    assert plain.dc.config.temperature == 0.03 == plain.method.hparams["dc_temperature"]
    with pytest.raises(UserInputError, match="dc_temperature must be a number > 0"):
        _new_stream(random_model_path, "ewc-dc", dc_temperature=0)
    with pytest.raises(UserInputError, match="no setting"):
        _new_stream(random_model_path, "lora", dc_temperature=0.02)  # lora has no DC scores


def test_dc_gradients_reach_only_adapter_and_current_token(random_model_path, concept_dirs):
    stream = _new_stream(random_model_path, "lora")
    _learn(stream, concept_dirs[0], steps=2)

    def dc_only_loss(ctx, step):
        z = ctx.sample_latents(2)
        cond, _, pos = ctx.dc_candidates(5)
        assert cond.shape[0] == 3  # c_0 + both seen concepts
        return -ctx.dc.train_log_probs(z, cond, ctx.generator)[:, pos].mean(), {}

    stream.method.loss = dc_only_loss  # the engine calls method.loss(ctx, step)
    seen: list[dict] = []

    def check_grads(step, info):
        unet, text = stream.pipe.unet, stream.pipe.text_encoder
        adapter = set(adapter_parameters(unet))
        wrapper = text.get_input_embeddings()
        grads = {"adapter": [], "rows": None, "other": []}
        for n, p in unet.named_parameters():
            (grads["adapter"] if n in adapter else grads["other"]).append((n, p.grad))
        for n, p in text.named_parameters():
            if p is wrapper.rows:
                grads["rows"] = p.grad
            else:
                grads["other"].append((n, p.grad))
        seen.append(grads)

    _learn(stream, concept_dirs[1], steps=2, on_step=check_grads)
    assert len(seen) == 2
    for grads in seen:
        assert grads["adapter"] and all(g is not None and torch.isfinite(g).all() for _, g in grads["adapter"])
        assert any(g.abs().sum() > 0 for _, g in grads["adapter"])
        assert grads["rows"] is not None and grads["rows"].shape == (1, 64) and grads["rows"].abs().sum() > 0
        leaked = [n for n, g in grads["other"] if g is not None and g.abs().sum() > 0]
        assert not leaked, f"DC gradients reached frozen parameters: {leaked[:5]}"


# -- EWC -----------------------------------------------------------------------------------------
def test_fisher_is_nonnegative_over_adapter_params_and_penalty_is_zero_at_anchor(random_model_path, concept_dirs):
    stream = _new_stream(random_model_path, "ewc-dc", fisher_passes=1)
    captured = {}
    original_after = stream.method.after_task

    def after(ctx):
        captured["ctx"] = ctx
        original_after(ctx)

    stream.method.after_task = after
    _learn(stream, concept_dirs[0], steps=3)
    unet, ctx = stream.pipe.unet, captured["ctx"]
    params = adapter_parameters(unet)
    for ll in (dc_log_likelihood(ctx, 5), denoise_log_likelihood(ctx)):
        fisher = estimate_fisher(ctx, ll, passes=1)
        assert fisher.keys() == params.keys()
        for n, f in fisher.items():
            assert f.shape == params[n].shape and torch.isfinite(f).all() and (f >= 0).all(), n
        assert sum(float(f.sum()) for f in fisher.values()) > 0
    ewc = stream.method.ewc
    assert ewc.fisher.keys() == params.keys() == ewc.anchor.keys()
    assert all((f >= 0).all() for f in ewc.fisher.values())
    flat = torch.cat([f.flatten() for f in ewc.fisher.values()])
    assert flat.mean().item() == pytest.approx(1.0, rel=1e-4)  # fisher_norm: each task's Fisher has mean 1

    lam = 3.0
    assert ewc.penalty(unet, lam).item() == 0.0
    name, p = next((n, q) for n, q in params.items() if ".lora_B." in n)
    with torch.no_grad():
        p.add_(0.05)
    try:
        pen = ewc.penalty(unet, lam)
        assert pen.item() > 0
        expected = 0.5 * lam * (ewc.fisher[name] * (p.detach() - ewc.anchor[name]).pow(2)).sum()
        torch.testing.assert_close(pen.detach(), expected, rtol=1e-4, atol=0)
        pen.backward()
        assert p.grad is not None and (p.grad * 0.05 >= 0).all()  # the penalty pulls back toward the anchor
    finally:
        with torch.no_grad():
            p.sub_(0.05)
        p.grad = None
    assert ewc.penalty(unet, lam).item() == pytest.approx(0.0, abs=1e-12)


# -- frozen tokens -------------------------------------------------------------------------------
def test_past_token_rows_and_vocabulary_unchanged_by_later_tasks(tmp_path, random_model_path, concept_dirs):
    state = tmp_path / "state"
    first, second = read_concept(concept_dirs[0]), read_concept(concept_dirs[1])
    api.learn(state, concept_dirs[0], method="ewc-dc", model=str(random_model_path), steps=3, progress=False,
              hparams={"fisher_passes": 1})
    rows1 = StateStore(state).load_tensors("tokens")
    api.learn(state, concept_dirs[1], model=str(random_model_path), steps=3, progress=False)
    rows2 = StateStore(state).load_tensors("tokens")
    assert set(rows2) == {first.token, second.token}
    assert torch.equal(rows1[first.token], rows2[first.token])  # bit for bit
    # the new token was actually trained: it moved away from its initialisation (the noun's mean row)
    base = load_pipeline(str(random_model_path))
    base_emb = base.text_encoder.get_input_embeddings().weight
    noun_ids = base.tokenizer(second.noun, add_special_tokens=False).input_ids
    assert not torch.allclose(rows2[second.token], base_emb[noun_ids].mean(0))
    stream = api.open_stream(state)
    emb = stream.pipe.text_encoder.get_input_embeddings().weight
    assert emb.shape[0] == VOCAB + 2
    assert torch.equal(emb[:VOCAB], base_emb[:VOCAB])  # ordinary words untouched
    tok = stream.pipe.tokenizer
    assert torch.equal(emb[tok.convert_tokens_to_ids(first.token)], rows1[first.token])


# -- C-LoRA --------------------------------------------------------------------------------------
def test_clora_merged_weights_equal_base_plus_past_deltas(tmp_path, random_model_path, concept_dirs):
    stream = _new_stream(random_model_path, "c-lora")
    reports = [_learn(stream, d, steps=3, seed=i) for i, d in enumerate(concept_dirs)]
    method = stream.method
    assert len(method.past) == 2  # tasks 1 and 2 are locked; task 3's LoRA is live
    w0 = dict(load_pipeline(str(random_model_path)).unet.named_parameters())
    assert method._modules
    for name, layer in method._modules.items():
        s = layer.scaling["default"]
        past = [lora_delta(entry, name, s) for entry in method.past]
        assert all(d.abs().sum() > 0 for d in past)
        torch.testing.assert_close(method.past_sum[name], past[0] + past[1], rtol=1e-6, atol=1e-9)
        merged = layer.base_layer.weight.detach()
        torch.testing.assert_close(merged, w0[f"{name}.weight"] + past[0] + past[1], rtol=1e-6, atol=1e-7)
    # logs: LoRA norm and L_forget every step; a fresh LoRA per task; no penalty without a past
    for rep in reports:
        steps = [e for e in rep.logs if "step" in e]
        assert len(steps) == 3 and all("lora_norm" in e and "l_forget" in e for e in steps)
        assert all(math.isfinite(e["lora_norm"]) and e["l_forget"] >= 0 for e in steps)
    assert all(e["l_forget"] == 0 for e in reports[0].logs)
    assert reports[1].logs[0]["lora_norm"] == 0.0  # the new LoRA starts at zero (B = 0)
    assert reports[2].logs[-1]["l_forget"] > 0 and reports[2].logs[-1]["lora_norm"] > 0
    # a reloaded stream rebuilds exactly the same merged weights
    _commit(stream, tmp_path / "state")
    again = api.open_stream(tmp_path / "state")
    live, reloaded = stream.pipe.unet.state_dict(), again.pipe.unet.state_dict()
    assert all(torch.equal(live[k], reloaded[k]) for k in live)


# -- adapter learning rates ----------------------------------------------------------------------
def test_adapter_kind_sets_the_default_learning_rate_and_a_saved_stream_keeps_its_own(tmp_path, bundled_model_path,
                                                                                     concept_dirs):
    from conceptstream.adapters.registry import ADAPTERS

    assert ADAPTERS["vera"].default_lr > ADAPTERS["lora"].default_lr  # VeRA's vectors need the larger step
    for adapter in ("lora", "vera"):
        stream = _new_stream(bundled_model_path, "lora", adapter=adapter)
        assert stream.method.hparams["lr"] == ADAPTERS[adapter].default_lr
    explicit = _new_stream(bundled_model_path, "ewc-dc", adapter="vera", lr=3e-4, dc_temperature=0.01)
    assert explicit.method.hparams["lr"] == 3e-4 and explicit.settings.dc.temperature == 0.01
    # the optimizer really uses it
    groups = explicit.method.trainable_groups(SimpleNamespace(unet=explicit.pipe.unet), None)
    assert [g["lr"] for g in groups if g["name"] == "adapter"] == [3e-4]
    # a stream saved under one rate keeps it, whatever the default is when it is reopened
    stream = _new_stream(bundled_model_path, "lora", adapter="vera", lr=2e-3)
    _learn(stream, concept_dirs[0], steps=1)
    _commit(stream, tmp_path / "state")
    assert api.open_stream(tmp_path / "state").method.hparams["lr"] == 2e-3
    with pytest.raises(UserInputError, match="unknown adapter"):
        _new_stream(bundled_model_path, "lora", adapter="dora")
    # a method with its own rate for an adapter kind (C-LoRA, tuned on tabletop-6) overrides the kind's
    from conceptstream.methods.c_lora import CLoRA

    assert _new_stream(bundled_model_path, "c-lora").method.hparams["lr"] == CLoRA.adapter_lr["lora"] != 1e-3
    assert _new_stream(bundled_model_path, "c-lora", lr=1e-3).method.hparams["lr"] == 1e-3
    with pytest.raises(UserInputError, match="'c-lora' is defined on lora adapters.*--adapter lora"):
        _new_stream(bundled_model_path, "c-lora", adapter="vera")


# -- save / load round trip ----------------------------------------------------------------------
@pytest.mark.parametrize("method,adapter", [("lora", "lora"), ("c-lora", "lora"), ("custom-diffusion", "lora"),
                                            ("ewc-dc", "vera")])
def test_state_round_trip_generates_identical_pixels(tmp_path, bundled_model_path, concept_dirs, method, adapter):
    stream = _new_stream(bundled_model_path, method, adapter=adapter,
                         **({"fisher_passes": 1} if method == "ewc-dc" else {}))
    for i, d in enumerate(concept_dirs[:2]):
        _learn(stream, d, steps=4, seed=i)
    state = tmp_path / "state"
    _commit(stream, state)
    a, b = (read_concept(d) for d in concept_dirs[:2])
    prompt = f"a photo of a {a.token} {a.noun} next to a {b.token} {b.noun}"
    before = stream.generate(prompt, n=2, seed=11, steps=3, progress=False)
    again = api.open_stream(state)
    assert again.tokens == [a.token, b.token]
    live, reloaded = stream.pipe.unet.state_dict(), again.pipe.unet.state_dict()
    assert live.keys() == reloaded.keys()
    assert [k for k in live if not torch.equal(live[k], reloaded[k])] == []
    fresh = load_pipeline(str(bundled_model_path)).unet.state_dict()
    base_live = {k.replace(".base_layer.", "."): v for k, v in live.items()
                 if not any(m in k for m in ("lora_", "vera_"))}
    assert base_live.keys() == fresh.keys()
    changed = [k for k in fresh if not torch.equal(fresh[k], base_live[k])]
    if method in ("c-lora", "custom-diffusion"):  # these write learned deltas into the base weights
        assert changed and all("attn2.to_k" in k or "attn2.to_v" in k for k in changed), changed[:3]
    else:  # adapter methods leave every base weight as it was
        assert changed == []
    after = again.generate(prompt, n=2, seed=11, steps=3, progress=False)
    assert np.array_equal(_px(before), _px(after))
    if adapter == "vera":
        assert api.info(state)["method"]["adapter"]["kind"] == "vera"
        assert len(api.info(state)["concepts"]) == 2


# -- export interop ------------------------------------------------------------------------------
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
        images = []
        for prompt in prompts:
            gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
            images += p([prompt] * n, num_inference_steps=steps, guidance_scale=guidance, generator=gens).images
        return _px(images)

    ref = _px(reference)
    diff = np.abs(stock(pipe) - ref)
    assert diff.mean() <= 2.0 and diff.max() <= 64, (diff.mean(), diff.max())
    # the LoRA file carries what was learned: without it the same tokens give other pictures
    pipe.unload_lora_weights()
    assert np.abs(stock(pipe) - ref).mean() > 4 * max(diff.mean(), 0.05)


# -- quality smoke test --------------------------------------------------------------------------
@pytest.mark.slow
def test_learned_concept_is_recognised_by_dc_on_held_out_views(bundled_model_path):
    """300 lora steps on one rendered concept, then 2-way DC classification [c_0, concept prompt].

    Seen when written (base model at step 2000; 8 train views, 16 stratified timesteps): held-out
    views of the concept 7/8 classified as the concept; 0/8 views of another instance of the same
    class (another look) claimed by the token.
    """
    concept, other = get_sequence("tabletop-6")[0], get_sequence("tabletop-50")[10]
    assert other.noun == concept.noun and other.name != concept.name
    renderer = TabletopRenderer(64)
    train = [renderer.render_concept(concept, "train", i).image for i in range(8)]
    held_out = [renderer.render_concept(concept, "eval", i).image for i in range(8)]
    other_views = [renderer.render_concept(other, "eval", i).image for i in range(8)]
    renderer.close()

    stream = ConceptStream.new(str(bundled_model_path), StreamSettings(method="lora"))
    t0 = time.time()
    report = stream.learn(train, concept.token, concept.noun, steps=300, seed=0, progress=False)
    seconds = time.time() - t0
    assert math.isfinite(report.final_loss)
    assert seconds < 120, f"300 steps took {seconds:.0f}s"
    stream.dc.config.eval_timesteps = 16
    cond = _encode(stream.pipe, [f"a photo of a {concept.noun}", f"a photo of a {concept.token} {concept.noun}"])

    def scores(images):
        latents, _ = stream.encode_images(images)
        err = stream.dc.eval_errors(latents, cond, seed=0)
        return (err.argmin(-1) == 1).float().mean().item(), (err[:, 0] - err[:, 1]).mean().item()

    acc, gap = scores(held_out)
    other_acc, other_gap = scores(other_views)
    latents, _ = stream.encode_images(held_out)
    assert stream.dc.classify(latents, cond, seed=0).eq(1).float().mean().item() == pytest.approx(acc)
    summary = (f"held-out acc {acc:.3f} gap {gap:.5f}; other instance acc {other_acc:.3f} gap {other_gap:.5f}; "
               f"{seconds:.0f}s for 300 steps")
    print(summary)  # shown with -rP / -s
    assert acc >= 0.7, summary
    assert other_acc <= 0.375, summary  # the token means this instance, not the whole class
    assert gap > 0 and gap > other_gap + 1e-3, summary


# -- divergence ----------------------------------------------------------------------------------
def test_nan_loss_aborts_task_and_leaves_state_unchanged(tmp_path, random_model_path, concept_dirs, monkeypatch,
                                                         capsys):
    from conceptstream.cli import main
    from conceptstream.methods.lora import SequentialLoRA

    state = tmp_path / "state"
    api.learn(state, concept_dirs[0], method="lora", model=str(random_model_path), steps=2, progress=False)
    before = _snapshot(state)
    original = SequentialLoRA.loss
    calls = []

    def nan_at_step_2(self, ctx, step):
        loss, info = original(self, ctx, step)
        calls.append(step)
        return (loss * float("nan") if step == 2 else loss), info

    monkeypatch.setattr(SequentialLoRA, "loss", nan_at_step_2)
    with pytest.raises(TrainingDiverged, match="step 2"):
        api.learn(state, concept_dirs[1], model=str(random_model_path), steps=5, progress=False)
    assert calls == [0, 1, 2]
    _assert_same_snapshot(before, _snapshot(state))
    # the CLI reports it in one line, exit 2
    capsys.readouterr()
    rc = main(["learn", str(state), "--images", str(concept_dirs[1]), "--model", str(random_model_path),
               "--steps", "4"])
    assert rc == 2
    assert "nan" in assert_error_after_progress(capsys.readouterr().err).lower()  # after the task's progress bar
    _assert_same_snapshot(before, _snapshot(state))
    # and the state stays usable
    monkeypatch.setattr(SequentialLoRA, "loss", original)
    api.learn(state, concept_dirs[1], model=str(random_model_path), steps=2, progress=False)
    assert [c["token"] for c in api.info(state)["concepts"]] == [read_concept(d).token for d in concept_dirs[:2]]


# -- every registered method ---------------------------------------------------------------------
SMALL = {"dsc_iters": 2, "fisher_passes": 1}


@pytest.mark.parametrize("name", method_names())
def test_every_method_learns_two_tasks(tmp_path, random_model_path, concept_dirs, name):
    hparams = {k: v for k, v in SMALL.items() if k in get_method(name).all_defaults()}
    state = tmp_path / "state"
    reports = [api.learn(state, d, method=name if i == 0 else None, model=str(random_model_path), steps=2,
                         progress=False, hparams=hparams if i == 0 else None)
               for i, d in enumerate(concept_dirs[:2])]
    assert [r.task_index for r in reports] == [0, 1]
    assert all(math.isfinite(r.final_loss) for r in reports)
    data = api.info(state)
    assert data["method"]["name"] == name
    assert [c["token"] for c in data["concepts"]] == [read_concept(d).token for d in concept_dirs[:2]]
    assert [c["task_index"] for c in data["concepts"]] == [0, 1]
    assert "tokens.safetensors" in data["files"]
    assert ("adapter.safetensors" in data["files"]) == get_method(name).uses_adapter
    for k, v in hparams.items():
        assert data["method"]["hyperparameters"][k] == v
    stream = api.open_stream(state)
    assert stream.tokens == [c["token"] for c in data["concepts"]]


# -- learn errors --------------------------------------------------------------------------------
def test_learn_errors_on_a_new_state_create_nothing(tmp_path, random_model_path, concept_dirs, capsys):
    from conceptstream.cli import main

    state = tmp_path / "state"
    with pytest.raises(UserInputError, match="unknown method 'ewc-xyz'"):
        api.learn(state, concept_dirs[0], method="ewc-xyz", model=str(random_model_path), steps=2, progress=False)
    assert not StateStore(state).exists()
    capsys.readouterr()
    rc = main(["learn", str(state), "--images", str(concept_dirs[0]), "--model", str(random_model_path),
               "--steps", "2", "--set", "no_such_setting=3"])
    assert rc == 2
    line = assert_one_line_error(capsys.readouterr().err)
    assert "no_such_setting" in line
    assert not StateStore(state).exists()
    rc = main(["learn", str(state), "--images", str(concept_dirs[0]), "--model", str(random_model_path),
               "--steps", "2", "--method", "nope"])
    assert rc == 2 and "unknown method 'nope'" in assert_one_line_error(capsys.readouterr().err)
    assert not StateStore(state).exists()


def test_learn_errors_on_an_existing_state_leave_it_unchanged(tmp_path, random_model_path, concept_dirs, capsys):
    from conceptstream.cli import main

    state = tmp_path / "state"
    model = str(random_model_path)
    api.learn(state, concept_dirs[0], method="lora", model=model, steps=2, progress=False)
    before = _snapshot(state)
    existing = read_concept(concept_dirs[0]).token
    with pytest.raises(UserInputError, match="already in this stream"):
        api.learn(state, concept_dirs[1], token=existing, model=model, steps=2, progress=False)
    with pytest.raises(UserInputError, match="invalid token"):
        api.learn(state, concept_dirs[1], token="<my dog>", model=model, steps=2, progress=False)
    with pytest.raises(StateError, match="method 'lora'"):
        api.learn(state, concept_dirs[1], method="ewc-dc", model=model, steps=2, progress=False)
    with pytest.raises(StateError, match="--set"):
        api.learn(state, concept_dirs[1], model=model, steps=2, progress=False, hparams={"lr": 0.1})
    _assert_same_snapshot(before, _snapshot(state))
    capsys.readouterr()
    cases = [(["--token", "<my dog>"], "invalid token"), (["--token", existing], "already in this stream"),
             (["--set", "bogus=1"], "--set"), (["--method", "c-lora"], "one method")]
    for extra, needle in cases:
        rc = main(["learn", str(state), "--images", str(concept_dirs[1]), "--model", model, "--steps", "2", *extra])
        assert rc == 2, extra
        assert needle in assert_one_line_error(capsys.readouterr().err), extra
    _assert_same_snapshot(before, _snapshot(state))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_and_gradient_checkpointing_train(tmp_path, random_model_path, concept_dirs, precision):
    """Autocast (through accelerate) + gradient checkpointing run a task; trained values stay fp32 and finite.

    fp16 has no CPU autocast: on a CPU-only machine it is refused with a one-line error and no state."""
    from conceptstream import api

    state = tmp_path / "s"
    kwargs = dict(model=str(random_model_path), method="lora", steps=2, progress=False, checkpoint_every=0,
                  mixed_precision=precision, gradient_checkpointing=True)
    if precision == "fp16" and not torch.cuda.is_available():
        with pytest.raises(UserInputError, match="fp16 needs a GPU"):
            api.learn(state, concept_dirs[0], **kwargs)
        assert not state.exists()
        return
    api.learn(state, concept_dirs[0], **kwargs)
    stream = api.open_stream(state)
    values = stream.state_tensors()["adapter"]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in values.values())
    assert stream.manifest["concepts"][0]["mixed_precision"] == precision
    assert not stream.pipe.unet.is_gradient_checkpointing
    # accelerate keeps one precision per process; a later task in another precision still runs
    api.learn(state, concept_dirs[1], **{**kwargs, "mixed_precision": "no"})
    assert [c["mixed_precision"] for c in api.open_stream(state).manifest["concepts"]] == [precision, "no"]
