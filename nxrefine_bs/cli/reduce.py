"""``nxrefine-bs`` reduction sub-commands: one per step, plus ``reduce`` for several.

Every command runs the step functions of :mod:`nxrefine_bs.reduce.steps` directly in
this process (use ``nxrefine-bs queue`` to hand work to the workflow executors).
Options left unset come from the settings layers (scan file, parent, experiment,
server).
"""

from __future__ import annotations

import argparse
import functools
import logging
from pathlib import Path
from typing import Any

from ..errors import NXRefineBSError, ScanFileError
from ..nexus.h5tools import nx_group
from ..nexus.scanfile import update_scan_file
from ..reduce.parameters import Parameter, parameters_of, split_parameters
from ..reduce.steps import STEP_ORDER, get_step, run_step, step_entries
from .output import add_json_option, format_value, print_json, print_results

logger = logging.getLogger(__name__)

__all__ = ["register"]


def _check_scan_files(paths: list[Path]) -> None:
    """Raise a one-line :class:`ScanFileError` naming the first missing scan file."""
    for path in paths:
        if not path.is_file():
            raise ScanFileError(f"scan file {path} does not exist")


def _common(p: argparse.ArgumentParser, *, per_entry: bool = True) -> None:
    p.add_argument("scan_files", nargs="+", type=Path, metavar="SCAN_FILE")
    if per_entry:
        p.add_argument("-e", "--entries", nargs="+", help="rotation entries (default: all)")
    p.add_argument("-o", "--overwrite", action="store_true", help="redo if already done")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_json_option(p)


STEP_COLUMNS: dict[str, tuple[str, ...]] = {
    "max": ("maximum", "transmission_median", "first", "last"),
    "find": ("npeaks", "threshold", "first", "last"),
    "refine": ("n_peaks", "indexed_fraction", "cell", "rms_residual"),
    "prepare": ("masked_fraction", "frames"),
    "transform": ("grid", "frames", "file"),
    "combine": ("entries", "voxels_filled", "file"),
}
"""The summary values a table shows per step (``--json`` prints all of them)."""


def _result_text(name: str, summary: dict[str, Any]) -> str:
    """The telling values of one step's summary, for a table cell."""
    if summary.get("skipped") or summary.get("status") == "skipped":
        return "already done (--overwrite to redo)"
    keys = (
        STEP_COLUMNS.get(name)
        or tuple(k for k, v in summary.items() if isinstance(v, int | float | str))[:4]
    )
    parts = []
    for key in keys:
        if key in summary:
            value = summary[key]
            if key == "file":
                value = Path(str(value)).name
            elif key == "grid" and isinstance(value, list):
                value = " ".join(f"{a:g}:{b:g}:{c:g}" for a, b, c in value)
            parts.append(f"{key}={format_value(value)}")
    return ", ".join(parts)


def _run(args: argparse.Namespace, steps: list[str], params: dict[str, Any]) -> int:
    _check_scan_files(args.scan_files)
    params = {k: v for k, v in params.items() if v is not None}
    per_step = split_parameters(steps, params)
    results: list[dict[str, Any]] = []
    for scan_file in args.scan_files:
        for name in steps:
            for entry in step_entries(name, scan_file, getattr(args, "entries", None)):
                summary = run_step(
                    name,
                    scan_file,
                    entry,
                    overwrite=args.overwrite,
                    progress=not args.no_progress,
                    **per_step[name],
                )
                results.append(
                    {"scan_file": str(scan_file), "entry": entry, "step": name, **summary}
                )
    if getattr(args, "json", False):
        print_json(results)
        return 0
    rows = [
        {
            "scan": Path(r["scan_file"]).name,
            "entry": r["entry"],
            "step": r["step"],
            "result": _result_text(r["step"], r),
        }
        for r in results
    ]
    columns = [("scan", "scan"), ("entry", "entry"), ("step", "step"), ("result", "result")]
    print_results(rows, columns)
    return 0


STEP_HELP: dict[str, str] = {
    "max": "find maximum: frame sums, radial sum, transmission",
    "find": "3-D Bragg peak search",
    "refine": "index and refine orientation, lattice, geometry",
    "prepare": "3-D mask of Bragg-peak artefacts",
    "transform": "transform rotations to (H, K, L)",
    "combine": "merge the rotations' transforms",
    "pdf": "3D-ΔPDF: Laue-symmetrise, taper, punch-and-fill, FFT",
}


def _option_type(param: Parameter) -> Any:
    """An argparse ``type`` converting text with the parameter model's parser."""

    def convert(text: str) -> Any:
        try:
            return param.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = param.kind  # argparse names the type in its error message
    return convert


def add_parameter_options(p: argparse.ArgumentParser, step: str) -> None:
    """One option per parameter of ``step``'s model (unset options stay None)."""
    for param in parameters_of(step):
        if not param.cli:
            continue
        names = [*param.flags, param.option]
        if "_" in param.name:  # NXRefine's spelling, e.g. --polar_max
            names.append("--" + param.name)
        help_text = param.doc + (f" [settings: {param.setting}]" if param.setting else "")
        if param.kind == "bool":
            p.add_argument(
                *names, dest=param.name, action=argparse.BooleanOptionalAction, help=help_text
            )
            continue
        metavar = {"grid": "MIN,STEP,MAX", "names": "A,B,..."}.get(param.kind)
        if param.kind == "grid":
            help_text += f"; write {param.option}=-4,0.02,4 when MIN is negative"
        p.add_argument(
            *names, dest=param.name, type=_option_type(param), metavar=metavar, help=help_text
        )


