"""conceptstream: continual personalization of text-to-image diffusion models.

Teach one model a stream of personal concepts, one at a time, without keeping old images and
without forgetting, with diffusion-classifier-score regularisers (EWC-DC, DSC) and baselines.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "bundled_model", "learn", "learn_joint", "generate", "info", "export", "open_stream", "bench",
           "merge_bench"]


def bundled_model():
    """Path of the bundled tiny Stable-Diffusion-format pipeline (loads with stock diffusers)."""
    from conceptstream.models.loading import bundled_model as _bundled

    return _bundled()


def __getattr__(name: str):
    # Lazy: `import conceptstream` stays fast and torch-free until a verb is used.
    if name in ("learn", "learn_joint", "generate", "info", "export", "open_stream"):
        from conceptstream import api

        return getattr(api, name)
    if name == "bench":  # the bench uses the api; the api does not know the bench
        from conceptstream.evaluation.bench import run_bench

        return run_bench
    if name == "merge_bench":  # combine `bench --shard K/N` outputs into one results.json and report
        from conceptstream.evaluation.bench.merge import merge_bench

        return merge_bench
    raise AttributeError(name)
