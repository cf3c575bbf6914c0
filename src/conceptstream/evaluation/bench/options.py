"""Every setting of ``conceptstream bench``, declared once (see :class:`~conceptstream.evaluation.options.Option`).

The CLI arguments, :class:`~conceptstream.evaluation.bench.settings.BenchSettings`, the ``--quick``
values and the resume check of a saved run are built from :data:`BENCH_OPTIONS`. A new setting that
changes a run's numbers is one entry with ``check="run", omit_default=True``.
"""

from __future__ import annotations

from conceptstream.evaluation.options import LazyChoices, Option, adapter_choices

DEFAULT_METHODS = ("lora", "lora-ewc", "c-lora", "ewc-dc", "dsc", "dsc-ewc-dc", "custom-diffusion",
                   "textual-inversion")
# Backgrounds of the tabletop world; they read naturally for any object photo.
DEFAULT_CONTEXTS = ("on grass", "on a wooden table")
# Method settings --quick lowers where a method has them (the DSC phase is otherwise 100 iterations).
QUICK_HPARAMS = {"dsc_iters": 2}


def _target_names() -> list[str]:
    from conceptstream.adapters.registry import TARGETS

    return list(TARGETS)


BENCH_OPTIONS: tuple[Option, ...] = (
    Option("out", "output folder (data, runs, results.json, report.md)", required=True),
    Option("sequence", "named sequence (tabletop-3/6/10/50) or a sequence folder", default="tabletop-6",
           check="data"),
    Option("methods", "comma-separated methods", shown_default=", ".join(DEFAULT_METHODS), check="variant"),
    Option("adapter", "adapter of the adapter methods (c-lora always runs on lora)", default="lora",
           choices=adapter_choices(), check="variant"),
    Option("seeds", "number of seeds", default=3, quick=1, type=int, check="seed"),
    Option("steps", "training steps per task", shown_default="each method's default_steps", quick=3, type=int, check="run",
           minimum=1),
    Option("quick", "CI-sized: 2 concepts, few steps, 2 images, 1 seed; options given explicitly win",
           default=False, action="store_true"),
    Option("sweep", "run each value of a method setting as its own variant (repeatable: a grid)",
           action="append", metavar="KEY=V1,V2,...", check="variant"),
    Option("hparams", "fixed method setting for every method that has it, e.g. --set dsc_iters=50", flag="--set",
           action="append", metavar="KEY=VALUE", check="variant"),
    Option("features", "image features of MMD/KID/I2I: efficientnet-lite0 | clip:PATH | dino:PATH",
           default="efficientnet-lite0", check="features"),
    Option("model", "'tiny' (bundled) or a diffusers Stable Diffusion folder", shown_default="tiny", check="model"),
    Option("device", "cpu, cuda, cuda:N", shown_default="the GPU if there is one"),
    Option("rank", "adapter rank", shown_default="the adapter kind's, 4 for lora and 64 for vera", type=int,
           check="run"),
    Option("targets", "adapter target layers", shown_default="cross-kv", choices=LazyChoices(_target_names),
           check="run"),
    Option("images_per_prompt", "generated images per prompt (1 + len(contexts) prompts per concept)", default=4,
           quick=2, type=int, check="generation", minimum=1),
    Option("contexts", "prompt suffixes beside the plain prompt", default=DEFAULT_CONTEXTS, quick=(), flag=None,
           check="generation"),
    Option("ddim_steps", "sampler steps of every generated image", default=30, quick=4, type=int,
           check="generation", minimum=1),
    Option("guidance", "classifier-free guidance scale", default=5.0, type=float, check="generation"),
    Option("gen_seed", "first seed of the generated images", default=0, flag=None, check="generation"),
    Option("train_views", "training views per concept of a named sequence", default=12, quick=3, flag=None,
           check="data", minimum=1),
    Option("eval_views", "held-out views per concept of a named sequence", default=12, quick=3, flag=None,
           check="data", minimum=2),
    Option("val_views", "validation views per concept of a named sequence (its val/ folder)", default=12, quick=3,
           flag=None, check="data", minimum=2),
    Option("split", "held-out views the bench scores against: val for tuning and sweeps, test for published "
           "tables", default="test", choices=("val", "test"), check="run", omit_default=True),
    Option("max_concepts", "use only the first N concepts", quick=2, type=int, metavar="N", check="data", minimum=1),
    Option("dc_eval_timesteps", "noise draws per held-out image of the final DC classification", default=8, quick=2,
           flag=None, check="run", minimum=1),
    Option("dc_elimination", "final DC classification by successive elimination, DRAWS:KEEP per stage (e.g. 2:8,4:3: "
           "every candidate at 2 noise draws, the best 8 per image rescored up to 4, the best 3 at all the rest); "
           "none = every candidate at every draw", shown_default="none", metavar="SCHEDULE", check="run",
           omit_default=True),
    Option("dc_batch_size", "held-out images per UNet call of the DC classification", default=4, flag=None,
           minimum=1),
    Option("multi_pairs", "multi-concept sample pairs after the last task", default=2, quick=1, flag=None,
           check="run", minimum=0),
    Option("eval_every", "score all seen concepts only after every K-th task and the last (long streams; the new "
           "concept is scored after every task)", default=1, type=int, metavar="K", check="run", omit_default=True,
           minimum=1),
    Option("keep_going", "stop at the first failing run instead of recording it and going on", default=True,
           flag="--stop-on-error", action="store_false"),
    Option("progress", "progress bars", default=True, flag=None),
    Option("shard", "run only the K-th of N contiguous slices of the seed-major (method x seed) run list, "
           "1 <= K <= N (0-based SLURM array: --shard $((SLURM_ARRAY_TASK_ID + 1))/N); give each shard its own "
           "--out, then combine them with --merge", metavar="K/N"),
)

OPTIONS_BY_NAME = {o.name: o for o in BENCH_OPTIONS}
SETTING_NAMES = tuple(o.name for o in BENCH_OPTIONS)
