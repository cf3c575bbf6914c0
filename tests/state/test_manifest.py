"""Manifest validation: every bad manifest is one StateError line; valid ones round-trip unchanged."""

from __future__ import annotations

import copy
import datetime
import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conceptstream.errors import StateError
from conceptstream.state import FORMAT_VERSION, StateStore, read_manifest_file, validate_manifest


def valid_manifest() -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "base_model": {"reference": "tiny", "fingerprint": "0123abcd"},
        "method": {"name": "ewc-dc", "adapter": {"kind": "lora", "rank": 4, "targets": "cross-kv"},
                   "hyperparameters": {"lambda": 0.5}, "state_growth": "constant"},
        "concepts": [{"token": "<my-dog>", "noun": "dog", "task_index": 0, "created_at": "2024-05-01T12:00:00+00:00",
                      "steps": 200, "seed": 0, "images": 5}],
        "created_at": "2024-05-01T11:00:00+00:00",
        "updated_at": "2024-05-01T12:00:00+00:00",
        "versions": {"conceptstream": "0.1.0", "torch": "2.13.0"},
        "future_field": {"kept": [1, 2, 3]},
    }


def test_valid_manifest_is_returned_unchanged_with_extra_fields():
    m = valid_manifest()
    expected = copy.deepcopy(m)
    assert validate_manifest(m) == expected
    m["method"]["adapter"] = None
    validate_manifest(m)
    m["method"]["adapter"] = "lora"  # the brief's str form is accepted as well as the engine's object form
    validate_manifest(m)
    m["concepts"][0]["created_at"] = "2024-05-01T12:00:00Z"
    del m["concepts"][0]["steps"], m["concepts"][0]["seed"]
    validate_manifest(m)


def _set(m: dict, path: tuple, value) -> dict:
    target = m
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return m


def _drop(m: dict, path: tuple) -> dict:
    target = m
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return m


@pytest.mark.parametrize("obj", [[], "manifest", 3, None, 1.5, True])
def test_not_an_object(obj):
    with pytest.raises(StateError, match="expected a JSON object"):
        validate_manifest(obj)


@pytest.mark.parametrize("path", [
    ("format_version",), ("base_model",), ("base_model", "reference"), ("base_model", "fingerprint"), ("method",),
    ("method", "name"), ("method", "adapter"), ("method", "hyperparameters"), ("concepts",),
    ("concepts", 0, "token"), ("concepts", 0, "noun"), ("concepts", 0, "task_index"), ("concepts", 0, "created_at"),
    ("created_at",), ("updated_at",), ("versions",),
])
def test_missing_required_field(path):
    m = _drop(valid_manifest(), path)
    with pytest.raises(StateError, match="required field .* is missing") as err:
        validate_manifest(m)
    assert "\n" not in str(err.value)
    assert str(path[-1]) in str(err.value)


@pytest.mark.parametrize(("path", "value"), [
    (("format_version",), "1"), (("format_version",), 1.0), (("format_version",), True), (("format_version",), 0),
    (("base_model",), "tiny"), (("base_model", "reference"), 3), (("base_model", "fingerprint"), None),
    (("method",), []), (("method", "name"), 1), (("method", "adapter"), 4), (("method", "adapter"), [1]),
    (("method", "hyperparameters"), None), (("concepts",), {}), (("concepts", 0), "<my-dog>"),
    (("concepts", 0, "token"), 1), (("concepts", 0, "noun"), []), (("concepts", 0, "task_index"), "0"),
    (("concepts", 0, "task_index"), -1), (("concepts", 0, "task_index"), False),
    (("concepts", 0, "created_at"), 5), (("concepts", 0, "created_at"), "yesterday"),
    (("concepts", 0, "steps"), 2.5), (("concepts", 0, "seed"), "0"), (("created_at",), 0), (("updated_at",), None),
    (("versions",), []), (("versions", "torch"), 2),
])
def test_wrong_type(path, value):
    m = _set(valid_manifest(), path, value)
    with pytest.raises(StateError, match="invalid manifest") as err:
        validate_manifest(m)
    assert "\n" not in str(err.value)


