"""Learning a task: divergence, errors that leave states unchanged, mixed precision."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_error_after_progress, assert_one_line_error
from streams import assert_same_snapshot, snapshot

from conceptstream import api
from conceptstream.concepts.folder import read_concept
from conceptstream.engine import TrainingDiverged
from conceptstream.errors import StateError, UserInputError
from conceptstream.state import StateStore


def test_nan_loss_aborts_task_and_leaves_state_unchanged(tmp_path, random_model_path, concept_dirs, monkeypatch,
                                                         capsys):
    from conceptstream.cli import main
    from conceptstream.methods.lora import SequentialLoRA

    state = tmp_path / "state"
    api.learn(state, concept_dirs[0], method="lora", model=str(random_model_path), steps=2, progress=False)
    before = snapshot(state)
    original = SequentialLoRA.loss
    calls = []

    def nan_at_step_2(self, ctx, step):
        loss, info = original(self, ctx, step)
        calls.append(step)
        return (loss * float("nan") if step == 2 else loss), info

    monkeypatch.setattr(SequentialLoRA, "loss", nan_at_step_2)
    with pytest.raises(TrainingDiverged, match="step 2"):
        api.learn(state, concept_dirs[1], model=str(random_model_path), steps=5, progress=False)
    assert calls == [0, 1, 2]
    assert_same_snapshot(before, snapshot(state))
    # the CLI reports it in one line, exit 2
    capsys.readouterr()
    rc = main(["learn", str(state), "--images", str(concept_dirs[1]), "--model", str(random_model_path),
               "--steps", "4"])
    assert rc == 2
    assert "nan" in assert_error_after_progress(capsys.readouterr().err).lower()  # after the task's progress bar
    assert_same_snapshot(before, snapshot(state))
    # and the state stays usable
    monkeypatch.setattr(SequentialLoRA, "loss", original)
    api.learn(state, concept_dirs[1], model=str(random_model_path), steps=2, progress=False)
    assert [c["token"] for c in api.info(state)["concepts"]] == [read_concept(d).token for d in concept_dirs[:2]]


def test_learn_errors_on_a_new_state_create_nothing(tmp_path, random_model_path, concept_dirs, capsys):
    from conceptstream.cli import main

    state = tmp_path / "state"
    with pytest.raises(UserInputError, match="unknown method 'ewc-xyz'"):
        api.learn(state, concept_dirs[0], method="ewc-xyz", model=str(random_model_path), steps=2, progress=False)
    assert not StateStore(state).exists()
    capsys.readouterr()
    rc = main(["learn", str(state), "--images", str(concept_dirs[0]), "--model", str(random_model_path),
               "--steps", "2", "--set", "no_such_setting=3"])
    assert rc == 2
    line = assert_one_line_error(capsys.readouterr().err)
    assert "no_such_setting" in line
    assert not StateStore(state).exists()
    rc = main(["learn", str(state), "--images", str(concept_dirs[0]), "--model", str(random_model_path),
               "--steps", "2", "--method", "nope"])
    assert rc == 2 and "unknown method 'nope'" in assert_one_line_error(capsys.readouterr().err)
    assert not StateStore(state).exists()


def test_learn_errors_on_an_existing_state_leave_it_unchanged(tmp_path, random_model_path, concept_dirs, capsys):
    from conceptstream.cli import main

    state = tmp_path / "state"
    model = str(random_model_path)
    api.learn(state, concept_dirs[0], method="lora", model=model, steps=2, progress=False)
    before = snapshot(state)
    existing = read_concept(concept_dirs[0]).token
    with pytest.raises(UserInputError, match="already in this stream"):
        api.learn(state, concept_dirs[1], token=existing, model=model, steps=2, progress=False)
    with pytest.raises(UserInputError, match="invalid token"):
        api.learn(state, concept_dirs[1], token="<my dog>", model=model, steps=2, progress=False)
    with pytest.raises(StateError, match="method 'lora'"):
        api.learn(state, concept_dirs[1], method="ewc-dc", model=model, steps=2, progress=False)
    with pytest.raises(StateError, match="--set"):
        api.learn(state, concept_dirs[1], model=model, steps=2, progress=False, hparams={"lr": 0.1})
    assert_same_snapshot(before, snapshot(state))
    capsys.readouterr()
    cases = [(["--token", "<my dog>"], "invalid token"), (["--token", existing], "already in this stream"),
             (["--set", "bogus=1"], "--set"), (["--method", "c-lora"], "one method")]
    for extra, needle in cases:
        rc = main(["learn", str(state), "--images", str(concept_dirs[1]), "--model", model, "--steps", "2", *extra])
        assert rc == 2, extra
        assert needle in assert_one_line_error(capsys.readouterr().err), extra
    assert_same_snapshot(before, snapshot(state))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_and_gradient_checkpointing_train(tmp_path, random_model_path, concept_dirs, precision):
    """Autocast (through accelerate) + gradient checkpointing run a task; trained values stay fp32 and finite.

    fp16 has no CPU autocast: on a CPU-only machine it is refused with a one-line error and no state."""
    from conceptstream import api

    state = tmp_path / "s"
    kwargs = dict(model=str(random_model_path), method="lora", steps=2, progress=False, checkpoint_every=0,
                  mixed_precision=precision, gradient_checkpointing=True)
    if precision == "fp16" and not torch.cuda.is_available():
        with pytest.raises(UserInputError, match="fp16 needs a GPU"):
            api.learn(state, concept_dirs[0], **kwargs)
        assert not state.exists()
        return
    api.learn(state, concept_dirs[0], **kwargs)
    stream = api.open_stream(state)
    values = stream.state_tensors()["adapter"]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in values.values())
    assert stream.manifest["concepts"][0]["mixed_precision"] == precision
    assert not stream.pipe.unet.is_gradient_checkpointing
    # accelerate keeps one precision per process; a later task in another precision still runs
    api.learn(state, concept_dirs[1], **{**kwargs, "mixed_precision": "no"})
    assert [c["mixed_precision"] for c in api.open_stream(state).manifest["concepts"]] == [precision, "no"]


def test_a_method_with_its_own_step_budget_learns_that_many_steps_unless_told(tmp_path, random_model_path,
                                                                              concept_dirs, monkeypatch):
    """``ContinualMethod.default_steps``: learn (and every bench run of the method) takes it when no
    --steps is given; an explicit --steps wins."""
    from conceptstream.evaluation.variants import Variant
    from conceptstream.methods.registry import get_method

    monkeypatch.setattr(get_method("textual-inversion"), "default_steps", 3)
    state = tmp_path / "state"
    report = api.learn(state, concept_dirs[0], method="textual-inversion", model=str(random_model_path),
                       progress=False)
    assert report.steps == 3
    assert api.learn(state, concept_dirs[1], model=str(random_model_path), steps=2, progress=False).steps == 2
    assert [c["steps"] for c in api.info(state)["concepts"]] == [3, 2]
    assert Variant("textual-inversion", None).task_steps(None) == 3
    assert Variant("textual-inversion", None).task_steps(5) == 5
    assert Variant("lora", "lora").task_steps(None) == 200
