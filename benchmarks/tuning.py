"""The equal tuning budget of benchmark v2: every method gets the same small grid on the validation views.

Each method's grid is its learning rate (adapter ``lr``, or the token's ``token_lr`` for Textual
Inversion) at 3 values x its own main knob at 3 values (:data:`GRIDS`), run as one bench per method on
tabletop-6's **val** split with 2 seeds (``--split val --seeds 2``). The winner of a method is the grid
point with the lowest mean val ``A_MMD`` over the seeds (the criterion is fixed before any run; ties go
to the smaller learning rate, then the smaller knob). The test split is never read here.

    python benchmarks/tuning.py run --root bench/tuning [--methods lora,ewc-dc] [--model tiny]
    python benchmarks/tuning.py run --round token --root bench/tuning    # after the grids: the token's rate
    python benchmarks/tuning.py table --root bench/tuning --out benchmarks/results/tuning --docs docs/DEFAULTS.md

``run`` is resumable (each bench skips finished runs; rerun the same command). ``table`` reads every
finished tuning bench under ``--root``, writes ``tuning.json`` (every grid point with its per-seed and mean
val numbers, and the winner per method) and ``tuning.md`` (the table for docs/DEFAULTS.md), and prints the
winners. A method with no bench under ``--root`` keeps its points from an existing ``--out/tuning.json``, so
a campaign spread over machines or sessions whose work dirs are lost adds to the committed table.
The second round (``--round token``) evens out one axis: ``lora``'s knob is the token's rate (it has no
regulariser) and the grids of ``custom-diffusion`` and ``textual-inversion`` include it, while every other
method ran its grid at the token rate's default. Each of those others reruns its grid winner (read from the
committed ``tuning.json``) at :data:`TOKEN_RATES`, the other token rates of ``lora``'s grid; its final setting
is the best of the three points, by the same criterion. Changing a method's defaults to its winner is a
deliberate edit of ``methods/`` and ``docs/DEFAULTS.md``
that cites this table.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SEQUENCE = "tabletop-6"
SEEDS = 2
CRITERION = "A_MMD"  # lower is better; mean over the tuning seeds on the val split
# Score every seen concept only after the last of tabletop-6's 6 tasks (each earlier task scores its new
# concept only): A_MMD (the last row) and BwT (the diagonal) are the same, at about half the scoring time.
EVAL_EVERY = 6
COMMAND = ("python benchmarks/tuning.py run --root bench/tuning [--shard K/N]; the same with --round token; "
           "python benchmarks/tuning.py table --root bench/tuning --out benchmarks/results/tuning "
           "(or STAGES=tune [SHARDS=2] bash benchmarks/run_tabletop.sh)")


@dataclass(frozen=True)
class Grid:
    """One method's tuning grid: a learning rate x its own main knob, each at 3 values."""

    lr_key: str
    lr_values: tuple[float, ...]
    knob: str
    knob_values: tuple[Any, ...]
    steps: int | None = None  # the bench's --steps for this method (None: learn's default)
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def sweep(self) -> dict[str, list[Any]]:
        if self.knob == "steps":
            return {self.lr_key: list(self.lr_values)}
        return {self.lr_key: list(self.lr_values), self.knob: list(self.knob_values)}


LORA_LRS = (3e-4, 1e-3, 3e-3)
GRIDS: dict[str, Grid] = {
    "lora": Grid("lr", LORA_LRS, "token_lr", (2e-3, 5e-3, 2e-2), note="no regulariser: the token's rate is its knob"),
    "lora-ewc": Grid("lr", LORA_LRS, "ewc_lambda", (10.0, 100.0, 1000.0)),
    "c-lora": Grid("lr", (1e-3, 3e-3, 1e-2), "clora_lambda", (100.0, 1000.0, 10000.0)),
    "ewc-dc": Grid("lr", LORA_LRS, "ewc_lambda", (10.0, 100.0, 1000.0)),
    "dsc": Grid("lr", LORA_LRS, "dsc_iters", (10, 25, 100)),
    "dsc-ewc": Grid("lr", LORA_LRS, "dsc_iters", (10, 25, 100)),
    "dsc-ewc-dc": Grid("lr", LORA_LRS, "dsc_iters", (10, 25, 100)),
    "custom-diffusion": Grid("lr", (3e-5, 1e-4, 3e-4), "token_lr", (2e-3, 5e-3, 2e-2),
                             note="its lr is the cross-attention K/V rate; the token's rate is its knob"),
    "textual-inversion": Grid("token_lr", (2e-3, 5e-3, 2e-2), "steps", (200, 500, 1000),
                              note="only the token learns: more steps per task is its knob (one bench per value)"),
}


