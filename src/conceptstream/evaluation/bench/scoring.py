"""Scoring a stream: generated images against held-out real ones (MMD, KID, I2I, T2I) and DC classification."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from conceptstream.evaluation.bench.data import BenchData
from conceptstream.evaluation.bench.results import METRICS


class Evaluator:
    """Scores one stream (the model after some task) against held-out images; caches real features."""

    def __init__(self, settings, data: BenchData, extractor) -> None:
        from conceptstream.evaluation.metrics import TextImageAlignment

        self.s = settings
        self.data = data
        self.extractor = extractor
        self._real: dict[int, Any] = {}
        probe = TextImageAlignment(extractor)
        self.t2i_available = probe.available
        self.t2i_reason = probe.unavailable_reason

    def real_features(self, i: int):
        from conceptstream.concepts.images import load_image

        if i not in self._real:
            images = [load_image(p) for p in self.data.concepts[i].eval_images()]
            self._real[i] = self.extractor(images)
        return self._real[i]

    @staticmethod
    def concept_prompt(concept, include_noun: bool) -> str:
        return f"a photo of a {concept.token} {concept.noun}" if include_noun else f"a photo of a {concept.token}"

    def prompts(self, concept, include_noun: bool) -> list[tuple[str, str]]:
        """(generation prompt, the same without the modifier token for T2I) for every prompt of a concept."""
        base = self.concept_prompt(concept, include_noun)
        plain = f"a photo of a {concept.noun}"
        out = [(base, plain)]
        out += [(f"{base} {ctx}", f"{plain} {ctx}") for ctx in self.s.contexts]
        return out

    def score_concept(self, stream, i: int, include_noun: bool):
        """Generate concept ``i``'s images and compute every metric. Returns (scores, images of prompt 0)."""
        from conceptstream.evaluation.metrics import KID, ImageImageSimilarity, KernelMMD, TextImageAlignment

        concept = self.data.concepts[i]
        images, t2i_prompts, first = [], [], []
        for p, (prompt, plain) in enumerate(self.prompts(concept, include_noun)):
            imgs = stream.generate(prompt, n=self.s.images_per_prompt, seed=self.s.gen_seed + 1000 * p,
                                   steps=self.s.ddim_steps, guidance=self.s.guidance, progress=False)
            images += imgs
            t2i_prompts += [plain] * len(imgs)
            if p == 0:
                first = imgs
        fake = self.extractor(images)
        real = self.real_features(i)
        scores: dict[str, float | None] = {}
        for name, metric in (("MMD", KernelMMD()), ("KID", KID(subsets=100, scale=METRICS["KID"]["scale"])),
                             ("I2I", ImageImageSimilarity())):
            metric.update(real, real=True)
            metric.update(fake, real=False)
            value = metric.compute()
            scores[name] = float(value[0] if isinstance(value, tuple) else value)
        if self.t2i_available:
            t2i = TextImageAlignment(self.extractor)
            t2i.update(fake, t2i_prompts)
            res = t2i.compute()
            scores["T2I"] = res.get("value") if res.get("available") else None
        else:
            scores["T2I"] = None
        return scores, first

    def dc_accuracy(self, stream, include_noun: bool) -> dict[str, Any]:
        """DC classification of every concept's real held-out images among c_0 + all learned concepts."""
        return dc_classification(stream, self.data.concepts, include_noun, self.s.dc_eval_timesteps,
                                 self.s.dc_batch_size, progress=self.s.progress)


def dc_classification(stream, concepts: Sequence, include_noun: bool, eval_timesteps: int,
                      batch_size: int, progress: bool = False) -> dict[str, Any]:
    """Classify each concept's held-out images among c_0 + all ``concepts`` with ``stream``'s DC,
    averaging ``eval_timesteps`` draws per image: accuracy, per-concept accuracy, confusion, and the
    calibration of the DC posterior at the stream's temperature."""
    import torch
    from tqdm.auto import tqdm

    from conceptstream.concepts.images import load_images
    from conceptstream.evaluation.metrics import DCAccuracy, DCCalibration
    from conceptstream.methods.base import TaskContext
    from conceptstream.models.conditioning import cat
    from conceptstream.scoring.dc import DCConfig, DiffusionClassifier

    pipe = stream.pipe
    cfg = DCConfig(**{**asdict(stream.settings.dc), "eval_timesteps": eval_timesteps})
    dc = DiffusionClassifier(pipe.unet, pipe.scheduler, cfg)

    @torch.no_grad()
    def encode(prompts: list[str]):  # hidden states [N, L, D]; SDXL: with pooled embeds and time ids
        return stream.encode_prompts(prompts)

    concept_embeds = encode([Evaluator.concept_prompt(c, include_noun) for c in concepts])
    total = DCAccuracy()
    calibration = DCCalibration(num_candidates=len(concepts) + 1)
    per_concept, confusion = [], []
    # one bar step per concept: on tabletop-50 this is 600 images x 51 candidates, minutes of silence otherwise
    for i, c in enumerate(tqdm(concepts, desc="DC classification", disable=not progress, leave=False)):
        cond = cat([encode([TaskContext.class_prompt(c.noun)]), concept_embeds])  # [1 + N, L, D]
        latents, _ = stream.encode_images(load_images(c.eval_images(), stream.resolution))
        errors = dc.eval_errors_batched(latents.to(stream.device), cond, seed=0, batch_size=batch_size).cpu()
        preds = errors.argmin(-1)
        target = i + 1
        total.update(preds, target)
        calibration.update(dc.log_probs(errors), target)
        per_concept.append(float((preds == target).float().mean()))
        confusion.append(torch.bincount(preds, minlength=len(concepts) + 1).tolist())
    cal = calibration.compute()
    return {"accuracy": float(total.compute()), "per_concept": per_concept, "confusion": confusion,
            "calibration": {**cal, "best_temperature": cfg.temperature / cal["best_logit_scale"]},
            "candidates": ["c_0 (a photo of a NOUN)"] + [c.token for c in concepts],
            "images": [len(c.eval_images()) for c in concepts],
            "eval_timesteps": eval_timesteps, "dc": asdict(cfg)}


def hstack(images: Sequence) -> Any:
    """Images side by side, no padding (tile k is the box ``(k*w, 0, (k+1)*w, h)``)."""
    from PIL import Image

    w, h = images[0].size
    strip = Image.new("RGB", (w * len(images), h))
    for k, im in enumerate(images):
        strip.paste(im.convert("RGB").resize((w, h)), (k * w, 0))
    return strip
