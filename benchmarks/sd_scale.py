"""Training cost of every method at Stable Diffusion 1.5 scale, with random weights (no download).

Builds a pipeline with SD 1.5's architecture from configs written out below (UNet2DConditionModel
860M, AutoencoderKL 84M, CLIP ViT-L/14 text encoder 123M), initialised at random, saves it as a
diffusers folder (cached in --model-dir), and learns ``--tasks`` short tasks with each method
through the real :func:`conceptstream.api.learn` (load state, learn, commit). Task 2 is the
first with regularisers / DSC consolidation active. Per task it prints and records:
load+commit time, first step (warm-up), median step time, the after-task phase (Fisher, DSC
consolidation) and peak memory (``torch.cuda.max_memory_allocated`` on CUDA; on CPU the peak RSS
since the task began - all tasks share one process, so this is indicative only).

    python benchmarks/sd_scale.py --device cuda [--batch 1|4] [--mixed-precision no|bf16|fp16]
        [--gradient-checkpointing] [--steps 5] [--tasks 2] [--methods lora,ewc-dc,...]
    python benchmarks/sd_scale.py --cpu-small        # 128 px, reduced widths: a CPU smoke run

Step times come from timestamps taken in ``on_step`` of :meth:`ConceptStream.learn`, which the
api does not expose: the script wraps ``ConceptStream.learn`` for the duration of the run to
add that callback (measurement only; the training loop is unchanged).

``--mixed-precision`` and ``--gradient-checkpointing`` are passed to ``api.learn`` unchanged.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from conceptstream.precision import PRECISIONS

# -- SD 1.5 component configs (public configs of runwayml/stable-diffusion-v1-5, written out) --------
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
)
CLIP_VIT_L14_TEXT = dict(  # openai/clip-vit-large-patch14 text tower
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
)
# --cpu-small: same block structure, 128 px (latent 16), about a fifth of the width
SMALL_UNET = {**SD15_UNET, "sample_size": 16, "block_out_channels": (64, 128, 256, 256), "cross_attention_dim": 256}
SMALL_VAE = {**SD15_VAE, "sample_size": 128, "block_out_channels": (32, 64, 128, 128)}
SMALL_TEXT = {**CLIP_VIT_L14_TEXT, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
              "num_attention_heads": 4, "projection_dim": 256}


def component_configs(small: bool) -> dict[str, dict]:
    return {"unet": SMALL_UNET if small else SD15_UNET, "vae": SMALL_VAE if small else SD15_VAE,
            "text_encoder": SMALL_TEXT if small else CLIP_VIT_L14_TEXT}


def build_model(folder: Path, small: bool, seed: int = 0, device: str = "cpu") -> Path:
    """Random-weight SD-1.5-shaped pipeline saved at ``folder`` (reused when its configs match)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from conceptstream.world.tiny_model import SCHEDULER_CONFIG, build_clip_tokenizer

    configs = component_configs(small)
    marker = folder / "sd_scale.json"
    wanted = json.loads(json.dumps({"configs": configs, "seed": seed}))
    if (folder / "model_index.json").is_file() and marker.is_file() and json.loads(marker.read_text()) == wanted:
        return folder
    t0 = time.time()
    torch.manual_seed(seed)
    # initialise on the GPU when there is one (much faster for 1B parameters); saved weights are fp32
    with torch.device(device if device.startswith("cuda") else "cpu"):
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
        text = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=build_clip_tokenizer(), unet=unet,
                                   scheduler=DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.to("cpu").save_pretrained(folder, safe_serialization=True)
    marker.write_text(json.dumps(wanted, indent=2))
    counts = {n: sum(p.numel() for p in m.parameters()) for n, m in (("unet", unet), ("vae", vae), ("text", text))}
    print(f"built random {'small ' if small else ''}SD-1.5-shaped pipeline in {time.time() - t0:.0f}s at {folder}: "
          + ", ".join(f"{n} {c / 1e6:.0f}M" for n, c in counts.items()), file=sys.stderr)
    return folder


# -- measurement -------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@contextlib.contextmanager
def instrumented_learn(clock: dict[str, Any], device: str):
    """Wrap ConceptStream.learn to time every step (via its on_step); the learn loop is unchanged."""
    from conceptstream.engine import ConceptStream

    original = ConceptStream.learn

    def learn(self, *args, **kwargs):
        user = kwargs.pop("on_step", None)
        clock["stamps"] = []

        def on_step(step, info):
            _sync(device)
            clock["stamps"].append(time.perf_counter())
            if user is not None:
                user(step, info)

        clock["start"] = time.perf_counter()
        try:
            return original(self, *args, on_step=on_step, **kwargs)
        finally:
            _sync(device)
            clock["end"] = time.perf_counter()

    ConceptStream.learn = learn
    try:
        yield
    finally:
        ConceptStream.learn = original


