"""Base-model training: resumable, exports a stock pipeline, can be seeded from an export."""

import json

import pytest
import torch
from conftest import benchmark_script
from diffusers import StableDiffusionPipeline

from conceptstream.world.train_base import BaseTrainer, BaseTrainingConfig


def _cfg(tmp_path, name, **kw):
    base = dict(workdir=str(tmp_path / f"{name}-work"), out=str(tmp_path / f"{name}-model"), images_per_class=2,
                vae_steps=2, decoder_steps=2, unet_steps=3, checkpoint_every=1, export_every=100, batch_size=2)
    base.update(kw)
    return BaseTrainingConfig(**base)


def test_train_resume_export_and_seed(tmp_path):
    torch.set_num_threads(1)
    cfg = _cfg(tmp_path, "a", max_minutes=0.0)  # stops cleanly after the first checkpoint
    assert BaseTrainer(cfg, progress=False).run() is None
    progress = json.loads((tmp_path / "a-work" / "progress.json").read_text())
    assert progress["vae_step"] == 1 and progress["unet_step"] == 0

    cfg.max_minutes = None
    out = BaseTrainer(cfg, progress=False).run()
    progress = json.loads((tmp_path / "a-work" / "progress.json").read_text())
    assert (progress["vae_step"], progress["decoder_step"], progress["unet_step"]) == (2, 2, 3)
    info = json.loads((out / "training.json").read_text())
    assert info["unet_step"] == 3 and info["scaling_factor"] > 0
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    img = pipe("a photo of a mug", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (64, 64)
    assert "UNet + text encoder: 3 of 3" in (out / "README.md").read_text()

    seeded = BaseTrainer(_cfg(tmp_path, "b", unet_steps=5, init_from=str(out)), progress=False)
    assert seeded.state["unet_step"] == 3 and seeded.state["warm_start"] == 3
    assert seeded.state["wall_seconds"] >= info["wall_seconds"]  # the seeded run keeps the wall time so far
    out_b = seeded.run()
    info_b = json.loads((out_b / "training.json").read_text())
    assert info_b["unet_step"] == 5 and info_b["unet_runs"] == [[0, 3], [3, 5]]
    assert "Trained in 2 runs, steps 0..3 (planned to 3); 3..5 (planned to 5)" in (out_b / "README.md").read_text()


def test_decoder_stage_keeps_the_encoder_and_latents(tmp_path):
    """Sharpening the decoder must not move the encoder: the UNet is trained on its latents."""
    from conceptstream.safeio import load_tensors

    torch.set_num_threads(1)
    cfg = _cfg(tmp_path, "c", decoder_steps=0, unet_steps=1)
    BaseTrainer(cfg, progress=False).run()
    before = load_tensors(tmp_path / "c-work" / "vae.safetensors")
    cfg.decoder_steps = 3
    BaseTrainer(cfg, progress=False).run()
    after = load_tensors(tmp_path / "c-work" / "vae.safetensors")
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith(("decoder.", "post_quant_conv.")) for k in moved)
    assert json.loads((tmp_path / "c-work" / "progress.json").read_text())["decoder_step"] == 3


def test_latent_channels_build_train_and_must_match_on_resume(tmp_path):
    """An 8-channel autoencoder + UNet train and export; resuming with another width is refused."""
    import pytest

    from conceptstream.errors import UserInputError

    torch.set_num_threads(1)
    cfg = _cfg(tmp_path, "c", latent_channels=8, decoder_steps=0, unet_steps=2)
    out = BaseTrainer(cfg, progress=False).run()
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    assert pipe.vae.config.latent_channels == 8 and pipe.unet.config.in_channels == 8
    assert pipe("a photo of a mug", num_inference_steps=2).images[0].size == (64, 64)
    with pytest.raises(UserInputError, match="latent-channels 8"):
        BaseTrainer(_cfg(tmp_path, "c", latent_channels=4), progress=False)
    with pytest.raises(UserInputError, match="must match"):
        BaseTrainer(_cfg(tmp_path, "d", init_from=str(out)), progress=False)


def _reference_rates(name: str, base: float, warmup: int, total: int, steps: int) -> list[float]:
    """The rate of a fresh diffusers scheduler after 0..steps-1 optimizer steps."""
    from diffusers.optimization import get_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total)
    rates = []
    for _ in range(steps):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return rates


