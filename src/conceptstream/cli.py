"""Command line: a thin layer over :mod:`conceptstream.api`; no logic of its own."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from conceptstream.precision import BASE_TRAINING_PRECISIONS, PRECISIONS


def _kv(text: str) -> tuple[str, str]:
    """``--set KEY=VALUE`` of `learn`: the value stays text; `learn` converts and checks it against the
    method's setting (``methods.registry.validate_settings``)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set takes KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip().replace("-", "_"), value.strip()


def _int_tuple(text: str) -> tuple[int, ...]:
    """A comma-separated list of integers (``--unet-channels 64,128,192,192``)."""
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 64,128,192,192, got {text!r}") from None


class _AdapterKinds:
    """``--adapter`` choices from the adapter registry, looked up only when used (the registry imports torch)."""

    def _kinds(self) -> list[str]:
        from conceptstream.adapters.registry import adapter_kinds

        return adapter_kinds()

    def __contains__(self, value: object) -> bool:
        return value in self._kinds()

    def __iter__(self):
        return iter(self._kinds())


DEVICE_HELP = "torch device, e.g. cpu, cuda or cuda:1 (default: the GPU if there is one, else the CPU)"
# Every built-in method's own steps per task (ContinualMethod.default_steps; tests/test_cli_help.py checks it)
STEPS_DEFAULT_HELP = "default: the method's own, 200; textual-inversion 1000 (docs/DEFAULTS.md)"
MODEL_HELP = "base model: 'tiny' (bundled, the default), a diffusers SD 1.x/2.x or SDXL pipeline folder, or a hub id"


