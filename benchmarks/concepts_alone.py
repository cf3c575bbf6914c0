"""Can a base model draw a personal concept it learned alone? (goal 3 of the "Base model v2" issue)

Each concept of ``--sequence`` (tabletop-6) is learned alone into a fresh stream with ``--method``
(``lora``) for each budget of ``--steps`` (default: the method's own ``default_steps``), then draws
``--images`` (12) images of "a photo of a <token> <noun>". Every image is assigned to the nearest of
the concept centroids of ``--against`` (tabletop-50: the mean EfficientNet-Lite0 feature of each
concept's 12 training views, the codec protocol of ``base_model_quality.py --codec-only``); the score
is the share assigned to the concept itself (chance 1/50; goal >= 0.5 on average at the default
budget). Per budget it records the accuracy per concept and on average, and the learning time, so
the default steps can be chosen as plasticity against cost.

    python benchmarks/concepts_alone.py [--model tiny|PATH] [--steps 100,200,400] [--cache DIR]
        [--out benchmarks/results/base-model-v2/concepts-alone-NAME.json]

Nothing of a concept is written outside a temporary folder that is removed at the end (the concept
folders are rendered there, the streams are learned there).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="base model (default: the bundled one)")
    p.add_argument("--sequence", default="tabletop-6", help="concepts to learn, each alone (default %(default)s)")
    p.add_argument("--against", default="tabletop-50",
                   help="the concepts whose centroids every image is assigned among (default %(default)s)")
    p.add_argument("--method", default="lora", help="continual method (default %(default)s)")
    p.add_argument("--steps", default=None, help="comma-separated step budgets (default: the method's default_steps)")
    p.add_argument("--images", type=int, default=12, help="generated images per concept (default %(default)s)")
    p.add_argument("--train-views", type=int, default=12, help="training views per concept (default %(default)s)")
    p.add_argument("--sampler-steps", type=int, default=30, help="sampler steps (default %(default)s)")
    p.add_argument("--guidance", type=float, default=5.0, help="guidance scale (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="learn seed; image i uses seed i (default %(default)s)")
    p.add_argument("--cache", default=None, help="folder caching the centroid views and features")
    p.add_argument("--out", default=None, help="JSON to write")
    p.add_argument("--workdir", default=None,
                   help="train-base work dir: also record the result for the model card (concepts-alone.json)")
    args = p.parse_args(argv)

    from base_model_quality import _render_views, command_line, concept_centroids

    from conceptstream import api
    from conceptstream.evaluation.features import EfficientNetLite0Features
    from conceptstream.methods.registry import default_steps
    from conceptstream.world.catalogue import get_sequence
    from conceptstream.world.folders import export_sequence

    t0 = time.time()
    budgets = [int(v) for v in args.steps.split(",")] if args.steps else [default_steps(args.method)]
    against = [c.name for c in get_sequence(args.against)]
    learned = get_sequence(args.sequence)
    missing = [c.name for c in learned if c.name not in against]
    if missing:
        raise SystemExit(f"{', '.join(missing)} not in {args.against}: every learned concept must be a candidate")
    extractor = EfficientNetLite0Features()
    # the codec protocol's views (12 held-out views too, so its cache is shared; only the training views are used)
    views = argparse.Namespace(sequence=args.against, train_views=args.train_views, eval_views=12, cache=args.cache)
    train, _ = _render_views(views)
    centroids = concept_centroids(views, train, extractor)["efficientnet_lite0"]

    rows: dict[str, dict] = {}
    work = Path(tempfile.mkdtemp(prefix="conceptstream-alone-"))
    try:
        folders = export_sequence(learned, work / "data", train_views=args.train_views, eval_views=1)
        for steps in budgets:
            per_concept, seconds = {}, []
            for folder in folders:
                state = work / f"state-{folder.name}-{steps}"
                t1 = time.time()
                api.learn(state, folder.path, method=args.method, model=args.model, steps=steps, seed=args.seed,
                          progress=False)
                seconds.append(time.time() - t1)
                stream = api.open_stream(state, model=args.model)
                images = stream.generate(f"a photo of a {folder.token} {folder.noun}", n=args.images, seed=0,
                                         steps=args.sampler_steps, guidance=args.guidance, progress=False)
                pred = torch.cdist(extractor(images), centroids).argmin(1)
                own = against.index(folder.name)
                hits = int((pred == own).sum())
                confused = {against[j]: int((pred == j).sum()) for j in pred.unique().tolist() if j != own}
                per_concept[folder.name] = {"accuracy": hits / len(images), "confused_with": confused}
                shutil.rmtree(state)
                print(f"steps {steps:>5}  {folder.name:<28} {hits}/{len(images)}  confused {confused}", flush=True)
            mean = float(np.mean([r["accuracy"] for r in per_concept.values()]))
            rows[str(steps)] = {"mean_accuracy": mean, "per_concept": per_concept,
                                "learn_seconds_mean": round(float(np.mean(seconds)), 1)}
            print(f"steps {steps}: mean accuracy {mean:.3f} (chance {1 / len(against):.3f}), "
                  f"{np.mean(seconds):.1f} s per concept", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "protocol": {"learned": args.sequence, "candidates": args.against, "chance": 1 / len(against),
                     "method": args.method, "images_per_concept": args.images, "train_views": args.train_views,
                     "prompt": "a photo of a <token> <noun>", "sampler_steps": args.sampler_steps,
                     "guidance": args.guidance, "learn_seed": args.seed, "image_seeds": f"0..{args.images - 1}",
                     "assignment": "nearest centroid of each candidate concept's training views, EfficientNet-Lite0"},
        "model": args.model if args.model == "tiny" else Path(args.model).name,
        "budgets": rows, "seconds": round(time.time() - t0, 1),
        "machine": {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "command": command_line("concepts_alone.py", argv),
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.workdir:  # the model card's concept line (world/model_card.py)
        (Path(args.workdir) / "concepts-alone.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
