"""The crash-safe concept-stream state directory.

A user's state is built one concept at a time over months, so losing or half-writing it is not
acceptable. Layout::

    STATE/
      CURRENT            name of the live generation, e.g. "v0003" (replaced atomically)
      v0003/             manifest.json + *.safetensors of that generation
      .lock              flock lock file holding the writer's pid (a dead holder never blocks)
      checkpoint/        optional in-task checkpoint: checkpoint.json + the tensor files it names

A commit writes a complete new generation under a temporary name (every file fsynced), renames it
into place, and only then switches ``CURRENT``; the previous generation is deleted afterwards.
Readers only follow ``CURRENT``, so a crash at any point leaves the previous state readable and
unchanged. Leftovers of a crashed writer are removed by the next writer holding the lock, never by
readers. Only safetensors files are ever loaded: pickle files can run code when loaded.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as _safetensors_bytes

from conceptstream.errors import StateError
from conceptstream.safeio import atomic_path, fsync_dir, write_text_atomic
from conceptstream.state.manifest import read_manifest_file, validate_manifest
from conceptstream.system import utc_now

CURRENT = "CURRENT"
LOCK = ".lock"
MANIFEST = "manifest.json"
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_JSON = "checkpoint.json"
SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

_GEN_RE = re.compile(r"^v(\d{4,})$")
_TMP_RE = re.compile(r"^v(\d{4,})\.tmp-[0-9a-f]+$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")

# Test hook: a process with this variable set SIGKILLs itself at the named point of a write, so the
# crash-safety tests can kill a writer at exactly the worst moments (see tests/state/test_store.py).
CRASH_ENV = "CONCEPTSTREAM_TEST_CRASH_AT"
CRASH_POINTS = ("tmp-created", "tensor-written", "manifest-written", "generation-written", "current-switched",
                "checkpoint-files-written")


def _crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _file_name(name: str) -> str:
    """``"adapter"`` or ``"adapter.safetensors"`` -> ``"adapter.safetensors"``; refuse anything else."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in (MANIFEST, CHECKPOINT_JSON):
        raise StateError(f"invalid state file name {name!r}: use letters, digits, '_', '-' or '.' "
                         "(e.g. 'adapter')")
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise StateError(f"{name} is a pickle file; conceptstream never loads or writes pickle files "
                         "(loading one can run arbitrary code) — use safetensors")
    return name if name.endswith(SUFFIX) else name + SUFFIX


def _write_file_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to an already-created file (a seam the ENOSPC tests patch)."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _check_tensors(tensors: Any, what: str) -> None:
    """Refuse a malformed tensor file before anything is written."""
    if not isinstance(tensors, dict):
        raise StateError(f"{what}: expected a dict of name -> tensor, got {type(tensors).__name__}")
    for key, value in tensors.items():
        if not isinstance(key, str) or not torch.is_tensor(value):
            raise StateError(f"{what}: entry {key!r} is not a tensor ({type(value).__name__})")


def _tensor_bytes(tensors: dict[str, torch.Tensor], what: str) -> bytes:
    """Serialise in memory first, so a full disk surfaces as a plain OSError from the file write."""
    _check_tensors(tensors, what)
    clean: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in tensors.items():
        t = value.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:  # safetensors refuses tensors sharing memory; store a copy instead
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        clean[key] = t
    try:
        return _safetensors_bytes(clean)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise StateError(f"{what}: cannot be stored as safetensors: {exc}") from None


def _load_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise StateError(f"{path} is damaged (not a readable safetensors file: {exc}); "
                         "restore the state from a backup") from None


