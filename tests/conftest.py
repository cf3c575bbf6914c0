"""Shared fixtures: the bundled tiny model, a tiny random pipeline, rendered concept folders, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import conceptstream

SRC = str(Path(conceptstream.__file__).resolve().parents[1])
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark_script(name: str):
    """The module of ``benchmarks/NAME.py``. The scripts are not a package: ``benchmarks/`` joins sys.path
    and stays there, as it is for a script run from the shell (some import each other lazily)."""
    import importlib

    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


@pytest.fixture(scope="session")
def bundled_model_path() -> Path:
    """The bundled trained tiny-sd folder; a missing model is a failure, never a skip."""
    path = Path(conceptstream.bundled_model())
    if not (path / "model_index.json").is_file():
        pytest.fail(f"the bundled model is missing at {path} (no model_index.json); train/export it with "
                    "`conceptstream world train-base --workdir WORKDIR` before running these tests", pytrace=False)
    return path


@pytest.fixture(scope="session")
def random_model_path(tmp_path_factory) -> Path:
    """A freshly initialised (untrained) tiny pipeline folder, for tests that need no trained weights."""
    from diffusers import StableDiffusionPipeline

    from conceptstream.world.tiny_model import build_components

    folder = tmp_path_factory.mktemp("random-tiny-sd")
    pipe = StableDiffusionPipeline(**build_components(seed=0), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_sdxl_components(seed: int = 0) -> dict:
    """Components of a tiny random SDXL pipeline: the tiny model's VAE and scheduler, the real CLIP tokenizer
    twice, CLIP-L-like (32) and CLIP-G-like (64, projection 32) text encoders, and a UNet with SDXL's
    text-time added conditioning (6 time ids x 8 + pooled 32 = 80) and cross-attention width 32 + 64."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from conceptstream.world.tiny_model import TEXT_CONFIG, UNET_CONFIG, build_clip_tokenizer, build_components

    base = build_components(seed=seed)
    torch.manual_seed(seed)
    small = {**TEXT_CONFIG, "hidden_size": 32, "intermediate_size": 64, "projection_dim": 32}
    large = {**TEXT_CONFIG, "hidden_size": 64, "intermediate_size": 128, "projection_dim": 32}
    unet = UNet2DConditionModel(**{**UNET_CONFIG, "sample_size": base["unet"].config.sample_size,
                                   "cross_attention_dim": 32 + 64, "addition_embed_type": "text_time",
                                   "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 6 * 8 + 32})
    return dict(vae=base["vae"], unet=unet, scheduler=base["scheduler"],
                text_encoder=CLIPTextModel(CLIPTextConfig(**small)), tokenizer=build_clip_tokenizer(),
                text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**large)), tokenizer_2=build_clip_tokenizer())


@pytest.fixture(scope="session")
def sdxl_model_path(tmp_path_factory) -> Path:
    """A freshly initialised tiny SDXL pipeline folder (``StableDiffusionXLPipeline``, safetensors)."""
    from diffusers import StableDiffusionXLPipeline

    folder = tmp_path_factory.mktemp("random-tiny-sdxl")
    pipe = StableDiffusionXLPipeline(**build_sdxl_components(seed=0), add_watermarker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def world_sequence(tmp_path_factory) -> Path:
    """The first three tabletop-6 concepts as a sequence folder (8 train + 8 eval views each)."""
    from conceptstream.world.catalogue import get_sequence
    from conceptstream.world.folders import export_sequence

    root = tmp_path_factory.mktemp("world-seq")
    export_sequence(get_sequence("tabletop-6")[:3], root, train_views=8, eval_views=8, seed=0)
    return root


@pytest.fixture(scope="session")
def concept_dirs(world_sequence) -> list[Path]:
    from conceptstream.concepts.folder import read_sequence

    return [c.path for c in read_sequence(world_sequence)]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m conceptstream.cli ARGS`` in a fresh process (real stdout/stderr, real exit code)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([sys.executable, "-m", "conceptstream.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def assert_one_line_error(stderr: str) -> str:
    """stderr holds exactly one line and it is the CLI's error line; returns it."""
    lines = stderr.strip("\n").splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}:\n{stderr}"
    assert lines[0].startswith("conceptstream: error:"), lines[0]
    return lines[0]


def assert_error_after_progress(stderr: str) -> str:
    """For commands that may draw a progress bar first: one error line, the last one, no traceback."""
    lines = [ln for ln in stderr.replace("\r", "\n").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "conceptstream: error:" in ln]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("conceptstream: error:"), stderr
    assert "Traceback" not in stderr, stderr
    return errors[0]


@pytest.fixture(scope="module")
def renderer():
    """A 64 px tabletop renderer, closed after the module."""
    from conceptstream.world.render import TabletopRenderer

    r = TabletopRenderer(64)
    yield r
    r.close()
