"""The verbs users call (the CLI is a thin layer over these): learn, generate, info, export.

A state directory is the user's personalised model. ``learn`` takes the state's lock, rebuilds
the stream, learns one concept in memory and commits a new generation atomically: a crash or
Ctrl-C at any moment leaves the previous state exactly as it was.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from conceptstream.adapters.registry import AdapterSpec, adapter_default_rank
from conceptstream.distributed import check_device, default_device, is_main_process
from conceptstream.engine import (
    DEFAULT_CHECKPOINT_EVERY,
    ConceptStream,
    StreamSettings,
    TaskReport,
    TrainingDiverged,
)
from conceptstream.errors import ConceptstreamError, StateError, UserInputError
from conceptstream.methods.registry import validate_settings
from conceptstream.scoring.dc import DCConfig
from conceptstream.state import StateStore

TENSOR_FILES = ("tokens", "adapter", "method")


def _device(device: str | None) -> str:
    return check_device(device) if device else default_device()


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def sampling_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"fp32"``/``"fp16"``/``"bf16"`` (or a torch dtype among those) as a torch dtype; else a one-line error."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise UserInputError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def open_stream(state: str | Path, model: str | None = None, device: str | None = None,
                dtype: torch.dtype = torch.float32) -> ConceptStream:
    """Load an existing state directory as a :class:`ConceptStream` (read-only use)."""
    store = StateStore(state)
    if not store.exists():
        raise UserInputError(f"{state} is not a conceptstream state (create one with `conceptstream learn {state} ...`)")
    manifest = store.read_manifest()
    tensors = {name: store.load_tensors(name) for name in TENSOR_FILES if store.has_file(name)}
    try:
        return ConceptStream.from_state(manifest, tensors, model=model, device=_device(device), dtype=dtype,
                                        path=Path(state))
    except ConceptstreamError:
        raise
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:  # tensors that do not fit the manifest/model
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise StateError(f"{state} cannot be loaded ({type(exc).__name__}: {first}); its files do not fit its "
                         "manifest or this base model — restore the state from a backup") from None


def _resolve_concept(images: str | Path, token: str | None, noun: str | None,
                     required: bool = True) -> tuple[list[Path], str | None, str | None]:
    from conceptstream.concepts.folder import read_concept
    from conceptstream.concepts.images import collect_image_paths

    src = Path(images)
    if (src / "concept.json").is_file():
        folder = read_concept(src)
        token = token or folder.token
        noun = noun or folder.noun
    if required and not token:
        raise UserInputError("--token is required (e.g. --token '<my-dog>') unless --images is a concept folder")
    if required and not noun:
        raise UserInputError("--noun is required (the class noun, e.g. --noun dog) unless --images is a concept folder")
    return collect_image_paths(src), token, noun


def learn(state: str | Path, images: str | Path | list[Image.Image], token: str | None = None,
          noun: str | None = None, method: str | None = None, model: str | None = None,
          steps: int | None = None, seed: int | None = None, adapter: str | None = None, rank: int | None = None,
          targets: str | None = None, adapter_seed: int | None = None, hparams: dict[str, Any] | None = None,
          dc: dict[str, Any] | None = None, device: str | None = None, progress: bool = True,
          checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY, resume: bool = False, discard_checkpoint: bool = False,
          mixed_precision: str = "no", gradient_checkpointing: bool = False) -> TaskReport:
    """Add one concept to the stream at ``state`` (created on the first call).

    Every ``checkpoint_every`` steps (0: never) the task's progress is saved in ``state/checkpoint/``
    (trained values, optimizer and RNG state; never images or latents). An interrupted task is continued
    with ``resume=True`` from the same images (the token, noun, steps and seed come from the checkpoint)
    or dropped with ``discard_checkpoint=True``; a plain call while a checkpoint is pending is refused,
    so progress is never thrown away silently. ``steps`` defaults to the method's ``default_steps`` (200 for
    every built-in method) and ``seed`` to 0 for a new task.

    The call that creates the stream also fixes its adapter's initialisation (LoRA's A, VeRA's shared
    projections) from ``adapter_seed``, by default this first task's ``seed``: bench seed k, whose first
    task learns with seed ``1000 * k``, starts from its own initialisation. The seed is recorded in the
    manifest's adapter spec; later calls keep it (an ``adapter_seed`` that differs is refused).
    """
    from conceptstream.concepts.folder import validate_token

    if resume and discard_checkpoint:
        raise UserInputError("--resume and --discard-checkpoint cannot be combined; pick one")
    if steps is not None and steps < 1:
        raise UserInputError(f"--steps must be >= 1, got {steps}")
    if checkpoint_every < 0:
        raise UserInputError(f"--checkpoint-every must be >= 0 (0 = no checkpoints), got {checkpoint_every}")
    paths: list[Path] | None = None
    pil_images: list[Image.Image] | None = None
    if isinstance(images, list):
        if not resume and (not token or not noun):
            raise UserInputError("token and noun are required when passing images directly")
        pil_images = images
    else:
        paths, token, noun = _resolve_concept(images, token, noun, required=not resume)
    if token is not None:
        validate_token(token)
    store = StateStore(state)
    # Under `accelerate launch` only the main process locks, checkpoints and commits; the others train
    # alongside it (their gradients are averaged into the main process's) and leave the state alone.
    main = is_main_process()
    created = main and not store.path.exists()
    try:
        with store.lock() if main else contextlib.nullcontext():
            if discard_checkpoint and main:
                store.clear_checkpoint()
            checkpoint = None if discard_checkpoint else store.load_checkpoint()
            if checkpoint is not None and not resume:
                i = checkpoint[1]
                raise StateError(f"{state} has an interrupted task ({i.get('token')} {i.get('noun')}, step "
                                 f"{i.get('step')}/{i.get('steps')}); rerun with --resume to continue it or "
                                 "--discard-checkpoint to drop it")
            if checkpoint is None and resume:
                raise UserInputError(f"{state} has no interrupted task to resume; drop --resume")
            if checkpoint is not None:
                info = checkpoint[1]
                token, noun, steps, seed = _resume_task(info, token, noun, steps, seed)
                n_images = len(paths) if paths is not None else len(pil_images or [])
                if n_images != info.get("images"):
                    raise UserInputError(f"the interrupted task was learning from {info.get('images')} images but "
                                         f"{n_images} were given; resume with the same images or start over with "
                                         "--discard-checkpoint")
            seed = 0 if seed is None else seed
            if store.exists() and token in {c["token"] for c in store.read_manifest()["concepts"]}:
                raise UserInputError(f"token {token!r} is already in this stream; pick a new token for a new concept")
            if checkpoint is not None and not store.exists():
                stream = _stream_from_checkpoint(checkpoint[1], method, adapter, rank, targets, hparams, model, device,
                                                 adapter_seed)
            else:
                stream = _stream_to_learn(store, method, model, seed, adapter, rank, targets, adapter_seed, hparams, dc,
                                          device)
            steps = stream.method.default_steps if steps is None else steps
            if paths is not None:
                from conceptstream.concepts.images import load_images

                pil_images = load_images(paths, stream.resolution)
            try:
                report = stream.learn(pil_images or [], token, noun, steps=steps, seed=seed, progress=progress,
                                      checkpoint_every=checkpoint_every,
                                      on_checkpoint=store.save_checkpoint if checkpoint_every and main else None,
                                      resume=checkpoint, mixed_precision=mixed_precision,
                                      gradient_checkpointing=gradient_checkpointing)
            except TrainingDiverged:
                if main:
                    store.clear_checkpoint()  # resuming would diverge again at the same step
                raise
            if main:
                store.commit(stream.manifest, stream.state_tensors())
    finally:
        if created:
            _remove_if_unused(store.path)
    return report


def _stream_to_learn(store: StateStore, method, model, seed: int, adapter, rank, targets, adapter_seed, hparams, dc,
                     device) -> ConceptStream:
    """The stream a new task learns into: the saved one (whose settings the given ones must match), or a new one."""
    if store.exists():
        stream = open_stream(store.path, model=model, device=device)
        _check_same_settings(stream, method, adapter, rank, targets, hparams, adapter_seed)
        return stream
    kind = adapter or "lora"
    spec = AdapterSpec(kind=kind, rank=rank or adapter_default_rank(kind), targets=targets or "cross-kv",
                       seed=seed if adapter_seed is None else adapter_seed)
    settings = StreamSettings(method=method or "ewc-dc", adapter=spec,
                              hparams=validate_settings(method or "ewc-dc", hparams or {}, kind),
                              dc=DCConfig.from_user(dc or {}))
    return ConceptStream.new(model or "tiny", settings, device=_device(device))


def learn_joint(state: str | Path, concepts: list[str | Path], method: str = "lora", model: str | None = None,
                steps: int | None = None, seed: int = 0, adapter: str | None = None, rank: int | None = None,
                targets: str | None = None, adapter_seed: int | None = None, hparams: dict[str, Any] | None = None,
                device: str | None = None, progress: bool = True) -> TaskReport:
    """Learn several concept folders together, in one task of ``steps`` steps (default 200 per concept), into
    the stream at ``state`` (created if needed): the *joint* reference bound of the bench, not continual
    learning. Committed atomically like :func:`learn`; no in-task checkpoints (an interruption loses the task,
    never the saved state). Only ``method="lora"`` and SD 1.x/2.x pipelines."""
    from conceptstream.concepts.images import load_images

    if not concepts:
        raise UserInputError("learn_joint needs at least one concept folder")
    if steps is not None and steps < 1:
        raise UserInputError(f"--steps must be >= 1, got {steps}")
    resolved = [_resolve_concept(c, None, None) for c in concepts]
    store = StateStore(state)
    created = not store.path.exists()
    try:
        with store.lock():
            if store.load_checkpoint() is not None:
                raise StateError(f"{state} has an interrupted task; finish it with `learn --resume` or drop it with "
                                 "--discard-checkpoint before learning jointly")
            stream = _stream_to_learn(store, method, model, seed, adapter, rank, targets, adapter_seed, hparams, None,
                                      device)
            items = [(load_images(paths, stream.resolution), token, noun) for paths, token, noun in resolved]
            report = stream.learn_joint(items, steps=steps or stream.method.default_steps * len(items), seed=seed,
                                        progress=progress)
            store.commit(stream.manifest, stream.state_tensors())
    finally:
        if created:
            _remove_if_unused(store.path)
    return report


def _resume_task(info: dict[str, Any], token, noun, steps, seed) -> tuple[str, str, int, int]:
    """The interrupted task's token/noun/steps/seed; given values must match them."""
    for flag, given, key in (("--token", token, "token"), ("--noun", noun, "noun"), ("--steps", steps, "steps"),
                             ("--seed", seed, "seed")):
        saved = info.get(key)
        if given is not None and (given.strip() if isinstance(given, str) else given) != saved:
            raise UserInputError(f"the interrupted task has {key} {saved!r} but {flag} is {given!r}; resume with the "
                                 f"same {flag} (or leave it out), or start over with --discard-checkpoint")
    if not (isinstance(info.get("token"), str) and isinstance(info.get("noun"), str)
            and isinstance(info.get("steps"), int) and isinstance(info.get("seed"), int)):
        raise StateError("the checkpoint is damaged (token/noun/steps/seed missing); start over with "
                         "--discard-checkpoint")
    return info["token"], info["noun"], info["steps"], info["seed"]


