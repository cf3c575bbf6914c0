"""Scoring a stream: generated images against held-out real ones (MMD, KID, I2I, T2I) and DC classification."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
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
            images = [load_image(p) for p in self.data.heldout_images(i)]
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

    def dc_accuracy(self, stream, include_noun: bool, checkpoint: Path | None = None, key: str = ""
                    ) -> dict[str, Any]:
        """DC classification of every concept's real held-out images of the bench's split
        (:func:`dc_classification`): among the fixed candidate set (``accuracy``) and among c_0 + all learned
        concepts (``own_class``); by successive elimination when ``--dc-elimination`` is given; resumable
        through ``checkpoint`` (``key`` names the state classified)."""
        from conceptstream.scoring.dc import parse_elimination

        return dc_classification(stream, self.data.concepts, include_noun, self.s.dc_eval_timesteps,
                                 self.s.dc_batch_size, progress=self.s.progress,
                                 elimination=parse_elimination(self.s.dc_elimination), split=self.data.split,
                                 checkpoint=checkpoint, key=key)


FIXED_CANDIDATES = ("every concept's prompt + the class prompt `a photo of a NOUN` of every distinct noun, the same "
                    "for every image")
OWN_CLASS_CANDIDATES = ("c_0 (`a photo of a NOUN` of the image's own class) + every concept's prompt; favours methods "
                        "trained against c_0")


@dataclass(frozen=True)
class DCCandidates:
    """The fixed DC candidate set of a sequence: every concept's prompt (columns ``0..N-1``, concept ``i`` at
    ``i``), then the class prompt of every distinct noun in order of first appearance (columns ``N..``).

    The own-class set of concept ``i`` (the original protocol: c_0 of the image's own class + every concept)
    is the column subset :meth:`own_class_columns`, so one error matrix over the fixed set gives both."""

    prompts: tuple[str, ...]
    labels: tuple[str, ...]
    n_concepts: int
    class_column: tuple[int, ...]  # per concept: the column of its noun's class prompt

    @classmethod
    def of(cls, concepts: Sequence, include_noun: bool) -> DCCandidates:
        from conceptstream.methods.base import TaskContext

        nouns = list(dict.fromkeys(c.noun for c in concepts))
        n = len(concepts)
        return cls(prompts=tuple([Evaluator.concept_prompt(c, include_noun) for c in concepts]
                                 + [TaskContext.class_prompt(noun) for noun in nouns]),
                   labels=tuple([c.token for c in concepts] + [TaskContext.class_prompt(noun) for noun in nouns]),
                   n_concepts=n, class_column=tuple(n + nouns.index(c.noun) for c in concepts))

    def own_class_columns(self, i: int) -> list[int]:
        """Columns of concept ``i``'s own-class set, in the original order: its c_0, then concepts 0..N-1
        (so concept ``j`` is at ``j + 1``)."""
        return [self.class_column[i], *range(self.n_concepts)]


def dc_scores(errors: Sequence, candidates: DCCandidates, temperature: float,
              draws: Sequence | None = None) -> dict[str, Any]:
    """Accuracy, per-concept accuracy, confusion and calibration of DC errors, over the fixed candidate set
    and (``own_class``) over each image's own-class set, from ONE error matrix per concept.

    ``errors[i]`` [n_i, K] holds concept ``i``'s images' errors under the fixed candidates (``candidates``).
    ``draws[i]`` [n_i, K] (successive elimination; None: every candidate scored at the same draws) says how
    many draws each error averages: a prediction is the lowest error among the candidates of its set that
    were scored furthest (:func:`~conceptstream.scoring.dc.furthest_argmin`), and the calibrated posterior
    ``softmax(-errors / temperature)`` covers those candidates only (the others get probability 0).
    An image is correct when its own concept's prompt wins. Confusion rows count predictions per candidate
    of the set (fixed: ``candidates.labels``; own class: c_0, then the concepts)."""
    import torch

    from conceptstream.evaluation.metrics import DCAccuracy, DCCalibration
    from conceptstream.scoring.dc import furthest_argmin

    n, k = candidates.n_concepts, len(candidates.prompts)

    def form(columns_of, width: int) -> dict[str, Any]:
        total, calibration = DCAccuracy(), DCCalibration(num_candidates=width)
        per_concept, confusion = [], []
        for i, err in enumerate(errors):
            cols = columns_of(i)
            e = err[:, cols]
            d = draws[i][:, cols] if draws is not None else None
            target = cols.index(i)
            preds = furthest_argmin(e, d)
            logits = -e / temperature
            if d is not None:
                logits = torch.where(d == d.max(-1, keepdim=True).values, logits, torch.full_like(logits, -math.inf))
            total.update(preds, target)
            calibration.update(torch.log_softmax(logits, -1), target)
            per_concept.append(float((preds == target).float().mean()))
            confusion.append(torch.bincount(preds, minlength=len(cols)).tolist())
        cal = calibration.compute()
        scale = cal["best_logit_scale"]
        return {"accuracy": float(total.compute()), "per_concept": per_concept, "confusion": confusion,
                "calibration": {**cal, "best_temperature": temperature / scale if scale is not None else None}}

    fixed = form(lambda i: list(range(k)), k)
    own = form(candidates.own_class_columns, n + 1)
    return {**fixed, "candidates": list(candidates.labels), "candidate_set": FIXED_CANDIDATES,
            "own_class": {**own, "candidates": ["c_0 (a photo of a NOUN)"] + list(candidates.labels[:n]),
                          "candidate_set": OWN_CLASS_CANDIDATES}}


def dc_classification(stream, concepts: Sequence, include_noun: bool, eval_timesteps: int,
                      batch_size: int, progress: bool = False, elimination=None, split: str = "test",
                      checkpoint: Path | None = None, key: str = "", per_draw: bool = False) -> dict[str, Any]:
    """Classify each concept's held-out images with ``stream``'s DC, averaging ``eval_timesteps`` draws per
    image, among the fixed candidate set (:class:`DCCandidates`: every concept + the class prompt of every
    noun; the headline ``accuracy``) and, from the same errors, among c_0 of the image's own class + every
    concept (``own_class``, the original protocol). Each form has accuracy, per-concept accuracy, confusion
    and the calibration of the DC posterior at the stream's temperature (:func:`dc_scores`).

    ``elimination`` None scores every candidate at every draw. A schedule ``((n_1, keep_1), ...)`` (e.g.
    ``((2, 8), (4, 3))``) classifies by successive elimination
    (:meth:`~conceptstream.scoring.dc.DiffusionClassifier.eval_errors_eliminating`): all candidates at
    ``n_1`` draws, the best ``keep_1`` per image rescored up to ``n_2`` draws, ..., the last survivors at
    all ``eval_timesteps``. Its calibration is then that of the posterior over the last stage's survivors
    (``calibration["kind"]``): a pruned own concept has probability 0, so NLL is infinite (null) and no
    temperature is fitted. ``unet_evaluations`` counts the (image, candidate, draw) triples scored.

    ``checkpoint`` (a ``.safetensors`` path) makes it resumable concept by concept: after each concept its
    error rows (scalar denoising errors per image and candidate; no image, latent or feature) are saved
    there atomically, and a later call with the same classification (``key``, e.g. the state's generation,
    candidates, split, draws, schedule, batch) skips the concepts it holds; one made otherwise is ignored and
    replaced. The result then equals an uninterrupted one (every concept draws its noise from seed 0) and
    says so in ``resumed`` (concepts taken over, and the seconds they had cost). The caller deletes the file
    when done with it.

    ``per_draw`` (full evaluation only) also returns each draw's errors, ``per_draw_errors``: per concept a
    tensor [eval_timesteps, images, candidates] (checkpointed with the rest), from which every elimination
    schedule's predictions follow without another UNet call (``benchmarks/dc_draws.py``). Not JSON: a caller
    that writes the result takes it out first."""
    import torch
    from tqdm.auto import tqdm

    from conceptstream.concepts.images import load_images
    from conceptstream.scoring.dc import DCConfig, DiffusionClassifier, elimination_schedule, mean_over_draws

    pipe = stream.pipe
    cfg = DCConfig(**{**asdict(stream.settings.dc), "eval_timesteps": eval_timesteps})
    dc = DiffusionClassifier(pipe.unet, pipe.scheduler, cfg)
    schedule = elimination_schedule(elimination, eval_timesteps) if elimination is not None else None
    if per_draw and schedule is not None:
        raise ValueError("per_draw needs the full evaluation (elimination=None): elimination skips draws")
    candidates = DCCandidates.of(concepts, include_noun)
    with torch.no_grad():  # hidden states [K, L, D]; SDXL: with pooled embeds and time ids
        cond = stream.encode_prompts(list(candidates.prompts))
    ident = json.dumps({"key": key, "prompts": candidates.prompts, "images": [
        [Path(p).name for p in c.heldout_images(split)] for c in concepts], "split": split, "dc": asdict(cfg),
        "schedule": schedule, "batch_size": batch_size, "per_draw": per_draw}, sort_keys=True, default=list)
    saved = _DCCheckpoint.load(checkpoint, ident) if checkpoint is not None else _DCCheckpoint(ident)
    resumed = (len(saved.counts), saved.seconds) if saved.counts else None
    t0 = time.time()
    # one bar step per concept: on tabletop-50 this is 600 images x 60 candidates, minutes of silence otherwise
    for i, c in enumerate(tqdm(concepts, desc="DC classification", disable=not progress, leave=False)):
        if i < len(saved.counts):
            continue  # classified before an interruption
        images = c.heldout_images(split)  # "test": eval/, "val": val/
        latents, _ = stream.encode_images(load_images(images, stream.resolution))
        latents = latents.to(stream.device)
        if schedule is None:
            rows = dc.eval_errors_per_draw(latents, cond, seed=0, batch_size=batch_size)
            found_errors, found_draws = mean_over_draws(rows), None
            done = latents.shape[0] * len(candidates.prompts) * eval_timesteps
        else:
            found = dc.eval_errors_eliminating(latents, cond, schedule, seed=0, batch_size=batch_size)
            found_errors, found_draws, done = found.errors, found.draws, found.unet_evaluations
        saved.add(found_errors.cpu(), None if found_draws is None else found_draws.cpu(), len(images), done,
                  rows.cpu() if per_draw else None)
        if checkpoint is not None:
            saved.save(checkpoint, extra_seconds=time.time() - t0)
    errors, draws, counts, evaluations = saved.errors, saved.draws, saved.counts, sum(saved.evaluations)
    out = dc_scores(errors, candidates, cfg.temperature, draws if schedule is not None else None)
    kind = ("all candidates" if schedule is None else
            "final-stage survivors: softmax over the set's candidates scored at the most draws (the last "
            "stage's survivors), the pruned ones at probability 0")
    out["calibration"]["kind"] = out["own_class"]["calibration"]["kind"] = kind
    full = sum(counts) * len(candidates.prompts) * eval_timesteps
    return {**out, "images": counts, "eval_timesteps": eval_timesteps, "dc": asdict(cfg),
            "elimination": None if schedule is None else [list(stage) for stage in schedule],
            "unet_evaluations": evaluations, "unet_evaluations_full": full,
            "resumed": None if resumed is None else {"concepts": resumed[0], "seconds": round(resumed[1], 3)},
            **({"per_draw_errors": saved.per_draw} if per_draw else {})}


@dataclass
class _DCCheckpoint:
    """The concepts a resumable :func:`dc_classification` has classified so far: per concept its error rows
    (and, by elimination, draw counts; on request, each draw's errors), its image count and its UNet
    evaluations; ``ident`` says which classification they belong to, ``seconds`` what they cost (summed over
    interrupted calls)."""

    ident: str
    errors: list = field(default_factory=list)
    draws: list = field(default_factory=list)
    counts: list = field(default_factory=list)
    evaluations: list = field(default_factory=list)
    seconds: float = 0.0
    per_draw: list = field(default_factory=list)

    def add(self, errors, draws, count: int, evaluations: int, per_draw=None) -> None:
        self.errors.append(errors)
        if draws is not None:
            self.draws.append(draws)
        if per_draw is not None:
            self.per_draw.append(per_draw)
        self.counts.append(count)
        self.evaluations.append(evaluations)

    def save(self, path: Path, extra_seconds: float) -> None:
        from conceptstream.safeio import save_tensors_atomic

        tensors = {f"errors.{i}": e for i, e in enumerate(self.errors)}
        tensors.update({f"draws.{i}": d for i, d in enumerate(self.draws)})
        tensors.update({f"per_draw.{i}": d.contiguous() for i, d in enumerate(self.per_draw)})
        save_tensors_atomic(tensors, path, metadata={
            "ident": self.ident, "counts": json.dumps(self.counts), "evaluations": json.dumps(self.evaluations),
            "seconds": repr(self.seconds + extra_seconds)})

    @classmethod
    def load(cls, path: Path, ident: str) -> _DCCheckpoint:
        """What ``path`` holds for classification ``ident``; empty when it is absent, unreadable or another's."""
        from conceptstream.safeio import load_tensors_with_metadata

        if not path.is_file():
            return cls(ident)
        try:
            tensors, meta = load_tensors_with_metadata(path)
            if meta.get("ident") != ident:
                return cls(ident)
            counts, evaluations = json.loads(meta["counts"]), json.loads(meta["evaluations"])
            n = len(counts)
            return cls(ident, [tensors[f"errors.{i}"] for i in range(n)],
                       [tensors[f"draws.{i}"] for i in range(n) if f"draws.{i}" in tensors], counts, evaluations,
                       float(meta["seconds"]), [tensors[f"per_draw.{i}"] for i in range(n) if f"per_draw.{i}" in tensors])
        except Exception:  # damaged (atomic writes make that rare): classify from the start, replacing it
            return cls(ident)


def hstack(images: Sequence) -> Any:
    """Images side by side, no padding (tile k is the box ``(k*w, 0, (k+1)*w, h)``)."""
    from PIL import Image

    w, h = images[0].size
    strip = Image.new("RGB", (w * len(images), h))
    for k, im in enumerate(images):
        strip.paste(im.convert("RGB").resize((w, h)), (k * w, 0))
    return strip
