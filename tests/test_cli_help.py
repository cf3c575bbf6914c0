"""The CLI's own surface: every flag of every command explains itself in ``--help``."""

from __future__ import annotations

import argparse

from conceptstream.cli import build_parser


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """``(command path, action)`` for every action of ``parser`` and of all its sub-commands."""
    for action in parser._actions:
        yield path, action
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, (*path, name))


def _missing_help() -> dict[tuple[str, ...], list[str]]:
    missing: dict[tuple[str, ...], list[str]] = {}
    for path, action in _walk(build_parser()):
        if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
            name = "/".join(action.option_strings) or action.dest
            missing.setdefault(path, []).append(name)
    return missing


def test_every_flag_of_every_command_has_help():
    missing = {" ".join(path) or "conceptstream": names for path, names in _missing_help().items()}
    assert not missing, f"flags without help=: {missing}"


def test_the_walk_sees_every_command():
    commands = {path for path, _ in _walk(build_parser())}
    assert {("learn",), ("generate",), ("info",), ("export",), ("demo",), ("bench",), ("bench-speed",),
            ("world",), ("world", "list"), ("world", "export"), ("world", "export-classes"),
            ("world", "train-base")} <= commands


def test_learn_help_lists_the_registered_adapters(capsys):
    from conceptstream.adapters.registry import adapter_kinds

    parser = build_parser()
    learn = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["learn"]
    text = learn.format_help()
    assert all(kind in text for kind in adapter_kinds())
    assert parser.parse_args(["learn", "s", "--images", "x", "--adapter", "vera"]).adapter == "vera"


def test_the_steps_help_states_every_method_s_own_budget():
    from conceptstream.cli import STEPS_DEFAULT_HELP
    from conceptstream.methods.config import DEFAULT_STEPS
    from conceptstream.methods.registry import default_steps, method_names

    assert f"the method's own, {DEFAULT_STEPS};" in STEPS_DEFAULT_HELP
    for name in method_names():
        if default_steps(name) != DEFAULT_STEPS:
            assert f"{name} {default_steps(name)}" in STEPS_DEFAULT_HELP, name
    steps = [action.help for path, action in _walk(build_parser()) if "--steps" in action.option_strings
             and path in {("learn",), ("demo",)}]
    assert len(steps) == 2 and all(STEPS_DEFAULT_HELP in h for h in steps)
