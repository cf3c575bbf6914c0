"""The tabletop world: deterministic renders, named sequences, concept folders and the `world` CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli
from PIL import Image

from conceptstream.concepts.folder import read_concept, read_sequence
from conceptstream.errors import UserInputError
from conceptstream.world import catalogue
from conceptstream.world.catalogue import BASE_CLASSES, get_class, get_sequence
from conceptstream.world.folders import export_classes
from conceptstream.world.render import TabletopRenderer


def _px(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


# -- determinism ---------------------------------------------------------------------------------
def test_same_seed_same_pixels_across_renderers(renderer):
    concept = get_sequence("tabletop-6")[1]
    other = TabletopRenderer(64)
    try:
        for split, i in (("train", 0), ("eval", 3)):
            a = renderer.render_concept(concept, split, i, seed=0)
            # render something else in between: no hidden state may leak into the next image
            renderer.render_class(BASE_CLASSES[2], 5, seed=0)
            b = renderer.render_concept(concept, split, i, seed=0)
            c = other.render_concept(concept, split, i, seed=0)
            assert np.array_equal(_px(a.image), _px(b.image))
            assert np.array_equal(_px(a.image), _px(c.image))
            assert a.caption == c.caption == f"a photo of a {concept.token} {concept.noun}"
        cls = BASE_CLASSES[0]
        x, y = renderer.render_class(cls, 7, seed=3), other.render_class(cls, 7, seed=3)
        assert np.array_equal(_px(x.image), _px(y.image)) and x.caption == y.caption
    finally:
        other.close()


def test_different_index_or_seed_gives_different_pixels(renderer):
    concept = get_sequence("tabletop-6")[0]
    views = [_px(renderer.render_concept(concept, "train", i, seed=0).image) for i in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not np.array_equal(views[i], views[j]), (i, j)
    assert not np.array_equal(views[0], _px(renderer.render_concept(concept, "train", 0, seed=1).image))
    cls = get_class("mug")
    a, b = renderer.render_class(cls, 0, seed=0), renderer.render_class(cls, 1, seed=0)
    assert not np.array_equal(_px(a.image), _px(b.image))
    assert "mug" in a.caption and a.noun == "mug"


# -- catalogue -----------------------------------------------------------------------------------
def test_named_sequences_have_the_documented_lengths():
    lengths = {name: len(get_sequence(name)) for name in catalogue.SEQUENCES}
    assert lengths == {"tabletop-3": 3, "tabletop-6": 6, "tabletop-6b": 6, "tabletop-10": 10, "tabletop-50": 50}
    fifty = get_sequence("tabletop-50")
    assert len({c.name for c in fifty}) == 50
    assert len({c.token for c in fifty}) == 50
    assert len({(c.class_key, c.pattern, c.colours, c.stretch) for c in fifty}) == 50  # distinct looks
    # shorter sequences are prefixes of the long one; tabletop-10 has one concept per class
    for name in ("tabletop-3", "tabletop-6", "tabletop-10"):
        seq = get_sequence(name)
        assert [c.name for c in seq] == [c.name for c in fifty[: len(seq)]]
    assert len({c.class_key for c in get_sequence("tabletop-10")}) == len(BASE_CLASSES)
    assert len({c.class_key for c in get_sequence("tabletop-6")}) == 6


def test_every_concept_noun_is_a_base_class_noun():
    nouns = {c.noun for c in BASE_CLASSES}
    for c in get_sequence("tabletop-50"):
        assert c.noun in nouns
        assert c.object_class.noun == c.noun
        assert c.pattern in catalogue.PATTERNS
        assert c.token == f"<{c.name}>"


def test_unknown_names_raise_user_input_errors():
    with pytest.raises(UserInputError, match="unknown sequence 'tabletop-7'.*tabletop-6"):
        get_sequence("tabletop-7")
    with pytest.raises(UserInputError, match="unknown base class 'giraffe'.*duck"):
        get_class("giraffe")
    assert get_class("teddy") is get_class("teddy bear")


# -- concept folders -----------------------------------------------------------------------------
def test_exported_sequence_folders_are_well_formed(world_sequence):
    data = json.loads((world_sequence / "sequence.json").read_text())
    expected = [c.name for c in get_sequence("tabletop-6")[:3]]
    assert data == {"concepts": expected}
    folders = read_sequence(world_sequence)
    assert [f.name for f in folders] == expected
    for folder, concept in zip(folders, get_sequence("tabletop-6")):
        meta = json.loads((folder.path / "concept.json").read_text())
        assert meta == {"token": concept.token, "noun": concept.noun}
        assert read_concept(folder.path).token == concept.token
        train, ev = folder.train_images(), folder.eval_images()
        assert len(train) == 8 and len(ev) == 8
        for p in train + ev:
            assert p.suffix == ".png"
            with Image.open(p) as im:
                assert im.size == (64, 64) and im.mode == "RGB"


def test_eval_views_are_disjoint_from_train_views(world_sequence):
    for folder in read_sequence(world_sequence):
        train = [_px(Image.open(p)) for p in folder.train_images()]
        ev = [_px(Image.open(p)) for p in folder.eval_images()]
        for e in ev:
            assert not any(np.array_equal(e, t) for t in train), folder.name
        # and the views within a split differ from each other
        assert len({t.tobytes() for t in train}) == len(train)


def test_exported_files_match_a_fresh_render(world_sequence, renderer):
    concept = get_sequence("tabletop-6")[2]
    on_disk = _px(Image.open(world_sequence / concept.name / "eval" / "005.png"))
    assert np.array_equal(on_disk, _px(renderer.render_concept(concept, "eval", 5, seed=0).image))


def test_export_classes_writes_n_per_class(tmp_path, renderer):
    out = export_classes(tmp_path, 2, seed=1, renderer=renderer)
    assert sorted(out) == sorted(c.noun for c in BASE_CLASSES)
    for cls in BASE_CLASSES:
        files = sorted((tmp_path / cls.noun).glob("*.png"))
        assert [f.name for f in files] == ["000.png", "001.png"]
        assert files == out[cls.noun]
        for f in files:
            with Image.open(f) as im:
                assert im.size == (64, 64) and im.mode == "RGB"
    # held-out renders: the index offset keeps them away from the training indices 0..N-1
    duck = get_class("duck")
    assert not np.array_equal(_px(Image.open(out[duck.noun][0])), _px(renderer.render_class(duck, 0, seed=1).image))


# -- CLI -----------------------------------------------------------------------------------------
def test_cli_world_list_json():
    res = run_cli("world", "list", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert [c["noun"] for c in data["classes"]] == [c.noun for c in BASE_CLASSES]
    assert set(data["sequences"]) == {"tabletop-3", "tabletop-6", "tabletop-6b", "tabletop-10", "tabletop-50"}
    assert len(data["sequences"]["tabletop-50"]["concepts"]) == 50
    assert res.stderr == ""


def test_cli_world_export_unknown_sequence_is_one_line_error(tmp_path):
    res = run_cli("world", "export", "tabletop-7", str(tmp_path / "out"))
    assert res.returncode != 0
    line = assert_one_line_error(res.stderr)
    assert "unknown sequence 'tabletop-7'" in line
    assert not (tmp_path / "out").exists()


def test_cli_world_export_and_export_classes_in_process(tmp_path, capsys):
    from conceptstream.cli import main

    assert main(["world", "export", "tabletop-3", str(tmp_path / "seq"), "--train-views", "2",
                 "--eval-views", "1"]) == 0
    folders = read_sequence(tmp_path / "seq")
    assert [len(f.train_images()) for f in folders] == [2, 2, 2]
    assert [len(f.eval_images()) for f in folders] == [1, 1, 1]
    capsys.readouterr()
    assert main(["world", "export-classes", str(tmp_path / "cls"), "-n", "0"]) == 2
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert "-n must be >= 1" in err
