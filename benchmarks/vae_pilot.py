"""A VAE-only pilot of a base-model configuration, measured with the codec protocol at checkpoints.

Trains the first stage of ``world train-base`` (the VAE) in a work dir, and at each of
``--checkpoints`` (VAE steps) runs ``base_model_quality.py --codec-only`` on the work dir's VAE and
writes ``benchmarks/results/base-model-v2/pilot-NAME-stepN.json`` (config, steps, training wall
time, numbers). Resumable: rerunning continues from the work dir's last checkpoint.

    python benchmarks/vae_pilot.py NAME --workdir DIR [--latent-channels 4] [--vae-downsample 4]
        [--vae-generic-fraction 0.5] [--vae-generic-images 3000] [--images-per-class 400]
        [--checkpoints 250,500,1000,2000] [--max-minutes 25] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name")
    p.add_argument("--workdir", required=True)
    p.add_argument("--latent-channels", type=int, default=4)
    p.add_argument("--vae-downsample", type=int, default=4)
    p.add_argument("--vae-generic-fraction", type=float, default=0.0)
    p.add_argument("--vae-generic-images", type=int, default=3000)
    p.add_argument("--images-per-class", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=2e-4)
    p.add_argument("--checkpoints", default="250,500,1000,2000")
    p.add_argument("--max-minutes", type=float, default=None, help="stop training after this (measured once more)")
    p.add_argument("--cache", default=None, help="codec protocol cache (renders, reference rows)")
    p.add_argument("--results", default="benchmarks/results/base-model-v2")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    import base_model_quality as bmq

    from conceptstream.world.base_data import generic_dataset, render_dataset
    from conceptstream.world.train_base import BaseTrainer, BaseTrainingConfig

    checkpoints = [int(x) for x in args.checkpoints.split(",")]
    cfg = BaseTrainingConfig(workdir=args.workdir, out=str(Path(args.workdir) / "export"), unet_steps=0,
                             images_per_class=args.images_per_class, vae_steps=checkpoints[0],
                             batch_size=args.batch_size, vae_lr=args.vae_lr, latent_channels=args.latent_channels,
                             vae_downsample=args.vae_downsample, vae_generic_fraction=args.vae_generic_fraction,
                             vae_generic_images=args.vae_generic_images, checkpoint_every=250)
    trainer = BaseTrainer(cfg, progress=False)
    work = Path(args.workdir)
    images, _ = render_dataset(work, args.images_per_class, cfg.seed, progress=False)
    generic = generic_dataset(work, args.vae_generic_images, cfg.seed, False) if args.vae_generic_fraction > 0 else None
    t_start = time.time()
    for n in checkpoints:
        if trainer.state["vae_step"] >= n and (Path(args.results) / f"pilot-{args.name}-step{n}.json").exists():
            continue
        if args.max_minutes is not None:
            cfg.max_minutes = max(0.0, args.max_minutes - (time.time() - t_start) / 60)
        trainer.cfg.vae_steps = n
        trainer._t0, trainer._wall0 = time.time(), trainer.state["wall_seconds"]
        try:
            trainer.train_vae(images, generic)
        except Exception as exc:  # _Stop: the time budget ran out; measure where it stopped
            if type(exc).__name__ != "_Stop":
                raise
        trainer._save_state()
        step = trainer.state["vae_step"]
        codec = bmq.main(["--codec-only", "--vae", str(work), "--cache", args.cache or "",
                          "--out", str(Path(args.results) / f"codec-pilot-{args.name}-step{step}.json")]
                         if args.cache else ["--codec-only", "--vae", str(work),
                                             "--out", str(Path(args.results) / f"codec-pilot-{args.name}-step{step}.json")])
        (Path(args.results) / f"codec-pilot-{args.name}-step{step}.json").unlink()  # folded into the pilot record
        row = codec["results"][f"vae:{work.name}"]
        record = {"name": args.name, "vae_step": step,
                  "train_wall_seconds": round(trainer.state["wall_seconds"], 1),
                  "loss": trainer.state["losses"].get("vae", [[None, None]])[-1][1],
                  "config": {k: v for k, v in asdict(cfg).items()
                             if k in ("images_per_class", "batch_size", "vae_lr", "kl_weight", "latent_channels",
                                      "vae_downsample", "vae_generic_fraction", "vae_generic_images", "seed")},
                  "latent": codec["vaes"][f"vae:{work.name}"]["latent"],
                  "vae_parameters": codec["vaes"][f"vae:{work.name}"]["parameters"],
                  "vae_round_trip": row,
                  "reference": {k: v for k, v in codec["results"].items() if not k.startswith("vae:")},
                  "protocol": codec["protocol"], "threads": torch.get_num_threads()}
        out = Path(args.results) / f"pilot-{args.name}-step{step}.json"
        out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"[{args.name}] step {step}: feat acc {row['acc_efficientnet_lite0']:.3f} rgb16 {row['acc_rgb16']:.3f} "
              f"hist {row['acc_colour_hist']:.3f} psnr {row['psnr_db']:.2f} ({record['train_wall_seconds']:.0f} s)",
              flush=True)
        if step < n:
            break


if __name__ == "__main__":
    main()