def _stream_from_checkpoint(info: dict[str, Any], method, adapter, rank, targets, hparams, model,
                            device, adapter_seed=None) -> ConceptStream:
    """Rebuild the stream of an interrupted *first* task with the settings it was started with."""
    try:
        m, base = info["stream"]["method"], info["stream"]["base_model"]
        spec = AdapterSpec.from_dict(m["adapter"]) if m.get("adapter") else AdapterSpec()
        settings = StreamSettings(method=m["name"], adapter=spec, hparams=dict(m["hyperparameters"]),
                                  dc=DCConfig(**m.get("dc", {})))
        fingerprint = base["fingerprint"]
        reference = base["reference"]
    except (KeyError, TypeError, ValueError) as exc:
        raise StateError(f"the checkpoint is damaged ({type(exc).__name__}: {exc}); start over with "
                         "--discard-checkpoint") from None
    if method and method != settings.method:
        raise UserInputError(f"the interrupted task uses method {settings.method!r}, not {method!r}; drop --method "
                             "or start over with --discard-checkpoint")
    clash = _adapter_clash(m.get("adapter") or {}, adapter, rank, targets, adapter_seed)
    if clash:
        flag, key, stored = clash
        raise UserInputError(f"the interrupted task uses {key} {stored!r}; drop {flag} or start over with "
                             "--discard-checkpoint")
    for key, value in validate_settings(settings.method, hparams or {}, None).items():
        if settings.hparams.get(key) != value:
            raise UserInputError(f"the interrupted task uses {key}={settings.hparams.get(key)!r}; drop --set {key} "
                                 "or start over with --discard-checkpoint")
    stream = ConceptStream.new(model or reference, settings, device=_device(device), check_settings=False)
    if stream.manifest["base_model"]["fingerprint"] != fingerprint:
        raise StateError(f"the interrupted task was learning on base model {reference!r} (fingerprint {fingerprint}), "
                         f"but {model!r} has fingerprint {stream.manifest['base_model']['fingerprint']}; pass "
                         "--model with the original base model")
    return stream