def build_parser() -> argparse.ArgumentParser:
    from conceptstream import __version__

    p = argparse.ArgumentParser(prog="conceptstream", description="Teach a text-to-image diffusion model a stream "
                                "of personal concepts, one at a time, without forgetting.")
    p.add_argument("--version", action="version", version=f"conceptstream {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to do")

    # world -----------------------------------------------------------------------------------
    world = sub.add_parser("world", help="the tabletop world: classes, concept sequences, base-model training")
    wsub = world.add_subparsers(dest="world_command", required=True, metavar="WORLD_COMMAND",
                                help="what to do with the world")
    wl = wsub.add_parser("list", help="list base classes and named sequences")
    wl.add_argument("--json", action="store_true", help="print JSON instead of a table")
    we = wsub.add_parser("export", help="write a named sequence in the concept folder format")
    we.add_argument("sequence", help="named sequence, e.g. tabletop-6 (see `conceptstream world list`)")
    we.add_argument("dir", help="folder to write: sequence.json plus one concept folder per concept")
    we.add_argument("--train-views", type=int, default=12, help="training views per concept (default %(default)s)")
    we.add_argument("--val-views", type=int, default=12,
                    help="held-out validation views per concept, in val/ (default %(default)s)")
    we.add_argument("--eval-views", type=int, default=12,
                    help="held-out evaluation views per concept (default %(default)s)")
    we.add_argument("--seed", type=int, default=0, help="render seed (default %(default)s)")
    wc = wsub.add_parser("export-classes", help="write N real renders per base class as DIR/<noun>/*.png")
    wc.add_argument("dir", help="folder to write, one sub-folder per class noun")
    wc.add_argument("-n", type=int, default=16, help="renders per class (default %(default)s)")
    wc.add_argument("--seed", type=int, default=1, help="render seed (default %(default)s)")
    wt = wsub.add_parser("train-base", help="train (or resume training) the bundled tiny base model")
    wt.add_argument("--workdir", required=True, help="where data, checkpoints and progress live (resumable)")
    wt.add_argument("--out", default=None, help="pipeline folder to write (default: the bundled model's folder)")
    wt.add_argument("--images-per-class", type=int, default=1500,
                    help="training renders per base class (default %(default)s)")
    wt.add_argument("--vae-steps", type=int, default=1500, help="VAE training steps (default %(default)s)")
    wt.add_argument("--decoder-steps", type=int, default=0,
                    help="adversarial decoder fine-tuning steps after the VAE (encoder frozen); off by default")
    wt.add_argument("--unet-steps", type=int, default=40000,
                    help="UNet + text encoder training steps (default %(default)s)")
    wt.add_argument("--latent-channels", type=int, default=4,
                    help="VAE latent channels (UNet input/output); 4 as in SD 1.x, 8 keeps finer patterns")
    wt.add_argument("--vae-downsample", type=int, default=4, choices=(2, 4),
                    help="VAE downsampling: 4 gives 16x16 latents (default), 2 gives 32x32 (a costlier UNet)")
    wt.add_argument("--vae-generic-fraction", type=float, default=0.0,
                    help="share of each VAE batch drawn from generic patterns/textures/photos, never a personal "
                         "concept's look (default %(default)s: renders only)")
    wt.add_argument("--vae-generic-images", type=int, default=6000,
                    help="how many generic VAE images to render into the work dir (default %(default)s)")
    wt.add_argument("--unet-pattern-images", type=int, default=0,
                    help="renders of base-class objects in concept patterns and colour pairs, captioned with both, "
                         "added to the UNet's data; never a personal concept's look (default %(default)s: none)")
    wt.add_argument("--noise-offset", type=float, default=0.0,
                    help="offset noise of the UNet stage: one extra N(0, x^2) value per sample and channel "
                         "(0.05-0.1 is usual; default %(default)s: off)")
    wt.add_argument("--mixed-precision", choices=BASE_TRAINING_PRECISIONS, default="no",
                    help="the UNet stage's forward in bf16 autocast (weights, optimizer and loss stay fp32); pays on "
                         "CPUs with AVX512-BF16/AMX and on GPUs (default %(default)s: fp32)")
    wt.add_argument("--unet-channels", type=_int_tuple, default=None,
                    help="the UNet's width, one number per block, multiples of 32 (e.g. 64,128,192,192; default: "
                         "32,64,96,96 at 32x32 latents); another UNet than --init-from's trains from step 0 on its VAE")
    wt.add_argument("--unet-layers-per-block", type=int, default=1,
                    help="the UNet's depth: resnets (and attention layers) per block (default %(default)s)")
    wt.add_argument("--batch-size", type=int, default=32,
                    help="batch size of the VAE and UNet stages (default %(default)s)")
    wt.add_argument("--max-minutes", type=float, default=None, help="stop cleanly (checkpoint + export) after this")
    wt.add_argument("--seed", type=int, default=0,
                    help="seed of initialisation, renders, batches and noise (default %(default)s)")
    wt.add_argument("--device", default="cpu",
                    help="torch device of the training: cpu (default), cuda or cuda:N; checkpoints resume on any device")
    wt.add_argument("--render-workers", type=int, default=1,
                    help="processes that render the training images (the same images for any count; default "
                         "%(default)s)")
    wt.add_argument("--init-from", default=None,
                    help="seed an empty --workdir from an exported model folder (e.g. the bundled one) and continue")

    # generate --------------------------------------------------------------------------------
    g = sub.add_parser("generate", help="sample images from the base model or a learned stream")
    g.add_argument("prompt", help="text prompt; learned tokens such as '<my-dog>' need --state")
    g.add_argument("-n", type=int, default=4, help="number of images, >= 1 (image i uses seed + i; default %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed of the first image (default %(default)s)")
    g.add_argument("-o", "--out", default="out/generate.png",
                   help="file.png for the image (a grid when -n > 1), folder/ for one PNG each")
    g.add_argument("--model", default=None, help=MODEL_HELP)
    g.add_argument("--state", default=None, help="a concept-stream state directory")
    g.add_argument("--steps", type=int, default=30, help="sampler steps (default %(default)s)")
    g.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default %(default)s)")
    g.add_argument("--device", default=None, help=DEVICE_HELP)
    g.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="precision of the model while sampling (fp16/bf16 halve GPU memory; the state keeps fp32 values; "
                        "default %(default)s)")

    # learn -----------------------------------------------------------------------------------
    lp = sub.add_parser("learn", help="add one concept to a stream (creates STATE on the first call)")
    lp.add_argument("state", help="the stream's state directory (created on the first call)")
    lp.add_argument("--images", required=True, help="folder of images, or a concept folder")
    lp.add_argument("--token", default=None, help="new modifier token, e.g. '<my-dog>'")
    lp.add_argument("--noun", default=None, help="class noun the base model knows, e.g. 'dog'")
    lp.add_argument("--method", default=None, help="continual method (first call only; default ewc-dc)")
    lp.add_argument("--adapter", default=None, choices=_AdapterKinds(), metavar="KIND",
                    help="adapter on the UNet: %(choices)s (first call only; default lora)")
    lp.add_argument("--rank", type=int, default=None,
                    help="adapter rank (first call only; default: the adapter kind's own, docs/DEFAULTS.md)")
    lp.add_argument("--targets", default=None, choices=["cross-kv", "attention"],
                    help="UNet layers the adapter wraps (first call only; default cross-kv)")
    lp.add_argument("--set", dest="hparams", action="append", type=_kv, default=[], metavar="KEY=VALUE",
                    help="method setting, e.g. --set ewc_lambda=100 (first call only)")
    lp.add_argument("--model", default=None,
                    help=MODEL_HELP + "; later calls default to the state's own and refuse another model")
    lp.add_argument("--steps", type=int, default=None,
                    help=f"training steps ({STEPS_DEFAULT_HELP})")
    lp.add_argument("--seed", type=int, default=None,
                    help="training seed (default 0); on a new stream it also seeds the adapter's initialisation")
    lp.add_argument("--device", default=None, help=DEVICE_HELP)
    lp.add_argument("--mixed-precision", default="no", choices=PRECISIONS,
                    help="autocast training forward passes through accelerate (bf16; fp16 on GPUs only; "
                         "trained values stay fp32)")
    lp.add_argument("--gradient-checkpointing", action="store_true", help="recompute UNet activations to save memory")
    lp.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                    help="save the task's progress into STATE every N steps (default 50; 0 = never) so that an "
                         "interrupted task can be continued with --resume")
    resume = lp.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true",
                        help="continue the interrupted task from its checkpoint (same --images; token, noun, steps "
                             "and seed come from the checkpoint)")
    resume.add_argument("--discard-checkpoint", action="store_true",
                        help="drop the interrupted task's checkpoint and learn from scratch")

    ip = sub.add_parser("info", help="what a state holds")
    ip.add_argument("state", help="a concept-stream state directory")
    ip.add_argument("--json", action="store_true", help="print JSON instead of text")

    ep = sub.add_parser("export", help="export a state for stock diffusers or A1111/ComfyUI/kohya (LoRA + "
                        "textual-inversion files)")
    ep.add_argument("state", help="a concept-stream state directory")
    ep.add_argument("out", help="folder to write (created if missing)")
    ep.add_argument("--format", default="diffusers", choices=["diffusers", "kohya"],
                    help="diffusers (default): pytorch_lora_weights.safetensors + tokens/ for stock diffusers; "
                         "kohya: OUT/NAME.safetensors (kohya LoRA keys: A1111 models/Lora, ComfyUI models/loras) + "
                         "OUT/embeddings/WORD.safetensors (A1111 embeddings/, ComfyUI models/embeddings/; token "
                         "<my-dog> -> prompt word my-dog) + README.md; VeRA streams: diffusers only")
    ep.add_argument("--name", default=None,
                    help="--format kohya: the LoRA's file name and A1111 tag <lora:NAME:1> (default: the state "
                         "folder's name)")

    from conceptstream.evaluation.bench.options import BENCH_OPTIONS
    from conceptstream.evaluation.options import add_arguments
    from conceptstream.evaluation.speed.settings import SPEED_OPTIONS

    bp = sub.add_parser("bench", help="run the continual-personalization benchmark (methods x seeds) and write "
                        "results.json + report.md; reruns resume")
    add_arguments(bp, BENCH_OPTIONS)
    bp.add_argument("--merge", nargs="+", metavar="DIR", default=None,
                    help="instead of running: combine the --out folders of the N shards of a --shard K/N split "
                         "into --out (results.json + report.md, run folders without their state/); shards made "
                         "under other settings are refused; takes no other option")

    dp = sub.add_parser("demo", help="learn a 3-concept tabletop stream with ewc-dc and write grids + a report")
    dp.add_argument("--out", default="out/demo", help="folder for data, state, grids and report.md (default %(default)s)")
    dp.add_argument("--steps", type=int, default=None,
                    help=f"training steps per concept ({STEPS_DEFAULT_HELP})")
    dp.add_argument("--method", default="ewc-dc", help="continual method (default %(default)s)")

    sp = sub.add_parser("bench-speed", help="time, memory and state size of every method as ratios (vs lora, vs the "
                        "raw UNet, vs the bare base pipeline), measured in one run on this machine")
    add_arguments(sp, SPEED_OPTIONS)
    return p


