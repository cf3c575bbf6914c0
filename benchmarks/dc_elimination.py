"""Full against successive-elimination DC classification of a learned stream's held-out images.

The bench's final DC evaluation scores every held-out image against every candidate of the fixed set
(every concept + the class prompt of every noun) at ``dc_eval_timesteps`` draws. Successive elimination
(Li et al. 2023) scores all candidates at a few draws, keeps the best few per image and rescores only
those (``DiffusionClassifier.eval_errors_eliminating``). This script runs both on the same state and
sequence folder, side by side, and reports the seconds of each, the speed-up, both accuracies (fixed set
and own class) and their differences, and the number of UNet (image, candidate, draw) evaluations.

With several ``--schedule``s and ``--choose-on val``, the schedule is chosen on the validation views first
(full and every schedule there; the rule: the fewest UNet evaluations among the schedules whose accuracy is
within ``--tolerance`` of the full one, else the most accurate), and only the chosen one is then compared
with the full evaluation on ``--split`` (test): no choice is made on the views reported. ``--choose-from``
takes the same choice from a ``benchmarks/dc_draws.py`` simulation on val instead (every schedule's exact
predictions from one full pass's per-draw errors), so the val views cost one full pass, not one per schedule.

    python benchmarks/dc_elimination.py --state BENCH/runs/ewc-dc-lora/seed0/state \
        --data BENCH/data/tabletop-6-6c-train12-eval12 [--draws 8] [--schedule 2:8,4:3 ...] \
        [--choose-on val] [--out dc-elim.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

SCHEDULES = ("1:8,4:3", "1:12,4:4", "2:8,4:3")


def _classify(stream, concepts, include_noun: bool, args, split: str, elimination) -> dict:
    """One timed classification of ``split``'s held-out images (full when ``elimination`` is None)."""
    from conceptstream.evaluation.bench import dc_classification

    t0 = time.perf_counter()
    result = dc_classification(stream, concepts, include_noun, args.draws, args.batch, progress=True,
                               elimination=elimination, split=split)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    name = "full" if elimination is None else ",".join(f"{n}:{k}" for n, k in elimination)
    print(f"{split:>5} {name:>10}: {seconds:8.1f}s  accuracy {result['accuracy']:.3f}  own class "
          f"{result['own_class']['accuracy']:.3f}  UNet evaluations {result['unet_evaluations']}", flush=True)
    return {"schedule": None if elimination is None else [list(s) for s in elimination], "seconds": round(seconds, 3),
            "accuracy": result["accuracy"], "accuracy_own_class": result["own_class"]["accuracy"],
            "per_concept": result["per_concept"], "ece": result["calibration"]["ece"],
            "calibration_kind": result["calibration"]["kind"], "unet_evaluations": result["unet_evaluations"],
            "images": sum(result["images"]), "candidates": len(result["candidates"])}


def _against(full: dict, row: dict) -> dict:
    return {"speedup": round(full["seconds"] / max(row["seconds"], 1e-9), 3),
            "evaluations_ratio": round(full["unet_evaluations"] / max(row["unet_evaluations"], 1), 3),
            "accuracy_difference": row["accuracy"] - full["accuracy"],
            "accuracy_own_class_difference": row["accuracy_own_class"] - full["accuracy_own_class"]}


def choose(full: dict, rows: list[dict], tolerance: float) -> tuple[dict, str]:
    """The schedule with the fewest UNet evaluations among those within ``tolerance`` of the full accuracy;
    when none is, the most accurate (then the cheapest). Returns it and the reason, in words."""
    close = [r for r in rows if abs(r["accuracy"] - full["accuracy"]) <= tolerance]
    if close:
        return min(close, key=lambda r: r["unet_evaluations"]), f"fewest UNet evaluations within {tolerance} of full"
    best = min(rows, key=lambda r: (-r["accuracy"], r["unet_evaluations"]))
    return best, f"none within {tolerance} of full: the most accurate"


def _where(path: str, keep: int) -> str:
    """The last ``keep`` parts of ``path``: enough to say which run, no machine path."""
    return Path(*Path(path).resolve().parts[-keep:]).as_posix()


