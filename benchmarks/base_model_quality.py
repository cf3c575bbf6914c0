"""Quality of a base model on the tabletop classes (the bundled model's acceptance benchmark).

For each base class: generate ``--per-class`` images from "a photo of a {noun}", embed them and
real held-out renders with EfficientNet-Lite0, and report
- nearest real-class-centroid accuracy of the generated images (target >= 0.8), and
- KID (x1e3, polynomial kernel) of generated vs real renders, per class.

    python benchmarks/base_model_quality.py [--model tiny|PATH] [--per-class 16] [--real 32]
        [--steps 30] [--guidance 5.0] [--out benchmarks/results/base-model-quality.json] [--grid PNG]

The sample grid goes to ``--grid``; without it, beside ``--out`` (``OUT-samples.png``), or for the
default ``--out`` to the committed ``benchmarks/results/base-model-samples.png``.

Also recorded: the colour cast (mean RGB of the generated images minus that of the real renders, per
class and overall), the colour spread and saturation of generated and real images (a one-palette,
washed-out model has a small spread and low saturation), the per-channel mean and std of the training
renders' scaled latents (and the std over images of each image's channel mean, its "DC"), and the
colour the decoder gives an all-zero latent. ``--start mean-leak`` starts sampling from
``sqrt(1 - a) * noise + sqrt(a) * mu`` instead of pure noise (``a``: the scheduler's alpha-bar at the
first sampling step, ``mu``: the per-channel latent mean of the training renders): the signal that
training's noised latents still carry at that step (a schedule whose terminal SNR is not zero; Lin et al.
2024, "Common Diffusion Noise Schedules and Sample Steps Are Flawed"), measured against the cast.
``--start marginal`` adds to that mean one draw per image and channel of the training images' DC,
``sqrt(a) * (mu + dc_std * n)``, constant over the latent: the first step's noised training latents
then have the DC statistics the UNet learned from (a diagnostic of the non-zero terminal SNR; stock
pipelines start from pure noise).

``--codec-only`` measures only the autoencoder, on personal concepts (the protocol of the "Base
model v2" issue): render ``--sequence`` (tabletop-50) with ``--train-views`` + ``--eval-views`` views
per concept at 64 px (the concept-folder export's views), embed them with EfficientNet-Lite0 and
assign every held-out view to the nearest concept centroid of the training views. Reported for the
raw held-out views, 32 px and 16 px bicubic round trips, and a round trip (encode -> posterior mean
-> decode) through each ``--vae`` (default: the bundled one; an exported pipeline folder, a ``vae``
folder, or a ``train-base`` work dir, whose ``vae.safetensors`` is read). The same accuracy in two
pixel spaces (16x16 area-downsampled RGB; 8x8x8 RGB colour histograms) and PSNR against the raw
views keep the result from resting on the feature extractor alone.

    python benchmarks/base_model_quality.py --codec-only [--vae PATH ...] [--sequence tabletop-50]
        [--train-views 12] [--eval-views 12] [--out benchmarks/results/base-model-v2/codec-NAME.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

DEFAULT_OUT = "benchmarks/results/base-model-quality.json"
DEFAULT_GRID = "benchmarks/results/base-model-samples.png"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--per-class", type=int, default=16)
    p.add_argument("--real", type=int, default=32, help="held-out real renders per class")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", choices=("noise", "mean-leak", "marginal"), default="noise",
                   help="initial latents: pure noise (as stock pipelines), noise carrying the training latents' "
                        "mean at the first step's signal level, or also a random per-image DC (see above)")
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--grid", default=None,
                   help="sample grid (default: beside --out as OUT-samples.png; for the default --out, "
                        f"{DEFAULT_GRID}), so a run with its own --out never overwrites the committed grid")
    p.add_argument("--workdir", default=None, help="train-base work dir: also record the result for the model card "
                   "(quality.json; codec.json with --codec-only)")
    p.add_argument("--codec-only", action="store_true", help="measure only the VAE round trip on personal concepts")
    p.add_argument("--vae", action="append", default=None,
                   help="--codec-only: VAE to measure (pipeline folder, vae folder or train-base work dir; repeatable)")
    p.add_argument("--sequence", default="tabletop-50", help="--codec-only: concept sequence (default %(default)s)")
    p.add_argument("--train-views", type=int, default=12, help="--codec-only: training views per concept")
    p.add_argument("--eval-views", type=int, default=12, help="--codec-only: held-out views per concept")
    p.add_argument("--cache", default=None,
                   help="--codec-only: folder caching the renders and reference results (default: no cache)")
    args = p.parse_args(argv)
    if args.grid is None:
        args.grid = DEFAULT_GRID if args.out == DEFAULT_OUT else str(Path(args.out).with_suffix("")) + "-samples.png"
    if args.codec_only:
        return codec(args, argv)

    from PIL import Image

    from conceptstream.evaluation.features import EfficientNetLite0Features
    from conceptstream.evaluation.metrics import KID
    from conceptstream.imaging import make_grid
    from conceptstream.models.loading import load_pipeline
    from conceptstream.world.catalogue import BASE_CLASSES
    from conceptstream.world.render import TabletopRenderer

    t0 = time.time()
    extractor = EfficientNetLite0Features()
    renderer = TabletopRenderer(64)
    # held-out real renders: indices far from the training range (training uses 0..images_per_class-1)
    real = {c.noun: [renderer.render_class(c, 100_000 + i, seed=1).image for i in range(args.real)] for c in BASE_CLASSES}
    real_feats = {n: extractor(ims) for n, ims in real.items()}
    centroids = torch.stack([f.mean(0) for f in real_feats.values()])
    nouns = list(real_feats)

    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)

    # reference points on a second set of held-out real renders, against the same centroids: the
    # renders themselves (the metric's ceiling), at half resolution (what blur costs on this
    # metric), and after a VAE round trip (samples pass the same decoder: they can hardly score above it)
    hits = {"real": 0, "half": 0, "vae": 0}
    vae_hits: dict[str, float] = {}  # per class: the ceiling the decoder leaves the class's samples
    for ci, cls in enumerate(BASE_CLASSES):
        probe = [renderer.render_class(cls, 200_000 + i, seed=2).image for i in range(args.per_class)]
        variants = {"real": probe,
                    "half": [im.resize((32, 32), Image.BILINEAR).resize((64, 64), Image.BILINEAR) for im in probe],
                    "vae": _vae_round_trip(pipe.vae, probe)}
        for name, images in variants.items():
            hit = int((torch.cdist(extractor(images), centroids).argmin(1) == ci).sum())
            hits[name] += hit
            if name == "vae":
                vae_hits[cls.noun] = hit / args.per_class
    real_reference, blur_reference, vae_reference = (hits[k] / (args.per_class * len(BASE_CLASSES))
                                                     for k in ("real", "half", "vae"))
    stats = latent_stats(pipe, renderer)
    per_class, tiles, casts, colours = {}, [], [], []
    correct = total = 0
    for ci, noun in enumerate(nouns):
        gens = [torch.Generator().manual_seed(args.seed + i) for i in range(args.per_class)]
        latents = start_latents(pipe, gens, args.steps, stats["latent_mean"] if args.start != "noise" else None,
                                stats["latent_dc_std"] if args.start == "marginal" else None)
        images = pipe([f"a photo of a {noun}"] * args.per_class, num_inference_steps=args.steps,
                      guidance_scale=args.guidance, latents=latents).images
        cast = (_mean_rgb(images) - _mean_rgb(real[noun])).tolist()
        casts.append(cast)
        colours.append([_colour_stats(images), _colour_stats(real[noun])])
        tiles += images[:8]
        feats = extractor(images)
        pred = torch.cdist(feats, centroids).argmin(1)
        acc = (pred == ci).float().mean().item()
        kid = KID(subsets=50, subset_size=args.per_class, seed=0)
        kid.update(real_feats[noun], real=True)
        kid.update(feats, real=False)
        kid_mean, kid_std = kid.compute()
        confused = {nouns[j]: int((pred == j).sum()) for j in pred.unique().tolist() if j != ci}
        per_class[noun] = {"centroid_accuracy": acc, "KID_x1e3": 1e3 * float(kid_mean),
                           "KID_std_x1e3": 1e3 * float(kid_std), "confused_with": confused,
                           "vae_reconstruction_accuracy": vae_hits[noun],
                           "colour_cast_rgb": [round(c, 4) for c in cast],
                           "colour_spread_generated_real": [round(c["spread"], 4) for c in colours[-1]],
                           "saturation_generated_real": [round(c["saturation"], 4) for c in colours[-1]]}
        correct += int((pred == ci).sum())
        total += len(pred)
        print(f"{noun:<16} acc {acc:.2f}  KID x1e3 {1e3 * float(kid_mean):8.2f}  cast RGB "
              f"{' '.join(f'{c:+.3f}' for c in cast)}  confused {confused}")
    result = {
        "model": args.model,
        "centroid_accuracy": correct / total,
        "target": 0.8,
        "real_renders_centroid_accuracy": real_reference,
        "vae_reconstruction_centroid_accuracy": vae_reference,
        "half_resolution_renders_centroid_accuracy": blur_reference,
        "colour_cast": {"mean_rgb": [round(float(c), 4) for c in np.mean(casts, 0)],
                        "mean_abs": round(float(np.abs(casts).mean()), 4),
                        "what": "mean RGB (0-1) of the generated images minus that of the class's real renders"},
        "colour_diversity": {**{f"{key}_{side}": round(float(np.mean([c[i][key] for c in colours])), 4)
                                for key in ("spread", "saturation") for i, side in enumerate(("generated", "real"))},
                             "what": "mean over classes; spread: std over a class's images of their mean RGB (0-1), "
                                     "averaged over R, G, B; saturation: mean HSV saturation of all pixels"},
        "latents": stats,
        "per_class": per_class,
        "settings": {"per_class": args.per_class, "real_per_class": args.real, "steps": args.steps,
                     "guidance": args.guidance, "seed": args.seed, "start": args.start,
                     "scheduler": type(pipe.scheduler).__name__,
                     "features": "EfficientNet-Lite0 (ImageNet), pooled 1280-d"},
        "seconds": round(time.time() - t0, 1),
        "machine": {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "command": " ".join(["python benchmarks/base_model_quality.py", *(sys.argv[1:] if argv is None else argv)]),
    }
    print(f"colour cast (generated - real, mean RGB) {result['colour_cast']['mean_rgb']}, mean |cast| "
          f"{result['colour_cast']['mean_abs']}; decoder colour of a zero latent {stats['zero_latent_rgb']}")
    cd = result["colour_diversity"]
    print(f"colour spread generated {cd['spread_generated']:.3f} / real {cd['spread_real']:.3f}; saturation "
          f"generated {cd['saturation_generated']:.3f} / real {cd['saturation_real']:.3f}")
    print(f"overall nearest-centroid accuracy {result['centroid_accuracy']:.3f} (target 0.8; "
          f"held-out real renders score {real_reference:.3f}, at half resolution {blur_reference:.3f}, "
          f"after a VAE round trip {vae_reference:.3f})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    make_grid(tiles, cols=8).save(args.grid)
    if args.workdir:
        progress = json.loads((Path(args.workdir) / "progress.json").read_text())
        result["unet_step"] = progress.get("unet_step")
        (Path(args.workdir) / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _pixels(images) -> torch.Tensor:
    """PIL images as one NCHW batch in [-1, 1], the VAE's input."""
    return torch.stack([torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1) for im in images]).float() / 127.5 - 1


