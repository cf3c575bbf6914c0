"""epsilon and v-prediction models: the training target, the DC errors (always in epsilon space), a
concept learned on a v-prediction model, and the refusal of other prediction types."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conceptstream.errors import UserInputError
from conceptstream.methods.base import ContinualMethod
from conceptstream.scoring.dc import DiffusionClassifier


def _with_prediction_type(src: Path, dst: Path, kind: str) -> Path:
    shutil.copytree(src, dst)
    cfg_path = dst / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["prediction_type"] = kind
    cfg_path.write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def v_model_path(tmp_path_factory, bundled_model_path) -> Path:
    """The bundled model as an SD-2.x-style v-prediction pipeline (its scheduler says v_prediction)."""
    return _with_prediction_type(bundled_model_path, tmp_path_factory.mktemp("v") / "tiny-v", "v_prediction")


def _scheduler(path: Path):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_pretrained(path, subfolder="scheduler")


def test_the_v_target_is_the_schedulers_velocity_and_dc_errors_are_in_epsilon_space(v_model_path):
    sched = _scheduler(v_model_path)
    assert sched.config.prediction_type == "v_prediction"
    dc = DiffusionClassifier(None, sched)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 4, 16, 16, generator=g), torch.randn(5, 4, 16, 16, generator=g)
    t = torch.tensor([0, 10, 400, 800, 999])
    v = dc.training_target(x0, t, eps)
    torch.testing.assert_close(v, sched.get_velocity(x0, eps, t), rtol=1e-5, atol=1e-6)
    x_t = dc.noisy(x0, t, eps)
    torch.testing.assert_close(x_t, sched.add_noise(x0, eps, t), rtol=1e-5, atol=1e-6)
    # a perfect v prediction is a perfect noise prediction: DC errors compare noises
    torch.testing.assert_close(dc.predicted_noise(v, x_t, t), eps, rtol=1e-4, atol=1e-4)
    # an epsilon model's target and errors are the noise itself (bit for bit: committed results stand)
    eps_dc = DiffusionClassifier(None, sched)
    eps_dc.prediction_type = "epsilon"
    assert eps_dc.training_target(x0, t, eps) is eps and eps_dc.predicted_noise(v, x_t, t) is v


def test_the_denoising_loss_trains_toward_the_velocity_on_a_v_model(v_model_path):
    sched = _scheduler(v_model_path)
    dc = DiffusionClassifier(None, sched)
    z = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    out = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(2))  # what the "UNet" predicts
    ctx = SimpleNamespace(dc=dc, generator=torch.Generator().manual_seed(7), device=torch.device("cpu"),
                          unet=lambda x, t, c: SimpleNamespace(sample=out), encode=lambda p: torch.zeros(len(p), 1),
                          prompt=lambda c: "p", batch_prompts=lambda b: ["p"] * b, current=None)
    loss = ContinualMethod.denoise_loss(ctx, z)
    g = torch.Generator().manual_seed(7)  # the same draws as denoise_loss: t, then the noise
    t = torch.randint(0, dc.num_train_timesteps, (3,), generator=g)
    noise = torch.randn(z.shape, generator=g)
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(out, sched.get_velocity(z, noise, t)))


@pytest.mark.parametrize("kind", ["sample", "flow"])
def test_other_prediction_types_are_refused_in_one_line(tmp_path, random_model_path, concept_dirs, kind, capsys):
    from conftest import assert_one_line_error

    from conceptstream.cli import main

    model = _with_prediction_type(random_model_path, tmp_path / "m", "sample")
    if kind == "flow":  # a flow-matching scheduler (SD3, Flux) has no alphas_cumprod
        from diffusers import FlowMatchEulerDiscreteScheduler

        shutil.rmtree(model / "scheduler")
        FlowMatchEulerDiscreteScheduler().save_pretrained(model / "scheduler")
        index = json.loads((model / "model_index.json").read_text())
        index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
        (model / "model_index.json").write_text(json.dumps(index))
    state = tmp_path / "state"
    rc = main(["learn", str(state), "--images", str(concept_dirs[0]), "--model", str(model), "--steps", "1"])
    assert rc == 2
    line = assert_one_line_error(capsys.readouterr().err)
    assert ("'sample'" in line if kind == "sample" else "flow matching" in line) and "v_prediction" in line
    assert not state.exists()
    with pytest.raises(UserInputError):
        DiffusionClassifier(None, SimpleNamespace(config={"prediction_type": "sample"}, alphas_cumprod=torch.ones(3)))


@pytest.mark.slow
def test_a_concept_learned_on_a_v_model_is_told_from_its_class_by_dc(v_model_path):
    """300 lora steps on one rendered concept of a v-prediction model, then 2-way DC classification
    [c_0, concept] of 16 held-out views (chance 0.5). The base is the bundled epsilon UNet read as a
    v model, so the adapter must also learn the v target: a hard case, hence the loose bound and an
    adapter on every attention projection (on the v2 model, cross-attention K/V alone, which only
    steers the 8x8 and 4x4 levels, stays at or below chance in 300 steps; every projection reached
    14 of 16 when this was written). On the v3 model (a wider UNet) the adapter rate 1e-3 of v2 reached
    6 of 16 in 300 steps, 12 of 16 in 600; 3e-3 reaches 11 of 16 in 300 steps, the rate used here."""
    from conceptstream.adapters.registry import AdapterSpec
    from conceptstream.engine import ConceptStream, StreamSettings
    from conceptstream.models.tokens import encode_prompts
    from conceptstream.world.catalogue import get_sequence
    from conceptstream.world.render import TabletopRenderer

    concept = get_sequence("tabletop-6")[0]
    renderer = TabletopRenderer(64)
    train = [renderer.render_concept(concept, "train", i).image for i in range(8)]
    held_out = [renderer.render_concept(concept, "eval", i).image for i in range(16)]
    renderer.close()
    # rates calibrated on the bundled model (above), not lora's tuned defaults (lr 3e-4, token_lr 2e-3)
    stream = ConceptStream.new(str(v_model_path), StreamSettings(method="lora", adapter=AdapterSpec(targets="attention"),
                                                                 hparams={"lr": 3e-3, "token_lr": 5e-3}))
    assert stream.dc.prediction_type == "v_prediction"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # calibrated at 2 threads; an earlier test's 1 thread changes the float order and the result
    try:
        stream.learn(train, concept.token, concept.noun, steps=300, seed=0, progress=False)
    finally:
        torch.set_num_threads(threads)
    stream.dc.config.eval_timesteps = 16
    pipe = stream.pipe
    cond = encode_prompts(pipe.tokenizer, pipe.text_encoder,
                          [f"a photo of a {concept.noun}", f"a photo of a {concept.token} {concept.noun}"])
    latents, _ = stream.encode_images(held_out)
    with torch.no_grad():
        acc = stream.dc.classify(latents, cond, seed=0).eq(1).float().mean().item()
    print(f"v-prediction model: held-out DC accuracy {acc:.3f} (chance 0.5)")
    assert acc > 0.5
