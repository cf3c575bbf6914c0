"""Train the bundled tiny base model on tabletop renders: VAE first, then UNet + text encoder.

One reproducible, resumable command (``conceptstream world train-base``). All state lives in a
work directory; every ``checkpoint_every`` steps the weights, EMA weights, optimizer state and
progress are written atomically (safetensors + JSON), so a killed run resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import platform
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from conceptstream.errors import UserInputError
from conceptstream.safeio import (
    load_tensors,
    load_tensors_with_metadata,
    optimizer_from_tensors,
    optimizer_to_tensors,
    save_tensors_atomic,
    write_json_atomic,
    write_text_atomic,
)
from conceptstream.world.catalogue import BASE_CLASSES


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
    kl_weight: float = 1e-6
    latent_channels: int = 4  # the bundled model's; 8 is the planned fix for the VAE ceiling (README)
    # Stage 2: sharpen the decoder with a patch discriminator, encoder frozen, so latents (and the
    # UNet trained on them) stay valid. L1/L2 alone leave textures and patterns blurred.
    decoder_steps: int = 0  # off: on the bundled model it lowered the VAE round-trip score (README)
    decoder_batch_size: int = 16
    decoder_lr: float = 1e-4
    disc_lr: float = 2e-4
    disc_weight: float = 0.5
    ema_decay: float = 0.9995
    min_snr_gamma: float = 5.0
    caption_dropout: float = 0.1
    checkpoint_every: int = 250
    export_every: int = 2000
    seed: int = 0
    max_minutes: float | None = None
    # Seed an empty work directory from an exported model folder (its training.json + weights):
    # training continues from the exported EMA weights with a fresh optimizer.
    init_from: str | None = None
    extra: dict = field(default_factory=dict)


class _Stop(Exception):
    pass


def render_dataset(workdir: Path, images_per_class: int, seed: int, progress: bool = True):
    """Render (or load the cached) base-class training set: uint8 images and captions."""
    from tqdm.auto import tqdm

    from conceptstream.world.render import TabletopRenderer

    img_path, cap_path = workdir / "data" / "images.npy", workdir / "data" / "captions.json"
    if img_path.exists() and cap_path.exists():
        images = np.load(img_path, allow_pickle=False)
        captions = json.loads(cap_path.read_text())
        if len(captions) == images.shape[0] == images_per_class * len(BASE_CLASSES):
            return images, captions
    renderer = TabletopRenderer(64)
    images, captions = [], []
    total = images_per_class * len(BASE_CLASSES)
    with tqdm(total=total, desc="render base classes", disable=not progress) as bar:
        for cls in BASE_CLASSES:
            for i in range(images_per_class):
                r = renderer.render_class(cls, i, seed)
                images.append(np.asarray(r.image))
                captions.append(r.caption)
                bar.update()
    renderer.close()
    arr = np.stack(images)
    img_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = img_path.with_suffix(".tmp.npy")
    np.save(tmp, arr, allow_pickle=False)
    tmp.replace(img_path)
    write_json_atomic(cap_path, captions)
    return arr, captions


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _draw_latents(lat_mean: torch.Tensor, lat_std: torch.Tensor, n: int, g: torch.Generator):
    """A seeded batch: random dataset indices and one posterior sample of each image's latent."""
    idx = torch.randint(0, len(lat_mean), (n,), generator=g)
    return idx, lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=g)


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
        self.components = build_components(cfg.seed, cfg.latent_channels)
        self.state_path = self.workdir / "progress.json"
        self.state = {"vae_step": 0, "decoder_step": 0, "unet_step": 0, "wall_seconds": 0.0, "scaling_factor": None,
                      "config": asdict(cfg), "losses": {}}
        if self.state_path.exists():
            saved = json.loads(self.state_path.read_text())
            had = saved.get("config", {}).get("latent_channels", 4)
            if had != cfg.latent_channels:
                raise UserInputError(f"{self.workdir} was trained with --latent-channels {had}, not "
                                     f"{cfg.latent_channels}; resume with {had} or use a new --workdir")
            self.state.update({k: v for k, v in saved.items() if k != "config"})
        self._t0 = time.time()
        self._wall0 = self.state["wall_seconds"]
        if not self.state_path.exists() and cfg.init_from:
            self._seed_from_export(Path(cfg.init_from))
            self._wall0 = self.state["wall_seconds"]
        self._stop_requested = False

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
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", use_safetensors=True)
        text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", use_safetensors=True)
        save_tensors_atomic(vae.state_dict(), self.workdir / "vae.safetensors")
        weights = {f"unet.{k}": v for k, v in unet.state_dict().items()}
        weights.update({f"text.{k}": v for k, v in text.state_dict().items()})
        save_tensors_atomic(weights, self.workdir / "unet.safetensors")
        save_tensors_atomic(weights, self.workdir / "ema.safetensors")
        self.state.update({"vae_step": info["vae_step"], "decoder_step": info.get("decoder_step", 0),
                           "unet_step": info["unet_step"],
                           "scaling_factor": info["scaling_factor"], "wall_seconds": info.get("wall_seconds", 0.0),
                           "seeded_from": str(folder), "warm_start": info["unet_step"]})
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

    # -- stage 1: VAE --------------------------------------------------------------------------
    def train_vae(self, images: np.ndarray) -> None:
        from tqdm.auto import tqdm

        cfg, vae = self.cfg, self.components["vae"]
        opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
        ck = self.workdir / "vae.safetensors"
        if ck.exists():
            vae.load_state_dict(load_tensors(ck))
            if (self.workdir / "vae_opt.safetensors").exists():
                optimizer_from_tensors(opt, *load_tensors_with_metadata(self.workdir / "vae_opt.safetensors"))
        step = self.state["vae_step"]
        if step >= cfg.vae_steps:
            return
        vae.train()
        bar = tqdm(total=cfg.vae_steps, initial=step, desc="train VAE", disable=not self.progress)
        while step < cfg.vae_steps:
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            idx = torch.randint(0, len(images), (cfg.batch_size,), generator=g)
            x = _to_tensor(images[idx.numpy()])
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample(generator=g)).sample
            loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + cfg.kl_weight * post.kl().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if step % cfg.checkpoint_every == 0 or step == cfg.vae_steps or self._should_stop():
                save_tensors_atomic(vae.state_dict(), ck)
                _save_optimizer(opt, self.workdir / "vae_opt.safetensors")
                self.state["vae_step"] = step
                self.state["losses"].setdefault("vae", []).append([step, round(loss.item(), 5)])
                self._save_state()
                if self._should_stop():
                    bar.close()
                    raise _Stop
        bar.close()

    @torch.no_grad()
    def encode_latents(self, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.workdir / "latents.safetensors"
        if path.exists() and self.state.get("scaling_factor"):
            t = load_tensors(path)
            return t["mean"], t["std"]
        vae = self.components["vae"]
        vae.load_state_dict(load_tensors(self.workdir / "vae.safetensors"))
        vae.eval()
        means, stds = [], []
        for i in range(0, len(images), 256):
            post = vae.encode(_to_tensor(images[i : i + 256])).latent_dist
            means.append(post.mean)
            stds.append(post.std)
        mean, std = torch.cat(means), torch.cat(stds)
        self.state["scaling_factor"] = float(1.0 / mean.std())
        save_tensors_atomic({"mean": mean, "std": std}, path)
        self._save_state()
        return mean, std

    # -- stage 2: adversarial decoder fine-tuning ----------------------------------------------
    def train_decoder(self, images: np.ndarray, lat_mean: torch.Tensor, lat_std: torch.Tensor) -> None:
        """Fine-tune the VAE decoder with L1 + L2 + an adaptively weighted hinge GAN loss (as in
        VQGAN / the SD autoencoders). Only the decoder moves, so the latents do not change."""
        from tqdm.auto import tqdm

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
        disc = build_patch_discriminator()
        opt_g = torch.optim.AdamW(trained, lr=cfg.decoder_lr, betas=(0.5, 0.9), weight_decay=0.0)
        opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.9), weight_decay=0.0)
        files = {name: self.workdir / f"{name}.safetensors" for name in ("disc", "decoder_opt", "disc_opt")}
        if files["disc"].exists():
            disc.load_state_dict(load_tensors(files["disc"]))
            optimizer_from_tensors(opt_g, *load_tensors_with_metadata(files["decoder_opt"]))
            optimizer_from_tensors(opt_d, *load_tensors_with_metadata(files["disc_opt"]))
        last_layer = vae.decoder.conv_out.weight
        vae.train()
        bar = tqdm(total=cfg.decoder_steps, initial=step, desc="sharpen decoder", disable=not self.progress)
        running = None
        while step < cfg.decoder_steps:
            g = torch.Generator().manual_seed(cfg.seed * 3_000_017 + step)
            idx, z = _draw_latents(lat_mean, lat_std, cfg.decoder_batch_size, g)
            x = _to_tensor(images[idx.numpy()])
            rec = vae.decode(z).sample
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
            step += 1
            running = rec_loss.item() if running is None else 0.98 * running + 0.02 * rec_loss.item()
            bar.update()
            bar.set_postfix(rec=f"{running:.4f}", d=f"{d_loss.item():.3f}")
            stop = self._should_stop()
            if step % cfg.checkpoint_every == 0 or step == cfg.decoder_steps or stop:
                save_tensors_atomic(vae.state_dict(), self.workdir / "vae.safetensors")
                save_tensors_atomic(disc.state_dict(), files["disc"])
                _save_optimizer(opt_g, files["decoder_opt"])
                _save_optimizer(opt_d, files["disc_opt"])
                self.state["decoder_step"] = step
                self.state["losses"].setdefault("decoder", []).append([step, round(running, 5), round(d_loss.item(), 4)])
                self._save_state()
            if stop:
                bar.close()
                raise _Stop
        bar.close()
        vae.requires_grad_(True)

    # -- stage 3: UNet + text encoder ----------------------------------------------------------
    def train_unet(self, captions: list[str], lat_mean: torch.Tensor, lat_std: torch.Tensor) -> None:
        from tqdm.auto import tqdm

        cfg = self.cfg
        unet, text = self.components["unet"], self.components["text_encoder"]
        tok, sched = self.components["tokenizer"], self.components["scheduler"]
        scale = self.state["scaling_factor"]
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        empty = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        opt = torch.optim.AdamW([
            {"params": list(unet.parameters()), "lr": cfg.unet_lr},
            {"params": list(text.parameters()), "lr": cfg.text_lr},
        ], weight_decay=1e-2)
        ema_unet = {k: v.detach().clone() for k, v in unet.state_dict().items()}
        ema_text = {k: v.detach().clone() for k, v in text.state_dict().items()}
        ck = self.workdir / "unet.safetensors"
        if ck.exists():
            saved = load_tensors(ck)
            unet.load_state_dict({k[5:]: v for k, v in saved.items() if k.startswith("unet.")})
            text.load_state_dict({k[5:]: v for k, v in saved.items() if k.startswith("text.")}, strict=False)
            ema = load_tensors(self.workdir / "ema.safetensors")
            ema_unet = {k[5:]: v for k, v in ema.items() if k.startswith("unet.")}
            ema_text.update({k[5:]: v for k, v in ema.items() if k.startswith("text.")})
            opt_path = self.workdir / "unet_opt.safetensors"
            if opt_path.exists():  # absent when seeded from an export: fresh optimizer, warm-up again
                optimizer_from_tensors(opt, *load_tensors_with_metadata(opt_path))
        alphas = sched.alphas_cumprod.float()
        snr = alphas / (1 - alphas)
        step = self.state["unet_step"]
        unet.train()
        text.train()
        bar = tqdm(total=cfg.unet_steps, initial=step, desc="train UNet+text", disable=not self.progress)
        running = None
        while step < cfg.unet_steps:
            g = torch.Generator().manual_seed(cfg.seed * 2_000_003 + step)
            idx, z = _draw_latents(lat_mean, lat_std, cfg.batch_size, g)
            z = z * scale
            flip = torch.rand(cfg.batch_size, generator=g) < 0.5
            z = torch.where(flip[:, None, None, None], z.flip(-1), z)
            batch_ids = ids[idx].clone()
            drop = torch.rand(cfg.batch_size, generator=g) < cfg.caption_dropout
            batch_ids[drop] = empty[0]
            t = torch.randint(0, sched.config.num_train_timesteps, (cfg.batch_size,), generator=g)
            noise = torch.randn(z.shape, generator=g)
            a = alphas[t].view(-1, 1, 1, 1)
            zt = a.sqrt() * z + (1 - a).sqrt() * noise
            warm = min(1.0, (step - self.state.get("warm_start", 0) + 1) / 500)
            for group, base in zip(opt.param_groups, (cfg.unet_lr, cfg.text_lr)):
                # warm-up, then cosine decay to 10% over the planned steps
                group["lr"] = base * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.unet_steps)))
            pred = unet(zt, t, text(batch_ids)[0]).sample
            weight = torch.clamp(snr[t], max=cfg.min_snr_gamma) / snr[t]
            loss = (weight * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(text.parameters()), 1.0)
            opt.step()
            step += 1
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for k, v in unet.state_dict().items():
                    ema_unet[k].lerp_(v, 1 - decay) if v.is_floating_point() else ema_unet[k].copy_(v)
                for k, v in text.state_dict().items():
                    ema_text[k].lerp_(v, 1 - decay) if v.is_floating_point() else ema_text[k].copy_(v)
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            bar.update()
            bar.set_postfix(loss=f"{running:.4f}")
            stop = self._should_stop()
            if step % cfg.checkpoint_every == 0 or step == cfg.unet_steps or stop:
                weights = {f"unet.{k}": v for k, v in unet.state_dict().items()}
                weights.update({f"text.{k}": v for k, v in text.state_dict().items()})
                save_tensors_atomic(weights, ck)
                ema = {f"unet.{k}": v for k, v in ema_unet.items()}
                ema.update({f"text.{k}": v for k, v in ema_text.items()})
                save_tensors_atomic(ema, self.workdir / "ema.safetensors")
                _save_optimizer(opt, self.workdir / "unet_opt.safetensors")
                self.state["unet_step"] = step
                self.state["losses"].setdefault("unet", []).append([step, round(running, 5)])
                self._save_state()
            if step % cfg.export_every == 0 or step == cfg.unet_steps or stop:
                self.export()
            if stop:
                bar.close()
                raise _Stop
        bar.close()

    # -- export --------------------------------------------------------------------------------
    def export(self) -> Path:
        """Write the EMA weights as a stock StableDiffusionPipeline folder (atomic swap)."""
        import shutil

        from diffusers import StableDiffusionPipeline

        c = self.components
        vae = c["vae"]
        vae.load_state_dict(load_tensors(self.workdir / "vae.safetensors"))
        vae.register_to_config(scaling_factor=self.state["scaling_factor"])
        ema = load_tensors(self.workdir / "ema.safetensors")
        from conceptstream.world.tiny_model import build_components

        fresh = build_components(self.cfg.seed, self.cfg.latent_channels)
        unet, text = fresh["unet"], fresh["text_encoder"]
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
        write_json_atomic(tmp / "training.json", {k: self.state.get(k) for k in
                                                  ("vae_step", "decoder_step", "unet_step", "scaling_factor", "wall_seconds")})
        old = out.with_name(out.name + ".old")
        if out.exists():
            if old.exists():
                shutil.rmtree(old)
            out.rename(old)
        tmp.rename(out)
        if old.exists():
            shutil.rmtree(old)
        return out

    def model_card(self) -> str:
        import diffusers
        import transformers

        s, cfg = self.state, self.cfg
        classes = ", ".join(c.noun for c in BASE_CLASSES)
        qpath = self.workdir / "quality.json"
        qtext = "not measured yet (run `python benchmarks/base_model_quality.py --workdir WORKDIR`)."
        if qpath.exists():
            q = json.loads(qpath.read_text())
            rows = "\n".join(f"| {n} | {v['centroid_accuracy']:.2f} | {v['KID_x1e3']:.1f} |" for n, v in q["per_class"].items())
            qtext = (f"Measured at UNet step {q.get('unet_step', '?')} by `{q['command'].strip()}` "
                     f"({q['settings']['per_class']} samples per class, {q['settings']['steps']} DDIM steps, guidance "
                     f"{q['settings']['guidance']}; EfficientNet-Lite0 features vs {q['settings']['real_per_class']} "
                     f"held-out real renders per class).\n\nNearest real-class-centroid accuracy: "
                     f"**{q['centroid_accuracy']:.3f}** (target 0.8; held-out real renders score "
                     f"{q.get('real_renders_centroid_accuracy', float('nan')):.3f} with the same centroids, and "
                     f"{q.get('vae_reconstruction_centroid_accuracy', float('nan')):.3f} after a round trip through "
                     f"this VAE).\n\n"
                     f"| class | centroid accuracy | KID x1e3 |\n"
                     f"|---|---|---|\n{rows}\n")
        decoder = ""
        if s.get("decoder_step"):
            decoder = (f" Then the decoder alone (encoder frozen) for {s['decoder_step']} of {cfg.decoder_steps} steps, "
                       f"batch {cfg.decoder_batch_size}, L1 + L2 + a patch-discriminator hinge loss with VQGAN's "
                       f"adaptive weight x {cfg.disc_weight}.")
        return f"""# conceptstream tiny-sd (bundled base model)

A Stable-Diffusion-format text-to-image model small enough to train and run on a 2-core CPU.
It loads with stock `diffusers.StableDiffusionPipeline.from_pretrained(path)`.

- Images: 64x64 RGB; VAE (AutoencoderKL, downsampling 4) to 4x16x16 latents, scaling factor
  {s.get('scaling_factor')}.
- UNet2DConditionModel: channels (64, 96, 96), cross-attention at 8x8 and 4x4 only.
- Text encoder: CLIPTextModel (2 layers, width 64) trained from scratch with the real CLIP
  tokenizer (49408 tokens).
- Scheduler: DDIM (scaled-linear betas 0.00085-0.012, 1000 steps, epsilon prediction).

## Training data
{cfg.images_per_class} renders per class of the tabletop world ({len(BASE_CLASSES)} classes: {classes}),
from `pybullet_data` meshes over scikit-image textures, captioned "a photo of a [colour] NOUN [on BACKGROUND]".
Personal-concept patterns (stripes, checks, dots, zigzag, halves) never appear in this data.

## Training
- VAE: {s.get('vae_step')} steps, batch {cfg.batch_size}, L1 + L2 + {cfg.kl_weight} KL.{decoder}
- UNet + text encoder: {s.get('unet_step')} of {cfg.unet_steps} planned steps, batch {cfg.batch_size},
  AdamW (lr {cfg.unet_lr} / {cfg.text_lr}), min-SNR-{cfg.min_snr_gamma} weighting, caption dropout
  {cfg.caption_dropout}, EMA {cfg.ema_decay} (the EMA weights are exported).
- Wall time so far: {s.get('wall_seconds', 0) / 3600:.2f} h on {platform.processor() or platform.machine()}
  ({torch.get_num_threads()} threads), torch {torch.__version__}, diffusers {diffusers.__version__},
  transformers {transformers.__version__}.
- Reproduce / resume: `conceptstream world train-base --workdir WORKDIR --out OUT`
  (config: `{json.dumps({k: v for k, v in asdict(cfg).items() if k not in ('workdir', 'out', 'extra')})}`).

## Quality
{qtext}
"""

    # -- driver --------------------------------------------------------------------------------
    def run(self) -> Path | None:
        """Run or resume all stages; returns the exported folder, or None if stopped early."""
        previous = signal.getsignal(signal.SIGTERM)

        def _request_stop(signum, frame):
            self._stop_requested = True

        signal.signal(signal.SIGTERM, _request_stop)
        try:
            images, captions = render_dataset(self.workdir, self.cfg.images_per_class, self.cfg.seed, self.progress)
            self.train_vae(images)
            mean, std = self.encode_latents(images)
            self.train_decoder(images, mean, std)
            self.train_unet(captions, mean, std)
            return self.export()
        except _Stop:
            return None
        finally:
            self._save_state()
            signal.signal(signal.SIGTERM, previous)
