"""Metric objects (torchmetrics ``Metric`` subclasses: ``update`` / ``compute`` / ``reset``).

Distribution metrics compare features of real (held-out) and generated images of one concept:

* ``KernelMMD``  - unbiased MMD^2 with the KID polynomial kernel, reported x 10^3 (lower is better).
* ``KID``        - the same estimator averaged over random subsets (mean, std), robust to tiny sets.
* ``ImageImageSimilarity`` - "CLIP I2I": mean cosine similarity of every generated/real pair.
* ``TextImageAlignment``   - "CLIP T2I": mean cosine of each image with its prompt; needs CLIP text
  features and otherwise reports itself unavailable (with the reason) instead of a number.
* ``DCAccuracy`` - accuracy of diffusion-classifier predictions (producer-agnostic).

All arithmetic is done in float64 on CPU so results are reproducible bit for bit from the inputs
(and, for KID, the seed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from conceptstream.errors import UserInputError

MMD_SCALE = 1e3


def _as_features(features: Tensor, what: str = "features") -> Tensor:
    """Validate an ``[N, D]`` feature batch and detach it to CPU float32 storage."""
    if not torch.is_tensor(features):
        features = torch.as_tensor(features)
    if features.ndim == 1:
        features = features.unsqueeze(0)
    if features.ndim != 2:
        raise ValueError(f"{what} must be a [N, D] tensor, got shape {tuple(features.shape)}")
    if not torch.is_floating_point(features):
        features = features.float()
    if not torch.isfinite(features).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    return features.detach().to("cpu", torch.float32)


def _cat(states: list[Tensor] | Tensor) -> Tensor:
    if isinstance(states, list) and not states:
        return torch.zeros(0, 0, dtype=torch.float64)
    return dim_zero_cat(states).to(torch.float64)


def poly_kernel(x: Tensor, y: Tensor, degree: int = 3, coef: float = 1.0) -> Tensor:
    """KID kernel k(x, y) = (x.y / d + coef) ** degree."""
    return (x @ y.T / x.shape[1] + coef) ** degree


def poly_mmd2_unbiased(real: Tensor, fake: Tensor, degree: int = 3, coef: float = 1.0) -> Tensor:
    """Unbiased MMD^2 estimate (Gretton et al.; the KID estimator), allowing different set sizes.

    ``mean_{i!=j} k(x_i, x_j) + mean_{i!=j} k(y_i, y_j) - 2 mean_{i,j} k(x_i, y_j)``. Being unbiased it
    can be slightly negative when the two distributions are equal.
    """
    real = real.to(torch.float64)
    fake = fake.to(torch.float64)
    m, n = real.shape[0], fake.shape[0]
    if m < 2 or n < 2:
        raise UserInputError(f"MMD needs at least 2 real and 2 generated images (got {m} real, {n} generated)")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and generated features differ in size ({real.shape[1]} vs {fake.shape[1]})")
    k_xx = poly_kernel(real, real, degree, coef)
    k_yy = poly_kernel(fake, fake, degree, coef)
    k_xy = poly_kernel(real, fake, degree, coef)
    xx = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    yy = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return xx + yy - 2.0 * k_xy.mean()


class _RealFakeFeatures(Metric):
    """Shared state: lists of real and generated feature batches."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("real_features", default=[], dist_reduce_fx="cat")
        self.add_state("fake_features", default=[], dist_reduce_fx="cat")

    def update(self, features: Tensor, real: bool) -> None:
        """Add a batch of ``[N, D]`` features; ``real=True`` for real images, ``False`` for generated."""
        feats = _as_features(features, "real features" if real else "generated features")
        (self.real_features if real else self.fake_features).append(feats)

    def _features(self) -> tuple[Tensor, Tensor]:
        return _cat(self.real_features), _cat(self.fake_features)


class KernelMMD(_RealFakeFeatures):
    """Unbiased polynomial-kernel MMD^2 between real and generated features, **multiplied by 10^3**.

    The x10^3 scale is the one the continual-personalization tables use (values are otherwise
    ~1e-3). Lower is better; values near 0 (possibly slightly negative) mean matching distributions.
    """

    higher_is_better = False
    scale = MMD_SCALE

    def compute(self) -> Tensor:
        real, fake = self._features()
        return poly_mmd2_unbiased(real, fake) * self.scale


