"""The GPU check: every method on the real architectures, in one command, with no downloads.

For each model family (SD 1.5 at 512 px; SDXL at 1024 px) the script builds a random-weight pipeline
with the real architecture (configs written out below; cached in --model-dir), then for every method:

1. ``learn`` 2 tasks x ``--steps`` steps through :func:`conceptstream.api.learn` (bf16 autocast on
   CUDA; SDXL with gradient checkpointing) - task 2 is the first with history (EWC, DSC, C-LoRA);
2. ``generate`` one image from the state (bf16 on CUDA);
3. ``export`` in the diffusers and the kohya format;
4. reload each export in *stock* diffusers (``load_lora_weights`` + ``load_textual_inversion``) and
   generate the same image, comparing pixels with step 2 (mean absolute difference, 0-255).

Per method it records the median training step time, the after-task phase (Fisher, DSC consolidation)
of task 2, peak GPU memory (``torch.cuda.max_memory_allocated``) and pass/fail of every step, in
``benchmarks/results/gpu-<device>.json``. A failing step is recorded and the next method goes on.
Targets reported against (issue "The models and GPUs users have"): SD 1.5 ewc-dc step time <= 1.6x
lora and peak memory <= 1.2x lora; SDXL 1024 ewc-dc with gradient checkpointing under 24 GB.

    python benchmarks/gpu_check.py                    # on a CUDA machine (sized for < 8 min on an H100/H200)
    python benchmarks/gpu_check.py --cpu-small        # tiny widths on the CPU: what CI runs
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sd_scale import build_model, instrumented_learn  # noqa: E402  (the SD 1.5 builder and step clock)

# -- SDXL component configs (public configs of stabilityai/stable-diffusion-xl-base-1.0, written out) ---
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)
SDXL_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=4, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025,
)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
              bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
              num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
              bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
# --cpu-small: same block structure, 128 px, a few channels
SMALL_SDXL_UNET = {**SDXL_UNET, "sample_size": 16, "block_out_channels": (32, 64, 64),
                   "transformer_layers_per_block": (1, 1, 1), "attention_head_dim": (2, 4, 4),
                   "cross_attention_dim": 96, "addition_time_embed_dim": 8,
                   "projection_class_embeddings_input_dim": 64 + 6 * 8}
SMALL_SDXL_VAE = {**SDXL_VAE, "sample_size": 128, "block_out_channels": (32, 32, 64, 64)}
SMALL_CLIP_L = {**CLIP_L, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                "projection_dim": 32}
SMALL_CLIP_G = {**CLIP_G, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                "projection_dim": 64}


def build_sdxl(folder: Path, small: bool, seed: int = 0, device: str = "cpu") -> Path:
    """Random-weight SDXL-shaped pipeline saved at ``folder`` (reused when its configs match)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from conceptstream.world.tiny_model import SCHEDULER_CONFIG, build_clip_tokenizer

    configs = {"unet": SMALL_SDXL_UNET if small else SDXL_UNET, "vae": SMALL_SDXL_VAE if small else SDXL_VAE,
               "text_encoder": SMALL_CLIP_L if small else CLIP_L, "text_encoder_2": SMALL_CLIP_G if small else CLIP_G}
    marker = folder / "gpu_check.json"
    wanted = json.loads(json.dumps({"configs": configs, "seed": seed}))
    if (folder / "model_index.json").is_file() and marker.is_file() and json.loads(marker.read_text()) == wanted:
        return folder
    torch.manual_seed(seed)
    with torch.device(device if device.startswith("cuda") else "cpu"):
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
        text = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))
    tokenizer_2 = build_clip_tokenizer()
    tokenizer_2.pad_token = "!"  # SDXL's second tokenizer pads with "!"
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=build_clip_tokenizer(),
                                     tokenizer_2=tokenizer_2, unet=unet, scheduler=DDIMScheduler(**SCHEDULER_CONFIG))
    pipe.to("cpu").save_pretrained(folder, safe_serialization=True)
    marker.write_text(json.dumps(wanted, indent=2))
    return folder


FAMILIES = {"sd15": build_model, "sdxl": build_sdxl}


def _pixels(images) -> Any:
    import numpy as np

    return np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])


