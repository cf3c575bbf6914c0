"""docs/DEFAULTS.md is the record of every default; it must say what the code does."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from conceptstream.methods.registry import get_method, method_names

DEFAULTS_DOC = Path(__file__).resolve().parents[1] / "docs" / "DEFAULTS.md"


def documented_rows() -> dict[str, list[str]]:
    """``{setting: [default as written, ...]}`` from the first table's rows whose first cell names settings in
    backticks (``DC `temperature` (`dc_temperature`)`` names ``dc_temperature``); ``lr`` has one row per
    method family, so a setting may have several."""
    out: dict[str, list[str]] = {}
    table = DEFAULTS_DOC.read_text().split("\n\n| setting |", 1)[1].split("\n\n", 1)[0]
    for row in table.splitlines()[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        names = re.findall(r"`(\w+)`", cells[0].split("(")[-1] if "(`" in cells[0] else cells[0])
        values = [v.strip() for v in cells[1].split(",")]
        if names and len(names) == len(values):
            for name, value in zip(names, values):
                out.setdefault(name, []).append(value)
    return out


def documented_defaults() -> dict[str, float]:
    """``{setting: value}`` of the numeric settings with one row."""
    out: dict[str, float] = {}
    for name, values in documented_rows().items():
        if name != "lr":  # lr has one row per method family
            try:
                out[name] = float(values[0])
            except ValueError:  # a choice such as the DC reduction ("mean"), not a number
                continue
    return out


def same_value(written: str, default) -> bool:
    if isinstance(default, bool):
        return written.lower() == str(default).lower()
    if isinstance(default, (int, float)):
        try:
            return float(written) == pytest.approx(float(default))
        except ValueError:
            return False
    return written == str(default)


def heading_anchors() -> set[str]:
    """GitHub's anchors of the file's headings."""
    headings = re.findall(r"^#+ (.+)$", DEFAULTS_DOC.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def every_config() -> list[type]:
    from conceptstream.scoring.dc import DCConfig

    configs = [DCConfig]
    for name in method_names():
        configs += [c for c in get_method(name).configs if c not in configs]
    return configs


def test_documented_defaults_match_the_code():
    documented = documented_defaults()
    assert {"ewc_lambda", "clora_lambda", "dsc_iters", "dc_k", "dc_delta", "dc_temperature"} <= set(documented)
    checked = set()
    for name in method_names():
        for key, value in get_method(name).all_defaults().items():
            if key in documented and isinstance(value, (int, float)) and not isinstance(value, bool):
                assert float(value) == pytest.approx(documented[key]), (name, key)
                checked.add(key)
    from conceptstream.scoring.dc import DCConfig

    checked |= {f.name for f in dataclasses.fields(DCConfig)} & set(documented)
    assert checked == set(documented)  # no documented setting is missing from the code


@pytest.mark.parametrize("config", every_config(), ids=lambda c: c.__name__)
def test_every_config_field_has_a_row_with_its_default(config):
    rows = documented_rows()
    anchors = heading_anchors()
    for f in dataclasses.fields(config):
        name = "dc_temperature" if (config.__name__, f.name) == ("DCConfig", "temperature") else f.name
        assert name in rows, f"{config.__name__}.{f.name} has no row in docs/DEFAULTS.md"
        assert any(same_value(v, f.default) for v in rows[name]), (config.__name__, f.name, f.default, rows[name])
        doc = f.metadata["doc"]
        assert doc.startswith("docs/DEFAULTS.md#") and doc.split("#", 1)[1] in anchors, (config.__name__, f.name, doc)


def test_every_learning_rate_a_method_can_get_is_documented():
    from conceptstream.adapters.registry import ADAPTERS

    rates = set()
    for name in method_names():
        cls = get_method(name)
        rates.add(cls.all_defaults()["lr"])
        rates |= set(cls.adapter_lr.values())
        if cls.uses_adapter:
            rates |= {ADAPTERS[kind].default_lr for kind in (cls.adapter_kinds or ADAPTERS)}
    for rate in rates:
        assert any(same_value(v, rate) for v in documented_rows()["lr"]), rate
