"""The state directory: round trips, generations, locking, failures and real SIGKILLed writers."""

from __future__ import annotations

import errno
import inspect
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import conceptstream
from conceptstream.errors import StateError
from conceptstream.state import StateStore
from conceptstream.state import store as store_mod

SRC = str(Path(conceptstream.__file__).resolve().parents[1])


# -- helpers shared with the child processes (their source is sent to the child) -------------------
def make_manifest(n: int) -> dict:
    return {
        "format_version": 1,
        "base_model": {"reference": "tiny", "fingerprint": "f00d"},
        "method": {"name": "ewc-dc", "adapter": {"kind": "lora", "rank": 4}, "hyperparameters": {"lambda": 1.0}},
        "concepts": [{"token": f"<c{i}>", "noun": "dog", "task_index": i, "created_at": "2024-05-01T12:00:00+00:00",
                      "steps": 10, "seed": i} for i in range(n)],
        "created_at": "2024-05-01T12:00:00+00:00",
        "updated_at": "2024-05-01T12:00:00+00:00",
        "versions": {"conceptstream": "0.1.0"},
        "n": n,
    }


def make_tensors(n: int) -> dict:
    return {"tokens": {f"<c{i}>": torch.full((8,), float(i)) for i in range(n)},
            "adapter": {"w": torch.full((256, 256), float(n)), "b": torch.arange(64.0) + n}}


METHOD_FILE = {"fisher": torch.linspace(0, 1, 4096)}  # written by the first commit, then always kept


def assert_consistent(store: StateStore) -> int:
    """A reader's view: a valid manifest whose tensor files all belong to the same commit."""
    m = store.read_manifest()
    n = m["n"]
    assert m == make_manifest(n)
    tokens = store.load_tensors("tokens")
    assert sorted(tokens) == sorted(f"<c{i}>" for i in range(n))
    for i in range(n):
        assert torch.equal(tokens[f"<c{i}>"], torch.full((8,), float(i)))
    adapter = store.load_tensors("adapter")
    assert torch.equal(adapter["w"], torch.full((256, 256), float(n)))
    assert torch.equal(adapter["b"], torch.arange(64.0) + n)
    assert torch.equal(store.load_tensors("method")["fisher"], METHOD_FILE["fisher"])
    current = (store.path / "CURRENT").read_text().strip()
    assert store.generation() == current
    assert sorted(p.name for p in (store.path / current).iterdir()) == [
        "adapter.safetensors", "manifest.json", "method.safetensors", "tokens.safetensors"]
    return n


def commit_n(store: StateStore, n: int) -> str:
    if store.exists():
        return store.commit(make_manifest(n), make_tensors(n), keep=["method"])
    return store.commit(make_manifest(n), {**make_tensors(n), "method": METHOD_FILE})


CHILD_MAIN = textwrap.dedent('''
    import os, sys, time
    import torch
    from conceptstream.state import StateStore

    path, mode = sys.argv[1], sys.argv[2]
    store = StateStore(path)
    with store.lock():
        print("locked", flush=True)
        if mode == "hold":
            time.sleep(120)
        n = store.read_manifest()["n"] if store.exists() else 0
        while True:
            n += 1
            if mode == "checkpoint":
                store.save_checkpoint({"adapter": {"w": torch.full((4,), float(n))}}, {"step": n})
            else:
                commit_n(store, n)
            print(n, flush=True)
            if mode != "loop":
                break
''')
CHILD = "\n".join(["from __future__ import annotations", "import torch",
                   "METHOD_FILE = {'fisher': torch.linspace(0, 1, 4096)}",
                   *(inspect.getsource(f) for f in (make_manifest, make_tensors, commit_n)), CHILD_MAIN])


