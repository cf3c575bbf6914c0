"""`conceptstream bench`: the continual-personalization evaluation protocol, methods x seeds.

For every method variant and seed the bench learns the sequence's concepts one at a time into
``OUT/runs/<run>/seed<k>/state`` (through :func:`conceptstream.api.learn`, so each task is
committed atomically), and after every task ``n`` scores every concept ``i <= n`` learned so far:

1. generate ``G`` images of concept ``i`` with fixed seeds and fixed prompts
   (``"a photo of a <tok> NOUN"`` plus context prompts such as ``"... on grass"``);
2. compare their features with the features of concept ``i``'s held-out ``eval/`` images:
   kernel MMD x10^3, KID x10^3, image-image similarity and, with a CLIP extractor, text-image
   alignment (the prompt without the modifier token). These fill ``M[n][i]`` per metric.

After the last task the final model classifies the real held-out images of every concept with
diffusion-classifier scores among ``c_0`` (``"a photo of a NOUN"``) and all learned concepts
(DC accuracy), and draws a few multi-concept samples (two learned tokens in one prompt).

Everything lands in ``OUT/results.json`` (matrices, summaries per run, mean/std over seeds,
every setting, library versions, time and memory per task) and ``OUT/report.md`` (tables,
heatmaps, curves, image grids; see :mod:`conceptstream.evaluation.report`).

Resuming: a finished run has ``result.json`` (written atomically) and is skipped by a rerun. A
run in flight keeps ``progress.json`` (one entry per evaluated task) beside its state, so a rerun
continues from the last finished task; a crash loses at most the task in flight (less: a task
interrupted inside ``learn`` continues from its in-task checkpoint). Deleting a
run's ``result.json`` re-finalises it from its saved progress; deleting its folder recomputes it.
A run folder made with other settings (steps, model, data, ...) is refused rather than mixed in.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import itertools
import json
import math
import platform
import re
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from conceptstream.errors import StateError, UserInputError
from conceptstream.methods.registry import adapter_kind_for, fixed_adapter

RESULTS_FORMAT = "conceptstream-bench"
FORMAT_VERSION = 1

DEFAULT_METHODS = ("lora", "lora-ewc", "c-lora", "ewc-dc", "dsc", "dsc-ewc-dc", "custom-diffusion",
                   "textual-inversion")
# Backgrounds of the tabletop world; they read naturally for any object photo.
DEFAULT_CONTEXTS = ("on grass", "on a wooden table")

METRICS: dict[str, dict[str, Any]] = {
    "MMD": {"higher_is_better": False, "scale": 1e3,
            "description": "unbiased polynomial-kernel MMD^2 between features of generated and held-out real "
                           "images, x10^3 (lower is better)"},
    "KID": {"higher_is_better": False, "scale": 1e3,
            "description": "KID: the same estimator averaged over 100 random subsets whose size is clamped to "
                           "the smaller set, x10^3 (lower is better)"},
    "I2I": {"higher_is_better": True, "scale": 1.0,
            "description": "image-image similarity: mean cosine over every (generated, real) feature pair "
                           "(CLIP I2I with clip: features; higher is better)"},
    "T2I": {"higher_is_better": True, "scale": 1.0,
            "description": "text-image alignment: mean cosine of each generated image with its prompt without "
                           "the modifier token; needs a CLIP extractor (higher is better)"},
}

# What --quick changes (CI-sized); explicit options still win.
QUICK = {"max_concepts": 2, "steps": 3, "images_per_prompt": 2, "contexts": (), "seeds": 1, "ddim_steps": 4,
         "train_views": 3, "eval_views": 3, "dc_eval_timesteps": 2, "multi_pairs": 1}
# Method settings --quick lowers where a method has them (the DSC phase is otherwise 100 iterations).
QUICK_HPARAMS = {"dsc_iters": 2}
FULL = {"max_concepts": None, "steps": None, "images_per_prompt": 4, "contexts": DEFAULT_CONTEXTS, "seeds": 3,
        "ddim_steps": 30, "train_views": 12, "eval_views": 12, "dc_eval_timesteps": 8, "multi_pairs": 2}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------ variants / sweeps


def parse_value(text: str) -> Any:
    """A setting's value from the command line: JSON when it parses (numbers, booleans, lists), else the string."""
    text = text.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_sweep(text: str) -> tuple[str, list[Any]]:
    """``"ewc_lambda=1,10,100"`` -> ``("ewc_lambda", [1, 10, 100])`` (values parsed as JSON when they can be)."""
    if "=" not in text:
        raise UserInputError(f"--sweep takes KEY=V1,V2,..., got {text!r} (e.g. --sweep ewc_lambda=1,10,100)")
    key, values = text.split("=", 1)
    key = key.strip().replace("-", "_")
    items = [v for v in values.split(",") if v.strip()]
    if not key or not items:
        raise UserInputError(f"--sweep {text!r}: give a setting name and at least one value, e.g. ewc_lambda=1,10")
    return key, [parse_value(v) for v in items]


def _format_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


@dataclass(frozen=True)
class Variant:
    """One row of the results: a method, its adapter and the swept settings it runs with."""

    method: str
    adapter: str | None  # None for methods without an adapter (Custom Diffusion, Textual Inversion)
    hparams: tuple[tuple[str, Any], ...] = ()

    @property
    def sweep_suffix(self) -> str:
        return "[" + ",".join(f"{k}={_format_value(v)}" for k, v in self.hparams) + "]" if self.hparams else ""

    @property
    def label(self) -> str:
        """``ewc-dc``, ``ewc-dc[ewc_lambda=10]``; VeRA runs read ``ewc-dc-vera`` (LoRA is the default)."""
        adapter = f"-{self.adapter}" if self.adapter not in (None, "lora") else ""
        return f"{self.method}{adapter}{self.sweep_suffix}"

    @property
    def dirname(self) -> str:
        """``<method>[-<adapter>][_key=value...]`` with file-name-safe characters only."""
        name = self.method + (f"-{self.adapter}" if self.adapter else "")
        for k, v in self.hparams:
            name += f"_{k}={_format_value(v)}"
        return re.sub(r"[^A-Za-z0-9._=+-]", "-", name)


