"""Which successive-elimination schedule, and which draw order, keeps the full DC accuracy? Answered from
one full pass.

The full DC evaluation scores every held-out image against every candidate at ``eval_timesteps``
stratified draws; successive elimination (``DiffusionClassifier.eval_errors_eliminating``) scores the same
draws, fewer of them for the candidates it prunes. So the per-draw errors of one full pass ([draws, images,
candidates]) give every schedule's and every draw order's predictions without another UNet call: this
script computes them once per split (``dc_classification(..., per_draw=True)``, checkpointed to ``--errors``,
resumable per concept: scalar denoising errors, no image, latent or feature), then prints the accuracy of
each single draw (stratum) and of every schedule x order, with its UNet evaluations per image, and writes the
table as JSON.

    python benchmarks/dc_draws.py --state BENCH/runs/ewc-dc-lora/seed0/state --data BENCH/data/tabletop-50-... \
        --split val --errors per-draw-val.safetensors --out dc-draws-val.json

Orders: ``middle-out`` (``scoring.dc.draw_order``, the classifier's: strata 4, 3, 5, 2, 6, 1, 7, 0 for 8 draws)
and ``bit-reversed`` (0, 4, 2, 6, 1, 5, 3, 7: its order before, the least-noise stratum first).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

SCHEDULES = ("1:8,4:3", "1:12,4:4", "1:16,4:4", "2:4,4:2", "2:4,5:2", "2:5,4:2", "2:6,4:3", "2:8,4:3", "2:6",
             "2:8", "3:5,5:2", "3:8,5:3", "3:4", "4:3")


def bit_reversed(n: int) -> list[int]:
    """Strata by their bit-reversed index (n=8: 0, 4, 2, 6, 1, 5, 3, 7): the least-noise stratum first."""
    bits = max(1, (n - 1).bit_length())
    return sorted(range(n), key=lambda j: int(format(j, f"0{bits}b")[::-1], 2))


def per_draw_errors(stream, concepts, include_noun: bool, draws: int, batch: int, split: str,
                    path: Path, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[draws, images, candidates] errors of the full evaluation (``dc_classification``'s, per draw) and each
    image's concept index; resumable per concept from ``path`` when it holds the same classification
    (``key``: which state; split, candidates, images, draws, batch)."""
    from conceptstream.evaluation.bench.scoring import dc_classification

    result = dc_classification(stream, concepts, include_noun, draws, batch, progress=True, split=split,
                               checkpoint=path, key=key, per_draw=True)
    rows = result["per_draw_errors"]
    truth = torch.cat([torch.full((r.shape[1],), i) for i, r in enumerate(rows)])
    return torch.cat(rows, dim=1), truth


def simulate(per_draw: torch.Tensor, schedule, order: list[int]) -> tuple[torch.Tensor, int]:
    """Predictions [images] of successive elimination over these per-draw errors (``DiffusionClassifier._eliminate``'s
    pruning, ``keep_best``, and its means, summed in stratum order: after ``n`` draws of ``order`` each image keeps
    its ``keep`` candidates of lowest mean error; the last survivors get every draw) and its UNet evaluations per
    image."""
    from conceptstream.scoring.dc import keep_best, mean_over_draws

    n, b, k_all = per_draw.shape
    alive = torch.arange(k_all).expand(b, k_all)
    evaluations, done = 0, 0
    for upto, keep in (*schedule, (n, None)):
        evaluations += alive.shape[1] * (upto - done)
        done = upto
        if keep is not None and keep < alive.shape[1]:
            alive = keep_best(mean_over_draws(per_draw[sorted(order[:upto])]), alive, keep)
    final = mean_over_draws(per_draw).gather(1, alive)
    return alive.gather(1, final.argmin(1, keepdim=True))[:, 0], evaluations


def main(argv: list[str] | None = None) -> dict:
    from dc_elimination import _where  # the same run name dc_elimination.py --choose-from checks against

    from conceptstream.api import open_stream
    from conceptstream.concepts.folder import read_sequence
    from conceptstream.scoring.dc import draw_order, elimination_schedule, mean_over_draws, parse_elimination
    from conceptstream.state.store import StateStore

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--state", required=True, help="a learned stream (e.g. a bench run's state folder)")
    p.add_argument("--data", required=True, help="the sequence folder it learned")
    p.add_argument("--split", default="val", choices=("test", "val"), help="the held-out views scored")
    p.add_argument("--draws", type=int, default=8, help="draws per image of the full evaluation")
    p.add_argument("--batch", type=int, default=4, help="images per UNet call (the bench's default)")
    p.add_argument("--errors", required=True, help="the per-draw errors file (.safetensors; made, or resumed)")
    p.add_argument("--schedule", action="append", default=None, help=f"DRAWS:KEEP,... (default: {SCHEDULES})")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="write the JSON table here too")
    args = p.parse_args(argv)

    stream = open_stream(args.state, device=args.device)
    concepts = read_sequence(args.data)[: len(stream.tokens)]
    t0 = time.perf_counter()
    key = f"{_where(args.state, 3)}@{StateStore(args.state).generation()}"
    per_draw, truth = per_draw_errors(stream, concepts, stream.method.include_noun, args.draws, args.batch,
                                      args.split, Path(args.errors), key)
    k_all = per_draw.shape[2]
    full = float((mean_over_draws(per_draw).argmin(1) == truth).float().mean())
    strata = [round(float((per_draw[j].argmin(1) == truth).float().mean()), 4) for j in range(args.draws)]
    print(f"{args.split}: {per_draw.shape[1]} images x {k_all} candidates x {args.draws} draws "
          f"({time.perf_counter() - t0:.0f}s); full accuracy {full:.3f}")
    print("one draw alone, stratum 0 (least noise) .. last: " + " ".join(f"{a:.3f}" for a in strata))
    orders = {"bit-reversed": bit_reversed(args.draws), "middle-out": draw_order(args.draws)}
    rows = []
    for text in args.schedule or SCHEDULES:
        schedule = elimination_schedule(parse_elimination(text), args.draws)
        for name, order in orders.items():
            pred, evaluations = simulate(per_draw, schedule, order)
            acc = float((pred == truth).float().mean())
            rows.append({"schedule": text, "order": name, "accuracy": round(acc, 4),
                         "accuracy_difference": round(acc - full, 4), "evaluations_per_image": evaluations,
                         "evaluations_ratio": round(k_all * args.draws / evaluations, 3)})
            print(f"  {text:>10} {name:>12}: accuracy {acc:.3f} ({acc - full:+.3f})  UNet evaluations per image "
                  f"{evaluations} (x{k_all * args.draws / evaluations:.2f} fewer)")
    doc = {"state": _where(args.state, 3), "split": args.split,
           "images": per_draw.shape[1], "candidates": k_all, "draws": args.draws,
           "full_accuracy": round(full, 4), "stratum_accuracy": strata, "orders": orders,
           "classifier_order": "middle-out", "rows": rows,
           "command": f"python benchmarks/dc_draws.py --state STATE --data DATA --split {args.split} "
                      f"--draws {args.draws} --errors FILE"}
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    return doc


if __name__ == "__main__":
    main()
