"""Where a method's kept tensors live once a state is opened: on the UNet's device, in fp32, whatever the
dtype the model is loaded in; and sampling a state in bf16.

No GPU here: the ``meta`` device stands in for ``cuda``. Like CUDA it refuses to mix with CPU tensors
("Tensor on device cpu is not on the expected device meta"), so a method tensor left on the CPU fails
these tests the way it fails from task 2 on a GPU. `benchmarks/gpu_check.py` runs the real thing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conceptstream import api
from conceptstream.adapters.registry import adapter_parameters

STATEFUL = ["lora-ewc", "ewc-dc", "dsc", "dsc-ewc-dc", "c-lora", "custom-diffusion"]
SMALL = {"dsc_iters": 1, "fisher_passes": 1}


@pytest.fixture(scope="module")
def states(tmp_path_factory, random_model_path, concept_dirs):
    """A two-task state per stateful method on the tiny random model."""
    from conceptstream.methods.registry import get_method

    out = {}
    for method in STATEFUL:
        state = tmp_path_factory.mktemp("devices") / method
        known = get_method(method).all_defaults()
        for i, folder in enumerate(concept_dirs[:2]):
            api.learn(state, folder, method=method if i == 0 else None, model=str(random_model_path), steps=2,
                      progress=False, hparams={k: v for k, v in SMALL.items() if k in known} if i == 0 else None,
                      checkpoint_every=0)
        out[method] = state
    return out


def _method_tensors(stream) -> dict[str, torch.Tensor]:
    m = stream.method
    tensors = dict(m.state_tensors())
    tensors.update({f"past_sum.{k}": v for k, v in getattr(m, "past_sum", {}).items()})
    return tensors


@pytest.mark.parametrize("method", STATEFUL)
def test_method_state_follows_the_unet_device(states, random_model_path, method):
    stream = api.open_stream(states[method], model=str(random_model_path), device="meta")
    unet = stream.pipe.unet
    assert next(unet.parameters()).device.type == "meta"
    tensors = _method_tensors(stream)
    assert tensors, "a stateful method kept nothing"
    assert {v.device.type for v in tensors.values()} == {"meta"}
    # what each method computes from its state and the live UNet runs without mixing devices
    m = stream.method
    if hasattr(m, "ewc") and m.ewc.fisher:
        assert m.ewc.penalty(unet, 1.0).device.type == "meta"
    if method == "c-lora":
        assert m.forget_penalty(unet).device.type == "meta"
    if getattr(m, "pool", None):
        from conceptstream.methods.consolidation import _teacher_forward

        x = torch.zeros(1, 4, 8, 8, device="meta")
        h = torch.zeros(1, 77, unet.config.cross_attention_dim, device="meta")
        assert _teacher_forward(unet, m.pool[0])(x, torch.zeros(1, dtype=torch.long, device="meta"), h).is_meta


@pytest.mark.parametrize("method", STATEFUL)
def test_method_state_stays_fp32_with_the_model_in_bf16_and_merged_deltas_match(states, random_model_path, method):
    full = api.open_stream(states[method], model=str(random_model_path))
    half = api.open_stream(states[method], model=str(random_model_path), dtype=torch.bfloat16)
    assert half.pipe.unet.dtype == torch.bfloat16
    tensors = _method_tensors(half)
    assert {v.dtype for v in tensors.values() if v.is_floating_point()} == {torch.float32}  # trained values
    reference = _method_tensors(full)
    assert all(torch.equal(tensors[k], reference[k]) for k in reference)
    if half.method.uses_adapter:  # the adapter samples in the model's dtype; the state keeps fp32 values
        assert {p.dtype for p in adapter_parameters(half.pipe.unet).values()} == {torch.bfloat16}
        assert {v.dtype for v in half.state_tensors()["adapter"].values()} == {torch.bfloat16}
        from conceptstream.state import StateStore

        assert {v.dtype for v in StateStore(states[method]).load_tensors("adapter").values()} == {torch.float32}
    # base weights with merged deltas (C-LoRA, Custom Diffusion) are the fp32 ones up to bf16 rounding
    # (W0 and the delta are rounded before the sum); the delta itself is there
    w_full = {k: v for k, v in full.pipe.unet.state_dict().items() if v.is_floating_point()}
    w_half = half.pipe.unet.state_dict()
    for k, v in w_full.items():
        if not any(m in k for m in ("lora_", "vera_")):
            assert w_half[k].dtype == torch.bfloat16, k
            torch.testing.assert_close(w_half[k].float(), v, rtol=2 ** -7, atol=2 ** -12)


@pytest.mark.parametrize("method", ["ewc-dc", "c-lora", "custom-diffusion"])
def test_a_state_samples_in_bf16_close_to_fp32(states, random_model_path, concept_dirs, method):
    from conceptstream.concepts.folder import read_concept

    c = read_concept(concept_dirs[0])
    prompt = f"a photo of a {c.token}" + ("" if method == "c-lora" else f" {c.noun}")
    kw = dict(state=states[method], model=str(random_model_path), n=1, seed=3, steps=3, progress=False)
    full = np.asarray(api.generate(prompt, **kw)[0], dtype=np.float32)
    half = np.asarray(api.generate(prompt, dtype="bf16", **kw)[0], dtype=np.float32)
    assert full.shape == half.shape
    assert np.abs(full - half).mean() < 12, np.abs(full - half).mean()  # bf16 rounding, not another picture


def test_generate_refuses_an_unknown_dtype():
    from conceptstream.errors import UserInputError

    with pytest.raises(UserInputError, match="--dtype must be one of fp32, fp16, bf16, got 'fp8'"):
        api.generate("a photo of a mug", dtype="fp8")
