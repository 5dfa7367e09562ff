"""Calibration sub-commands: ``calibrate`` (powder calibration) and ``mask`` (pixel masks).

::

    nxrefine-bs calibrate IMAGE TARGET [--calibrant CeO2] [--entries f1,f2]
                          [--detector NAME] [--wavelength A] [--distance MM]
                          [--beam-center X Y] [--yaw D] [--pitch D] [--roll D] [--no-search]
                          [--refine-wavelength] [--max-rings N] [--search-size PX]
                          [--min-rings N] [--max-rms PX] [--poni-in FILE [--no-refine]]
                          [--poni-out FILE] [--plots DIR]
    nxrefine-bs mask add-rect TARGET X0 Y0 X1 Y1 [--entries ...] [--png FILE]
    nxrefine-bs mask add-circle TARGET XC YC R [--entries ...] [--png FILE]
    nxrefine-bs mask import TARGET IMAGE [--add] [--entries ...] [--png FILE]
    nxrefine-bs mask show TARGET [--entry f1] [--png FILE]

``TARGET`` is a configuration template or a scan file.  ``calibrate`` needs only the
calibrant, the wavelength and the detector (read from the first entry to be updated unless
given on the command line or by ``--poni-in``): the beam centre and distance are found in the
image.  The entry's distance, beam centre and tilts (or those given on the command line) are
tried as one more start after the ones found in the image, or as the only one with
``--no-search``.  A fit that uses too few rings or leaves too large an RMS residual is
refused: the command exits with status 2, names the numbers, and leaves ``TARGET`` (and
``--poni-out``) untouched.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import replace
from typing import Any

import h5py
import numpy as np

from ..errors import CalibrationError
from ..nexus.h5tools import read_field

__all__ = ["register", "cmd_calibrate", "cmd_mask"]

logger = logging.getLogger(__name__)


def _entries(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} names no entry (use e.g. f1,f2)")
    return names


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def _flatten(values: list[list[str]] | None) -> list[str] | None:
    if not values:
        return None
    out: list[str] = []
    for v in values:
        out.extend(v)
    return out


def _nominal_from_file(target: str, entries: list[str] | None) -> dict[str, Any]:
    """Detector name, wavelength and geometry stored in the first entry to update."""
    from ..calibration.nexus_io import resolve_entries

    wanted = resolve_entries(target, entries)
    with h5py.File(target, "r") as f:
        inst = f[wanted[0]]["instrument"]
        out = {
            "detector": read_field(inst, "detector/description"),
            "wavelength": read_field(inst, "monochromator/wavelength"),
            "distance": read_field(inst, "detector/distance"),
            "beam_center_x": read_field(inst, "detector/beam_center_x"),
            "beam_center_y": read_field(inst, "detector/beam_center_y"),
            "yaw": read_field(inst, "detector/yaw", 0.0),
            "pitch": read_field(inst, "detector/pitch", 0.0),
            "roll": read_field(inst, "detector/roll", 0.0),
            "detector_orientation": read_field(inst, "detector/detector_orientation", "-y +z -x"),
        }
    return out


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Handler of ``nxrefine-bs calibrate``."""
    from ..calibration.convert import get_calibrant
    from ..calibration.images import load_image
    from ..calibration.nexus_io import write_calibration
    from ..calibration.plots import save_plots
    from ..calibration.poni import read_poni, write_poni
    from ..calibration.refine import calibrate_powder

    entries = _flatten(args.entries)
    image = load_image(args.image)
    nominal = _nominal_from_file(args.target, entries)
    start = None
    if args.poni_in:
        orientation = str(nominal.get("detector_orientation") or "-y +z -x")
        start = replace(read_poni(args.poni_in), detector_orientation=orientation)
        nominal.update(
            detector=start.pyfai_detector_instance(),
            distance=start.distance,
            beam_center_x=start.beam_center_x,
            beam_center_y=start.beam_center_y,
            yaw=start.yaw,
            pitch=start.pitch,
            roll=start.roll,
        )
        if np.isfinite(start.wavelength):
            nominal["wavelength"] = start.wavelength_angstrom
    overrides = {
        "detector": args.detector,
        "wavelength": args.wavelength,
        "distance": args.distance,
        "yaw": args.yaw,
        "pitch": args.pitch,
        "roll": args.roll,
    }
    if args.beam_center:
        overrides["beam_center_x"], overrides["beam_center_y"] = args.beam_center
    nominal.update({k: v for k, v in overrides.items() if v is not None})
    missing = [k for k in ("detector", "wavelength") if not nominal.get(k)]
    if args.no_search:
        missing += [
            k for k in ("distance", "beam_center_x", "beam_center_y") if nominal.get(k) is None
        ]
    if missing:
        flags = " ".join("--" + k.replace("_", "-") for k in missing)
        raise CalibrationError(
            f"{args.target} gives no {', '.join(missing)}; pass {flags} or --poni-in"
        )

    def number(key: str) -> float | None:
        value = nominal.get(key)
        return None if value is None else float(value)

    if args.no_refine:
        if start is None:
            raise CalibrationError("--no-refine needs --poni-in (the geometry to store)")
        get_calibrant(args.calibrant)  # validate the name
        result = replace(start, calibrant=args.calibrant)
    else:
        result = calibrate_powder(
            image,
            nominal["detector"],
            args.calibrant,
            wavelength=float(nominal["wavelength"]),
            distance=number("distance"),
            beam_center_x=number("beam_center_x"),
            beam_center_y=number("beam_center_y"),
            yaw=float(nominal["yaw"] or 0.0),
            pitch=float(nominal["pitch"] or 0.0),
            roll=float(nominal["roll"] or 0.0),
            fix_wavelength=not args.refine_wavelength,
            max_rings=args.max_rings,
            search_size=args.search_size,
            min_rings=args.min_rings,
            max_rms_pixels=args.max_rms,
            search=not args.no_search,
            detector_orientation=str(nominal.get("detector_orientation") or "-y +z -x"),
        )
    print(result.summary())
    written = write_calibration(args.target, result, image, args.calibrant, entries)
    print(f"wrote calibration to {args.target}: {', '.join(written)}")
    if args.poni_out:
        print(f"wrote {write_poni(result, args.poni_out)}")
    if args.plots:
        paths = save_plots(result, image, args.plots)
        print("plots: " + ", ".join(os.fspath(p) for p in paths.values()))
    return 0


