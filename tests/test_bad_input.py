"""Bad input to the CLI: one clear `conceptstream: error: ...` line, a non-zero exit, nothing changed.

Images in unusual formats are converted and learned from; everything that cannot be used is refused
before the state is touched (a first `learn` that fails leaves no folder behind).
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conceptstream import api, cli
from conceptstream.errors import UserInputError
from conceptstream.models.tokens import check_new_token
from conceptstream.state import FORMAT_VERSION


def random_pipeline(root: Path, seed: int) -> Path:
    """A randomly initialised tiny SD pipeline folder (stock diffusers layout, safetensors)."""
    out = root / f"random-sd-{seed}"
    if not (out / "model_index.json").is_file():
        from diffusers import StableDiffusionPipeline

        from conceptstream.world.tiny_model import build_components

        pipe = StableDiffusionPipeline(**build_components(seed), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        tmp = root / f"random-sd-{seed}.tmp-{os.getpid()}"
        pipe.save_pretrained(tmp, safe_serialization=True)
        tmp.rename(out)
    return out


def noise(w: int = 64, h: int = 64, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def model(random_model_path) -> Path:
    """A randomly initialised tiny SD pipeline (tests/conftest.py): fast, and independent of training."""
    return random_model_path


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> Path:
    return random_pipeline(tmp_path_factory.getbasetemp(), 1)


@pytest.fixture(scope="module")
def good_images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("good")
    for i in range(2):
        noise(seed=i).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def base_state(tmp_path_factory, model, good_images) -> Path:
    state = tmp_path_factory.mktemp("base") / "state"
    api.learn(state, good_images, token="<a>", noun="dog", method="lora", model=str(model), steps=1,
              checkpoint_every=0, progress=False)
    return state


@pytest.fixture
def state(tmp_path, base_state) -> Path:
    return Path(shutil.copytree(base_state, tmp_path / "state"))


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes (the lock file's content is the live writer's pid)."""
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): (b"" if p.name == ".lock" else p.read_bytes())
            for p in sorted(path.rglob("*")) if p.is_file()}


def run(capsys, *args: str) -> tuple[int, str, str]:
    rc = cli.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def expect_error(capsys, target: Path, *args: str, match: str) -> str:
    """Run the CLI, expect exactly one error line matching ``match`` and ``target`` unchanged."""
    before = tree(target)
    rc, _out, err = run(capsys, *args)
    lines = [ln for ln in err.replace("\r", "\n").splitlines()
             if ln.strip() and not ln.startswith("conceptstream: warning:") and "it/s]" not in ln]  # progress bars
    assert rc != 0
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith("conceptstream: error: "), lines
    assert match.lower() in lines[0].lower(), lines[0]
    assert tree(target) == before
    return lines[0]


def learn(state: Path, images: Path, model: Path, *more: str, token: str = "<b>", noun: str = "cat") -> list[str]:
    return ["learn", str(state), "--images", str(images), "--token", token, "--noun", noun, "--model", str(model),
            "--steps", "1", "--method", "lora", *more]


# -- image folders ---------------------------------------------------------------------------------
def test_empty_image_folder(tmp_path, capsys, model):
    (tmp_path / "empty").mkdir()
    new = tmp_path / "new"
    expect_error(capsys, new, *learn(new, tmp_path / "empty", model), match="no images found")
    assert not new.exists()
    expect_error(capsys, new, *learn(new, tmp_path / "missing", model), match="does not exist")
    assert not new.exists()


def test_folder_with_only_non_image_files(tmp_path, capsys, model):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    new = tmp_path / "new"
    expect_error(capsys, new, *learn(new, folder, model), match="no images found")
    assert not new.exists()


