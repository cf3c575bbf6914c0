"""Diffusion-classifier (DC) scores: p(c_i | x) from denoising errors under shared noise.

For latents x, candidates c_0..c_k and one shared (t, eps):
``x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps``, ``e_i = reduce(||eps - eps_theta(x_t, c_i, t)||^2)``,
``p(c_i | x) = softmax_i(-e_i / temperature)``.

All candidates of all images go through ONE batched UNet call (images x candidates along the
batch), text embeddings are computed once per call (and cached by the caller for fixed prompts),
and everything stays differentiable w.r.t. the adapter and the token being learned.

Errors are computed in noise (epsilon) space for every model: a v-prediction UNet's output is turned
into the epsilon it implies (``sqrt(abar) v + sqrt(1 - abar) x_t``, as the sampler does), because the
diffusion classifier's score is the ELBO's epsilon-weighted error, and so that ``dc_temperature`` means
the same on epsilon and v models. (The v error is the epsilon error divided by ``abar``, a per-timestep
weight that would over-weight high noise levels, where the class signal is weakest.)

Classifying many images among many candidates can prune as it goes
(:meth:`DiffusionClassifier.eval_errors_eliminating`, successive elimination over the same draws).

The scale is explicit: ``reduction="mean"`` averages over latent elements (logit gaps ~1e-3,
so the temperature must be small), ``"sum"`` sums them (gaps grow with latent size).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from conceptstream.errors import UserInputError
from conceptstream.methods.config import DCScoresConfig, setting, setting_specs
from conceptstream.models.conditioning import Cond, Conditioning, candidate_count, cat, per_image_candidates
from conceptstream.models.conditioning import unet_forward as call_unet


@dataclass
class DCConfig:
    """Settings of DC scores; see the module docstring for what the scale means.

    ``temperature`` is the method setting ``dc_temperature`` (``DCScoresConfig``, its one home) as the
    scorer sees it: its default is that setting's, and a stream keeps the two equal
    (``engine.one_dc_temperature``). Saved manifests record both.
    """

    # typical |e_i - e_true| on the tiny model is ~0.006 (mean reduction)
    temperature: float = setting(DCScoresConfig.dc_temperature,
                                 "softmax temperature of DC scores; a DC method sets it as dc_temperature", gt=0)
    reduction: str = setting("mean", "how squared errors are reduced over latent elements", choices=("mean", "sum"))
    eval_timesteps: int = setting(8, "stratified timesteps averaged in evaluation mode", ge=1)
    # training draws t in [t_min, t_max): very low/high t carry little class signal
    t_min: int = setting(100, "lowest training timestep", ge=0)
    t_max: int = setting(900, "training timesteps are drawn below this", ge=1)

    @classmethod
    def from_user(cls, values: Mapping[str, Any]) -> DCConfig:
        """A DC config from user values (``api.learn(dc=...)``); a bad key or value is a one-line UserInputError."""
        specs = setting_specs((cls,))
        for key in values:
            if key not in specs:
                raise UserInputError(f"dc {key}={values[key]}: the DC config has no setting {key!r}; it takes: "
                                     f"{', '.join(specs)}")
        config = cls(**{key: specs[key].convert(value, "dc") for key, value in values.items()})
        if not config.t_min < config.t_max:
            raise UserInputError(f"dc t_min={config.t_min}, t_max={config.t_max}: t_min must be below t_max")
        return config

    def validate(self) -> DCConfig:
        if self.reduction not in ("mean", "sum"):
            raise ValueError(f"DC reduction must be 'mean' or 'sum', got {self.reduction!r}")
        if self.temperature <= 0:
            raise ValueError(f"DC temperature must be > 0, got {self.temperature}")
        return self


class DiffusionClassifier:
    """Scores images against candidate prompts with a (possibly adapted) UNet."""

    def __init__(self, unet, scheduler, config: DCConfig | None = None) -> None:
        self.unet = unet
        self.config = (config or DCConfig()).validate()
        self.prediction_type = prediction_type(scheduler)
        self.alphas_cumprod = scheduler.alphas_cumprod.float()
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)

    def _abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod.to(like.device)[t].view(-1, 1, 1, 1).to(like.dtype)

    def noisy(self, latents: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a = self._abar(t, latents)
        return a.sqrt() * latents + (1 - a).sqrt() * noise

    def training_target(self, latents: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the UNet is trained to predict from ``noisy(latents, t, noise)``: the noise (epsilon) or the
        velocity ``v = sqrt(abar) eps - sqrt(1 - abar) x0`` (v-prediction, SD 2.x 768-v)."""
        if self.prediction_type == "epsilon":
            return noise
        a = self._abar(t, latents)
        return a.sqrt() * noise - (1 - a).sqrt() * latents

    def predicted_noise(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The UNet's output as a noise prediction: itself for epsilon; ``sqrt(abar) v + sqrt(1 - abar) x_t``
        for v-prediction (the same epsilon the sampler derives from v)."""
        if self.prediction_type == "epsilon":
            return pred
        a = self._abar(t, x_t)
        return a.sqrt() * pred + (1 - a).sqrt() * x_t

    def errors(self, latents: torch.Tensor, cond: Cond, t: torch.Tensor, noise: torch.Tensor,
               unet_forward=None) -> torch.Tensor:
        """Denoising errors [B, K] of B images under K candidate embeddings [K, L, D] (or [B, K, L, D]);
        for SDXL a :class:`~conceptstream.models.conditioning.Conditioning` whose pooled embeds and time ids
        are lined up with the hidden states.

        ``t`` is [B] and ``noise`` is [B, C, H, W]: each image has its own draw, shared by all its
        candidates. ``unet_forward(x, t, cond)`` lets callers run a teacher (e.g. via functional_call).
        """
        b = latents.shape[0]
        k = candidate_count(cond)
        x_t = self.noisy(latents, t, noise)
        x_rep = x_t.repeat_interleave(k, dim=0)
        t_rep = t.repeat_interleave(k, dim=0)
        cond_rep = per_image_candidates(cond, b)
        forward = unet_forward or (lambda x, tt, h: call_unet(self.unet, x, tt, h))
        pred = self.predicted_noise(forward(x_rep, t_rep, cond_rep), x_rep, t_rep)
        target = noise.repeat_interleave(k, dim=0)
        err = (pred.float() - target.float()).pow(2).flatten(1)
        err = err.mean(1) if self.config.reduction == "mean" else err.sum(1)
        return err.view(b, k)

    def logits(self, errors: torch.Tensor) -> torch.Tensor:
        return -errors / self.config.temperature

    def log_probs(self, errors: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.logits(errors), dim=-1)

    def sample_draw(self, latents: torch.Tensor, generator: torch.Generator | None = None):
        """One shared (t, eps) per image for training (t within [t_min, t_max))."""
        b = latents.shape[0]
        t = torch.randint(self.config.t_min, self.config.t_max, (b,), generator=generator).to(latents.device)
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
        return t, noise

    def train_log_probs(self, latents: torch.Tensor, cond: Cond,
                        generator: torch.Generator | None = None, unet_forward=None) -> torch.Tensor:
        """Log p(c | x) [B, K] from one shared draw per image: the noisy training-time estimate."""
        t, noise = self.sample_draw(latents, generator)
        return self.log_probs(self.errors(latents, cond, t, noise, unet_forward))

    def eval_draws(self, latents: torch.Tensor, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The ``eval_timesteps`` stratified draws ``(t [B], noise [B, C, H, W])`` of evaluation mode: draw ``j``
        has its ``t`` in the j-th of ``eval_timesteps`` equal strata of the training timesteps. Seeded, so the
        full and the eliminating evaluation score the same draws."""
        n = self.config.eval_timesteps
        g = torch.Generator().manual_seed(seed)
        edges = torch.linspace(0, self.num_train_timesteps, n + 1)
        draws = []
        for j in range(n):
            lo, hi = int(edges[j]), max(int(edges[j]) + 1, int(edges[j + 1]))
            t = torch.randint(lo, hi, (latents.shape[0],), generator=g).to(latents.device)
            noise = torch.randn(latents.shape, generator=g, dtype=latents.dtype).to(latents.device)
            draws.append((t, noise))
        return draws

    @torch.no_grad()
    def eval_errors(self, latents: torch.Tensor, cond: Cond, seed: int = 0) -> torch.Tensor:
        """Errors averaged over ``eval_timesteps`` stratified timesteps, same draws for every candidate."""
        return mean_over_draws(self.eval_errors_per_draw(latents, cond, seed, batch_size=latents.shape[0]))

    @torch.no_grad()
    def eval_errors_batched(self, latents: torch.Tensor, cond: Cond, seed: int = 0,
                            batch_size: int = 8) -> torch.Tensor:
        """:meth:`eval_errors` [B, K] for any number of images, ``batch_size`` images per UNet call."""
        return mean_over_draws(self.eval_errors_per_draw(latents, cond, seed, batch_size))

    @torch.no_grad()
    def eval_errors_per_draw(self, latents: torch.Tensor, cond: Cond, seed: int = 0,
                             batch_size: int = 8) -> torch.Tensor:
        """Each draw's errors [eval_timesteps, B, K] (draw j in the j-th timestep stratum), ``batch_size``
        images per UNet call; chunk ``i`` (images ``i .. i + batch_size``) draws from ``seed + i``. ``cond`` is
        ``[K, ...]`` (shared candidates) or ``[B, K, ...]``. Their mean
        over draws is :meth:`eval_errors_batched`; kept apart, they give every successive-elimination schedule's
        predictions without another UNet call (``benchmarks/dc_draws.py``)."""
        parts = []
        for i in range(0, latents.shape[0], batch_size):
            chunk, sub = latents[i : i + batch_size], cond if _shared(cond) else cond[i : i + batch_size]
            parts.append(torch.stack([self.errors(chunk, sub, t, noise) for t, noise in self.eval_draws(chunk, seed + i)]))
        return torch.cat(parts, dim=1)

    @torch.no_grad()
    def eval_errors_eliminating(self, latents: torch.Tensor, cond: Cond, schedule: Schedule, seed: int = 0,
                                batch_size: int = 8) -> Elimination:
        """Evaluation errors by successive elimination (Li et al. 2023, "Your Diffusion Model is Secretly a
        Zero-Shot Classifier"): every candidate is scored at the first draws, the best few of each image are
        kept and rescored at more draws, and so on; the survivors of the last stage get all
        ``eval_timesteps`` draws.

        ``schedule`` is ``((n_1, keep_1), (n_2, keep_2), ...)`` (see :func:`elimination_schedule`): after
        ``n_s`` draws in total, each image keeps its ``keep_s`` candidates of lowest mean error. The draws are
        :meth:`eval_draws`' (the same seeds, images chunked by ``batch_size`` as in
        :meth:`eval_errors_batched`), visited in :func:`draw_order`: mid-noise strata first, where candidates
        differ most. A candidate's error is its mean over the draws it was scored at, summed in draw order, so a
        schedule that keeps every candidate gives exactly :meth:`eval_errors_batched`.

        After each pruning every image keeps the same number of survivors, so a stage is one gathered
        ``[B, k]`` candidate batch per draw; several draws share one UNet call while the call holds at most the
        full evaluation's ``batch_size x K`` (image, candidate) pairs. ``cond`` is ``[K, ...]`` (shared
        candidates) or ``[B, K, ...]``.
        """
        schedule = elimination_schedule(schedule, self.config.eval_timesteps)
        parts = [self._eliminate(latents[i : i + batch_size], cond if _shared(cond) else cond[i : i + batch_size],
                                 schedule, seed + i)
                 for i in range(0, latents.shape[0], batch_size)]
        return Elimination(torch.cat([p.errors for p in parts]), torch.cat([p.draws for p in parts]),
                           sum(p.unet_evaluations for p in parts), schedule)

    def _eliminate(self, latents: torch.Tensor, cond: Cond, schedule: Schedule, seed: int) -> Elimination:
        n = self.config.eval_timesteps
        b, k_all = latents.shape[0], candidate_count(cond)
        draws = self.eval_draws(latents, seed)
        order = draw_order(n)
        per_draw = torch.full((n, b, k_all), math.nan, device=latents.device)
        alive = torch.arange(k_all, device=latents.device).expand(b, k_all)  # [B, k] candidate indices
        rows = torch.arange(b, device=latents.device)[:, None]
        evaluations, done = 0, 0
        for upto, keep in (*schedule, (n, None)):
            k = alive.shape[1]
            sub = cond[alive] if _shared(cond) else cond[rows, alive]  # [B, k, ...]
            per_call = max(1, k_all // k)  # draws per UNet call: at most the full evaluation's B x K pairs
            todo = order[done:upto]
            for c in range(0, len(todo), per_call):
                group = todo[c : c + per_call]
                d = len(group)
                err = self.errors(latents.repeat(d, 1, 1, 1), sub if d == 1 else cat([sub] * d),
                                  torch.cat([draws[j][0] for j in group]), torch.cat([draws[j][1] for j in group]))
                for m, j in enumerate(group):
                    per_draw[j].scatter_(1, alive, err[m * b : (m + 1) * b])
                evaluations += d * b * k
            done = upto
            if keep is not None and keep < k:
                alive = keep_best(mean_over_draws(per_draw, scored_only=True), alive, keep)
        errors = mean_over_draws(per_draw, scored_only=True)
        return Elimination(errors, (~per_draw.isnan()).sum(0), evaluations, schedule)

    def classify(self, latents: torch.Tensor, cond: Cond, seed: int = 0, batch_size: int = 8) -> torch.Tensor:
        """Predicted candidate index per image (evaluation mode)."""
        return self.eval_errors_batched(latents, cond, seed, batch_size).argmin(-1)


def candidate_subset(seen: int, target: int, k: int, generator: torch.Generator | None = None,
                     required: tuple[int, ...] = ()) -> list[int]:
    """Sorted indices (into seen concepts 0..seen-1) of k concepts: ``target`` and ``required``
    always, the rest drawn at random."""
    chosen = {target, *required}
    others = [i for i in range(seen) if i not in chosen]
    room = max(0, min(k, seen) - len(chosen))
    perm = torch.randperm(len(others), generator=generator)[:room].tolist()
    return sorted(chosen | {others[j] for j in perm})


Schedule = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Elimination:
    """What :meth:`DiffusionClassifier.eval_errors_eliminating` found for B images and K candidates.

    ``errors`` [B, K] is each candidate's mean error over the draws it was scored at and ``draws`` [B, K]
    how many those were: ``eval_timesteps`` for the survivors of the last stage, fewer for the candidates
    pruned before. ``unet_evaluations`` counts the (image, candidate, draw) triples the UNet scored (the full
    evaluation scores B x K x ``eval_timesteps``)."""

    errors: torch.Tensor
    draws: torch.Tensor
    unet_evaluations: int
    schedule: Schedule

    @property
    def prediction(self) -> torch.Tensor:
        """The predicted candidate per image: the final survivor of lowest error."""
        return furthest_argmin(self.errors, self.draws)


def furthest_argmin(errors: torch.Tensor, draws: torch.Tensor | None = None) -> torch.Tensor:
    """Per row of ``errors`` [B, K], the index of the lowest error among the candidates scored at the most
    draws (``draws`` [B, K]; None: all alike, a plain argmin). After successive elimination these are the
    last stage's survivors, whose errors are means over the same draws; a candidate pruned early is never
    chosen over them, however low its mean over fewer draws."""
    if draws is None:
        return errors.argmin(-1)
    furthest = draws == draws.max(-1, keepdim=True).values
    return torch.where(furthest, errors, torch.full_like(errors, math.inf)).argmin(-1)


def elimination_schedule(stages, eval_timesteps: int) -> Schedule:
    """``stages`` ``((n_1, keep_1), ...)`` checked against ``eval_timesteps``: draws in total after each
    stage, strictly increasing within ``1..eval_timesteps``; candidates kept per image, ``>= 1`` (a keep at
    least the number of candidates prunes nothing). The draws left after the last stage go to its survivors.
    A bad schedule is a one-line UserInputError."""
    out = tuple((int(n), int(keep)) for n, keep in stages)
    if not out:
        raise UserInputError("DC elimination schedule is empty; give stages like 2:8,4:3 (draws:keep)")
    previous = 0
    for n, keep in out:
        if not previous < n <= eval_timesteps:
            raise UserInputError(f"DC elimination stage {n}:{keep}: draws must increase from stage to stage and "
                                 f"stay within eval_timesteps={eval_timesteps}")
        if keep < 1:
            raise UserInputError(f"DC elimination stage {n}:{keep}: keep at least 1 candidate")
        previous = n
    return out


def parse_elimination(text: str | None) -> Schedule | None:
    """An elimination schedule from its command-line form ``"2:8,4:3"`` (draws:keep per stage); empty, None
    or ``"none"`` is None (the full evaluation). The draws are checked against eval_timesteps by
    :func:`elimination_schedule` when the schedule is used."""
    if text is None or text.strip().lower() in ("", "none", "off"):
        return None
    stages = []
    for part in text.split(","):
        pieces = part.strip().split(":")
        if len(pieces) != 2 or not all(p.strip().isdigit() for p in pieces):
            raise UserInputError(f"DC elimination {text!r}: each stage is DRAWS:KEEP (e.g. 2:8,4:3), got {part!r}")
        stages.append((int(pieces[0]), int(pieces[1])))
    return tuple(stages)


def draw_order(n: int) -> list[int]:
    """The order in which successive elimination visits the ``n`` stratified draws: from the middle of the
    timestep range outwards (n=8: 4, 3, 5, 2, 6, 1, 7, 0), so its first, pruning draws are the ones that tell
    candidates apart best. A diffusion classifier discriminates best at mid noise (Li et al. 2023); on
    tabletop-50's val views (`benchmarks/dc_draws.py`) one draw alone classifies 0.64-0.69 of the images at
    the middle strata and 0.29 at the least-noise one, which the earlier bit-reversed order (0, 4, 2, 6, ...)
    visited first."""
    mid = n // 2
    return [mid] + [j for step in range(1, n) for j in (mid - step, mid + step) if 0 <= j < n]


def keep_best(mean: torch.Tensor, alive: torch.Tensor, keep: int) -> torch.Tensor:
    """Successive elimination's pruning: of each image's ``alive`` candidate indices [B, k], the ``keep`` of
    lowest ``mean`` error (``mean`` [B, K] over all candidates; ties to the lower index), in index order."""
    best = mean.gather(1, alive).argsort(dim=1, stable=True)[:, :keep].sort(dim=1).values
    return alive.gather(1, best)


def mean_over_draws(per_draw: torch.Tensor, scored_only: bool = False) -> torch.Tensor:
    """Mean [B, K] over the draws of ``per_draw`` [n, B, K], summed draw by draw in order, so that a full
    evaluation and an elimination that scored everything agree bit for bit. ``scored_only``: NaN marks an
    (image, candidate) that a draw did not score (elimination), and the mean is over the scored draws;
    otherwise a NaN error propagates."""
    total = torch.zeros(per_draw.shape[1:], device=per_draw.device)
    count = torch.zeros(per_draw.shape[1:], device=per_draw.device)
    for e in per_draw:
        scored = ~e.isnan() if scored_only else torch.ones_like(e, dtype=torch.bool)
        total += torch.where(scored, e, torch.zeros_like(e))
        count += scored
    return total / count


def _shared(cond: Cond) -> bool:
    """Candidates shared by all images (``[K, L, D]``) rather than per image (``[B, K, L, D]``)."""
    hidden = cond.hidden if isinstance(cond, Conditioning) else cond
    return hidden.dim() == 3


SUPPORTED_PREDICTION_TYPES = ("epsilon", "v_prediction")


def prediction_type(scheduler) -> str:
    """The base model's prediction type, read from its scheduler; anything but epsilon and v-prediction
    (``sample``, flow matching) is refused in one line."""
    kind = getattr(scheduler, "config", {}).get("prediction_type", None)
    if not hasattr(scheduler, "alphas_cumprod") or kind is None:
        raise UserInputError(f"the base model's scheduler {type(scheduler).__name__} is not a DDPM-family scheduler "
                             f"(flow matching?); conceptstream supports {' and '.join(SUPPORTED_PREDICTION_TYPES)} "
                             "models (SD 1.x, SD 2.x, SDXL)")
    if kind not in SUPPORTED_PREDICTION_TYPES:
        raise UserInputError(f"the base model predicts {kind!r} (scheduler prediction_type); conceptstream supports "
                             f"{' and '.join(SUPPORTED_PREDICTION_TYPES)} models")
    return kind