def _mask_start(target: str, entries: list[str] | None) -> tuple[Any, np.ndarray | None]:
    """Current mask of the first entry (or an empty one with detector gaps) and image."""
    from ..calibration.masks import PixelMask, read_pixel_mask
    from ..calibration.nexus_io import resolve_entries

    wanted = resolve_entries(target, entries)
    mask = read_pixel_mask(target, wanted[0])
    image = None
    with h5py.File(target, "r") as f:
        inst = f[wanted[0]]["instrument"]
        ds = inst.get("calibration/data")
        if isinstance(ds, h5py.Dataset) and ds.ndim == 2:
            image = np.asarray(ds[()], dtype=np.float64)
        detector = read_field(inst, "detector/description")
        shape = read_field(inst, "detector/shape")
    if mask is None:
        if detector:
            mask = PixelMask.for_detector(detector)
        elif shape is not None and np.size(shape) == 2:
            mask = PixelMask(tuple(int(s) for s in np.ravel(shape)))
        elif image is not None:
            mask = PixelMask(image.shape)
        else:
            raise CalibrationError(
                f"{target} entry {wanted[0]} has no pixel_mask, detector description, "
                "shape or calibration image to size a new mask"
            )
    return mask, image


def cmd_mask(args: argparse.Namespace) -> int:
    """Handler of ``nxrefine-bs mask add-rect|add-circle|import|show``."""
    from ..calibration.masks import save_mask_preview, write_pixel_mask

    entries = _flatten(getattr(args, "entries", None))
    if args.mask_command == "show":
        entries = [args.entry] if args.entry else None
    mask, image = _mask_start(args.target, entries)
    if args.mask_command == "add-rect":
        mask.add_rectangle(args.x0, args.y0, args.x1, args.y1)
    elif args.mask_command == "add-circle":
        mask.add_circle(args.xc, args.yc, args.r)
    elif args.mask_command == "import":
        mask.import_mask_image(args.image, replace=not args.add)
    if args.mask_command != "show":
        written = write_pixel_mask(args.target, mask, entries)
        print(f"wrote pixel mask ({mask.count} masked pixels) to {args.target}: "
              f"{', '.join(written)}")  # fmt: skip
    else:
        print(f"pixel mask {mask.shape[1]} x {mask.shape[0]}: {mask.count} masked pixels")
    if args.png:
        print(f"wrote {save_mask_preview(mask, image, args.png)}")
    return 0