class KID(_RealFakeFeatures):
    """Kernel Inception Distance style estimate: unbiased polynomial MMD^2 over random subsets.

    ``compute()`` returns ``(mean, std)`` over ``subsets`` draws (std with ``unbiased=False``, as
    torchmetrics). ``subset_size`` is clamped to ``min(subset_size, n_real, n_fake)`` so a concept
    with 3 held-out photos still works. Subsets come from a generator seeded with ``seed`` at each
    ``compute()``, so the result is deterministic. Values are multiplied by ``scale`` (default 1,
    the usual KID unit; pass 1e3 to match ``KernelMMD``).
    """

    higher_is_better = False

    def __init__(self, subsets: int = 100, subset_size: int = 1000, seed: int = 0, scale: float = 1.0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if subsets < 1:
            raise ValueError("subsets must be >= 1")
        if subset_size < 2:
            raise ValueError("subset_size must be >= 2 (the unbiased estimator needs pairs)")
        self.subsets = int(subsets)
        self.subset_size = int(subset_size)
        self.seed = int(seed)
        self.scale = float(scale)

    def effective_subset_size(self) -> int:
        """The subset size actually used for the current state (after the clamp)."""
        real, fake = self._features()
        return min(self.subset_size, real.shape[0], fake.shape[0])

    def compute(self) -> tuple[Tensor, Tensor]:
        real, fake = self._features()
        size = min(self.subset_size, real.shape[0], fake.shape[0])
        if size < 2:
            raise UserInputError(f"KID needs at least 2 real and 2 generated images "
                                 f"(got {real.shape[0]} real, {fake.shape[0]} generated)")
        gen = torch.Generator().manual_seed(self.seed)
        scores = []
        for _ in range(self.subsets):
            r = real[torch.randperm(real.shape[0], generator=gen)[:size]]
            f = fake[torch.randperm(fake.shape[0], generator=gen)[:size]]
            scores.append(poly_mmd2_unbiased(r, f))
        values = torch.stack(scores) * self.scale
        return values.mean(), values.std(unbiased=False)


class ImageImageSimilarity(_RealFakeFeatures):
    """"CLIP I2I": mean cosine similarity over every (generated, real) pair (higher is better).

    This is the CustomConcept101 image-alignment score; with CLIP features it is CLIP I2I, with
    DINO features DINO I2I. Identical single-image sets give exactly 1.
    """

    higher_is_better = True

    def compute(self) -> Tensor:
        real, fake = self._features()
        if real.shape[0] == 0 or fake.shape[0] == 0:
            raise UserInputError("image-image similarity needs at least 1 real and 1 generated image "
                                 f"(got {real.shape[0]} real, {fake.shape[0]} generated)")
        real = torch.nn.functional.normalize(real, dim=1)
        fake = torch.nn.functional.normalize(fake, dim=1)
        return (fake @ real.T).mean()


class TextImageAlignment(Metric):
    """"CLIP T2I": mean cosine similarity between each generated image and its own prompt.

    Needs an extractor with a text encoder (``HFCLIPFeatures``). With any other extractor (or none)
    updates are accepted and ``compute()`` returns ``{"available": False, "reason": ...}`` - never
    a made-up number. When available it returns ``{"available": True, "value": mean_cosine, "n": N}``
    (raw cosine in [-1, 1], as CustomConcept101 reports it; not the x100 CLIPScore).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, extractor: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.extractor = extractor
        if extractor is None:
            self.unavailable_reason: str | None = ("text-image alignment needs a CLIP model (--features clip:PATH); "
                                                   "no feature extractor was given")
        elif not getattr(extractor, "supports_text", False):
            name = getattr(extractor, "name", type(extractor).__name__)
            self.unavailable_reason = (f"text-image alignment needs a CLIP model (--features clip:PATH); "
                                       f"the {name} extractor has no text encoder")
        else:
            self.unavailable_reason = None
        self.add_state("cosine_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @property
    def available(self) -> bool:
        return self.unavailable_reason is None

    def update(self, images: Sequence[Any] | Tensor, prompts: Sequence[str]) -> None:
        """Add generated images (PIL images, or image features from the same CLIP) with their prompts."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        n_images = int(images.shape[0]) if torch.is_tensor(images) else len(images)
        if n_images != len(prompts):
            raise ValueError(f"got {n_images} images but {len(prompts)} prompts; give one prompt per image")
        if not self.available or n_images == 0:
            return
        image_feats = images if torch.is_tensor(images) else self.extractor(list(images))
        image_feats = _as_features(image_feats, "image features").to(torch.float64)
        text_feats = _as_features(self.extractor.text_features(prompts), "text features").to(torch.float64)
        if image_feats.shape != text_feats.shape:
            raise ValueError(f"image features {tuple(image_feats.shape)} and text features "
                             f"{tuple(text_feats.shape)} do not match; use features from the same CLIP model")
        cos = torch.nn.functional.cosine_similarity(image_feats, text_feats, dim=1)
        self.cosine_sum += cos.sum()
        self.count += n_images

    def compute(self) -> dict[str, Any]:
        if not self.available:
            return {"available": False, "reason": self.unavailable_reason}
        n = int(self.count)
        if n == 0:
            return {"available": False, "reason": "no images were scored for text-image alignment"}
        return {"available": True, "value": float(self.cosine_sum / n), "n": n}


class DCAccuracy(Metric):
    """Accuracy of diffusion-classifier predictions (which concept/class each image was assigned).

    ``update(predicted, target)`` takes integer labels; ``target`` may be a single int (all
    predictions in the batch belong to one concept). The scorer producing predictions is separate.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predicted: Tensor | Sequence[int], target: Tensor | Sequence[int] | int) -> None:
        predicted = torch.as_tensor(predicted).reshape(-1)
        target = torch.as_tensor(target).reshape(-1)
        if predicted.is_floating_point() or target.is_floating_point():
            raise ValueError("DCAccuracy expects integer labels (argmax the scores first)")
        if target.numel() == 1 and predicted.numel() != 1:
            target = target.expand_as(predicted)
        if predicted.shape != target.shape:
            raise ValueError(f"predicted {tuple(predicted.shape)} and target {tuple(target.shape)} differ in size")
        self.correct += (predicted.cpu() == target.cpu()).sum()
        self.total += predicted.numel()

    def compute(self) -> Tensor:
        if int(self.total) == 0:
            raise ValueError("DCAccuracy has no predictions; call update() first")
        return self.correct.to(torch.float64) / self.total


class DCCalibration(Metric):
    """How well DC posteriors match DC accuracy: ECE (10 bins, torchmetrics), NLL and the true class's probability.

    ``update(log_probs, target)`` takes log-posteriors [B, K] (``DiffusionClassifier.log_probs`` of the
    evaluation errors, so at the method's temperature) and the true candidate index (an int or [B]).
    ``compute`` also fits temperature scaling: ``best_logit_scale`` s minimises the NLL of
    ``softmax(s * log_probs)``, so the best-calibrated temperature is ``temperature / s`` (s > 1: the
    posteriors are under-confident).

    A candidate may have log-probability ``-inf`` (probability 0: e.g. pruned by successive elimination,
    ``DiffusionClassifier.eval_errors_eliminating``). ECE and ``true_prob`` stay defined; when a true
    candidate has probability 0 the NLL is infinite at every scale, and ``best_logit_scale`` and
    ``nll_at_best_scale`` are None (no temperature can be fitted).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, num_candidates: int, n_bins: int = 10, **kwargs: Any) -> None:
        from torchmetrics.classification import MulticlassCalibrationError

        super().__init__(**kwargs)
        self.ece = MulticlassCalibrationError(num_classes=num_candidates, n_bins=n_bins, norm="l1")
        self.add_state("nll_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("true_prob_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("log_probs", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")

    def update(self, log_probs: Tensor, target: Tensor | Sequence[int] | int) -> None:
        log_probs = torch.as_tensor(log_probs, dtype=torch.float64).cpu()
        if log_probs.ndim != 2:
            raise ValueError(f"DCCalibration expects log-probabilities [B, K], got shape {tuple(log_probs.shape)}")
        target = torch.as_tensor(target).reshape(-1).cpu()
        if target.numel() == 1:
            target = target.expand(log_probs.shape[0])
        picked = log_probs.gather(1, target[:, None].long())[:, 0]
        self.ece.update(log_probs.exp().float(), target.long())
        self.nll_sum += -picked.sum()
        self.true_prob_sum += picked.exp().sum()
        self.total += target.numel()
        self.log_probs.append(log_probs)
        self.targets.append(target.long())

    def reset(self) -> None:
        super().reset()
        self.ece.reset()

    def compute(self) -> dict[str, float]:
        n = max(int(self.total), 1)
        out = {"ece": float(self.ece.compute()), "nll": float(self.nll_sum / n),
               "true_prob": float(self.true_prob_sum / n), "n": int(self.total)}
        log_probs, targets = dim_zero_cat(self.log_probs), dim_zero_cat(self.targets)
        scales = torch.logspace(-1, 2, 121, dtype=torch.float64)  # 0.1 ... 100
        nll = torch.stack([-torch.log_softmax(s * log_probs, -1).gather(1, targets[:, None]).mean() for s in scales])
        if not bool(torch.isfinite(nll).any()):
            return {**out, "best_logit_scale": None, "nll_at_best_scale": None}
        best = int(nll.argmin())
        return {**out, "best_logit_scale": float(scales[best]), "nll_at_best_scale": float(nll[best])}