def _rgb(images) -> np.ndarray:
    """PIL images as one [N, H, W, 3] float array in [0, 1]."""
    return np.stack([np.asarray(im.convert("RGB"), np.float64) / 255 for im in images])


def _mean_rgb(images) -> np.ndarray:
    return _rgb(images).mean((0, 1, 2))


def _colour_stats(images) -> dict[str, float]:
    """How varied and how vivid a set of images' colours are: the std over images of their mean RGB
    (averaged over channels) and the mean HSV saturation of their pixels."""
    rgb = _rgb(images)
    top, bottom = rgb.max(-1), rgb.min(-1)
    saturation = np.where(top > 0, (top - bottom) / np.maximum(top, 1e-8), 0.0)
    return {"spread": float(rgb.mean((1, 2)).std(0).mean()), "saturation": float(saturation.mean())}


@torch.no_grad()
def latent_stats(pipe, renderer, per_class: int = 16) -> dict:
    """Per-channel mean and std of the scaled latents (posterior mean) of training-range class renders
    (the first ``per_class`` of every class, the base training's own render seed 0), and the decoder's
    mean colour of an all-zero latent. ``latent_dc_std``: per channel, the std over images of an image's
    mean latent (its DC)."""
    from conceptstream.world.catalogue import BASE_CLASSES

    images = [renderer.render_class(c, i, seed=0).image for c in BASE_CLASSES for i in range(per_class)]
    x = _pixels(images)
    vae, scale = pipe.vae, pipe.vae.config.scaling_factor
    z = torch.cat([vae.encode(chunk).latent_dist.mode() for chunk in x.split(64)]) * scale
    zero = vae.decode(torch.zeros(1, *z.shape[1:])).sample.clamp(-1, 1)
    return {"latent_mean": [round(float(v), 4) for v in z.mean((0, 2, 3))],
            "latent_std": [round(float(v), 4) for v in z.std((0, 2, 3))],
            "latent_dc_std": [round(float(v), 4) for v in z.mean((2, 3)).std(0)],
            "zero_latent_rgb": [round(float(v), 4) for v in ((zero + 1) / 2).mean((0, 2, 3))],
            "renders": f"{per_class} per class, render_class(cls, 0..{per_class - 1}, seed=0)"}