@pytest.mark.parametrize("name", ["cosine", "linear", "constant_with_warmup"])
def test_unet_lr_schedule_is_diffusers_get_scheduler_resumed_at_any_step(tmp_path, name):
    from conceptstream.world.train_base import BaseTrainingConfig, unet_lr_schedule

    cfg = BaseTrainingConfig(workdir=str(tmp_path), out=str(tmp_path), unet_steps=40, lr_warmup_steps=8,
                             lr_scheduler=name)
    expected = _reference_rates(name, 0.5, 8, 40, 40)
    assert expected[0] == 0.0 and max(expected) == pytest.approx(0.5)
    for step in range(40):  # a run resumed at ``step`` continues the same schedule
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        unet_lr_schedule(opt, cfg, step)
        assert opt.param_groups[0]["lr"] == pytest.approx(expected[step], abs=1e-12), step
    # seeded from an export at step 30: warm-up again, over the 10 steps left
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    unet_lr_schedule(opt, cfg, 34, warm_start=30)
    assert opt.param_groups[0]["lr"] == pytest.approx(_reference_rates(name, 0.5, 8, 10, 5)[4])


def test_unknown_lr_scheduler_is_refused(tmp_path):
    from conceptstream.errors import UserInputError

    with pytest.raises(UserInputError, match="lr_scheduler 'warmup-cosine' is not one of"):
        BaseTrainer(_cfg(tmp_path, "g", lr_scheduler="warmup-cosine"), progress=False)


def test_unet_stage_ema_and_learning_rate_across_a_resume(tmp_path):
    """EMA after global step k uses decay min(ema_decay, (1 + k) / (10 + k)), also after resuming;
    the optimizer's rate is the configured rate on diffusers' schedule at that step."""
    from conceptstream.safeio import load_tensors, load_tensors_with_metadata
    from conceptstream.world.tiny_model import build_components
    torch.set_num_threads(1)
    work = tmp_path / "e-work"
    cfg = _cfg(tmp_path, "e", decoder_steps=0, unet_steps=1, ema_decay=0.99, lr_warmup_steps=3)
    BaseTrainer(cfg, progress=False).run()
    init = {f"unet.{k}": v for k, v in build_components(cfg.seed)["unet"].state_dict().items()}
    live, ema = load_tensors(work / "unet.safetensors"), load_tensors(work / "ema.safetensors")
    for k in init:
        torch.testing.assert_close(ema[k], 2 / 11 * init[k] + 9 / 11 * live[k], rtol=0, atol=1e-6)
    cfg.unet_steps = 2
    BaseTrainer(cfg, progress=False).run()
    live2, ema2 = load_tensors(work / "unet.safetensors"), load_tensors(work / "ema.safetensors")
    moved = [k for k in init if not torch.equal(live[k], live2[k])]
    assert moved
    for k in moved:
        torch.testing.assert_close(ema2[k], 3 / 12 * ema[k] + 9 / 12 * live2[k], rtol=0, atol=1e-6)
    groups = json.loads(load_tensors_with_metadata(work / "unet_opt.safetensors")[1]["param_groups"])
    assert [g["lr"] for g in groups] == pytest.approx([_reference_rates("cosine", r, 3, 2, 3)[2]
                                                       for r in (cfg.unet_lr, cfg.text_lr)])


def test_negative_warmup_is_refused(tmp_path):
    from conceptstream.errors import UserInputError

    with pytest.raises(UserInputError, match="lr_warmup_steps"):
        BaseTrainer(_cfg(tmp_path, "f", lr_warmup_steps=-1), progress=False)


