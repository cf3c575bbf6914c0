"""Feature extractors: the bundled EfficientNet-Lite0 and the Hugging Face loaders (tiny random models)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conceptstream.errors import UserInputError
from conceptstream.evaluation.features import (
    EfficientNetLite0Features,
    HFCLIPFeatures,
    HFDINOFeatures,
    get_feature_extractor,
)
from conceptstream.evaluation.metrics import TextImageAlignment

torch.set_num_threads(1)


def _disc(offset: int = 0) -> Image.Image:
    img = Image.new("RGB", (96, 96), (235, 235, 235))
    draw = ImageDraw.Draw(img)
    draw.ellipse((24 + offset, 24, 72 + offset, 72), fill=(200, 30, 30))
    return img


def _stripes() -> Image.Image:
    x = np.arange(96)
    bands = ((x // 8) % 2).astype(np.uint8)
    arr = np.zeros((96, 96, 3), dtype=np.uint8)
    arr[..., 1] = 180 * bands[None, :]
    arr[..., 2] = 200 * (1 - bands)[:, None]
    return Image.fromarray(arr)


def test_efficientnet_features_shape_determinism_and_geometry():
    extractor = get_feature_extractor("efficientnet-lite0")
    assert isinstance(extractor, EfficientNetLite0Features)
    assert extractor.dim == 1280 and extractor.name == "efficientnet-lite0"
    images = [_disc(), _disc(offset=3), _stripes(), _disc().convert("RGBA")]
    feats = extractor(images)
    assert feats.shape == (4, 1280) and feats.dtype == torch.float32
    assert torch.equal(feats, extractor(images))
    assert torch.allclose(feats[0], feats[3])  # RGBA without transparency is the same picture
    near = torch.dist(feats[0], feats[1])
    far = torch.dist(feats[0], feats[2])
    assert near < far
    assert extractor([]).shape == (0, 1280)
    assert extractor.model is EfficientNetLite0Features().model  # loaded once per process


def test_efficientnet_has_no_text_and_alignment_is_unavailable():
    extractor = EfficientNetLite0Features()
    with pytest.raises(UserInputError, match="CLIP"):
        extractor.text_features(["a photo"])
    metric = TextImageAlignment(extractor)
    metric.update(torch.zeros(1, 1280), ["a photo"])
    assert metric.compute()["available"] is False


def test_unknown_spec_lists_choices():
    with pytest.raises(UserInputError) as err:
        get_feature_extractor("inception")
    message = str(err.value)
    assert "\n" not in message and "efficientnet-lite0" in message and "clip:" in message and "dino:" in message


def test_missing_or_pickle_only_folders_are_refused(tmp_path: Path):
    with pytest.raises(UserInputError, match="does not exist"):
        get_feature_extractor(f"clip:{tmp_path / 'nope'}")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"not used")
    with pytest.raises(UserInputError, match="safetensors"):
        get_feature_extractor(f"dino:{pickled}")


def _tiny_clip(folder: Path, with_processor: bool = True) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8,
    )
    CLIPModel(config).save_pretrained(folder)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"),
                  pad_token="<|endoftext|>").save_pretrained(folder)
    if with_processor:
        CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_tiny_clip_loads_through_hf_clip_features(tmp_path: Path):
    folder = _tiny_clip(tmp_path / "clip")
    extractor = get_feature_extractor(f"clip:{folder}")
    assert isinstance(extractor, HFCLIPFeatures) and extractor.dim == 8 and extractor.supports_text
    images = [_disc(), _stripes(), _disc().resize((40, 70))]
    feats = extractor(images)
    assert feats.shape == (3, 8) and feats.dtype == torch.float32
    assert torch.equal(feats, extractor(images))
    text = extractor.text_features(["a cat", "photo of a dog"])
    assert text.shape == (2, 8)

    metric = TextImageAlignment(extractor)
    metric.update(images[:2], ["a cat", "a dog"])
    result = metric.compute()
    assert result["available"] is True and result["n"] == 2 and -1.0 <= result["value"] <= 1.0


def test_clip_without_saved_processor_uses_clip_defaults(tmp_path: Path):
    folder = _tiny_clip(tmp_path / "clip-noproc", with_processor=False)
    feats = HFCLIPFeatures(str(folder))([_disc()])
    assert feats.shape == (1, 8)


def test_tiny_dino_loads_through_hf_dino_features(tmp_path: Path):
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

    folder = tmp_path / "dino"
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2,
                             image_size=32, patch_size=8)).save_pretrained(folder)
    BitImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    extractor = get_feature_extractor(f"dino:{folder}")
    assert isinstance(extractor, HFDINOFeatures) and extractor.dim == 16
    feats = extractor([_disc(), _stripes()])
    assert feats.shape == (2, 16)
    assert torch.equal(feats, extractor([_disc(), _stripes()]))
    with pytest.raises(UserInputError, match="CLIP"):
        extractor.text_features(["x"])