def run(args: argparse.Namespace) -> int:
    from conceptstream import api

    if args.command == "world":
        return _world(args)
    if args.command == "generate":
        images = api.generate(args.prompt, state=args.state, model=args.model, n=args.n, seed=args.seed,
                              steps=args.steps, guidance=args.guidance, device=args.device, dtype=args.dtype)
        paths = api.save_images(images, args.out)
        print(f"wrote {len(images)} image(s) to {paths[0] if len(paths) == 1 else Path(args.out)}")
        return 0
    if args.command == "learn":
        from conceptstream.engine import DEFAULT_CHECKPOINT_EVERY

        every = DEFAULT_CHECKPOINT_EVERY if args.checkpoint_every is None else args.checkpoint_every
        report = api.learn(args.state, args.images, token=args.token, noun=args.noun, method=args.method,
                           model=args.model, steps=args.steps, seed=args.seed, adapter=args.adapter,
                           rank=args.rank, targets=args.targets, hparams=dict(args.hparams), device=args.device,
                           checkpoint_every=every, resume=args.resume, discard_checkpoint=args.discard_checkpoint,
                           mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing)
        from conceptstream.distributed import is_main_process

        if is_main_process():  # under a multi-process launch only the main process saved the state
            print(f"learned {report.token} ({report.noun}) as task {report.task_index} in {report.seconds:.0f}s; "
                  f"final loss {report.final_loss:.4f}; state saved to {args.state}")
        return 0
    if args.command == "info":
        data = api.info(args.state)
        print(json.dumps(data, indent=2) if args.json else api.format_info(data))
        return 0
    if args.command == "export":
        written = api.export(args.state, args.out, format=args.format, name=args.name)
        print(f"exported {len(written)} file(s) to {args.out}:")
        for w in written:
            print(f"  {w}")
        return 0
    if args.command == "bench":
        from conceptstream.evaluation import bench
        from conceptstream.evaluation.bench.options import BENCH_OPTIONS
        from conceptstream.evaluation.options import cli_values

        if args.merge is not None:
            _refuse_with_merge(args, BENCH_OPTIONS)
            results = bench.merge_bench(args.merge, args.out)
        else:
            results = bench.run_bench(**cli_values(args, BENCH_OPTIONS))
        print(bench.format_summary(results))
        return 1 if results["failed"] else 0
    if args.command == "demo":
        from conceptstream.demo import run_demo

        report = run_demo(args.out, steps=args.steps, method=args.method)
        print(f"demo finished: report at {report}")
        return 0
    if args.command == "bench-speed":
        from conceptstream.evaluation import speed
        from conceptstream.evaluation.options import cli_values
        from conceptstream.evaluation.speed.settings import SPEED_OPTIONS

        given = {k: v for k, v in cli_values(args, SPEED_OPTIONS).items() if v is not None and k != "json"}
        results = speed.run_speed(**given)
        print(json.dumps(results, indent=2) if args.json else speed.format_table(results))
        return 0
    raise AssertionError(args.command)