def expand_variants(methods: Sequence[str], adapter: str = "lora",
                    sweep: Mapping[str, Sequence[Any]] | None = None) -> list[Variant]:
    """Methods x sweep values. A swept key applies to the methods that have that setting; the other
    methods run once with their defaults. Several keys form a grid (every combination)."""
    from conceptstream.methods.registry import get_method

    sweep = dict(sweep or {})
    seen: list[str] = []
    for m in methods:
        m = m.strip()
        if m and m not in seen:
            seen.append(m)
    if not seen:
        raise UserInputError("--methods is empty; give at least one method, e.g. --methods lora,ewc-dc")
    used: set[str] = set()
    variants: list[Variant] = []
    for m in seen:
        cls = get_method(m)
        kind = adapter_kind_for(m, adapter) if cls.uses_adapter else None
        keys = [k for k in sweep if k in cls.all_defaults()]
        used.update(keys)
        if not keys:
            variants.append(Variant(m, kind))
            continue
        for combo in itertools.product(*(sweep[k] for k in keys)):
            variants.append(Variant(m, kind, tuple(zip(keys, combo))))
    unused = [k for k in sweep if k not in used]
    if unused:
        raise UserInputError(f"--sweep {unused[0]}: none of the methods {', '.join(seen)} has that setting")
    return variants


# ------------------------------------------------------------------------------ data


@dataclass
class BenchData:
    """The concepts of the bench and where they came from."""

    concepts: list  # ConceptFolder
    source: str
    named: bool
    fingerprint: str
    root: Path


def _folder_fingerprint(concepts) -> str:
    h = hashlib.sha256()
    for c in concepts:
        h.update(f"{c.name}|{c.token}|{c.noun}".encode())
        for split, paths in (("train", c.train_images()), ("eval", c.eval_images())):
            for p in paths:
                h.update(f"{split}/{p.name}:{p.stat().st_size}".encode())
    return h.hexdigest()[:16]


def prepare_data(sequence: str | Path, out: Path, train_views: int, eval_views: int,
                 max_concepts: int | None = None, progress: bool = True, log: Callable[[str], None] = print
                 ) -> BenchData:
    """A named world sequence (rendered once into ``out/data``) or a user's sequence folder."""
    from conceptstream.safeio import write_json_atomic
    from conceptstream.world import catalogue
    from conceptstream.world.folders import export_sequence, read_sequence

    text = str(sequence)
    path = Path(text).expanduser()
    if text in catalogue.SEQUENCES:
        world = list(catalogue.get_sequence(text))[: max_concepts or None]
        root = out / "data" / f"{text}-{len(world)}c-train{train_views}-eval{eval_views}"
        marker = root / "bench-data.json"
        want = {"sequence": text, "concepts": [c.name for c in world], "train_views": train_views,
                "eval_views": eval_views, "seed": 0}
        done = marker.is_file() and json.loads(marker.read_text()) == want
        if not done:
            if root.exists():
                shutil.rmtree(root)
            log(f"[bench] rendering {len(world)} concepts of {text} into {root}")
            export_sequence(world, root, train_views, eval_views, seed=0, progress=progress)
            write_json_atomic(marker, want)
        concepts = read_sequence(root)
        named = True
    elif path.is_dir():
        concepts = read_sequence(path)[: max_concepts or None]
        root = path
        named = False
    else:
        raise UserInputError(f"--sequence {text!r} is neither a named sequence ({', '.join(catalogue.SEQUENCES)}) "
                             "nor a sequence folder with a sequence.json")
    for c in concepts:
        n_eval = len(c.eval_images())
        if n_eval < 2:
            raise UserInputError(f"concept {c.name} has {n_eval} held-out image(s) in {c.eval_dir}; the bench "
                                 "compares generated images with at least 2 held-out real images per concept")
        if not c.train_images():
            raise UserInputError(f"concept {c.name} has no training images in {c.train_dir}")
    return BenchData(concepts, text, named, _folder_fingerprint(concepts), root)


# ------------------------------------------------------------------------------ settings


@dataclass
class BenchSettings:
    """Everything that defines a bench (recorded in results.json)."""

    out: Path
    sequence: str
    methods: list[str]
    adapter: str
    seeds: list[int]
    steps: int
    quick: bool
    sweep: dict[str, list[Any]]
    hparams: dict[str, Any]  # fixed settings, applied to every method that has them
    features: Any  # spec string or a FeatureExtractor
    model: str
    device: str | None
    rank: int | None
    targets: str | None
    images_per_prompt: int
    contexts: tuple[str, ...]
    ddim_steps: int
    guidance: float
    gen_seed: int
    train_views: int
    eval_views: int
    max_concepts: int | None
    dc_eval_timesteps: int
    dc_batch_size: int
    multi_pairs: int
    eval_every: int  # full matrix rows after every K-th task (and the last); the new concept after every task
    keep_going: bool
    progress: bool
    extra: dict = field(default_factory=dict)


def _resolve(value, key: str, quick: bool):
    if value is not None:
        return value
    return (QUICK if quick else FULL)[key]


def library_versions() -> dict[str, str]:
    from importlib import metadata

    from conceptstream.engine import library_versions as core

    out = dict(core())
    for name in ("numpy", "pillow", "torchmetrics", "matplotlib", "safetensors", "efficientnet-lite-pytorch"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    out["python"] = platform.python_version()
    out["platform"] = platform.platform()
    return out


def memory_usage() -> dict[str, float | None]:
    """Peak RSS of this process so far (``getrusage``) and current RSS, in MiB; CUDA peak when on GPU."""
    peak = rss = None
    try:
        import resource

        raw = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = raw / (1 << 20) if sys.platform == "darwin" else raw / 1024  # bytes on macOS, KiB on Linux
    except (ImportError, OSError):
        pass
    try:
        import psutil

        rss = psutil.Process().memory_info().rss / (1 << 20)
    except Exception:  # psutil is optional
        try:
            import os

            with open("/proc/self/statm") as fh:
                rss = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)
        except (OSError, ValueError, IndexError):
            pass
    out: dict[str, float | None] = {"peak_rss_mib": _round(peak), "rss_mib": _round(rss)}
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["cuda_peak_mib"] = _round(torch.cuda.max_memory_allocated() / (1 << 20))
    except Exception:
        pass
    return out