def register(subparsers: Any) -> None:
    """Add ``calibrate`` and ``mask`` to ``subparsers`` (an argparse sub-parsers action)."""
    p = subparsers.add_parser(
        "calibrate",
        help="calibrate the detector geometry from a powder image (pyFAI)",
        description="Automatic powder calibration; writes fN/instrument/calibration and "
        "the detector geometry into a configuration template or scan file.",
    )
    p.add_argument("image", help="powder image (TIFF, CBF, EDF, or HDF5 file[#/dataset])")
    p.add_argument("target", help="configuration template or scan file to update")
    p.add_argument("--calibrant", default="CeO2", help="pyFAI calibrant (default CeO2)")
    p.add_argument(
        "--entries", type=_entries, action="append",
        help="comma-separated entries to update (default: all fN entries)",
    )  # fmt: skip
    p.add_argument("--detector", help="pyFAI detector name (default: detector/description)")
    p.add_argument("--wavelength", type=float, help="wavelength in Angstrom")
    p.add_argument("--distance", type=float, help="nominal distance in mm")
    p.add_argument(
        "--beam-center", type=float, nargs=2, metavar=("X", "Y"),
        help="nominal beam centre in pixels",
    )  # fmt: skip
    p.add_argument("--yaw", type=float, help="nominal yaw in degrees")
    p.add_argument("--pitch", type=float, help="nominal pitch in degrees")
    p.add_argument("--roll", type=float, help="nominal roll in degrees (not refined)")
    p.add_argument(
        "--no-search", action="store_true",
        help="start only from the nominal geometry (default: find it in the image first)",
    )  # fmt: skip
    p.add_argument("--refine-wavelength", action="store_true", help="also refine the wavelength")
    p.add_argument("--max-rings", type=int, default=20, help="maximum number of rings (20)")
    p.add_argument(
        "--search-size", type=_positive_float,
        help="half-width in pixels of the band searched about each ring "
        "(default 10, or 3 ring widths for broad rings)",
    )  # fmt: skip
    p.add_argument(
        "--min-rings", type=_positive_int, default=3,
        help="refuse a fit that uses fewer rings (3)",
    )  # fmt: skip
    p.add_argument(
        "--max-rms", type=_positive_float, default=0.5, metavar="PX",
        help="refuse a fit whose RMS residual across the rings exceeds PX pixels (0.5)",
    )  # fmt: skip
    p.add_argument("--poni-in", help="start from (or with --no-refine, use) this PONI file")
    p.add_argument("--no-refine", action="store_true", help="store the --poni-in geometry as it is")
    p.add_argument("--poni-out", help="also export the result as a PONI file")
    p.add_argument("--plots", metavar="DIR", help="write cake and ring-overlay PNGs here")
    p.set_defaults(func=cmd_calibrate)

    m = subparsers.add_parser(
        "mask",
        help="edit the 2-D pixel mask of a configuration or scan file",
        description="Edit fN/instrument/detector/pixel_mask (1 = masked).",
    )
    msub = m.add_subparsers(dest="mask_command", metavar="ACTION", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("target", help="configuration template or scan file")

    def write_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--entries", type=_entries, action="append",
            help="comma-separated entries to update (default: all fN entries)",
        )  # fmt: skip
        sp.add_argument("--png", help="save a preview PNG of the mask")
        sp.set_defaults(func=cmd_mask)

    r = msub.add_parser("add-rect", help="mask a rectangle x0..x1, y0..y1 (inclusive)")
    common(r)
    for name in ("x0", "y0", "x1", "y1"):
        r.add_argument(name, type=float)
    write_opts(r)
    c = msub.add_parser("add-circle", help="mask a circle of radius r about (xc, yc)")
    common(c)
    for name in ("xc", "yc", "r"):
        c.add_argument(name, type=float)
    write_opts(c)
    i = msub.add_parser("import", help="replace the mask by an image (nonzero = masked)")
    common(i)
    i.add_argument("image", help="mask image (any fabio format, or HDF5 file[#/dataset])")
    i.add_argument("--add", action="store_true", help="add to the current mask instead")
    write_opts(i)
    s = msub.add_parser("show", help="print the mask size and optionally save a preview")
    common(s)
    s.add_argument("--entry", help="entry to read (default: first fN entry)")
    s.add_argument("--png", help="save a preview PNG of the mask")
    s.set_defaults(func=cmd_mask)