def test_vae_downsample_2_gives_32x32_latents_vae_only_export_and_resume_checks(tmp_path):
    """--vae-downsample 2: a two-block VAE (32x32 latents), a UNet of sample size 32; --unet-steps 0
    trains the VAE alone and still exports a loadable pipeline; other factors are refused on resume."""
    from conceptstream.errors import UserInputError

    torch.set_num_threads(1)
    cfg = _cfg(tmp_path, "d2", vae_downsample=2, decoder_steps=0, unet_steps=0)
    out = BaseTrainer(cfg, progress=False).run()
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    assert len(pipe.vae.config.block_out_channels) == 2 and pipe.unet.config.sample_size == 32
    # a convolution-only 32-channel block in front keeps the attention blocks at 8x8 and 4x4
    assert list(pipe.unet.config.block_out_channels) == [32, 64, 96, 96]
    assert list(pipe.unet.config.down_block_types[:2]) == ["DownBlock2D", "DownBlock2D"]
    z = pipe.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert z.shape == (1, 4, 32, 32)
    assert pipe("a photo of a mug", num_inference_steps=2).images[0].size == (64, 64)
    info = json.loads((out / "training.json").read_text())
    assert (info["vae_step"], info["unet_step"]) == (2, 0)
    card = (out / "README.md").read_text()
    assert "downsampling 2) to 4x32x32 latents" in card and "down blocks 32 (DownBlock), 64 (DownBlock)" in card
    with pytest.raises(UserInputError, match="vae-downsample 2"):
        BaseTrainer(_cfg(tmp_path, "d2"), progress=False)
    with pytest.raises(UserInputError, match="must match"):
        BaseTrainer(_cfg(tmp_path, "d4", init_from=str(out)), progress=False)
    with pytest.raises(UserInputError, match="vae-downsample must be one of"):
        BaseTrainer(_cfg(tmp_path, "d3", vae_downsample=3), progress=False)
    # a VAE-only export seeds a work dir: more VAE steps continue from its weights, the UNet starts fresh
    seeded = BaseTrainer(_cfg(tmp_path, "d2b", vae_downsample=2, vae_steps=3, unet_steps=1, init_from=str(out)),
                         progress=False)
    assert seeded.state["vae_step"] == 2 and not (tmp_path / "d2b-work" / "ema.safetensors").exists()
    out_b = seeded.run()
    assert json.loads((out_b / "training.json").read_text())["vae_step"] == 3


def test_more_vae_steps_re_encode_the_latents(tmp_path):
    """Resuming with more VAE steps moves the encoder: latents and scaling factor are recomputed."""
    from conceptstream.safeio import load_tensors

    torch.set_num_threads(1)
    cfg = _cfg(tmp_path, "r", decoder_steps=0, unet_steps=0)
    BaseTrainer(cfg, progress=False).run()
    before = load_tensors(tmp_path / "r-work" / "latents.safetensors")["mean"]
    cfg.vae_steps = 3
    BaseTrainer(cfg, progress=False).run()
    after = load_tensors(tmp_path / "r-work" / "latents.safetensors")["mean"]
    assert not torch.equal(before, after)


def test_generic_vae_data_trains_and_never_takes_a_concept_look(tmp_path):
    import numpy as np

    from conceptstream.world.base_data import generic_dataset, is_concept_look, procedural_pattern
    from conceptstream.world.catalogue import COLOURS, CONCEPTS
    from conceptstream.world.render import stable_rng

    torch.set_num_threads(1)
    # every catalogue concept's exact (class, pattern, colour pair) is recognised, in either colour order,
    # and so are whole-image patterns (no class) in a concept's pattern and colours
    for c in CONCEPTS:
        a, b = (np.asarray(COLOURS[n]) for n in c.colours)
        assert is_concept_look(c.class_key, c.pattern, (a, b)) and is_concept_look(c.class_key, c.pattern, (b, a))
        assert is_concept_look(None, c.pattern, (a + 0.02, b - 0.02))
    c = CONCEPTS[0]
    other = next(k for k in ("robot", "mug", "car") if k != c.class_key and not any(
        d.class_key == k and d.pattern == c.pattern and set(d.colours) == set(c.colours) for d in CONCEPTS))
    assert not is_concept_look(other, c.pattern, tuple(np.asarray(COLOURS[n]) for n in c.colours))
    for i in range(20):
        img = procedural_pattern(stable_rng("t", i), 32, class_key="mug")
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8

    cfg = _cfg(tmp_path, "g", decoder_steps=0, unet_steps=0, vae_generic_fraction=0.5, vae_generic_images=6)
    out = BaseTrainer(cfg, progress=False).run()
    generic = np.load(tmp_path / "g-work" / "data" / "generic-6-seed0.npy")
    assert generic.shape == (6, 64, 64, 3) and generic.std() > 0
    np.testing.assert_array_equal(generic, generic_dataset(tmp_path / "g-work", 6, 0, False))  # cached
    assert "6 generic images (50% of each batch)" in (out / "README.md").read_text()
    assert json.loads((out / "training.json").read_text())["vae_data"] == {"generic_fraction": 0.5, "generic_images": 6}
    # a later run from that export, under a config without generic data, still tells the VAE's data truly
    later = BaseTrainer(_cfg(tmp_path, "g2", decoder_steps=0, unet_steps=1, init_from=str(out)), progress=False).run()
    assert "6 generic images (50% of each batch)" in (later / "README.md").read_text()
    # the default (no generic data) renders none
    BaseTrainer(_cfg(tmp_path, "h", decoder_steps=0, unet_steps=0), progress=False).run()
    assert not list((tmp_path / "h-work" / "data").glob("generic-*"))
    with pytest.raises(Exception, match="vae-generic-fraction"):
        BaseTrainer(_cfg(tmp_path, "i", vae_generic_fraction=1.5), progress=False)