def test_non_image_files_are_skipped_with_a_warning(tmp_path, capsys, state, model, good_images):
    folder = Path(shutil.copytree(good_images, tmp_path / "mixed"))
    (folder / "notes.txt").write_text("not a photo")
    (folder / "Thumbs.db").write_bytes(b"\x00" * 10)
    (folder / ".DS_Store").write_bytes(b"\x00")
    rc, out, err = run(capsys, *learn(state, folder, model))
    assert rc == 0, err
    warnings = [ln for ln in err.splitlines() if ln.startswith("conceptstream: warning:")]
    assert len(warnings) == 1 and "skipping 2 non-image file(s)" in warnings[0], err
    assert "notes.txt" in warnings[0] and "Thumbs.db" in warnings[0]
    assert api.info(state)["concepts"][-1]["images"] == 2


@pytest.mark.parametrize("kind", ["truncated", "corrupt"])
def test_unreadable_image_is_an_error_naming_the_file(tmp_path, capsys, state, model, good_images, kind):
    folder = Path(shutil.copytree(good_images, tmp_path / "photos"))
    if kind == "truncated":
        raw = io.BytesIO()
        noise(seed=5).save(raw, format="PNG")
        (folder / "bad.png").write_bytes(raw.getvalue()[: len(raw.getvalue()) // 2])
    else:
        (folder / "bad.jpg").write_bytes(os.urandom(2000))
    line = expect_error(capsys, state, *learn(state, folder, model), match="is not a readable image")
    assert "bad." in line and "remove or replace it" in line
    new = tmp_path / "new"
    expect_error(capsys, new, *learn(new, folder, model), match="is not a readable image")
    assert not new.exists()


def test_unusual_image_modes_and_sizes_are_converted_and_learned(tmp_path, capsys, model):
    folder = tmp_path / "modes"
    folder.mkdir()
    rgb = noise(seed=3)
    rgb.convert("L").save(folder / "gray.png")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
    rgba.save(folder / "rgba.png")
    rgb.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.gif")
    Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).save(folder / "sixteen.png")
    rgb.convert("1").save(folder / "bilevel.bmp")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    noise(3000, 2000, seed=4).save(folder / "large.jpg", quality=70)
    noise(20, 90, seed=6).save(folder / "tall-small.webp")
    with Image.open(folder / "sixteen.png") as im:
        assert im.mode.startswith("I")  # really a 16-bit file
    state = tmp_path / "state"
    rc, _out, err = run(capsys, *learn(state, folder, model))
    assert rc == 0, err
    assert api.info(state)["concepts"][0]["images"] == 8


def test_a_single_image(tmp_path, capsys, model, good_images):
    state = tmp_path / "state"
    rc, _out, err = run(capsys, *learn(state, good_images / "0.png", model))  # --images may name one file
    assert rc == 0, err
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(good_images / "1.png", folder / "only.png")
    rc, _out, err = run(capsys, *learn(state, folder, model, token="<c>"))
    assert rc == 0, err
    assert [c["images"] for c in api.info(state)["concepts"]] == [1, 1]


def test_bad_concept_folder(tmp_path, capsys, model):
    folder = tmp_path / "concept"
    (folder / "train").mkdir(parents=True)
    noise().save(folder / "train" / "0.png")
    (folder / "concept.json").write_text("{broken")
    new = tmp_path / "new"
    expect_error(capsys, new, "learn", str(new), "--images", str(folder), "--model", str(model),
                 match="is not valid JSON")
    (folder / "concept.json").write_text(json.dumps({"token": "no brackets", "noun": "dog"}))
    expect_error(capsys, new, "learn", str(new), "--images", str(folder), "--model", str(model),
                 match="invalid token")
    assert not new.exists()


# -- tokens, nouns, settings -----------------------------------------------------------------------
def test_token_already_in_the_stream(capsys, state, model, good_images):
    expect_error(capsys, state, *learn(state, good_images, model, token="<a>"), match="already in this stream")


@pytest.mark.parametrize("token", ["dog", "<my dog>", "my-dog", "<>", "<a><b>", " <x>"])
def test_malformed_tokens_and_plain_vocabulary_words(tmp_path, capsys, state, model, good_images, token):
    expect_error(capsys, state, *learn(state, good_images, model, token=token), match="invalid token")
    new = tmp_path / "new"
    expect_error(capsys, new, *learn(new, good_images, model, token=token), match="invalid token")
    assert not new.exists()


def test_token_already_in_the_tokenizer_is_refused():
    """A base model whose tokenizer already has '<sks>' (e.g. merged textual inversion) refuses it."""
    from conceptstream.world.tiny_model import build_clip_tokenizer

    tok = build_clip_tokenizer()
    tok.add_tokens(["<sks>"])
    with pytest.raises(UserInputError, match="already exists in the tokenizer"):
        check_new_token(tok, "<sks>")
    check_new_token(tok, "<my-sks>")


def test_bad_noun_steps_and_checkpoint_interval(tmp_path, capsys, state, model, good_images):
    expect_error(capsys, state, *learn(state, good_images, model, noun="   "), match="noun is empty")
    expect_error(capsys, state, *learn(state, good_images, model), "--steps", "0", match="--steps must be >= 1")
    expect_error(capsys, state, *learn(state, good_images, model), "--checkpoint-every", "-1",
                 match="--checkpoint-every must be >= 0")
    expect_error(capsys, state, "learn", str(state), "--images", str(good_images), "--model", str(model),
                 match="--token is required")


def test_unknown_method_and_adapter(tmp_path, capsys, model, good_images):
    new = tmp_path / "new"
    args = learn(new, good_images, model)
    args[args.index("--method") + 1] = "sdxl-magic"
    expect_error(capsys, new, *args, match="unknown method 'sdxl-magic'; choose one of")
    expect_error(capsys, new, *learn(new, good_images, model), "--set", "no_such_setting=1", match="has no setting")
    assert not new.exists()
    with pytest.raises(UserInputError, match="unknown adapter 'dora'"):
        api.learn(new, good_images, token="<b>", noun="cat", model=str(model), adapter="dora", steps=1)
    assert not new.exists()
    with pytest.raises(SystemExit) as exc:  # the CLI lists the choices itself
        cli.main(learn(new, good_images, model, "--adapter", "dora"))
    assert exc.value.code == 2 and "invalid choice: 'dora'" in capsys.readouterr().err


def test_method_cannot_change_within_a_stream(capsys, state, model, good_images):
    args = learn(state, good_images, model)
    args[args.index("--method") + 1] = "c-lora"
    expect_error(capsys, state, *args, match="a stream keeps one method")


# -- base models -----------------------------------------------------------------------------------
def test_model_path_missing_or_not_a_pipeline(tmp_path, capsys, model, good_images):
    new = tmp_path / "new"
    expect_error(capsys, new, *learn(new, good_images, tmp_path / "nowhere"), match="does not exist")
    folder = tmp_path / "not-a-pipeline"
    folder.mkdir()
    (folder / "weights.safetensors").write_bytes(b"x")
    expect_error(capsys, new, *learn(new, good_images, folder), match="not a Stable Diffusion pipeline")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "unet": [1, 2]}))
    expect_error(capsys, new, *learn(new, good_images, folder), match="lacks")
    (folder / "model_index.json").write_text("{")
    expect_error(capsys, new, *learn(new, good_images, folder), match="not valid JSON")
    broken = Path(shutil.copytree(model, tmp_path / "truncated-weights"))
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    expect_error(capsys, new, *learn(new, good_images, broken), match="could not load Stable Diffusion pipeline")
    assert not new.exists()