def _round(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(float(x), nd)


def clean_json(obj: Any) -> Any:
    """NaN/inf -> None, tuples -> lists, tensors/numpy scalars -> Python numbers (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return clean_json(obj.item())
    return str(obj)


# ------------------------------------------------------------------------------ evaluation pieces


class Evaluator:
    """Scores one stream (the model after some task) against held-out images; caches real features."""

    def __init__(self, settings: BenchSettings, data: BenchData, extractor) -> None:
        from conceptstream.evaluation.metrics import TextImageAlignment

        self.s = settings
        self.data = data
        self.extractor = extractor
        self._real: dict[int, Any] = {}
        probe = TextImageAlignment(extractor)
        self.t2i_available = probe.available
        self.t2i_reason = probe.unavailable_reason

    def real_features(self, i: int):
        from conceptstream.data import load_image

        if i not in self._real:
            images = [load_image(p) for p in self.data.concepts[i].eval_images()]
            self._real[i] = self.extractor(images)
        return self._real[i]

    @staticmethod
    def concept_prompt(concept, include_noun: bool) -> str:
        return f"a photo of a {concept.token} {concept.noun}" if include_noun else f"a photo of a {concept.token}"

    def prompts(self, concept, include_noun: bool) -> list[tuple[str, str]]:
        """(generation prompt, the same without the modifier token for T2I) for every prompt of a concept."""
        base = self.concept_prompt(concept, include_noun)
        plain = f"a photo of a {concept.noun}"
        out = [(base, plain)]
        out += [(f"{base} {ctx}", f"{plain} {ctx}") for ctx in self.s.contexts]
        return out

    def score_concept(self, stream, i: int, include_noun: bool):
        """Generate concept ``i``'s images and compute every metric. Returns (scores, images of prompt 0)."""
        from conceptstream.evaluation.metrics import KID, ImageImageSimilarity, KernelMMD, TextImageAlignment

        concept = self.data.concepts[i]
        images, t2i_prompts, first = [], [], []
        for p, (prompt, plain) in enumerate(self.prompts(concept, include_noun)):
            imgs = stream.generate(prompt, n=self.s.images_per_prompt, seed=self.s.gen_seed + 1000 * p,
                                   steps=self.s.ddim_steps, guidance=self.s.guidance, progress=False)
            images += imgs
            t2i_prompts += [plain] * len(imgs)
            if p == 0:
                first = imgs
        fake = self.extractor(images)
        real = self.real_features(i)
        scores: dict[str, float | None] = {}
        for name, metric in (("MMD", KernelMMD()), ("KID", KID(subsets=100, scale=METRICS["KID"]["scale"])),
                             ("I2I", ImageImageSimilarity())):
            metric.update(real, real=True)
            metric.update(fake, real=False)
            value = metric.compute()
            scores[name] = float(value[0] if isinstance(value, tuple) else value)
        if self.t2i_available:
            t2i = TextImageAlignment(self.extractor)
            t2i.update(fake, t2i_prompts)
            res = t2i.compute()
            scores["T2I"] = res.get("value") if res.get("available") else None
        else:
            scores["T2I"] = None
        return scores, first

    def dc_accuracy(self, stream, include_noun: bool) -> dict[str, Any]:
        """DC classification of every concept's real held-out images among c_0 + all learned concepts."""
        return dc_classification(stream, self.data.concepts, include_noun, self.s.dc_eval_timesteps,
                                 self.s.dc_batch_size, progress=self.s.progress)


def dc_classification(stream, concepts: Sequence, include_noun: bool, eval_timesteps: int,
                      batch_size: int, progress: bool = False) -> dict[str, Any]:
    """Classify each concept's held-out images among c_0 + all ``concepts`` with ``stream``'s DC,
    averaging ``eval_timesteps`` draws per image: accuracy, per-concept accuracy, confusion, and the
    calibration of the DC posterior at the stream's temperature."""
    import torch

    from conceptstream.data import load_images
    from conceptstream.evaluation.metrics import DCAccuracy, DCCalibration
    from conceptstream.methods.base import TaskContext
    from conceptstream.models.tokens import encode_prompts
    from conceptstream.scoring.dc import DCConfig, DiffusionClassifier

    pipe = stream.pipe
    cfg = DCConfig(**{**asdict(stream.settings.dc), "eval_timesteps": eval_timesteps})
    dc = DiffusionClassifier(pipe.unet, pipe.scheduler, cfg)

    @torch.no_grad()
    def encode(prompts: list[str]) -> torch.Tensor:
        return encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts, stream.device)

    concept_embeds = encode([Evaluator.concept_prompt(c, include_noun) for c in concepts])
    total = DCAccuracy()
    calibration = DCCalibration(num_candidates=len(concepts) + 1)
    per_concept, confusion = [], []
    # one bar step per concept: on tabletop-50 this is 600 images x 51 candidates, minutes of silence otherwise
    for i, c in enumerate(_tqdm(concepts, desc="DC classification", disable=not progress)):
        cond = torch.cat([encode([TaskContext.class_prompt(c.noun)]), concept_embeds])  # [1 + N, L, D]
        latents, _ = stream.encode_images(load_images(c.eval_images(), stream.resolution))
        errors = dc.eval_errors_batched(latents.to(stream.device), cond, seed=0, batch_size=batch_size).cpu()
        preds = errors.argmin(-1)
        target = i + 1
        total.update(preds, target)
        calibration.update(dc.log_probs(errors), target)
        per_concept.append(float((preds == target).float().mean()))
        confusion.append(torch.bincount(preds, minlength=len(concepts) + 1).tolist())
    cal = calibration.compute()
    return {"accuracy": float(total.compute()), "per_concept": per_concept, "confusion": confusion,
            "calibration": {**cal, "best_temperature": cfg.temperature / cal["best_logit_scale"]},
            "candidates": ["c_0 (a photo of a NOUN)"] + [c.token for c in concepts],
            "images": [len(c.eval_images()) for c in concepts],
            "eval_timesteps": eval_timesteps, "dc": asdict(cfg)}