def test_patterned_unet_data_names_pattern_and_colours_and_never_takes_a_concept_look(tmp_path):
    """--unet-pattern-images: objects in concept patterns, captioned with them; no (class, pattern, colour
    pair) of a catalogue concept; every pattern appears; the UNet trains on renders + patterned images."""
    from conceptstream.world.base_data import pattern_dataset, patterned_look
    from conceptstream.world.catalogue import CONCEPTS, PATTERN_WORDS, PATTERNS

    concept_looks = {(c.class_key, c.pattern, frozenset(c.colours)) for c in CONCEPTS}
    looks = [patterned_look(i, 0) for i in range(2000)]
    assert not [lk for lk in looks if (lk[0].key, lk[1], frozenset(lk[2])) in concept_looks]
    assert {lk[1] for lk in looks} == set(PATTERNS) and all(lk[2][0] != lk[2][1] for lk in looks)
    # a concept's pattern and colours do appear, on other classes: the concept is a new combination
    c = CONCEPTS[0]
    assert any(lk[1] == c.pattern and frozenset(lk[2]) == frozenset(c.colours) for lk in looks)

    torch.set_num_threads(1)
    cfg = _cfg(tmp_path, "p", decoder_steps=0, unet_steps=2, unet_pattern_images=4)
    out = BaseTrainer(cfg, progress=False).run()
    images, captions = pattern_dataset(tmp_path / "p-work", 4, 0, False)  # the cached set
    assert images.shape == (4, 64, 64, 3) and images.std() > 0
    for i, caption in enumerate(captions):
        cls, pattern, pair, _ = patterned_look(i, 0)
        assert caption.startswith("a photo of a") and f"{PATTERN_WORDS[pattern]} {cls.noun}" in caption
        assert f"{pair[0]} and {pair[1]}" in caption or pair[0] not in caption
    from conceptstream.safeio import load_tensors

    assert len(load_tensors(tmp_path / "p-work" / "latents.safetensors")["mean"]) == 2 * 10 + 4
    assert "also saw 4 renders of base-class objects painted in the concept patterns" in (out / "README.md").read_text()