def _remove_if_unused(path: Path) -> None:
    """Remove a state folder this call created if nothing was committed or checkpointed in it."""
    try:
        if path.is_dir() and {p.name for p in path.iterdir()} <= {".lock"}:
            (path / ".lock").unlink(missing_ok=True)
            path.rmdir()
    except OSError:
        pass


def _adapter_clash(spec: dict, adapter, rank, targets, adapter_seed=None) -> tuple[str, str, Any] | None:
    """The first adapter option the user passed that differs from the stored adapter spec, if any
    (a spec saved before adapters had a seed was initialised with seed 0)."""
    for flag, value, key in (("--adapter", adapter, "kind"), ("--rank", rank, "rank"), ("--targets", targets, "targets"),
                             ("adapter_seed", adapter_seed, "seed")):
        if value is not None and spec and value != spec.get(key, 0 if key == "seed" else None):
            return flag, key, spec.get(key)
    return None


def _check_same_settings(stream: ConceptStream, method, adapter, rank, targets, hparams, adapter_seed=None) -> None:
    m = stream.manifest["method"]
    if method and method != m["name"]:
        raise StateError(f"this state uses method {m['name']!r}; a stream keeps one method (drop --method "
                         f"or start a new state for {method!r})")
    clash = _adapter_clash(m.get("adapter") or {}, adapter, rank, targets, adapter_seed)
    if clash:
        flag, key, stored = clash
        raise StateError(f"this state uses {key} {stored!r}; {flag} cannot change within a stream")
    if hparams:
        raise StateError("method settings are fixed when a stream is created; drop --set for later tasks")


