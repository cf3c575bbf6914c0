"""What a wider or deeper base-model UNet costs per training step, before a retrain is started.

For each ``--unet`` shape (block widths, then ``xL`` for L layers per block; ``default`` is the bundled
UNet), build the UNet of ``world train-base`` at 32x32 latents (``--vae-downsample 2``) and time
``--steps`` forward + backward passes of the training batch (random latents, timesteps and text
states of the tiny text encoder's width; no optimizer step), after one warm-up pass, in each
``--mixed-precision`` (``no``: fp32; ``bf16``: the forward under bf16 autocast, as ``world train-base
--mixed-precision bf16``). Prints and writes parameters, seconds per step and the steps an hour buys.

    python benchmarks/unet_step_cost.py [--unet default 64,128,96,96 64,128,128,128x2 ...]
        [--mixed-precision no bf16] [--batch-size 32] [--steps 5] [--threads 2]
        [--out benchmarks/results/base-model-v2/unet-step-cost.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from conceptstream.precision import BASE_TRAINING_PRECISIONS


def parse_shape(text: str) -> tuple[tuple[int, ...] | None, int]:
    """``default``, ``64,128,96,96`` or ``64,128,96,96x2`` -> (widths or None, layers per block)."""
    widths, _, layers = text.partition("x")
    return (None if widths == "default" else tuple(int(c) for c in widths.split(","))), int(layers or 1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unet", nargs="+", default=["default", "64,128,96,96", "64,128,128,128", "32,64,96,96x2"])
    p.add_argument("--mixed-precision", nargs="+", choices=BASE_TRAINING_PRECISIONS, default=["no"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import torch
    from diffusers import UNet2DConditionModel

    from conceptstream.distributed import make_accelerator
    from conceptstream.system import cpu_model
    from conceptstream.world.tiny_model import TEXT_DIM, unet_config

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    rows = []
    for shape, precision in [(s, m) for s in args.unet for m in args.mixed_precision]:
        widths, layers = parse_shape(shape)
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**unet_config(4, 2, widths, layers)).train()
        accelerator = make_accelerator(precision, torch.device("cpu"))  # the engine's and train-base's autocast
        x = torch.randn(args.batch_size, 4, 32, 32, generator=g)
        t = torch.randint(0, 1000, (args.batch_size,), generator=g)
        text = torch.randn(args.batch_size, 77, TEXT_DIM, generator=g)
        times = []
        for i in range(args.steps + 1):
            t0 = time.perf_counter()
            with accelerator.autocast():
                pred = unet(x, t, text).sample
            pred.float().square().mean().backward()
            unet.zero_grad(set_to_none=True)
            if i:  # the first pass is a warm-up
                times.append(time.perf_counter() - t0)
        sec = sorted(times)[len(times) // 2]
        row = {"unet": shape, "mixed_precision": precision, "block_out_channels": list(unet.config.block_out_channels),
               "layers_per_block": layers, "params_M": round(sum(q.numel() for q in unet.parameters()) / 1e6, 2),
               "seconds_per_step_median": round(sec, 3), "steps_per_hour": int(3600 / sec)}
        rows.append(row)
        print(f"{shape:>20} {precision:>4}  {row['params_M']:5.2f}M params  {sec:6.3f} s/step  "
              f"{row['steps_per_hour']:6d} steps/h", flush=True)
    result = {"what": "forward + backward of the train-base UNet at 32x32 latents, random inputs, no optimizer step; "
                      "median of the timed passes after one warm-up",
              "batch_size": args.batch_size, "steps": args.steps, "threads": args.threads,
              "machine": cpu_model(), "torch": torch.__version__, "rows": rows,
              "command": "python benchmarks/unet_step_cost.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