def test_state_built_on_another_base_model(capsys, state, other_model, good_images):
    line = expect_error(capsys, state, *learn(state, good_images, other_model), match="fingerprint")
    assert "pass --model with the original base model" in line
    expect_error(capsys, state, "generate", "a photo of a <a> dog", "--state", str(state), "--model",
                 str(other_model), match="fingerprint")


# -- damaged or foreign states ---------------------------------------------------------------------
def _manifest_path(state: Path) -> Path:
    return state / (state / "CURRENT").read_text().strip() / "manifest.json"


@pytest.mark.parametrize("edit, match", [
    (lambda m: {**m, "format_version": FORMAT_VERSION + 1}, "newer conceptstream"),
    (lambda m: {**m, "concepts": {"<a>": "dog"}}, "concepts must be a list"),
    (lambda m: {**m, "concepts": [{**m["concepts"][0], "task_index": "0"}]}, "task_index must be an integer"),
    (lambda m: {**m, "base_model": "tiny"}, "base_model must be an object"),
    (lambda m: {k: v for k, v in m.items() if k != "method"}, "'method' is missing"),
    (lambda m: "{ hand edited", "not valid JSON"),
])
def test_damaged_manifest(capsys, state, model, good_images, edit, match):
    path = _manifest_path(state)
    changed = edit(json.loads(path.read_text()))
    path.write_text(changed if isinstance(changed, str) else json.dumps(changed, indent=2))
    expect_error(capsys, state, *learn(state, good_images, model), match=match)
    expect_error(capsys, state, "info", str(state), match=match)
    expect_error(capsys, state, "generate", "a photo of a <a> dog", "--state", str(state), match=match)


