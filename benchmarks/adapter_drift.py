"""How far a DSC method's shared adapter moved from task to task, read from the final states a bench keeps.

Methods with DSC keep a pool of the adapter after every task (``pool.<i>.*`` in the method state); this
gives the change of each task's adapter against the previous task's and against the first task's, for
runs made before the bench recorded ``adapter_change`` per task (it does now, for every adapter method:
the report's "How far each task moved the shared adapter"). Other states keep no per-task snapshot (an
EWC state's anchor is re-set at the end of every task, so it equals the final adapter) and are listed
without numbers. The change is :func:`conceptstream.adapters.drift.weight_delta`'s (``dW = B @ A`` of
every LoRA layer, as one vector): ``||dW_n - dW_m|| / ||dW_m||``.

    python benchmarks/adapter_drift.py bench/v2-tabletop-6-lora.shards/1 bench/v2-tabletop-6-lora.shards/2 \\
        --out benchmarks/results/v2-tabletop-6-lora/adapter-drift.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from safetensors.torch import load_file

from conceptstream.adapters.drift import relative_change, weight_delta

_POOL = re.compile(r"pool\.(\d+)\.(.+)")


def state_drift(version: Path) -> dict:
    """The drift a run's final state records (see the module docstring); ``kind`` says which."""
    method = load_file(str(version / "method.safetensors")) if (version / "method.safetensors").exists() else {}
    pool: dict[int, dict] = {}
    for name, t in method.items():
        m = _POOL.fullmatch(name)
        if m:
            pool.setdefault(int(m.group(1)), {})[m.group(2)] = t
    if pool:
        snaps = [weight_delta(pool[i]) for i in sorted(pool)]
        return {"kind": "pool (adapter after every task)",
                "vs_previous": [None] + [relative_change(snaps[i], snaps[i - 1]) for i in range(1, len(snaps))],
                "vs_first": [None] + [relative_change(s, snaps[0]) for s in snaps[1:]]}
    return {"kind": "no per-task adapter snapshots in this state"}


def bench_drift(folders: list[Path]) -> dict[str, dict[str, dict]]:
    """label dir -> seed -> :func:`state_drift`, over every run with a kept state in the bench folders."""
    out: dict[str, dict[str, dict]] = {}
    for folder in folders:
        for current in sorted(folder.glob("runs/*/seed*/state/CURRENT")):
            run = current.parent.parent
            version = current.parent / current.read_text().strip()
            if version.is_dir():
                out.setdefault(run.parent.name, {})[run.name.removeprefix("seed")] = state_drift(version)
    return {k: dict(sorted(v.items())) for k, v in sorted(out.items())}


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", type=Path, nargs="+", help="bench --out folders (or their shard folders)")
    p.add_argument("--out", type=Path, help="write the numbers as JSON here")
    args = p.parse_args(argv)
    missing = [str(f) for f in args.folders if not (f / "runs").is_dir()]
    if missing:
        print(f"error: no runs/ folder in {', '.join(missing)}; pass bench --out folders", file=sys.stderr)
        return 2
    drift = bench_drift(args.folders)
    for label, seeds in drift.items():
        for seed, d in seeds.items():
            if "vs_first" in d:
                text = "vs task 1: " + " ".join(_fmt(x) for x in d["vs_first"][1:])
                text += " | vs previous: " + " ".join(_fmt(x) for x in d["vs_previous"][1:])
            else:
                text = d["kind"]
            print(f"{label} seed {seed}: {text}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        doc = {"measure": "||dW_n - dW_m|| / ||dW_m||, dW = B @ A of every LoRA layer as one vector",
               "command": "python benchmarks/adapter_drift.py " + " ".join(f.as_posix() for f in args.folders),
               "runs": drift}
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
