"""Every registered method learns two tasks; the adapter kind (or the method) sets the default rate."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from streams import commit, learn_folder, new_stream

from conceptstream import api
from conceptstream.concepts.folder import read_concept
from conceptstream.errors import UserInputError
from conceptstream.methods.registry import get_method, method_names

SMALL = {"dsc_iters": 2, "fisher_passes": 1}


@pytest.mark.parametrize("name", method_names())
def test_every_method_learns_two_tasks(tmp_path, random_model_path, concept_dirs, name):
    hparams = {k: v for k, v in SMALL.items() if k in get_method(name).all_defaults()}
    state = tmp_path / "state"
    reports = [api.learn(state, d, method=name if i == 0 else None, model=str(random_model_path), steps=2,
                         progress=False, hparams=hparams if i == 0 else None)
               for i, d in enumerate(concept_dirs[:2])]
    assert [r.task_index for r in reports] == [0, 1]
    assert all(math.isfinite(r.final_loss) for r in reports)
    data = api.info(state)
    assert data["method"]["name"] == name
    assert [c["token"] for c in data["concepts"]] == [read_concept(d).token for d in concept_dirs[:2]]
    assert [c["task_index"] for c in data["concepts"]] == [0, 1]
    assert "tokens.safetensors" in data["files"]
    assert ("adapter.safetensors" in data["files"]) == get_method(name).uses_adapter
    for k, v in hparams.items():
        assert data["method"]["hyperparameters"][k] == v
    stream = api.open_stream(state)
    assert stream.tokens == [c["token"] for c in data["concepts"]]


def test_adapter_kind_sets_the_default_learning_rate_and_a_saved_stream_keeps_its_own(tmp_path, bundled_model_path,
                                                                                     concept_dirs):
    from conceptstream.adapters.registry import ADAPTERS

    assert ADAPTERS["vera"].default_lr > ADAPTERS["lora"].default_lr  # VeRA's vectors need the larger step
    for adapter in ("lora", "vera"):  # the kind's rate, unless the method has its own for it (a tuning winner)
        stream = new_stream(bundled_model_path, "lora", adapter=adapter)
        assert stream.method.hparams["lr"] == type(stream.method).adapter_lr.get(adapter, ADAPTERS[adapter].default_lr)
    assert new_stream(bundled_model_path, "lora", adapter="vera").method.hparams["lr"] == ADAPTERS["vera"].default_lr
    explicit = new_stream(bundled_model_path, "ewc-dc", adapter="vera", lr=3e-4, dc_temperature=0.01)
    assert explicit.method.hparams["lr"] == 3e-4 and explicit.settings.dc.temperature == 0.01
    # the optimizer really uses it
    groups = explicit.method.trainable_groups(SimpleNamespace(unet=explicit.pipe.unet), None)
    assert [g["lr"] for g in groups if g["name"] == "adapter"] == [3e-4]
    # a stream saved under one rate keeps it, whatever the default is when it is reopened
    stream = new_stream(bundled_model_path, "lora", adapter="vera", lr=2e-3)
    learn_folder(stream, concept_dirs[0], steps=1)
    commit(stream, tmp_path / "state")
    assert api.open_stream(tmp_path / "state").method.hparams["lr"] == 2e-3
    with pytest.raises(UserInputError, match="unknown adapter"):
        new_stream(bundled_model_path, "lora", adapter="dora")
    # a method with its own rate for an adapter kind (lora-ewc's tuning winner) overrides the kind's
    from conceptstream.methods.lora_ewc import LoRAEWC

    own = LoRAEWC.adapter_lr["lora"]
    assert own != ADAPTERS["lora"].default_lr
    assert new_stream(bundled_model_path, "lora-ewc").method.hparams["lr"] == own
    assert new_stream(bundled_model_path, "lora-ewc", lr=1e-3).method.hparams["lr"] == 1e-3
    with pytest.raises(UserInputError, match="'c-lora' is defined on lora adapters.*--adapter lora"):
        new_stream(bundled_model_path, "c-lora", adapter="vera")
