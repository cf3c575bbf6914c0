"""Train / val / test splits: disjoint render streams, the val/ folder of the concept-folder format,
and the independent confirmation stream tabletop-6b."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conceptstream.concepts.folder import read_concept, read_sequence, write_concept
from conceptstream.world import catalogue, render
from conceptstream.world.catalogue import BACKGROUNDS, get_sequence
from conceptstream.world.folders import export_sequence


def _px(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


# -- render streams ------------------------------------------------------------------------------
def test_train_val_and_test_renders_differ_pairwise_and_repeat_exactly(renderer):
    concept = get_sequence("tabletop-6")[3]
    views = {(split, i): _px(renderer.render_concept(concept, split, i, seed=0).image)
             for split in ("train", "val", "eval") for i in range(3)}
    keys = list(views)
    for a in range(len(keys)):
        for b in range(a + 1, len(keys)):
            assert not np.array_equal(views[keys[a]], views[keys[b]]), (keys[a], keys[b])
    for (split, i), pixels in views.items():
        assert np.array_equal(pixels, _px(renderer.render_concept(concept, split, i, seed=0).image)), (split, i)
    with pytest.raises(ValueError, match="split must be one of 'train', 'val', 'eval', got 'test'"):
        renderer.render_concept(concept, "test", 0)


def test_train_and_eval_views_keep_their_random_streams(renderer, monkeypatch):
    """Adding 'val' must not move a single train or eval pixel: each split is still drawn from
    stable_rng("concept", seed, name, split, index), and the pixels are what that stream draws."""
    concept = get_sequence("tabletop-6")[1]
    keys = []
    real = render.stable_rng

    def recording(*key):
        keys.append(key)
        return real(*key)

    monkeypatch.setattr(render, "stable_rng", recording)
    for split in ("train", "val", "eval"):
        renderer.render_concept(concept, split, 4, seed=2)
    assert keys == [("concept", 2, concept.name, split, 4) for split in ("train", "val", "eval")]
    monkeypatch.undo()
    for split in ("train", "eval"):  # the code path of the two-split renderer, step by step
        rng = real("concept", 2, concept.name, split, 4)
        background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        before = renderer._draw(concept.object_class, rng, None, background,
                                pattern=(concept.pattern, concept.colours), stretch=concept.stretch)
        assert np.array_equal(_px(before), _px(renderer.render_concept(concept, split, 4, seed=2).image)), split


# -- concept folders -----------------------------------------------------------------------------
def test_a_concept_folder_without_val_reads_as_before(tmp_path):
    folder = tmp_path / "dog"
    (folder / "train").mkdir(parents=True)
    (folder / "eval").mkdir()
    (folder / "concept.json").write_text(json.dumps({"token": "<dog>", "noun": "dog"}))
    for sub, n in (("train", 3), ("eval", 2)):
        for i in range(n):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / sub / f"{i}.png")
    c = read_concept(folder)
    assert c.val_dir == folder / "val" and not c.val_dir.exists()
    assert c.val_images() == [] and c.heldout_images("val") == []
    assert c.heldout_images("test") == c.eval_images() == [folder / "eval" / "0.png", folder / "eval" / "1.png"]
    assert c.heldout_dir("test") == c.eval_dir and c.heldout_dir("val") == c.val_dir
    with pytest.raises(ValueError, match="split must be one of val, test"):
        c.heldout_images("eval")
    (folder / "val").mkdir()
    for name in ("b.png", "a.jpg", "notes.txt"):
        (folder / "val" / name).write_bytes(b"x")
    assert c.val_images() == c.heldout_images("val") == [folder / "val" / "a.jpg", folder / "val" / "b.png"]
    assert len(c.eval_images()) == 2 and len(c.train_images()) == 3  # the other splits are untouched


def test_write_concept_creates_every_split_folder(tmp_path):
    c = read_concept(write_concept(tmp_path / "cat", "<cat>", "cat"))
    assert c.train_dir.is_dir() and c.val_dir.is_dir() and c.eval_dir.is_dir()
    assert (c.train_images(), c.val_images(), c.eval_images()) == ([], [], [])


def test_export_sequence_writes_val_views_from_their_own_stream(tmp_path, renderer):
    concepts = get_sequence("tabletop-6b")[:2]
    folders = export_sequence(concepts, tmp_path / "seq", train_views=2, eval_views=2, val_views=3, renderer=renderer)
    assert [(len(f.train_images()), len(f.val_images()), len(f.eval_images())) for f in folders] == [(2, 3, 2)] * 2
    for folder, concept in zip(folders, concepts):
        val = [_px(Image.open(p)) for p in folder.val_images()]
        assert np.array_equal(val[2], _px(renderer.render_concept(concept, "val", 2, seed=0).image))
        others = [_px(Image.open(p)) for p in folder.train_images() + folder.eval_images()]
        assert not any(np.array_equal(v, o) for v in val for o in others), folder.name
    # a split's views do not depend on how many views the others have; no val views: an empty val/
    again = export_sequence(concepts[:1], tmp_path / "noval", train_views=1, eval_views=2, renderer=renderer)[0]
    assert again.val_dir.is_dir() and again.val_images() == []
    assert np.array_equal(_px(Image.open(again.eval_images()[1])), _px(Image.open(folders[0].eval_images()[1])))


def test_cli_world_export_writes_val_views(tmp_path, capsys):
    from conceptstream.cli import main

    assert main(["world", "export", "tabletop-3", str(tmp_path / "seq"), "--train-views", "1", "--val-views", "2",
                 "--eval-views", "1"]) == 0
    folders = read_sequence(tmp_path / "seq")
    assert [(len(f.train_images()), len(f.val_images()), len(f.eval_images())) for f in folders] == [(1, 2, 1)] * 3


def test_the_sequence_source_exports_val_views(tmp_path):
    from conceptstream.concepts.sources import find_source

    source = find_source("tabletop-6b")
    assert source is not None and source.concepts("tabletop-6b") == list(catalogue.SEQUENCES["tabletop-6b"])
    source.export("tabletop-6b", tmp_path / "seq", 1, 2, 1, False, 3)
    (folder,) = read_sequence(tmp_path / "seq")
    assert folder.name == catalogue.SEQUENCES["tabletop-6b"][0]
    assert (len(folder.train_images()), len(folder.val_images()), len(folder.eval_images())) == (1, 3, 2)


# -- the confirmation stream ---------------------------------------------------------------------
def test_tabletop_6b_is_disjoint_from_tabletop_10_with_six_classes():
    b = get_sequence("tabletop-6b")
    assert len(b) == 6 and len({c.name for c in b}) == 6
    assert not {c.name for c in b} & {c.name for c in get_sequence("tabletop-10")}
    assert len({c.class_key for c in b}) == 6
    assert all(c in catalogue.CONCEPTS[10:] for c in b)
    assert "tabletop-6b" in catalogue.SEQUENCE_DESCRIPTIONS
    # new instances of tabletop-6's classes: every concept looks different from its counterpart there
    for new, tuned in zip(b, get_sequence("tabletop-6")):
        assert new.class_key == tuned.class_key
        assert new.pattern != tuned.pattern and new.colours != tuned.colours and new.stretch != tuned.stretch
