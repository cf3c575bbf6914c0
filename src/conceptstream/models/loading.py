"""Loading base pipelines: the bundled tiny model, a local diffusers folder, or a hub id.

The same code path serves the tiny model and real SD 1.x/2.x weights; only the size differs.
Weights are loaded from safetensors only (``use_safetensors=True``), never from pickle.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from conceptstream.errors import UserInputError

BUNDLED = "tiny"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt", ".pickle")
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def bundled_model() -> Path:
    """Path of the bundled tiny Stable-Diffusion-format pipeline folder."""
    from importlib import resources

    return Path(str(resources.files("conceptstream.assets").joinpath("tiny-sd")))


def resolve_model(model: str | Path | None) -> str:
    """Map ``None``/``"tiny"`` to the bundled folder; check local folders; pass hub ids through."""
    if model is None or str(model) == BUNDLED:
        path = bundled_model()
        if not (path / "model_index.json").is_file():
            raise UserInputError(f"the bundled model is missing at {path}; reinstall conceptstream "
                                 "or train it with `conceptstream world train-base`")
        return str(path)
    text = str(model)
    path = Path(text).expanduser()
    looks_local = path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1
    if not looks_local:
        return text  # a hub id such as "runwayml/stable-diffusion-v1-5"
    if not path.exists():
        raise UserInputError(f"--model path {path} does not exist; give a diffusers Stable Diffusion folder, "
                             "a hub id, or 'tiny'")
    check_pipeline_folder(path)
    return str(path)


def check_pipeline_folder(path: Path) -> None:
    """One-line errors for folders that are not a Stable Diffusion pipeline in diffusers layout."""
    index = path / "model_index.json"
    if not index.is_file():
        raise UserInputError(f"{path} is not a Stable Diffusion pipeline folder (no model_index.json); "
                             "save one with StableDiffusionPipeline.save_pretrained or pass 'tiny'")
    from conceptstream.concepts.folder import read_user_json

    meta = read_user_json(index)
    missing = [c for c in REQUIRED_COMPONENTS if c not in meta]
    if missing:
        raise UserInputError(f"{path} is not a Stable Diffusion pipeline: model_index.json lacks {', '.join(missing)}")
    for comp in ("unet", "vae", "text_encoder"):
        folder = path / comp
        if folder.is_dir() and not any(folder.glob("*.safetensors")):
            pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
            if pickles:
                raise UserInputError(f"{folder} holds only pickle weights ({pickles[0]}); conceptstream loads "
                                     "safetensors only: convert them with diffusers' save_pretrained(safe_serialization=True)")
            raise UserInputError(f"{folder} has no .safetensors weights")


def load_pipeline(model: str | Path | None = BUNDLED, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A stock ``StableDiffusionPipeline`` with safety checker off and progress bars on."""
    ref = resolve_model(model)  # before importing diffusers: a bad --model fails fast, with one line on stderr
    from transformers.utils import logging as tlogging

    previous = tlogging.get_verbosity()
    tlogging.set_verbosity_error()  # silence notes about image processors the pipeline does not use
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as dlogging

    verbosity = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    dlogging.disable_progress_bar()
    tlogging.disable_progress_bar()
    try:
        extra = {} if dtype == torch.float32 else {"dtype": dtype}
        pipe = StableDiffusionPipeline.from_pretrained(
            ref, **extra, use_safetensors=True, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserInputError(f"could not load Stable Diffusion pipeline {ref!r}: {first}") from None
    finally:
        tlogging.set_verbosity(previous)
        dlogging.set_verbosity(verbosity)
        dlogging.enable_progress_bar()
        tlogging.enable_progress_bar()
    return pipe.to(device)


def model_fingerprint(model: str | Path | None) -> str:
    """A cheap, stable identity for a base model: configs + size and edges of each weight file.

    Hashing whole SD checkpoints (GBs) would be slow; configs plus the first and last MiB of
    every safetensors file changes whenever the weights do in practice.
    """
    ref = resolve_model(model)
    path = Path(ref)
    if not path.exists():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(ref, allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if not f.is_file():
            continue
        rel = f.relative_to(path).as_posix()
        if f.suffix == ".json" and f.name != "README.md":
            h.update(rel.encode())
            h.update(f.read_bytes())
        elif f.suffix == ".safetensors":
            size = f.stat().st_size
            h.update(f"{rel}:{size}".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
                if size > 2 << 20:
                    fh.seek(-(1 << 20), 2)
                    h.update(fh.read())
    return h.hexdigest()[:16]