def hstack(images: Sequence) -> Any:
    """Images side by side, no padding (tile k is the box ``(k*w, 0, (k+1)*w, h)``)."""
    from PIL import Image

    w, h = images[0].size
    strip = Image.new("RGB", (w * len(images), h))
    for k, im in enumerate(images):
        strip.paste(im.convert("RGB").resize((w, h)), (k * w, 0))
    return strip


# ------------------------------------------------------------------------------ one run


def _diff_keys(a: Mapping, b: Mapping) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _learn_seed(seed: int, task: int) -> int:
    return 1000 * seed + task


def _matrix_from_rows(rows: list[list[float | None]], n_tasks: int):
    from conceptstream.evaluation.matrices import ContinualMatrix

    m = ContinualMatrix(n_tasks)
    for n, row in enumerate(rows):
        for i, v in enumerate(row):
            if v is not None:
                m.set(n, i, v)
    return m


def run_summary(matrices: Mapping[str, Any], dc_acc: float | None, tasks: list[dict],
                dc_ece: float | None = None) -> dict[str, float | None]:
    """The headline numbers of one run (the keys of results.json's ``summary``)."""
    mmd = matrices["MMD"].summary(higher_is_better=False)
    out = {"A_MMD": mmd["final_average"], "BwT_MMD": mmd["backward_transfer"],
           "forgetting_MMD": mmd["forgetting"], "plasticity_MMD": mmd["plasticity"],
           "KID": matrices["KID"].summary(False)["final_average"],
           "I2I": matrices["I2I"].summary(True)["final_average"],
           "T2I": matrices["T2I"].summary(True)["final_average"] if matrices.get("T2I") is not None else None,
           "DC_acc": dc_acc, "DC_ECE": dc_ece,
           "learn_seconds": sum(t.get("learn_seconds") or 0.0 for t in tasks)}
    return clean_json(out)


