"""Measurement 1, training: wall time and peak memory of each task, per method, relative to lora.

Each task runs in a fresh worker process (full mode), so its peak resident set (``VmHWM``, reset
after the imports) is that task's own; ``--quick`` runs every task in one shared worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from conceptstream.evaluation.speed.settings import SpeedSettings
from conceptstream.evaluation.variants import slug


def run_worker(jobs: list[dict[str, Any]], s: SpeedSettings, workdir: Path, name: str) -> list[dict[str, Any]]:
    """Run ``jobs`` in a worker process (:mod:`conceptstream.evaluation.speed.worker`); their result rows."""
    import conceptstream

    config = workdir / f"{name}.json"
    out = workdir / f"{name}.result.json"
    config.write_text(json.dumps({"jobs": jobs, "settings": asdict(s), "out": str(out)}))
    src = str(Path(conceptstream.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    proc = subprocess.run([sys.executable, "-m", "conceptstream.evaluation.speed.worker", "--worker", str(config)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not out.is_file():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"speed worker {name} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(out.read_text())


def bench_training(s: SpeedSettings, workdir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Per method: every timed task's row, and its ratios to lora's same task (headline: the last task)."""
    jobs = [{"method": m, "task": t, "state": str(workdir / f"time-{slug(m)}")}
            for m in s.methods for t in range(s.timed_tasks)]
    if s.isolation == "shared-process":
        log(f"training: {len(jobs)} tasks in one worker process")
        rows = run_worker(jobs, s, workdir, "train-all")
    else:
        rows = []
        for j, job in enumerate(jobs):
            log(f"training: {job['method']} task {job['task'] + 1} ({j + 1}/{len(jobs)}, fresh process)")
            rows += run_worker([job], s, workdir, f"train-{slug(job['method'])}-{job['task']}")
    per_method: dict[str, dict[str, Any]] = {m: {"tasks": [r for r in rows if r["method"] == m]} for m in s.methods}
    ref = per_method.get("lora")
    for entry in per_method.values():
        for r in entry["tasks"]:
            r.pop("method", None)
        if ref is None:
            continue
        ratios: dict[str, list[float | None]] = {"wall": [], "train": [], "peak_rss": [], "peak_gpu": []}
        for r, base in zip(entry["tasks"], ref["tasks"]):
            for key, col in (("wall", "wall_s"), ("train", "train_s"), ("peak_rss", "peak_rss_mb"),
                             ("peak_gpu", "peak_gpu_mb")):
                a, b = r.get(col), base.get(col)
                ratios[key].append(a / b if a is not None and b else None)
        entry["ratios_vs_lora"] = {k: v for k, v in ratios.items() if any(x is not None for x in v)}
        # headline: the last timed task (the first with history when timed_tasks >= 2)
        entry["wall_ratio"] = ratios["wall"][-1]
        entry["train_ratio"] = ratios["train"][-1]
        entry["peak_rss_ratio"] = ratios["peak_rss"][-1]
        if ratios["peak_gpu"] and ratios["peak_gpu"][-1] is not None:
            entry["peak_gpu_ratio"] = ratios["peak_gpu"][-1]
    return per_method
