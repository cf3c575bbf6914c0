"""The bench-speed driver: run the chosen measurements in one process on one machine and write the results."""

from __future__ import annotations

import gc
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from conceptstream.errors import UserInputError
from conceptstream.evaluation.speed.dc import bench_dc
from conceptstream.evaluation.speed.generate import bench_generate, inference_streams
from conceptstream.evaluation.speed.settings import FORMAT_VERSION, RESULTS_FORMAT, SPEED_PARTS, SpeedSettings
from conceptstream.evaluation.speed.size import bench_state_size
from conceptstream.evaluation.speed.training import bench_training
from conceptstream.evaluation.variants import parse_variant, slug, split_methods
from conceptstream.system import cpu_clock, library_versions, loadavg, machine_info, machine_name, utc_now


def _snapshot_model(model: str, workdir: Path) -> str:
    """A private copy of the bundled model (it is re-exported while `world train-base` runs, which
    would change its fingerprint mid-run); other models are used in place."""
    from conceptstream.models.loading import BUNDLED, resolve_model

    ref = resolve_model(model)
    path = Path(ref)
    if str(model) != BUNDLED or not path.is_dir():
        return ref
    dst = workdir / "model"
    shutil.copytree(path, dst)
    return str(dst)


def run_speed(out: str | Path | None = "benchmarks/results", quick: bool = False, methods: str | Sequence[str] | None = None,
              adapter: str = "lora", model: str | None = None, device: str | None = None, steps: int | None = None,
              trials: int | None = None, threads: int | None = None, machine: str | None = None,
              workdir: str | Path | None = None, progress: bool = True, timed_tasks: int | None = None,
              parts: str | Sequence[str] | None = None, label: str | None = None) -> dict[str, Any]:
    """Run the measurements and write ``OUT/speed-<machine>[-<label>][-quick].json``; returns the results.

    ``methods`` may carry settings, ``ewc-dc[dc_k=2,dc_batch=1]``, to time a method's speed levers side by side;
    ``parts`` picks from training, dc, generate, size (default: all)."""
    import torch

    from conceptstream.adapters.registry import adapter_kinds
    from conceptstream.methods.registry import method_names

    if adapter not in adapter_kinds():
        raise UserInputError(f"--adapter must be one of {', '.join(adapter_kinds())}, got {adapter!r}")
    if threads:
        torch.set_num_threads(threads)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    names = method_names()
    chosen = split_methods(methods) if isinstance(methods, str) else list(methods or names)
    for m in chosen:
        parse_variant(m)  # one-line error for an unknown method or setting
    chosen = list(dict.fromkeys(chosen))
    wanted = [p.strip() for p in parts.split(",")] if isinstance(parts, str) else list(parts or SPEED_PARTS)
    bad = [p for p in wanted if p not in SPEED_PARTS]
    if bad or not wanted:
        raise UserInputError(f"--parts {','.join(wanted)!r}: choose from {', '.join(SPEED_PARTS)}")
    if "lora" not in chosen:
        chosen.insert(0, "lora")  # the reference of every ratio
    s = SpeedSettings.make(quick, methods=chosen, adapter=adapter, model=model or "tiny", device=device, steps=steps,
                           trials=trials, threads=threads, timed_tasks=timed_tasks)
    if s.steps < 1 or s.trials < 1 or s.timed_tasks < 1:
        raise UserInputError("--steps, --trials and --timed-tasks must be >= 1")

    t_start = time.time()

    def log(msg: str) -> None:
        if progress:
            print(f"[bench-speed {time.time() - t_start:5.0f}s] {msg}", file=sys.stderr, flush=True)

    info = machine_info(device)
    clock0 = cpu_clock()
    own_tmp = workdir is None
    work = Path(tempfile.mkdtemp(prefix="cs-speed-")) if own_tmp else Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        model_ref = s.model
        s.model = _snapshot_model(s.model, work)
        results: dict[str, Any] = {"format": RESULTS_FORMAT, "format_version": FORMAT_VERSION,
                                   "created_at": utc_now(), "machine": info, "versions": library_versions(),
                                   "settings": {**asdict(s), "model": model_ref}}
        results["parts"] = wanted
        results["training"] = bench_training(s, work, log) if "training" in wanted else {}
        if "dc" in wanted or "generate" in wanted:
            log("dc scoring throughput + generation overhead")
            from conceptstream.models.loading import load_pipeline

            streams = inference_streams(s)
            if "dc" in wanted:
                results["dc"] = bench_dc(streams[s.adapter], s)
            if "generate" in wanted:
                base = load_pipeline(s.model, device=device)
                results["generate"] = bench_generate(base, streams, s)
                del base
            del streams
            gc.collect()
        results["state_size"] = bench_state_size(s, work, results["training"], log) if "size" in wanted else {}
        log("done")
    finally:
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)
    info["loadavg_end"] = loadavg()
    results["wall_s"] = time.time() - t_start
    clock1 = cpu_clock()
    if clock0 and clock1:  # other processes' CPU use during the run, in cores (the load average counts ours)
        info["other_cpu_cores"] = round(max(0.0, (clock1[0] - clock0[0]) - (clock1[1] - clock0[1])) / results["wall_s"], 3)
    results["caveats"] = _caveats(results)
    name = machine or machine_name(info)
    results["machine"]["name"] = name
    if out is not None:
        from conceptstream.safeio import write_json_atomic

        path = Path(out) / f"speed-{name}{'-' + slug(label) if label else ''}{'-quick' if quick else ''}.json"
        write_json_atomic(path, results)
        results["path"] = str(path)
    return results


def _caveats(results: dict[str, Any]) -> list[str]:
    out = []
    info = results["machine"]
    cores = info.get("cpu_usable") or 1
    other = info.get("other_cpu_cores")
    if other is not None:
        if other >= 0.25:
            out.append(f"other processes used {other:.2f} of {cores} usable cores during the run: absolute times "
                       "are inflated and ratios noisy")
    elif (info.get("loadavg_start") or [0.0])[0] >= 0.5:  # no /proc/stat: the start load is all we know
        out.append(f"the machine was busy at the start (1-min load average {info['loadavg_start'][0]} on {cores} "
                   "usable cores): absolute times are inflated and ratios noisy")
    if results["settings"]["quick"]:
        out.append("--quick: tiny settings (a smoke test); the ratios are not meaningful measurements")
    if results["settings"]["isolation"] == "shared-process":
        out.append("tasks shared one process: peak RSS per task is the high-water mark since the task began "
                   "(memory freed earlier can be reused unseen)")
    return out
