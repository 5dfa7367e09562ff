"""Import and sum sub-commands: ``import-scans`` and ``sum-scans``.

::

    nxrefine-bs import-scans -x EXPERIMENT --sample S --label L --configuration NAME
                             [--scan SCAN ...] [--spec-file FILE] [--overwrite]
    nxrefine-bs sum-scans SCAN_FILE SCAN_FILE... --output-scan NAME [--overwrite]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from ..errors import NXRefineBSError
from ..experiment import Experiment

__all__ = ["register"]

logger = logging.getLogger(__name__)


def _import_scans(args: argparse.Namespace) -> int:
    from ..beamlines import get_beamline

    experiment = Experiment.open(args.experiment)
    name = experiment.beamline_name
    if not name:
        raise NXRefineBSError(
            f"{experiment.settings_file}: [instrument] instrument is not set; set it to an "
            "importing beamline such as QM2 with 'nxrefine-bs settings edit'"
        )
    beamline = get_beamline(name)()
    if not beamline.import_data_enabled:
        raise NXRefineBSError(
            f"beamline {beamline.name!r} of {experiment.directory} does not import data; "
            "its scans are written directly into the analysis tree"
        )
    kwargs: dict[str, Any] = {"overwrite": args.overwrite, "progress": not args.no_progress}
    if args.scan:
        kwargs["scans"] = args.scan
    if args.spec_file is not None:
        kwargs["spec_file"] = args.spec_file
    written = beamline.import_data(
        experiment, args.configuration, args.sample, args.label, **kwargs
    )
    for path in written:
        print(path)
    return 0


def _sum_scans(args: argparse.Namespace) -> int:
    from ..nexus.sumscans import sum_scans

    path = sum_scans(
        args.scan_files,
        args.output_scan,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(path)
    return 0


def register(subparsers: Any) -> None:
    """Add ``import-scans`` and ``sum-scans`` to the ``nxrefine-bs`` parser."""
    p = subparsers.add_parser(
        "import-scans",
        help="create scan files from a beamline's raw tree (QM2)",
        description="Walk <raw_home>/<experiment>/<raw_path>/<sample>/<label>/<scan>/"
        "<sample>_NNN/ image directories, stack the images of each rotation into "
        "<scan>/fN.h5 and write <sample>_<scan>.nxs with the SPEC logs (monitors, phi, "
        "chi, theta, temperature, start time).  The raw tree is never changed.",
    )
    p.add_argument(
        "-x",
        "--experiment",
        type=Path,
        default=Path("."),
        metavar="DIR",
        help="experiment directory (default: the current directory)",
    )
    p.add_argument("--sample", required=True, help="sample name")
    p.add_argument("--label", required=True, help="label (crystal) name")
    p.add_argument(
        "-c",
        "--configuration",
        required=True,
        metavar="NAME",
        help="configuration name in configurations/ (or a path to a .nxs file)",
    )
    p.add_argument(
        "--scan",
        action="append",
        metavar="SCAN",
        help="import only this raw scan directory (repeatable; default: all)",
    )
    p.add_argument(
        "--spec-file",
        type=Path,
        metavar="FILE",
        help="SPEC file (default: <raw_home>/<experiment>/<sample>)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace existing scan files and stacks"
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_import_scans)

    p = subparsers.add_parser(
        "sum-scans",
        help="sum repeated scans into a new scan",
        description="Add the frames and monitors of scans taken under identical conditions "
        "(same entries, frames, phi, angles, wavelength and distance) into a new scan "
        "<sample>_<output-scan>.nxs beside the first one.  Gap pixels (-1) stay -1.",
    )
    p.add_argument("scan_files", nargs="+", type=Path, metavar="SCAN", help="scan files to sum")
    p.add_argument(
        "-o",
        "--output-scan",
        required=True,
        metavar="NAME",
        help="name of the summed scan, e.g. 300K_sum",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing summed scan")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_sum_scans)
