"""The adapter's initialisation follows a seed: the first task's seed of a new stream (so every bench seed
starts from its own LoRA A / VeRA projections), recorded in the manifest and kept when the state reloads."""

from __future__ import annotations

import pytest
import torch
from streams import commit, learn_folder, new_stream

from conceptstream import api
from conceptstream.adapters.registry import AdapterSpec, adapter_state, attach_adapter
from conceptstream.engine import ConceptStream
from conceptstream.errors import StateError, UserInputError
from conceptstream.evaluation.bench.run import learn_seed
from conceptstream.state import StateStore


def fresh_unet():
    from diffusers import UNet2DConditionModel

    from conceptstream.world.tiny_model import UNET_CONFIG

    torch.manual_seed(123)  # the same base weights every time
    return UNet2DConditionModel(**UNET_CONFIG)


def initial_state(spec: AdapterSpec) -> dict[str, torch.Tensor]:
    unet = fresh_unet()
    torch.manual_seed(999)  # the global RNG's state before attaching must not matter
    attach_adapter(unet, spec)
    return adapter_state(unet)


def random_part(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The randomly initialised tensors: LoRA's A (B starts at zero), VeRA's shared projections."""
    return {k: v for k, v in state.items() if "lora_A" in k or k in ("vera_A", "vera_B")}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["lora", "vera"])
def test_the_initialisation_is_a_function_of_the_seed(kind):
    rank = 4 if kind == "lora" else 16
    a = random_part(initial_state(AdapterSpec(kind=kind, rank=rank, seed=0)))
    b = random_part(initial_state(AdapterSpec(kind=kind, rank=rank, seed=1000)))
    again = random_part(initial_state(AdapterSpec(kind=kind, rank=rank, seed=1000)))
    assert a, "no randomly initialised adapter tensors found"
    if kind == "vera":
        assert {"vera_A", "vera_B"} <= a.keys()
    assert same(b, again)
    assert all(not torch.equal(a[k], b[k]) for k in a)


def test_a_new_stream_takes_its_first_tasks_seed(tmp_path, random_model_path, concept_dirs):
    model = str(random_model_path)
    seeds = {}
    for name, kw in (("s5", {"seed": 5}), ("s5-again", {"seed": 5}), ("s5-init7", {"seed": 5, "adapter_seed": 7}),
                     ("s5-init5", {"seed": 5, "adapter_seed": 5})):
        api.learn(tmp_path / name, concept_dirs[0], method="lora", model=model, steps=1, progress=False, **kw)
        seeds[name] = api.info(tmp_path / name)["method"]["adapter"]["seed"]
    assert seeds == {"s5": 5, "s5-again": 5, "s5-init7": 7, "s5-init5": 5}

    def adapter(name):
        return StateStore(tmp_path / name).load_tensors("adapter")

    # same training seed, same adapter seed: bitwise the same; only the adapter seed changed: a different A
    assert same(adapter("s5"), adapter("s5-again"))
    assert same(adapter("s5"), adapter("s5-init5"))
    a5, a7 = random_part(adapter("s5")), random_part(adapter("s5-init7"))
    assert a5 and all(not torch.equal(a5[k], a7[k]) for k in a5)


def test_vera_projections_follow_the_first_tasks_seed(tmp_path, random_model_path, concept_dirs):
    model = str(random_model_path)
    for seed in (1, 2):
        api.learn(tmp_path / f"s{seed}", concept_dirs[0], method="lora", adapter="vera", rank=16, model=model,
                  steps=1, seed=seed, progress=False)
    s1, s2 = (StateStore(tmp_path / f"s{seed}").load_tensors("adapter") for seed in (1, 2))
    # the projections are frozen: the saved ones are the initial ones of AdapterSpec(seed=...)
    for seed, saved in ((1, s1), (2, s2)):
        init = initial_state(AdapterSpec(kind="vera", rank=16, seed=seed))
        assert torch.equal(saved["vera_A"], init["vera_A"]) and torch.equal(saved["vera_B"], init["vera_B"])
    assert not torch.equal(s1["vera_A"], s2["vera_A"])


def test_bench_seed_zero_keeps_the_seed_zero_initialisation(tmp_path, random_model_path, concept_dirs):
    assert learn_seed(0, 0) == 0 and learn_seed(3, 0) == 3000  # the seeds the first bench task learns with
    api.learn(tmp_path / "api", concept_dirs[0], method="lora", model=str(random_model_path), steps=2,
              seed=learn_seed(0, 0), progress=False)
    # what a stream built with the old default spec (seed 0) learns
    stream = new_stream(random_model_path, "lora")
    assert stream.settings.adapter.seed == 0
    learn_folder(stream, concept_dirs[0], steps=2, seed=0)
    commit(stream, tmp_path / "old")
    assert same(StateStore(tmp_path / "api").load_tensors("adapter"),
                StateStore(tmp_path / "old").load_tensors("adapter"))
    assert api.info(tmp_path / "api")["method"]["adapter"]["seed"] == 0


def test_a_saved_state_reloads_with_its_seed(tmp_path, random_model_path, concept_dirs):
    model, state = str(random_model_path), tmp_path / "state"
    api.learn(state, concept_dirs[0], method="lora", model=model, steps=1, seed=3000, progress=False)
    assert api.open_stream(state).settings.adapter.seed == 3000
    # a later task with another seed keeps the stream's adapter seed
    api.learn(state, concept_dirs[1], model=model, steps=1, seed=3001, progress=False)
    assert api.info(state)["method"]["adapter"]["seed"] == 3000
    assert api.open_stream(state).settings.adapter.seed == 3000
    with pytest.raises(StateError, match="seed 3000"):
        api.learn(state, concept_dirs[2], model=model, steps=1, seed=3002, adapter_seed=1, progress=False)
    api.learn(state, concept_dirs[2], model=model, steps=1, seed=3002, adapter_seed=3000, progress=False)
    assert len(api.info(state)["concepts"]) == 3


def test_a_state_saved_without_an_adapter_seed_loads_as_seed_zero(tmp_path, random_model_path, concept_dirs):
    state = tmp_path / "state"
    api.learn(state, concept_dirs[0], method="lora", model=str(random_model_path), steps=1, seed=0, progress=False)
    store = StateStore(state)
    manifest = store.read_manifest()
    del manifest["method"]["adapter"]["seed"]  # as written before adapters had a seed
    assert AdapterSpec.from_dict(manifest["method"]["adapter"]).seed == 0
    tensors = {name: store.load_tensors(name) for name in api.TENSOR_FILES if store.has_file(name)}
    stream = ConceptStream.from_state(manifest, tensors)
    assert stream.settings.adapter.seed == 0
    assert same(adapter_state(stream.pipe.unet), tensors["adapter"])


def test_an_interrupted_first_task_resumes_with_its_adapter_seed(tmp_path, random_model_path, concept_dirs,
                                                                 monkeypatch):
    kw = dict(method="lora", model=str(random_model_path), steps=3, checkpoint_every=1, progress=False)
    api.learn(tmp_path / "whole", concept_dirs[0], seed=1000, **kw)
    original = StateStore.save_checkpoint

    def interrupt(self, tensors, info):
        original(self, tensors, info)
        if info["step"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(StateStore, "save_checkpoint", interrupt)
    with pytest.raises(KeyboardInterrupt):
        api.learn(tmp_path / "cut", concept_dirs[0], seed=1000, **kw)
    monkeypatch.setattr(StateStore, "save_checkpoint", original)
    with pytest.raises(UserInputError, match="seed 1000"):  # the checkpoint's stream has its seed
        api.learn(tmp_path / "cut", concept_dirs[0], resume=True, adapter_seed=3, **kw)
    api.learn(tmp_path / "cut", concept_dirs[0], resume=True, **kw)
    assert api.info(tmp_path / "cut")["method"]["adapter"]["seed"] == 1000
    assert same(StateStore(tmp_path / "whole").load_tensors("adapter"),
                StateStore(tmp_path / "cut").load_tensors("adapter"))