def _refuse_with_merge(args: argparse.Namespace, options) -> None:
    """``bench --merge`` uses the shards' own settings: a bench option given beside it is a mistake."""
    from conceptstream.errors import UserInputError

    for o in options:
        if o.cli_flag is None or o.name == "out":
            continue
        unset = {"store_true": False, "store_false": True, "append": []}.get(o.action)
        if getattr(args, o.name) != unset:
            raise UserInputError(f"bench --merge combines finished shards under their own settings; drop "
                                 f"{o.cli_flag}")


def _world(args: argparse.Namespace) -> int:
    from conceptstream.world import catalogue

    if args.world_command == "list":
        data = {
            "classes": [{"key": c.key, "noun": c.noun} for c in catalogue.BASE_CLASSES],
            "sequences": {name: {"description": catalogue.SEQUENCE_DESCRIPTIONS[name], "concepts": list(seq)}
                          for name, seq in catalogue.SEQUENCES.items()},
        }
        if args.json:
            print(json.dumps(data, indent=2))
        else:
            print("base classes:")
            for c in data["classes"]:
                print(f"  {c['key']:<8} {c['noun']}")
            print("sequences:")
            for name, s in data["sequences"].items():
                print(f"  {name:<12} {s['description']}")
        return 0
    if args.world_command == "export":
        from conceptstream.world.folders import export_sequence

        concepts = catalogue.get_sequence(args.sequence)
        export_sequence(concepts, Path(args.dir), args.train_views, args.eval_views, args.seed, progress=True,
                        val_views=args.val_views)
        print(f"wrote {len(concepts)} concept folders to {args.dir}")
        return 0
    if args.world_command == "export-classes":
        from conceptstream.world.folders import export_classes

        if args.n < 1:
            from conceptstream.errors import UserInputError

            raise UserInputError(f"-n must be >= 1, got {args.n}")
        export_classes(Path(args.dir), args.n, args.seed, progress=True)
        print(f"wrote {args.n} renders per class to {args.dir}")
        return 0
    if args.world_command == "train-base":
        from conceptstream.models.loading import bundled_model
        from conceptstream.world.train_base import BaseTrainer, BaseTrainingConfig

        cfg = BaseTrainingConfig(workdir=args.workdir, out=args.out or str(bundled_model()),
                                 images_per_class=args.images_per_class, vae_steps=args.vae_steps,
                                 decoder_steps=args.decoder_steps,
                                 unet_steps=args.unet_steps, batch_size=args.batch_size, max_minutes=args.max_minutes,
                                 seed=args.seed, init_from=args.init_from, latent_channels=args.latent_channels,
                                 vae_downsample=args.vae_downsample, vae_generic_fraction=args.vae_generic_fraction,
                                 vae_generic_images=args.vae_generic_images,
                                 unet_pattern_images=args.unet_pattern_images, noise_offset=args.noise_offset,
                                 mixed_precision=args.mixed_precision,
                                 unet_channels=args.unet_channels, unet_layers_per_block=args.unet_layers_per_block,
                                 device=args.device,
                                 render_workers=args.render_workers)
        out = BaseTrainer(cfg).run()
        print(f"exported model to {out}" if out else f"stopped early; resume with the same command ({args.workdir})")
        return 0
    raise AssertionError(args.world_command)