def generate(prompt: str | list[str], state: str | Path | None = None, model: str | None = None, n: int = 4,
             seed: int = 0, steps: int = 30, guidance: float = 5.0, device: str | None = None,
             progress: bool = True, dtype: str | torch.dtype = "fp32") -> list[Image.Image]:
    """Sample ``n`` images per prompt (image i uses seed + i) from the base model or a learned stream.

    ``dtype`` ("fp32", "fp16", "bf16" or a torch dtype) is the model's precision while sampling; a
    state's values are saved in fp32 and cast on loading."""
    dtype = sampling_dtype(dtype)
    if not isinstance(n, int) or n < 1:
        raise UserInputError(f"-n must be >= 1 (images per prompt), got {n!r}")
    if not isinstance(steps, int) or steps < 1:
        raise UserInputError(f"--steps must be >= 1 (sampler steps), got {steps!r}")
    if state is not None:
        stream = open_stream(state, model=model, device=device, dtype=dtype)
        return stream.generate(prompt, n=n, seed=seed, steps=steps, guidance=guidance, progress=progress)
    from conceptstream.models.loading import load_pipeline
    from conceptstream.models.tokens import unknown_tokens

    pipe = load_pipeline(model, device=_device(device), dtype=dtype)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    for p in prompts:
        bad = unknown_tokens(p, pipe.tokenizer, [])
        if bad:
            raise UserInputError(f"prompt uses {bad[0]} but no --state was given to learn it from")
    pipe.set_progress_bar_config(disable=not progress)
    out = []
    for p in prompts:
        gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
        out += pipe([p] * n, num_inference_steps=steps, guidance_scale=guidance, generator=gens).images
    return out