def _cmd_step(name: str, args: argparse.Namespace) -> int:
    params = {p.name: getattr(args, p.name, None) for p in parameters_of(name) if p.cli}
    return _run(args, [name], params)


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
        help="step parameter NAME=VALUE (or STEP.NAME=VALUE for one step), e.g. "
        "threshold=500; repeatable; an unknown name is an error",
    )
    p.set_defaults(func=_cmd_reduce)

    for name in STEP_ORDER:
        step = get_step(name)
        p = subparsers.add_parser(
            name, help=STEP_HELP.get(name, name), description=STEP_HELP.get(name, name)
        )
        _common(p, per_entry=step.per_entry)
        add_parameter_options(p, name)
        p.set_defaults(func=functools.partial(_cmd_step, name))

    p = subparsers.add_parser(
        "lattice",
        help="define the lattice (space group and unit cell) of scans",
        description="Define lattice: validate a space group and unit cell (or read them from "
        "a CIF file) and store them in entry/sample of each scan file, as NXRefine does.",
    )
    p.add_argument("scan_files", nargs="+", type=Path, metavar="SCAN_FILE")
    p.add_argument("-g", "--space-group", help="H-M symbol or number, e.g. 'Fm-3m' or 225")
    p.add_argument(
        "-c",
        "--cell",
        metavar="a[,b,c,alpha,beta,gamma]",
        help="the free cell parameters of the crystal system in order (cubic: a; tetragonal "
        "and hexagonal: a,c; ...) or all six (Angstrom, degrees)",
    )
    p.add_argument("--cif", type=Path, metavar="FILE", help="read cell and space group from a CIF")
    p.set_defaults(func=_cmd_lattice)

    p = subparsers.add_parser("plot-slice", help="PNG of a slice through a transform")
    p.add_argument("transform_file", type=Path, help="transform.nxs or fN_transform.nxs")
    p.add_argument(
        "--axis",
        choices=("h", "k", "l"),
        default="l",
        help="axis held fixed (default l: an HK plane)",
    )
    p.add_argument(
        "--value",
        type=float,
        default=0.0,
        help="value of that axis in r.l.u. (default 0; the nearest grid plane is drawn)",
    )
    p.add_argument("--png", type=Path, required=True, help="output PNG")
    p.set_defaults(func=_cmd_plot_slice)


def _cmd_reduce(args: argparse.Namespace) -> int:
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    for name in steps:
        get_step(name)
    params: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise NXRefineBSError(f"--set expects NAME=VALUE, got {item!r}")
        step, dot, name = key.strip().partition(".")
        if dot:  # STEP.NAME=VALUE: for that step only
            params.setdefault(step, {})[name] = value.strip()
        else:
            params[key.strip()] = value.strip()
    split_parameters(steps, params)  # a misspelled name fails before any work
    return _run(args, steps, params)


def parse_lattice(
    space_group: str | None = None, cell: str | None = None, cif: Path | None = None
) -> Any:
    """The :class:`~nxrefine_bs.reduce.lattice.Lattice` given on the command line.

    Parameters
    ----------
    space_group : str, optional
        H-M symbol or International Tables number.
    cell : str, optional
        Comma-separated cell: the free parameters of the crystal system in order, or all
        six ``a,b,c,alpha,beta,gamma``.
    cif : Path, optional
        A CIF file giving both (exclusive with ``space_group`` and ``cell``).

    Raises
    ------
    NXRefineBSError
        On a missing or contradictory option, an unknown space group or an inconsistent
        cell (:class:`~nxrefine_bs.reduce.lattice.LatticeError`).
    """
    from ..reduce.lattice import CELL_NAMES, Lattice, LatticeError

    if cif is not None:
        if space_group or cell:
            raise NXRefineBSError("give either --cif or --space-group with --cell, not both")
        if not cif.is_file():
            raise NXRefineBSError(f"CIF file {cif} does not exist")
        return Lattice.from_cif(cif)
    if not (space_group and cell):
        raise NXRefineBSError("give --space-group and --cell, or --cif")
    try:
        values = [float(v) for v in cell.split(",") if v.strip()]
    except ValueError:
        raise NXRefineBSError(f"--cell expects comma-separated numbers, got {cell!r}") from None
    # The free parameters of the crystal system (this also rejects an unknown group).
    probe = Lattice.from_space_group(space_group, 1.0, 1.0, 1.0, 90.0, 90.0, 90.0)
    free = probe.free_parameters
    if len(values) == 6:
        a, b, c, alpha, beta, gamma = values
        return Lattice(a, b, c, alpha, beta, gamma, space_group=space_group)
    if len(values) != len(free):
        raise LatticeError(
            f"--cell {cell!r}: space group {probe.space_group!r} needs {','.join(free)} "
            f"(or all six of {','.join(CELL_NAMES)}), got {len(values)} value(s)"
        )
    return Lattice.from_space_group(space_group, **dict(zip(free, values, strict=True)))


def _cmd_lattice(args: argparse.Namespace) -> int:
    from ..reduce.lattice import write_lattice

    _check_scan_files(args.scan_files)
    lattice = parse_lattice(args.space_group, args.cell, args.cif)
    for scan_file in args.scan_files:
        with update_scan_file(scan_file) as f:
            if "entry" not in f:
                raise ScanFileError(f"{scan_file} has no /entry; is it a scan file?")
            write_lattice(nx_group(f["entry"], "sample", "NXsample"), lattice)
        print(f"{scan_file}: {lattice}")
    return 0


def _cmd_plot_slice(args: argparse.Namespace) -> int:
    from ..plots import plot_slice

    if not args.transform_file.is_file():
        raise NXRefineBSError(f"transform file {args.transform_file} does not exist")
    out = plot_slice(args.transform_file, axis=args.axis, value=args.value, png=args.png)
    print(f"wrote {out or args.png}")
    return 0