def main(argv: list[str] | None = None) -> dict:
    from conceptstream.api import open_stream
    from conceptstream.concepts.folder import read_sequence
    from conceptstream.evaluation.bench import dc_classification
    from conceptstream.scoring.dc import elimination_schedule, parse_elimination

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--state", required=True, help="a learned stream (e.g. a bench run's state folder)")
    p.add_argument("--data", required=True, help="the sequence folder it learned (held-out images in */eval, */val)")
    p.add_argument("--draws", type=int, default=8, help="draws per image of the full evaluation (dc_eval_timesteps)")
    p.add_argument("--schedule", action="append", default=None,
                   help="elimination stages DRAWS:KEEP, draws counted in total; repeat to compare several "
                        f"(default with --choose-on: {' and '.join(SCHEDULES)}; else 2:8,4:3)")
    p.add_argument("--split", default="test", choices=("test", "val"), help="the held-out views reported")
    p.add_argument("--choose-on", default=None, choices=("val",),
                   help="choose one of the schedules on these views first, then report only it on --split")
    p.add_argument("--choose-from", default=None,
                   help="a `benchmarks/dc_draws.py` JSON (val): choose among its simulated schedules (the rows in the "
                        "classifier's draw order) by the same rule, with no UNet pass of its own")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="the largest accuracy loss against full a schedule may have to be chosen (default 0.01)")
    p.add_argument("--batch", type=int, default=4, help="images per UNet call (the bench's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="write the JSON document here too")
    args = p.parse_args(argv)
    if args.choose_from and (args.choose_on or args.schedule):
        p.error("--choose-from takes its schedules from the simulation: give it without --choose-on and --schedule")
    texts = [] if args.choose_from else args.schedule or (list(SCHEDULES) if args.choose_on else ["2:8,4:3"])
    schedules = [elimination_schedule(parse_elimination(t), args.draws) for t in texts]

    stream = open_stream(args.state, device=args.device)
    concepts = read_sequence(args.data)[: len(stream.tokens)]
    include_noun = stream.method.include_noun
    # untimed warm-up (lazy imports, allocator, first-call kernels), so no timed run pays for them
    dc_classification(stream, concepts[:1], include_noun, 1, args.batch)
    doc = {"state": _where(args.state, 3), "data": _where(args.data, 1), "concepts": [c.token for c in concepts],
           "draws": args.draws, "batch": args.batch, "method": stream.settings.method, "split": args.split}
    if args.choose_from:
        sim = json.loads(Path(args.choose_from).read_text())
        if sim.get("classifier_order") is None or sim["draws"] != args.draws or sim["state"] != doc["state"]:
            raise SystemExit(f"{args.choose_from}: not a simulation of this state's classifier at {args.draws} "
                             "draws; rerun benchmarks/dc_draws.py on it")
        rows = [{**r, "unet_evaluations": r["evaluations_per_image"]} for r in sim["rows"]
                if r["order"] == sim["classifier_order"]]
        chosen, rule = choose({"accuracy": sim["full_accuracy"]}, rows, args.tolerance)
        doc["choice"] = {"split": sim["split"], "from": "benchmarks/dc_draws.py: one full pass's per-draw errors",
                         "tolerance": args.tolerance, "rule": rule, "full_accuracy": sim["full_accuracy"],
                         "schedules": rows, "chosen": [list(s) for s in parse_elimination(chosen["schedule"])]}
        schedules = [elimination_schedule(parse_elimination(chosen["schedule"]), args.draws)]
        print(f"chosen on {sim['split']} (simulated): {chosen['schedule']} ({rule})", flush=True)
    if args.choose_on:
        full = _classify(stream, concepts, include_noun, args, args.choose_on, None)
        rows = [{**r, **_against(full, r)} for r in
                (_classify(stream, concepts, include_noun, args, args.choose_on, s) for s in schedules)]
        chosen, rule = choose(full, rows, args.tolerance)
        doc["choice"] = {"split": args.choose_on, "tolerance": args.tolerance, "rule": rule, "full": full,
                         "schedules": rows, "chosen": chosen["schedule"]}
        schedules = [tuple(tuple(s) for s in chosen["schedule"])]
        print(f"chosen on {args.choose_on}: {chosen['schedule']} ({rule})", flush=True)
    full = _classify(stream, concepts, include_noun, args, args.split, None)
    rows = [{**r, **_against(full, r)} for r in
            (_classify(stream, concepts, include_noun, args, args.split, s) for s in schedules)]
    doc.update({"candidates": full["candidates"], "images": full["images"], "full": full, "elimination": rows[0],
                **_against(full, rows[0]), "schedule": rows[0]["schedule"],
                "other_schedules": rows[1:], "device": args.device,
                "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                "threads": torch.get_num_threads(), "command": " ".join(
                    ["python benchmarks/dc_elimination.py --state STATE --data DATA", f"--draws {args.draws}",
                     *(f"--schedule {t}" for t in texts), f"--split {args.split}",
                     *([f"--choose-on {args.choose_on} --tolerance {args.tolerance}"] if args.choose_on else []),
                     *([f"--choose-from DC_DRAWS_JSON --tolerance {args.tolerance}"] if args.choose_from else [])])})
    print(f"{args.split}: speed-up x{doc['speedup']:.2f} (UNet evaluations x{doc['evaluations_ratio']:.2f}); "
          f"accuracy difference {doc['accuracy_difference']:+.3f} (own class "
          f"{doc['accuracy_own_class_difference']:+.3f})", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    return doc


if __name__ == "__main__":
    main()