def test_codec_benchmark_on_a_work_dir(tmp_path):
    """benchmarks/base_model_quality.py --codec-only: reference rows plus a work dir's VAE round trip."""
    torch.set_num_threads(1)
    bmq = benchmark_script("base_model_quality")

    cfg = _cfg(tmp_path, "k", decoder_steps=0, unet_steps=0, vae_downsample=2)
    BaseTrainer(cfg, progress=False).run()
    out = tmp_path / "codec.json"
    result = bmq.main(["--codec-only", "--vae", str(tmp_path / "k-work"), "--sequence", "tabletop-3",
                       "--train-views", "2", "--eval-views", "1", "--cache", str(tmp_path / "cache"), "--out", str(out)])
    rows = result["results"]
    assert set(rows) == {"raw", "bicubic_32px", "bicubic_16px", "vae:k-work"}
    assert rows["raw"]["psnr_db"] > 90 and 0 <= rows["vae:k-work"]["acc_efficientnet_lite0"] <= 1
    assert result["vaes"]["vae:k-work"]["latent"] == [4, 32, 32] and result["vaes"]["vae:k-work"]["vae_step"] == 2
    assert json.loads(out.read_text())["protocol"]["concepts"] == 3
    assert str(tmp_path) not in out.read_text()  # no machine paths
    again = bmq.main(["--codec-only", "--vae", str(tmp_path / "k-work"), "--sequence", "tabletop-3",
                      "--train-views", "2", "--eval-views", "1", "--cache", str(tmp_path / "cache"), "--out", str(out),
                      "--workdir", str(tmp_path / "k-work")])
    assert again["results"] == rows  # cached renders and features give the same numbers
    # --workdir records it for the model card, which the next export writes
    card = (BaseTrainer(cfg, progress=False).run() / "README.md").read_text()
    assert "VAE round trip of tabletop-3's held-out views (1 per concept)" in card
    assert f"**{rows['vae:k-work']['acc_efficientnet_lite0']:.3f}**" in card


def test_the_model_card_states_the_committed_concept_numbers_of_the_bundled_model():
    """The card's goal lines from the committed measurements of the bundled model (the v2 VAE, the v3 UNet);
    the bundled card carries the same lines."""
    from pathlib import Path

    from conceptstream.world.model_card import goal_lines

    root = Path(__file__).resolve().parents[2]
    results = root / "benchmarks" / "results" / "base-model-v2"
    lines = goal_lines(json.loads((results / "codec-vae-4ch32-gen-step4000.json").read_text()),
                       json.loads((results / "concepts-alone-v3-w128-30000.json").read_text()))
    assert "**0.843**" in lines and "**0.500**" in lines and "200 steps" in lines
    assert goal_lines(None, None) == ""
    bundled = (root / "src" / "conceptstream" / "assets" / "tiny-sd" / "README.md").read_text()
    assert lines in bundled


def test_rendering_in_worker_processes_gives_the_same_training_images(tmp_path):
    """--render-workers N (for a GPU machine's idle cores) renders the same data bit for bit."""
    import numpy as np

    from conceptstream.world.base_data import generic_dataset, render_dataset

    one, caps_one = render_dataset(tmp_path / "w1", 1, 0, False, workers=1)
    two, caps_two = render_dataset(tmp_path / "w2", 1, 0, False, workers=2)
    np.testing.assert_array_equal(one, two)
    assert caps_one == caps_two
    np.testing.assert_array_equal(generic_dataset(tmp_path / "w1", 5, 0, False, workers=1),
                                  generic_dataset(tmp_path / "w2", 5, 0, False, workers=2))


@pytest.mark.parametrize("device, message", [("gpu0", "is not a torch device"), ("cuda", "no usable CUDA GPU")])
def test_train_base_refuses_a_device_torch_cannot_use_in_one_line(tmp_path, capsys, device, message):
    from conftest import assert_one_line_error

    from conceptstream.cli import main

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    rc = main(["world", "train-base", "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "m"),
               "--device", device])
    assert rc != 0
    assert message in assert_one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "w" / "data").exists()  # refused before any rendering


def test_concepts_alone_benchmark_learns_each_concept_alone_and_scores_it_among_the_candidates(
        tmp_path, random_model_path):
    """benchmarks/concepts_alone.py (goal 3): per budget, each concept learned alone, its images assigned
    among the candidates' centroids; nothing of a concept is left on disk."""
    import tempfile
    from pathlib import Path

    torch.set_num_threads(1)
    concepts_alone = benchmark_script("concepts_alone")

    before = set(Path(tempfile.gettempdir()).glob("conceptstream-alone-*"))
    out = tmp_path / "alone.json"
    result = concepts_alone.main(["--model", str(random_model_path), "--sequence", "tabletop-3", "--against",
                                  "tabletop-6", "--steps", "1,2", "--images", "2", "--train-views", "2",
                                  "--sampler-steps", "2", "--cache", str(tmp_path / "cache"), "--out", str(out)])
    assert set(result["budgets"]) == {"1", "2"}
    for row in result["budgets"].values():
        assert len(row["per_concept"]) == 3 and 0 <= row["mean_accuracy"] <= 1
        for r in row["per_concept"].values():  # every image is either a hit or a confusion
            assert round(r["accuracy"] * 2) + sum(r["confused_with"].values()) == 2
    assert result["protocol"]["chance"] == 1 / 6
    assert str(tmp_path) not in out.read_text()  # no machine paths
    assert set(Path(tempfile.gettempdir()).glob("conceptstream-alone-*")) == before  # the work folder is gone
    with pytest.raises(SystemExit, match="not in tabletop-3"):
        concepts_alone.main(["--sequence", "tabletop-6", "--against", "tabletop-3"])


