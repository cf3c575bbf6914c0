"""`conceptstream bench-speed`: time, memory and state size of every method, as ratios from ONE run.

Absolute seconds depend on the machine; ratios measured side by side in one run on one machine do
not (much). Four measurements:

1. **training** - wall time and peak memory of a task for each method relative to ``lora`` at the
   same steps, through the real :func:`conceptstream.api.learn` (load state, learn, commit).
   Each task runs in a fresh subprocess (full mode), so the peak resident set (``VmHWM``, reset
   after the imports) is that task's own; on CUDA ``torch.cuda.max_memory_allocated`` too.
   Task 1 has no history; task 2 is the first with regularisers/consolidation active.
2. **dc** - diffusion-classifier scoring throughput (image x candidate x timestep evaluations per
   second) of :meth:`DiffusionClassifier.errors` / :meth:`~DiffusionClassifier.eval_errors` with
   cached text embeddings, relative to a raw UNet forward at the same batch size (target >= 0.9).
3. **generate** - :meth:`ConceptStream.generate` with a learned LoRA / VeRA stream relative to the
   bare base pipeline (same prompt length, steps, seeds), with the adapter fused (the default;
   target <= 1.05) and unfused.
4. **state size** on disk after 1, 5 and 10 tasks for each method (short tasks: size does not
   depend on the number of steps).

Trials of the things compared are interleaved and medians reported, which cancels slow drift in
machine load; the load average is recorded, and a busy machine is flagged in ``caveats``.
Results: ``OUT/speed-<machine>.json`` (``-quick`` appended with ``--quick``) plus a Markdown table.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULTS_FORMAT = "conceptstream-speed"
FORMAT_VERSION = 1
NOUNS = ("mug", "teddy bear", "bowl", "duck", "chair", "lamp", "bottle", "car", "sofa", "plant", "clock", "cube")
GENERATE_TARGET = 1.05
DC_TARGET = 0.9
SPEED_PARTS = ("training", "dc", "generate", "size")


@dataclass
class SpeedSettings:
    """Everything that determines the numbers (recorded in the results)."""

    quick: bool = False
    methods: list[str] = field(default_factory=list)
    adapter: str = "lora"
    model: str = "tiny"
    device: str = "cpu"
    steps: int = 200  # training steps of each timed task (the CLI default)
    timed_tasks: int = 2
    images: int = 4  # training images per task
    method_hparams: dict[str, Any] = field(default_factory=dict)  # applied where a method has the setting
    size_tasks: list[int] = field(default_factory=lambda: [1, 5, 10])
    size_hparams: dict[str, Any] = field(default_factory=lambda: {"dsc_iters": 1, "fisher_passes": 1})
    isolation: str = "process-per-task"  # or "shared-process" (quick: imports are paid once)
    dc_images: int = 4
    dc_candidates: int = 6
    dc_timesteps: int = 8
    gen_images: int = 2
    gen_steps: int = 20
    gen_guidance: float = 5.0
    trials: int = 7
    threads: int | None = None

    @classmethod
    def make(cls, quick: bool = False, **overrides: Any) -> SpeedSettings:
        s = cls(quick=quick)
        if quick:
            s = cls(quick=True, steps=2, images=2, method_hparams={"dsc_iters": 2, "fisher_passes": 1},
                    size_tasks=[1, 2], isolation="shared-process", dc_images=2, dc_candidates=3, dc_timesteps=2,
                    gen_images=1, gen_steps=4, trials=3)
        for key, value in overrides.items():
            if value is not None:
                setattr(s, key, value)
        return s


# -- machine ------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict[str, Any]:
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info: dict[str, Any] = {
        "hostname": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
        "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(), "cpu_usable": usable,
        "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "memory_gb": _total_memory_gb(), "device": device, "loadavg_start": loadavg(),
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    return info


def _total_memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_clock() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine, CPU seconds of this process and its waited-for
    children); their difference over a run is the CPU time *other* processes took."""
    try:
        fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    t = os.times()
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"), t.user + t.system + t.children_user + t.children_system


def machine_name(info: dict[str, Any]) -> str:
    """A file-name-safe label: the GPU, or the CPU model and usable cores."""
    base = f"gpu-{info['gpu']}" if info.get("gpu") else f"cpu-{info['cpu_model']}-{info['cpu_usable']}c"
    return re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")[:80]


def versions() -> dict[str, str]:
    from conceptstream.engine import library_versions

    return {"python": platform.python_version(), **library_versions()}


