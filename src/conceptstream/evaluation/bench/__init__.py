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

Over machines: ``bench --shard K/N --out OUT_K`` runs the K-th of N slices of the runs (a SLURM
array, several GPUs or hosts); ``bench --merge OUT_1 ... OUT_N --out OUT`` combines the shards into
one ``results.json`` and report, refusing shards made under other settings.

Modules: :mod:`~.options` (every setting, declared once), :mod:`~.settings` (arguments -> checked
settings), :mod:`~.data` (the concepts), :mod:`~.scoring` (metrics and DC classification of one
stream), :mod:`~.run` (one resumable run), :mod:`~.runner` (all runs, ``run_bench``),
:mod:`~.results` (result documents), :mod:`~.merge` (``--shard K/N`` slices over machines and
``merge_bench``). Method variants: :mod:`conceptstream.evaluation.variants`.
"""

from __future__ import annotations

from conceptstream.lazy import lazy_exports

# Public names -> the module that defines them; imported on first use, so that building the CLI
# parser (which reads only .options) stays fast.
_EXPORTS = {
    "BenchContext": "context",
    "BenchData": "data", "prepare_data": "data",
    "BENCH_OPTIONS": "options", "DEFAULT_CONTEXTS": "options", "DEFAULT_METHODS": "options", "QUICK_HPARAMS": "options",
    "FORMAT_VERSION": "results", "METRICS": "results", "RESULTS_FORMAT": "results", "clean_json": "results",
    "format_summary": "results", "run_summary": "results",
    "merge_bench": "merge", "shard_slice": "merge",
    "BenchRun": "run",
    "Bench": "runner", "run_bench": "runner",
    "Evaluator": "scoring", "dc_classification": "scoring", "hstack": "scoring",
    "BenchSettings": "settings", "resolve_settings": "settings",
    "Variant": "conceptstream.evaluation.variants", "expand_variants": "conceptstream.evaluation.variants",
    "parse_sweep": "conceptstream.evaluation.variants", "parse_value": "conceptstream.evaluation.variants",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
