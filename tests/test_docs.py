"""docs/DEFAULTS.md is the record of every default; it must say what the code does."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from conceptstream.methods.registry import get_method, method_names

DEFAULTS_DOC = Path(__file__).resolve().parents[1] / "docs" / "DEFAULTS.md"


def documented_rows() -> dict[str, list[tuple[str, str]]]:
    """``{setting: [(default as written, its methods cell), ...]}`` from the first table's rows whose first cell
    names settings in backticks (``DC `temperature` (`dc_temperature`)`` names ``dc_temperature``). A setting
    has several rows when some methods have their own default (``lr`` per adapter kind, a tuning winner)."""
    out: dict[str, list[tuple[str, str]]] = {}
    table = DEFAULTS_DOC.read_text().split("\n\n| setting |", 1)[1].split("\n\n", 1)[0]
    for row in table.splitlines()[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        names = re.findall(r"`(\w+)`", cells[0].split("(")[-1] if "(`" in cells[0] else cells[0])
        values = [v.strip() for v in cells[1].split(",")]
        if names and len(names) == len(values):
            for name, value in zip(names, values):
                out.setdefault(name, []).append((value, cells[2]))
    return out


def own_methods(cell: str) -> set[str]:
    """The methods a row is for when its methods cell is only a list of them in backticks (``"`lora`,
    `textual-inversion`"``): their own defaults. Empty for a general row ("all", "EWC methods except ...")."""
    head = cell.split("(")[0].strip()
    return set(re.findall(r"`([\w-]+)`", head)) if re.fullmatch(r"`[\w-]+`(\s*,\s*`[\w-]+`)*", head) else set()


def documented_default(name: str, method: str) -> str:
    """The default of ``name`` that the table gives ``method``: its own row, else the one general row."""
    rows = documented_rows()[name]
    own = [value for value, cell in rows if method in own_methods(cell)]
    general = [value for value, cell in rows if not own_methods(cell)]
    assert len(own) <= 1 and (own or len(general) == 1), (name, method, rows)
    return (own or general)[0]


def documented_numeric() -> set[str]:
    """The numeric settings of the table (``lr``, one row per adapter kind, is checked on its own)."""
    out = set()
    for name, rows in documented_rows().items():
        try:
            float(rows[0][0])
        except ValueError:  # a choice such as the DC reduction ("mean"), not a number
            continue
        if name != "lr":
            out.add(name)
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
    documented = documented_numeric()
    assert {"ewc_lambda", "clora_lambda", "dsc_iters", "dc_k", "dc_delta", "dc_temperature", "token_lr",
            "default_steps"} <= documented
    checked = set()
    for name in method_names():
        cls = get_method(name)
        for key, value in {**cls.all_defaults(), "default_steps": cls.default_steps}.items():
            if key in documented and isinstance(value, (int, float)) and not isinstance(value, bool):
                assert float(value) == pytest.approx(float(documented_default(key, name))), (name, key)
                checked.add(key)
    from conceptstream.scoring.dc import DCConfig

    for f in dataclasses.fields(DCConfig):
        key = "dc_temperature" if f.name == "temperature" else f.name
        if key in documented:
            assert float(f.default) == pytest.approx(float(documented_default(key, "DCConfig"))), key
            checked.add(key)
    assert checked == documented  # no documented setting is missing from the code


def test_a_method_s_own_lora_rate_has_its_own_row():
    from conceptstream.methods.registry import method_defaults

    for name in method_names():
        own = [value for value, cell in documented_rows()["lr"] if name in own_methods(cell)]
        if "lora" in get_method(name).adapter_lr:
            assert own and same_value(own[0], method_defaults(name, "lora")["lr"]), name
        else:
            assert not own, name


@pytest.mark.parametrize("config", every_config(), ids=lambda c: c.__name__)
def test_every_config_field_has_a_row_with_its_default(config):
    rows = documented_rows()
    anchors = heading_anchors()
    for f in dataclasses.fields(config):
        name = "dc_temperature" if (config.__name__, f.name) == ("DCConfig", "temperature") else f.name
        assert name in rows, f"{config.__name__}.{f.name} has no row in docs/DEFAULTS.md"
        assert any(same_value(v, f.default) for v, _ in rows[name]), (config.__name__, f.name, f.default, rows[name])
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
        assert any(same_value(v, rate) for v, _ in documented_rows()["lr"]), rate