class BenchRun:
    """One (variant, seed): learn the whole sequence, evaluating after every task; resumable."""

    def __init__(self, bench: Bench, variant: Variant, seed: int) -> None:
        self.bench = bench
        self.variant = variant
        self.seed = seed
        self.dir = bench.s.out / "runs" / variant.dirname / f"seed{seed}"
        self.state = self.dir / "state"
        self.progress_path = self.dir / "progress.json"
        self.result_path = self.dir / "result.json"

    @property
    def name(self) -> str:
        return f"{self.variant.label} seed {self.seed}"

    def rel(self, path: Path) -> str:
        return path.relative_to(self.bench.s.out).as_posix()

    def config(self) -> dict[str, Any]:
        """What determines this run's numbers; a saved run with a different config is refused."""
        b, s = self.bench, self.bench.s
        return clean_json({
            "method": self.variant.method, "adapter": self.variant.adapter, "rank": s.rank, "targets": s.targets,
            "hparams": self.hparams(), "settings": self.effective_hparams(), "steps": s.steps, "seed": self.seed,
            "learn_seeds": "1000 * seed + task index",
            "model": b.model_info["fingerprint"], "data": {"tokens": [c.token for c in b.data.concepts],
                                            "fingerprint": b.data.fingerprint},
            "generation": b.generation_settings(), "features": b.extractor.name,
            "dc_eval_timesteps": s.dc_eval_timesteps, "multi_pairs": s.multi_pairs,
            **({"eval_every": s.eval_every} if s.eval_every != 1 else {}),  # absent at 1: older runs stay valid
        })

    def hparams(self) -> dict[str, Any]:
        """Method settings passed to learn: the bench's fixed ones this method has, then the swept ones."""
        from conceptstream.methods.registry import get_method

        known = get_method(self.variant.method).all_defaults()
        return {**{k: v for k, v in self.bench.s.hparams.items() if k in known}, **dict(self.variant.hparams)}

    def effective_hparams(self) -> dict[str, Any]:
        """Every method setting the run uses, defaults included: a saved run made under other defaults
        (the library's defaults changed since) is refused rather than silently reused."""
        from conceptstream.methods.registry import method_defaults

        return {**method_defaults(self.variant.method, self.variant.adapter), **self.hparams()}

    def finished(self) -> dict[str, Any] | None:
        if not self.result_path.is_file():
            return None
        result = json.loads(self.result_path.read_text())
        self._check_config(result.get("config", {}), self.result_path)
        return result

    def _check_config(self, saved: Mapping, where: Path) -> None:
        want = self.config()
        if saved != want:
            keys = _diff_keys(saved, want)
            raise StateError(f"{where} was made with other settings ({', '.join(keys)} differ); use another "
                             f"--out, or delete {where.parent} to recompute that run")

    def _save_progress(self, progress: dict) -> None:
        from conceptstream.safeio import write_json_atomic

        write_json_atomic(self.progress_path, clean_json(progress))

    def run(self, index: int, total: int) -> dict[str, Any]:
        from conceptstream import api
        from conceptstream.methods.registry import get_method
        from conceptstream.safeio import write_json_atomic
        from conceptstream.state import StateStore

        b, s, log = self.bench, self.bench.s, self.bench.log
        concepts = b.data.concepts
        n_tasks = len(concepts)
        include_noun = get_method(self.variant.method).include_noun
        if self.progress_path.is_file():
            progress = json.loads(self.progress_path.read_text())
            self._check_config(progress.get("config", {}), self.progress_path)
        else:
            progress = {"config": self.config(), "started_at": _now(), "tasks": [], "pending": None}
            self._save_progress(progress)
        store = StateStore(self.state)
        learned = [c["token"] for c in store.read_manifest()["concepts"]] if store.exists() else []
        if learned != [c.token for c in concepts[: len(learned)]]:
            raise StateError(f"{self.state} holds concepts {learned} that do not match the sequence; delete "
                             f"{self.dir} to recompute this run")
        done = len(progress["tasks"])
        if len(learned) > done + 1 or len(learned) < done:
            raise StateError(f"{self.state} has {len(learned)} concepts but {done} evaluated tasks were recorded; "
                             f"delete {self.dir} to recompute this run")
        prefix = f"[bench {index}/{total}] {self.name}"
        if done:
            log(f"{prefix}: resuming after task {done}/{n_tasks}")
        t_run = time.time()
        for n in range(done, n_tasks):
            c = concepts[n]
            if n >= len(learned):
                first = n == 0
                t0 = time.time()
                report = api.learn(self.state, c.path, method=self.variant.method, model=s.model, steps=s.steps,
                                   seed=_learn_seed(self.seed, n), adapter=self.variant.adapter if first else None,
                                   rank=s.rank if first else None, targets=s.targets if first else None,
                                   hparams=(self.hparams() or None) if first else None,
                                   device=s.device, progress=s.progress, **self._checkpoint_action(n, prefix))
                logs_path = self.dir / "logs" / f"task{n:03d}.json"
                write_json_atomic(logs_path, clean_json(report.logs))
                progress["pending"] = {"task": n, "learn_seconds": round(time.time() - t0, 3),
                                       "final_loss": report.final_loss, "steps": report.steps,
                                       "logs": self.rel(logs_path), "memory_after_learn": memory_usage()}
                self._save_progress(progress)
                log(f"{prefix}: task {n + 1}/{n_tasks} learned {c.token} ({c.noun}) in {time.time() - t0:.1f}s, "
                    f"final loss {report.final_loss:.4f}")
            pending = progress.get("pending") or {}
            if pending.get("task") != n:
                pending = {"task": n, "learn_seconds": None, "final_loss": None, "logs": None,
                           "note": "learned before an interruption; its training report was not recorded"}
            t0 = time.time()
            stream = api.open_stream(self.state, model=s.model, device=s.device)
            row: dict[str, list] = {k: [] for k in METRICS}
            samples: list[str | None] = []
            scored = set(range(n + 1)) if self.full_row(n, n_tasks) else {n}
            bar = _tqdm(range(n + 1), desc=f"eval after task {n + 1}", disable=not s.progress)
            for i in bar:
                if i not in scored:  # a sparse row (--eval-every): only the new concept, for the diagonal
                    for k in METRICS:
                        row[k].append(None)
                    samples.append(None)
                    continue
                scores, first_images = b.evaluator.score_concept(stream, i, include_noun)
                for k in METRICS:
                    row[k].append(scores[k])
                sample_path = self.dir / "samples" / f"task{n:03d}_concept{i:03d}.png"
                sample_path.parent.mkdir(parents=True, exist_ok=True)
                hstack(first_images[:4]).save(sample_path)
                samples.append(self.rel(sample_path))
            del stream
            entry = {**pending, "token": c.token, "noun": c.noun, "eval_seconds": round(time.time() - t0, 3),
                     "scores": row, "samples": samples, "sample_tiles": min(4, s.images_per_prompt),
                     "memory": memory_usage(), "finished_at": _now()}
            progress["tasks"].append(entry)
            progress["pending"] = None
            self._save_progress(progress)
            log(f"{prefix}: task {n + 1}/{n_tasks} evaluated in {entry['eval_seconds']:.1f}s: "
                f"MMD {_mean(row['MMD']):.3f}, KID {_mean(row['KID']):.3f}, I2I {_mean(row['I2I']):.3f} "
                f"(mean over {len(scored)} concept(s))")
        # Final model: DC accuracy and multi-concept samples.
        t0 = time.time()
        stream = api.open_stream(self.state, model=s.model, device=s.device)
        dc = b.evaluator.dc_accuracy(stream, include_noun)
        multi = self._multi_samples(stream, include_noun)
        final_seconds = time.time() - t0
        del stream
        tasks = progress["tasks"]
        rows = {k: [t["scores"][k] for t in tasks] for k in METRICS}
        matrices = {k: _matrix_from_rows(rows[k], n_tasks) for k in ("MMD", "KID", "I2I")}
        matrices["T2I"] = _matrix_from_rows(rows["T2I"], n_tasks) if b.evaluator.t2i_available else None
        info = api.info(self.state)
        result = {
            "format": RESULTS_FORMAT + "-run", "format_version": FORMAT_VERSION, "status": "complete",
            "label": self.variant.label, "method": self.variant.method, "adapter": info["method"].get("adapter"),
            "seed": self.seed, "config": progress["config"], "hparams": info["method"].get("hyperparameters", {}),
            "state_growth": info["method"].get("state_growth"), "state": self.rel(self.state),
            "state_bytes": info["size_bytes"], "started_at": progress.get("started_at"), "finished_at": _now(),
            "wall_seconds": sum((t.get("learn_seconds") or 0) + t["eval_seconds"] for t in tasks) + final_seconds,
            "final_eval_seconds": round(final_seconds, 3),
            "matrices": {k: (m.to_list() if m is not None else None) for k, m in matrices.items()},
            "summaries": {k: (m.summary(METRICS[k]["higher_is_better"]) if m is not None else None)
                          for k, m in matrices.items()},
            "t2i": {"available": b.evaluator.t2i_available, "reason": b.evaluator.t2i_reason},
            "dc": dc, "summary": run_summary(matrices, dc["accuracy"], tasks, dc["calibration"]["ece"]),
            "tasks": [{k: v for k, v in t.items()} for t in tasks], "multi": multi,
            "memory": memory_usage(),
        }
        result = clean_json(result)
        write_json_atomic(self.result_path, result)
        log(f"{prefix}: done in {time.time() - t_run:.0f}s: A_MMD {_fmt(result['summary']['A_MMD'])}, "
            f"BwT_MMD {_fmt(result['summary']['BwT_MMD'])}, DC acc {_fmt(dc['accuracy'])}")
        return result

    def full_row(self, n: int, n_tasks: int) -> bool:
        """Whether every seen concept is scored after task ``n`` (0-based), or only the new one."""
        every = self.bench.s.eval_every
        return every <= 1 or (n + 1) % every == 0 or n == n_tasks - 1

    def _checkpoint_action(self, n: int, prefix: str) -> dict[str, bool]:
        """Continue task ``n`` from the state's in-task checkpoint if it is that task's; else drop it."""
        from conceptstream.state import StateStore

        if not self.state.exists():
            return {}
        checkpoint = StateStore(self.state).load_checkpoint()
        if checkpoint is None:
            return {}
        info = checkpoint[1]
        c = self.bench.data.concepts[n]
        if (info.get("token"), info.get("steps"), info.get("seed")) == (c.token, self.bench.s.steps,
                                                                        _learn_seed(self.seed, n)):
            self.bench.log(f"{prefix}: task {n + 1} continues from its checkpoint at step {info.get('step')}")
            return {"resume": True}
        return {"discard_checkpoint": True}

    def _multi_samples(self, stream, include_noun: bool) -> list[dict[str, Any]]:
        """Two learned tokens in one prompt, for a few pairs of concepts."""
        s, concepts = self.bench.s, self.bench.data.concepts
        n = len(concepts)
        pairs = [(0, 1)] + [(n - 2, n - 1)] + [(i, i + 1) for i in range(1, n - 2)] if n >= 2 else []
        chosen: list[tuple[int, int]] = []
        for p in pairs:
            if p not in chosen and len(chosen) < s.multi_pairs:
                chosen.append(p)
        out = []
        for a, b in chosen:
            ca, cb = concepts[a], concepts[b]
            prompt = (f"a photo of a {ca.token} {ca.noun} and a {cb.token} {cb.noun}" if include_noun
                      else f"a photo of a {ca.token} and a {cb.token}")
            imgs = stream.generate(prompt, n=s.images_per_prompt, seed=s.gen_seed, steps=s.ddim_steps,
                                   guidance=s.guidance, progress=False)
            path = self.dir / "multi" / f"pair{a:03d}-{b:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            hstack(imgs).save(path)
            out.append({"concepts": [a, b], "prompt": prompt, "image": self.rel(path), "n": len(imgs)})
        return out


