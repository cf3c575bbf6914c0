"""Each dataset reader on a tiny fake copy of the dataset's on-disk layout."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from conceptstream.concepts.folder import read_sequence
from conceptstream.datasets import (
    READERS,
    convert_celeba,
    convert_customconcept101,
    convert_landmarks,
    convert_textual_inversion,
    get_reader,
)
from conceptstream.datasets.common import split_train_eval
from conceptstream.errors import UserInputError


def _img(path: Path, k: int, size: tuple[int, int] = (20, 16), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = ((37 * k) % 256, (91 * k) % 256, (53 * k + 40) % 256)
    if mode == "RGBA":
        Image.new("RGBA", size, color + (128,)).save(path)
    else:
        Image.new("RGB", size, color).save(path)
    return path


def _check_sequence(dst: Path, expected_names: list[str]) -> None:
    """Readable by read_sequence, RGB PNGs, >= 1 train and eval image, disjoint splits."""
    concepts = read_sequence(dst)
    assert [c.name for c in concepts] == expected_names
    for concept in concepts:
        assert concept.token == f"<{concept.name}>"
        train, held = concept.train_images(), concept.eval_images()
        assert train and held
        for path in train + held:
            assert path.suffix == ".png"
            with Image.open(path) as img:
                assert img.mode == "RGB"
        sources = json.loads((concept.path / "sources.json").read_text())
        assert sorted(sources["train"]) == [p.name for p in train]
        assert sorted(sources["eval"]) == [p.name for p in held]
        assert not set(sources["train"].values()) & set(sources["eval"].values())


# ----------------------------------------------------------------------------- CustomConcept101


def _customconcept101(root: Path) -> Path:
    entries = [
        {"instance_prompt": "photo of a <new1> cat", "class_prompt": "cat",
         "instance_data_dir": "./benchmark_dataset/pet_cat1", "class_data_dir": "./regularization/pet_cat",
         "prompt_filename": "prompts/cat.txt"},
        {"instance_prompt": "photo of a <new1> dice plushie", "class_prompt": "dice",
         "instance_data_dir": "./benchmark_dataset/plushie_dice", "class_data_dir": "./regularization/plushie_dice",
         "prompt_filename": "prompts/plushie.txt"},
        {"instance_prompt": "photo of a <new1> cat", "class_prompt": "cat",  # repeated entry is ignored
         "instance_data_dir": "./benchmark_dataset/pet_cat1", "class_data_dir": "./regularization/pet_cat",
         "prompt_filename": "prompts/cat.txt"},
    ]
    root.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps(entries, indent=4))
    (root / "prompts").mkdir()
    (root / "prompts" / "cat.txt").write_text("Photo of a {}.\n{} swimming in a pool.\n")
    for k in range(4):
        _img(root / "benchmark_dataset" / "pet_cat1" / f"{k}.jpg", k)
    for k in range(3):
        _img(root / "benchmark_dataset" / "plushie_dice" / f"img{k}.png", 10 + k)
    (root / "benchmark_dataset" / "plushie_dice" / "notes.txt").write_text("not an image")
    return root


def test_customconcept101(tmp_path: Path):
    src = _customconcept101(tmp_path / "customconcept101")
    folders = convert_customconcept101(src, tmp_path / "out", size=12)
    _check_sequence(tmp_path / "out", ["pet_cat1", "plushie_dice"])
    assert [f.noun for f in folders] == ["cat", "dice plushie"]
    cat = folders[0]
    assert (len(cat.train_images()), len(cat.eval_images())) == (3, 1)
    with Image.open(cat.train_images()[0]) as img:
        assert img.size == (12, 12)
    prompts = (cat.path / "prompts.txt").read_text().splitlines()
    assert prompts == ["Photo of a <pet_cat1> cat.", "<pet_cat1> cat swimming in a pool."]
    assert not (folders[1].path / "prompts.txt").exists()  # prompts/plushie.txt is absent


def test_customconcept101_selection_determinism_and_overwrite(tmp_path: Path):
    src = _customconcept101(tmp_path / "cc")
    one = convert_customconcept101(src, tmp_path / "a", concepts=["plushie_dice", "pet_cat1"], seed=3)
    two = convert_customconcept101(src, tmp_path / "b", concepts=["plushie_dice", "pet_cat1"], seed=3)
    assert [f.name for f in one] == ["plushie_dice", "pet_cat1"]
    for a, b in zip(one, two):
        assert (a.path / "sources.json").read_text() == (b.path / "sources.json").read_text()
    with pytest.raises(UserInputError, match="already holds a sequence"):
        convert_customconcept101(src, tmp_path / "a", limit=1)
    assert [f.name for f in convert_customconcept101(src, tmp_path / "a", limit=1, overwrite=True)] == ["pet_cat1"]
    assert read_sequence(tmp_path / "a")[0].name == "pet_cat1"
    with pytest.raises(UserInputError, match="unknown CustomConcept101 concept 'pet_dog9'"):
        convert_customconcept101(src, tmp_path / "c", concepts=["pet_dog9"])


def test_customconcept101_without_dataset_json(tmp_path: Path):
    src = _customconcept101(tmp_path / "cc")
    (src / "dataset.json").unlink()
    with pytest.raises(UserInputError, match="no dataset.json"):
        convert_customconcept101(src, tmp_path / "out")
    folders = convert_customconcept101(src, tmp_path / "out", nouns={"pet_cat1": "cat"})
    assert [(f.name, f.noun) for f in folders] == [("pet_cat1", "cat")]


def test_customconcept101_missing_images(tmp_path: Path):
    src = _customconcept101(tmp_path / "cc")
    for path in (src / "benchmark_dataset" / "pet_cat1").iterdir():
        path.unlink()
    with pytest.raises(UserInputError, match="no images for CustomConcept101 concept 'pet_cat1'"):
        convert_customconcept101(src, tmp_path / "out")


# ----------------------------------------------------------------------------- Textual Inversion


def test_textual_inversion(tmp_path: Path):
    src = tmp_path / "ti"
    for k in range(5):
        _img(src / "cat_statue" / f"{k}.jpeg", k)
    for k in range(4):
        _img(src / "my_toy" / f"{k}.png", 20 + k, mode="RGBA")
    (src / "empty").mkdir()
    with pytest.raises(UserInputError, match="no noun known for Textual Inversion concept 'my_toy'"):
        convert_textual_inversion(src, tmp_path / "out")
    folders = convert_textual_inversion(src, tmp_path / "out", nouns={"my_toy": "toy"}, eval_fraction=0.4)
    _check_sequence(tmp_path / "out", ["cat_statue", "my_toy"])
    assert [f.noun for f in folders] == ["cat figurine", "toy"]
    assert (len(folders[0].train_images()), len(folders[0].eval_images())) == (3, 2)
    with Image.open(folders[1].train_images()[0]) as img:  # half-transparent RGBA composited on white
        assert img.mode == "RGB" and img.getpixel((0, 0))[0] > 100
    with pytest.raises(UserInputError, match="does not exist"):
        convert_textual_inversion(tmp_path / "missing", tmp_path / "out2")


# ----------------------------------------------------------------------------- Landmarks


def _landmarks(root: Path) -> Path:
    rows = []
    on_disk = {7: 4, 3: 2, 9: 5, 12: 1}
    in_csv = {7: 4, 3: 5, 9: 6, 12: 1}
    n = 0
    for landmark, count in in_csv.items():
        for k in range(count):
            image_id = f"{n:04x}{landmark:02x}ab{k:06x}"
            rows.append({"id": image_id, "url": f"https://example.invalid/{image_id}.jpg", "landmark_id": landmark})
            if k < on_disk[landmark]:
                _img(root / "train" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg", n, mode="RGB")
            n += 1
    with open(root / "train.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["id", "url", "landmark_id"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def test_landmarks_first_k_with_enough_images(tmp_path: Path):
    src = tmp_path / "gldv2"
    (src / "train").mkdir(parents=True)
    _landmarks(src)
    folders = convert_landmarks(src, tmp_path / "out", num_landmarks=2, min_images=3, noun="waterfall",
                                nouns={9: "bridge"})
    # landmark 3 has 5 rows but only 2 images on disk, so 7 and 9 are the first two with >= 3
    _check_sequence(tmp_path / "out", ["landmark-7", "landmark-9"])
    assert [f.noun for f in folders] == ["waterfall", "bridge"]
    with pytest.raises(UserInputError, match="only 2 landmarks"):
        convert_landmarks(src, tmp_path / "out2", num_landmarks=3, min_images=3)


def test_landmarks_given_ids_and_errors(tmp_path: Path):
    src = tmp_path / "gldv2"
    (src / "train").mkdir(parents=True)
    _landmarks(src)
    folders = convert_landmarks(src, tmp_path / "out", landmark_ids=[9, 3], max_images=4)
    _check_sequence(tmp_path / "out", ["landmark-9", "landmark-3"])
    assert len(folders[0].train_images()) + len(folders[0].eval_images()) == 4
    with pytest.raises(UserInputError, match="landmark 99 is not in"):
        convert_landmarks(src, tmp_path / "out2", landmark_ids=[99])
    (src / "train.csv").unlink()
    with pytest.raises(UserInputError, match="train.csv"):
        convert_landmarks(src, tmp_path / "out3")


# ----------------------------------------------------------------------------- CelebA


def _celeba(root: Path, official: bool) -> Path:
    counts = {5: 4, 2: 2, 8: 3, 11: 6}
    lines, n = [], 0
    image_dir = root / ("Img/img_align_celeba" if official else "img_align_celeba")
    for identity, count in counts.items():
        for _ in range(count):
            n += 1
            name = f"{n:06d}.jpg"
            lines.append(f"{name} {identity}")
            _img(image_dir / name, n, size=(18, 22))
    id_file = root / ("Anno/identity_CelebA.txt" if official else "identity_CelebA.txt")
    id_file.parent.mkdir(parents=True, exist_ok=True)
    id_file.write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("official", [False, True])
def test_celeba(tmp_path: Path, official: bool):
    src = _celeba(tmp_path / "celeba", official)
    folders = convert_celeba(src, tmp_path / "out", num_identities=2, min_images=3)
    _check_sequence(tmp_path / "out", ["celeb-5", "celeb-8"])
    assert {f.noun for f in folders} == {"person"}
    folders = convert_celeba(src, tmp_path / "out", identities=[11, 2], overwrite=True, eval_fraction=0.5)
    _check_sequence(tmp_path / "out", ["celeb-11", "celeb-2"])
    assert (len(folders[0].train_images()), len(folders[0].eval_images())) == (3, 3)


def test_celeba_missing_files(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="identity_CelebA.txt"):
        convert_celeba(tmp_path / "empty", tmp_path / "out")


# ----------------------------------------------------------------------------- shared pieces


def test_registry_and_split():
    assert set(READERS) == {"customconcept101", "textual-inversion", "landmarks", "celeba"}
    assert get_reader("textual_inversion") is convert_textual_inversion
    with pytest.raises(UserInputError, match="unknown dataset"):
        get_reader("imagenet")
    items = list(range(10))
    train, held = split_train_eval(items, 0.25, seed=1)
    assert (train, held) == split_train_eval(items, 0.25, seed=1)
    assert len(held) == 3 and sorted(train + held) == items and not set(train) & set(held)
    assert split_train_eval([1, 2], 0.1)[1] and split_train_eval([1], 0.5) == ([1], [])
    assert split_train_eval(items, 0.0) == (items, [])
    with pytest.raises(UserInputError):
        split_train_eval(items, 1.0)


# ----------------------------------------------------------------------------- image modes


def test_readers_accept_every_image_mode_learn_accepts(tmp_path: Path):
    """Converted PNGs hold exactly the pixels `learn` would load from the source files."""
    import numpy as np

    from conceptstream.concepts.images import load_image

    src = tmp_path / "ti" / "odd_modes"
    src.mkdir(parents=True)
    Image.fromarray(np.full((16, 20), 128 * 257, dtype=np.uint16)).save(src / "a-gray16.png")
    palette = Image.new("P", (20, 16), 1)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(0, (0, 0, 10, 16))
    palette.save(src / "b-palette.png", transparency=0)  # the left half (index 0) is transparent
    Image.fromarray(np.linspace(-1, 3, 320, dtype=np.float32).reshape(16, 20)).save(src / "c-float.tif")
    gray_alpha = Image.new("LA", (20, 16), (0, 0))
    gray_alpha.save(src / "d-gray-alpha.png")
    Image.new("RGB", (20, 16), (10, 200, 30)).convert("CMYK").save(src / "e-cmyk.jpg")
    for name, mode in (("a-gray16.png", "I"), ("b-palette.png", "P"), ("c-float.tif", "F")):
        with Image.open(src / name) as img:
            assert img.mode.startswith(mode), (name, img.mode)
    (folder,) = convert_textual_inversion(tmp_path / "ti", tmp_path / "out", nouns={"odd_modes": "toy"},
                                          eval_fraction=0.0)
    converted = folder.train_images()
    assert len(converted) == 5
    sources = json.loads((folder.path / "sources.json").read_text())["train"]
    for path in converted:
        original = tmp_path / "ti" / sources[path.name]
        with Image.open(path) as img:
            assert img.mode == "RGB"
            assert np.array_equal(np.asarray(img), np.asarray(load_image(original))), original.name
    pixels = {sources[p.name].split("/")[-1]: np.asarray(Image.open(p)) for p in converted}
    assert (pixels["a-gray16.png"] == 128).all()  # 16-bit scaled to 8 bits, not clipped to white
    assert (pixels["b-palette.png"][:, :10] == 255).all()  # transparent palette entries become white
    assert (pixels["b-palette.png"][:, 10:] == [0, 0, 255]).all()
    assert (pixels["d-gray-alpha.png"] == 255).all()


def test_reader_names_an_unreadable_image(tmp_path: Path):
    src = tmp_path / "ti" / "broken"
    _img(src / "0.png", 0)
    (src / "1.png").write_bytes(b"not a png at all")
    with pytest.raises(UserInputError, match=r"1\.png is not a readable image"):
        convert_textual_inversion(tmp_path / "ti", tmp_path / "out", nouns={"broken": "toy"})
