"""The bundled tiny model: genuine CLIP tokenizer, stock-diffusers loading, `generate` outputs and errors."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli
from PIL import Image

from conceptstream import api
from conceptstream.errors import UserInputError
from conceptstream.models.loading import PICKLE_SUFFIXES, bundled_model, resolve_model

CLIP_IDS = [49406, 320, 1125, 539, 48136, 1929, 49407]  # "a photo of sks dog" with OpenAI's CLIP BPE


def test_build_clip_tokenizer_gives_genuine_clip_ids():
    from conceptstream.world.tiny_model import build_clip_tokenizer

    tok = build_clip_tokenizer()
    assert tok("a photo of sks dog").input_ids == CLIP_IDS
    assert len(tok) == 49408
    assert tok.convert_ids_to_tokens(1929) == "dog</w>"


def test_bundled_model_loads_with_stock_diffusers(bundled_model_path):
    from diffusers import StableDiffusionPipeline

    assert bundled_model_path == bundled_model() and resolve_model("tiny") == str(bundled_model_path)
    pipe = StableDiffusionPipeline.from_pretrained(str(bundled_model_path))
    assert pipe.tokenizer("a photo of sks dog").input_ids == CLIP_IDS
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64
    assert pipe.text_encoder.get_input_embeddings().weight.shape[0] == 49408
    files = [p for p in bundled_model_path.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix.lower() in PICKLE_SUFFIXES], "pickle weights in the bundled model"
    weights = {p.relative_to(bundled_model_path).as_posix() for p in files if p.suffix == ".safetensors"}
    assert {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors"} <= weights


def test_generate_grid_and_folder(tmp_path, capsys):
    from conceptstream.cli import main

    args = ["generate", "a photo of a red teddy bear", "-n", "2", "--steps", "3", "--seed", "5"]
    assert main([*args, "-o", str(tmp_path / "grid.png")]) == 0
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (2 * (64 + 2) + 2, 64 + 2 + 2)  # 2 tiles in a row, 2-pixel padding
        grid = np.asarray(grid.convert("RGB"))
    assert main([*args, "-o", str(tmp_path / "each") + "/"]) == 0
    pngs = sorted((tmp_path / "each").glob("*.png"))
    assert [p.name for p in pngs] == ["000.png", "001.png"]
    tiles = [np.asarray(Image.open(p).convert("RGB")) for p in pngs]
    assert all(t.shape == (64, 64, 3) for t in tiles)
    assert not np.array_equal(tiles[0], tiles[1])
    # the grid holds the same two images
    assert np.array_equal(grid[2:66, 2:66], tiles[0]) and np.array_equal(grid[2:66, 68:132], tiles[1])
    out = capsys.readouterr().out
    assert "wrote 2 image(s)" in out


def test_generate_one_image_to_a_file_writes_the_image_not_a_grid(tmp_path, capsys):
    from conceptstream.cli import main

    args = ["generate", "a photo of a red teddy bear", "-n", "1", "--steps", "2", "--seed", "5"]
    assert main([*args, "-o", str(tmp_path / "one.png")]) == 0
    with Image.open(tmp_path / "one.png") as im:
        assert im.size == (64, 64)  # no padding, no grid
        written = np.asarray(im.convert("RGB"))
    same = api.generate("a photo of a red teddy bear", n=1, steps=2, seed=5, progress=False)[0]
    assert np.array_equal(written, np.asarray(same))
    assert "wrote 1 image(s) to " + str(tmp_path / "one.png") in capsys.readouterr().out


def test_save_images_one_image_or_a_grid(tmp_path):
    tiles = [Image.new("RGB", (10, 8), (k * 40, 0, 0)) for k in range(3)]
    (one,) = api.save_images(tiles[:1], tmp_path / "one.png")
    with Image.open(one) as im:
        assert im.size == (10, 8) and im.getpixel((0, 0)) == (0, 0, 0)
    (grid,) = api.save_images(tiles, tmp_path / "grid.png")
    with Image.open(grid) as im:
        assert im.size == (2 * (10 + 2) + 2, 2 * (8 + 2) + 2)


def test_generate_image_i_uses_seed_plus_i(bundled_model_path):
    two = api.generate("a photo of a mug", n=2, seed=3, steps=2, progress=False)
    one = api.generate("a photo of a mug", n=1, seed=4, steps=2, progress=False)
    # same noise; only batched-vs-single float round-off may flip a pixel by one level
    diff = np.abs(np.asarray(two[1], dtype=int) - np.asarray(one[0], dtype=int))
    assert diff.max() <= 1 and diff.mean() < 0.01
    assert np.abs(np.asarray(two[0], dtype=int) - np.asarray(two[1], dtype=int)).mean() > 5


def test_generate_refuses_unlearned_tokens_without_state(bundled_model_path):
    with pytest.raises(UserInputError, match="<my-dog>"):
        api.generate("a photo of a <my-dog> dog", n=1, steps=2, progress=False)


def test_generate_bad_output_suffix_is_user_error(tmp_path):
    img = Image.new("RGB", (64, 64))
    with pytest.raises(UserInputError, match="-o"):
        api.save_images([img], tmp_path / "grid.txt")


@pytest.mark.parametrize("kind", ["nonexistent", "no-model-index"])
def test_generate_bad_model_is_one_line_error_exit_2(tmp_path, kind):
    if kind == "nonexistent":
        model = "/nonexistent/model/folder"
    else:
        model = str(tmp_path / "not-a-pipeline")
        (tmp_path / "not-a-pipeline" / "unet").mkdir(parents=True)
    res = run_cli("generate", "a photo of a mug", "--model", model, "-o", str(tmp_path / "x.png"))
    assert res.returncode == 2
    line = assert_one_line_error(res.stderr)
    assert ("does not exist" if kind == "nonexistent" else "no model_index.json") in line
    assert not (tmp_path / "x.png").exists()