def _mean(values: Iterable[float | None]) -> float:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else math.nan


def _fmt(x: float | None, nd: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def _tqdm(iterable, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(iterable, leave=False, **kwargs)


# ------------------------------------------------------------------------------ the bench


class Bench:
    def __init__(self, settings: BenchSettings, log: Callable[[str], None] = print) -> None:
        self.s = settings
        self.log = log

    def generation_settings(self) -> dict[str, Any]:
        s = self.s
        return {"prompt": "a photo of a <token> NOUN (C-LoRA, trained without the noun: a photo of a <token>)",
                "contexts": list(s.contexts), "images_per_prompt": s.images_per_prompt,
                "images_per_concept": s.images_per_prompt * (1 + len(s.contexts)),
                "seeds": f"gen_seed + 1000 * prompt index + image index (gen_seed={s.gen_seed})",
                "sampler": self.sampler, "steps": s.ddim_steps, "guidance": s.guidance}

    def setup(self) -> None:
        from conceptstream.evaluation.features import FeatureExtractor, get_feature_extractor
        from conceptstream.models.loading import model_fingerprint, resolve_model

        s = self.s
        s.out.mkdir(parents=True, exist_ok=True)
        self.data = prepare_data(s.sequence, s.out, s.train_views, s.eval_views, s.max_concepts, s.progress, self.log)
        resolve_model(s.model)
        self.model_info = {"reference": s.model, "fingerprint": model_fingerprint(s.model)}
        self.sampler = self._sampler_name()
        self.extractor = s.features if isinstance(s.features, FeatureExtractor) else get_feature_extractor(s.features)
        self.evaluator = Evaluator(s, self.data, self.extractor)
        self.variants = expand_variants(s.methods, s.adapter, s.sweep)
        # Seed-major: every method's first seed runs before any second seed, so a campaign cut short
        # (or still running) already compares all methods.
        self.runs = [BenchRun(self, v, k) for k in s.seeds for v in self.variants]

    def _sampler_name(self) -> str:
        from conceptstream.models.loading import resolve_model

        cfg = Path(resolve_model(self.s.model)) / "scheduler" / "scheduler_config.json"
        if cfg.is_file():
            return json.loads(cfg.read_text()).get("_class_name", "unknown")
        return "the pipeline's scheduler"

    def run(self) -> dict[str, Any]:
        t0 = time.time()
        self.setup()
        s = self.s
        n_concepts = len(self.data.concepts)
        self.log(f"[bench] {len(self.variants)} variant(s) x {len(s.seeds)} seed(s) on {n_concepts} concepts "
                 f"({s.sequence}), {s.steps} steps per task; output in {s.out}")
        results: dict[tuple[str, int], dict] = {}
        failed: list[dict[str, Any]] = []
        for k, run in enumerate(self.runs, 1):
            done = run.finished()
            if done is not None:
                self.log(f"[bench {k}/{len(self.runs)}] {run.name}: finished earlier, skipped")
                results[(run.variant.label, run.seed)] = done
                continue
            self.log(f"[bench {k}/{len(self.runs)}] {run.name}: starting ({run.dir})")
            try:
                results[(run.variant.label, run.seed)] = run.run(k, len(self.runs))
            except (KeyboardInterrupt, StateError):
                raise
            except Exception as exc:
                if not s.keep_going:
                    raise
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                failed.append({"label": run.variant.label, "seed": run.seed, "run": run.rel(run.dir),
                               "error": f"{type(exc).__name__}: {first}",
                               "traceback": traceback.format_exc(limit=8)})
                self.log(f"[bench {k}/{len(self.runs)}] {run.name}: FAILED ({type(exc).__name__}: {first}); "
                         "continuing with the next run (rerun the same command to retry)")
            self._write(results, failed, time.time() - t0, final=False)
        out = self._write(results, failed, time.time() - t0, final=True)
        return out

    def _write(self, results: dict, failed: list, wall: float, final: bool) -> dict[str, Any]:
        from conceptstream.safeio import write_json_atomic

        doc = self.compile(results, failed, wall)
        write_json_atomic(self.s.out / "results.json", doc)
        if final:
            from conceptstream.evaluation.report import write_report

            report = write_report(doc, self.s.out)
            doc["report"] = report.relative_to(self.s.out).as_posix()
            write_json_atomic(self.s.out / "results.json", doc)
            self.log(f"[bench] results: {self.s.out / 'results.json'}; report: {report}")
        return doc

    def compile(self, results: Mapping[tuple[str, int], dict], failed: list, wall: float) -> dict[str, Any]:
        from conceptstream.evaluation.matrices import aggregate_over_seeds

        s = self.s
        runs: dict[str, dict[str, Any]] = {}
        summary: dict[str, dict[str, Any]] = {}
        for v in self.variants:
            per_seed = {k: results[(v.label, k)] for k in s.seeds if (v.label, k) in results}
            slim = {}
            for k, r in per_seed.items():
                slim[str(k)] = {key: r[key] for key in r if key not in ("tasks",)}
                slim[str(k)]["tasks"] = [{key: t.get(key) for key in
                                          ("task", "token", "noun", "learn_seconds", "eval_seconds", "final_loss",
                                           "memory", "logs", "samples", "sample_tiles", "note")}
                                         for t in r["tasks"]]
                slim[str(k)]["run_dir"] = f"runs/{v.dirname}/seed{k}"
            runs[v.label] = {"method": v.method, "adapter": v.adapter, "sweep": dict(v.hparams),
                             "dir": f"runs/{v.dirname}", "seeds": slim,
                             "mean_matrices": _mean_matrices([r["matrices"] for r in per_seed.values()])}
            summary[v.label] = aggregate_over_seeds([r["summary"] for r in per_seed.values()]) if per_seed else {}
        ev = self.evaluator
        return clean_json({
            "format": RESULTS_FORMAT, "format_version": FORMAT_VERSION, "updated_at": _now(),
            "complete": len(results) == len(self.runs) and not failed,
            "wall_seconds": round(wall, 3),
            "settings": {
                "sequence": s.sequence, "named_sequence": self.data.named, "data": str(self.data.root),
                "data_fingerprint": self.data.fingerprint,
                "concepts": [{"name": c.name, "token": c.token, "noun": c.noun, "train_images": len(c.train_images()),
                              "eval_images": len(c.eval_images())} for c in self.data.concepts],
                "methods": [v.label for v in self.variants], "adapter": s.adapter, "rank": s.rank,
                "targets": s.targets, "seeds": s.seeds, "steps": s.steps, "quick": s.quick, "sweep": s.sweep,
                "fixed_hparams": s.hparams,
                "learn_seeds": "1000 * seed + task index", "model": self.model_info, "device": s.device,
                "generation": self.generation_settings(),
                "features": {"spec": s.features if isinstance(s.features, str) else self.extractor.name,
                             "name": self.extractor.name, "dim": self.extractor.dim},
                "dc_eval": {"eval_timesteps": s.dc_eval_timesteps, "batch_size": s.dc_batch_size,
                            "candidates": "c_0 (a photo of a NOUN) + every learned concept",
                            "latents": "VAE posterior mean of each held-out image"},
                "multi_pairs": s.multi_pairs, "eval_every": s.eval_every,
                "train_views": s.train_views if self.data.named else None,
                "eval_views": s.eval_views if self.data.named else None, "max_concepts": s.max_concepts,
                "fixed_adapter": {v.method: v.adapter for v in self.variants if fixed_adapter(v.method)},
            },
            "metrics": METRICS,
            "t2i": {"available": ev.t2i_available, "reason": ev.t2i_reason},
            "versions": library_versions(),
            "summary_keys": {"A_MMD": "mean_i M_MMD[N][i]", "BwT_MMD": "mean_{i<N} (M[i][i] - M[N][i]); < 0 = forgetting",
                             "forgetting_MMD": "mean_{i<N} (M[N][i] - min_{n<N} M[n][i]); > 0 = forgetting",
                             "plasticity_MMD": "mean_i M[i][i]", "KID": "mean_i M_KID[N][i]",
                             "I2I": "mean_i M_I2I[N][i]", "T2I": "mean_i M_T2I[N][i] (null without CLIP)",
                             "DC_acc": "DC accuracy of held-out real images after the last task",
                             "DC_ECE": "expected calibration error (10 bins) of the DC posterior softmax(-errors / "
                                       "dc_temperature) on the same images; 0 = confidence matches accuracy",
                             "learn_seconds": "training time of the whole stream"},
            "summary": summary,
            "runs": runs,
            "failed": failed,
        })


def _mean_matrices(per_seed: list[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in METRICS:
        mats = [m.get(key) for m in per_seed if m.get(key) is not None]
        if not mats:
            out[key] = None
            continue
        size = len(mats[0])
        out[key] = [[_none_if_nan(_mean(m[n][i] for m in mats)) for i in range(size)] for n in range(size)]
    return out


def _none_if_nan(x: float) -> float | None:
    return None if math.isnan(x) else x


def run_bench(out: str | Path, sequence: str | Path = "tabletop-6", methods: Sequence[str] | str | None = None,
              adapter: str = "lora", seeds: int | Sequence[int] | None = None, steps: int | None = None,
              quick: bool = False, sweep: Mapping[str, Sequence[Any]] | Sequence[str] | None = None,
              hparams: Mapping[str, Any] | Sequence[str] | None = None,
              features: Any = "efficientnet-lite0", model: str | Path | None = None, device: str | None = None,
              rank: int | None = None, targets: str | None = None, images_per_prompt: int | None = None,
              contexts: Sequence[str] | None = None, ddim_steps: int | None = None, guidance: float = 5.0,
              gen_seed: int = 0, train_views: int | None = None, eval_views: int | None = None,
              max_concepts: int | None = None, dc_eval_timesteps: int | None = None, dc_batch_size: int = 4,
              multi_pairs: int | None = None, eval_every: int = 1, keep_going: bool = True, progress: bool = True,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the benchmark and write ``out/results.json`` and ``out/report.md``; returns the results.

    ``sequence``: a named sequence (``tabletop-3/6/10/50``, rendered into ``out/data``) or a sequence
    folder. ``seeds``: a count (seeds 0..n-1) or explicit seeds. ``sweep``: ``{"ewc_lambda": [1, 10]}``
    or CLI-style ``["ewc_lambda=1,10"]``. ``hparams``: fixed method settings (``{"dsc_iters": 50}`` or
    ``["dsc_iters=50"]``), applied to every method that has them. ``features``: an extractor spec or a ``FeatureExtractor``.
    ``eval_every``: score every seen concept only after every K-th task and the last (long streams: the
    full matrix costs O(N^2) generations); the new concept is scored after every task, so A, BwT and
    plasticity are exact and forgetting uses the rows that were scored.
    ``quick``: CI-sized defaults (2 concepts, 3 steps, 2 images per concept, 1 seed, 4 sampler steps);
    any option given explicitly wins. ``keep_going``: a failing run is recorded and the bench goes on.
    """
    from conceptstream.engine import DEFAULT_STEPS
    from conceptstream.models.loading import BUNDLED

    if isinstance(methods, str):
        methods = [m for m in methods.split(",") if m.strip()]
    methods = list(methods or DEFAULT_METHODS)
    if adapter not in ("lora", "vera"):
        raise UserInputError(f"--adapter must be lora or vera, got {adapter!r}")
    if sweep is None:
        sweep_map: dict[str, list[Any]] = {}
    elif isinstance(sweep, Mapping):
        sweep_map = {str(k).replace("-", "_"): list(v) for k, v in sweep.items()}
    else:
        sweep_map = dict(parse_sweep(t) for t in sweep)
    fixed = dict(QUICK_HPARAMS) if quick else {}
    if isinstance(hparams, Mapping):
        fixed.update({str(k).replace("-", "_"): v for k, v in hparams.items()})
    elif hparams:
        for text in hparams:
            key, values = parse_sweep(text)
            if len(values) != 1:
                raise UserInputError(f"--set {text!r} takes one value; use --sweep for several")
            fixed[key] = values[0]
    _check_known(methods, fixed, sweep_map)
    seeds_value = _resolve(seeds, "seeds", quick)
    seed_list = list(range(int(seeds_value))) if isinstance(seeds_value, int) else [int(k) for k in seeds_value]
    if not seed_list or len(set(seed_list)) != len(seed_list):
        raise UserInputError(f"--seeds must be >= 1 (or distinct seeds), got {seeds_value!r}")
    steps_value = steps if steps is not None else (QUICK["steps"] if quick else DEFAULT_STEPS)
    settings = BenchSettings(
        out=Path(out), sequence=str(sequence), methods=methods, adapter=adapter, seeds=seed_list,
        steps=int(steps_value), quick=quick, sweep=sweep_map, hparams=fixed, features=features, model=str(model or BUNDLED),
        device=device, rank=rank, targets=targets,
        images_per_prompt=int(_resolve(images_per_prompt, "images_per_prompt", quick)),
        contexts=tuple(_resolve(contexts, "contexts", quick)), ddim_steps=int(_resolve(ddim_steps, "ddim_steps", quick)),
        guidance=float(guidance), gen_seed=int(gen_seed), train_views=int(_resolve(train_views, "train_views", quick)),
        eval_views=int(_resolve(eval_views, "eval_views", quick)),
        max_concepts=_resolve(max_concepts, "max_concepts", quick),
        dc_eval_timesteps=int(_resolve(dc_eval_timesteps, "dc_eval_timesteps", quick)),
        dc_batch_size=int(dc_batch_size), multi_pairs=int(_resolve(multi_pairs, "multi_pairs", quick)),
        eval_every=int(eval_every), keep_going=keep_going, progress=progress)
    _validate(settings)
    return Bench(settings, log or _print).run()


def _check_known(methods: Sequence[str], fixed: Mapping[str, Any], sweep: Mapping[str, Any]) -> None:
    """A user-given setting that no selected method has is a typo; say so (quick defaults may go unused)."""
    from conceptstream.methods.registry import get_method

    known: set[str] = set()
    for m in methods:
        known |= set(get_method(m.strip()).all_defaults())
    for key in fixed:
        if key not in known and key not in QUICK_HPARAMS:
            raise UserInputError(f"--set {key}: none of the methods {', '.join(methods)} has that setting")
        if key in sweep:
            raise UserInputError(f"{key} is both --set and --sweep; give it in one place")


def _validate(s: BenchSettings) -> None:
    checks = [("--steps", s.steps, 1), ("--images-per-prompt", s.images_per_prompt, 1),
              ("--ddim-steps", s.ddim_steps, 1), ("--train-views", s.train_views, 1),
              ("--eval-views", s.eval_views, 2), ("--dc-eval-timesteps", s.dc_eval_timesteps, 1),
              ("--multi-pairs", s.multi_pairs, 0), ("dc_batch_size", s.dc_batch_size, 1),
              ("--eval-every", s.eval_every, 1)]
    for flag, value, lo in checks:
        if value < lo:
            raise UserInputError(f"{flag} must be >= {lo}, got {value}")
    if s.max_concepts is not None and s.max_concepts < 1:
        raise UserInputError(f"--max-concepts must be >= 1, got {s.max_concepts}")
    per_concept = s.images_per_prompt * (1 + len(s.contexts))
    if per_concept < 2:
        raise UserInputError("the bench needs at least 2 generated images per concept for MMD/KID; "
                             "raise --images-per-prompt")


def _print(line: str) -> None:
    print(line, flush=True)


def format_summary(results: Mapping[str, Any]) -> str:
    """The summary table as plain text (what the CLI prints at the end)."""
    cols = [("A_MMD", 3), ("BwT_MMD", 3), ("plasticity_MMD", 3), ("KID", 3), ("I2I", 3), ("DC_acc", 3)]
    width = max([len("method")] + [len(k) for k in results.get("summary", {})])
    lines = [f"{'method':<{width}}  " + "  ".join(f"{c:>17}" for c, _ in cols)]
    for label, summ in results.get("summary", {}).items():
        cells = []
        for key, nd in cols:
            agg = summ.get(key) or {}
            if agg.get("mean") is None:
                cells.append(f"{'n/a':>17}")
            elif (agg.get("n") or 0) > 1:
                cells.append(f"{agg['mean']:>8.{nd}f} ± {agg['std']:<6.{nd}f}")
            else:
                cells.append(f"{agg['mean']:>17.{nd}f}")
        lines.append(f"{label:<{width}}  " + "  ".join(cells))
    for f in results.get("failed", []):
        lines.append(f"FAILED {f['label']} seed {f['seed']}: {f['error']}")
    return "\n".join(lines)