def start_latents(pipe, generators, steps: int, mean: list[float] | None,
                  dc_std: list[float] | None = None) -> torch.Tensor:
    """The initial latents of one batch (one generator per image, as the pipeline would draw them); with
    ``mean``, plus the signal the first sampling step's noised training latents carry: sqrt(a) * mean; with
    ``dc_std`` too, sqrt(a) * (mean + dc_std * n), n ~ N(0, 1) per image and channel (drawn after the noise)."""
    unet = pipe.unet.config
    shape = (unet.in_channels, unet.sample_size, unet.sample_size)
    noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
    if mean is None:
        return noise
    pipe.scheduler.set_timesteps(steps)
    a = float(pipe.scheduler.alphas_cumprod[int(pipe.scheduler.timesteps[0])])
    signal = torch.tensor(mean).view(1, -1, 1, 1).expand(len(generators), -1, 1, 1)
    if dc_std is not None:
        dc = torch.stack([torch.randn(len(dc_std), generator=g) for g in generators])
        signal = signal + (torch.tensor(dc_std) * dc).view(len(generators), -1, 1, 1)
    return (1 - a) ** 0.5 * noise + a ** 0.5 * signal


@torch.no_grad()
def _vae_round_trip(vae, images):
    from PIL import Image

    x = _pixels(images)
    rec = torch.cat([vae.decode(vae.encode(chunk).latent_dist.mode()).sample for chunk in x.split(64)])
    pixels = ((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(p) for p in pixels]


# ---------------------------------------------------------------------------------------- codec


def load_vae(ref: str | None):
    """An AutoencoderKL from a pipeline folder, a ``vae`` folder, or a train-base work dir."""
    from diffusers import AutoencoderKL

    if ref in (None, "tiny"):
        from conceptstream.models.loading import bundled_model

        ref = str(bundled_model())
    path = Path(ref)
    if (path / "vae" / "config.json").is_file():
        return AutoencoderKL.from_pretrained(path, subfolder="vae", use_safetensors=True)
    if (path / "config.json").is_file():
        return AutoencoderKL.from_pretrained(path, use_safetensors=True)
    if (path / "vae.safetensors").is_file():  # a train-base work dir (possibly mid-training)
        from conceptstream.safeio import load_tensors
        from conceptstream.world.tiny_model import build_vae

        config = json.loads((path / "progress.json").read_text())["config"]
        vae = build_vae(config.get("latent_channels", 4), config.get("vae_downsample", 4))
        vae.load_state_dict(load_tensors(path / "vae.safetensors"))
        return vae.eval()
    raise SystemExit(f"{ref}: not a pipeline folder, a vae folder or a train-base work dir")


def _pixel_spaces(images) -> dict[str, torch.Tensor]:
    """Two feature spaces with no learned weights: 16x16 area-downsampled RGB, and an 8x8x8 RGB histogram."""
    from PIL import Image

    small = np.stack([np.asarray(im.convert("RGB").resize((16, 16), Image.BOX), np.float32) / 255 for im in images])
    arr = np.stack([np.asarray(im.convert("RGB")) for im in images]) // 32  # 8 bins per channel
    codes = (arr[..., 0].astype(np.int64) * 64 + arr[..., 1] * 8 + arr[..., 2]).reshape(len(images), -1)
    hist = np.stack([np.bincount(c, minlength=512) for c in codes]).astype(np.float32)
    hist = np.sqrt(hist / hist.sum(1, keepdims=True))  # Hellinger: Euclidean distance on sqrt-frequencies
    return {"rgb16": torch.from_numpy(small.reshape(len(images), -1)), "colour_hist": torch.from_numpy(hist)}


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    return float(np.mean(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))))


