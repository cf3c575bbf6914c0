"""Base-model training: resumable, exports a stock pipeline, can be seeded from an export."""

import json

import torch
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
    assert json.loads((out_b / "training.json").read_text())["unet_step"] == 5


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