# The token round: the other token rates of lora's grid, and the one every grid without the token rate ran at
TOKEN_RATES = (2e-3, 2e-2)
GRID_TOKEN_LR = 5e-3
WINNERS = Path(__file__).resolve().parent / "results" / "tuning" / "tuning.json"


def token_round_methods() -> list[str]:
    """The methods whose grid does not tune the token's rate."""
    return [m for m, g in GRIDS.items() if "token_lr" not in (g.lr_key, g.knob)]


def token_jobs(root: Path, methods: Sequence[str], winners: Mapping[str, Mapping[str, Any]]
               ) -> list[tuple[Path, dict[str, Any]]]:
    """``(out folder, run_bench options)`` of the token round: each method's grid winner at :data:`TOKEN_RATES`."""
    jobs = []
    for m in methods:
        if m not in token_round_methods() or m not in winners:
            continue
        grid, best = GRIDS[m], winners[m]
        jobs.append((root / f"{m}-token", {**_options(m), "sweep": {"token_lr": list(TOKEN_RATES)},
                                           "hparams": {grid.lr_key: best[grid.lr_key], grid.knob: best[grid.knob]}}))
    return jobs


def _options(method: str) -> dict[str, Any]:
    """The run_bench options every tuning bench of ``method`` shares: tabletop-6 val, 2 seeds, its steps."""
    grid = GRIDS[method]
    return {"sequence": SEQUENCE, "split": "val", "seeds": SEEDS, "methods": [method], "eval_every": EVAL_EVERY,
            **({"steps": grid.steps} if grid.steps else {}), **grid.extra}


def complete_winners(path: Path) -> dict[str, dict[str, Any]]:
    """``{method: winner}`` of every complete grid in a tuning.json."""
    if not path.is_file():
        return {}
    return {m: e["winner"] for m, e in json.loads(path.read_text())["methods"].items() if e.get("complete")}


def complete_rounds(path: Path, round_: str) -> list[str]:
    """The methods whose ``round_`` ("grid" or "token") is complete in a tuning.json."""
    if not path.is_file():
        return []
    entries = json.loads(path.read_text())["methods"]
    if round_ == "grid":
        return [m for m, e in entries.items() if e.get("complete")]
    return [m for m, e in entries.items() if (e.get("token_round") or {}).get("complete")]


def bench_jobs(root: Path, methods: Sequence[str]) -> list[tuple[Path, dict[str, Any]]]:
    """``(out folder, run_bench options)`` of every tuning bench of ``methods``."""
    jobs = []
    for m in methods:
        grid = GRIDS[m]
        base = {**_options(m), "sweep": grid.sweep()}
        if m in token_round_methods():  # pinned: the method's default token rate moves to its token round's result
            base["hparams"] = {"token_lr": GRID_TOKEN_LR}
        if grid.knob == "steps":
            jobs += [(root / f"{m}-steps{v}", {**base, "steps": int(v)}) for v in grid.knob_values]
        else:
            jobs.append((root / m, base))
    return jobs


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def grid_points(doc: Mapping[str, Any], method: str) -> list[dict[str, Any]]:
    """Every finished grid point of ``method`` in one bench's results.json: its settings and val numbers."""
    if (doc.get("settings") or {}).get("split") != "val":
        raise ValueError(f"{method}: a tuning bench must be scored on the val split, this one was not")
    grid = GRIDS[method]
    steps = doc["settings"].get("steps")
    points = []
    for label, run in doc.get("runs", {}).items():
        if run.get("method") != method or not run.get("seeds"):
            continue
        seeds = run["seeds"]
        first = next(iter(seeds.values()))
        settings = first.get("config", {}).get("settings") or first.get("hparams") or {}
        per_seed = {k: r.get("summary", {}) for k, r in seeds.items()}
        point = {"method": method, "label": label, grid.lr_key: settings.get(grid.lr_key),
                 grid.knob: steps if grid.knob == "steps" else settings.get(grid.knob),
                 "token_lr": settings.get("token_lr"),
                 "seeds": sorted(int(k) for k in seeds), "per_seed": per_seed,
                 "model": doc["settings"].get("model"), "data_fingerprint": doc["settings"].get("data_fingerprint")}
        for key in (CRITERION, "plasticity_MMD", "BwT_MMD", "DC_acc", "DC_acc_own_class"):
            point[key] = _mean([s.get(key) for s in per_seed.values()])
        points.append(point)
    return points


