"""The ``nxrefine-bs`` parser as the CLI reference shows it (sphinx-argparse reads it).

:func:`build_documented_parser` is :func:`nxrefine_bs.cli.build_parser` with the
defaults that argparse cannot know written into each option's help, so that the reference
gives every option its default:

* options of the reduction steps default to the settings layers: the help gets the
  built-in default of the parameter (``reference_tables.parameter_default``) and its
  units;
* ``configuration new`` options default to the experiment's ``[nxrefine]`` settings: the
  help gets that setting's built-in default;
* any other option without a default is marked "required" or "not set", unless its
  help already says what it defaults to.

sphinx-argparse prints ``Default: ...`` itself for options that have a default, so those
are left alone.
"""

from __future__ import annotations

import argparse
from typing import Any

from reference_tables import parameter_default, units_of

CONFIGURATION_SETTINGS = {
    "wavelength": "wavelength",
    "distance": "distance",
    "orientation": "detector_orientation",
    "phi_start": "phi",
    "phi_end": "phi_end",
    "phi_step": "phi_step",
    "frame_rate": "frame_rate",
}
"""``configuration new`` option dest -> ``[nxrefine]`` key it defaults to."""


def _text(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _subparsers(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):  # noqa: ANN202
    """``(command words, parser)`` of every parser under ``parser``, itself included."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subparsers(sub, (*prefix, name))


def needs_default(action: argparse.Action) -> bool:
    """True for an option whose default sphinx-argparse would not print."""
    return (
        bool(action.option_strings)
        and (action.nargs != 0 or isinstance(action, argparse.BooleanOptionalAction))
        and action.default in (None, argparse.SUPPRESS)
        and not isinstance(action, argparse._HelpAction | argparse._VersionAction)
    )


def default_note(command: tuple[str, ...], action: argparse.Action) -> str:
    """The sentence appended to ``action``'s help in the reference."""
    from nxrefine_bs.reduce.parameters import STEP_PARAMETERS
    from nxrefine_bs.settings_schema import SCHEMA, get_spec

    step = command[0] if len(command) == 1 else None
    if step in STEP_PARAMETERS:
        params = {p.name: p for p in STEP_PARAMETERS[step]}
        if action.dest in params:
            param = params[action.dest]
            default, source = parameter_default(step, param)
            units = units_of(param.doc, param.kind)
            where = f" from {source.strip('`')}" if source.startswith("`") else ""
            tail = f"; units: {units}" if units != "—" else ""
            return f"Default: {_text(default)}{where}{tail}".rstrip(".") + "."
    if command == ("configuration", "new"):
        if action.dest in CONFIGURATION_SETTINGS:
            spec = get_spec("nxrefine", CONFIGURATION_SETTINGS[action.dest])
            return f"Default: {_text(spec.default)} (setting nxrefine.{spec.key})."
        if action.dest == "position":
            keys = ("chi", "omega", "theta", "x", "y")
            values = {s.key: s.default for s in SCHEMA if s.section == "nxrefine"}
            shown = ",".join(_text(values[k]) for k in keys)
            return f"Default: one entry at {shown} (settings nxrefine.chi ... nxrefine.y)."
    if action.required:
        return "Required."
    if "default" in (action.help or "").lower():
        return ""
    return "Default: not set."


def build_documented_parser() -> argparse.ArgumentParser:
    """:func:`nxrefine_bs.cli.build_parser` with every option's default in its help."""
    from nxrefine_bs.cli import build_parser

    parser = build_parser()
    for command, sub in _subparsers(parser):
        for action in sub._actions:
            if needs_default(action) and action.help is not argparse.SUPPRESS:
                note = default_note(command, action)
                action.help = f"{action.help or ''} {note}".strip()
    return parser
