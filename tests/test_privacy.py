"""Privacy and safe loading: a state holds the personalised model and nothing of the photos.

After learning (with in-task checkpoints on, and with a checkpoint left by an interrupted task)
every file in the state directory is inspected: only documented files and tensor names, no tensor
shaped like the images or their latents, no pixel or latent values anywhere, no stray temporary
files. Weights are only ever loaded from safetensors: pickle files are refused (a canary pickle
proves none is ever unpickled) and no code path trusts remote code.
"""

from __future__ import annotations

import ast
import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import conceptstream
from conceptstream import api, cli
from conceptstream.errors import StateError
from conceptstream.state import StateStore

SRC = Path(conceptstream.__file__).resolve().parent
N_IMAGES = 3

GENERATION_FILES = {"manifest.json", "tokens.safetensors", "adapter.safetensors", "method.safetensors"}
HEX = r"[0-9a-f]{8}"
CHECKPOINT_FILE = re.compile(rf"^(checkpoint\.json|(trainable|optimizer|rng)\.{HEX}\.safetensors)$")
ADAPTER_NAME = re.compile(r"^[\w.]+\.(lora_A|lora_B)\.default\.weight$")
KV_LAYER = re.compile(r"^[\w.]+\.attn2\.to_[kv]$")
METHOD_NAME = re.compile(r"^(fisher|anchor)\.(?P<adapter>.+)$|^(pool|past)\.\d+\.(?P<entry>.+)$|^delta\.(?P<layer>.+)$")
OPTIMIZER_NAME = re.compile(r"^\d+\.(exp_avg|exp_avg_sq|step)$")
CHECKPOINT_INFO_KEYS = {"kind", "token", "noun", "seed", "steps", "images", "step", "loss", "method", "stream",
                        "optimizer"}


@pytest.fixture(scope="session")
def model(random_model_path) -> Path:
    """A randomly initialised tiny SD pipeline (tests/conftest.py): fast, and independent of training."""
    return random_model_path


