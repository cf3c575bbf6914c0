"""The bench's result documents: metric definitions, a run's summary, ``results.json`` and the printed table."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

RESULTS_FORMAT = "conceptstream-bench"
FORMAT_VERSION = 1

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

SUMMARY_KEYS = {
    "A_MMD": "mean_i M_MMD[N][i]", "BwT_MMD": "mean_{i<N} (M[i][i] - M[N][i]); < 0 = forgetting",
    "forgetting_MMD": "mean_{i<N} (M[N][i] - min_{n<N} M[n][i]); > 0 = forgetting",
    "plasticity_MMD": "mean_i M[i][i]", "KID": "mean_i M_KID[N][i]",
    "I2I": "mean_i M_I2I[N][i]", "T2I": "mean_i M_T2I[N][i] (null without CLIP)",
    "DC_acc": "DC accuracy of held-out real images after the last task, among one fixed candidate set for every "
              "image: every concept's prompt + the class prompt 'a photo of a NOUN' of every distinct noun",
    "DC_acc_own_class": "DC accuracy of the same images among c_0 of the image's own class + every concept (the "
                        "original protocol); favours methods trained against c_0",
    "DC_ECE": "expected calibration error (10 bins) of the DC posterior softmax(-errors / "
              "dc_temperature) over the fixed candidate set on the same images; 0 = confidence matches accuracy",
    "learn_seconds": "training time of the whole stream"}

# Per-task fields of a run that results.json keeps (the scores are in the matrices).
TASK_FIELDS = ("task", "token", "noun", "learn_seconds", "eval_seconds", "final_loss", "adapter_change", "memory", "logs",
               "samples", "sample_tiles", "note")


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


def mean(values: Iterable[float | None]) -> float:
    """Mean of the values that are not None; NaN when there are none."""
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else math.nan


def matrix_from_rows(rows: list[list[float | None]], n_tasks: int):
    """A :class:`ContinualMatrix` from saved rows (None = not scored)."""
    from conceptstream.evaluation.matrices import ContinualMatrix

    m = ContinualMatrix(n_tasks)
    for n, row in enumerate(rows):
        for i, v in enumerate(row):
            if v is not None:
                m.set(n, i, v)
    return m


def run_summary(matrices: Mapping[str, Any], dc_acc: float | None, tasks: list[dict],
                dc_ece: float | None = None, dc_acc_own_class: float | None = None,
                summarize: Callable[[Any, bool], dict[str, float]] | None = None) -> dict[str, float | None]:
    """The headline numbers of one run (the keys of results.json's ``summary``, see ``SUMMARY_KEYS``):
    ``dc_acc`` and ``dc_ece`` over the fixed DC candidate set, ``dc_acc_own_class`` over c_0 + concepts."""
    summarize = summarize or (lambda m, higher: m.summary(higher))  # a bound's run passes a partial summary
    mmd = summarize(matrices["MMD"], False)
    out = {"A_MMD": mmd["final_average"], "BwT_MMD": mmd["backward_transfer"],
           "forgetting_MMD": mmd["forgetting"], "plasticity_MMD": mmd["plasticity"],
           "KID": summarize(matrices["KID"], False)["final_average"],
           "I2I": summarize(matrices["I2I"], True)["final_average"],
           "T2I": summarize(matrices["T2I"], True)["final_average"] if matrices.get("T2I") is not None else None,
           "DC_acc": dc_acc, "DC_acc_own_class": dc_acc_own_class, "DC_ECE": dc_ece,
           "learn_seconds": sum(t.get("learn_seconds") or 0.0 for t in tasks)}
    return clean_json(out)


def mean_matrices(per_seed: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Every metric's matrix averaged over seeds, entry by entry (None where no seed has a value)."""
    out: dict[str, Any] = {}
    for key in METRICS:
        mats = [m.get(key) for m in per_seed if m.get(key) is not None]
        if not mats:
            out[key] = None
            continue
        size = len(mats[0])
        out[key] = [[_none_if_nan(mean(m[n][i] for m in mats)) for i in range(size)] for n in range(size)]
    return out


def _none_if_nan(x: float) -> float | None:
    return None if math.isnan(x) else x


def compile_results(ctx, variants: Sequence, n_runs: int, results: Mapping[tuple[str, int], dict], failed: list,
                    wall: float) -> dict[str, Any]:
    """The ``results.json`` document of a bench (``ctx``: its :class:`BenchContext`) from the runs finished so far."""
    from conceptstream.evaluation.bench.data import relative_data_path
    from conceptstream.evaluation.matrices import aggregate_over_seeds
    from conceptstream.methods.registry import fixed_adapter
    from conceptstream.system import library_versions, utc_now

    s, data = ctx.settings, ctx.data
    runs: dict[str, dict[str, Any]] = {}
    summary: dict[str, dict[str, Any]] = {}
    for v in variants:
        per_seed = {k: results[(v.label, k)] for k in s.seeds if (v.label, k) in results}
        slim = {}
        for k, r in per_seed.items():
            slim[str(k)] = {key: r[key] for key in r if key not in ("tasks",)}
            slim[str(k)]["tasks"] = [{key: t.get(key) for key in TASK_FIELDS} for t in r["tasks"]]
            slim[str(k)]["run_dir"] = f"runs/{v.dirname}/seed{k}"
        runs[v.label] = {"method": v.method, "adapter": v.adapter, "bound": v.bound, "sweep": dict(v.hparams),
                         "dir": f"runs/{v.dirname}", "seeds": slim,
                         "mean_matrices": mean_matrices([r["matrices"] for r in per_seed.values()])}
        summary[v.label] = aggregate_over_seeds([r["summary"] for r in per_seed.values()]) if per_seed else {}
    ev, extractor = ctx.evaluator, ctx.extractor
    return clean_json({
        "format": RESULTS_FORMAT, "format_version": FORMAT_VERSION, "updated_at": utc_now(),
        "complete": len(results) == n_runs and not failed,
        "wall_seconds": round(wall, 3),
        "settings": {
            "sequence": s.sequence, "split": s.split, "named_sequence": data.named,
            "data": relative_data_path(data.root, s.out),
            "data_fingerprint": data.fingerprint,
            "concepts": [{"name": c.name, "token": c.token, "noun": c.noun, "train_images": len(c.train_images()),
                          "val_images": len(c.val_images()),
                          "eval_images": len(c.eval_images())} for c in data.concepts],
            "methods": [v.label for v in variants], "adapter": s.adapter, "rank": s.rank,
            "targets": s.targets, "seeds": s.seeds, "steps": s.steps,
            "steps_per_task": {v.label: v.task_steps(s.steps) for v in variants},
            "quick": s.quick, "sweep": s.sweep,
            "fixed_hparams": s.hparams,
            "learn_seeds": "1000 * seed + task index", "model": ctx.model_info, "device": s.device,
            "generation": ctx.generation_settings(),
            "features": {"spec": s.features if isinstance(s.features, str) else extractor.name,
                         "name": extractor.name, "dim": extractor.dim},
            "dc_eval": {"eval_timesteps": s.dc_eval_timesteps, "batch_size": s.dc_batch_size,
                        "elimination": s.dc_elimination,
                        "candidates": "one fixed set for every image, every concept's prompt + the class prompt "
                                      "(a photo of a NOUN) of every distinct noun (DC_acc, DC_ECE); and, from the "
                                      "same errors, c_0 of the image's own class + every concept "
                                      "(DC_acc_own_class, favours methods trained against c_0)",
                        "latents": "VAE posterior mean of each held-out image"},
            "multi_pairs": s.multi_pairs, "eval_every": s.eval_every,
            "train_views": s.train_views if data.named else None,
            "eval_views": s.eval_views if data.named else None, "max_concepts": s.max_concepts,
            "fixed_adapter": {v.method: v.adapter for v in variants if fixed_adapter(v.method)},
        },
        "metrics": METRICS,
        "t2i": {"available": ev.t2i_available, "reason": ev.t2i_reason},
        "versions": library_versions(),
        "summary_keys": SUMMARY_KEYS,
        "summary": summary,
        "runs": runs,
        "failed": failed,
    })


def format_summary(results: Mapping[str, Any]) -> str:
    """The summary table as plain text (what the CLI prints at the end): mean ± the 95% t-interval
    half-width over seeds, one value for a single seed."""
    from conceptstream.evaluation.matrices import summary_ci95

    cols = [("A_MMD", 3), ("BwT_MMD", 3), ("plasticity_MMD", 3), ("KID", 3), ("I2I", 3), ("DC_acc", 3),
            ("DC_acc_own_class", 3)]
    width = max([len("method")] + [len(k) for k in results.get("summary", {})])
    lines = [f"{'method':<{width}}  " + "  ".join(f"{c:>17}" for c, _ in cols)]
    seeds = set()
    for label, summ in results.get("summary", {}).items():
        cells = []
        for key, nd in cols:
            agg = summ.get(key) or {}
            half = summary_ci95(agg) if agg.get("mean") is not None else None
            if agg.get("mean") is None:
                cells.append(f"{'n/a':>17}")
            elif half is not None:
                seeds.add(agg["n"])
                cells.append(f"{agg['mean']:>8.{nd}f} ± {half:<6.{nd}f}")
            else:
                cells.append(f"{agg['mean']:>17.{nd}f}")
        lines.append(f"{label:<{width}}  " + "  ".join(cells))
    if seeds:
        lines.append(f"± : half-width of the 95% t-interval of the mean over {'/'.join(map(str, sorted(seeds)))} seeds")
    for f in results.get("failed", []):
        lines.append(f"FAILED {f['label']} seed {f['seed']}: {f['error']}")
    return "\n".join(lines)
