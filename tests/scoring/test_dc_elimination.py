"""The bench's final DC evaluation: the fixed candidate set (and the own-class form derived from the same
errors), and classification by successive elimination against the full evaluation."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conceptstream.errors import UserInputError
from conceptstream.evaluation.bench.scoring import DCCandidates, dc_classification, dc_scores
from conceptstream.models.conditioning import Conditioning
from conceptstream.scoring.dc import (
    DCConfig,
    DiffusionClassifier,
    draw_order,
    elimination_schedule,
    furthest_argmin,
    mean_over_draws,
    parse_elimination,
)

torch.set_num_threads(1)

MUG, CAR = "a photo of a mug", "a photo of a toy car"


def _concepts(nouns: list[str], images: list[list[Path]] | None = None) -> list[SimpleNamespace]:
    return [SimpleNamespace(token=f"<c{i}>", noun=noun,
                            heldout_images=(lambda split="test", i=i: list(images[i]) if images else []))
            for i, noun in enumerate(nouns)]


# ------------------------------------------------------------------ the fixed set, on hand-made errors


def test_fixed_candidate_set_lists_every_concept_then_every_distinct_noun():
    cands = DCCandidates.of(_concepts(["mug", "toy car", "mug"]), include_noun=True)
    assert cands.prompts == ("a photo of a <c0> mug", "a photo of a <c1> toy car", "a photo of a <c2> mug", MUG, CAR)
    assert cands.labels == ("<c0>", "<c1>", "<c2>", MUG, CAR)
    assert cands.class_column == (3, 4, 3)
    assert cands.own_class_columns(1) == [4, 0, 1, 2]  # c_0 of its own class, then every concept
    assert DCCandidates.of(_concepts(["mug"]), include_noun=False).prompts == ("a photo of a <c0>", MUG)


def test_dc_scores_on_hand_made_errors():
    """Three concepts (mug, toy car, mug): columns <c0>, <c1>, <c2>, mug, toy car. Every expected number
    below is worked out by hand from these errors."""
    cands = DCCandidates.of(_concepts(["mug", "toy car", "mug"]), include_noun=True)
    errors = [torch.tensor([[0.10, 0.50, 0.50, 0.05, 0.90],    # the mug class wins: wrong in both forms
                            [0.10, 0.50, 0.50, 0.20, 0.90]]),  # its own prompt wins: right in both
              torch.tensor([[0.30, 0.20, 0.40, 0.50, 0.10],    # its own class wins: wrong in both
                            [0.30, 0.20, 0.40, 0.10, 0.50]]),  # ANOTHER class wins: wrong only in the fixed set
              torch.tensor([[0.30, 0.30, 0.10, 0.20, 0.20]])]  # right in both
    temperature = 0.1
    out = dc_scores(errors, cands, temperature)
    assert out["accuracy"] == pytest.approx(2 / 5)
    assert out["per_concept"] == [0.5, 0.0, 1.0]
    assert out["confusion"] == [[1, 0, 0, 1, 0], [0, 0, 0, 1, 1], [0, 0, 1, 0, 0]]
    assert out["candidates"] == ["<c0>", "<c1>", "<c2>", MUG, CAR]
    own = out["own_class"]
    assert own["accuracy"] == pytest.approx(3 / 5)
    assert own["per_concept"] == [0.5, 0.5, 1.0]
    # own-class columns: c_0, <c0>, <c1>, <c2>
    assert own["confusion"] == [[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]]
    assert own["candidates"] == ["c_0 (a photo of a NOUN)", "<c0>", "<c1>", "<c2>"]

    def true_prob(row: list[float], target: int) -> float:
        w = [math.exp(-e / temperature) for e in row]
        return w[target] / sum(w)

    fixed_p = [true_prob(r.tolist(), i) for i, e in enumerate(errors) for r in e]
    own_p = [true_prob(r[cands.own_class_columns(i)].tolist(), i + 1) for i, e in enumerate(errors) for r in e]
    assert out["calibration"]["true_prob"] == pytest.approx(sum(fixed_p) / 5, rel=1e-5)
    assert own["calibration"]["true_prob"] == pytest.approx(sum(own_p) / 5, rel=1e-5)
    assert out["calibration"]["nll"] == pytest.approx(-sum(math.log(p) for p in fixed_p) / 5, rel=1e-5)
    assert out["calibration"]["n"] == own["calibration"]["n"] == 5
    scale = out["calibration"]["best_logit_scale"]
    assert out["calibration"]["best_temperature"] == pytest.approx(temperature / scale)


def test_dc_scores_after_elimination_predict_among_the_last_survivors():
    """A candidate pruned early never wins over the survivors, however low its mean over fewer draws; a
    pruned own concept has probability 0 (infinite NLL, no fitted temperature)."""
    cands = DCCandidates.of(_concepts(["mug", "toy car"]), include_noun=True)  # <c0>, <c1>, mug, toy car
    errors = [torch.tensor([[0.30, 0.01, 0.20, 0.90],     # <c1> lowest but pruned: the mug class wins
                            [0.10, 0.01, 0.20, 0.90]])]   # <c0> wins among the survivors
    draws = [torch.tensor([[8, 2, 8, 2], [8, 2, 8, 2]])]
    errors.append(torch.tensor([[0.50, 0.60, 0.05, 0.40]]))  # its own <c1> was pruned
    draws.append(torch.tensor([[8, 2, 2, 8]]))
    out = dc_scores(errors, cands, 0.1, draws)
    assert out["confusion"] == [[1, 0, 1, 0], [0, 0, 0, 1]]
    assert out["accuracy"] == pytest.approx(1 / 3)
    # own class: c_0 (mug for concept 0, toy car for concept 1), <c0>, <c1>
    assert out["own_class"]["confusion"] == [[1, 1, 0], [1, 0, 0]]
    cal = out["calibration"]
    assert cal["nll"] == math.inf and cal["best_logit_scale"] is None and cal["best_temperature"] is None
    assert 0.0 <= cal["ece"] <= 1.0
    # true_prob: softmax over the survivors only; 0 for the pruned <c1>
    p0 = math.exp(-3) / (math.exp(-3) + math.exp(-2))
    p1 = math.exp(-1) / (math.exp(-1) + math.exp(-2))
    assert cal["true_prob"] == pytest.approx((p0 + p1 + 0.0) / 3, rel=1e-5)
    assert furthest_argmin(torch.tensor([[0.3, 0.1]])).tolist() == [1]  # no draws: a plain argmin


def test_schedule_parsing_and_checks():
    assert parse_elimination("2:8, 4:3") == ((2, 8), (4, 3))
    assert parse_elimination(None) is None and parse_elimination("none") is None
    with pytest.raises(UserInputError, match="DRAWS:KEEP"):
        parse_elimination("2-8")
    assert elimination_schedule([[2, 8], [4, 3]], 8) == ((2, 8), (4, 3))
    for bad in (((4, 8), (2, 3)), ((2, 8), (9, 3)), ((0, 2),), ((2, 0),), ()):
        with pytest.raises(UserInputError):
            elimination_schedule(bad, 8)
    assert draw_order(8) == [4, 3, 5, 2, 6, 1, 7, 0]  # mid-noise strata first: they tell candidates apart
    assert draw_order(6) == [3, 2, 4, 1, 5, 0] and draw_order(1) == [0]


# ------------------------------------------------------------------ elimination on a stub UNet


class LevelUNet:
    """A stand-in UNet predicting a constant per candidate: the mean of its hidden states (plus the mean of
    its pooled embedding for SDXL conditioning). The error is then ~ level^2 + 1, so the candidate of
    smallest |level| wins at every draw. Records the batch size of every call."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, x, t, hidden, added_cond_kwargs=None):
        self.calls.append(x.shape[0])
        level = hidden.mean((1, 2))
        if added_cond_kwargs is not None:
            level = level + added_cond_kwargs["text_embeds"].mean(1)
        return SimpleNamespace(sample=level.view(-1, 1, 1, 1).expand_as(x))


