"""The ``nxrefine-bs`` command.

Each module named in :data:`COMMAND_MODULES` contributes sub-commands through a
``register(subparsers)`` function; every leaf parser sets ``func``, a callable
``func(args) -> int | None``.

Import policy of the command modules: at their top only what building the parser
needs (argument types, defaults, the step registry); the subsystems a command drives
(reduction steps, the workflow database, Tiled, pyFAI, matplotlib, 0MQ, the IOC, rich
tables) are imported inside its ``_cmd_*`` function, so that
``nxrefine-bs --help`` and every sub-command's ``--help`` stay fast
(``tests/test_package.py::test_light_imports``).

Errors raised on purpose (:class:`~nxrefine_bs.errors.NXRefineBSError`) and
operating-system errors on user paths are printed as a single line
``nxrefine-bs: error: <message>`` with exit status 2; anything else is an internal
error (exit status 1).  ``--debug`` prints the traceback as well.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from .. import __version__
from ..errors import NXRefineBSError

__all__ = ["COMMAND_MODULES", "PROG", "build_parser", "main"]

logger = logging.getLogger(__name__)

PROG = "nxrefine-bs"

COMMAND_MODULES: list[str] = [
    "nxrefine_bs.cli.setup",
    "nxrefine_bs.cli.acquire",
    "nxrefine_bs.cli.reduce",
    "nxrefine_bs.cli.workflow",
    "nxrefine_bs.cli.calibration",
    "nxrefine_bs.cli.importing",
    "nxrefine_bs.cli.service",
    "nxrefine_bs.cli.ioc",
]
"""Modules providing ``register(subparsers)``; add new sub-command modules here."""

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1


_NUMBER = r"(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
NEGATIVE_VALUE = re.compile(rf"^-{_NUMBER}(?:[,:]-?{_NUMBER})*$")
"""Arguments such as ``-90``, ``-90,0`` or ``-5,85,1``: values, never options."""


class ArgumentParser(argparse.ArgumentParser):
    """An argument parser for which a negative number or number list is a value.

    Plain argparse takes ``--position -90,0`` for two options (it only knows ``-90``
    and ``-0.5`` as negative numbers) and fails with "expected one argument".  Sub-command
    parsers are made with the same class.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_VALUE


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every sub-command of :data:`COMMAND_MODULES`."""
    parser = ArgumentParser(
        prog=PROG,
        description="Single-crystal diffuse scattering reduction (NXRefine workflow) "
        "inside the Bluesky ecosystem.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks and debug log messages"
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show informational log messages"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            logger.warning("sub-commands of %s are unavailable: %s", name, exc)
            continue
        module.register(subparsers)
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
        text = f"{text}: {exc.filename}"
    return text or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``nxrefine-bs`` with ``argv`` (default ``sys.argv[1:]``) and return the exit code.

    Examples
    --------
    >>> main(["--version"])  # doctest: +SKIP
    nxrefine-bs 0.1.0
    0
    """
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else EXIT_USER_ERROR)
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    package_logger = logging.getLogger("nxrefine_bs")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.setLevel(level)
    old_level = package_logger.level
    package_logger.addHandler(handler)
    package_logger.setLevel(min(level, old_level) if old_level else level)
    try:
        result = args.func(args)
    except (NXRefineBSError, OSError) as exc:
        if args.debug:
            traceback.print_exc()
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        print(
            f"{PROG}: internal error: {type(exc).__name__}: {_one_line(exc)} "
            "(run with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL_ERROR
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(old_level)
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