def test_state_files_that_do_not_fit_the_manifest(capsys, state, model, good_images):
    """A tensor file replaced by hand: one line, not a traceback from deep inside torch."""
    import torch
    from safetensors.torch import save_file

    gen = state / (state / "CURRENT").read_text().strip()
    save_file({"some.weight": torch.zeros(3)}, str(gen / "adapter.safetensors"))
    expect_error(capsys, state, *learn(state, good_images, model), match="cannot be loaded")
    (gen / "tokens.safetensors").write_bytes(b"garbage")
    expect_error(capsys, state, "generate", "a photo of a <a> dog", "--state", str(state), match="damaged")


def test_not_a_state(tmp_path, capsys, model, good_images):
    folder = tmp_path / "photos-not-a-state"
    folder.mkdir()
    (folder / "holiday.txt").write_text("x")
    expect_error(capsys, folder, *learn(folder, good_images, model), match="is not empty and is not a conceptstream")
    expect_error(capsys, folder, "info", str(folder), match="not a conceptstream state")
    expect_error(capsys, folder, "generate", "x", "--state", str(folder), match="not a conceptstream state")


# -- generate --------------------------------------------------------------------------------------
def test_prompt_with_an_unknown_token(capsys, state, tmp_path):
    out = tmp_path / "out.png"
    line = expect_error(capsys, state, "generate", "a photo of a <zebra> dog", "--state", str(state), "-o", str(out),
                        "--steps", "1", "-n", "1", match="prompt uses <zebra>")
    assert "learned: <a>" in line
    assert not out.exists()


def test_unwritable_output_is_one_line(tmp_path, capsys, state):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    expect_error(capsys, state, "generate", "a photo of a <a> dog", "--state", str(state), "-o",
                 str(blocker / "sub" / "out.png"), "--steps", "1", "-n", "1", match="conceptstream: error:")


@pytest.mark.parametrize("flag, value", [("-n", "0"), ("-n", "-3"), ("--steps", "0")])
def test_generate_needs_at_least_one_image_and_step(tmp_path, capsys, state, model, flag, value):
    out = tmp_path / "out.png"
    for where in (["--state", str(state)], ["--model", str(model)]):
        before = tree(state)
        rc, _out, err = run(capsys, "generate", "a photo of a dog", *where, "-o", str(out), "--steps", "1", flag, value)
        assert rc == 2 and "Traceback" not in err
        assert err.strip().splitlines() == [f"conceptstream: error: {flag} must be >= 1 "
                                            f"({'images per prompt' if flag == '-n' else 'sampler steps'}), got {value}"]
        assert tree(state) == before and not out.exists()
    with pytest.raises(UserInputError, match="-n must be >= 1"):
        api.generate("a photo of a dog", model=str(model), n=0)


@pytest.mark.parametrize("device, match", [("cuda", "no usable CUDA GPU"), ("cuda:x", "is not a torch device")])
def test_a_device_torch_cannot_use_is_one_line_and_leaves_the_state(tmp_path, capsys, state, device, match):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    out = tmp_path / "out.png"
    before = tree(state)
    expect_error(capsys, state, "generate", "a photo of a <a> dog", "--state", str(state), "-o", str(out),
                 "--steps", "1", "-n", "1", "--device", device, match=match)
    assert tree(state) == before and not out.exists()
