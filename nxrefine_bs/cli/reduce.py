"""``nxrefine-bs`` reduction sub-commands: one per step, plus ``reduce`` for several.

Every command runs the step functions of :mod:`nxrefine_bs.reduce.steps` directly in
this process (use ``nxrefine-bs queue`` to hand work to the workflow executors).
Options left unset come from the settings layers (scan file, parent, experiment,
server).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from ..errors import NXRefineBSError
from ..reduce.steps import STEP_ORDER, get_step, run_step, step_entries

logger = logging.getLogger(__name__)

__all__ = ["register"]


def _scan_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"scan file {text} does not exist")
    return path


def _common(p: argparse.ArgumentParser, *, per_entry: bool = True) -> None:
    p.add_argument("scan_files", nargs="+", type=_scan_file, metavar="SCAN_FILE")
    if per_entry:
        p.add_argument("-e", "--entries", nargs="+", help="rotation entries (default: all)")
    p.add_argument("-o", "--overwrite", action="store_true", help="redo if already done")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _frames(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--first", type=int, help="first frame used")
    p.add_argument("-l", "--last", type=int, help="last frame used")


def _run(args: argparse.Namespace, steps: list[str], params: dict[str, Any]) -> int:
    params = {k: v for k, v in params.items() if v is not None}
    for scan_file in args.scan_files:
        for name in steps:
            for entry in step_entries(name, scan_file, getattr(args, "entries", None)):
                summary = run_step(
                    name,
                    scan_file,
                    entry,
                    overwrite=args.overwrite,
                    progress=not args.no_progress,
                    **params,
                )
                text = json.dumps(summary, default=str, sort_keys=True)
                print(f"{scan_file.name}:{entry} {name}: {text[:300]}")
    return 0


def _grid(text: str) -> tuple[float, float, float]:
    try:
        lo, step, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,STEP,MAX, got {text!r}") from None
    return lo, step, hi


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the reduction sub-commands."""
    p = subparsers.add_parser(
        "reduce", help="run several reduction steps", description="Run reduction steps in order."
    )
    _common(p)
    p.add_argument(
        "-s",
        "--steps",
        default=",".join(STEP_ORDER),
        help=f"comma-separated steps (default: {','.join(STEP_ORDER)})",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="explicit step parameter, e.g. threshold=500 (repeatable)",
    )
    p.set_defaults(func=_cmd_reduce)

    p = subparsers.add_parser("max", help="find maximum: frame sums, radial sum, transmission")
    _common(p)
    _frames(p)
    p.add_argument("--qmin", type=float, help="inner radius of the transmission annulus (1/A)")
    p.add_argument("--qmax", type=float, help="outer radius of the transmission annulus (1/A)")
    p.set_defaults(func=lambda a: _run(a, ["max"], _pick(a, "first", "last", "qmin", "qmax")))

    p = subparsers.add_parser("find", help="3-D Bragg peak search")
    _common(p)
    _frames(p)
    p.add_argument("-t", "--threshold", type=float, help="peak threshold (counts)")
    p.add_argument("-P", "--min-pixels", type=int, help="minimum peak size")
    p.set_defaults(
        func=lambda a: _run(a, ["find"], _pick(a, "first", "last", "threshold", "min_pixels"))
    )

    p = subparsers.add_parser("refine", help="index and refine orientation, lattice, geometry")
    _common(p)
    p.add_argument("-p", "--polar-max", type=float, help="largest 2-theta used (deg)")
    p.add_argument("-T", "--hkl-tolerance", type=float, help="indexing tolerance")
    p.set_defaults(func=lambda a: _run(a, ["refine"], _pick(a, "polar_max", "hkl_tolerance")))

    p = subparsers.add_parser("prepare", help="3-D mask of Bragg-peak artefacts")
    _common(p)
    _frames(p)
    for name in ("t1", "h1", "t2", "h2"):
        p.add_argument(f"--{name}", type=float if name[0] == "t" else int)
    p.set_defaults(
        func=lambda a: _run(a, ["prepare"], _pick(a, "first", "last", "t1", "h1", "t2", "h2"))
    )

    p = subparsers.add_parser("transform", help="transform rotations to (H, K, L)")
    _common(p)
    _frames(p)
    for axis in ("qh", "qk", "ql"):
        p.add_argument(f"--{axis}", type=_grid, metavar="MIN,STEP,MAX")
    p.add_argument("-M", "--mask", action="store_true", help="apply the 3-D mask")
    p.set_defaults(
        func=lambda a: _run(a, ["transform"], _pick(a, "first", "last", "qh", "qk", "ql", "mask"))
    )

    p = subparsers.add_parser("combine", help="merge the rotations' transforms")
    _common(p, per_entry=False)
    p.add_argument("-M", "--mask", action="store_true", help="combine the masked transforms")
    p.set_defaults(func=lambda a: _run(a, ["combine"], _pick(a, "mask")))

    p = subparsers.add_parser("plot-slice", help="PNG of a slice through a transform")
    p.add_argument("transform_file", type=Path, help="transform.nxs or fN_transform.nxs")
    p.add_argument("--axis", choices=("h", "k", "l"), default="l")
    p.add_argument("--value", type=float, default=0.0, help="r.l.u. of the slice")
    p.add_argument("--png", type=Path, required=True, help="output PNG")
    p.set_defaults(func=_cmd_plot_slice)


def _pick(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    return {n: getattr(args, n, None) for n in names}


def _cmd_reduce(args: argparse.Namespace) -> int:
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    for name in steps:
        get_step(name)
    params: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise NXRefineBSError(f"--set expects NAME=VALUE, got {item!r}")
        params[key.strip()] = _number(value.strip())
    return _run(args, steps, params)


def _number(text: str) -> Any:
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def _cmd_plot_slice(args: argparse.Namespace) -> int:
    from ..reduce.transform import plot_slice

    if not args.transform_file.is_file():
        raise NXRefineBSError(f"transform file {args.transform_file} does not exist")
    out = plot_slice(args.transform_file, axis=args.axis, value=args.value, png=args.png)
    print(f"wrote {out or args.png}")
    return 0