def _scheduler():
    from diffusers import DDIMScheduler

    from conceptstream.world.tiny_model import SCHEDULER_CONFIG

    return DDIMScheduler(**SCHEDULER_CONFIG)


LEVELS = torch.tensor([1.5, -1.0, 0.0, 2.0, 0.5, -2.5])  # candidate 2 wins, then 4, then 1


def test_elimination_prunes_as_scheduled_and_packs_draws_per_call():
    unet = LevelUNet()
    dc = DiffusionClassifier(unet, _scheduler(), DCConfig(eval_timesteps=4))
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = LEVELS.view(6, 1, 1).expand(6, 2, 3).clone()
    found = dc.eval_errors_eliminating(latents, cond, ((1, 3), (2, 1)), batch_size=3)
    # stage 1: 1 draw x 3 images x 6 candidates; stage 2: 1 draw x 3 x 3; last: 2 draws x 3 x 1 in ONE call
    assert unet.calls == [18, 9, 6] and found.unet_evaluations == 33
    assert found.draws.tolist() == [[1, 2, 4, 1, 2, 1]] * 3
    assert found.prediction.tolist() == [2, 2, 2]
    unet.calls.clear()
    full = dc.eval_errors_batched(latents, cond, batch_size=3)
    assert unet.calls == [18] * 4 and full.argmin(-1).tolist() == [2, 2, 2]
    # the survivor's error is its mean over all 4 draws, as in the full evaluation
    torch.testing.assert_close(found.errors[:, 2], full[:, 2])


