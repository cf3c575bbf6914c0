"""The bench's settings: :class:`BenchSettings` (one field per declared option) and the arguments -> settings step.

:func:`resolve_settings` turns what a caller gave (CLI strings or Python values, ``None`` for "not
given") into checked settings: ``--quick`` values where an option was not given, method lists and
``--sweep``/``--set`` parsed, seeds as a list, and every user error raised before any work starts
(a user's sequence folder without the held-out views of ``--split`` included).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import field, make_dataclass
from pathlib import Path
from typing import Any

from conceptstream.errors import UserInputError
from conceptstream.evaluation.bench.data import check_sequence_folder
from conceptstream.evaluation.bench.options import (
    BENCH_OPTIONS,
    DEFAULT_METHODS,
    OPTIONS_BY_NAME,
    QUICK_HPARAMS,
)
from conceptstream.evaluation.variants import parse_setting, parse_sweep, setting_key, split_methods

BenchSettings = make_dataclass(
    "BenchSettings",
    [("out", Path)] + [(o.name, Any) for o in BENCH_OPTIONS if o.name != "out"]
    + [("extra", dict, field(default_factory=dict))],
)
BenchSettings.__module__ = __name__
BenchSettings.__doc__ = ("Everything that defines a bench (recorded in results.json): one field per option of "
                         "BENCH_OPTIONS, resolved (no None for 'not given' except where None is a value).")


def resolve_settings(out: str | Path, given: Mapping[str, Any]) -> Any:
    """Checked :class:`BenchSettings` from the options a caller gave (unknown names are a TypeError)."""
    unknown = [k for k in given if k not in OPTIONS_BY_NAME or k == "out"]
    if unknown:
        raise TypeError(f"run_bench() got an unexpected keyword argument {unknown[0]!r}")
    quick = bool(given.get("quick") or False)
    values = {o.name: o.value(given.get(o.name), quick) for o in BENCH_OPTIONS if o.name != "out"}
    values["quick"] = quick
    values["methods"] = _methods(values["methods"])
    values["sweep"] = _sweep(values["sweep"])
    values["hparams"] = _fixed_hparams(values["hparams"], quick)
    _check_known(values["methods"], values["hparams"], values["sweep"])
    values["seeds"] = _seeds(values["seeds"])
    # steps None: each method's own default (ContinualMethod.default_steps; Variant.task_steps resolves it)
    if values["model"] is None:
        from conceptstream.models.loading import BUNDLED

        values["model"] = BUNDLED
    values["model"] = str(values["model"])
    values["sequence"] = str(values["sequence"])
    values["contexts"] = tuple(values["contexts"])
    values["steps"] = None if values["steps"] is None else int(values["steps"])
    for name in ("images_per_prompt", "ddim_steps", "gen_seed", "train_views", "val_views", "eval_views",
                 "dc_eval_timesteps", "dc_batch_size", "multi_pairs", "eval_every"):
        values[name] = int(values[name])
    values["guidance"] = float(values["guidance"])
    values["shard"] = parse_shard(values["shard"])
    if values["dc_elimination"] is not None:  # checked now, used after the last task
        from conceptstream.scoring.dc import elimination_schedule, parse_elimination

        stages = parse_elimination(str(values["dc_elimination"]))
        if stages is not None:
            elimination_schedule(stages, values["dc_eval_timesteps"])
        values["dc_elimination"] = ",".join(f"{n}:{k}" for n, k in stages) if stages else None
    settings = BenchSettings(out=Path(out), **values)
    _validate(settings)
    return settings


def _methods(methods: Sequence[str] | str | None) -> list[str]:
    if isinstance(methods, str):
        methods = split_methods(methods)
    methods = [m.strip() for m in (methods or DEFAULT_METHODS)]
    for m in methods:
        if "[" in m:
            raise UserInputError(f"--methods {m!r}: the bench takes method settings through --set KEY=VALUE "
                                 "or --sweep KEY=V1,V2,...")
    return methods


def _sweep(sweep: Mapping[str, Sequence[Any]] | Sequence[str] | None) -> dict[str, list[Any]]:
    if sweep is None:
        return {}
    if isinstance(sweep, Mapping):
        return {setting_key(str(k)): list(v) for k, v in sweep.items()}
    return dict(parse_sweep(t) for t in sweep)


def _fixed_hparams(hparams: Mapping[str, Any] | Sequence[str] | None, quick: bool) -> dict[str, Any]:
    fixed = dict(QUICK_HPARAMS) if quick else {}
    if isinstance(hparams, Mapping):
        fixed.update({setting_key(str(k)): v for k, v in hparams.items()})
    elif hparams:
        fixed.update(parse_setting(text) for text in hparams)
    return fixed


def _seeds(value: int | Sequence[int]) -> list[int]:
    seeds = list(range(int(value))) if isinstance(value, int) else [int(k) for k in value]
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserInputError(f"--seeds must be >= 1 (or distinct seeds), got {value!r}")
    return seeds


SHARD_FORM = ("K/N with 1 <= K <= N, e.g. --shard 1/4 (from a 0-based SLURM array: "
              "--shard $((SLURM_ARRAY_TASK_ID + 1))/$SLURM_ARRAY_TASK_COUNT)")


def parse_shard(value: str | Sequence[int] | None) -> tuple[int, int] | None:
    """``--shard K/N`` (text, or a ``(K, N)`` pair) as ``(K, N)``, 1-based; None: not sharded."""
    if value is None:
        return None
    if isinstance(value, str):
        parts = value.replace(" ", "").split("/")
    elif isinstance(value, (tuple, list)):
        parts = [str(v) for v in value]
    else:
        parts = [str(value)]
    try:
        if len(parts) != 2:
            raise ValueError
        index, count = (int(p) for p in parts)
    except ValueError:
        index = count = 0
    if not 1 <= index <= count:
        raise UserInputError(f"--shard takes {SHARD_FORM}, got {value!r}")
    return index, count


def _check_known(methods: Sequence[str], fixed: Mapping[str, Any], sweep: Mapping[str, Any]) -> None:
    """A user-given setting that no selected method has is a typo; say so (quick defaults may go unused).
    Every value is checked against the setting's type and range in each method that has it."""
    from conceptstream.evaluation.variants import BOUND_METHOD, BOUNDS
    from conceptstream.methods.registry import get_method, validate_settings

    methods = list(dict.fromkeys(BOUND_METHOD if m in BOUNDS else m for m in methods))  # a bound trains as lora
    known: set[str] = set()
    for m in methods:
        known |= set(get_method(m).all_defaults())
    for key in fixed:
        if key not in known and key not in QUICK_HPARAMS:
            raise UserInputError(f"--set {key}: none of the methods {', '.join(methods)} has that setting")
        if key in sweep:
            raise UserInputError(f"{key} is both --set and --sweep; give it in one place")
    for m in methods:
        has = get_method(m).all_defaults()
        validate_settings(m, {k: v for k, v in fixed.items() if k in has}, adapter=None, flag="--set")
        for key, values in sweep.items():
            if key in has:
                for value in values:
                    validate_settings(m, {key: value}, adapter=None, flag="--sweep")


def _validate(s: Any) -> None:
    from conceptstream.adapters.registry import adapter_kinds

    if s.adapter not in adapter_kinds():
        raise UserInputError(f"--adapter must be one of {', '.join(adapter_kinds())}, got {s.adapter!r}")
    for o in BENCH_OPTIONS:
        value = getattr(s, o.name)
        if o.minimum is not None and value is not None and value < o.minimum:
            raise UserInputError(f"{o.label} must be >= {o.minimum}, got {value}")
    per_concept = s.images_per_prompt * (1 + len(s.contexts))
    if per_concept < 2:
        raise UserInputError("the bench needs at least 2 generated images per concept for MMD/KID; "
                             "raise --images-per-prompt")
    split = OPTIONS_BY_NAME["split"]
    if s.split not in split.choices:
        raise UserInputError(f"{split.label} must be one of {', '.join(split.choices)}, got {s.split!r}")
    check_sequence_folder(s.sequence, s.split, s.max_concepts)