def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _save_hint(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free space and rerun"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "make the folder writable and rerun"
    return "fix the problem and rerun"


class StateStore:
    """One state directory. Reads need no lock; every write requires :meth:`lock`.

    Reads are pinned: :meth:`read_manifest` follows ``CURRENT`` and remembers that generation, and
    later :meth:`load_tensors` / :meth:`files` / :meth:`generation` use the same one, so a commit by
    another process between two calls can never hand back a mix of two generations (if the pinned
    generation was deleted meanwhile, the read fails with a "changed while reading" StateError).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None
        self._lock_depth = 0
        self._pinned: str | None = None

    def __repr__(self) -> str:
        return f"StateStore({str(self.path)!r})"

    # -- reading ---------------------------------------------------------------------------------
    def exists(self) -> bool:
        """True once a first commit has completed (``CURRENT`` exists)."""
        return (self.path / CURRENT).is_file()

    def _read_current(self) -> str | None:
        """The generation ``CURRENT`` names, None when there is no ``CURRENT`` yet."""
        pointer = self.path / CURRENT
        try:
            text = pointer.read_text(encoding="utf-8", errors="replace").strip()
        except FileNotFoundError:
            return None
        except IsADirectoryError:
            text = "<a directory>"
        except OSError as exc:
            raise StateError(f"could not read {pointer}: {exc.strerror or exc}") from None
        if not _GEN_RE.match(text):
            raise StateError(f"{pointer} is damaged (it should name a generation such as 'v0003', found "
                             f"{text[:40]!r}); restore the state from a backup")
        if not (self.path / text / MANIFEST).is_file():
            raise StateError(f"{pointer} names {text}, but {self.path / text / MANIFEST} is missing; the state is "
                             "damaged — restore it from a backup")
        return text

    def _resolve(self, refresh: bool = False) -> str:
        if refresh or self._pinned is None:
            gen = self._read_current()
            if gen is None:
                raise StateError(f"{self.path} is not a conceptstream state (no {CURRENT} file); "
                                 "create one with `conceptstream learn`")
            self._pinned = gen
        return self._pinned

    def _gen_dir(self, refresh: bool = False) -> Path:
        gen = self._resolve(refresh)
        gen_dir = self.path / gen
        if not gen_dir.is_dir():
            self._pinned = None
            raise StateError(f"{self.path} changed while it was being read (another process committed a new "
                             "version); rerun")
        return gen_dir

    def _refuse_pickles(self) -> None:
        for root, _dirs, names in os.walk(self.path):
            for name in names:
                if name.lower().endswith(PICKLE_SUFFIXES):
                    raise StateError(f"{Path(root) / name} is a pickle file; conceptstream never loads pickle files "
                                     "(loading one can run arbitrary code) — remove it from the state")

    def read_manifest(self) -> dict:
        """Follow ``CURRENT`` afresh, pin that generation and return its validated manifest."""
        self._refuse_pickles()
        for _attempt in range(3):  # a concurrent commit may delete the generation we just resolved
            try:
                gen_dir = self._gen_dir(refresh=True)
            except StateError:
                if _attempt == 2:
                    raise
                continue
            try:
                return read_manifest_file(gen_dir / MANIFEST)
            except StateError:
                if gen_dir.is_dir() or _attempt == 2:
                    raise
        raise StateError(f"{self.path} kept changing while being read; rerun")

    def generation(self) -> str:
        """Name of the (pinned) current generation, e.g. ``"v0003"``."""
        return self._resolve()

    def has_file(self, name: str) -> bool:
        return (self._gen_dir() / _file_name(name)).is_file()

    def files(self) -> list[Path]:
        """The files of the current generation: manifest.json and its tensor files."""
        gen_dir = self._gen_dir()
        return sorted(p for p in gen_dir.iterdir() if p.is_file())

    def size_bytes(self) -> int:
        """Bytes used by the current generation (what the personalised model costs on disk)."""
        return sum(p.stat().st_size for p in self.files())

    def load_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Load the tensor file ``name`` (``"adapter"`` or ``"adapter.safetensors"``) of the current generation."""
        file_name = _file_name(name)
        self._refuse_pickles()
        gen_dir = self._gen_dir()
        path = gen_dir / file_name
        try:
            return _load_tensor_file(path)
        except FileNotFoundError:
            if not gen_dir.is_dir():
                self._pinned = None
                raise StateError(f"{self.path} changed while it was being read (another process committed a "
                                 "new version); rerun") from None
            raise StateError(f"{self.path} ({gen_dir.name}) has no {file_name}") from None

    # -- locking ---------------------------------------------------------------------------------
    def _check_usable_dir(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise StateError(f"{self.path} is a file, not a state folder; choose a folder path")
        if not self.path.is_dir() or self.exists():
            return
        ours = {CURRENT, LOCK, CHECKPOINT_DIR}
        foreign = [p.name for p in self.path.iterdir()
                   if p.name not in ours and not _GEN_RE.match(p.name) and not _TMP_RE.match(p.name)
                   and not (p.name.startswith(f".{CURRENT}.") and p.name.endswith(".tmp"))]
        if foreign:
            raise StateError(f"{self.path} is not empty and is not a conceptstream state (it holds {foreign[0]!r}); "
                             "choose a new or empty folder")

    @contextmanager
    def lock(self) -> Iterator[StateStore]:
        """Hold the state's exclusive writer lock; fail at once if another live process holds it."""
        if self._lock_fd is not None:  # re-entrant within one StateStore
            self._lock_depth += 1
            try:
                yield self
            finally:
                self._lock_depth -= 1
            return
        self._check_usable_dir()
        created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            if created:
                fsync_dir(self.path.parent)
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StateError(f"could not create {self.path / LOCK}: {exc.strerror or exc}; "
                             f"{_save_hint(exc)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = self._holder_pid(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StateError(f"could not lock {self.path}: {exc.strerror or exc}") from None
            who = f"pid {holder}" if holder else "pid unknown"
            if holder == os.getpid():
                raise StateError(f"{self.path} is already locked by this process ({who}); "
                                 "use one StateStore per state") from None
            raise StateError(f"{self.path} is in use by another conceptstream process ({who}); "
                             "wait for it to finish") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the pid is only for the error message; the flock is what matters
        self._lock_fd = fd
        self._lock_depth = 1
        try:
            self._cleanup()
            self._check_not_orphaned(self._current_or_none())
            yield self
        finally:
            self._lock_fd = None
            self._lock_depth = 0
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @staticmethod
    def _holder_pid(fd: int) -> int | None:
        try:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            return int(text) if text.isdigit() else None
        except OSError:
            return None

    def _current_or_none(self) -> str | None:
        try:
            return self._read_current()
        except StateError:
            return "<damaged>"  # reported by the read that needs it

    def _require_lock(self, what: str) -> None:
        if self._lock_fd is None:
            raise StateError(f"{what} on {self.path} needs the state's lock (use `with store.lock():`)")

    # -- cleanup (writer only) -------------------------------------------------------------------
    def _cleanup(self) -> None:
        """Remove what crashed writers left behind. Never touches the generation ``CURRENT`` names.

        When ``CURRENT`` is missing the only complete generation that can be a leftover is the
        first one (v0001) of a first commit that crashed before switching the pointer; anything
        else means ``CURRENT`` was lost, and then nothing is deleted.
        """
        if not self.path.is_dir():
            return
        live = self._current_or_none()  # "<damaged>": keep every generation; only temporary files go
        entries = list(self.path.iterdir())
        gens = [p for p in entries if _GEN_RE.match(p.name) and p.is_dir()]
        for p in entries:
            if _TMP_RE.match(p.name) or (p.name.startswith(f".{CURRENT}.") and p.name.endswith(".tmp")):
                _remove_tree(p)
        if live is None:
            if [p.name for p in gens] == ["v0001"] or all(not (p / MANIFEST).is_file() for p in gens):
                for p in gens:
                    _remove_tree(p)
            return
        if live == "<damaged>":
            return
        for p in gens:
            if p.name != live:
                _remove_tree(p)
        fsync_dir(self.path)

    def _next_generation(self, live: str | None) -> str:
        if live is None:
            return "v0001"  # see _cleanup: with no CURRENT, numbering starts over
        matches = (_GEN_RE.match(p.name) or _TMP_RE.match(p.name) for p in self.path.iterdir())
        numbers = [int(m.group(1)) for m in matches if m]
        return f"v{max(numbers, default=0) + 1:04d}"

    # -- committing ------------------------------------------------------------------------------
    def commit(self, manifest: dict, tensors: dict[str, dict[str, torch.Tensor]], keep: Iterable[str] = ()) -> str:
        """Write a new generation (manifest + tensor files + ``keep`` files carried over) and switch to it.

        Returns the new generation's name. On any failure the previous state is left exactly as it was.
        Committing ends the task, so an in-task checkpoint is removed afterwards.
        """
        self._require_lock("commit")
        validate_manifest(manifest)
        try:
            manifest_text = json.dumps(manifest, indent=2) + "\n"
        except (TypeError, ValueError) as exc:
            raise StateError(f"the manifest cannot be saved as JSON: {exc}") from None
        files = {_file_name(name): value for name, value in tensors.items()}
        kept = [_file_name(name) for name in keep]
        if len(files) != len(tensors) or len(set(kept)) != len(kept):
            raise StateError("the same state file is named twice (e.g. 'adapter' and 'adapter.safetensors')")
        both = set(files) & set(kept)
        if both:
            raise StateError(f"{sorted(both)[0]} is both given and kept; give it or keep it, not both")
        for name, value in files.items():
            _check_tensors(value, name)

        self._cleanup()
        live = self._read_current()
        self._check_not_orphaned(live)
        if kept:
            if live is None:
                raise StateError(f"cannot keep {kept[0]}: {self.path} has no committed generation yet")
            missing = [k for k in kept if not (self.path / live / k).is_file()]
            if missing:
                raise StateError(f"cannot keep {missing[0]}: the current generation ({live}) has no such file")
        gen = self._next_generation(live)
        tmp_dir = self.path / f"{gen}.tmp-{secrets.token_hex(4)}"
        gen_dir = self.path / gen
        renamed = False
        try:
            tmp_dir.mkdir()
            _crash_point("tmp-created")
            for name, value in files.items():
                data = _tensor_bytes(value, name)  # one file's bytes in memory at a time
                with atomic_path(tmp_dir / name) as tmp:
                    _write_file_bytes(tmp, data)
                    _crash_point("tensor-written")  # bytes written, not yet fsynced nor renamed
                del data
            for name in kept:
                self._carry_over(self.path / str(live) / name, tmp_dir / name)
            write_text_atomic(tmp_dir / MANIFEST, manifest_text)
            _crash_point("manifest-written")
            fsync_dir(tmp_dir)
            os.rename(tmp_dir, gen_dir)
            renamed = True
            fsync_dir(self.path)
            _crash_point("generation-written")
            write_text_atomic(self.path / CURRENT, gen + "\n")
        except BaseException as exc:
            if not self._pointer_is(gen):
                _remove_tree(tmp_dir)
                if renamed:
                    _remove_tree(gen_dir)
                if isinstance(exc, OSError):
                    reason = exc.strerror or str(exc)
                    raise StateError(f"could not save state to {self.path}: {reason}; {_save_hint(exc)} — "
                                     "the previous state is unchanged") from exc
                raise
            if not isinstance(exc, OSError):  # e.g. Ctrl-C after the switch: the commit did happen
                self._pinned = gen
                raise
        _crash_point("current-switched")
        self._pinned = gen
        try:
            self._cleanup()
            self._clear_checkpoint_files()
        except OSError:
            pass  # the commit is durable; leftovers are removed by the next writer
        return gen

    def _check_not_orphaned(self, live: str | None) -> None:
        """With no CURRENT, complete generations mean the pointer was lost: refuse rather than guess."""
        if live is not None or not self.path.is_dir():
            return
        gens = sorted(p.name for p in self.path.iterdir() if _GEN_RE.match(p.name) and (p / MANIFEST).is_file())
        if gens:
            raise StateError(f"{self.path} holds generation(s) {', '.join(gens)} but no {CURRENT} file; the state is "
                             f"damaged — if {gens[-1]} is the state you want, write '{gens[-1]}' into "
                             f"{self.path / CURRENT}, otherwise move the folder away")

    def _pointer_is(self, gen: str) -> bool:
        try:
            return (self.path / CURRENT).read_text().strip() == gen
        except OSError:
            return False

    @staticmethod
    def _carry_over(src: Path, dst: Path) -> None:
        """Hard-link an unchanged file into the new generation (files are never modified in place)."""
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
            _fsync_file(dst)

    # -- in-task checkpoint ----------------------------------------------------------------------
    @property
    def _checkpoint_dir(self) -> Path:
        return self.path / CHECKPOINT_DIR

    def save_checkpoint(self, tensors: dict[str, dict[str, torch.Tensor]], info: dict[str, Any]) -> None:
        """Atomically replace the in-task checkpoint (used by ``learn --resume``).

        New tensor files get fresh names, ``checkpoint.json`` (replaced atomically) names them, and
        only then are the old files deleted, so a crash leaves the old or the new checkpoint whole.
        """
        self._require_lock("save_checkpoint")
        if not isinstance(info, dict):
            raise StateError(f"checkpoint info must be a dict, got {type(info).__name__}")
        files = {_file_name(name): value for name, value in tensors.items()}
        if len(files) != len(tensors):
            raise StateError("the same checkpoint file is named twice (e.g. 'adapter' and 'adapter.safetensors')")
        for name, value in files.items():
            _check_tensors(value, name)
        live = self._read_current()
        token = secrets.token_hex(4)
        names = {name[: -len(SUFFIX)]: f"{name[: -len(SUFFIX)]}.{token}{SUFFIX}" for name in files}
        try:
            record = json.dumps({"format_version": 1, "generation": live, "saved_at": utc_now(),
                                 "files": names, "info": info}, indent=2) + "\n"
        except (TypeError, ValueError) as exc:
            raise StateError(f"checkpoint info cannot be saved as JSON: {exc}") from None
        ck = self._checkpoint_dir
        written: list[Path] = []
        try:
            ck.mkdir(exist_ok=True)
            for name, value in files.items():
                data = _tensor_bytes(value, name)
                target = ck / names[name[: -len(SUFFIX)]]
                written.append(target)
                with atomic_path(target) as tmp:
                    _write_file_bytes(tmp, data)
                del data
            _crash_point("checkpoint-files-written")
            write_text_atomic(ck / CHECKPOINT_JSON, record)
        except BaseException as exc:
            try:
                switched = (ck / CHECKPOINT_JSON).read_text(encoding="utf-8") == record
            except (OSError, UnicodeDecodeError):
                switched = False
            if switched:  # interrupted after the record was replaced: the new checkpoint stands
                raise
            for p in written:
                _remove_tree(p)
            if isinstance(exc, OSError):
                raise StateError(f"could not save a checkpoint to {ck}: {exc.strerror or exc}; {_save_hint(exc)} — "
                                 "the previous checkpoint and the state are unchanged") from exc
            raise
        keep = set(names.values()) | {CHECKPOINT_JSON}
        for p in ck.iterdir():
            if p.name not in keep:
                _remove_tree(p)

    def load_checkpoint(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]] | None:
        """The in-task checkpoint as ``(tensors by file name, info)``, or None if there is none.

        A checkpoint saved on top of a generation that is no longer current is stale (its task was
        committed, or the state changed since) and is reported as None.
        """
        record_path = self._checkpoint_dir / CHECKPOINT_JSON
        self._refuse_pickles()
        for _attempt in range(3):  # a concurrent save may replace the files under us; reread then
            try:
                text = record_path.read_text(encoding="utf-8")
            except FileNotFoundError:
                return None
            except (OSError, UnicodeDecodeError) as exc:
                raise StateError(f"could not read {record_path}: {exc}; delete {self._checkpoint_dir} "
                                 "to start the task over") from None
            try:
                record = json.loads(text)
                files, info, gen = record["files"], record["info"], record["generation"]
                if not isinstance(files, dict) or not isinstance(info, dict):
                    raise TypeError("files/info must be objects")
            except (ValueError, KeyError, TypeError) as exc:
                raise StateError(f"{record_path} is damaged ({exc}); delete {self._checkpoint_dir} "
                                 "to start the task over") from None
            if gen != self._read_current():
                return None
            try:
                tensors = {name: _load_tensor_file(self._checkpoint_dir / _file_name(str(file_name)))
                           for name, file_name in files.items()}
            except FileNotFoundError:
                continue
            return tensors, info
        raise StateError(f"{self._checkpoint_dir} kept changing while being read; rerun")

    def clear_checkpoint(self) -> None:
        """Delete the in-task checkpoint (the record first, so a crash never leaves half of one)."""
        self._require_lock("clear_checkpoint")
        self._clear_checkpoint_files()

    def _clear_checkpoint_files(self) -> None:
        ck = self._checkpoint_dir
        if not ck.exists():
            return
        try:
            (ck / CHECKPOINT_JSON).unlink()
            fsync_dir(ck)
        except FileNotFoundError:
            pass
        _remove_tree(ck)
        fsync_dir(self.path)