def run(args: argparse.Namespace) -> dict[str, Any]:
    from conceptstream import api
    from conceptstream.evaluation.speed import NOUNS, synthetic_images
    from conceptstream.methods.registry import get_method, method_names
    from conceptstream.system import (
        library_versions,
        loadavg,
        machine_info,
        machine_name,
        peak_rss_mib,
        reset_peak_rss,
    )

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info(device)
    small = args.cpu_small
    model_dir = Path(args.model_dir or Path(tempfile.gettempdir()) / f"conceptstream-sd15-random{'-small' if small else ''}")
    build_model(model_dir, small, device=device)
    extra: dict[str, Any] = {"mixed_precision": args.mixed_precision,
                             "gradient_checkpointing": args.gradient_checkpointing}
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else method_names()
    cuda = device.startswith("cuda")
    rows = []
    work = Path(tempfile.mkdtemp(prefix="cs-sd-scale-"))  # the states; removed on exit
    atexit.register(shutil.rmtree, work, True)
    print(f"{'method':<18} task  load+commit  first step   step (med)   after-task  peak {'GPU' if cuda else 'RSS'} MB",
          file=sys.stderr)
    for method in methods:
        known = get_method(method).all_defaults()
        hp = {k: v for k, v in {"batch_size": args.batch, "dsc_iters": args.dsc_iters,
                                "fisher_passes": args.fisher_passes}.items() if k in known}
        state = work / f"state-{method}"
        for task in range(args.tasks):
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            reset_peak_rss()
            clock: dict[str, Any] = {}
            t0 = time.perf_counter()
            try:
                with instrumented_learn(clock, device):
                    report = api.learn(state, synthetic_images(args.images, seed=100 + task), token=f"<sd-{task}>",
                                       noun=NOUNS[task % len(NOUNS)], method=method, model=str(model_dir),
                                       steps=args.steps, seed=task, adapter="lora" if method == "c-lora" else args.adapter,
                                       hparams=hp if task == 0 else None, device=device, progress=False,
                                       checkpoint_every=0, **extra)
            except Exception as exc:  # keep going: one failing method must not hide the others
                print(f"{method:<18} {task + 1:>4}  FAILED: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
                rows.append({"method": method, "task": task + 1, "error": f"{type(exc).__name__}: {exc}"})
                break
            wall = time.perf_counter() - t0
            stamps = clock["stamps"]
            steps_s = [b - a for a, b in zip(stamps, stamps[1:])]
            row = {"method": method, "task": task + 1, "wall_s": wall, "learn_s": clock["end"] - clock["start"],
                   "load_commit_s": wall - (clock["end"] - clock["start"]),
                   "prepare_and_first_step_s": stamps[0] - clock["start"],
                   "step_s_median": statistics.median(steps_s) if steps_s else None,
                   "after_task_s": clock["end"] - stamps[-1], "final_loss": report.final_loss,
                   "peak_rss_mb": peak_rss_mib()}
            if cuda:
                row["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
            rows.append(row)
            step = "-" if row["step_s_median"] is None else f"{row['step_s_median']:.3f}s"
            mem = row.get("peak_gpu_mb", row["peak_rss_mb"])
            print(f"{method:<18} {task + 1:>4}  {row['load_commit_s']:>10.1f}s  {row['prepare_and_first_step_s']:>9.2f}s  "
                  f"{step:>11}  {row['after_task_s']:>10.2f}s  {mem:>10.0f}", file=sys.stderr)
    info["loadavg_end"] = loadavg()
    results = {
        "format": "conceptstream-sd-scale", "machine": info, "versions": library_versions(),
        "settings": {"small": small, "resolution": component_configs(small)["unet"]["sample_size"] * 8,
                     "configs": component_configs(small), "device": device, "batch_size": args.batch,
                     "steps": args.steps, "tasks": args.tasks, "images": args.images, "adapter": args.adapter,
                     "dsc_iters": args.dsc_iters, "fisher_passes": args.fisher_passes,
                     "mixed_precision": args.mixed_precision,
                     "gradient_checkpointing": args.gradient_checkpointing},
        "rows": rows,
    }
    name = machine_name(info) + ("-small" if small else "")
    out = Path(args.out or f"benchmarks/results/sd-scale-{name}-b{args.batch}-{args.mixed_precision}"
               f"{'-gc' if args.gradient_checkpointing else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-small", action="store_true", help="128 px and reduced widths (CPU smoke run)")
    p.add_argument("--device", default=None)
    p.add_argument("--batch", type=int, default=1, help="training batch size (the methods' batch_size setting)")
    p.add_argument("--mixed-precision", default="no", choices=PRECISIONS)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=5, help="training steps per task")
    p.add_argument("--tasks", type=int, default=2, help="tasks per method (2: the second has history)")
    p.add_argument("--images", type=int, default=4, help="training images per task")
    p.add_argument("--methods", default=None, help="comma-separated (default: all)")
    p.add_argument("--adapter", default="lora", choices=["lora", "vera"])
    p.add_argument("--dsc-iters", type=int, default=2, help="DSC consolidation iterations (default method value: 100)")
    p.add_argument("--fisher-passes", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--model-dir", default=None, help="where the random pipeline is built/reused")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/sd-scale-<machine>-....json)")
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