def _render_views(args):
    from conceptstream.world.catalogue import get_sequence
    from conceptstream.world.render import TabletopRenderer

    key = f"{args.sequence}-t{args.train_views}-e{args.eval_views}"
    cache = Path(args.cache) / f"views-{key}.npz" if args.cache else None
    if cache is not None and cache.is_file():
        z = np.load(cache)
        return z["train"], z["eval"]
    concepts = get_sequence(args.sequence)
    renderer = TabletopRenderer(64)  # the views of world/folders.py export_sequence (seed 0)
    views = {split: np.stack([np.stack([np.asarray(renderer.render_concept(c, split, i, 0).image) for i in range(n)])
                              for c in concepts])
             for split, n in (("train", args.train_views), ("eval", args.eval_views))}
    renderer.close()
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.stem}.{time.time_ns()}.tmp.npz")
        np.savez(tmp, **views)
        tmp.replace(cache)
    return views["train"], views["eval"]


def concept_centroids(args, train: np.ndarray, extractor) -> dict[str, torch.Tensor]:
    """Each concept's centroid ``[C, D]`` of its training views ``train`` (uint8 ``[C, V, 64, 64, 3]``) in
    every feature space (EfficientNet-Lite0 and the two pixel spaces); cached in ``args.cache``."""
    from PIL import Image

    n_concepts = train.shape[0]
    feat_cache = Path(args.cache) / f"train-features-{args.sequence}-t{args.train_views}.pt" if args.cache else None
    if feat_cache is not None and feat_cache.is_file():
        spaces = torch.load(feat_cache, weights_only=True)
    else:
        train_ims = [Image.fromarray(a) for a in train.reshape(-1, *train.shape[-3:])]
        spaces = {"efficientnet_lite0": extractor(train_ims), **_pixel_spaces(train_ims)}
        if feat_cache is not None:  # written atomically: several measurements may share the cache
            feat_cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = feat_cache.with_suffix(f".{time.time_ns()}.tmp")
            torch.save(spaces, tmp)
            tmp.replace(feat_cache)
    return {k: f.view(n_concepts, -1, f.shape[-1]).mean(1) for k, f in spaces.items()}


