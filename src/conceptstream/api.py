"""The verbs users call (the CLI is a thin layer over these): learn, generate, info, export, world.

A state directory is the user's personalised model. ``learn`` takes the state's lock, rebuilds
the stream, learns one concept in memory and commits a new generation atomically: a crash or
Ctrl-C at any moment leaves the previous state exactly as it was.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from conceptstream.adapters.registry import AdapterSpec
from conceptstream.engine import DEFAULT_STEPS, ConceptStream, StreamSettings, TaskReport
from conceptstream.errors import StateError, UserInputError
from conceptstream.scoring.dc import DCConfig
from conceptstream.state import StateStore

TENSOR_FILES = ("tokens", "adapter", "method")


def _device(device: str | None) -> str:
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def open_stream(state: str | Path, model: str | None = None, device: str | None = None,
                dtype: torch.dtype = torch.float32) -> ConceptStream:
    """Load an existing state directory as a :class:`ConceptStream` (read-only use)."""
    store = StateStore(state)
    if not store.exists():
        raise UserInputError(f"{state} is not a conceptstream state (create one with `conceptstream learn {state} ...`)")
    manifest = store.read_manifest()
    tensors = {name: store.load_tensors(name) for name in TENSOR_FILES if store.has_file(name)}
    return ConceptStream.from_state(manifest, tensors, model=model, device=_device(device), dtype=dtype, path=Path(state))


def _resolve_concept(images: str | Path, token: str | None, noun: str | None) -> tuple[list[Path], str, str]:
    from conceptstream.data import collect_image_paths
    from conceptstream.world.folders import read_concept

    src = Path(images)
    if (src / "concept.json").is_file():
        folder = read_concept(src)
        token = token or folder.token
        noun = noun or folder.noun
    if not token:
        raise UserInputError("--token is required (e.g. --token '<my-dog>') unless --images is a concept folder")
    if not noun:
        raise UserInputError("--noun is required (the class noun, e.g. --noun dog) unless --images is a concept folder")
    return collect_image_paths(src), token, noun


def learn(state: str | Path, images: str | Path | list[Image.Image], token: str | None = None,
          noun: str | None = None, method: str | None = None, model: str | None = None,
          steps: int = DEFAULT_STEPS, seed: int = 0, adapter: str | None = None, rank: int | None = None,
          targets: str | None = None, hparams: dict[str, Any] | None = None, dc: dict[str, Any] | None = None,
          device: str | None = None, progress: bool = True) -> TaskReport:
    """Add one concept to the stream at ``state`` (created on the first call)."""
    from conceptstream.data import load_images

    store = StateStore(state)
    with store.lock():
        if isinstance(images, list):
            if not token or not noun:
                raise UserInputError("token and noun are required when passing images directly")
            pil_images = images
        else:
            paths, token, noun = _resolve_concept(images, token, noun)
        if store.exists():
            stream = open_stream(state, model=model, device=device)
            _check_same_settings(stream, method, adapter, rank, targets, hparams)
        else:
            spec = AdapterSpec(kind=adapter or "lora", rank=rank or (4 if (adapter or "lora") == "lora" else 64),
                               targets=targets or "cross-kv")
            settings = StreamSettings(method=method or "ewc-dc", adapter=spec, hparams=dict(hparams or {}),
                                      dc=DCConfig(**(dc or {})))
            stream = ConceptStream.new(model or "tiny", settings, device=_device(device))
        if not isinstance(images, list):
            pil_images = load_images(paths, stream.resolution)
        report = stream.learn(pil_images, token, noun, steps=steps, seed=seed, progress=progress)
        store.commit(stream.manifest, stream.state_tensors())
    return report


def _check_same_settings(stream: ConceptStream, method, adapter, rank, targets, hparams) -> None:
    m = stream.manifest["method"]
    if method and method != m["name"]:
        raise StateError(f"this state uses method {m['name']!r}; a stream keeps one method (drop --method "
                         f"or start a new state for {method!r})")
    spec = m.get("adapter") or {}
    for flag, value, key in (("--adapter", adapter, "kind"), ("--rank", rank, "rank"), ("--targets", targets, "targets")):
        if value is not None and spec and value != spec.get(key):
            raise StateError(f"this state uses {key} {spec.get(key)!r}; {flag} cannot change within a stream")
    if hparams:
        raise StateError("method settings are fixed when a stream is created; drop --set for later tasks")


def generate(prompt: str | list[str], state: str | Path | None = None, model: str | None = None, n: int = 4,
             seed: int = 0, steps: int = 30, guidance: float = 5.0, device: str | None = None,
             progress: bool = True) -> list[Image.Image]:
    """Sample images from the base model or from a learned stream."""
    if state is not None:
        stream = open_stream(state, model=model, device=device)
        return stream.generate(prompt, n=n, seed=seed, steps=steps, guidance=guidance, progress=progress)
    from conceptstream.models.loading import load_pipeline
    from conceptstream.models.tokens import unknown_tokens

    pipe = load_pipeline(model, device=_device(device))
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
    """``out`` ending in '/' or an existing folder: one PNG per image; else one grid file."""
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
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, cols=cols).save(path)
    return [path]


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
        "has_checkpoint": store.load_checkpoint() is not None,
    }


def format_info(data: dict[str, Any]) -> str:
    m = data["method"]
    lines = [f"state      {data['state']} ({data['generation']}, {data['size_bytes'] / 1024:.1f} KiB)",
             f"base model {data['base_model']['reference']} (fingerprint {data['base_model']['fingerprint']})",
             f"method     {m['name']}" + (f" on {m['adapter']['kind']} rank {m['adapter']['rank']} "
                                          f"({m['adapter']['targets']})" if m.get("adapter") else ""),
             f"settings   {json.dumps(m.get('hyperparameters', {}))}",
             f"growth     {m.get('state_growth', '')}",
             f"concepts   {len(data['concepts'])}"]
    for c in data["concepts"]:
        lines.append(f"  {c['task_index']:>3}  {c['token']:<28} {c['noun']:<16} {c.get('steps', '?')} steps  "
                     f"{c.get('created_at', '')}")
    lines.append("files      " + ", ".join(f"{k} ({v / 1024:.1f} KiB)" for k, v in data["files"].items()))
    return "\n".join(lines)
