"""The state manifest: what a concept-stream state holds, checked before anything trusts it.

A manifest is plain JSON written by conceptstream, but a user's state lives for months and may
be edited, truncated by a bad disk or written by a newer release. Every problem is reported as
one :class:`StateError` line that names the field, so nothing downstream meets a ``KeyError``.
Unknown extra fields are allowed and preserved (newer minor releases may add some).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

from conceptstream.errors import StateError

FORMAT_VERSION = 1

_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
               bool: "true/false", type(None): "null"}


def _kind(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _is_int(value: Any) -> bool:
    # JSON true/false load as bool, which is an int subclass; they are never a valid count.
    return isinstance(value, int) and not isinstance(value, bool)


def _bad(where: str, expected: str, value: Any) -> StateError:
    return StateError(f"invalid manifest: {where} must be {expected} (got {_kind(value)}); "
                      "restore the state from a backup or start a new state")


def _field(obj: dict, key: str, where: str) -> Any:
    if key not in obj:
        return _missing(f"{where}.{key}" if where else key)
    return obj[key]


def _missing(where: str) -> Any:
    raise StateError(f"invalid manifest: required field {where!r} is missing; "
                     "restore the state from a backup or start a new state")


def _check_str(obj: dict, key: str, where: str = "") -> str:
    value = _field(obj, key, where)
    if not isinstance(value, str):
        raise _bad(f"{where}.{key}" if where else key, "a string", value)
    return value


def _check_int(obj: dict, key: str, where: str = "", minimum: int | None = None) -> int:
    value = _field(obj, key, where)
    if not _is_int(value):
        raise _bad(f"{where}.{key}" if where else key, "an integer", value)
    if minimum is not None and value < minimum:
        raise _bad(f"{where}.{key}" if where else key, f"an integer >= {minimum}", value)
    return value


def _check_obj(obj: dict, key: str, where: str = "") -> dict:
    value = _field(obj, key, where)
    if not isinstance(value, dict):
        raise _bad(f"{where}.{key}" if where else key, "an object", value)
    return value


def _check_iso_time(obj: dict, key: str, where: str) -> None:
    text = _check_str(obj, key, where)
    try:
        # Python 3.10's fromisoformat does not accept a trailing "Z".
        _dt.datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    except ValueError:
        raise StateError(f"invalid manifest: {where}.{key} must be an ISO time such as "
                         f"'2024-05-01T12:00:00+00:00' (got {text[:40]!r}); restore the state from a backup "
                         "or start a new state") from None


def validate_manifest(obj: Any) -> dict:
    """Check ``obj`` is a manifest this release can use and return it unchanged (extra fields kept)."""
    if not isinstance(obj, dict):
        raise StateError(f"invalid manifest: expected a JSON object, got {_kind(obj)}; "
                         "restore the state from a backup or start a new state")
    version = _check_int(obj, "format_version", minimum=1)
    if version > FORMAT_VERSION:
        raise StateError(f"state was written by a newer conceptstream (format {version}); upgrade conceptstream")

    base = _check_obj(obj, "base_model")
    _check_str(base, "reference", "base_model")
    _check_str(base, "fingerprint", "base_model")

    method = _check_obj(obj, "method")
    _check_str(method, "name", "method")
    adapter = _field(method, "adapter", "method")
    # The brief's schema says str|null; the engine records the adapter spec as an object, so both are valid.
    if adapter is not None and not isinstance(adapter, (str, dict)):
        raise _bad("method.adapter", "a string, an object or null", adapter)
    _check_obj(method, "hyperparameters", "method")

    concepts = _field(obj, "concepts", "")
    if not isinstance(concepts, list):
        raise _bad("concepts", "a list", concepts)
    for i, concept in enumerate(concepts):
        where = f"concepts[{i}]"
        if not isinstance(concept, dict):
            raise _bad(where, "an object", concept)
        _check_str(concept, "token", where)
        _check_str(concept, "noun", where)
        _check_int(concept, "task_index", where, minimum=0)
        _check_iso_time(concept, "created_at", where)
        for optional in ("steps", "seed"):
            if optional in concept and not _is_int(concept[optional]):
                raise _bad(f"{where}.{optional}", "an integer", concept[optional])

    _check_str(obj, "created_at")
    _check_str(obj, "updated_at")
    versions = _check_obj(obj, "versions")
    for key, value in versions.items():
        if not isinstance(value, str):
            raise _bad(f"versions[{key!r}]", "a string", value)
    return obj


def read_manifest_file(path: str | os.PathLike) -> dict:
    """Read and validate a manifest file; every failure is one StateError line naming ``path``."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise StateError(f"{path} is missing; the state is damaged — restore it from a backup "
                         "or start a new state") from None
    except UnicodeDecodeError as exc:
        raise StateError(f"{path} is not valid JSON (byte {exc.start} is not UTF-8); "
                         "restore it or start a new state") from None
    except OSError as exc:
        raise StateError(f"could not read {path}: {exc.strerror or exc}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StateError(f"{path} is not valid JSON (line {exc.lineno} col {exc.colno}): {exc.msg}; "
                         "restore it or start a new state") from None
    except RecursionError:
        raise StateError(f"{path} is not valid JSON (nested too deeply); restore it or start a new state") from None
    try:
        return validate_manifest(obj)
    except StateError as exc:
        raise StateError(f"{path}: {exc}") from None