def winner(points: Sequence[Mapping[str, Any]], method: str) -> Mapping[str, Any] | None:
    """The grid point with the lowest mean ``CRITERION`` (ties: smaller learning rate, then smaller knob)."""
    grid = GRIDS[method]
    scored = [p for p in points if p.get(CRITERION) is not None]
    if not scored:
        return None
    return min(scored, key=lambda p: (p[CRITERION], p[grid.lr_key], p[grid.knob]))


def collect(root: Path, suffix: str = "") -> dict[str, list[dict[str, Any]]]:
    """Every method's grid points from the tuning benches under ``root`` (``suffix="-token"``: the token round's)."""
    found: dict[str, list[dict[str, Any]]] = {}
    for method in GRIDS:
        outs = [out for out, _ in bench_jobs(root, [method])] if not suffix else [root / f"{method}{suffix}"]
        for out in outs:
            path = out / "results.json"
            if path.is_file():
                found.setdefault(method, []).extend(grid_points(json.loads(path.read_text()), method))
    return found


def all_seeds(points: Sequence[Mapping[str, Any]], count: int) -> bool:
    """Whether ``count`` grid points have finished, each on every tuning seed."""
    return len(points) == count and all(len(p["seeds"]) == SEEDS for p in points)


def token_round(grid_best: Mapping[str, Any], points: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The token round of one method: its grid winner (at the token rate the grid ran at) against its points at
    :data:`TOKEN_RATES`; ``final`` is the best of them by the same criterion."""
    first = {**grid_best, "token_lr": grid_best.get("token_lr") or GRID_TOKEN_LR}
    scored = [p for p in [first, *points] if p.get(CRITERION) is not None]
    return {"token_rates": list(TOKEN_RATES), "grid_winner": first, "points": list(points),
            "final": min(scored, key=lambda p: p[CRITERION]), "complete": all_seeds(points, len(TOKEN_RATES))}


def _row(method: str, p: Mapping[str, Any], settings: Sequence[str], bold: bool) -> str:
    """One Markdown row of a grid point: its settings, seed count and mean val numbers (bold: the chosen one)."""
    fmt = lambda v, nd: "n/a" if v is None else f"{v:.{nd}f}"  # noqa: E731
    cells = [f"`{method}`", *(f"{k}={p[k]}" for k in settings), str(len(p["seeds"])), fmt(p[CRITERION], 1),
             fmt(p["plasticity_MMD"], 1), fmt(p["BwT_MMD"], 1), fmt(p["DC_acc"], 3)]
    return "| " + " | ".join(f"**{c}**" if bold else c for c in cells) + " |"


def table(found: Mapping[str, list[Mapping[str, Any]]], token_found: Mapping[str, list[Mapping[str, Any]]] | None = None
          ) -> tuple[dict[str, Any], str]:
    """The tuning document and its Markdown tables (every grid point, the winner in bold; then the token round,
    its final setting in bold). A method's ``final`` is what its defaults must be: the grid winner's rate and
    knob, and the token round's token rate once that round is complete."""
    models = sorted({json.dumps(p.get("model"), sort_keys=True) for pts in found.values() for p in pts})
    doc: dict[str, Any] = {"sequence": SEQUENCE, "split": "val", "seeds_per_point": SEEDS,
                           "criterion": f"lowest mean val {CRITERION} over the seeds",
                           "models": [json.loads(m) for m in models], "command": COMMAND, "methods": {}}
    lines = [f"| method | {'learning rate'} | knob | seeds | val {CRITERION} ↓ | val plasticity ↓ | val BwT ↑ | "
             "val DC acc ↑ |", "|---|---|---|---|---|---|---|---|"]
    for method, points in found.items():
        grid, best = GRIDS[method], winner(points, method)
        doc["methods"][method] = {"grid": {grid.lr_key: list(grid.lr_values), grid.knob: list(grid.knob_values)},
                                  "note": grid.note, "points": list(points),
                                  "winner": {k: best[k] for k in (grid.lr_key, grid.knob, CRITERION)} if best else None,
                                  "complete": all_seeds(points, len(grid.lr_values) * len(grid.knob_values))}
        for p in sorted(points, key=lambda p: (p[grid.lr_key], p[grid.knob])):
            lines.append(_row(method, p, (grid.lr_key, grid.knob), bold=p is best))
        entry = doc["methods"][method]
        if entry["complete"] and best:
            entry["final"] = dict(entry["winner"])
    token_lines: list[str] = []
    for method, points in (token_found or {}).items():
        entry = doc["methods"].get(method)
        if not entry or not entry.get("final"):
            continue  # a token round needs its method's complete grid
        grid = GRIDS[method]
        entry["token_round"] = rnd = token_round(winner(found[method], method), points)
        if rnd["complete"]:
            entry["final"] = {k: rnd["final"][k] for k in (grid.lr_key, grid.knob, "token_lr", CRITERION)}
        for p in sorted([rnd["grid_winner"], *points], key=lambda p: p["token_lr"]):
            token_lines.append(_row(method, p, (grid.lr_key, grid.knob, "token_lr"),
                                    bold=rnd["complete"] and p is rnd["final"]))
    md = "\n".join(lines) + "\n"
    if token_lines:
        md += ("\nToken-rate round: each grid winner above (run at the token rate of its grid) against "
               f"token_lr {' and '.join(str(r) for r in TOKEN_RATES)}; the final setting in bold (once both ran).\n\n"
               f"| method | learning rate | knob | token rate | seeds | val {CRITERION} ↓ | val plasticity ↓ | "
               "val BwT ↑ | val DC acc ↑ |\n|---|---|---|---|---|---|---|---|---|\n" + "\n".join(token_lines) + "\n")
    return doc, md


DOCS_BEGIN = "<!-- tuning table: written by benchmarks/tuning.py table --docs -->\n"
DOCS_END = "<!-- end of the tuning table -->\n"


def with_table(doc_text: str, table_md: str) -> str:
    """``doc_text`` (docs/DEFAULTS.md) with the text between its tuning-table markers replaced by ``table_md``."""
    if doc_text.count(DOCS_BEGIN) != 1 or doc_text.count(DOCS_END) != 1:
        raise ValueError(f"the document needs one {DOCS_BEGIN.strip()} line and one {DOCS_END.strip()} line")
    head, rest = doc_text.split(DOCS_BEGIN)
    return head + DOCS_BEGIN + table_md + DOCS_END + rest.split(DOCS_END, 1)[1]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("run", "table"), help="run the tuning benches, or tabulate them")
    p.add_argument("--root", type=Path, required=True, help="folder of the tuning benches (one per method)")
    p.add_argument("--methods", default=None,
                   help="comma-separated methods (default: all; run: all but those whose round is complete in --winners)")
    p.add_argument("--model", default=None, help="base model ('tiny' or a diffusers folder)")
    p.add_argument("--out", type=Path, default=None, help="table: where to write tuning.json and tuning.md")
    p.add_argument("--docs", type=Path, default=None,
                   help="table: also write the table between the tuning-table markers of this file (docs/DEFAULTS.md)")
    p.add_argument("--round", choices=("grid", "token"), default="grid",
                   help="run: the grids, or the token-rate round at each complete grid's winner (read from --winners)")
    p.add_argument("--winners", type=Path, default=WINNERS,
                   help="run --round token: the tuning.json with the grid winners (default: the committed one)")
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="run: only every N-th tuning bench from the K-th (one bench per method, one per Textual "
                        "Inversion steps value), so N processes or machines share the grids; table reads them all")
    args = p.parse_args(argv)
    methods = [m.strip() for m in (args.methods or ",".join(GRIDS)).split(",") if m.strip()]
    unknown = [m for m in methods if m not in GRIDS]
    if unknown:
        p.error(f"no tuning grid for {', '.join(unknown)}; grids exist for: {', '.join(GRIDS)}")
    if args.action == "run":
        from conceptstream.errors import UserInputError
        from conceptstream.evaluation.bench import run_bench
        from conceptstream.evaluation.bench.settings import parse_shard

        if args.methods is None:  # resume a campaign whose work dir is lost from its committed table
            done = complete_rounds(args.winners, args.round)
            if done:
                print(f"[tuning] {args.round} round already complete in {args.winners} (not rerun; name them in "
                      f"--methods to rerun): {', '.join(done)}", flush=True)
            methods = [m for m in methods if m not in done]
        if args.round == "token":
            jobs = token_jobs(args.root, methods, complete_winners(args.winners))
            if not jobs:
                print(f"[tuning] no token round to run: no complete grid of {', '.join(token_round_methods())} "
                      f"in {args.winners}", flush=True)
        else:
            jobs = bench_jobs(args.root, methods)
        try:
            shard = parse_shard(args.shard)
        except UserInputError as exc:
            p.error(str(exc))
        if shard:  # round robin, not bench's contiguous blocks: the costly grids come in a row
            k, n = shard
            jobs = jobs[k - 1::n]
        for out, options in jobs:
            print(f"[tuning] {out}: {options['methods'][0]} sweep {options['sweep']}"
                  + (f" at {options['hparams']}" if "hparams" in options else "")
                  + (f", {options['steps']} steps" if "steps" in options else ""), flush=True)
            run_bench(out, model=args.model, **options)
        return 0
    found = {m: pts for m, pts in collect(args.root).items() if m in methods}
    token_found = {m: pts for m, pts in collect(args.root, "-token").items() if m in methods}
    previous = args.out / "tuning.json" if args.out else None
    if previous is not None and previous.is_file():  # a method tuned in an earlier session whose benches are gone
        entries = json.loads(previous.read_text())["methods"]
        kept = {m: e["points"] for m, e in entries.items() if m in methods and m not in found}
        kept_token = {m: e["token_round"]["points"] for m, e in entries.items()
                      if m in methods and m not in token_found and e.get("token_round")}
        if kept or kept_token:
            print(f"kept from {previous} (no benches under --root): {', '.join(sorted({*kept, *kept_token}))}")
        found = {m: found.get(m) or kept[m] for m in GRIDS if m in found or m in kept}
        token_found = {m: token_found.get(m) or kept_token[m] for m in GRIDS if m in token_found or m in kept_token}
    doc, md = table(found, token_found)
    print(md)
    for m, entry in doc["methods"].items():
        print(f"{m}: winner {entry['winner']}" + ("" if entry["complete"] else " (grid incomplete)")
              + (f"; final {entry['final']}" if entry.get("final") else ""))
    if args.out:
        from conceptstream.safeio import write_json_atomic

        args.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out / "tuning.json", doc)
        models = ", ".join(f"`{m['reference']}` (fingerprint {m['fingerprint']})" for m in doc["models"] if m)
        incomplete = [m for m, e in doc["methods"].items() if not e["complete"]]
        missing = [m for m in methods if m not in doc["methods"]]
        head = (f"Tuning grids on {SEQUENCE}'s **val** views, {SEEDS} seeds (0, 1) per point, base model {models}; "
                f"winner (bold) = {doc['criterion']}. Reproduce: {COMMAND}."
                + (f" Grids not yet complete: {', '.join(incomplete)}." if incomplete else "")
                + (f" Not started: {', '.join(missing)}." if missing else "") + "\n\n")
        (args.out / "tuning.md").write_text(head + md)
        if args.docs:
            args.docs.write_text(with_table(args.docs.read_text(), head + md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
