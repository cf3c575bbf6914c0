"""Train the bundled tiny base model on tabletop renders: VAE first, then UNet + text encoder.

One reproducible, resumable command (``conceptstream world train-base``). All state lives in a
work directory; every ``checkpoint_every`` steps the weights, EMA weights, optimizer state and
progress are written atomically (safetensors + JSON), so a killed run resumes where it stopped.
The training data is in :mod:`~conceptstream.world.base_data`, the exported README in
:mod:`~conceptstream.world.model_card`.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from conceptstream.errors import UserInputError
from conceptstream.precision import BASE_TRAINING_PRECISIONS
from conceptstream.safeio import (
    load_tensors,
    load_tensors_with_metadata,
    optimizer_from_tensors,
    optimizer_to_tensors,
    save_tensors_atomic,
    write_json_atomic,
    write_text_atomic,
)
from conceptstream.world.base_data import draw_latents, render_dataset, to_tensor
from conceptstream.world.model_card import base_model_card


@dataclass
class BaseTrainingConfig:
    workdir: str
    out: str
    images_per_class: int = 1500
    vae_steps: int = 1500
    unet_steps: int = 40000
    batch_size: int = 32
    vae_lr: float = 2e-4
    unet_lr: float = 3e-4
    text_lr: float = 1e-4
    # UNet stage learning-rate schedule (diffusers.optimization.get_scheduler): its name, and the
    # linear warm-up steps; it spans the planned ``unet_steps`` (restarted, over the steps left, when
    # seeded from an export with ``init_from``).
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 500
    kl_weight: float = 1e-6
    latent_channels: int = 4  # the bundled model's; 8 is the planned fix for the VAE ceiling (README)
    # VAE downsampling factor: 4 (the bundled model's, 16x16 latents) or 2 (32x32 latents, a costlier UNet)
    vae_downsample: int = 4
    # The UNet's width (one number per block; None: tiny_model's default for the latent size, 32,64,96,96
    # at 32x32) and depth (resnets, and attention where the block has it, per block). Another UNet than an
    # --init-from export's starts from step 0 and takes only that export's VAE.
    unet_channels: tuple[int, ...] | None = None
    unet_layers_per_block: int = 1
    # Share of each VAE batch drawn from generic images (procedural patterns, scikit-image photos and
    # textures, objects painted with patterns; base_data.generic_dataset) instead of the class renders;
    # 0 keeps the bundled model's renders-only VAE data. Never a personal concept's look.
    vae_generic_fraction: float = 0.0
    vae_generic_images: int = 6000
    # Renders of base-class objects in the concept patterns and catalogue colour pairs, captioned with
    # both ("a red and white striped mug"), added to the UNet's data (base_data.pattern_dataset); never a
    # personal concept's (class, pattern, colour pair). 0 (the default): the UNet sees no pattern.
    unet_pattern_images: int = 0
    # Stage 2: sharpen the decoder with a patch discriminator, encoder frozen, so latents (and the
    # UNet trained on them) stay valid. L1/L2 alone leave textures and patterns blurred.
    decoder_steps: int = 0  # off: on the bundled model it lowered the VAE round-trip score (README)
    decoder_batch_size: int = 16
    decoder_lr: float = 1e-4
    disc_lr: float = 2e-4
    disc_weight: float = 0.5
    ema_decay: float = 0.9995
    min_snr_gamma: float = 5.0
    # Offset noise (diffusers' train_text_to_image ``--noise_offset``): each noise map gets one extra
    # N(0, noise_offset^2) value per sample and channel, meant to let samples move their mean colour. On
    # this model 0.1 did not widen the samples' palette (benchmarks/results/base-model-v2/README.md).
    # 0 (the default) draws exactly the noise of earlier runs.
    noise_offset: float = 0.0
    # The UNet stage's forward pass: "no" (fp32, the default) or "bf16" (diffusers' ``--mixed_precision
    # bf16``: the UNet and text encoder run under bf16 autocast; weights, optimizer, EMA and loss stay
    # fp32). Pays on CPUs with AVX512-BF16/AMX and on GPUs; the model card records from which step.
    mixed_precision: str = "no"
    caption_dropout: float = 0.1
    checkpoint_every: int = 250
    export_every: int = 2000
    seed: int = 0
    # torch device of every stage (cpu, cuda, cuda:N). Batches, noise and timesteps are drawn on the CPU
    # from the same seeded generators on any device; checkpoints are CPU tensors, so a run may resume
    # on another device.
    device: str = "cpu"
    # processes that render the training images (each render is a pure function of its index: the
    # same data for any count); > 1 only pays where there are idle cores, e.g. on a GPU machine
    render_workers: int = 1
    max_minutes: float | None = None
    # Seed an empty work directory from an exported model folder (its training.json + weights):
    # training continues from the exported EMA weights with a fresh optimizer.
    init_from: str | None = None
    extra: dict = field(default_factory=dict)


class _Stop(Exception):
    pass


def unet_lr_schedule(opt: torch.optim.Optimizer, cfg: BaseTrainingConfig, step: int, warm_start: int = 0):
    """diffusers' ``get_scheduler(cfg.lr_scheduler)`` over ``warm_start .. cfg.unet_steps``, positioned at
    global ``step`` (a resumed run continues the schedule; the rate is a pure function of the step)."""
    from diffusers.optimization import get_scheduler

    for group in opt.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return get_scheduler(cfg.lr_scheduler, opt, num_warmup_steps=cfg.lr_warmup_steps,
                         num_training_steps=max(1, cfg.unet_steps - warm_start), last_epoch=step - warm_start - 1)


def _unet_shape(config) -> tuple[list[int], int]:
    """(block widths, layers per block) of a UNet config (a dict or a diffusers FrozenDict)."""
    return list(config["block_out_channels"]), config["layers_per_block"]


def draw_noise(shape: torch.Size, g: torch.Generator, offset: float = 0.0) -> torch.Tensor:
    """The UNet stage's noise: N(0, 1) per element, plus with ``offset`` > 0 one N(0, offset^2) value per
    sample and channel (offset noise). With ``offset`` 0 it is exactly ``torch.randn(shape, generator=g)``."""
    noise = torch.randn(shape, generator=g)
    if offset > 0:
        noise = noise + offset * torch.randn((*shape[:2], 1, 1), generator=g)
    return noise


def _save_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    tensors, meta = optimizer_to_tensors(opt)
    save_tensors_atomic(tensors, path, meta)


class BaseTrainer:
    """Runs the stages in order; each call to :meth:`run` resumes from the work directory."""

    def __init__(self, cfg: BaseTrainingConfig, progress: bool = True) -> None:
        from conceptstream.world.tiny_model import build_components

        self.cfg = cfg
        self.progress = progress
        self.workdir = Path(cfg.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if cfg.latent_channels < 1:
            raise UserInputError(f"--latent-channels must be >= 1, got {cfg.latent_channels}")
        from conceptstream.world.tiny_model import VAE_DOWNSAMPLES

        if cfg.vae_downsample not in VAE_DOWNSAMPLES:
            raise UserInputError(f"--vae-downsample must be one of {', '.join(map(str, VAE_DOWNSAMPLES))}, "
                                 f"got {cfg.vae_downsample}")
        if not 0.0 <= cfg.vae_generic_fraction <= 1.0 or (cfg.vae_generic_fraction > 0 and cfg.vae_generic_images < 1):
            raise UserInputError(f"--vae-generic-fraction must be in [0, 1] with --vae-generic-images >= 1, got "
                                 f"{cfg.vae_generic_fraction} and {cfg.vae_generic_images}")
        if cfg.lr_warmup_steps < 0:
            raise UserInputError(f"lr_warmup_steps must be >= 0, got {cfg.lr_warmup_steps}")
        schedulers = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
        if cfg.lr_scheduler not in schedulers:
            raise UserInputError(f"lr_scheduler {cfg.lr_scheduler!r} is not one of {', '.join(schedulers)}")
        if cfg.unet_channels is not None or cfg.unet_layers_per_block != 1:
            from conceptstream.world.tiny_model import unet_config

            try:
                unet_config(cfg.latent_channels, cfg.vae_downsample, cfg.unet_channels, cfg.unet_layers_per_block)
            except ValueError as e:
                raise UserInputError(f"--unet-channels/--unet-layers-per-block: {e}") from None
        if cfg.render_workers < 1:
            raise UserInputError(f"--render-workers must be >= 1, got {cfg.render_workers}")
        if not 0.0 <= cfg.noise_offset <= 1.0:
            raise UserInputError(f"--noise-offset must be in [0, 1] (0.05-0.1 is usual), got {cfg.noise_offset}")
        if cfg.mixed_precision not in BASE_TRAINING_PRECISIONS:  # fp16 needs a gradient scaler this loop lacks
            raise UserInputError(f"--mixed-precision must be {' or '.join(BASE_TRAINING_PRECISIONS)}, "
                                 f"got {cfg.mixed_precision!r}")
        from conceptstream.distributed import check_device

        self.device = torch.device(check_device(cfg.device))
        self.components = build_components(cfg.seed, cfg.latent_channels, cfg.vae_downsample, cfg.unet_channels,
                                           cfg.unet_layers_per_block)
        for name in ("vae", "unet", "text_encoder"):
            self.components[name].to(self.device)
        self.state_path = self.workdir / "progress.json"
        self.state = {"vae_step": 0, "decoder_step": 0, "unet_step": 0, "wall_seconds": 0.0, "scaling_factor": None,
                      "config": asdict(cfg), "losses": {}}
        if self.state_path.exists():
            saved = json.loads(self.state_path.read_text())
            had = saved.get("config", {}).get("latent_channels", 4)
            if had != cfg.latent_channels:
                raise UserInputError(f"{self.workdir} was trained with --latent-channels {had}, not "
                                     f"{cfg.latent_channels}; resume with {had} or use a new --workdir")
            had = saved.get("config", {}).get("vae_downsample", 4)
            if had != cfg.vae_downsample:
                raise UserInputError(f"{self.workdir} was trained with --vae-downsample {had}, not "
                                     f"{cfg.vae_downsample}; resume with {had} or use a new --workdir")
            had = self._saved_unet_shape(saved.get("config", {}))
            if had != _unet_shape(self.components["unet"].config):
                raise UserInputError(f"{self.workdir} was trained with a UNet of widths {had[0]} and {had[1]} layer(s) "
                                     "per block; resume with the same --unet-channels/--unet-layers-per-block or use a "
                                     "new --workdir")
            self.state.update({k: v for k, v in saved.items() if k != "config"})
        from conceptstream.system import cpu_model

        here = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else cpu_model()
        if here not in self.state.setdefault("machines", []):
            self.state["machines"].append(here)  # every machine the run has used, for the model card
        self._t0 = time.time()
        self._wall0 = self.state["wall_seconds"]
        if not self.state_path.exists() and cfg.init_from:
            self._seed_from_export(Path(cfg.init_from))
            self._wall0 = self.state["wall_seconds"]
        self._stop_requested = False

    def _saved_unet_shape(self, config: dict) -> tuple[list[int], int]:
        """(block widths, layers per block) of the UNet a saved training config built."""
        from conceptstream.world.tiny_model import unet_config

        channels = config.get("unet_channels")
        return _unet_shape(unet_config(self.cfg.latent_channels, self.cfg.vae_downsample,
                                       tuple(channels) if channels else None, config.get("unet_layers_per_block", 1)))

    def _seed_from_export(self, folder: Path) -> None:
        """Start from an exported pipeline (e.g. the bundled model) when the work dir was lost."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        info_path = folder / "training.json"
        if not info_path.is_file():
            raise FileNotFoundError(f"{folder} has no training.json; cannot continue training from it")
        info = json.loads(info_path.read_text())
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", use_safetensors=True)
        if vae.config.latent_channels != self.cfg.latent_channels:
            raise UserInputError(f"--init-from {folder} has {vae.config.latent_channels} latent channels but "
                                 f"--latent-channels is {self.cfg.latent_channels}; they must match")
        down = 2 ** (len(vae.config.block_out_channels) - 1)
        if down != self.cfg.vae_downsample:
            raise UserInputError(f"--init-from {folder} has a VAE downsampling by {down} but --vae-downsample is "
                                 f"{self.cfg.vae_downsample}; they must match")
        save_tensors_atomic(vae.state_dict(), self.workdir / "vae.safetensors")
        theirs = _unet_shape(UNet2DConditionModel.load_config(folder, subfolder="unet"))
        if info["unet_step"] > 0 and theirs != _unet_shape(self.components["unet"].config):
            # another UNet: it trains from step 0 on this VAE
            print(f"{folder} has a UNet of widths {theirs[0]} and {theirs[1]} layer(s) per block; taking its VAE "
                  "only, the UNet and text encoder train from step 0", file=sys.stderr)
            info = {**info, "unet_step": 0, "unet_runs": None}
        if info["unet_step"] > 0:  # a VAE-only export (--unet-steps 0) carries an untrained UNet: not seeded
            unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", use_safetensors=True)
            text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", use_safetensors=True)
            weights = {f"unet.{k}": v for k, v in unet.state_dict().items()}
            weights.update({f"text.{k}": v for k, v in text.state_dict().items()})
            save_tensors_atomic(weights, self.workdir / "unet.safetensors")
            save_tensors_atomic(weights, self.workdir / "ema.safetensors")
        # the UNet runs so far, each [first step, planned last step]; an export without it had one run
        runs = info.get("unet_runs") or [[0, None]]
        if info["unet_step"] > 0:
            runs = [*runs, [info["unet_step"], self.cfg.unet_steps]]
        self.state.update({"vae_step": info["vae_step"], "decoder_step": info.get("decoder_step", 0),
                           "unet_step": info["unet_step"], "unet_runs": runs,
                           "scaling_factor": info["scaling_factor"], "wall_seconds": info.get("wall_seconds", 0.0),
                           "seeded_from": str(folder), "warm_start": info["unet_step"],
                           "seed_wall_seconds": info.get("wall_seconds", 0.0)})
        if info.get("vae_data") is not None:
            self.state["vae_data"] = info["vae_data"]
        self._wall0 = self.state["wall_seconds"]
        self._save_state()

    # -- bookkeeping ---------------------------------------------------------------------------
    def _elapsed(self) -> float:
        return self._wall0 + time.time() - self._t0

    def _save_state(self) -> None:
        self.state["wall_seconds"] = self._elapsed()
        self.state["config"] = asdict(self.cfg)
        write_json_atomic(self.state_path, self.state)

    def _should_stop(self) -> bool:
        if self._stop_requested:
            return True
        if self.cfg.max_minutes is not None and time.time() - self._t0 > 60 * self.cfg.max_minutes:
            return True
        return False

    def _run_stage(self, desc: str, step: int, total: int, seed_stride: int,
                   train_step: Callable[[torch.Generator], dict[str, str]], checkpoint: Callable[[int], None],
                   after: Callable[[int, bool], None] | None = None) -> None:
        """Steps ``step+1 .. total`` of one stage, each with its own seeded generator.

        ``train_step`` returns the progress-bar fields; ``checkpoint(step)`` runs every
        ``checkpoint_every`` steps, at the last step and on a stop request, which then raises
        :class:`_Stop`; ``after(step, stopping)`` runs after every step.
        """
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=step, desc=desc, disable=not self.progress)
        try:
            while step < total:
                postfix = train_step(torch.Generator().manual_seed(self.cfg.seed * seed_stride + step))
                step += 1
                bar.update()
                bar.set_postfix(**postfix)
                stop = self._should_stop()
                if step % self.cfg.checkpoint_every == 0 or step == total or stop:
                    checkpoint(step)
                if after is not None:
                    after(step, stop)
                if stop:
                    raise _Stop
        finally:
            bar.close()

    def _record(self, stage: str, key: str, step: int, *values: float) -> None:
        """Save the stage's step and a loss record to ``progress.json``."""
        self.state[key] = step
        self.state["losses"].setdefault(stage, []).append([step, *values])
        self._save_state()

    # -- stage 1: VAE --------------------------------------------------------------------------
    def train_vae(self, images: np.ndarray, generic: np.ndarray | None = None) -> None:
        """L1 + L2 + KL; with ``generic`` images, each batch item is one of them with probability
        ``vae_generic_fraction``."""
        cfg, vae = self.cfg, self.components["vae"]
        opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
        ck, opt_path = self.workdir / "vae.safetensors", self.workdir / "vae_opt.safetensors"
        if ck.exists():
            vae.load_state_dict(load_tensors(ck))
            if opt_path.exists():
                optimizer_from_tensors(opt, *load_tensors_with_metadata(opt_path))
        if self.state["vae_step"] >= cfg.vae_steps:
            return
        self.state["scaling_factor"] = None  # the encoder moves: latents and their scale are recomputed
        # the VAE's data, kept with its steps: a later --init-from or UNet-only run has its own config
        self.state["vae_data"] = {"generic_fraction": cfg.vae_generic_fraction,
                                  "generic_images": cfg.vae_generic_images if cfg.vae_generic_fraction > 0 else 0}
        vae.train()
        last: dict[str, float] = {}

        def train_step(g: torch.Generator) -> dict[str, str]:
            idx = torch.randint(0, len(images), (cfg.batch_size,), generator=g)
            batch = images[idx.numpy()]
            if generic is not None and cfg.vae_generic_fraction > 0:
                use = (torch.rand(cfg.batch_size, generator=g) < cfg.vae_generic_fraction).numpy()
                gidx = torch.randint(0, len(generic), (cfg.batch_size,), generator=g).numpy()
                batch = np.where(use[:, None, None, None], generic[gidx], batch)
            x = to_tensor(np.ascontiguousarray(batch)).to(self.device)
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample(generator=g)).sample
            loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + cfg.kl_weight * post.kl().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            last["loss"] = loss.item()
            return {"loss": f"{last['loss']:.4f}"}

        def checkpoint(step: int) -> None:
            save_tensors_atomic(vae.state_dict(), ck)
            _save_optimizer(opt, opt_path)
            self._record("vae", "vae_step", step, round(last["loss"], 5))

        self._run_stage("train VAE", self.state["vae_step"], cfg.vae_steps, 1_000_003, train_step, checkpoint)

    @torch.no_grad()
    def encode_latents(self, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and std of every UNet training image, cached in the work dir. The scaling
        factor is set once per VAE (reset when the encoder moves): a UNet trained at a scale keeps it
        when its data grows, or when it was seeded from an export."""
        path = self.workdir / "latents.safetensors"
        if path.exists() and self.state.get("scaling_factor"):
            t = load_tensors(path)
            if len(t["mean"]) == len(images):
                return t["mean"], t["std"]
        vae = self.components["vae"]
        vae.load_state_dict(load_tensors(self.workdir / "vae.safetensors"))
        vae.eval()
        means, stds = [], []
        for i in range(0, len(images), 256):
            post = vae.encode(to_tensor(images[i : i + 256]).to(self.device)).latent_dist
            means.append(post.mean.cpu())  # batches are drawn on the CPU (draw_latents)
            stds.append(post.std.cpu())
        mean, std = torch.cat(means), torch.cat(stds)
        if not self.state.get("scaling_factor"):
            self.state["scaling_factor"] = float(1.0 / mean.std())
        save_tensors_atomic({"mean": mean, "std": std}, path)
        self._save_state()
        return mean, std

    # -- stage 2: adversarial decoder fine-tuning ----------------------------------------------
    def train_decoder(self, images: np.ndarray, lat_mean: torch.Tensor, lat_std: torch.Tensor) -> None:
        """Fine-tune the VAE decoder with L1 + L2 + an adaptively weighted hinge GAN loss (as in
        VQGAN / the SD autoencoders). Only the decoder moves, so the latents do not change."""
        from conceptstream.world.tiny_model import build_patch_discriminator

        cfg, vae = self.cfg, self.components["vae"]
        step = self.state.get("decoder_step", 0)
        if step >= cfg.decoder_steps:
            return
        vae.load_state_dict(load_tensors(self.workdir / "vae.safetensors"))
        vae.requires_grad_(False)
        trained = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
        for p in trained:
            p.requires_grad_(True)
        disc = build_patch_discriminator().to(self.device)
        opt_g = torch.optim.AdamW(trained, lr=cfg.decoder_lr, betas=(0.5, 0.9), weight_decay=0.0)
        opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.9), weight_decay=0.0)
        files = {name: self.workdir / f"{name}.safetensors" for name in ("disc", "decoder_opt", "disc_opt")}
        if files["disc"].exists():
            disc.load_state_dict(load_tensors(files["disc"]))
            optimizer_from_tensors(opt_g, *load_tensors_with_metadata(files["decoder_opt"]))
            optimizer_from_tensors(opt_d, *load_tensors_with_metadata(files["disc_opt"]))
        last_layer = vae.decoder.conv_out.weight
        vae.train()
        last: dict[str, float] = {}

        def train_step(g: torch.Generator) -> dict[str, str]:
            idx, z = draw_latents(lat_mean, lat_std, cfg.decoder_batch_size, g)
            x = to_tensor(images[idx.numpy()]).to(self.device)
            rec = vae.decode(z.to(self.device)).sample
            rec_loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
            gan_loss = -disc(rec).mean()
            # adaptive weight: balance the two gradients at the decoder's last layer
            g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
            g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
            weight = (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, 1e4).detach() * cfg.disc_weight
            loss = rec_loss + weight * gan_loss
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            opt_g.step()
            d_loss = F.relu(1.0 - disc(x)).mean() + F.relu(1.0 + disc(rec.detach())).mean()
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            running = last.get("running")
            last["running"] = rec_loss.item() if running is None else 0.98 * running + 0.02 * rec_loss.item()
            last["d_loss"] = d_loss.item()
            return {"rec": f"{last['running']:.4f}", "d": f"{last['d_loss']:.3f}"}

        def checkpoint(step: int) -> None:
            save_tensors_atomic(vae.state_dict(), self.workdir / "vae.safetensors")
            save_tensors_atomic(disc.state_dict(), files["disc"])
            _save_optimizer(opt_g, files["decoder_opt"])
            _save_optimizer(opt_d, files["disc_opt"])
            self._record("decoder", "decoder_step", step, round(last["running"], 5), round(last["d_loss"], 4))

        self._run_stage("sharpen decoder", step, cfg.decoder_steps, 3_000_017, train_step, checkpoint)
        vae.requires_grad_(True)

    # -- stage 3: UNet + text encoder ----------------------------------------------------------
    def train_unet(self, captions: list[str], lat_mean: torch.Tensor, lat_std: torch.Tensor) -> None:
        from diffusers.training_utils import EMAModel, compute_snr

        cfg = self.cfg
        unet, text = self.components["unet"], self.components["text_encoder"]
        tok, sched = self.components["tokenizer"], self.components["scheduler"]
        scale = self.state["scaling_factor"]
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        empty = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        params = list(unet.parameters()) + list(text.parameters())
        names = [f"unet.{k}" for k, _ in unet.named_parameters()] + [f"text.{k}" for k, _ in text.named_parameters()]
        opt = torch.optim.AdamW([
            {"params": list(unet.parameters()), "lr": cfg.unet_lr},
            {"params": list(text.parameters()), "lr": cfg.text_lr},
        ], weight_decay=1e-2)
        ck, ema_path = self.workdir / "unet.safetensors", self.workdir / "ema.safetensors"
        if ck.exists():
            saved = load_tensors(ck)
            unet.load_state_dict({k[5:]: v for k, v in saved.items() if k.startswith("unet.")})
            text.load_state_dict({k[5:]: v for k, v in saved.items() if k.startswith("text.")}, strict=False)
        ema = EMAModel(params, decay=cfg.ema_decay, min_decay=0.0, update_after_step=0, use_ema_warmup=False)
        if ck.exists():
            saved_ema = load_tensors(ema_path)
            with torch.no_grad():
                for name, shadow in zip(names, ema.shadow_params):
                    if name in saved_ema:
                        shadow.copy_(saved_ema[name])
            opt_path = self.workdir / "unet_opt.safetensors"
            if opt_path.exists():  # absent when seeded from an export: fresh optimizer, warm-up again
                optimizer_from_tensors(opt, *load_tensors_with_metadata(opt_path))
        alphas = sched.alphas_cumprod.float()
        start = self.state["unet_step"]
        precision = self.state.setdefault("precision", [[0, "no"]] if start else [])
        if not precision or precision[-1][1] != cfg.mixed_precision:
            precision.append([start, cfg.mixed_precision])  # [first UNet step, precision] of each change
        from conceptstream.distributed import make_accelerator

        accelerator = make_accelerator(cfg.mixed_precision, self.device)  # its autocast wraps the forward pass
        # EMAModel's n-th update uses decay min(ema_decay, m / (9 + m)) with m = n - 1; counting from
        # start + 1 makes it min(ema_decay, (1 + k) / (10 + k)) after global step k on every resume.
        ema.optimization_step = start + 1
        for group, base in zip(opt.param_groups, (cfg.unet_lr, cfg.text_lr)):
            group["lr"] = group["initial_lr"] = base  # a loaded optimizer holds the last scheduled rate
        lr_schedule = unet_lr_schedule(opt, cfg, start, self.state.get("warm_start", 0))
        unet.train()
        text.train()
        last: dict[str, float] = {}

        def train_step(g: torch.Generator) -> dict[str, str]:
            idx, z = draw_latents(lat_mean, lat_std, cfg.batch_size, g)
            z = z * scale
            flip = torch.rand(cfg.batch_size, generator=g) < 0.5
            z = torch.where(flip[:, None, None, None], z.flip(-1), z)
            batch_ids = ids[idx].clone()
            drop = torch.rand(cfg.batch_size, generator=g) < cfg.caption_dropout
            batch_ids[drop] = empty[0]
            t = torch.randint(0, sched.config.num_train_timesteps, (cfg.batch_size,), generator=g)
            noise = draw_noise(z.shape, g, cfg.noise_offset)
            a = alphas[t].view(-1, 1, 1, 1)
            dev = self.device
            z, noise, a, t, batch_ids = z.to(dev), noise.to(dev), a.to(dev), t.to(dev), batch_ids.to(dev)
            zt = a.sqrt() * z + (1 - a).sqrt() * noise
            with accelerator.autocast():
                pred = unet(zt, t, text(batch_ids)[0]).sample.float()
            snr = compute_snr(sched, t)
            weight = torch.clamp(snr, max=cfg.min_snr_gamma) / snr
            loss = (weight * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            lr_schedule.step()
            ema.step(params)
            running = last.get("running")
            last["running"] = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            return {"loss": f"{last['running']:.4f}"}

        def checkpoint(step: int) -> None:
            weights = {f"unet.{k}": v for k, v in unet.state_dict().items()}
            weights.update({f"text.{k}": v for k, v in text.state_dict().items()})
            save_tensors_atomic(weights, ck)
            save_tensors_atomic({**weights, **dict(zip(names, ema.shadow_params))}, ema_path)
            _save_optimizer(opt, self.workdir / "unet_opt.safetensors")
            self._record("unet", "unet_step", step, round(last["running"], 5))

        def export_now(step: int, stopping: bool) -> None:
            if step % cfg.export_every == 0 or step == cfg.unet_steps or stopping:
                self.export()

        self._run_stage("train UNet+text", start, cfg.unet_steps, 2_000_003, train_step, checkpoint, export_now)

    # -- export --------------------------------------------------------------------------------
    def export(self) -> Path:
        """Write the EMA weights as a stock StableDiffusionPipeline folder (atomic swap)."""
        import shutil

        from diffusers import StableDiffusionPipeline

        c = self.components
        vae = c["vae"]
        vae.load_state_dict(load_tensors(self.workdir / "vae.safetensors"))
        vae.register_to_config(scaling_factor=self.state["scaling_factor"])
        from conceptstream.world.tiny_model import build_components

        fresh = build_components(self.cfg.seed, self.cfg.latent_channels, self.cfg.vae_downsample,
                                 self.cfg.unet_channels, self.cfg.unet_layers_per_block)
        unet, text = fresh["unet"], fresh["text_encoder"]
        ema_path = self.workdir / "ema.safetensors"
        if ema_path.exists():  # absent after a VAE-only run (--unet-steps 0): the UNet is the initial one
            ema = load_tensors(ema_path)
            unet.load_state_dict({k[5:]: v for k, v in ema.items() if k.startswith("unet.")})
            text.load_state_dict({k[5:]: v for k, v in ema.items() if k.startswith("text.")}, strict=False)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=c["tokenizer"], unet=unet,
                                       scheduler=c["scheduler"], safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        out = Path(self.cfg.out)
        tmp = out.with_name(out.name + ".tmp-export")
        if tmp.exists():
            shutil.rmtree(tmp)
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_text_atomic(tmp / "README.md", self.model_card())
        write_json_atomic(tmp / "training.json", {**{k: self.state.get(k) for k in
                                                     ("vae_step", "decoder_step", "unet_step", "scaling_factor",
                                                      "wall_seconds", "vae_data")}, "unet_runs": self.unet_runs()})
        old = out.with_name(out.name + ".old")
        if out.exists():
            if old.exists():
                shutil.rmtree(old)
            out.rename(old)
        tmp.rename(out)
        if old.exists():
            shutil.rmtree(old)
        return out

    def unet_runs(self) -> list[list[int | None]]:
        """``[first step, planned last step]`` of every UNet run since step 0: one run, or one per
        ``--init-from`` restart (each with a fresh optimizer and its own schedule and warm-up)."""
        runs = [list(r) for r in self.state.get("unet_runs") or [[0, None]]]
        if "unet_runs" not in self.state and self.state.get("warm_start"):  # seeded before runs were recorded
            runs = [[0, None], [self.state["warm_start"], None]]
        runs[-1][1] = self.cfg.unet_steps
        return runs

    def model_card(self) -> str:
        return base_model_card({**self.state, "unet_runs": self.unet_runs()}, self.cfg, self.workdir)

    # -- driver --------------------------------------------------------------------------------
    def run(self) -> Path | None:
        """Run or resume all stages; returns the exported folder, or None if stopped early."""
        previous = signal.getsignal(signal.SIGTERM)

        def _request_stop(signum, frame):
            self._stop_requested = True

        signal.signal(signal.SIGTERM, _request_stop)
        try:
            images, captions = render_dataset(self.workdir, self.cfg.images_per_class, self.cfg.seed, self.progress,
                                              self.cfg.render_workers)
            if self._stop_requested:  # a SIGTERM while rendering: stop before the first step
                raise _Stop
            generic = None
            if self.cfg.vae_generic_fraction > 0 and self.state["vae_step"] < self.cfg.vae_steps:
                from conceptstream.world.base_data import generic_dataset

                generic = generic_dataset(self.workdir, self.cfg.vae_generic_images, self.cfg.seed, self.progress,
                                          self.cfg.render_workers)
            self.train_vae(images, generic)
            if self.cfg.unet_pattern_images > 0:
                from conceptstream.world.base_data import pattern_dataset

                patterned, pattern_captions = pattern_dataset(self.workdir, self.cfg.unet_pattern_images, self.cfg.seed,
                                                              self.progress, self.cfg.render_workers)
                images, captions = np.concatenate([images, patterned]), captions + pattern_captions
            mean, std = self.encode_latents(images)
            self.train_decoder(images, mean, std)
            self.train_unet(captions, mean, std)
            return self.export()
        except _Stop:
            return None
        finally:
            self._save_state()
            signal.signal(signal.SIGTERM, previous)
