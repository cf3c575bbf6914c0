"""A saved state reopens to the same weights and the same pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from streams import commit, learn_folder, new_stream, pixels

from conceptstream import api
from conceptstream.concepts.folder import read_concept
from conceptstream.models.loading import load_pipeline


@pytest.mark.parametrize("method,adapter", [("lora", "lora"), ("c-lora", "lora"), ("custom-diffusion", "lora"),
                                            ("ewc-dc", "vera")])
def test_state_round_trip_generates_identical_pixels(tmp_path, bundled_model_path, concept_dirs, method, adapter):
    stream = new_stream(bundled_model_path, method, adapter=adapter,
                         **({"fisher_passes": 1} if method == "ewc-dc" else {}))
    for i, d in enumerate(concept_dirs[:2]):
        learn_folder(stream, d, steps=4, seed=i)
    state = tmp_path / "state"
    commit(stream, state)
    a, b = (read_concept(d) for d in concept_dirs[:2])
    prompt = f"a photo of a {a.token} {a.noun} next to a {b.token} {b.noun}"
    before = stream.generate(prompt, n=2, seed=11, steps=3, progress=False)
    again = api.open_stream(state)
    assert again.tokens == [a.token, b.token]
    live, reloaded = stream.pipe.unet.state_dict(), again.pipe.unet.state_dict()
    assert live.keys() == reloaded.keys()
    assert [k for k in live if not torch.equal(live[k], reloaded[k])] == []
    fresh = load_pipeline(str(bundled_model_path)).unet.state_dict()
    base_live = {k.replace(".base_layer.", "."): v for k, v in live.items()
                 if not any(m in k for m in ("lora_", "vera_"))}
    assert base_live.keys() == fresh.keys()
    changed = [k for k in fresh if not torch.equal(fresh[k], base_live[k])]
    if method in ("c-lora", "custom-diffusion"):  # these write learned deltas into the base weights
        assert changed and all("attn2.to_k" in k or "attn2.to_v" in k for k in changed), changed[:3]
    else:  # adapter methods leave every base weight as it was
        assert changed == []
    after = again.generate(prompt, n=2, seed=11, steps=3, progress=False)
    assert np.array_equal(pixels(before), pixels(after))
    if adapter == "vera":
        assert api.info(state)["method"]["adapter"]["kind"] == "vera"
        assert len(api.info(state)["concepts"]) == 2