def codec(args, argv=None) -> dict:
    """Nearest-concept accuracy of held-out concept views after resampling and VAE round trips."""
    from PIL import Image

    from conceptstream.evaluation.features import EfficientNetLite0Features

    t0 = time.time()
    train, held = _render_views(args)  # uint8 [C, V, 64, 64, 3]
    n_concepts = train.shape[0]
    labels = torch.arange(n_concepts).repeat_interleave(held.shape[1])
    to_pil = lambda arr: [Image.fromarray(a) for a in arr.reshape(-1, *arr.shape[-3:])]  # noqa: E731
    extractor = EfficientNetLite0Features()
    centroids = concept_centroids(args, train, extractor)

    def score(images: list) -> dict:
        feats = {"efficientnet_lite0": extractor(images), **_pixel_spaces(images)}
        out = {f"acc_{k}": float((torch.cdist(f, centroids[k]).argmin(1) == labels).float().mean()) for k, f in feats.items()}
        out["psnr_db"] = _psnr(np.stack([np.asarray(im) for im in images]), held.reshape(-1, *held.shape[-3:]))
        return out

    raw = to_pil(held)
    ref_key = Path(args.cache) / f"reference-{args.sequence}-t{args.train_views}-e{args.eval_views}.json" if args.cache else None
    if ref_key is not None and ref_key.is_file():
        reference = json.loads(ref_key.read_text())
    else:
        reference = {"raw": score(raw)}
        for px in (32, 16):
            reference[f"bicubic_{px}px"] = score([im.resize((px, px), Image.BICUBIC).resize((64, 64), Image.BICUBIC)
                                                  for im in raw])
        if ref_key is not None:
            tmp = ref_key.with_suffix(f".{time.time_ns()}.tmp")
            tmp.write_text(json.dumps(reference, indent=2))
            tmp.replace(ref_key)
    rows = dict(reference)
    vaes = {}
    for ref in args.vae or ["tiny"]:
        t1 = time.time()
        vae = load_vae(ref)
        rows_key = f"vae:{Path(ref).name if ref != 'tiny' else 'bundled'}"
        rows[rows_key] = score(_vae_round_trip(vae, raw))
        down = 2 ** (len(vae.config.block_out_channels) - 1)
        vaes[rows_key] = {"ref": ref if ref == "tiny" else Path(ref).name,
                          "latent": [vae.config.latent_channels, 64 // down, 64 // down],
                          "parameters": sum(p.numel() for p in vae.parameters()), "seconds": round(time.time() - t1, 1)}
        step = _vae_step(ref)
        if step is not None:
            vaes[rows_key]["vae_step"] = step
    cols = ["acc_efficientnet_lite0", "acc_rgb16", "acc_colour_hist", "psnr_db"]
    print(f"{'variant':<28}" + "".join(f"{c:>24}" for c in cols))
    for name, r in rows.items():
        print(f"{name:<28}" + "".join(f"{r[c]:>24.3f}" for c in cols))
    result = {
        "protocol": {"sequence": args.sequence, "concepts": n_concepts, "train_views": args.train_views,
                     "eval_views": args.eval_views, "image_size": 64, "render_seed": 0,
                     "assignment": "nearest centroid of each concept's training views (Euclidean)",
                     "chance": 1 / n_concepts,
                     "spaces": {"efficientnet_lite0": "pooled 1280-d EfficientNet-Lite0 (ImageNet) features, 224 px bicubic",
                                "rgb16": "16x16 box-downsampled RGB pixels",
                                "colour_hist": "8x8x8 RGB histogram, Hellinger (sqrt) distance"},
                     "vae_round_trip": "encode -> posterior mean -> decode, clamped and rounded to uint8"},
        "results": rows, "vaes": vaes, "seconds": round(time.time() - t0, 1),
        "machine": {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "command": command_line("base_model_quality.py", argv),
    }
    out = args.out
    if out == "benchmarks/results/base-model-quality.json":  # the generation benchmark's default
        out = "benchmarks/results/base-model-v2/codec-bundled.json"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    if args.workdir:  # the model card's codec line (world/model_card.py)
        (Path(args.workdir) / "codec.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that reproduces a run of ``benchmarks/<script>``, absolute paths cut to their names
    (no machine paths in committed results)."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join([f"python benchmarks/{script}", *[Path(a).name if a.startswith("/") else a for a in args]])


def _vae_step(ref: str) -> int | None:
    path = Path(ref)
    for name in ("progress.json", "training.json"):
        if (path / name).is_file():
            return json.loads((path / name).read_text()).get("vae_step")
    return None


if __name__ == "__main__":
    main()
