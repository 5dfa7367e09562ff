"""Readable command output: short rich tables for people, ``--json`` for machines.

Every command that reports results prints them with :func:`print_results` (one row per
result, the most telling values only) or, with ``--json``, the complete results as one
JSON document on standard output (never cut).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["add_json_option", "console", "format_value", "print_json", "print_results"]


def add_json_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--json`` (complete results as JSON instead of a table)."""
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the complete results as JSON (for scripts) instead of a table",
    )


def console() -> Any:
    """A rich console writing to the current ``sys.stdout``; wide when not a terminal."""
    from rich.console import Console

    width = None if sys.stdout.isatty() else 160
    return Console(file=sys.stdout, width=width, no_color="NO_COLOR" in os.environ)


def format_value(value: Any) -> str:
    """A short text for one table cell (numbers to 4-5 significant digits)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.5g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={format_value(v)}" for k, v in value.items())
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        if len(value) > 6:
            return f"[{len(value)} values]"
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return str(value)


def print_json(value: Any) -> None:
    """Print ``value`` as indented JSON (paths and other objects as strings)."""
    print(json.dumps(value, default=str, indent=2, sort_keys=True))


def print_results(
    rows: Iterable[Mapping[str, Any]],
    columns: Sequence[tuple[str, str]],
    *,
    title: str | None = None,
) -> None:
    """Print ``rows`` as a table of ``columns`` (``(key, heading)`` pairs).

    Missing keys print as ``-``.
    """
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    for _, heading in columns:
        table.add_column(heading, overflow="fold")
    for row in rows:
        table.add_row(*(format_value(row.get(key)) for key, _ in columns))
    console().print(table)