def test_newer_format_asks_to_upgrade():
    m = _set(valid_manifest(), ("format_version",), FORMAT_VERSION + 1)
    with pytest.raises(StateError, match=rf"newer conceptstream \(format {FORMAT_VERSION + 1}\); upgrade"):
        validate_manifest(m)


def test_read_manifest_file_reports_invalid_json_with_position(tmp_path):
    p = tmp_path / "manifest.json"
    p.write_text('{\n  "format_version": 1,\n  "base_model": \n')
    with pytest.raises(StateError, match=r"is not valid JSON \(line 4 col 1\): .*restore it or start a new state"):
        read_manifest_file(p)
    p.write_bytes(b"\xff\xfe{}")
    with pytest.raises(StateError, match="is not valid JSON"):
        read_manifest_file(p)
    with pytest.raises(StateError, match="is missing"):
        read_manifest_file(tmp_path / "nope.json")
    p.write_text(json.dumps({"format_version": 99}))
    with pytest.raises(StateError, match=rf"{p}: state was written by a newer conceptstream \(format 99\)"):
        read_manifest_file(p)
    p.write_text(json.dumps(valid_manifest()))
    assert read_manifest_file(p) == valid_manifest()


# -- properties -------------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)

_PATHS = [("format_version",), ("base_model",), ("base_model", "reference"), ("method",), ("method", "adapter"),
          ("method", "hyperparameters"), ("concepts",), ("concepts", 0), ("concepts", 0, "token"),
          ("concepts", 0, "task_index"), ("concepts", 0, "created_at"), ("concepts", 0, "steps"),
          ("versions",), ("versions", "torch"), ("updated_at",)]


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_arbitrary_json_only_ever_raises_state_error(value):
    try:
        out = validate_manifest(value)
    except StateError as exc:
        assert "\n" not in str(exc)
    else:
        assert out is value


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(_PATHS), json_values)
def test_mutated_manifests_only_ever_raise_state_error(path, value):
    # Arbitrary values at the fields that matter reach the deeper checks too.
    m = _set(valid_manifest(), path, value)
    try:
        validate_manifest(m)
    except StateError as exc:
        assert "\n" not in str(exc)


iso_times = st.datetimes(timezones=st.just(datetime.timezone.utc)).map(
    lambda d: d.isoformat(timespec="seconds"))
concepts = st.fixed_dictionaries(
    {"token": st.text(max_size=12), "noun": st.text(max_size=12), "task_index": st.integers(0, 10**6),
     "created_at": iso_times},
    optional={"steps": st.integers(0, 10**6), "seed": st.integers(-(2**63), 2**63 - 1), "extra": json_values},
)
manifests = st.fixed_dictionaries({
    "format_version": st.integers(1, FORMAT_VERSION),
    "base_model": st.fixed_dictionaries({"reference": st.text(max_size=20), "fingerprint": st.text(max_size=20)}),
    "method": st.fixed_dictionaries({
        "name": st.text(max_size=12),
        "adapter": st.none() | st.text(max_size=8) | st.dictionaries(st.text(max_size=6), json_values, max_size=3),
        "hyperparameters": st.dictionaries(st.text(max_size=8), json_values, max_size=4)}),
    "concepts": st.lists(concepts, max_size=4),
    "created_at": st.text(max_size=30),
    "updated_at": st.text(max_size=30),
    "versions": st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=4),
}, optional={"notes": json_values})


@settings(max_examples=200, deadline=None)
@given(manifests)
def test_valid_manifests_round_trip_through_json(m):
    assert validate_manifest(m) == m
    assert validate_manifest(json.loads(json.dumps(m))) == m


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(manifests)
def test_valid_manifests_round_trip_through_the_store(m):
    with tempfile.TemporaryDirectory() as tmp:
        store = StateStore(Path(tmp) / "state")
        with store.lock():
            store.commit(m, {"tokens": {"t": torch.ones(2)}})
        assert StateStore(store.path).read_manifest() == m
