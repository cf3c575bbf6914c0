"""Behaviour of the metric objects on hand-made feature sets."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.image.kid import poly_mmd as torchmetrics_poly_mmd

from conceptstream.errors import UserInputError
from conceptstream.evaluation.metrics import (
    KID,
    DCAccuracy,
    DCCalibration,
    ImageImageSimilarity,
    KernelMMD,
    TextImageAlignment,
    poly_mmd2_unbiased,
)

torch.set_num_threads(1)


def _gauss(n: int, d: int = 16, shift: float = 0.0, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen) + shift


def _mmd(real: torch.Tensor, fake: torch.Tensor) -> float:
    metric = KernelMMD()
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def test_mmd_matches_torchmetrics_estimator_times_1000():
    real, fake = _gauss(40, seed=1), _gauss(40, shift=0.5, seed=2)
    expected = float(torchmetrics_poly_mmd(real.double(), fake.double())) * 1e3
    assert _mmd(real, fake) == pytest.approx(expected, rel=1e-9)


def test_same_distribution_near_zero_and_shift_clearly_larger():
    shifted = _mmd(_gauss(200, seed=1), _gauss(200, shift=1.0, seed=2))
    same = _mmd(_gauss(200, seed=1), _gauss(200, seed=3))
    identical = _mmd(_gauss(200, seed=1), _gauss(200, seed=1))
    assert shifted > 0
    assert abs(same) < 0.05 * shifted
    # unbiased estimator on identical sets: slightly negative O(1/n), far from the shifted value
    assert abs(identical) < 0.05 * shifted
    larger_shift = _mmd(_gauss(200, seed=1), _gauss(200, shift=2.0, seed=2))
    assert larger_shift > shifted


def test_mmd_batched_updates_equal_one_update_and_reset():
    real, fake = _gauss(30, seed=4), _gauss(20, shift=0.3, seed=5)
    metric = KernelMMD()
    for chunk in real.split(7):
        metric.update(chunk, real=True)
    for chunk in fake.split(6):
        metric.update(chunk, real=False)
    assert float(metric.compute()) == pytest.approx(float(poly_mmd2_unbiased(real, fake)) * 1e3, rel=1e-12)
    metric.reset()
    metric.update(real[:1], real=True)
    metric.update(fake, real=False)
    with pytest.raises(UserInputError, match="at least 2 real"):
        metric.compute()


def test_mmd_rejects_bad_shapes():
    metric = KernelMMD()
    with pytest.raises(ValueError):
        metric.update(torch.zeros(2, 3, 4), real=True)
    metric.update(torch.zeros(3, 4), real=True)
    metric.update(torch.zeros(3, 5), real=False)
    with pytest.raises(ValueError, match="differ in size"):
        metric.compute()


def test_kid_works_with_three_real_images_and_is_deterministic():
    real, fake = _gauss(3, seed=6), _gauss(10, shift=0.5, seed=7)

    def run(seed: int) -> tuple[float, float]:
        kid = KID(subsets=20, subset_size=1000, seed=seed)
        kid.update(real, real=True)
        kid.update(fake, real=False)
        assert kid.effective_subset_size() == 3
        mean, std = kid.compute()
        return float(mean), float(std)

    first, again = run(0), run(0)
    assert first == again
    assert all(math.isfinite(v) for v in first)
    assert first[1] > 0  # different subsets of the 10 generated features give different values


def test_kid_with_all_images_in_every_subset_equals_mmd():
    real, fake = _gauss(6, seed=8), _gauss(6, shift=1.0, seed=9)
    kid = KID(subsets=5, subset_size=50, scale=1e3)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    mean, std = kid.compute()
    assert float(mean) == pytest.approx(_mmd(real, fake), rel=1e-9)
    assert float(std) == pytest.approx(0.0, abs=1e-9)


def test_kid_too_few_images():
    kid = KID()
    kid.update(_gauss(1), real=True)
    kid.update(_gauss(5), real=False)
    with pytest.raises(UserInputError, match="KID needs"):
        kid.compute()


def test_image_image_similarity():
    vec = torch.tensor([[1.0, 2.0, 3.0]])
    metric = ImageImageSimilarity()
    metric.update(vec.repeat(4, 1), real=True)
    metric.update(vec.repeat(2, 1) * 5.0, real=False)  # scale does not matter for cosine
    assert float(metric.compute()) == pytest.approx(1.0, abs=1e-12)

    metric = ImageImageSimilarity()
    metric.update(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), real=True)
    metric.update(torch.tensor([[1.0, 0.0]]), real=False)
    assert float(metric.compute()) == pytest.approx(0.5)  # mean of cos 1 and cos 0


class _FakeClip:
    """Stands in for a CLIP extractor: fixed image and text vectors."""

    name = "fake-clip"
    supports_text = True
    dim = 2

    def __call__(self, images):
        return torch.tensor([[1.0, 0.0]] * len(images))

    def text_features(self, prompts):
        return torch.tensor([[1.0, 0.0] if "cat" in p else [0.0, 1.0] for p in prompts])


class _NoText:
    name = "efficientnet-lite0"
    supports_text = False
    dim = 1280


def test_text_image_alignment_without_clip_reports_unavailable():
    for extractor in (None, _NoText()):
        metric = TextImageAlignment(extractor)
        metric.update(torch.zeros(2, 4), ["a cat", "a dog"])
        result = metric.compute()
        assert result["available"] is False
        assert "CLIP" in result["reason"] and "value" not in result


def test_text_image_alignment_with_text_features():
    metric = TextImageAlignment(_FakeClip())
    metric.update([object(), object()], ["a cat", "a dog"])  # cos 1 and cos 0
    result = metric.compute()
    assert result == {"available": True, "value": pytest.approx(0.5), "n": 2}
    with pytest.raises(ValueError, match="one prompt per image"):
        metric.update(torch.zeros(3, 2), ["only one"])


def test_dc_accuracy():
    acc = DCAccuracy()
    acc.update(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2]))
    acc.update(torch.tensor([3, 3]), 3)
    assert float(acc.compute()) == pytest.approx(5 / 6)
    acc.reset()
    with pytest.raises(ValueError):
        acc.update(torch.tensor([0.2, 0.8]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="no predictions"):
        acc.compute()


def test_dc_calibration_on_constructed_posteriors():
    """Confident and right: ECE ~0; confident and half wrong: ECE ~0.5; uniform: NLL = log K."""
    sharp = torch.log(torch.tensor([[0.98, 0.01, 0.01]] * 4))
    cal = DCCalibration(num_candidates=3)
    cal.update(sharp, 0)
    good = cal.compute()
    assert good["ece"] == pytest.approx(0.02, abs=1e-4) and good["true_prob"] == pytest.approx(0.98)
    cal.reset()
    cal.update(sharp, torch.tensor([0, 0, 1, 1]))
    assert cal.compute()["ece"] == pytest.approx(0.48, abs=1e-4)
    cal.reset()
    uniform = torch.log(torch.full((5, 3), 1 / 3))
    cal.update(uniform, 2)
    out = cal.compute()
    assert out["nll"] == pytest.approx(math.log(3)) and out["n"] == 5
    cal.reset()  # right but unsure (0.5 on the true class): sharpening the logits lowers the NLL
    cal.update(torch.log(torch.tensor([[0.5, 0.25, 0.25]] * 6)), 0)
    out = cal.compute()
    assert out["best_logit_scale"] > 5 and out["nll_at_best_scale"] < out["nll"]
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        cal.update(torch.zeros(3), 0)
