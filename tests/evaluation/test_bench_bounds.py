"""The bench's reference bounds: ``single-task`` (each concept alone) and ``joint`` (all concepts together)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conceptstream import api
from conceptstream.errors import UserInputError
from conceptstream.evaluation.bench import expand_variants, run_bench
from conceptstream.state import StateStore

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_model(random_model_path) -> str:
    return str(random_model_path)  # an untrained tiny pipeline (tests/conftest.py)


@pytest.fixture(scope="module")
def bounds_bench(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("bounds") / "out"
    doc = run_bench(out, sequence="tabletop-3", methods=["single-task", "joint"], quick=True, steps=2,
                    model=tiny_model, progress=False, log=lambda line: None)
    return out, doc


def test_bounds_are_variants_of_the_bench_adapter():
    single, joint = expand_variants(["single-task", "joint"], "vera")
    assert (single.bound, single.method, single.adapter, single.label) == ("single-task", "lora", "vera",
                                                                           "single-task-vera")
    assert (joint.label, joint.dirname) == ("joint-vera", "joint-vera")


def test_single_task_learns_each_concept_alone_and_never_forgets(bounds_bench):
    out, doc = bounds_bench
    assert doc["complete"], doc["failed"]
    run = doc["runs"]["single-task"]["seeds"]["0"]
    states = out / "runs" / "single-task-lora" / "seed0" / "states"
    manifests = [StateStore(states / f"task{n:03d}").read_manifest() for n in range(2)]
    tokens = [c["token"] for c in json.loads((out / "results.json").read_text())["settings"]["concepts"]]
    assert [[c["token"] for c in m["concepts"]] for m in manifests] == [[tokens[0]], [tokens[1]]]
    assert [m["concepts"][0]["seed"] for m in manifests] == [0, 1]  # task n's learn seed, as in a continual run
    mmd = run["matrices"]["MMD"]
    assert mmd[1][0] == mmd[0][0]  # concept 0's own model still draws it after task 2
    summary = run["summary"]
    assert summary["A_MMD"] == pytest.approx((mmd[0][0] + mmd[1][1]) / 2)
    assert summary["plasticity_MMD"] == pytest.approx(summary["A_MMD"])
    assert summary["BwT_MMD"] == 0.0
    assert summary["DC_acc"] is None and run["dc"]["available"] is False


def test_joint_learns_all_concepts_in_one_task_and_is_scored_once(bounds_bench):
    out, doc = bounds_bench
    run = doc["runs"]["joint"]["seeds"]["0"]
    manifest = StateStore(out / "runs" / "joint-lora" / "seed0" / "state").read_manifest()
    assert len(manifest["concepts"]) == 2
    assert all(c["learned_jointly_with"] == 2 and c["steps"] == 4 for c in manifest["concepts"])  # 2 x steps
    mmd = run["matrices"]["MMD"]
    assert mmd[0][0] is None and all(v is not None for v in mmd[1])
    summary = run["summary"]
    assert summary["A_MMD"] == pytest.approx(sum(mmd[1]) / 2)
    assert summary["plasticity_MMD"] is None and summary["BwT_MMD"] is None
    assert 0.0 <= summary["DC_acc"] <= 1.0


def test_joint_prompts_follow_each_latent_rows_concept(tiny_model, tmp_path):
    """Every row of a joint minibatch is captioned with its own concept's token."""
    from conceptstream.methods.base import ConceptInfo, TaskContext

    concepts = [ConceptInfo("<a>", "mug", 1, 0), ConceptInfo("<b>", "toy car", 2, 1)]
    ctx = TaskContext(unet=None, text_encoder=None, tokenizer=None, scheduler=None, dc=None, concepts=concepts,
                      latent_mean=torch.zeros(5, 4, 2, 2), latent_std=torch.zeros(5, 4, 2, 2),
                      generator=torch.Generator().manual_seed(0), device=torch.device("cpu"),
                      latent_owner=torch.tensor([0, 0, 0, 1, 1]))
    ctx.latent_mean[3:] = 1.0  # concept <b>'s rows
    z = ctx.sample_latents(16)
    prompts = ctx.batch_prompts(16)
    for row, prompt in zip(z, prompts):
        assert prompt == ("a photo of a <b> toy car" if row.mean() == 1.0 else "a photo of a <a> mug")
    assert {p for p in prompts} == {"a photo of a <a> mug", "a photo of a <b> toy car"}
    single = TaskContext(unet=None, text_encoder=None, tokenizer=None, scheduler=None, dc=None, concepts=concepts,
                         latent_mean=torch.zeros(2, 4, 2, 2), latent_std=torch.zeros(2, 4, 2, 2),
                         generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    single.sample_latents(3)
    assert single.batch_prompts(3) == ["a photo of a <b> toy car"] * 3  # one concept: the current one


def test_learn_joint_refuses_methods_that_learn_one_concept_per_task(tiny_model, tmp_path):
    from conceptstream.world.catalogue import get_sequence
    from conceptstream.world.folders import export_sequence

    folders = export_sequence(list(get_sequence("tabletop-3"))[:2], tmp_path / "seq", train_views=2, eval_views=2)
    with pytest.raises(UserInputError, match="joint learning of several concepts at once takes --method lora"):
        api.learn_joint(tmp_path / "state", [f.path for f in folders], method="ewc-dc", model=tiny_model, steps=1,
                        progress=False)
    assert not (tmp_path / "state").exists()  # nothing written
    assert math.isfinite(api.learn_joint(tmp_path / "state", [f.path for f in folders], model=tiny_model, steps=1,
                                         progress=False).final_loss)