def test_sigterm_while_rendering_stops_before_training(tmp_path, monkeypatch):
    """A SIGTERM during the (minutes-long) render stops the run before the first training step."""
    import os
    import signal

    import conceptstream.world.train_base as tb

    real = tb.render_dataset

    def render_then_terminate(*args, **kwargs):
        out = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to the trainer's handler, not the default one
        return out

    monkeypatch.setattr(tb, "render_dataset", render_then_terminate)
    torch.set_num_threads(1)
    cfg = _cfg(tmp_path, "t")
    assert BaseTrainer(cfg, progress=False).run() is None
    progress = json.loads((tmp_path / "t-work" / "progress.json").read_text())
    assert (progress["vae_step"], progress["unet_step"]) == (0, 0)


def test_quality_benchmark_s_start_latents_and_latent_statistics(random_model_path, renderer):
    """base_model_quality.py: pure-noise starts are the pipeline's own draws; --start mean-leak adds
    sqrt(alpha-bar at the first sampling step) x the per-channel latent mean; the statistics are per channel."""
    from conceptstream.models.loading import load_pipeline

    bmq = benchmark_script("base_model_quality")

    pipe = load_pipeline(str(random_model_path))
    c, size = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    gens = lambda: [torch.Generator().manual_seed(s) for s in (0, 1)]  # noqa: E731
    noise = bmq.start_latents(pipe, gens(), 30, None)
    expected = torch.cat([torch.randn((1, c, size, size), generator=g) for g in gens()])  # diffusers' randn_tensor
    assert torch.equal(noise, expected)
    mean = [0.5, -1.0, 0.0, 2.0][:c]
    leak = bmq.start_latents(pipe, gens(), 30, mean)
    pipe.scheduler.set_timesteps(30)
    a = float(pipe.scheduler.alphas_cumprod[int(pipe.scheduler.timesteps[0])])
    assert 0 < a < 0.05
    shift = (leak - (1 - a) ** 0.5 * noise).mean((0, 2, 3))
    assert torch.allclose(shift, a ** 0.5 * torch.tensor(mean), atol=1e-5)
    dc_std = [1.0, 0.5, 0.0, 2.0][:c]
    marginal = bmq.start_latents(pipe, gens(), 30, mean, dc_std) - (1 - a) ** 0.5 * noise
    assert torch.allclose(marginal, marginal[:, :, :1, :1].expand_as(marginal), atol=1e-5)  # a DC per image
    draws = []
    for g in gens():  # each image's DC: its generator's next draw after the noise
        torch.randn((c, size, size), generator=g)
        draws.append(torch.randn(c, generator=g))
    expected_dc = a ** 0.5 * (torch.tensor(mean) + torch.tensor(dc_std) * torch.stack(draws))
    assert torch.allclose(marginal[:, :, 0, 0], expected_dc, atol=1e-5)
    stats = bmq.latent_stats(pipe, renderer, per_class=1)
    assert len(stats["latent_mean"]) == len(stats["latent_std"]) == len(stats["latent_dc_std"]) == c
    assert len(stats["zero_latent_rgb"]) == 3
    assert all(s > 0 for s in stats["latent_std"]) and all(0 <= v <= 1 for v in stats["zero_latent_rgb"])


def test_quality_benchmark_s_colour_spread_and_saturation():
    from PIL import Image

    bmq = benchmark_script("base_model_quality")
    grey = [Image.new("RGB", (4, 4), (90, 90, 90))] * 3
    assert bmq._colour_stats(grey) == {"spread": 0.0, "saturation": 0.0}
    vivid = bmq._colour_stats([Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))])
    assert vivid["saturation"] == pytest.approx(1.0) and vivid["spread"] == pytest.approx(1 / 3)


