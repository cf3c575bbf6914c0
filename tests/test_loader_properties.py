"""Property-based tests of the two readers of untrusted input: the image loader and the manifest reader.

Image loader (``conceptstream.concepts.images``): any PIL image or any file becomes an RGB image of the
requested size, or a :class:`UserInputError` naming the problem, never another exception.
Manifest reader: any bytes in ``manifest.json`` give a manifest or one StateError line, through
the file reader, the store, ``api.info`` and the CLI alike (tests/state covers validate_manifest
on JSON values and round trips).
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from conceptstream import api, cli
from conceptstream.concepts.images import MAX_PIXELS, collect_image_paths, load_image, to_rgb
from conceptstream.errors import StateError, UserInputError
from conceptstream.state import FORMAT_VERSION, StateStore, read_manifest_file

MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "I;16", "I;16B", "I;16L",
         "LA", "PA", "La", "RGBa", "RGBX"]
# (format, suffix, modes Pillow can write in it)
FORMATS = [("PNG", ".png", ["1", "L", "P", "RGB", "RGBA", "LA", "I", "I;16"]),
           ("JPEG", ".jpg", ["L", "RGB", "CMYK"]),
           ("BMP", ".bmp", ["1", "L", "P", "RGB"]),
           ("GIF", ".gif", ["L", "P"]),
           ("TIFF", ".tiff", ["1", "L", "P", "RGB", "RGBA", "CMYK", "I;16", "F", "LA"]),
           ("WEBP", ".webp", ["RGB", "RGBA"])]

sizes = st.integers(1, 48)
SLOW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _bytes_per_pixel(mode: str) -> float:
    return {"1": 1 / 8, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "LA": 2, "PA": 2, "La": 2,
            "I": 4, "F": 4}.get(mode, 3 if mode in ("RGB", "YCbCr", "LAB", "HSV") else 4)


@st.composite
def pil_images(draw, modes=MODES):
    mode = draw(st.sampled_from(modes))
    w, h = draw(sizes), draw(sizes)
    n = int(np.ceil(w * _bytes_per_pixel(mode))) * h if mode == "1" else int(w * h * _bytes_per_pixel(mode))
    data = draw(st.binary(min_size=n, max_size=n))
    return Image.frombytes(mode, (w, h), data)


def _check_rgb(img: Image.Image, size: tuple[int, int]) -> None:
    assert img.mode == "RGB"
    assert img.size == size
    arr = np.asarray(img)
    assert arr.dtype == np.uint8 and arr.shape == (size[1], size[0], 3)


@SLOW
@given(pil_images())
def test_to_rgb_converts_every_mode_and_keeps_the_size(img):
    _check_rgb(to_rgb(img), img.size)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["I", "F", "I;16"]), sizes, sizes)
def test_to_rgb_handles_extreme_values(mode, w, h):
    if mode == "F":
        values = np.array([np.nan, np.inf, -np.inf, 3.4e38, -3.4e38, 0.0], dtype=np.float32)
    elif mode == "I":
        values = np.array([-(2**31), 2**31 - 1, 0, 70000], dtype=np.int32)
    else:
        values = np.array([0, 65535, 255, 256], dtype=np.uint16)
    arr = np.resize(values, (h, w))
    img = Image.fromarray(arr) if mode != "I;16" else Image.frombytes("I;16", (w, h), arr.astype("<u2").tobytes())
    _check_rgb(to_rgb(img), (w, h))


@SLOW
@given(st.data(), st.sampled_from(FORMATS), st.integers(1, 40))
def test_load_image_of_any_saved_image_is_rgb_of_the_requested_size(data, fmt, size):
    name, suffix, modes = fmt
    img = data.draw(pil_images(modes))
    buf = io.BytesIO()
    try:
        img.save(buf, format=name)
    except (OSError, ValueError, KeyError):
        assume(False)  # this Pillow cannot write that combination; not the loader's concern
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"x{suffix}"
        path.write_bytes(buf.getvalue())
        _check_rgb(load_image(path, size), (size, size))
        _check_rgb(load_image(path), img.size)


@SLOW
@given(st.data(), st.sampled_from(FORMATS), st.integers(1, 32))
def test_damaged_image_files_give_rgb_or_user_input_error(data, fmt, size):
    """Truncated or bit-flipped files of every format: an RGB image or one UserInputError line."""
    name, suffix, modes = fmt
    img = data.draw(pil_images(modes))
    buf = io.BytesIO()
    try:
        img.save(buf, format=name)
    except (OSError, ValueError, KeyError):
        assume(False)
    raw = bytearray(buf.getvalue())
    cut = data.draw(st.integers(0, len(raw)))
    flips = data.draw(st.lists(st.tuples(st.integers(0, max(len(raw) - 1, 0)), st.integers(0, 255)), max_size=4))
    for pos, value in flips:
        if raw:
            raw[pos] = value
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"x{suffix}"
        path.write_bytes(bytes(raw[:cut]))
        try:
            out = load_image(path, size)
        except UserInputError as exc:
            assert "\n" not in str(exc) and str(path) in str(exc)
        else:
            _check_rgb(out, (size, size))


@SLOW
@given(st.binary(max_size=300), st.sampled_from([s for _, s, _ in FORMATS] + [".png"]))
def test_arbitrary_bytes_give_rgb_or_user_input_error(raw, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"x{suffix}"
        path.write_bytes(raw)
        try:
            out = load_image(path, 8)
        except UserInputError as exc:
            assert "\n" not in str(exc)
        else:
            _check_rgb(out, (8, 8))


def test_image_headers_claiming_huge_sizes_are_refused(tmp_path):
    """A decompression bomb is refused from its header, before any pixel is decoded."""
    side = int(MAX_PIXELS**0.5) + 1
    raw = io.BytesIO()
    Image.new("1", (side, side)).save(raw, format="PNG")  # compresses to a few KB
    path = tmp_path / "bomb.png"
    path.write_bytes(raw.getvalue())
    with pytest.raises(UserInputError, match="too large"):
        load_image(path, 16)


def test_paths_that_are_not_files_give_user_input_error(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        load_image(tmp_path / "missing.png", 8)
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(UserInputError):
        load_image(tmp_path / "dir.png", 8)
    with pytest.raises(UserInputError):
        load_image(tmp_path / "missing.png", 0)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from(["a.png", "b.JPG", "c.txt", "d.json", ".hidden.png", "e", "f.tiff", "g.webp",
                                 "h.md", "i.gif"]), unique=True, min_size=1))
def test_collect_image_paths_keeps_images_and_warns_about_the_rest(names):
    with tempfile.TemporaryDirectory() as tmp:
        for n in names:
            (Path(tmp) / n).write_bytes(b"x")
        images = [n for n in names if not n.startswith(".") and Path(n).suffix.lower() in
                  {".png", ".jpg", ".tiff", ".webp", ".gif"}]
        others = [n for n in names if not n.startswith(".") and n not in images]
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                found = collect_image_paths(tmp)
            except UserInputError as exc:
                assert not images and "no images found" in str(exc)
                return
        assert sorted(p.name for p in found) == sorted(images)
        skipped = [str(w.message) for w in caught if "skipping" in str(w.message)]
        assert bool(skipped) == bool(others)


# -- manifest reader -------------------------------------------------------------------------------
def _valid_manifest() -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "base_model": {"reference": "tiny", "fingerprint": "0123abcd"},
        "method": {"name": "lora", "adapter": {"kind": "lora", "rank": 4, "targets": "cross-kv"},
                   "hyperparameters": {"lr": 0.001}, "state_growth": "none"},
        "concepts": [{"token": "<my-dog>", "noun": "dog", "task_index": 0, "created_at": "2024-05-01T12:00:00+00:00",
                      "steps": 200, "seed": 0, "images": 5}],
        "created_at": "2024-05-01T11:00:00+00:00",
        "updated_at": "2024-05-01T12:00:00+00:00",
        "versions": {"conceptstream": "0.1.0"},
    }


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=12,
)


def _mutations() -> st.SearchStrategy[bytes]:
    """Bytes a manifest.json might hold after a bad disk, a hand edit or a foreign tool."""
    text = json.dumps(_valid_manifest(), indent=2).encode()
    truncated = st.integers(0, len(text)).map(lambda n: text[:n])
    flipped = st.tuples(st.integers(0, len(text) - 1), st.integers(0, 255)).map(
        lambda t: text[: t[0]] + bytes([t[1]]) + text[t[0] + 1:])
    nested = st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * n)
    return st.binary(max_size=200) | truncated | flipped | nested | json_values.map(lambda v: json.dumps(v).encode())


@settings(max_examples=300, deadline=None)
@given(_mutations())
def test_read_manifest_file_on_any_bytes_is_a_manifest_or_one_state_error(raw):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "manifest.json"
        path.write_bytes(raw)
        try:
            out = read_manifest_file(path)
        except StateError as exc:
            assert "\n" not in str(exc) and str(path) in str(exc)
        else:
            assert isinstance(out, dict)


def _state_with_manifest_bytes(root: Path, raw: bytes) -> Path:
    state = root / "state"
    store = StateStore(state)
    with store.lock():
        store.commit(_valid_manifest(), {"tokens": {"<my-dog>": torch.zeros(4)}})
    (state / store.generation() / "manifest.json").write_bytes(raw)
    return state


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutations())
def test_damaged_manifest_in_a_state_only_ever_gives_state_error(raw):
    """The store, ``api.info``/``format_info`` and ``conceptstream info`` all read the same bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        state = _state_with_manifest_bytes(Path(tmp), raw)
        try:
            StateStore(state).read_manifest()
        except StateError as exc:
            assert "\n" not in str(exc)
            with pytest.raises(StateError):
                api.info(state)
        else:
            api.format_info(api.info(state))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([("method", "adapter"), ("method", "hyperparameters"), ("method", "state_growth"),
                        ("concepts", 0, "steps"), ("base_model", "reference"), ("extra",)]), json_values)
def test_info_formats_every_manifest_the_validator_accepts(path, value):
    m = _valid_manifest()
    target = m
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with tempfile.TemporaryDirectory() as tmp:
        state = _state_with_manifest_bytes(Path(tmp), json.dumps(m).encode())
        try:
            data = api.info(state)
        except StateError:
            return
        text = api.format_info(data)
        assert "<my-dog>" in text


def test_cli_info_on_damaged_manifests(tmp_path, capsys):
    for i, raw in enumerate([b"{not json", b"[]", json.dumps({**_valid_manifest(), "concepts": "x"}).encode(),
                             json.dumps({**_valid_manifest(), "format_version": FORMAT_VERSION + 1}).encode(),
                             b"\xff\xfe"]):
        state = _state_with_manifest_bytes(tmp_path / str(i), raw)
        assert cli.main(["info", str(state)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("conceptstream: error: "), err
