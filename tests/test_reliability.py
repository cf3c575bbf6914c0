"""Reliability of `learn`: in-task checkpoints and --resume, real killed/interrupted processes, two
writers, diverging training and failing disks. The user's state must never change unless a task
is committed whole, and earlier concepts must keep generating exactly the same images.

Most runs use a tiny *random* Stable Diffusion pipeline built once per session (a few MB), so the
tests neither wait for nor race with the bundled model's training.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import conceptstream
from conceptstream import api, cli
from conceptstream.engine import TrainingDiverged
from conceptstream.errors import StateError, UserInputError
from conceptstream.state import StateStore
from conceptstream.state import store as store_mod

SRC = str(Path(conceptstream.__file__).resolve().parents[1])
PROMPT_A = "a photo of a <a> dog"


# -- fixtures ---------------------------------------------------------------------------------------
def write_images(folder: Path, n: int, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder


@pytest.fixture(scope="session")
def model(random_model_path) -> Path:
    """A randomly initialised tiny SD pipeline (tests/conftest.py): fast, and independent of training."""
    return random_model_path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("images") / "b", 3, seed=1)


@pytest.fixture(scope="module")
def base(tmp_path_factory, model) -> dict:
    """A committed one-concept state (<a>, method lora) and the images <a> generates from it."""
    root = tmp_path_factory.mktemp("base")
    state = root / "state"
    api.learn(state, write_images(root / "a", 2, seed=0), token="<a>", noun="dog", method="lora",
              model=str(model), steps=3, checkpoint_every=0, progress=False)
    return {"state": state, "images_a": generate_a(state, model)}


def generate_a(state: Path, model: Path) -> np.ndarray:
    out = api.generate(PROMPT_A, state=state, model=str(model), n=1, steps=2, seed=7, progress=False)
    return np.stack([np.asarray(im) for im in out])


def copy_state(base: dict, dst: Path) -> Path:
    shutil.copytree(base["state"], dst)
    return dst


def snapshot(state: Path) -> dict[str, bytes]:
    """Every byte of the live state (CURRENT and its generation), for before/after comparisons."""
    gen = (state / "CURRENT").read_text().strip()
    return {"CURRENT": gen.encode(), **{p.name: p.read_bytes() for p in sorted((state / gen).iterdir())}}


def assert_state_unchanged(state: Path, base: dict, model: Path, images: bool = True) -> None:
    """Byte-identical live state; ``images``: also regenerate <a> (same seed) and compare pixels."""
    assert snapshot(state) == snapshot(base["state"])
    assert [c["token"] for c in api.info(state)["concepts"]] == ["<a>"]
    if images:
        np.testing.assert_array_equal(generate_a(state, model), base["images_a"])


def state_tensors(state: Path) -> dict[str, dict[str, torch.Tensor]]:
    store = StateStore(state)
    store.read_manifest()
    return {n: store.load_tensors(n) for n in api.TENSOR_FILES if store.has_file(n)}


def assert_same_tensors(a: Path, b: Path, exact: bool = True) -> None:
    ta, tb = state_tensors(a), state_tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].keys() == tb[name].keys(), name
        for key in ta[name]:
            if exact:
                assert torch.equal(ta[name][key], tb[name][key]), (name, key)
            else:
                torch.testing.assert_close(ta[name][key], tb[name][key], rtol=1e-4, atol=1e-5)


def interrupt_after_checkpoint(monkeypatch, step: int):
    """Patch StateStore.save_checkpoint: save, then raise KeyboardInterrupt (a Ctrl-C) at ``step``."""
    original = StateStore.save_checkpoint

    def save(self, tensors, info):
        original(self, tensors, info)
        if info["step"] == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(StateStore, "save_checkpoint", save)
    return original


# -- subprocess helpers -----------------------------------------------------------------------------
def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != store_mod.CRASH_ENV}
    env.update(PYTHONPATH=SRC, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def start_cli(*args: str, **env: str) -> subprocess.Popen:
    def child_setup() -> None:  # Ctrl-C must reach the child even when the tests run in the background
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    return subprocess.Popen([sys.executable, "-m", "conceptstream.cli", *args], env=cli_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=child_setup)


def learn_args(state: Path, images: Path, model: Path, steps: int, every: int, *more: str) -> list[str]:
    return ["learn", str(state), "--images", str(images), "--token", "<b>", "--noun", "cat", "--model", str(model),
            "--steps", str(steps), "--checkpoint-every", str(every), *more]


def wait_for_checkpoint(proc: subprocess.Popen, state: Path, timeout: float = 180) -> None:
    record = state / store_mod.CHECKPOINT_DIR / store_mod.CHECKPOINT_JSON
    deadline = time.monotonic() + timeout
    while not record.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"learn exited ({proc.returncode}) before its first checkpoint:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no checkpoint appeared")
        time.sleep(0.02)


def finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"learn did not exit:\n{err[-3000:]}")
    return proc.returncode, out, err


def last_line(text: str) -> str:
    lines = [ln for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


# -- resume equals an uninterrupted run ------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora-ewc", "c-lora", "custom-diffusion"])
def test_resume_continues_an_interrupted_task_exactly(tmp_path, model, images, monkeypatch, method):
    """Task 2 interrupted after its step-4 checkpoint, then resumed: the state equals an uninterrupted run."""
    hp = {"fisher_passes": 1} if "ewc" in method else {}
    first = tmp_path / "first"
    api.learn(first, write_images(tmp_path / "a", 2, 0), token="<a>", noun="dog", method=method, model=str(model),
              steps=1, hparams=hp, checkpoint_every=0, progress=False)
    shutil.copytree(first, tmp_path / "A")
    shutil.copytree(first, tmp_path / "B")
    kw = dict(model=str(model), steps=5, checkpoint_every=2, progress=False)
    api.learn(tmp_path / "A", images, token="<b>", noun="cat", **kw)

    before = snapshot(tmp_path / "B")
    original = interrupt_after_checkpoint(monkeypatch, step=4)
    with pytest.raises(KeyboardInterrupt):
        api.learn(tmp_path / "B", images, token="<b>", noun="cat", **kw)
    assert snapshot(tmp_path / "B") == before
    ck = StateStore(tmp_path / "B").load_checkpoint()
    assert ck is not None and ck[1]["step"] == 4 and ck[1]["token"] == "<b>"
    monkeypatch.setattr(StateStore, "save_checkpoint", original)

    report = api.learn(tmp_path / "B", images, resume=True, **kw)
    steps_run = [log["step"] for log in report.logs if "step" in log]
    assert steps_run == [4]  # it continued; it did not start over
    assert_same_tensors(tmp_path / "A", tmp_path / "B")
    assert StateStore(tmp_path / "B").load_checkpoint() is None
    assert not (tmp_path / "B" / store_mod.CHECKPOINT_DIR).exists()


def test_resume_continues_an_interrupted_sdxl_task_exactly(tmp_path, sdxl_model_path, images, monkeypatch):
    """The same on SDXL: the checkpoint holds the new token's rows of both text encoders and the adapter."""
    first = tmp_path / "first"
    api.learn(first, write_images(tmp_path / "a", 2, 0), token="<a>", noun="dog", method="lora",
              model=str(sdxl_model_path), steps=1, checkpoint_every=0, progress=False)
    shutil.copytree(first, tmp_path / "A")
    shutil.copytree(first, tmp_path / "B")
    kw = dict(model=str(sdxl_model_path), steps=5, checkpoint_every=2, progress=False)
    api.learn(tmp_path / "A", images, token="<b>", noun="cat", **kw)
    original = interrupt_after_checkpoint(monkeypatch, step=4)
    with pytest.raises(KeyboardInterrupt):
        api.learn(tmp_path / "B", images, token="<b>", noun="cat", **kw)
    monkeypatch.setattr(StateStore, "save_checkpoint", original)
    report = api.learn(tmp_path / "B", images, resume=True, **kw)
    assert [log["step"] for log in report.logs if "step" in log] == [4]
    assert_same_tensors(tmp_path / "A", tmp_path / "B")
    pipe = api.open_stream(tmp_path / "B").pipe
    assert pipe.tokenizer_2.convert_tokens_to_ids("<b>") != pipe.tokenizer_2.unk_token_id