def test_offset_noise_adds_one_value_per_sample_and_channel_and_zero_is_plain_noise():
    from conceptstream.world.train_base import draw_noise

    shape = torch.Size((512, 4, 8, 8))
    plain = draw_noise(shape, torch.Generator().manual_seed(3))
    assert torch.equal(plain, torch.randn(shape, generator=torch.Generator().manual_seed(3)))
    offset = draw_noise(shape, torch.Generator().manual_seed(3), 0.1)
    extra = offset - plain  # the same generator draws the per-element noise first
    assert torch.allclose(extra, extra[:, :, :1, :1].expand_as(extra), atol=1e-6)
    assert 0.09 < float(extra[:, :, 0, 0].std()) < 0.11


def test_noise_offset_trains_is_recorded_in_the_model_card_and_bad_values_are_refused(tmp_path):
    from conceptstream.errors import UserInputError
    from conceptstream.safeio import load_tensors

    torch.set_num_threads(1)
    with pytest.raises(UserInputError, match="--noise-offset must be in"):
        BaseTrainer(_cfg(tmp_path, "o", noise_offset=-0.1), progress=False)
    outs = {}
    for name, offset in (("p", 0.0), ("o", 0.1)):
        cfg = _cfg(tmp_path, name, decoder_steps=0, unet_steps=1, lr_warmup_steps=0, noise_offset=offset)
        outs[name] = BaseTrainer(cfg, progress=False).run()
    plain, offset = (load_tensors(tmp_path / f"{n}-work" / "unet.safetensors") for n in ("p", "o"))
    assert any(not torch.equal(plain[k], offset[k]) for k in plain)  # same seed, the noise differs
    assert "Offset noise 0.1 (every step)" in (outs["o"] / "README.md").read_text()
    assert "Offset noise" not in (outs["p"] / "README.md").read_text()


def test_bf16_mixed_precision_trains_in_fp32_weights_is_recorded_from_its_step_and_bad_values_are_refused(tmp_path):
    """--mixed-precision bf16: the UNet stage's forward under bf16 autocast, weights and checkpoints fp32,
    a different update from fp32's; the model card names each precision and the step it started at."""
    from conceptstream.errors import UserInputError
    from conceptstream.safeio import load_tensors

    torch.set_num_threads(1)
    with pytest.raises(UserInputError, match="--mixed-precision must be no or bf16"):
        BaseTrainer(_cfg(tmp_path, "x", mixed_precision="fp16"), progress=False)
    common = dict(decoder_steps=0, lr_warmup_steps=0)
    BaseTrainer(_cfg(tmp_path, "f", unet_steps=1, **common), progress=False).run()
    BaseTrainer(_cfg(tmp_path, "b", unet_steps=1, mixed_precision="bf16", **common), progress=False).run()
    fp32, bf16 = (load_tensors(tmp_path / f"{n}-work" / "unet.safetensors") for n in ("f", "b"))
    assert all(v.dtype == torch.float32 for v in bf16.values())
    assert any(not torch.equal(fp32[k], bf16[k]) for k in fp32)  # same seed and batch, another forward
    assert "UNet stage precision" not in (tmp_path / "f-model" / "README.md").read_text()
    out = BaseTrainer(_cfg(tmp_path, "f", unet_steps=2, mixed_precision="bf16", **common), progress=False).run()
    assert json.loads((tmp_path / "f-work" / "progress.json").read_text())["precision"] == [[0, "no"], [1, "bf16"]]
    assert "UNet stage precision: fp32 from step 0, bf16 from step 1" in (out / "README.md").read_text()