def save_images(images: list[Image.Image], out: str | Path, cols: int | None = None) -> list[Path]:
    """``out`` ending in '/' or an existing folder: one PNG per image; else one file (a grid of several)."""
    from conceptstream.imaging import make_grid

    out_s = str(out)
    path = Path(out_s)
    if out_s.endswith(("/", "\\")) or path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, im in enumerate(images):
            p = path / f"{i:03d}.png"
            im.save(p)
            paths.append(p)
        return paths
    if path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise UserInputError(f"-o {out_s}: give a .png/.jpg file for a grid or a folder ending in '/'")
    if not images:
        raise UserInputError(f"-o {out_s}: there are no images to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    (images[0] if len(images) == 1 else make_grid(images, cols=cols)).save(path)
    return [path]


def export(state: str | Path, out: str | Path, format: str = "diffusers", name: str | None = None) -> list[Path]:
    """Export a state into ``out``: ``format="diffusers"`` for stock diffusers, ``"kohya"`` for A1111 / ComfyUI /
    kohya (LoRA file ``NAME.safetensors``, default name: the state folder's; see
    :mod:`conceptstream.adapters.export`)."""
    from conceptstream.adapters.export import FORMATS, export_stream

    if format not in FORMATS:  # before the model loads
        raise UserInputError(f"unknown export format {format!r}; choose one of: {', '.join(FORMATS)}")
    return export_stream(open_stream(state), out, format=format, name=name)


def info(state: str | Path) -> dict[str, Any]:
    """What a state holds: concepts, method and settings, files and sizes (no model loading)."""
    store = StateStore(state)
    if not store.exists():
        raise UserInputError(f"{state} is not a conceptstream state")
    manifest = store.read_manifest()
    files = {p.name: p.stat().st_size for p in store.files()}
    return {
        "state": str(state),
        "generation": store.generation(),
        "base_model": manifest["base_model"],
        "method": manifest["method"],
        "concepts": manifest["concepts"],
        "files": files,
        "size_bytes": sum(files.values()),
        "created_at": manifest.get("created_at"),
        "updated_at": manifest.get("updated_at"),
        "versions": manifest.get("versions", {}),
        **_checkpoint_summary(store),
    }


def _checkpoint_summary(store: StateStore) -> dict[str, Any]:
    """``has_checkpoint`` and, when a task was interrupted, which one and how far it got."""
    checkpoint = store.load_checkpoint()
    if checkpoint is None:
        return {"has_checkpoint": False, "checkpoint": None}
    info = checkpoint[1]
    return {"has_checkpoint": True,
            "checkpoint": {k: info.get(k) for k in ("token", "noun", "step", "steps", "method")}}


def format_info(data: dict[str, Any]) -> str:
    m = data["method"]
    adapter = m.get("adapter")  # an object as the engine writes it; a plain string is valid too
    on = (f" on {adapter.get('kind', '?')} rank {adapter.get('rank', '?')} ({adapter.get('targets', '?')})"
          if isinstance(adapter, dict) else f" on {adapter}" if adapter else "")
    lines = [f"state      {data['state']} ({data['generation']}, {data['size_bytes'] / 1024:.1f} KiB)",
             f"base model {data['base_model']['reference']} (fingerprint {data['base_model']['fingerprint']})",
             f"method     {m['name']}{on}",
             f"settings   {json.dumps(m.get('hyperparameters', {}))}",
             f"growth     {m.get('state_growth', '')}",
             f"concepts   {len(data['concepts'])}"]
    for c in data["concepts"]:
        lines.append(f"  {c['task_index']:>3}  {c['token']:<28} {c['noun']:<16} {c.get('steps', '?')} steps  "
                     f"{c.get('created_at', '')}")
    lines.append("files      " + ", ".join(f"{k} ({v / 1024:.1f} KiB)" for k, v in data["files"].items()))
    ck = data.get("checkpoint")
    if ck:
        lines.append(f"unfinished {ck.get('token')} ({ck.get('noun')}) interrupted at step {ck.get('step')}/"
                     f"{ck.get('steps')}: continue with `conceptstream learn {data['state']} --images ... --resume`")
    return "\n".join(lines)
