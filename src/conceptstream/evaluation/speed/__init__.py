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

Modules: :mod:`~.settings` (SpeedSettings, CLI options), :mod:`~.timing` (interleaved medians,
synthetic inputs), :mod:`~.training` + :mod:`~.worker` (1), :mod:`~.dc` (2), :mod:`~.generate` (3),
:mod:`~.size` (4), :mod:`~.runner` (``run_speed``), :mod:`~.table` (Markdown). Machine and memory
probes: :mod:`conceptstream.system`; method variants: :mod:`conceptstream.evaluation.variants`.
"""

from __future__ import annotations

from conceptstream.lazy import lazy_exports

# Public names -> the module that defines them, imported on first use (the CLI parser reads .settings only).
_EXPORTS = {
    "DC_TARGET": "settings", "FORMAT_VERSION": "settings", "GENERATE_TARGET": "settings", "NOUNS": "settings",
    "RESULTS_FORMAT": "settings", "SPEED_OPTIONS": "settings", "SPEED_PARTS": "settings", "SpeedSettings": "settings",
    "interleaved": "timing", "synthetic_images": "timing",
    "bench_training": "training", "bench_dc": "dc", "bench_generate": "generate", "bench_state_size": "size",
    "run_speed": "runner", "format_table": "table",
    "parse_variant": "conceptstream.evaluation.variants", "split_methods": "conceptstream.evaluation.variants",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
