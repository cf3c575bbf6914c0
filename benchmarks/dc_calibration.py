"""How the DC posterior's calibration depends on the number of noise draws averaged per image.

Training scores each image with one (t, eps) draw; the bench's DC accuracy averages
``dc_eval_timesteps`` (8) stratified draws. Averaging shrinks the noise in the error gaps, so the
temperature that calibrates softmax(-errors / tau) shrinks with it. This script loads a learned
state and runs the bench's DC classification of every concept's held-out images with 1, 2, 4, 8 draws
among the bench's fixed candidate set (every concept + the class prompt of every noun: ``DC_acc``),
reporting accuracy, ECE, the mean true-concept probability and the best temperature (fitted by
temperature scaling) for each, and the accuracy among c_0 of the image's own class + every concept
(``DC_acc_own_class``, the form before benchmark v2; results committed before it used this set).

    python benchmarks/dc_calibration.py --state BENCH/runs/ewc-dc-lora/seed0/state \
        --data BENCH/data/tabletop-6-6c-train12-eval12 [--draws 1,2,4,8] [--out dc-calibration.json]
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

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--state", required=True, help="a learned stream (e.g. a bench run's state folder)")
    p.add_argument("--data", required=True, help="the sequence folder it learned (held-out images in */eval)")
    p.add_argument("--draws", default="1,2,4,8", help="comma-separated numbers of draws per image")
    p.add_argument("--batch", type=int, default=4, help="images per UNet call (the bench's default)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    t0 = time.time()
    stream = open_stream(args.state)
    concepts = read_sequence(args.data)[: len(stream.tokens)]
    rows = []
    for draws in [int(d) for d in args.draws.split(",")]:
        result = dc_classification(stream, concepts, stream.method.include_noun, draws, args.batch, progress=True)
        cal = result["calibration"]
        row = {"draws": draws, "accuracy": result["accuracy"], "accuracy_own_class": result["own_class"]["accuracy"],
               "ece": cal["ece"], "nll": cal["nll"],
               "true_prob": cal["true_prob"], "temperature": result["dc"]["temperature"],
               "best_temperature": cal["best_temperature"]}
        rows.append(row)
        print(f"draws {draws}: accuracy {row['accuracy']:.3f} (own-class {row['accuracy_own_class']:.3f})  "
              f"ECE {row['ece']:.3f}  true-concept prob "
              f"{row['true_prob']:.3f}  best temperature {row['best_temperature']:.5f} (used: {row['temperature']})",
              flush=True)
    doc = {"state": str(args.state), "data": str(args.data), "concepts": [c.token for c in concepts],
           "images_per_concept": [len(c.eval_images()) for c in concepts], "method": stream.settings.method,
           "rows": rows, "seconds": round(time.time() - t0, 1), "machine": platform.processor() or platform.machine(),
           "torch": torch.__version__, "command": "python benchmarks/dc_calibration.py"}
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    return doc


if __name__ == "__main__":
    main()