def test_elimination_with_sdxl_and_per_image_candidates():
    dc = DiffusionClassifier(LevelUNet(), _scheduler(), DCConfig(eval_timesteps=3))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    hidden = LEVELS.view(6, 1, 1).expand(6, 2, 3).clone()
    sdxl = Conditioning(hidden, torch.zeros(6, 5), torch.zeros(6, 6))
    found = dc.eval_errors_eliminating(latents, sdxl, ((1, 2),))
    assert found.prediction.tolist() == [2, 2] and found.draws[:, [2, 4]].eq(3).all()
    perm = torch.tensor([[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
    per_image = LEVELS[perm].view(2, 6, 1, 1).expand(2, 6, 2, 3).clone()  # [B, K, L, D]
    found = dc.eval_errors_eliminating(latents, per_image, ((1, 2),), batch_size=1)
    assert found.prediction.tolist() == [2, 3]


# ------------------------------------------------------------------ the tiny random UNet


@pytest.fixture(scope="module")
def tiny_dc():
    from conceptstream.world.tiny_model import build_components

    parts = build_components(seed=0)
    return DiffusionClassifier(parts["unet"], parts["scheduler"], DCConfig(eval_timesteps=6))


def _inputs(n_images: int = 5, k: int = 6):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n_images, 4, 16, 16, generator=g), torch.randn(k, 4, 64, generator=g)


def test_elimination_keeping_every_candidate_equals_the_full_evaluation(tiny_dc):
    latents, cond = _inputs()
    full = tiny_dc.eval_errors_batched(latents, cond, seed=3, batch_size=2)
    found = tiny_dc.eval_errors_eliminating(latents, cond, ((2, 6), (4, 10)), seed=3, batch_size=2)
    assert torch.equal(found.errors, full)  # bit for bit: same draws, same UNet batches, same summation order
    assert found.draws.eq(6).all() and found.unet_evaluations == 5 * 6 * 6
    assert torch.equal(found.prediction, full.argmin(-1))


def test_elimination_against_full_on_the_tiny_random_unet(tiny_dc):
    """Wherever the full evaluation's winner survives the pruning, elimination predicts it too, with the
    same errors for every survivor (same draws); it costs fewer UNet evaluations."""
    latents, cond = _inputs()
    full = tiny_dc.eval_errors_batched(latents, cond, batch_size=4)
    found = tiny_dc.eval_errors_eliminating(latents, cond, ((2, 3),), batch_size=4)
    survivors = found.draws == 6
    assert survivors.sum(1).eq(3).all()
    torch.testing.assert_close(found.errors[survivors], full[survivors], rtol=1e-5, atol=1e-7)
    winner_kept = survivors.gather(1, full.argmin(-1, keepdim=True))[:, 0]
    assert winner_kept.sum() >= 3  # the winner is rarely among the worst half after 2 of 6 draws
    assert torch.equal(found.prediction[winner_kept], full.argmin(-1)[winner_kept])
    assert found.unet_evaluations == 5 * (6 * 2 + 3 * 4) < 5 * 6 * 6


# ------------------------------------------------------------------ dc_classification on a stream


@pytest.fixture(scope="module")
def stream_and_concepts(random_model_path, tmp_path_factory):
    """A fresh stream on the tiny random pipeline (no concept learned: the tokens are plain text to it) and
    three concepts (mug, toy car, mug) with 3, 2 and 3 random held-out images."""
    from conceptstream.engine import ConceptStream, StreamSettings

    folder = tmp_path_factory.mktemp("dc-images")
    rng = np.random.default_rng(0)
    images = []
    for i, n in enumerate((3, 2, 3)):
        paths = []
        for j in range(n):
            path = folder / f"c{i}-{j}.png"
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
            paths.append(path)
        images.append(paths)
    stream = ConceptStream.new(str(random_model_path), StreamSettings(method="lora"))
    return stream, _concepts(["mug", "toy car", "mug"], images)


def _old_dc_classification(stream, concepts, include_noun, eval_timesteps, batch_size):
    """The bench's DC classification before the fixed candidate set: per concept, c_0 of its own class +
    every concept, in its own pass."""
    from conceptstream.concepts.images import load_images
    from conceptstream.evaluation.bench.scoring import Evaluator
    from conceptstream.evaluation.metrics import DCAccuracy, DCCalibration
    from conceptstream.methods.base import TaskContext
    from conceptstream.models.conditioning import cat

    cfg = DCConfig(**{**asdict(stream.settings.dc), "eval_timesteps": eval_timesteps})
    dc = DiffusionClassifier(stream.pipe.unet, stream.pipe.scheduler, cfg)
    with torch.no_grad():
        concept_embeds = stream.encode_prompts([Evaluator.concept_prompt(c, include_noun) for c in concepts])
        total, calibration = DCAccuracy(), DCCalibration(num_candidates=len(concepts) + 1)
        per_concept, confusion, all_errors = [], [], []
        for i, c in enumerate(concepts):
            cond = cat([stream.encode_prompts([TaskContext.class_prompt(c.noun)]), concept_embeds])
            latents, _ = stream.encode_images(load_images(c.heldout_images("test"), stream.resolution))
            errors = dc.eval_errors_batched(latents, cond, seed=0, batch_size=batch_size)
            preds = errors.argmin(-1)
            total.update(preds, i + 1)
            calibration.update(dc.log_probs(errors), i + 1)
            per_concept.append(float((preds == i + 1).float().mean()))
            confusion.append(torch.bincount(preds, minlength=len(concepts) + 1).tolist())
            all_errors.append(errors)
    return {"accuracy": float(total.compute()), "per_concept": per_concept, "confusion": confusion,
            "calibration": calibration.compute()}, all_errors


def test_own_class_form_derived_from_the_fixed_errors_equals_the_old_classification(stream_and_concepts):
    stream, concepts = stream_and_concepts
    new = dc_classification(stream, concepts, True, eval_timesteps=3, batch_size=2)
    old, old_errors = _old_dc_classification(stream, concepts, True, eval_timesteps=3, batch_size=2)
    own = new["own_class"]
    # the same draws and prompts: the derived own-class errors are the old ones (up to batched-matmul rounding)
    # so, where no two candidates are within that rounding, the same predictions
    margins = [e.sort(-1).values[:, 1] - e.sort(-1).values[:, 0] for e in old_errors]
    assert min(float(m.min()) for m in margins) > 1e-5
    assert own["accuracy"] == old["accuracy"]
    assert own["per_concept"] == old["per_concept"] and own["confusion"] == old["confusion"]
    for key in ("ece", "nll", "true_prob"):
        assert own["calibration"][key] == pytest.approx(old["calibration"][key], rel=1e-4, abs=1e-6)
    assert len(new["confusion"][0]) == 5 and new["candidates"][3:] == [MUG, CAR]
    assert new["images"] == [3, 2, 3] and new["elimination"] is None
    assert new["unet_evaluations"] == new["unet_evaluations_full"] == 8 * 5 * 3
    assert new["calibration"]["kind"] == "all candidates"


def test_dc_classification_by_elimination(stream_and_concepts):
    stream, concepts = stream_and_concepts
    full = dc_classification(stream, concepts, True, eval_timesteps=4, batch_size=4)
    keep_all = dc_classification(stream, concepts, True, eval_timesteps=4, batch_size=4, elimination=((2, 5),))
    for form in (lambda r: r, lambda r: r["own_class"]):
        for key in ("accuracy", "per_concept", "confusion"):
            assert form(keep_all)[key] == form(full)[key]
        drop_kind = [{k: v for k, v in form(r)["calibration"].items() if k != "kind"} for r in (keep_all, full)]
        assert drop_kind[0] == drop_kind[1]
    pruned = dc_classification(stream, concepts, True, eval_timesteps=4, batch_size=4, elimination=((1, 2),))
    assert pruned["elimination"] == [[1, 2]]
    assert pruned["unet_evaluations"] == 8 * (5 * 1 + 2 * 3) < pruned["unet_evaluations_full"] == 8 * 5 * 4
    assert pruned["calibration"]["kind"].startswith("final-stage survivors")
    assert 0.0 <= pruned["accuracy"] <= 1.0 and sum(map(sum, pruned["confusion"])) == 8


def test_per_draw_errors_are_the_full_evaluation_kept_apart(tiny_dc, stream_and_concepts, tmp_path):
    """Each draw's errors, chunked and seeded as the full evaluation: their mean is eval_errors_batched bit for
    bit, draw j is the errors at eval_draws' j-th draw, and dc_classification(per_draw=True) returns and
    checkpoints them beside an unchanged result."""
    latents, cond = _inputs(n_images=5)
    per_draw = tiny_dc.eval_errors_per_draw(latents, cond, seed=3, batch_size=2)
    assert torch.equal(mean_over_draws(per_draw), tiny_dc.eval_errors_batched(latents, cond, seed=3, batch_size=2))
    t, noise = tiny_dc.eval_draws(latents[2:4], seed=3 + 2)[1]  # chunk 2 (images 2-3) draws from seed 3 + 2
    assert torch.equal(per_draw[1, 2:4], tiny_dc.errors(latents[2:4], cond, t, noise))
    nan = per_draw.clone()
    nan[0, 0, 0] = math.nan
    assert mean_over_draws(nan)[0, 0].isnan() and not mean_over_draws(nan, scored_only=True)[0, 0].isnan()

    stream, concepts = stream_and_concepts
    plain = dc_classification(stream, concepts, True, eval_timesteps=2, batch_size=2)
    ckpt = tmp_path / "dc.safetensors"
    kept = dc_classification(stream, concepts, True, eval_timesteps=2, batch_size=2, per_draw=True, checkpoint=ckpt)
    rows = kept.pop("per_draw_errors")
    assert [tuple(r.shape) for r in rows] == [(2, 3, 5), (2, 2, 5), (2, 3, 5)]  # draws x images x candidates
    assert kept["accuracy"] == plain["accuracy"] and kept["per_concept"] == plain["per_concept"]
    again = dc_classification(stream, concepts, True, eval_timesteps=2, batch_size=2, per_draw=True, checkpoint=ckpt)
    assert again["resumed"]["concepts"] == 3 and all(map(torch.equal, again["per_draw_errors"], rows))
    with pytest.raises(ValueError, match="full evaluation"):
        dc_classification(stream, concepts, True, eval_timesteps=2, batch_size=2, per_draw=True, elimination=((1, 2),))


@pytest.mark.parametrize("elimination", [None, ((1, 2),)])
def test_dc_classification_resumes_from_its_checkpoint(stream_and_concepts, tmp_path, monkeypatch, elimination):
    """Interrupted after the first concept, a rerun with the same checkpoint classifies only the other two and
    gives the uninterrupted result; a checkpoint of another classification (key) is not taken over."""
    stream, concepts = stream_and_concepts
    kwargs = dict(eval_timesteps=2, batch_size=4, elimination=elimination)
    whole = dc_classification(stream, concepts, True, **kwargs)
    assert whole["resumed"] is None
    name = "eval_errors_per_draw" if elimination is None else "eval_errors_eliminating"
    real, calls = getattr(DiffusionClassifier, name), []

    def counted(self, latents, *args, **kw):
        calls.append(latents.shape[0])
        if fail_after is not None and len(calls) > fail_after:
            raise KeyboardInterrupt  # Ctrl-C during the second concept
        return real(self, latents, *args, **kw)

    monkeypatch.setattr(DiffusionClassifier, name, counted)
    ckpt = tmp_path / "dc.safetensors"
    fail_after = 1
    with pytest.raises(KeyboardInterrupt):
        dc_classification(stream, concepts, True, checkpoint=ckpt, key="gen-1", **kwargs)
    assert ckpt.is_file()
    fail_after, calls[:] = None, []
    resumed = dc_classification(stream, concepts, True, checkpoint=ckpt, key="gen-1", **kwargs)
    assert calls == [2, 3]  # concepts 1 and 2 only (2 and 3 held-out images)
    assert resumed["resumed"]["concepts"] == 1 and resumed["resumed"]["seconds"] > 0
    for key in ("accuracy", "per_concept", "confusion", "images", "unet_evaluations"):
        assert resumed[key] == whole[key]
    for key in ("accuracy", "per_concept", "confusion"):
        assert resumed["own_class"][key] == whole["own_class"][key]
    assert resumed["calibration"]["nll"] == pytest.approx(whole["calibration"]["nll"], rel=1e-6)
    calls[:] = []  # the file now holds all three concepts, of state "gen-1" only
    other = dc_classification(stream, concepts, True, checkpoint=ckpt, key="gen-2", **kwargs)
    assert calls == [3, 2, 3] and other["resumed"] is None
    ckpt.write_bytes(b"not a safetensors file")  # damaged: classified from the start, and replaced
    calls[:] = []
    assert dc_classification(stream, concepts, True, checkpoint=ckpt, key="gen-2", **kwargs)["accuracy"] == \
        whole["accuracy"]
    assert calls == [3, 2, 3]


def test_the_schedule_rule_of_benchmarks_dc_elimination():
    from conftest import benchmark_script

    choose = benchmark_script("dc_elimination").choose
    full = {"accuracy": 0.90}
    rows = [{"schedule": "a", "accuracy": 0.895, "unet_evaluations": 150},
            {"schedule": "b", "accuracy": 0.889, "unet_evaluations": 100},  # 0.011 below full: out
            {"schedule": "c", "accuracy": 0.900, "unet_evaluations": 120}]
    assert choose(full, rows, 0.01)[0]["schedule"] == "c"  # the cheapest within tolerance
    chosen, rule = choose(full, rows, 0.001)
    assert chosen["schedule"] == "c" and rule.startswith("fewest")
    chosen, rule = choose({"accuracy": 1.0}, rows, 0.01)
    assert chosen["schedule"] == "c" and rule.startswith("none within")  # none close: the most accurate


def test_benchmarks_dc_draws_simulates_elimination_from_per_draw_errors(tiny_dc):
    """`benchmarks/dc_draws.py` predicts, from one full pass's per-draw errors, what the classifier's own
    successive elimination predicts (same draws, same pruning rule), at the same UNet cost."""
    from conftest import benchmark_script

    script = benchmark_script("dc_draws")
    latents, cond = _inputs()
    per_draw = tiny_dc.eval_errors_per_draw(latents, cond, batch_size=5)
    assert per_draw.shape == (6, 5, 6)  # draws x images x candidates
    assert torch.equal(mean_over_draws(per_draw), tiny_dc.eval_errors(latents, cond))
    for schedule in (((1, 3),), ((2, 4), (4, 2)), ((1, 1),), ((3, 6),)):
        found = tiny_dc.eval_errors_eliminating(latents, cond, schedule, batch_size=5)
        prediction, per_image = script.simulate(per_draw, schedule, draw_order(6))
        assert torch.equal(prediction, found.prediction), schedule
        assert per_image * 5 == found.unet_evaluations
    assert script.bit_reversed(8) == [0, 4, 2, 6, 1, 5, 3, 7]  # the order it compares with
