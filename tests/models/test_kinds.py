"""Which base models load: SD 1.x/2.x and SDXL pipelines are read by their model_index.json `_class_name`
before any weight loads; every other pipeline kind, a lone checkpoint file and a base of another kind than
a state's are refused in one line."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import assert_one_line_error, run_cli

from conceptstream import api
from conceptstream.engine import ConceptStream
from conceptstream.errors import UserInputError
from conceptstream.models import loading
from conceptstream.models.loading import check_same_kind, load_pipeline, model_kind, resolve_model
from conceptstream.state.store import StateStore

OTHER_KINDS = ["StableDiffusion3Pipeline", "FluxPipeline", "PixArtAlphaPipeline", "KandinskyV22Pipeline",
               "StableDiffusionInpaintPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionXLImg2ImgPipeline"]


def with_class_name(src, dst, class_name):
    folder = shutil.copytree(src, dst)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = class_name
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def test_supported_kinds_are_read_from_model_index(random_model_path, sdxl_model_path):
    assert model_kind(random_model_path) == "sd1" and model_kind("tiny") == "sd1"
    assert model_kind(sdxl_model_path) == "sdxl"
    pipe = load_pipeline(str(sdxl_model_path))
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert pipe.text_encoder_2.get_input_embeddings().weight.shape[1] == 64


@pytest.mark.parametrize("class_name", OTHER_KINDS)
def test_other_pipeline_kinds_are_refused_in_one_line(tmp_path, random_model_path, class_name):
    folder = with_class_name(random_model_path, tmp_path / "other", class_name)
    with pytest.raises(UserInputError) as err:
        load_pipeline(str(folder))
    line = str(err.value)
    assert "\n" not in line and class_name in line
    assert "StableDiffusionPipeline" in line and "StableDiffusionXLPipeline" in line


def test_missing_class_name_is_refused(tmp_path, random_model_path):
    folder = with_class_name(random_model_path, tmp_path / "unnamed", None)
    with pytest.raises(UserInputError, match="unknown kind.*supports"):
        resolve_model(str(folder))


def test_hub_id_kind_is_read_from_its_config_only(monkeypatch):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    asked = []

    def load_config(ref, *a, **kw):
        asked.append(ref)
        return {"_class_name": "FluxPipeline"}

    def no_weights(*a, **kw):
        raise AssertionError("weights were loaded before the kind was checked")

    monkeypatch.setattr(DiffusionPipeline, "load_config", load_config)
    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", no_weights)
    with pytest.raises(UserInputError, match="FluxPipeline.*supports"):
        load_pipeline("black-forest-labs/FLUX.1-dev")
    assert asked == ["black-forest-labs/FLUX.1-dev"]
    monkeypatch.setattr(DiffusionPipeline, "load_config",
                        lambda ref, *a, **kw: {"_class_name": "StableDiffusionXLPipeline"})
    assert model_kind("stabilityai/stable-diffusion-xl-base-1.0") == "sdxl"


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_a_single_checkpoint_file_is_refused_with_the_conversion_recipe(tmp_path, suffix):
    file = tmp_path / f"model{suffix}"
    file.write_bytes(b"not really weights")
    with pytest.raises(UserInputError) as err:
        resolve_model(str(file))
    line = str(err.value)
    assert "\n" not in line and "single checkpoint file" in line
    assert "from_single_file" in line and "save_pretrained" in line and "safe_serialization=True" in line
    assert "StableDiffusionXLPipeline" in line and f"--model {tmp_path / 'model'}" in line


def test_cli_refuses_a_checkpoint_file_and_other_kinds_with_exit_2(tmp_path, random_model_path):
    file = tmp_path / "v1-5-pruned.safetensors"
    file.write_bytes(b"x")
    res = run_cli("generate", "a photo of a mug", "--model", str(file), "-o", str(tmp_path / "x.png"))
    assert res.returncode == 2
    assert "from_single_file" in assert_one_line_error(res.stderr)
    folder = with_class_name(random_model_path, tmp_path / "sd3", "StableDiffusion3Pipeline")
    res = run_cli("generate", "a photo of a mug", "--model", str(folder), "-o", str(tmp_path / "x.png"))
    assert res.returncode == 2
    assert "StableDiffusion3Pipeline" in assert_one_line_error(res.stderr)
    assert not (tmp_path / "x.png").exists()


def test_a_state_refuses_a_base_of_another_kind(tmp_path, random_model_path, sdxl_model_path, concept_dirs):
    sd1_state, sdxl_state = tmp_path / "sd1", tmp_path / "sdxl"
    api.learn(sd1_state, concept_dirs[0], method="lora", model=str(random_model_path), steps=1, progress=False)
    api.learn(sdxl_state, concept_dirs[0], method="lora", model=str(sdxl_model_path), steps=1, progress=False)
    assert api.info(sd1_state)["base_model"]["kind"] == "sd1"
    assert api.info(sdxl_state)["base_model"]["kind"] == "sdxl"
    with pytest.raises(UserInputError) as err:
        api.open_stream(sd1_state, model=str(sdxl_model_path))
    assert "SD 1.x/2.x" in str(err.value) and "SDXL" in str(err.value)
    with pytest.raises(UserInputError) as err:
        api.open_stream(sdxl_state, model=str(random_model_path))
    assert "SD 1.x/2.x" in str(err.value) and "SDXL" in str(err.value)
    with pytest.raises(UserInputError, match="SDXL"):  # learning more on the wrong kind is refused the same way
        api.learn(sd1_state, concept_dirs[1], model=str(sdxl_model_path), steps=1, progress=False)

    # a manifest written before kinds were recorded is an SD 1.x state
    store = StateStore(sd1_state)
    manifest = store.read_manifest()
    del manifest["base_model"]["kind"]
    tensors = {name: store.load_tensors(name) for name in ("tokens", "adapter", "method") if store.has_file(name)}
    stream = ConceptStream.from_state(manifest, tensors)
    assert stream.kind == "sd1" and stream.tokens == [c["token"] for c in manifest["concepts"]]
    with pytest.raises(UserInputError, match="SD 1.x/2.x.*SDXL"):
        ConceptStream.from_state(manifest, tensors, model=str(sdxl_model_path))
    with pytest.raises(UserInputError, match="upgrade"):
        check_same_kind("sd4", random_model_path)
    assert loading.DEFAULT_KIND == "sd1"
