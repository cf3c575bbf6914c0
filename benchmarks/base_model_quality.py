"""Quality of a base model on the tabletop classes (the bundled model's acceptance benchmark).

For each base class: generate ``--per-class`` images from "a photo of a {noun}", embed them and
real held-out renders with EfficientNet-Lite0, and report
- nearest real-class-centroid accuracy of the generated images (target >= 0.8), and
- KID (x1e3, polynomial kernel) of generated vs real renders, per class.

    python benchmarks/base_model_quality.py [--model tiny|PATH] [--per-class 16] [--real 32]
        [--steps 30] [--guidance 5.0] [--out benchmarks/results/base-model-quality.json]
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


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--per-class", type=int, default=16)
    p.add_argument("--real", type=int, default=32, help="held-out real renders per class")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/base-model-quality.json")
    p.add_argument("--grid", default="benchmarks/results/base-model-samples.png")
    p.add_argument("--workdir", default=None, help="train-base work dir: also record the result for the model card")
    args = p.parse_args(argv)

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
    for ci, cls in enumerate(BASE_CLASSES):
        probe = [renderer.render_class(cls, 200_000 + i, seed=2).image for i in range(args.per_class)]
        variants = {"real": probe,
                    "half": [im.resize((32, 32), Image.BILINEAR).resize((64, 64), Image.BILINEAR) for im in probe],
                    "vae": _vae_round_trip(pipe.vae, probe)}
        for name, images in variants.items():
            hits[name] += int((torch.cdist(extractor(images), centroids).argmin(1) == ci).sum())
    real_reference, blur_reference, vae_reference = (hits[k] / (args.per_class * len(BASE_CLASSES))
                                                     for k in ("real", "half", "vae"))
    per_class, tiles = {}, []
    correct = total = 0
    for ci, noun in enumerate(nouns):
        gens = [torch.Generator().manual_seed(args.seed + i) for i in range(args.per_class)]
        images = pipe([f"a photo of a {noun}"] * args.per_class, num_inference_steps=args.steps,
                      guidance_scale=args.guidance, generator=gens).images
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
                           "KID_std_x1e3": 1e3 * float(kid_std), "confused_with": confused}
        correct += int((pred == ci).sum())
        total += len(pred)
        print(f"{noun:<16} acc {acc:.2f}  KID x1e3 {1e3 * float(kid_mean):8.2f}  confused {confused}")
    result = {
        "model": args.model,
        "centroid_accuracy": correct / total,
        "target": 0.8,
        "real_renders_centroid_accuracy": real_reference,
        "vae_reconstruction_centroid_accuracy": vae_reference,
        "half_resolution_renders_centroid_accuracy": blur_reference,
        "per_class": per_class,
        "settings": {"per_class": args.per_class, "real_per_class": args.real, "steps": args.steps,
                     "guidance": args.guidance, "seed": args.seed, "scheduler": type(pipe.scheduler).__name__,
                     "features": "EfficientNet-Lite0 (ImageNet), pooled 1280-d"},
        "seconds": round(time.time() - t0, 1),
        "machine": {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "command": " ".join(["python benchmarks/base_model_quality.py", *(sys.argv[1:] if argv is None else argv)]),
    }
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


@torch.no_grad()
def _vae_round_trip(vae, images):
    from PIL import Image

    x = torch.stack([torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1) for im in images]).float() / 127.5 - 1
    rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
    pixels = ((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(p) for p in pixels]


if __name__ == "__main__":
    main()