def test_quality_benchmark_runs_and_records_per_class_ceiling_and_colours(random_model_path, tmp_path):
    bmq = benchmark_script("base_model_quality")
    out = tmp_path / "q.json"
    result = bmq.main(["--model", str(random_model_path), "--per-class", "2", "--real", "2", "--steps", "2",
                       "--start", "marginal", "--out", str(out)])
    assert json.loads(out.read_text())["centroid_accuracy"] == result["centroid_accuracy"]
    assert (tmp_path / "q-samples.png").is_file()  # without --grid the grid goes beside --out
    rows = result["per_class"].values()
    assert len(rows) == 10 and all(r["vae_reconstruction_accuracy"] in (0.0, 0.5, 1.0) for r in rows)
    vae_mean = sum(r["vae_reconstruction_accuracy"] for r in rows) / 10
    assert vae_mean == pytest.approx(result["vae_reconstruction_centroid_accuracy"])
    assert all(len(r["colour_spread_generated_real"]) == len(r["saturation_generated_real"]) == 2 for r in rows)
    assert result["settings"]["start"] == "marginal" and len(result["latents"]["latent_dc_std"]) == 4


def test_a_wider_deeper_unet_trains_exports_and_takes_only_the_vae_of_another_unet_s_export(tmp_path, capsys):
    """--unet-channels/--unet-layers-per-block: a stock UNet of those widths and depth, named in the model
    card; seeded from an export with another UNet it keeps that export's VAE and trains its UNet from step 0;
    a work dir resumes only with the same UNet; bad widths are refused in one line."""
    from conceptstream.errors import UserInputError
    from conceptstream.safeio import load_tensors

    torch.set_num_threads(1)
    base = BaseTrainer(_cfg(tmp_path, "u", vae_downsample=2, decoder_steps=0, unet_steps=2), progress=False).run()
    wide = dict(vae_downsample=2, decoder_steps=0, unet_channels=(32, 64, 128, 128), unet_layers_per_block=2)
    seeded = BaseTrainer(_cfg(tmp_path, "w", unet_steps=1, init_from=str(base), **wide), progress=False)
    assert "taking its VAE only" in capsys.readouterr().err
    assert (seeded.state["vae_step"], seeded.state["unet_step"]) == (2, 0)
    assert not (tmp_path / "w-work" / "ema.safetensors").exists()
    vae_before = load_tensors(tmp_path / "w-work" / "vae.safetensors")
    out = seeded.run()
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    assert list(pipe.unet.config.block_out_channels) == [32, 64, 128, 128] and pipe.unet.config.layers_per_block == 2
    assert all(torch.equal(v, pipe.vae.state_dict()[k]) for k, v in vae_before.items())  # the export's VAE
    assert pipe("a photo of a mug", num_inference_steps=2).images[0].size == (64, 64)
    info = json.loads((out / "training.json").read_text())
    assert info["unet_step"] == 1 and info["unet_runs"] == [[0, 1]]
    card = (out / "README.md").read_text()
    assert "128 (CrossAttnDownBlock), 2 layers per block" in card
    assert f"Started from `{base}`'s VAE; its UNet and text encoder were not used" in card
    assert f"h are `{base}`'s) on" in card  # the wall time names the seed's share
    with pytest.raises(UserInputError, match="resume with the same --unet-channels"):
        BaseTrainer(_cfg(tmp_path, "w", vae_downsample=2, unet_steps=1), progress=False)
    with pytest.raises(UserInputError, match="takes 4 block widths, each a multiple of 32"):
        BaseTrainer(_cfg(tmp_path, "x", vae_downsample=2, unet_channels=(64, 100, 128, 128)), progress=False)
    with pytest.raises(UserInputError, match="1 layer per block"):
        BaseTrainer(_cfg(tmp_path, "y", unet_layers_per_block=0), progress=False)


def test_unet_step_cost_benchmark_builds_each_shape_and_records_its_cost(tmp_path):
    cost = benchmark_script("unet_step_cost")
    assert cost.parse_shape("default") == (None, 1) and cost.parse_shape("64,128,96,96x2") == ((64, 128, 96, 96), 2)
    out = tmp_path / "cost.json"
    cost.main(["--unet", "default", "32,64,128,128x2", "--mixed-precision", "no", "bf16", "--batch-size", "2",
               "--steps", "1", "--threads", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["block_out_channels"] for r in rows] == [[32, 64, 96, 96]] * 2 + [[32, 64, 128, 128]] * 2
    assert [r["layers_per_block"] for r in rows] == [1, 1, 2, 2] and rows[2]["params_M"] > rows[0]["params_M"]
    assert [r["mixed_precision"] for r in rows] == ["no", "bf16"] * 2
    assert all(r["seconds_per_step_median"] > 0 for r in rows)