def write_photos(folder: Path, n: int, seed: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"private-photo-{seed}-{i}.png"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def tensor_file(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as fh:
        assert not fh.metadata(), f"{path} carries metadata"
        return {k: fh.get_tensor(k) for k in fh.keys()}


def image_fingerprints(stream, photos: list[Path]) -> list[bytes]:
    """Byte patterns a leak would contain: raw pixels, normalised pixels, VAE latent means/stds."""
    from conceptstream.concepts.images import load_images

    images = load_images(photos, stream.resolution)
    patterns = []
    for im in images:
        arr = np.asarray(im)
        hwc = torch.from_numpy(arr.astype(np.float32))
        chw = hwc.permute(2, 0, 1)
        patterns.append(arr[5].tobytes()[:96])  # one row of raw 8-bit pixels
        for t in (hwc, hwc / 255, hwc / 127.5 - 1):  # float rows, channels interleaved
            patterns.append(t[5, :8].contiguous().numpy().tobytes())
        for t in (chw, chw / 255, chw / 127.5 - 1):  # float rows of one channel (NCHW batches)
            patterns.append(t[0, 5, :8].contiguous().numpy().tobytes())
    mean, std = stream.encode_images(images)
    for t in (mean, std, mean / stream.pipe.vae.config.scaling_factor):
        for i in range(len(images)):
            patterns.append(t[i, 0, 3, :6].contiguous().numpy().astype(np.float32).tobytes())
            patterns.append(t[i, 0, 3, :6].contiguous().numpy().astype(np.float16).tobytes())
    return patterns


def check_tensors(name: str, tensors: dict[str, torch.Tensor], tokens: list[str], adapter_names: set[str]) -> None:
    for key, value in tensors.items():
        assert value.ndim <= 2, f"{name}: {key} has shape {tuple(value.shape)}"
        assert tuple(value.shape[-3:]) not in {(3, 64, 64), (4, 16, 16)}, (name, key)
    if name == "tokens":
        assert sorted(tensors) == sorted(tokens)
        assert all(v.ndim == 1 for v in tensors.values())
    elif name == "adapter":
        assert set(tensors) == adapter_names
        assert all(ADAPTER_NAME.match(k) for k in tensors), sorted(tensors)[:3]
    elif name == "method":
        for key in tensors:
            m = METHOD_NAME.match(key)
            assert m, key
            inner = m.group("adapter") or m.group("entry")
            assert (inner in adapter_names) if inner else KV_LAYER.match(m.group("layer")), key
    elif name == "trainable":
        for key in tensors:
            assert key == "token" or key.startswith("unet."), key
            assert key == "token" or key[5:] in adapter_names or KV_LAYER.match(key[5:].rsplit(".", 1)[0]), key
    elif name == "optimizer":
        assert all(OPTIMIZER_NAME.match(k) for k in tensors), sorted(tensors)[:3]
    elif name == "rng":
        assert set(tensors) <= {"torch", "generator", "cuda"} and {"torch", "generator"} <= set(tensors)
        assert all(v.dtype == torch.uint8 and v.ndim == 1 for v in tensors.values())
    else:
        pytest.fail(f"undocumented tensor file {name}")


@pytest.mark.parametrize("method", ["lora-ewc", "custom-diffusion"])
def test_state_holds_only_documented_files_and_no_image_data(tmp_path, model, monkeypatch, method):
    photos_a = write_photos(tmp_path / "photos-a", N_IMAGES, seed=11)
    photos_b = write_photos(tmp_path / "photos-b", N_IMAGES, seed=12)
    state = tmp_path / "state"
    api.learn(state, photos_a[0].parent, token="<a>", noun="dog", method=method, model=str(model), steps=3,
              checkpoint_every=1, hparams={"fisher_passes": 1} if method == "lora-ewc" else {}, progress=False)
    original = StateStore.save_checkpoint

    def save_then_interrupt(self, tensors, info):  # a task interrupted after its checkpoint
        original(self, tensors, info)
        raise KeyboardInterrupt

    monkeypatch.setattr(StateStore, "save_checkpoint", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        api.learn(state, photos_b[0].parent, token="<b>", noun="cat", model=str(model), steps=4,
                  checkpoint_every=2, progress=False)
    monkeypatch.undo()
    assert (state / "checkpoint" / "checkpoint.json").is_file()

    stream = api.open_stream(state, model=str(model))
    from conceptstream.adapters.registry import adapter_parameters

    adapter_names = set(adapter_parameters(stream.pipe.unet))
    patterns = image_fingerprints(stream, photos_a) + image_fingerprints(stream, photos_b)
    private_strings = [str(tmp_path), *(p.name for p in photos_a + photos_b), "private-photo"]

    gen = (state / "CURRENT").read_text().strip()
    seen_files = []
    for path in sorted(state.rglob("*")):
        rel = path.relative_to(state).as_posix()
        if path.is_dir():
            assert rel in (gen, "checkpoint"), f"unexpected folder {rel}"
            continue
        seen_files.append(rel)
        parent, _, name = rel.rpartition("/")
        if parent == "":
            assert name in ("CURRENT", ".lock"), rel
        elif parent == gen:
            assert name in GENERATION_FILES, rel
        else:
            assert parent == "checkpoint" and CHECKPOINT_FILE.match(name), rel
        data = path.read_bytes()
        for pattern in patterns:
            assert pattern not in data, f"{rel} contains image-derived bytes"
        if name.endswith(".json"):
            text = data.decode()
            for s in private_strings:
                assert s not in text, f"{rel} mentions {s!r}"
            json.loads(text)
        if name.endswith(".safetensors"):
            kind = name.split(".")[0]
            check_tensors(kind, tensor_file(path), ["<a>"], adapter_names)
    assert f"{gen}/tokens.safetensors" in seen_files and "checkpoint/checkpoint.json" in seen_files
    record = json.loads((state / "checkpoint" / "checkpoint.json").read_text())
    assert set(record) == {"format_version", "generation", "saved_at", "files", "info"}
    assert set(record["info"]) == CHECKPOINT_INFO_KEYS
    assert record["info"]["images"] == N_IMAGES  # how many photos, never which or what
    manifest = json.loads((state / gen / "manifest.json").read_text())
    assert manifest["concepts"][0]["images"] == N_IMAGES
    if method == "custom-diffusion":
        assert not (state / gen / "adapter.safetensors").exists()


# -- pickle files are refused, never loaded --------------------------------------------------------
class Canary:
    """Unpickling this creates ``path``: proof that a pickle was (or was not) loaded."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def write_canary(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(Canary(marker)))


def test_pickle_only_model_is_refused_with_an_explanation(tmp_path, model, capsys):
    photos = write_photos(tmp_path / "photos", 1, seed=3)[0].parent
    marker = tmp_path / "UNPICKLED"
    pickled = Path(shutil.copytree(model, tmp_path / "pickled-model"))
    (pickled / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    write_canary(pickled / "unet" / "diffusion_pytorch_model.bin", marker)
    state = tmp_path / "state"
    rc = cli.main(["learn", str(state), "--images", str(photos), "--token", "<a>", "--noun", "dog", "--model",
                   str(pickled), "--steps", "1", "--method", "lora"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "pickle" in err[0] and "safetensors" in err[0], err[0]
    assert not marker.exists() and not state.exists()

    # Beside safetensors weights, pickle files are ignored (never unpickled) and learning works.
    mixed = Path(shutil.copytree(model, tmp_path / "mixed-model"))
    for comp in ("unet", "vae", "text_encoder"):
        write_canary(mixed / comp / ("pytorch_model.bin" if comp == "text_encoder" else
                                     "diffusion_pytorch_model.bin"), marker)
    api.learn(state, photos, token="<a>", noun="dog", method="lora", model=str(mixed), steps=1, checkpoint_every=0,
              progress=False)
    assert not marker.exists()
    assert api.info(state)["concepts"][0]["token"] == "<a>"


@pytest.mark.parametrize("where", ["generation", "root", "checkpoint"])
def test_pickle_file_in_a_state_is_refused(tmp_path, model, capsys, where):
    photos = write_photos(tmp_path / "photos", 1, seed=4)[0].parent
    state = tmp_path / "state"
    store = StateStore(state)
    with store.lock():  # a small committed state, written directly (no model needed)
        store.commit({"format_version": 1, "base_model": {"reference": str(model), "fingerprint": "x"},
                      "method": {"name": "lora", "adapter": None, "hyperparameters": {}}, "concepts": [],
                      "created_at": "2024-01-01T00:00:00+00:00", "updated_at": "2024-01-01T00:00:00+00:00",
                      "versions": {}}, {"tokens": {}})
    marker = tmp_path / "UNPICKLED"
    folder = {"generation": state / store.generation(), "root": state, "checkpoint": state / "checkpoint"}[where]
    write_canary(folder / "adapter.pt", marker)
    with pytest.raises(StateError, match="pickle file; conceptstream never loads pickle files"):
        api.info(state)
    for args in (["info", str(state)], ["generate", "x", "--state", str(state)],
                 ["learn", str(state), "--images", str(photos), "--token", "<a>", "--noun", "dog"]):
        assert cli.main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "pickle" in err[0] and "arbitrary code" in err[0], err
    assert not marker.exists()


# -- the source never loads untrusted code ---------------------------------------------------------
def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            yield node, owner, name


def _keyword_true(call: ast.Call, name: str) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


WEIGHT_CLASSES = {"StableDiffusionPipeline", "UNet2DConditionModel", "AutoencoderKL", "CLIPTextModel", "CLIPModel",
                  "AutoModel", "DiffusionPipeline"}


def test_no_remote_code_and_no_pickle_loading_in_the_source():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20
    problems = []
    for path in files:
        text = path.read_text()
        rel = path.relative_to(SRC.parent)
        if "trust_remote_code" in text:
            problems.append(f"{rel}: mentions trust_remote_code")
        for bad in ("import pickle", "import dill", "import joblib", "allow_pickle=True", "cloudpickle"):
            if bad in text:
                problems.append(f"{rel}: {bad}")
        for call, owner, name in _calls(ast.parse(text)):
            where = f"{rel}:{call.lineno}"
            if owner == "torch" and name == "load" and not _keyword_true(call, "weights_only"):
                problems.append(f"{where}: torch.load without weights_only=True")
            if owner in ("pickle", "dill", "joblib", "cloudpickle"):
                problems.append(f"{where}: {owner}.{name}")
            if name == "from_pretrained" and owner in WEIGHT_CLASSES and not _keyword_true(call, "use_safetensors"):
                problems.append(f"{where}: {owner}.from_pretrained without use_safetensors=True")
    assert not problems, "\n".join(problems)