# -- memory -------------------------------------------------------------------------------------
def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (``VmHWM``) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _status_kb(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float | None:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


def peak_rss_mb() -> float:
    """Peak RSS since the last :func:`reset_peak_rss` (``ru_maxrss`` where /proc is missing)."""
    kb = _status_kb("VmHWM")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if sys.platform == "darwin":
            kb //= 1024
    return kb / 1024


# -- timing helpers -----------------------------------------------------------------------------
def _sync(device: str) -> None:
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], Any]], trials: int, device: str, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each callable; trials are interleaved (order rotated) so drift hits all alike."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for trial in range(trials):
        order = names[trial % len(names):] + names[: trial % len(names)]
        for name in order:
            _sync(device)
            t0 = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {n: statistics.median(v) for n, v in times.items()}


def synthetic_images(n: int, seed: int, size: int = 64) -> list:
    """Deterministic blobby test images (speed does not depend on what they show)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        img = np.zeros((size, size, 3), np.float32) + rng.uniform(0.2, 0.8, 3)
        for _ in range(3):
            cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.25)
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
            img[mask] = rng.uniform(0, 1, 3)
        img += rng.normal(0, 0.03, img.shape)
        out.append(Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)))
    return out


def _token(i: int) -> str:
    return f"<speed-{i}>"


def _hparams_for(method: str, hparams: dict[str, Any]) -> dict[str, Any]:
    from conceptstream.methods.registry import get_method

    known = get_method(method).all_defaults()
    return {k: v for k, v in hparams.items() if k in known}


def _slug(label: str) -> str:
    return re.sub(r"[^\w.-]+", "_", label).strip("_")


def split_methods(text: str) -> list[str]:
    """``"lora,ewc-dc[dc_k=2,dc_batch=1]"`` -> ``["lora", "ewc-dc[dc_k=2,dc_batch=1]"]`` (commas inside [] kept)."""
    return [m.strip() for m in re.findall(r"[^,\[\]]+(?:\[[^\]]*\])?", text) if m.strip()]


def parse_variant(label: str) -> tuple[str, dict[str, Any]]:
    """``"ewc-dc[dc_k=2,dc_batch=1]"`` -> ``("ewc-dc", {"dc_k": 2, "dc_batch": 1})``; a plain name has no settings."""
    from conceptstream.errors import UserInputError
    from conceptstream.evaluation.bench import parse_value
    from conceptstream.methods.registry import get_method, method_names

    match = re.fullmatch(r"\s*([\w-]+)\s*(?:\[(.*)\])?\s*", label)
    if match is None or match.group(1) not in method_names():
        raise UserInputError(f"unknown method {label!r} in --methods; choose from: {', '.join(method_names())}, "
                             "optionally with settings, e.g. ewc-dc[dc_k=2,dc_batch=1]")
    method, hparams = match.group(1), {}
    known = get_method(method).all_defaults()
    for item in filter(str.strip, (match.group(2) or "").split(",")):
        key, _, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if key not in known or not value.strip():
            raise UserInputError(f"--methods {label!r}: {method} has no setting {key!r} or it has no value; "
                                 f"its settings: {', '.join(sorted(known))}")
        hparams[key] = parse_value(value)
    return method, hparams


# -- 1. training (worker side) ------------------------------------------------------------------
def _preimport() -> None:
    """Import what `learn` imports lazily, so no task pays for (or measures) library imports."""
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    from diffusers import StableDiffusionPipeline  # noqa: F401
    from peft.tuners.vera import VeraModel  # noqa: F401
    from tqdm.auto import tqdm  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401

    from conceptstream import api  # noqa: F401
    from conceptstream.methods.registry import method_names

    method_names()


def timed_task(state: str, method: str, task: int, s: dict[str, Any]) -> dict[str, Any]:
    """Learn task ``task`` (0-based) of ``method`` into ``state`` through the api; time + memory."""
    import torch

    from conceptstream import api
    from conceptstream.methods.registry import adapter_kind_for
    from conceptstream.state import StateStore

    images = synthetic_images(s["images"], seed=1000 + task)
    cuda = str(s["device"]).startswith("cuda") and torch.cuda.is_available()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    method, extra = parse_variant(method)  # before the clock: its lazy imports are not the task's cost
    hparams = {**_hparams_for(method, s["method_hparams"]), **extra}
    rss_before = rss_mb()
    reset_ok = reset_peak_rss()
    t0 = time.perf_counter()
    report = api.learn(state, images, token=_token(task), noun=NOUNS[task % len(NOUNS)], method=method,
                       model=s["model"], steps=s["steps"], seed=task, adapter=adapter_kind_for(method, s["adapter"]),
                       hparams=(hparams or None) if task == 0 else None,
                       device=s["device"], progress=False, checkpoint_every=0)
    _sync(s["device"])
    wall = time.perf_counter() - t0
    store = StateStore(state)
    out = {"task": task + 1, "wall_s": wall, "train_s": report.seconds, "rss_before_mb": rss_before,
           "peak_rss_mb": peak_rss_mb(), "peak_rss_is_task_only": reset_ok, "state_bytes": store.size_bytes(),
           "hyperparameters": store.read_manifest()["method"]["hyperparameters"]}
    if cuda:
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _worker_main(config_path: str) -> int:
    """Subprocess entry: run the (method, task) jobs listed in the config; write their results."""
    cfg = json.loads(Path(config_path).read_text())
    import torch

    if cfg["settings"].get("threads"):
        torch.set_num_threads(int(cfg["settings"]["threads"]))
    _preimport()
    results = []
    for job in cfg["jobs"]:
        r = timed_task(job["state"], job["method"], job["task"], cfg["settings"])
        results.append({"method": job["method"], **r, "torch_threads": torch.get_num_threads()})
    Path(cfg["out"]).write_text(json.dumps(results))
    return 0


def _run_worker(jobs: list[dict[str, Any]], s: SpeedSettings, workdir: Path, name: str) -> list[dict[str, Any]]:
    import conceptstream

    config = workdir / f"{name}.json"
    out = workdir / f"{name}.result.json"
    config.write_text(json.dumps({"jobs": jobs, "settings": asdict(s), "out": str(out)}))
    src = str(Path(conceptstream.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    proc = subprocess.run([sys.executable, "-m", "conceptstream.evaluation.speed", "--worker", str(config)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not out.is_file():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"speed worker {name} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(out.read_text())


def bench_training(s: SpeedSettings, workdir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    jobs = [{"method": m, "task": t, "state": str(workdir / f"time-{_slug(m)}")}
            for m in s.methods for t in range(s.timed_tasks)]
    if s.isolation == "shared-process":
        log(f"training: {len(jobs)} tasks in one worker process")
        rows = _run_worker(jobs, s, workdir, "train-all")
    else:
        rows = []
        for j, job in enumerate(jobs):
            log(f"training: {job['method']} task {job['task'] + 1} ({j + 1}/{len(jobs)}, fresh process)")
            rows += _run_worker([job], s, workdir, f"train-{_slug(job['method'])}-{job['task']}")
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


# -- 2. DC throughput ---------------------------------------------------------------------------
def bench_dc(stream, s: SpeedSettings) -> dict[str, Any]:
    """DiffusionClassifier.errors / eval_errors vs a raw UNet forward on the same (B*K) batch."""
    import torch

    from conceptstream.models.tokens import encode_prompts

    unet, dc, dev = stream.pipe.unet, stream.dc, stream.device
    b, k, n_t = s.dc_images, s.dc_candidates, s.dc_timesteps
    cfg = unet.config
    g = torch.Generator().manual_seed(0)
    shape = (b, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    latents = torch.randn(shape, generator=g).to(dev, unet.dtype)
    prompts = [f"a photo of a {NOUNS[i % len(NOUNS)]}" for i in range(k)]
    with torch.no_grad():  # cached candidate embeddings, as callers do for fixed prompts
        cond = encode_prompts(stream.pipe.tokenizer, stream.pipe.text_encoder, prompts, dev).to(unet.dtype)
    draws = [(torch.randint(0, dc.num_train_timesteps, (b,), generator=g).to(dev),
              torch.randn(shape, generator=g).to(dev, unet.dtype)) for _ in range(n_t)]
    raw_inputs = [(dc.noisy(latents, t, e).repeat_interleave(k, 0), t.repeat_interleave(k, 0),
                   cond.unsqueeze(0).expand(b, -1, -1, -1).reshape(b * k, *cond.shape[-2:]).contiguous())
                  for t, e in draws]
    dc_eval = dc.config.eval_timesteps
    dc.config.eval_timesteps = n_t

    @torch.no_grad()
    def raw():
        for x, t, h in raw_inputs:
            unet(x, t, h)

    @torch.no_grad()
    def errors():
        for t, e in draws:
            dc.errors(latents, cond, t, e)

    def eval_errors():
        dc.eval_errors(latents, cond, seed=0)

    unet.eval()
    try:
        med = interleaved({"raw": raw, "errors": errors, "eval_errors": eval_errors}, s.trials, str(dev))
    finally:
        dc.config.eval_timesteps = dc_eval
    evals = b * k * n_t
    out = {"images": b, "candidates": k, "timesteps": n_t, "unet_batch": b * k,
           "seconds": med, "evals_per_s": {n: evals / v for n, v in med.items()},
           "errors_ratio": med["raw"] / med["errors"], "eval_errors_ratio": med["raw"] / med["eval_errors"],
           "target": DC_TARGET}
    out["meets_target"] = min(out["errors_ratio"], out["eval_errors_ratio"]) >= DC_TARGET
    return out


# -- 3. generation overhead ---------------------------------------------------------------------
def bench_generate(base_pipe, streams: dict[str, Any], s: SpeedSettings) -> dict[str, Any]:
    """ConceptStream.generate (fused / unfused adapter) vs the bare base pipeline, same work."""
    import torch

    n, steps, guidance = s.gen_images, s.gen_steps, s.gen_guidance
    base_pipe.set_progress_bar_config(disable=True)

    def base():
        gens = [torch.Generator().manual_seed(i) for i in range(n)]
        base_pipe(["a photo of a mug"] * n, num_inference_steps=steps, guidance_scale=guidance, generator=gens)

    fns: dict[str, Callable[[], Any]] = {"base": base}
    for kind, stream in streams.items():
        prompt = f"a photo of a {stream.tokens[0]} mug"  # same padded length (77) as the base prompt
        for fuse in (True, False):
            fns[f"{kind}-{'fused' if fuse else 'unfused'}"] = (
                lambda st=stream, p=prompt, f=fuse: st.generate(p, n=n, seed=0, steps=steps, guidance=guidance,
                                                                progress=False, fuse=f))
    med = interleaved(fns, s.trials, s.device)
    out: dict[str, Any] = {"images": n, "steps": steps, "guidance": guidance, "base_s": med["base"],
                           "target": GENERATE_TARGET}
    for kind in streams:
        fused, unfused = med[f"{kind}-fused"], med[f"{kind}-unfused"]
        out[kind] = {"fused_s": fused, "unfused_s": unfused, "fused_ratio": fused / med["base"],
                     "unfused_ratio": unfused / med["base"]}
    out["meets_target"] = all(out[k]["fused_ratio"] <= GENERATE_TARGET for k in streams)
    return out


def _inference_streams(s: SpeedSettings) -> dict[str, Any]:
    """One learned single-concept stream per adapter kind (a few steps: sampling cost ignores values)."""
    from conceptstream.adapters.registry import AdapterSpec
    from conceptstream.engine import ConceptStream, StreamSettings

    streams = {}
    for kind in dict.fromkeys([s.adapter, "lora", "vera"]):
        spec = AdapterSpec(kind=kind, rank=4 if kind == "lora" else 64)
        stream = ConceptStream.new(s.model, StreamSettings(method="lora", adapter=spec), device=s.device)
        stream.learn(synthetic_images(2, seed=7), _token(0), "mug", steps=2, progress=False)
        streams[kind] = stream
    return streams


# -- 4. state size ------------------------------------------------------------------------------
def bench_state_size(s: SpeedSettings, workdir: Path, training: dict[str, Any], log: Callable[[str], None]):
    """Bytes of the committed state after N tasks; reuses the timed states where they reach N."""
    from conceptstream.adapters.registry import AdapterSpec
    from conceptstream.engine import ConceptStream, StreamSettings
    from conceptstream.methods.registry import adapter_kind_for
    from conceptstream.state import StateStore

    out: dict[str, Any] = {}
    need = max(s.size_tasks)
    for label in s.methods:
        method, extra = parse_variant(label)
        sizes: dict[str, int] = {}
        timed = training.get(label, {}).get("tasks", [])
        if need <= len(timed):
            sizes = {str(r["task"]): r["state_bytes"] for r in timed}
        else:
            log(f"state size: {label}, {need} short tasks")
            kind = adapter_kind_for(method, s.adapter)
            spec = AdapterSpec(kind=kind, rank=4 if kind == "lora" else 64)
            hp = {**_hparams_for(method, {**s.method_hparams, **s.size_hparams}), **extra}
            stream = ConceptStream.new(s.model, StreamSettings(method=method, adapter=spec, hparams=hp),
                                       device=s.device)
            store = StateStore(workdir / f"size-{_slug(label)}")
            for task in range(need):
                stream.learn(synthetic_images(2, seed=1000 + task), _token(task), NOUNS[task % len(NOUNS)],
                             steps=1, seed=task, progress=False)
                with store.lock():
                    store.commit(stream.manifest, stream.state_tensors())
                sizes[str(task + 1)] = StateStore(store.path).size_bytes()
            del stream
            gc.collect()
        out[label] = {str(n): sizes.get(str(n)) for n in s.size_tasks}
    ref = out.get("lora")
    if ref:
        for entry in out.values():
            entry["ratio_vs_lora"] = {n: (entry[str(n)] / ref[str(n)] if entry.get(str(n)) and ref.get(str(n))
                                          else None) for n in map(str, s.size_tasks)}
    return out


# -- driver -------------------------------------------------------------------------------------
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

    from conceptstream.errors import UserInputError
    from conceptstream.methods.registry import method_names

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
                                   "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                                   "machine": info, "versions": versions(),
                                   "settings": {**asdict(s), "model": model_ref}}
        results["parts"] = wanted
        results["training"] = bench_training(s, work, log) if "training" in wanted else {}
        if "dc" in wanted or "generate" in wanted:
            log("dc scoring throughput + generation overhead")
            from conceptstream.models.loading import load_pipeline

            streams = _inference_streams(s)
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
        path = Path(out) / f"speed-{name}{'-' + _slug(label) if label else ''}{'-quick' if quick else ''}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        tmp.replace(path)
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


# -- report -------------------------------------------------------------------------------------
def _f(x: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def _kib(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024:.1f}"


def format_table(results: dict[str, Any]) -> str:
    """Markdown tables of a bench-speed result."""
    s, m = results["settings"], results["machine"]
    gpu = f", {m['gpu']}" if m.get("gpu") else ""
    lines = [f"## bench-speed on {m.get('name', '?')}",
             "",
             f"{m['cpu_model']} ({m['cpu_usable']} usable cores, torch threads {m['torch_threads']}{gpu}); "
             f"device {s['device']}; model {s['model']}; adapter {s['adapter']}; {s['steps']} steps per task; "
             f"torch {results['versions'].get('torch')}, diffusers {results['versions'].get('diffusers')}, "
             f"peft {results['versions'].get('peft')}",
             ""]
    tr, size = results["training"], results["state_size"]
    t = s["timed_tasks"]
    gpu_col = any("peak_gpu_ratio" in e for e in tr.values())
    head = (["method"] + [f"task {i + 1} s" for i in range(t)] + [f"time x lora (task {t})", "peak RSS MB",
                                                                     "RSS x lora"]
            + (["peak GPU MB", "GPU x lora"] if gpu_col else []) + [f"state KiB @{n}" for n in s["size_tasks"]])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, e in tr.items():
        last = e["tasks"][-1] if e["tasks"] else {}
        row = [method] + [_f(r["wall_s"], "{:.1f}") for r in e["tasks"]]
        row += [_f(e.get("wall_ratio")), _f(last.get("peak_rss_mb"), "{:.0f}"), _f(e.get("peak_rss_ratio"))]
        if gpu_col:
            row += [_f(last.get("peak_gpu_mb"), "{:.0f}"), _f(e.get("peak_gpu_ratio"))]
        row += [_kib(size.get(method, {}).get(str(n))) for n in s["size_tasks"]]
        lines.append("| " + " | ".join(row) + " |")
    dc = results.get("dc")
    if dc is not None:
        lines += ["", f"DC scoring ({dc['images']} images x {dc['candidates']} candidates x {dc['timesteps']} "
                  f"timesteps, UNet batch {dc['unet_batch']}): raw UNet {dc['evals_per_s']['raw']:.1f} evals/s; "
                  f"DiffusionClassifier.errors {dc['errors_ratio']:.3f}x, eval_errors {dc['eval_errors_ratio']:.3f}x "
                  f"of raw (target >= {dc['target']})"]
    g = results.get("generate")
    if g is not None:
        parts = [f"{k}: fused {g[k]['fused_ratio']:.3f}x, unfused {g[k]['unfused_ratio']:.3f}x"
                 for k in g if isinstance(g[k], dict)]
        lines += ["", f"generate ({g['images']} images, {g['steps']} steps; base pipeline {g['base_s']:.2f}s): "
                  + "; ".join(parts) + f" (target fused <= {g['target']}x)"]
    if results.get("caveats"):
        lines += [""] + [f"> caveat: {c}" for c in results["caveats"]]
    return "\n".join(lines)


if __name__ == "__main__":  # worker entry (python -m conceptstream.evaluation.speed --worker CONFIG)
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(_worker_main(sys.argv[2]))
    sys.exit("usage: conceptstream bench-speed ... (this module's --worker entry is internal)")