def _stock_images(model: str, family: str, export: Path, prompt: str, seed: int, steps: int,
                  dtype: torch.dtype, device: str) -> Any:
    """Stock diffusers with the exported files: the LoRA through load_lora_weights, each token through
    load_textual_inversion (SDXL: clip_l into text_encoder, clip_g into text_encoder_2)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors.torch import load_file

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    extra = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    pipe = cls.from_pretrained(model, dtype=dtype, use_safetensors=True, **extra).to(device)
    pipe.set_progress_bar_config(disable=True)
    meta = json.loads((export / "export.json").read_text())
    if meta.get("lora"):
        pipe.load_lora_weights(str(export), weight_name=meta["lora"])
    for t in meta.get("tokens") or meta.get("embeddings") or []:
        path = export / t["file"]
        if family == "sdxl":
            tensors = load_file(str(path))
            l_key = "clip_l" if "clip_l" in tensors else next(iter(tensors))
            pipe.load_textual_inversion(tensors[l_key], token=t["token"], text_encoder=pipe.text_encoder,
                                        tokenizer=pipe.tokenizer)
            pipe.load_textual_inversion(tensors["clip_g"], token=t["token"], text_encoder=pipe.text_encoder_2,
                                        tokenizer=pipe.tokenizer_2)
        else:
            pipe.load_textual_inversion(str(path), token=t["token"])
    gen = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, guidance_scale=5.0, generator=gen).images


def check_method(family: str, model: str, method: str, work: Path, args, device: str) -> dict[str, Any]:
    from conceptstream import api
    from conceptstream.evaluation.speed import NOUNS, synthetic_images
    from conceptstream.methods.registry import get_method

    cuda = device.startswith("cuda")
    row: dict[str, Any] = {"family": family, "method": method, "steps": {}}
    known = get_method(method).all_defaults()
    hp = {k: v for k, v in {"dsc_iters": args.dsc_iters, "fisher_passes": 1}.items() if k in known}
    state = work / f"{family}-{method}"

    def step(name: str, fn):
        t0 = time.perf_counter()
        try:
            value = fn()
            row["steps"][name] = {"ok": True, "seconds": round(time.perf_counter() - t0, 3)}
            return value
        except Exception as exc:  # recorded; the next steps of this method are skipped
            row["steps"][name] = {"ok": False, "seconds": round(time.perf_counter() - t0, 3),
                                  "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            if args.verbose:
                traceback.print_exc()
            raise

    try:
        for task in range(2):
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            clock: dict[str, Any] = {}
            images = synthetic_images(4, seed=100 + task)

            def learn(task=task, images=images, clock=clock):
                with instrumented_learn(clock, device):
                    return api.learn(state, images, token=f"<gc-{task}>", noun=NOUNS[task % len(NOUNS)],
                                     method=method, model=model, steps=args.steps, seed=task,
                                     hparams=hp if task == 0 else None, device=device, progress=False,
                                     checkpoint_every=0, mixed_precision="bf16" if cuda else "no",
                                     gradient_checkpointing=family == "sdxl" and not args.cpu_small)

            step(f"learn_task{task + 1}", learn)
            stamps = clock["stamps"]
            deltas = [b - a for a, b in zip(stamps, stamps[1:])]
            row[f"task{task + 1}"] = {"step_s_median": statistics.median(deltas) if deltas else None,
                                      "after_task_s": clock["end"] - stamps[-1]}
            if cuda:
                row[f"task{task + 1}"]["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        info = api.info(state)
        noun = f" {info['concepts'][0]['noun']}" if get_method(method).include_noun else ""
        prompt = f"a photo of a <gc-0>{noun} next to a <gc-1>"
        dtype = torch.bfloat16 if cuda else torch.float32
        ref = step("generate", lambda: _pixels(api.generate(prompt, state=state, n=1, seed=5, steps=args.gen_steps,
                                                            device=device, dtype=dtype, progress=False)))
        for fmt in ("diffusers", "kohya"):
            out = work / f"{family}-{method}-{fmt}"
            step(f"export_{fmt}", lambda out=out, fmt=fmt: api.export(state, out, format=fmt))
            got = step(f"reload_{fmt}", lambda out=out: _pixels(_stock_images(
                model, family, out, prompt, 5, args.gen_steps, dtype, device)))
            diff = float(abs(got - ref).mean())
            row["steps"][f"reload_{fmt}"]["mean_abs_diff"] = round(diff, 3)
            if diff > args.max_pixel_diff:
                row["steps"][f"reload_{fmt}"].update(ok=False, error=f"stock diffusers differs by {diff:.2f} > "
                                                                     f"{args.max_pixel_diff}")
    except Exception:  # noqa: BLE001 - already recorded by step()
        pass
    row["ok"] = bool(row["steps"]) and all(s["ok"] for s in row["steps"].values()) and len(row["steps"]) == 7
    return row


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets, from task 2 (the first with history)."""
    def get(family, method, key):
        for r in rows:
            if r["family"] == family and r["method"] == method and r.get("task2"):
                return r["task2"].get(key)
        return None

    out: dict[str, Any] = {}
    lora_t, ewc_t = get("sd15", "lora", "step_s_median"), get("sd15", "ewc-dc", "step_s_median")
    if lora_t and ewc_t:
        out["sd15_ewc_dc_step_ratio"] = {"value": round(ewc_t / lora_t, 3), "target": "<= 1.6"}
    lora_m, ewc_m = get("sd15", "lora", "peak_gpu_mb"), get("sd15", "ewc-dc", "peak_gpu_mb")
    if lora_m and ewc_m:
        out["sd15_ewc_dc_memory_ratio"] = {"value": round(ewc_m / lora_m, 3), "target": "<= 1.2"}
    xl = get("sdxl", "ewc-dc", "peak_gpu_mb")
    if xl:
        out["sdxl_ewc_dc_peak_gb"] = {"value": round(xl / 1024, 2), "target": "< 24"}
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from conceptstream.methods.registry import method_names
    from conceptstream.system import library_versions, machine_info, machine_name

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and args.cpu_small:
        raise SystemExit("--cpu-small runs on the CPU; drop --device cuda")
    info = machine_info(device)
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else method_names()
    families = [f.strip() for f in args.families.split(",")]
    model_root = Path(args.model_dir or Path(tempfile.gettempdir()) / "conceptstream-gpu-check")
    work = Path(tempfile.mkdtemp(prefix="cs-gpu-check-"))
    rows: list[dict[str, Any]] = []
    t_start = time.time()
    try:
        for family in families:
            folder = model_root / f"{family}{'-small' if args.cpu_small else ''}"
            t0 = time.time()
            FAMILIES[family](folder, args.cpu_small, device=device)
            print(f"[gpu-check] {family} model ready in {time.time() - t0:.0f}s", file=sys.stderr)
            for method in methods:
                row = check_method(family, str(folder), method, work, args, device)
                rows.append(row)
                failed = [k for k, s in row["steps"].items() if not s["ok"]]
                t2 = row.get("task2", {})
                print(f"[gpu-check] {family:<5} {method:<18} {'ok  ' if row['ok'] else 'FAIL'} "
                      f"step {t2.get('step_s_median') or 0:.3f}s after-task {t2.get('after_task_s') or 0:.1f}s "
                      f"peak {t2.get('peak_gpu_mb', 0):.0f} MB {('failed: ' + ', '.join(failed)) if failed else ''}",
                      file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = {"format": "conceptstream-gpu-check", "machine": info, "versions": library_versions(),
               "settings": {"device": device, "cpu_small": args.cpu_small, "steps": args.steps,
                            "gen_steps": args.gen_steps, "dsc_iters": args.dsc_iters, "families": families,
                            "mixed_precision": "bf16" if device.startswith("cuda") else "no",
                            "max_pixel_diff": args.max_pixel_diff},
               "wall_seconds": round(time.time() - t_start, 1), "rows": rows, "targets": targets(rows),
               "all_ok": all(r["ok"] for r in rows)}
    out = Path(args.out or f"benchmarks/results/gpu-{machine_name(info)}{'-small' if args.cpu_small else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"[gpu-check] {'all passed' if results['all_ok'] else 'FAILURES'} in {results['wall_seconds']:.0f}s; "
          f"wrote {out}", file=sys.stderr)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-small", action="store_true", help="tiny widths on the CPU (what CI runs)")
    p.add_argument("--device", default=None, help="default: cuda when there is one")
    p.add_argument("--families", default="sd15,sdxl", help="comma-separated: sd15, sdxl (default both)")
    p.add_argument("--methods", default=None, help="comma-separated (default: every method)")
    p.add_argument("--steps", type=int, default=20, help="training steps per task (2 tasks)")
    p.add_argument("--gen-steps", type=int, default=10, help="sampler steps of the generate/reload comparison")
    p.add_argument("--dsc-iters", type=int, default=5, help="DSC consolidation iterations")
    p.add_argument("--max-pixel-diff", type=float, default=8.0,
                   help="largest mean |pixel difference| (0-255) between generate and stock diffusers that passes")
    p.add_argument("--model-dir", default=None, help="where the random pipelines are built/reused")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu-<device>.json)")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing steps")
    return 0 if run(p.parse_args(argv))["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
