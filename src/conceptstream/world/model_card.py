"""The README.md written beside the exported base model: architecture, data, training and quality."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from conceptstream.world.catalogue import BASE_CLASSES, PATTERNS


def _quality_text(workdir: Path) -> str:
    """The quality section, from ``quality.json`` written by ``benchmarks/base_model_quality.py``."""
    qpath = workdir / "quality.json"
    if not qpath.exists():
        return "not measured yet (run `python benchmarks/base_model_quality.py --workdir WORKDIR`)."
    q = json.loads(qpath.read_text())
    rows = "\n".join(f"| {n} | {v['centroid_accuracy']:.2f} | {v['KID_x1e3']:.1f} |" for n, v in q["per_class"].items())
    return (f"Measured at UNet step {q.get('unet_step', '?')} by `{q['command'].strip()}` "
            f"({q['settings']['per_class']} samples per class, {q['settings']['steps']} DDIM steps, guidance "
            f"{q['settings']['guidance']}; EfficientNet-Lite0 features vs {q['settings']['real_per_class']} "
            f"held-out real renders per class).\n\nNearest real-class-centroid accuracy: "
            f"**{q['centroid_accuracy']:.3f}** (target 0.8; held-out real renders score "
            f"{q.get('real_renders_centroid_accuracy', float('nan')):.3f} with the same centroids, and "
            f"{q.get('vae_reconstruction_centroid_accuracy', float('nan')):.3f} after a round trip through "
            f"this VAE).\n\n"
            f"| class | centroid accuracy | KID x1e3 |\n"
            f"|---|---|---|\n{rows}\n")


def goal_lines(codec: dict[str, Any] | None, alone: dict[str, Any] | None) -> str:
    """The card's lines for how much of a personal concept the model keeps: the VAE round trip of held-out
    concept views (``base_model_quality.py --codec-only``) and concepts learned alone (``concepts_alone.py``),
    each from the JSON those scripts write; empty when neither was measured."""
    lines = []
    if codec:
        proto = codec["protocol"]
        for key, row in codec["results"].items():
            if key.startswith("vae:"):
                lines.append(f"- VAE round trip of {proto['sequence']}'s held-out views ({proto['eval_views']} per "
                             f"concept), each assigned to the nearest of {proto['concepts']} concepts' EfficientNet-Lite0 "
                             f"centroids: **{row['acc_efficientnet_lite0']:.3f}** (target 0.8; the raw views score "
                             f"{codec['results']['raw']['acc_efficientnet_lite0']:.3f}; chance {proto['chance']:.2f}); "
                             f"`{codec['command']}`.")
    if alone:
        proto = alone["protocol"]
        for steps, row in alone["budgets"].items():
            lines.append(f"- Each {proto['learned']} concept learned alone (`{proto['method']}`, {steps} steps, learn seed "
                         f"{proto['learn_seed']}), {proto['images_per_concept']} generated images each, assigned to the "
                         f"nearest of {proto['candidates']}'s concepts: **{row['mean_accuracy']:.3f}** drawn as itself "
                         f"(target 0.5; chance {proto['chance']:.2f}; {row['learn_seconds_mean']} s per concept); "
                         f"`{alone['command']}`.")
    return "\n".join(lines)


def _goals_text(workdir: Path) -> str:
    docs = {name: json.loads((workdir / f"{name}.json").read_text()) if (workdir / f"{name}.json").is_file() else None
            for name in ("codec", "concepts-alone")}
    text = goal_lines(docs["codec"], docs["concepts-alone"])
    return f"\n\nHow much of a personal concept it keeps:\n\n{text}\n" if text else ""


def base_model_card(state: dict[str, Any], cfg, workdir: Path) -> str:
    """Markdown model card from the trainer's progress ``state`` and its ``BaseTrainingConfig``."""
    import diffusers
    import transformers

    s = state
    classes = ", ".join(c.noun for c in BASE_CLASSES)
    qtext = _quality_text(Path(workdir)) + _goals_text(Path(workdir))
    decoder = ""
    if s.get("decoder_step"):
        decoder = (f" Then the decoder alone (encoder frozen) for {s['decoder_step']} of {cfg.decoder_steps} steps, "
                   f"batch {cfg.decoder_batch_size}, L1 + L2 + a patch-discriminator hinge loss with VQGAN's "
                   f"adaptive weight x {cfg.disc_weight}.")
    from conceptstream.world.tiny_model import unet_config

    down = getattr(cfg, "vae_downsample", 4)
    latent = f"{cfg.latent_channels}x{64 // down}x{64 // down}"
    channels, layers = getattr(cfg, "unet_channels", None), getattr(cfg, "unet_layers_per_block", 1)
    unet = unet_config(cfg.latent_channels, down, tuple(channels) if channels else None, layers)
    blocks = ", ".join(f"{c} ({b.replace('2D', '')})" for c, b in zip(unet["block_out_channels"], unet["down_block_types"]))
    blocks += f", {layers} layers per block" if layers > 1 else ""
    runs = s.get("unet_runs") or [[0, cfg.unet_steps]]
    restarts = ""
    if len(runs) > 1:
        spans = "; ".join(f"{a}..{runs[i + 1][0] if i + 1 < len(runs) else s.get('unet_step')}"
                          f" (planned to {b if b is not None else 'an unrecorded length'})"
                          for i, (a, b) in enumerate(runs))
        restarts = (f"\n  Trained in {len(runs)} runs, steps {spans}: each later run started from the previous "
                    "run's export with a fresh optimizer and its own schedule and warm-up over its planned steps.")
    seed, seed_wall = s.get("seeded_from"), s.get("seed_wall_seconds")
    if seed and seed_wall is None and (Path(seed) / "training.json").is_file():  # seeded before this was recorded
        seed_wall = json.loads((Path(seed) / "training.json").read_text()).get("wall_seconds")
    wall_of_seed = f" (of which {seed_wall / 3600:.2f} h are `{seed}`'s)" if seed and seed_wall else ""
    if seed and not s.get("warm_start"):
        restarts += f"\n  Started from `{seed}`'s VAE; its UNet and text encoder were not used (trained here from step 0)."
    offset = getattr(cfg, "noise_offset", 0.0)
    if offset > 0:
        which = "the last run" if len(runs) > 1 else "every step"
        restarts += f"\n  Offset noise {offset} ({which}): one extra N(0, {offset}^2) noise value per sample and channel."
    precision = s.get("precision") or []
    if any(mode != "no" for _, mode in precision):
        spans = ", ".join(f"{'fp32' if mode == 'no' else mode} from step {a}" for a, mode in precision)
        restarts += (f"\n  UNet stage precision: {spans} (bf16: the forward under autocast; weights, optimizer, "
                     "EMA and loss in fp32).")
    machines = ", ".join(s.get("machines") or [platform.processor() or platform.machine()])
    generic = ""
    # the VAE's own data as recorded when it trained (a later run's config may differ); older progress: the config
    vae_data = s.get("vae_data") or {"generic_fraction": getattr(cfg, "vae_generic_fraction", 0.0),
                                     "generic_images": getattr(cfg, "vae_generic_images", 0)}
    if vae_data["generic_fraction"] > 0:
        generic = (f"\nThe VAE alone also saw {vae_data['generic_images']} generic images ({vae_data['generic_fraction']:.0%} of "
                   "each batch): random-colour procedural patterns, scikit-image photo and texture crops, and objects "
                   "painted with such patterns, never in a personal concept's (class, pattern, colour pair) look; "
                   "the UNet and text encoder never see them.")
    n_pat, kinds = getattr(cfg, "unet_pattern_images", 0), ", ".join(PATTERNS)
    patterns = f"Personal-concept patterns ({kinds}) never appear in this data."
    if n_pat > 0:
        patterns = (f"The UNet and text encoder also saw {n_pat} renders of base-class objects painted in the concept "
                    f"patterns ({kinds}) and two catalogue colours, captioned with both "
                    "(\"a photo of a red and white striped mug\"), never in a personal concept's (class, pattern, "
                    "colour pair): a concept is a new combination of attributes the model knows, plus its own shape.")
    return f"""# conceptstream tiny-sd (bundled base model)

A Stable-Diffusion-format text-to-image model small enough to train and run on a 2-core CPU.
It loads with stock `diffusers.StableDiffusionPipeline.from_pretrained(path)`.

- Images: 64x64 RGB; VAE (AutoencoderKL, downsampling {down}) to {latent} latents, scaling factor
  {s.get('scaling_factor')}.
- UNet2DConditionModel: down blocks {blocks}, at {64 // down} px latents.
- Text encoder: CLIPTextModel (2 layers, width 64) trained from scratch with the real CLIP
  tokenizer (49408 tokens).
- Scheduler: DDIM (scaled-linear betas 0.00085-0.012, 1000 steps, epsilon prediction).

## Training data
{cfg.images_per_class} renders per class of the tabletop world ({len(BASE_CLASSES)} classes: {classes}),
from `pybullet_data` meshes over scikit-image textures, captioned "a photo of a [colour] NOUN [on BACKGROUND]".
{patterns}{generic}

## Training
- VAE: {s.get('vae_step')} steps, batch {cfg.batch_size}, L1 + L2 + {cfg.kl_weight} KL.{decoder}
- UNet + text encoder: {s.get('unet_step')} of {cfg.unet_steps} planned steps, batch {cfg.batch_size},
  AdamW (lr {cfg.unet_lr} / {cfg.text_lr}, diffusers `{cfg.lr_scheduler}` schedule with {cfg.lr_warmup_steps} warm-up steps),
  min-SNR-{cfg.min_snr_gamma} weighting, caption dropout
  {cfg.caption_dropout}, EMA {cfg.ema_decay} (the EMA weights are exported).{restarts}
- Wall time so far: {s.get('wall_seconds', 0) / 3600:.2f} h{wall_of_seed} on {machines}
  (this stage {torch.get_num_threads()} CPU threads), torch {torch.__version__}, diffusers {diffusers.__version__},
  transformers {transformers.__version__}.
- Reproduce / resume: `conceptstream world train-base --workdir WORKDIR --out OUT`
  (config: `{json.dumps({k: v for k, v in asdict(cfg).items() if k not in ('workdir', 'out', 'extra')})}`).

## Quality
{qtext}
"""
