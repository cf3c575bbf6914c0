"""Full against successive-elimination DC classification of a learned stream's held-out images.

The bench's final DC evaluation scores every held-out image against every candidate of the fixed set
(every concept + the class prompt of every noun) at ``dc_eval_timesteps`` draws. Successive elimination
(Li et al. 2023) scores all candidates at a few draws, keeps the best few per image and rescores only
those (``DiffusionClassifier.eval_errors_eliminating``). This script runs both on the same state and
sequence folder, side by side, and reports the seconds of each, the speed-up, both accuracies (fixed set
and own class) and their differences, and the number of UNet (image, candidate, draw) evaluations.

    python benchmarks/dc_elimination.py --state BENCH/runs/ewc-dc-lora/seed0/state \
        --data BENCH/data/tabletop-6-6c-train12-eval12 [--draws 8] [--schedule 2:8,4:3] [--out dc-elim.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> dict:
    from conceptstream.api import open_stream
    from conceptstream.concepts.folder import read_sequence
    from conceptstream.evaluation.bench import dc_classification
    from conceptstream.scoring.dc import parse_elimination

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--state", required=True, help="a learned stream (e.g. a bench run's state folder)")
    p.add_argument("--data", required=True, help="the sequence folder it learned (held-out images in */eval)")
    p.add_argument("--draws", type=int, default=8, help="draws per image of the full evaluation (dc_eval_timesteps)")
    p.add_argument("--schedule", default="2:8,4:3",
                   help="elimination stages DRAWS:KEEP, draws counted in total (default 2:8,4:3)")
    p.add_argument("--batch", type=int, default=4, help="images per UNet call (the bench's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="write the JSON document here too")
    args = p.parse_args(argv)
    schedule = parse_elimination(args.schedule)

    stream = open_stream(args.state, device=args.device)
    concepts = read_sequence(args.data)[: len(stream.tokens)]
    include_noun = stream.method.include_noun
    # untimed warm-up (lazy imports, allocator, first-call kernels), so neither timed run pays for them
    dc_classification(stream, concepts[:1], include_noun, 1, args.batch)
    rows = {}
    for name, elimination in (("full", None), ("elimination", schedule)):
        t0 = time.perf_counter()
        result = dc_classification(stream, concepts, include_noun, args.draws, args.batch, progress=True,
                                   elimination=elimination)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        rows[name] = {"seconds": round(seconds, 3), "accuracy": result["accuracy"],
                      "accuracy_own_class": result["own_class"]["accuracy"],
                      "per_concept": result["per_concept"], "ece": result["calibration"]["ece"],
                      "calibration_kind": result["calibration"]["kind"],
                      "unet_evaluations": result["unet_evaluations"]}
        print(f"{name:>11}: {seconds:8.1f}s  accuracy {result['accuracy']:.3f}  own class "
              f"{result['own_class']['accuracy']:.3f}  UNet evaluations {result['unet_evaluations']}", flush=True)
    full, elim = rows["full"], rows["elimination"]
    doc = {"state": str(args.state), "data": str(args.data), "concepts": [c.token for c in concepts],
           "candidates": len(result["candidates"]), "images": sum(result["images"]), "draws": args.draws,
           "schedule": [list(s) for s in schedule] if schedule else None, "batch": args.batch,
           "method": stream.settings.method, "full": full, "elimination": elim,
           "speedup": round(full["seconds"] / max(elim["seconds"], 1e-9), 3),
           "evaluations_ratio": round(full["unet_evaluations"] / max(elim["unet_evaluations"], 1), 3),
           "accuracy_difference": elim["accuracy"] - full["accuracy"],
           "accuracy_own_class_difference": elim["accuracy_own_class"] - full["accuracy_own_class"],
           "device": args.device, "machine": platform.processor() or platform.machine(),
           "torch": torch.__version__, "threads": torch.get_num_threads(),
           "command": "python benchmarks/dc_elimination.py"}
    print(f"speed-up x{doc['speedup']:.2f} (UNet evaluations x{doc['evaluations_ratio']:.2f}); accuracy difference "
          f"{doc['accuracy_difference']:+.3f} (own class {doc['accuracy_own_class_difference']:+.3f})", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    return doc


if __name__ == "__main__":
    main()