def test_first_task_checkpoint_resume_discard_and_refusals(tmp_path, model, images, monkeypatch, capsys):
    """An interrupted first task (default method ewc-dc): refusals, --resume and --discard-checkpoint."""
    kw = dict(model=str(model), steps=4, checkpoint_every=2, progress=False,
              hparams={"fisher_passes": 1, "dc_k": 2, "dc_batch": 1})
    api.learn(tmp_path / "A", images, token="<b>", noun="cat", **kw)

    state = tmp_path / "B"
    original = interrupt_after_checkpoint(monkeypatch, step=2)
    with pytest.raises(KeyboardInterrupt):
        api.learn(state, images, token="<b>", noun="cat", **kw)
    monkeypatch.setattr(StateStore, "save_checkpoint", original)
    assert not StateStore(state).exists()  # nothing committed, only the checkpoint
    with pytest.raises(UserInputError, match="not a conceptstream state"):
        api.info(state)
    shutil.copytree(state, tmp_path / "C")

    def cli_error(*args: str) -> str:
        assert cli.main(["learn", str(state), "--images", str(images), "--model", str(model), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("conceptstream: error: "), err
        return err[0]

    msg = cli_error("--token", "<b>", "--noun", "cat")
    assert "interrupted task (<b> cat, step 2/4)" in msg and "--resume" in msg and "--discard-checkpoint" in msg
    assert "--token" in cli_error("--token", "<c>", "--resume")
    assert "--noun" in cli_error("--noun", "dog", "--resume")
    assert "--steps" in cli_error("--steps", "9", "--resume")
    assert "method" in cli_error("--method", "lora", "--resume")
    assert "3 images but 1" in cli_error("--resume", "--images", str(images / "00.png"))
    with pytest.raises(SystemExit):  # argparse: the two flags exclude each other
        cli.main(["learn", str(state), "--images", str(images), "--resume", "--discard-checkpoint"])
    capsys.readouterr()
    assert StateStore(state).load_checkpoint()[1]["step"] == 2  # the refusals changed nothing

    report = api.learn(state, images, resume=True, **{k: v for k, v in kw.items() if k != "hparams"})
    assert [log["step"] for log in report.logs if "step" in log] == [2, 3]
    assert_same_tensors(tmp_path / "A", state)
    assert "no interrupted task" in cli_error("--resume")

    # A checkpoint whose tensors do not fit is refused in one line, and can be discarded.
    from safetensors.torch import save_file

    (trainable,) = (tmp_path / "C" / "checkpoint").glob("trainable.*.safetensors")
    save_file({"token": torch.zeros(3)}, str(trainable))
    with pytest.raises(StateError, match="does not fit this stream.*--discard-checkpoint") as exc:
        api.learn(tmp_path / "C", images, resume=True, model=str(model), progress=False)
    assert "\n" not in str(exc.value)
    report = api.learn(tmp_path / "C", images, token="<b>", noun="cat", discard_checkpoint=True, **kw)
    assert [log["step"] for log in report.logs if "step" in log] == [0, 1, 2, 3]
    assert_same_tensors(tmp_path / "A", tmp_path / "C")


# -- real processes: SIGKILL, SIGTERM, Ctrl-C, crashes inside the save ------------------------------
def test_sigkill_during_training_then_resume(tmp_path, model, base, images, capsys):
    state = copy_state(base, tmp_path / "state")
    reference = copy_state(base, tmp_path / "reference")
    proc = start_cli(*learn_args(state, images, model, steps=24, every=2))
    try:
        wait_for_checkpoint(proc, state)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL

    assert cli.main(["info", str(state), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [c["token"] for c in data["concepts"]] == ["<a>"] and data["has_checkpoint"]
    assert data["checkpoint"]["token"] == "<b>" and data["checkpoint"]["steps"] == 24
    assert cli.main(["info", str(state)]) == 0
    assert "unfinished <b> (cat) interrupted at step" in capsys.readouterr().out
    assert_state_unchanged(state, base, model)
    step = StateStore(state).load_checkpoint()[1]["step"]
    assert 2 <= step < 24

    assert cli.main(["learn", str(state), "--images", str(images), "--model", str(model), "--resume"]) == 0
    assert "learned <b> (cat) as task 1" in capsys.readouterr().out
    api.learn(reference, images, token="<b>", noun="cat", model=str(model), steps=24, checkpoint_every=0,
              progress=False)
    assert_same_tensors(reference, state, exact=False)  # trained partly in another process: allow round-off


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_ctrl_c_exit_cleanly_and_keep_the_state(tmp_path, model, base, images, capsys, sig):
    state = copy_state(base, tmp_path / "state")
    proc = start_cli(*learn_args(state, images, model, steps=400, every=2))
    try:
        wait_for_checkpoint(proc, state)
        # A second `learn` on the same state exits at once with one line, and changes nothing.
        t0 = time.monotonic()
        rc = cli.main(["learn", str(state), "--images", str(images), "--token", "<c>", "--noun", "cat"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and time.monotonic() - t0 < 10
        assert len(err) == 1 and "in use by another conceptstream process" in err[0] and str(proc.pid) in err[0]
        assert proc.poll() is None, "the first learn must still be running"
        os.kill(proc.pid, sig)
        rc, out, err = finish(proc, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 130, err[-3000:]
    assert "Traceback" not in err
    line = last_line(err)
    assert line.startswith("conceptstream: interrupted; the saved state is unchanged"), line
    assert "--resume" in line
    assert_state_unchanged(state, base, model, images=sig == signal.SIGTERM)
    info = StateStore(state).load_checkpoint()[1]
    assert info["token"] == "<b>" and 2 <= info["step"] < 400
    assert not (state / ".lock").read_text().strip()  # the lock was released, not just abandoned


@pytest.mark.parametrize("point, committed", [("checkpoint-files-written", False), ("tensor-written", False),
                                              ("current-switched", True)])
def test_sigkill_inside_the_save(tmp_path, model, base, images, capsys, point, committed):
    state = copy_state(base, tmp_path / "state")
    rc, out, err = finish(start_cli(*learn_args(state, images, model, steps=4, every=2),
                                    **{store_mod.CRASH_ENV: point}))
    assert rc == -signal.SIGKILL, err[-3000:]
    assert cli.main(["info", str(state), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [c["token"] for c in data["concepts"]] == (["<a>", "<b>"] if committed else ["<a>"])
    if committed:  # the crash came after the switch: the new concept is there, whole
        assert [c["token"] for c in api.info(state)["concepts"]] == ["<a>", "<b>"]
        assert generate_a(state, model).shape == base["images_a"].shape
    else:
        assert_state_unchanged(state, base, model, images=point == "tensor-written")
    if point == "checkpoint-files-written":  # the next writer tidies up and the state keeps working
        api.learn(state, images, token="<c>", noun="cat", model=str(model), steps=1, checkpoint_every=0,
                  discard_checkpoint=True, progress=False)
        assert [c["token"] for c in api.info(state)["concepts"]] == ["<a>", "<c>"]
        assert sorted(p.name for p in state.iterdir()) == [".lock", "CURRENT", "v0002"]


# -- diverging training, failing disks -------------------------------------------------------------
def test_nan_loss_aborts_and_keeps_the_state(tmp_path, model, base, images, monkeypatch):
    from conceptstream.methods.regularised import RegularisedAdapterMethod

    state = copy_state(base, tmp_path / "state")
    original = RegularisedAdapterMethod.loss

    def loss(self, ctx, step):
        value, logs = original(self, ctx, step)
        return (value * float("nan") if step == 3 else value), logs

    monkeypatch.setattr(RegularisedAdapterMethod, "loss", loss)
    with pytest.raises(TrainingDiverged, match="loss became nan at step 3 of <b>.*saved state is unchanged"):
        api.learn(state, images, token="<b>", noun="cat", model=str(model), steps=6, checkpoint_every=2,
                  progress=False)
    assert StateStore(state).load_checkpoint() is None  # resuming would only diverge again
    assert_state_unchanged(state, base, model, images=False)


def test_exploding_learning_rate_through_the_cli(tmp_path, model, images, capsys):
    state = tmp_path / "new"
    rc = cli.main(["learn", str(state), "--images", str(images), "--token", "<b>", "--noun", "cat", "--model",
                   str(model), "--method", "lora", "--steps", "6", "--set", "lr=1e30", "--set", "token_lr=1e30"])
    assert rc == 2
    line = last_line(capsys.readouterr().err)
    assert line.startswith("conceptstream: error: ") and ("nan" in line.lower() or "inf" in line), line
    assert not state.exists()  # a first task that fails leaves no folder behind


@pytest.mark.parametrize("where, code, hint", [("checkpoint", errno.ENOSPC, "free space"),
                                               ("commit", errno.ENOSPC, "free space"),
                                               ("commit", errno.EACCES, "writable")])
def test_failing_disk_during_a_save_keeps_the_state(tmp_path, model, base, images, monkeypatch, where, code, hint):
    state = copy_state(base, tmp_path / "state")

    def write(path, data):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(store_mod, "_write_file_bytes", write)
    with pytest.raises(StateError, match=hint) as exc:
        api.learn(state, images, token="<b>", noun="cat", model=str(model), steps=4,
                  checkpoint_every=2 if where == "checkpoint" else 0, progress=False)
    assert "\n" not in str(exc.value)
    assert ("checkpoint" in str(exc.value)) == (where == "checkpoint")
    monkeypatch.undo()
    assert not (state / store_mod.CHECKPOINT_DIR).exists() or not any((state / store_mod.CHECKPOINT_DIR).iterdir())
    assert sorted(p.name for p in state.iterdir() if p.name != store_mod.CHECKPOINT_DIR) == [
        ".lock", "CURRENT", "v0001"]  # no half-written generation or temporary file left
    assert_state_unchanged(state, base, model, images=False)
