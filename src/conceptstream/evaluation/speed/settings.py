"""What a bench-speed run measures with: :class:`SpeedSettings` (recorded in the results) and its CLI options."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from conceptstream.evaluation.options import Option, adapter_choices

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
            s = cls(quick=True, **copy.deepcopy(QUICK))
        for key, value in overrides.items():
            if value is not None:
                setattr(s, key, value)
        return s


# What --quick changes (a smoke test of about a minute).
QUICK: dict[str, Any] = {"steps": 2, "images": 2, "method_hparams": {"dsc_iters": 2, "fisher_passes": 1},
                         "size_tasks": [1, 2], "isolation": "shared-process", "dc_images": 2, "dc_candidates": 3,
                         "dc_timesteps": 2, "gen_images": 1, "gen_steps": 4, "trials": 3}


def _setting(name: str, help: str, **kwargs: Any) -> Option:
    """An option whose default and --quick value are SpeedSettings' own."""
    default = getattr(SpeedSettings(), name)
    quick = QUICK.get(name, default)
    return Option(name, help, default=default, **({"quick": quick} if quick != default else {}), **kwargs)


# The flags of `conceptstream bench-speed` (every keyword of run_speed but workdir and progress, and --json).
SPEED_OPTIONS: tuple[Option, ...] = (
    Option("quick", "tiny settings, about a minute (CI smoke test); the ratios are not measurements",
           action="store_true"),
    Option("json", "print the results as JSON instead of a Markdown table", action="store_true"),
    Option("out", "folder for speed-<machine>[-<label>][-quick].json", default="benchmarks/results"),
    Option("methods", "comma-separated methods, lora always added; a method may carry settings to time its speed "
           "levers, e.g. 'ewc-dc,ewc-dc[dc_k=2,dc_batch=1]'", shown_default="all"),
    Option("parts", "comma-separated subset of " + ",".join(SPEED_PARTS), shown_default="all"),
    Option("label", "suffix of the result file name (speed-<machine>-<label>.json)"),
    _setting("adapter", "adapter of the adapter methods", choices=adapter_choices()),
    Option("model", "'tiny' (bundled) or a diffusers Stable Diffusion folder", shown_default="tiny"),
    Option("device", "cpu, cuda, cuda:N", shown_default="cuda when available"),
    _setting("steps", "training steps per timed task", type=int),
    _setting("trials", "interleaved timing trials", type=int),
    _setting("timed_tasks", "tasks learned and timed per method; ratios are read at the last one, so e.g. 6 times "
             "DC methods once their candidate set is full (k=5)", type=int),
    Option("threads", "torch CPU threads", type=int, shown_default="torch's choice"),
    Option("machine", "label in the file name", shown_default="from the CPU/GPU model"),
)