def _interrupted_message(args: argparse.Namespace, generation_before: str | None) -> str:
    """One line for Ctrl-C / SIGTERM: what happened to the state and how to continue."""
    if args.command != "learn":
        return "conceptstream: interrupted"
    from conceptstream.state import StateStore

    try:
        store = StateStore(args.state)
        if _generation(args.state) != generation_before:
            return f"conceptstream: interrupted after the task was saved to {args.state}"
        checkpoint = store.load_checkpoint()
    except Exception:  # the message itself must never fail
        checkpoint = None
    text = "conceptstream: interrupted; the saved state is unchanged"
    if checkpoint is not None:
        info = checkpoint[1]
        text += (f"; progress of {info.get('token')} is checkpointed at step {info.get('step')}/{info.get('steps')}: "
                 f"continue with `conceptstream learn {args.state} --images {args.images} --resume`")
    return text


def _generation(state: str) -> str | None:
    try:
        return (Path(state) / "CURRENT").read_text().strip()
    except OSError:
        return None


def _raise_interrupt(signum, frame):  # SIGTERM behaves like Ctrl-C: clean exit, state unchanged
    raise KeyboardInterrupt


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"conceptstream: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    import signal
    import warnings

    from conceptstream.errors import ConceptstreamError

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    generation_before = _generation(args.state) if args.command == "learn" else None
    try:
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread (embedded use): keep the default
        previous = None
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return run(args)
    except ConceptstreamError as exc:
        print(f"conceptstream: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(_interrupted_message(args, generation_before), file=sys.stderr)
        return 130
    except OSError as exc:  # a file the user named cannot be read or written
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"conceptstream: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
