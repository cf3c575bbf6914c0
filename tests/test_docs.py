"""docs/DEFAULTS.md is the record of every default; it must say what the code does."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conceptstream.methods.registry import get_method, method_names

DEFAULTS_DOC = Path(__file__).resolve().parents[1] / "docs" / "DEFAULTS.md"


def documented_defaults() -> dict[str, float]:
    """``{setting: value}`` from the first table's rows whose first cell names settings in backticks."""
    out: dict[str, float] = {}
    table = DEFAULTS_DOC.read_text().split("\n\n| setting |", 1)[1].split("\n\n", 1)[0]
    for row in table.splitlines()[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        names = re.findall(r"`(\w+)`", cells[0].split("(")[-1] if "(`" in cells[0] else cells[0])
        values = [v.strip() for v in cells[1].split(",")]
        if names and len(names) == len(values) and names[0] != "lr":  # lr has one row per method family
            for name, value in zip(names, values):
                try:
                    out[name] = float(value)
                except ValueError:  # a choice such as the DC reduction ("mean"), not a number
                    continue
    return out


def test_documented_defaults_match_the_code():
    documented = documented_defaults()
    assert {"ewc_lambda", "clora_lambda", "dsc_iters", "dc_k", "dc_delta", "dc_temperature"} <= set(documented)
    checked = set()
    for name in method_names():
        for key, value in get_method(name).all_defaults().items():
            if key in documented and isinstance(value, (int, float)) and not isinstance(value, bool):
                assert float(value) == pytest.approx(documented[key]), (name, key)
                checked.add(key)
    assert checked == set(documented)  # no documented setting is missing from every method
