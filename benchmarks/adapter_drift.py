"""How far a method's shared adapter moves from task to task, read from the final states a bench keeps.

A diagnosis of the EWC methods: their tuned ``ewc_lambda`` (10-1000, all tied on val) may hold the shared
adapter where the first task left it, so that every later concept is learned by its token alone. The
states say it directly, without training anything:

- methods with DSC keep a pool of the adapter after every task (``pool.<i>.*``): the change of each task's
  adapter against the previous task's and against the first task's;
- the other EWC methods keep the anchor (the adapter after task N-1) beside the final adapter: the change
  during the last task;
- other methods keep neither, and are listed without numbers.

The change is measured on what a LoRA layer adds to its weight, ``dW = B @ A`` (summed over layers as one
vector): ``||dW_n - dW_m|| / ||dW_m||``. (A alone is a random initialisation that never moves much, so the
raw parameters' change would understate it.) Adapters other than LoRA are compared on their raw trainable
tensors.

    python benchmarks/adapter_drift.py bench/v2-tabletop-6-lora.shards/1 bench/v2-tabletop-6-lora.shards/2 \\
        --out benchmarks/results/adapter-drift-tabletop-6.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

_POOL = re.compile(r"pool\.(\d+)\.(.+)")
_LORA = re.compile(r"(.+)\.lora_([AB])\.[^.]+\.weight")


def weight_delta(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One vector of every LoRA layer's ``B @ A`` (other adapters: their tensors, flattened), by sorted name."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    rest = []
    for name in sorted(tensors):
        m = _LORA.fullmatch(name)
        if m:
            layers.setdefault(m.group(1), {})[m.group(2)] = tensors[name].double()
        else:
            rest.append(tensors[name].double().flatten())
    parts = [(ab["B"] @ ab["A"]).flatten() for _, ab in sorted(layers.items()) if set(ab) == {"A", "B"}]
    return torch.cat(parts + rest) if parts or rest else torch.zeros(0, dtype=torch.float64)


def relative_change(new: torch.Tensor, old: torch.Tensor) -> float | None:
    ref = float(old.norm())
    return float((new - old).norm()) / ref if ref > 0 else None


def state_drift(version: Path) -> dict:
    """The drift a run's final state records (see the module docstring); ``kind`` says which."""
    method = load_file(str(version / "method.safetensors")) if (version / "method.safetensors").exists() else {}
    pool: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in method.items():
        m = _POOL.fullmatch(name)
        if m:
            pool.setdefault(int(m.group(1)), {})[m.group(2)] = t
    if pool:
        snaps = [weight_delta(pool[i]) for i in sorted(pool)]
        return {"kind": "pool (adapter after every task)",
                "vs_previous": [None] + [relative_change(snaps[i], snaps[i - 1]) for i in range(1, len(snaps))],
                "vs_first": [None] + [relative_change(s, snaps[0]) for s in snaps[1:]]}
    anchor = {name[len("anchor."):]: t for name, t in method.items() if name.startswith("anchor.")}
    if anchor:
        adapter = load_file(str(version / "adapter.safetensors"))
        final = {n: adapter[n] for n in anchor if n in adapter}
        return {"kind": "anchor (adapter after task N-1) vs final adapter",
                "last_task": relative_change(weight_delta(final), weight_delta(anchor))}
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
            elif "last_task" in d:
                text = f"during the last task: {_fmt(d['last_task'])}"
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
