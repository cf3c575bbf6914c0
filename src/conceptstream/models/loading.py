"""Loading base pipelines: the bundled tiny model, a local diffusers folder, or a hub id.

The same code path serves the tiny model and real SD 1.x/2.x and SDXL weights; only the size differs.
Weights are loaded from safetensors only (``use_safetensors=True``), never from pickle.

The pipeline's kind is read from ``model_index.json`` (``_class_name``) before any weight is loaded:
:data:`KINDS` lists what is supported; any other pipeline (SD3, Flux, PixArt, Kandinsky, inpainting,
img2img, ...) and a lone checkpoint file are refused in one line that says what to pass instead.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from conceptstream.errors import UserInputError

BUNDLED = "tiny"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt", ".pickle")
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class PipelineKind:
    """One supported base-model family: its diffusers pipeline class and the components it needs."""

    name: str  # recorded in a state's manifest (``base_model.kind``)
    label: str  # how messages name it
    pipeline_class: str
    components: tuple[str, ...]


KINDS: dict[str, PipelineKind] = {
    "sd1": PipelineKind("sd1", "SD 1.x/2.x (StableDiffusionPipeline)", "StableDiffusionPipeline", REQUIRED_COMPONENTS),
    "sdxl": PipelineKind("sdxl", "SDXL (StableDiffusionXLPipeline)", "StableDiffusionXLPipeline",
                         (*REQUIRED_COMPONENTS, "text_encoder_2", "tokenizer_2")),
}
DEFAULT_KIND = "sd1"  # manifests written before kinds were recorded are SD 1.x states
SUPPORTED = " or ".join(f"a {k.pipeline_class} ({k.label.split(' (')[0]})" for k in KINDS.values())


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
    if path.is_file():
        raise UserInputError(checkpoint_file_message(path))
    check_pipeline_folder(path)
    return str(path)


def checkpoint_file_message(path: Path) -> str:
    """The one-line refusal of a single checkpoint file, with the recipe that converts it to a folder."""
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        return (f"--model {path} is a file; give a diffusers pipeline folder (with model_index.json), a hub id, "
                "or 'tiny'")
    folder = path.with_suffix("")
    return (f"--model {path} is a single checkpoint file; conceptstream needs a diffusers folder: convert it once "
            f"with `python -c \"from diffusers import StableDiffusionPipeline as P; "
            f"P.from_single_file('{path}').save_pretrained('{folder}', safe_serialization=True)\"` "
            "(StableDiffusionXLPipeline for an SDXL checkpoint) and pass --model "
            f"{folder}")


def kind_of_class(class_name: object, where: str) -> PipelineKind:
    """The supported kind of a pipeline class name, or a one-line refusal naming what is supported."""
    for kind in KINDS.values():
        if class_name == kind.pipeline_class:
            return kind
    what = f"a {class_name}" if isinstance(class_name, str) and class_name else "a pipeline of unknown kind"
    raise UserInputError(f"{where} is {what} (model_index.json _class_name); conceptstream supports {SUPPORTED} "
                         "text-to-image pipelines")


def check_pipeline_folder(path: Path) -> None:
    """One-line errors for folders that are not a Stable Diffusion pipeline in diffusers layout."""
    index = path / "model_index.json"
    if not index.is_file():
        raise UserInputError(f"{path} is not a Stable Diffusion pipeline folder (no model_index.json); "
                             "save one with StableDiffusionPipeline.save_pretrained or pass 'tiny'")
    from conceptstream.concepts.folder import read_user_json

    meta = read_user_json(index)
    kind = kind_of_class(meta.get("_class_name") if isinstance(meta, dict) else None, str(path))
    missing = [c for c in kind.components if c not in meta]
    if missing:
        raise UserInputError(f"{path} is not a Stable Diffusion pipeline: model_index.json lacks {', '.join(missing)}")
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        folder = path / comp
        if folder.is_dir() and not any(folder.glob("*.safetensors")):
            pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
            if pickles:
                raise UserInputError(f"{folder} holds only pickle weights ({pickles[0]}); conceptstream loads "
                                     "safetensors only: convert them with diffusers' save_pretrained(safe_serialization=True)")
            raise UserInputError(f"{folder} has no .safetensors weights")


def model_kind(model: str | Path | None) -> str:
    """The kind (a :data:`KINDS` key) of a base model, from its ``model_index.json`` alone (no weights):
    the local file, or for a hub id ``DiffusionPipeline.load_config``, which fetches only that file."""
    ref = resolve_model(model)
    path = Path(ref)
    if path.exists():
        from conceptstream.concepts.folder import read_user_json

        meta = read_user_json(path / "model_index.json")
        return kind_of_class(meta.get("_class_name"), ref).name
    from diffusers import DiffusionPipeline

    try:
        meta = DiffusionPipeline.load_config(ref)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserInputError(f"could not read the model_index.json of {ref!r}: {first}") from None
    return kind_of_class(meta.get("_class_name"), repr(ref)).name


def pipeline_kind(pipe) -> str:
    """The kind (a :data:`KINDS` key) of a loaded pipeline."""
    name = type(pipe).__name__
    return next((k.name for k in KINDS.values() if k.pipeline_class == name),
                "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else DEFAULT_KIND)


def check_same_kind(saved_kind: str | None, model: str | Path | None) -> str:
    """Refuse a base model of another kind than the one a state was made on (a manifest without a kind is an
    SD 1.x state); returns the base model's kind."""
    saved = KINDS.get(saved_kind or DEFAULT_KIND)
    kind = model_kind(model)
    if saved is None:
        raise UserInputError(f"this state was made on a base model of kind {saved_kind!r}, which this release does "
                             "not know; upgrade conceptstream")
    if saved.name != kind:
        raise UserInputError(f"this state was made on an {saved.label} base model, but {str(model)!r} is an "
                             f"{KINDS[kind].label} one; pass --model with a base model of the state's kind")
    return kind


def load_pipeline(model: str | Path | None = BUNDLED, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A stock ``StableDiffusionPipeline`` (SD 1.x/2.x) or ``StableDiffusionXLPipeline`` (SDXL), by the model's
    ``model_index.json``, with safety checker and watermarker off and progress bars on."""
    ref = resolve_model(model)  # before importing diffusers: a bad --model fails fast, with one line on stderr
    kind = model_kind(ref)
    from transformers.utils import logging as tlogging

    previous = tlogging.get_verbosity()
    tlogging.set_verbosity_error()  # silence notes about image processors the pipeline does not use
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import logging as dlogging

    verbosity = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    dlogging.disable_progress_bar()
    tlogging.disable_progress_bar()
    try:
        extra = {} if dtype == torch.float32 else {"dtype": dtype}
        if kind == "sdxl":
            pipe = StableDiffusionXLPipeline.from_pretrained(ref, **extra, use_safetensors=True, add_watermarker=False)
        else:
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