def spawn(path: Path, mode: str, crash_at: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p),
           "OMP_NUM_THREADS": "1"}
    env.pop(store_mod.CRASH_ENV, None)
    if crash_at:
        env[store_mod.CRASH_ENV] = crash_at
    return subprocess.Popen([sys.executable, "-c", CHILD, str(path), mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def wait_locked(proc: subprocess.Popen) -> None:
    line = proc.stdout.readline()
    assert line.strip() == "locked", (line, proc.stderr.read() if proc.poll() is not None else "")


def listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


@pytest.fixture
def state(tmp_path) -> StateStore:
    return StateStore(tmp_path / "state")


# -- round trips ------------------------------------------------------------------------------------
def test_round_trip(state):
    assert not state.exists()
    with state.lock():
        gen = commit_n(state, 2)
    assert gen == "v0001" and state.exists()
    reader = StateStore(state.path)
    assert assert_consistent(reader) == 2
    assert reader.has_file("adapter") and reader.has_file("adapter.safetensors") and not reader.has_file("other")
    assert [p.name for p in reader.files()] == ["adapter.safetensors", "manifest.json", "method.safetensors",
                                                "tokens.safetensors"]
    assert reader.size_bytes() == sum(p.stat().st_size for p in reader.files()) > 256 * 256 * 4
    assert json.loads((state.path / "v0001" / "manifest.json").read_text())["n"] == 2
    assert listing(state.path) == [".lock", "CURRENT", "v0001"]


def test_keep_carries_files_over_and_old_generation_is_removed(state):
    with state.lock():
        commit_n(state, 1)
        method_inode = (state.path / "v0001" / "method.safetensors").stat().st_ino
        assert commit_n(state, 2) == "v0002"
        assert listing(state.path) == [".lock", "CURRENT", "v0002"]
        assert (state.path / "CURRENT").read_text().strip() == "v0002"
        # kept unchanged: hard-linked, not rewritten
        assert (state.path / "v0002" / "method.safetensors").stat().st_ino == method_inode
        assert commit_n(state, 3) == "v0003"
    assert assert_consistent(StateStore(state.path)) == 3


def test_keep_falls_back_to_copy_when_hard_links_fail(state, monkeypatch):
    def no_link(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    with state.lock():
        commit_n(state, 1)
        monkeypatch.setattr(os, "link", no_link)
        commit_n(state, 2)
    assert assert_consistent(StateStore(state.path)) == 2


def test_commit_argument_errors_write_nothing(state):
    with state.lock():
        commit_n(state, 1)
        before = listing(state.path)
        with pytest.raises(StateError, match="has no such file"):
            state.commit(make_manifest(2), make_tensors(2), keep=["nope"])
        with pytest.raises(StateError, match="both given and kept"):
            state.commit(make_manifest(2), make_tensors(2), keep=["adapter"])
        with pytest.raises(StateError, match="named twice"):
            state.commit(make_manifest(2), {"adapter": {}, "adapter.safetensors": {}})
        with pytest.raises(StateError, match="pickle"):
            state.commit(make_manifest(2), {"adapter.bin": {"w": torch.ones(1)}})
        with pytest.raises(StateError, match="invalid state file name"):
            state.commit(make_manifest(2), {"../evil": {"w": torch.ones(1)}})
        with pytest.raises(StateError, match="not a tensor"):
            state.commit(make_manifest(2), {"adapter": {"w": [1, 2]}})
        with pytest.raises(StateError, match="invalid manifest"):
            state.commit({"format_version": 1}, make_tensors(2))
        bad = make_manifest(2)
        bad["object"] = object()
        with pytest.raises(StateError, match="cannot be saved as JSON"):
            state.commit(bad, make_tensors(2))
        assert listing(state.path) == before
    assert assert_consistent(StateStore(state.path)) == 1


def test_tensors_sharing_memory_are_saved(state):
    base = torch.arange(12.0)
    with state.lock():
        state.commit(make_manifest(0), {"adapter": {"a": base[:6], "b": base[6:], "c": base}})
    out = StateStore(state.path).load_tensors("adapter")
    assert torch.equal(out["a"], base[:6]) and torch.equal(out["b"], base[6:]) and torch.equal(out["c"], base)


def test_commit_requires_the_lock(state):
    with pytest.raises(StateError, match="needs the state's lock"):
        commit_n(state, 1)
    assert not state.path.exists() or not state.exists()


# -- reading damaged or foreign states -------------------------------------------------------------
def test_pickle_files_are_never_loaded(state):
    with state.lock():
        commit_n(state, 1)
    torch.save({"w": torch.ones(1)}, state.path / "v0001" / "adapter.pt")
    reader = StateStore(state.path)
    with pytest.raises(StateError, match="pickle file; conceptstream never loads pickle files") as err:
        reader.read_manifest()
    assert "\n" not in str(err.value)
    with pytest.raises(StateError, match="pickle"):
        reader.load_tensors("adapter.pt")
    with pytest.raises(StateError, match="pickle"):
        reader.load_tensors("adapter")


def test_damaged_states_give_one_line_errors_and_writers_delete_nothing(state):
    with state.lock():
        commit_n(state, 1)
    reader = StateStore(state.path)
    (state.path / "CURRENT").write_text("../../etc\n")
    with pytest.raises(StateError, match="CURRENT is damaged"):
        reader.read_manifest()
    (state.path / "CURRENT").write_text("v0007\n")
    with pytest.raises(StateError, match="names v0007, but .* is missing"):
        reader.read_manifest()
    with state.lock(), pytest.raises(StateError, match="names v0007"):
        commit_n(state, 2)
    assert (state.path / "v0001" / "manifest.json").is_file()  # nothing was cleaned away
    (state.path / "CURRENT").write_text("v0001\n")
    (state.path / "v0001" / "manifest.json").write_text('{"format_version": 1,')
    with pytest.raises(StateError, match=r"manifest.json is not valid JSON \(line 1 col 22\)"):
        reader.read_manifest()
    (state.path / "v0001" / "manifest.json").write_text(json.dumps({**make_manifest(1), "format_version": 2}))
    with pytest.raises(StateError, match="newer conceptstream"):
        reader.read_manifest()
    (state.path / "v0001" / "manifest.json").write_text(json.dumps(make_manifest(1)))
    (state.path / "v0001" / "adapter.safetensors").write_bytes(b"\x00garbage")
    reader.read_manifest()
    with pytest.raises(StateError, match="is damaged .*restore the state from a backup"):
        reader.load_tensors("adapter")
    (state.path / "v0001" / "tokens.safetensors").unlink()
    with pytest.raises(StateError, match="has no tokens.safetensors"):
        reader.load_tensors("tokens")


def test_lost_current_pointer_is_refused_not_guessed(state):
    with state.lock():
        commit_n(state, 1)
        commit_n(state, 2)
    (state.path / "CURRENT").unlink()
    assert not state.exists()
    with pytest.raises(StateError, match="holds generation.* v0002 but no CURRENT"):
        with state.lock():
            pass
    assert (state.path / "v0002" / "manifest.json").is_file()


def test_foreign_folder_is_not_used(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "dog.jpg").write_bytes(b"x")
    with pytest.raises(StateError, match="not empty and is not a conceptstream state"):
        with StateStore(tmp_path / "photos").lock():
            pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(StateError, match="is a file"):
        with StateStore(tmp_path / "file").lock():
            pass
    with pytest.raises(StateError, match="not a conceptstream state"):
        StateStore(tmp_path / "missing").read_manifest()


def test_reads_are_pinned_to_one_generation(state):
    with state.lock():
        commit_n(state, 1)
    reader = StateStore(state.path)
    assert reader.read_manifest()["n"] == 1
    with state.lock():
        commit_n(state, 2)  # deletes v0001, which the reader is part-way through
    with pytest.raises(StateError, match="changed while it was being read"):
        reader.load_tensors("adapter")
    assert assert_consistent(reader) == 2  # a fresh read_manifest follows CURRENT again


# -- failures while writing ------------------------------------------------------------------------
def _raiser(exc: BaseException):
    def fail(*args, **kwargs):
        raise exc

    return fail


_enospc = _raiser(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))


@pytest.mark.parametrize("where", ["tensor-write", "manifest-replace", "current-replace", "rename", "mkdir"])
def test_disk_full_leaves_previous_state_intact(state, monkeypatch, where):
    with state.lock():
        commit_n(state, 1)
        before = listing(state.path)
        real_replace, real_mkdir = os.replace, Path.mkdir
        if where == "tensor-write":
            monkeypatch.setattr(store_mod, "_write_file_bytes", _enospc)
        elif where == "manifest-replace":
            monkeypatch.setattr(os, "replace", lambda s, d: _enospc() if Path(d).name == "manifest.json"
                                else real_replace(s, d))
        elif where == "current-replace":  # the new generation is complete; only the pointer switch fails
            monkeypatch.setattr(os, "replace", lambda s, d: _enospc() if Path(d).name == "CURRENT"
                                else real_replace(s, d))
        elif where == "rename":
            monkeypatch.setattr(os, "rename", _enospc)
        else:
            monkeypatch.setattr(Path, "mkdir", lambda self, *a, **k: _enospc() if ".tmp-" in self.name
                                else real_mkdir(self, *a, **k))
        with pytest.raises(StateError) as err:
            commit_n(state, 2)
        msg = str(err.value)
        assert msg == (f"could not save state to {state.path}: No space left on device; free space and rerun — "
                       "the previous state is unchanged")
        assert listing(state.path) == before
        monkeypatch.undo()
        assert assert_consistent(StateStore(state.path)) == 1
        assert commit_n(state, 2) == "v0002"  # the lock is still held and usable
    assert assert_consistent(StateStore(state.path)) == 2


def test_permission_denied_message(state, monkeypatch):
    with state.lock():
        commit_n(state, 1)
        monkeypatch.setattr(store_mod, "_write_file_bytes", _raiser(OSError(errno.EACCES, "Permission denied")))
        with pytest.raises(StateError, match="Permission denied; make the folder writable and rerun — the previous"):
            commit_n(state, 2)
    assert assert_consistent(StateStore(state.path)) == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory(state):
    with state.lock():
        commit_n(state, 1)
        state.path.chmod(0o555)
        try:
            with pytest.raises(StateError, match="could not save state .* the previous state is unchanged"):
                commit_n(state, 2)
        finally:
            state.path.chmod(0o755)
    assert assert_consistent(StateStore(state.path)) == 1


def test_interrupt_during_commit_leaves_previous_state(state, monkeypatch):
    with state.lock():
        commit_n(state, 1)
        monkeypatch.setattr(store_mod, "_write_file_bytes", _raiser(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            commit_n(state, 2)
        assert listing(state.path) == [".lock", "CURRENT", "v0001"]


# -- locking ---------------------------------------------------------------------------------------
def test_lock_in_one_process(state):
    with state.lock():
        with state.lock():  # re-entrant for the same store
            pass
        with pytest.raises(StateError, match=rf"already locked by this process \(pid {os.getpid()}\)"):
            with StateStore(state.path).lock():
                pass
    with StateStore(state.path).lock():
        pass


def test_lock_held_by_another_process_then_killed(state):
    proc = spawn(state.path, "hold")
    try:
        wait_locked(proc)
        t0 = time.monotonic()
        with pytest.raises(StateError) as err:
            with state.lock():
                pass
        assert time.monotonic() - t0 < 1.0  # refused at once, not after waiting
        assert str(err.value) == (f"{state.path} is in use by another conceptstream process (pid {proc.pid}); "
                                  "wait for it to finish")
    finally:
        proc.kill()
        proc.wait()
    with state.lock():  # a dead holder never blocks
        commit_n(state, 1)


# -- real crashes ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("point", "survivor", "leftover"), [
    ("tmp-created", 1, "tmp"),
    ("tensor-written", 1, "tmp"),          # a tensor file's bytes are written but not fsynced
    ("manifest-written", 1, "tmp"),
    ("generation-written", 1, "v0002"),    # complete new generation, CURRENT not yet switched
    ("current-switched", 2, "v0001"),      # switched; the old generation was not yet deleted
])
def test_sigkill_at_each_point_of_a_commit(state, point, survivor, leftover):
    with state.lock():
        commit_n(state, 1)
    proc = spawn(state.path, "once", crash_at=point)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err
    names = listing(state.path)
    if leftover == "tmp":
        assert any(".tmp-" in n for n in names), names
    else:
        assert leftover in names
    reader = StateStore(state.path)
    assert assert_consistent(reader) == survivor
    assert listing(state.path) == names  # readers never clean up
    with state.lock():  # the next writer does
        assert listing(state.path) == [".lock", "CURRENT", f"v{survivor:04d}"]
        commit_n(state, survivor + 1)
    assert assert_consistent(StateStore(state.path)) == survivor + 1
    assert len([n for n in listing(state.path) if n.startswith("v")]) == 1


def test_sigkill_during_the_first_commit(state):
    proc = spawn(state.path, "once", crash_at="generation-written")
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert "v0001" in listing(state.path) and not state.exists()
    with pytest.raises(StateError, match="not a conceptstream state"):
        StateStore(state.path).read_manifest()
    with state.lock():
        assert listing(state.path) == [".lock"]
        commit_n(state, 1)
    assert assert_consistent(StateStore(state.path)) == 1


def test_sigkill_at_random_moments_of_a_commit_loop(state):
    rng = random.Random(1234)
    seen = 0
    for _ in range(5):
        proc = spawn(state.path, "loop")
        wait_locked(proc)
        time.sleep(rng.uniform(0.0, 0.4))
        proc.kill()
        out, _ = proc.communicate(timeout=60)
        printed = [int(x) for x in out.split()]
        last_printed = printed[-1] if printed else seen
        if not state.exists():
            assert not printed
            continue
        names = listing(state.path)
        n = assert_consistent(StateStore(state.path))
        assert listing(state.path) == names  # readers never clean up
        assert n >= seen and n in (last_printed, last_printed + 1), (n, last_printed, seen)
        seen = n
    with state.lock():
        commit_n(state, seen + 1)
        assert listing(state.path) == [".lock", "CURRENT", StateStore(state.path).generation()]
    assert assert_consistent(StateStore(state.path)) == seen + 1


# -- in-task checkpoint ----------------------------------------------------------------------------
def test_checkpoint_round_trip_clear_and_stale(state):
    assert state.load_checkpoint() is None
    with state.lock():
        commit_n(state, 1)
        state.save_checkpoint({"adapter": {"w": torch.ones(3)}, "optimizer": {"0.exp_avg": torch.zeros(3)}},
                              {"step": 40, "token": "<c1>"})
        state.save_checkpoint({"adapter": {"w": torch.full((3,), 2.0)}}, {"step": 80, "token": "<c1>"})
        tensors, info = StateStore(state.path).load_checkpoint()
        assert info == {"step": 80, "token": "<c1>"}
        assert list(tensors) == ["adapter"] and torch.equal(tensors["adapter"]["w"], torch.full((3,), 2.0))
        assert len(list((state.path / "checkpoint").iterdir())) == 2  # the older files were removed
        state.clear_checkpoint()
        assert state.load_checkpoint() is None and not (state.path / "checkpoint").exists()
        state.save_checkpoint({"adapter": {"w": torch.ones(3)}}, {"step": 1})
        commit_n(state, 2)  # the task ended: its checkpoint is gone
        assert state.load_checkpoint() is None
    with pytest.raises(StateError, match="needs the state's lock"):
        state.save_checkpoint({}, {})


def test_checkpoint_from_an_older_generation_is_stale(state):
    with state.lock():
        commit_n(state, 1)
        state.save_checkpoint({"adapter": {"w": torch.ones(3)}}, {"step": 1})
        record = (state.path / "checkpoint" / "checkpoint.json").read_text()
        commit_n(state, 2)
        (state.path / "checkpoint").mkdir()
        (state.path / "checkpoint" / "checkpoint.json").write_text(record)  # as if a crash kept it
        assert state.load_checkpoint() is None


def test_checkpoint_disk_full_keeps_previous_checkpoint(state, monkeypatch):
    with state.lock():
        state.save_checkpoint({"adapter": {"w": torch.ones(3)}}, {"step": 1})
        monkeypatch.setattr(store_mod, "_write_file_bytes", _enospc)
        with pytest.raises(StateError, match="No space left on device; free space and rerun"):
            state.save_checkpoint({"adapter": {"w": torch.zeros(3)}}, {"step": 2})
        monkeypatch.undo()
        tensors, info = state.load_checkpoint()
    assert info == {"step": 1} and torch.equal(tensors["adapter"]["w"], torch.ones(3))


def test_sigkill_while_saving_a_checkpoint(state):
    with state.lock():
        commit_n(state, 1)
        state.save_checkpoint({"adapter": {"w": torch.full((4,), 1.0)}}, {"step": 1})
    proc = spawn(state.path, "checkpoint", crash_at="checkpoint-files-written")
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    tensors, info = StateStore(state.path).load_checkpoint()
    assert info == {"step": 1} and torch.equal(tensors["adapter"]["w"], torch.full((4,), 1.0))
    assert assert_consistent(StateStore(state.path)) == 1
