"""Read and write the diffractometer geometry, unit cell and orientation of an entry.

The NeXus locations follow NXRefine (inventory §2.2):
``instrument/monochromator/wavelength``, ``instrument/detector/{distance, pixel_size,
shape, beam_center_x, beam_center_y, yaw, pitch, roll, detector_orientation,
orientation_matrix}``, ``instrument/goniometer/{phi (+@step, @end), chi, omega, theta,
xs, ys, zs}`` and ``sample/unitcell_{a,b,c,alpha,beta,gamma}``.
"""

from __future__ import annotations

import logging
from importlib import metadata
from typing import Any

import h5py
import numpy as np

from ..errors import ScanFileError
from ..geometry import HC_KEV_ANGSTROM, Geometry, b_matrix
from ..pyfai_geometry import poni_parameters
from .h5tools import nx_group, read_field, write_field

logger = logging.getLogger(__name__)

__all__ = [
    "read_geometry",
    "write_geometry",
    "read_cell",
    "write_cell",
    "read_orientation",
    "write_orientation",
    "read_ub",
    "write_pyfai_parameters",
    "PYFAI_PARAMETER_KEYS",
    "CELL_FIELDS",
]

CELL_FIELDS = (
    "unitcell_a",
    "unitcell_b",
    "unitcell_c",
    "unitcell_alpha",
    "unitcell_beta",
    "unitcell_gamma",
)


def _where(entry: h5py.Group) -> str:
    return f"{entry.file.filename}:{entry.name}"


def read_geometry(entry: h5py.Group) -> Geometry:
    """Build a :class:`~nxrefine_bs.geometry.Geometry` from an ``fN`` entry.

    Missing optional values fall back to the ``Geometry`` defaults; a missing
    wavelength, distance or pixel size is an error naming the entry.
    """
    inst = entry.get("instrument")
    if inst is None:
        raise ScanFileError(
            f"{_where(entry)} has no instrument group; create the scan from a configuration"
        )
    kw: dict[str, Any] = {}
    wavelength = read_field(inst, "monochromator/wavelength")
    distance = read_field(inst, "detector/distance")
    pixel = read_field(inst, "detector/pixel_size")
    for name, value in (("wavelength", wavelength), ("distance", distance), ("pixel_size", pixel)):
        if value is None:
            raise ScanFileError(f"{_where(entry)}: instrument is missing {name}")
        kw[name] = float(np.ravel(value)[0])
    shape = read_field(inst, "detector/shape")
    if shape is not None:
        kw["shape"] = tuple(int(v) for v in np.ravel(shape)[:2])
    for key in ("beam_center_x", "beam_center_y", "yaw", "pitch", "roll"):
        v = read_field(inst, f"detector/{key}")
        if v is not None:
            kw[key] = float(v)
    orient = read_field(inst, "detector/detector_orientation")
    if orient is not None:
        kw["detector_orientation"] = orient if isinstance(orient, str) else " ".join(orient)
    gon = inst.get("goniometer")
    if gon is not None:
        if "phi" in gon:
            phi = gon["phi"]
            values = np.ravel(phi[()]).astype(float)
            kw["phi_start"] = float(values[0])
            if values.size > 1:
                kw["phi_step"] = float(values[1] - values[0])
            elif "step" in phi.attrs:
                kw["phi_step"] = float(phi.attrs["step"])
        for key, names in (
            ("chi", ("chi",)),
            ("omega", ("omega",)),
            ("theta", ("theta", "goniometer_pitch", "gonpitch")),
            ("xs", ("xs",)),
            ("ys", ("ys",)),
            ("zs", ("zs",)),
        ):
            for name in names:
                v = read_field(gon, name)
                if v is not None:
                    kw[key] = float(np.ravel(v)[0])
                    break
    return Geometry(**kw)


def write_geometry(entry: h5py.Group, geometry: Geometry, *, phi_end: float | None = None) -> None:
    """Write every geometry parameter of ``geometry`` into the ``fN`` entry."""
    inst = nx_group(entry, "instrument", "NXinstrument")
    mono = nx_group(inst, "monochromator", "NXmonochromator")
    write_field(mono, "wavelength", float(geometry.wavelength), units="angstrom")
    write_field(mono, "energy", float(HC_KEV_ANGSTROM / geometry.wavelength), units="keV")
    det = nx_group(inst, "detector", "NXdetector")
    write_field(det, "distance", float(geometry.distance), units="mm")
    write_field(det, "pixel_size", float(geometry.pixel_size), units="mm")
    write_field(det, "shape", np.asarray(geometry.shape, dtype=np.int32))
    write_field(det, "beam_center_x", float(geometry.beam_center_x), units="pixel")
    write_field(det, "beam_center_y", float(geometry.beam_center_y), units="pixel")
    for key in ("yaw", "pitch", "roll"):
        write_field(det, key, float(getattr(geometry, key)), units="degree")
    write_field(det, "detector_orientation", geometry.detector_orientation)
    gon = nx_group(inst, "goniometer", "NXgoniometer")
    attrs: dict[str, Any] = {"step": float(geometry.phi_step)}
    if phi_end is not None:
        attrs["end"] = float(phi_end)
    write_field(gon, "phi", float(geometry.phi_start), units="degree", attrs=attrs)
    for key in ("chi", "omega", "theta"):
        write_field(gon, key, float(getattr(geometry, key)), units="degree")
    for key in ("xs", "ys", "zs"):
        write_field(gon, key, float(getattr(geometry, key)), units="mm")


PYFAI_PARAMETER_KEYS: tuple[str, ...] = (
    "Detector",
    "PixelSize1",
    "PixelSize2",
    "Distance",
    "Poni1",
    "Poni2",
    "Rot1",
    "Rot2",
    "Rot3",
    "Wavelength",
)
"""Fields of ``instrument/calibration/refinement/parameters`` NXRefine reads (SI units)."""


def write_pyfai_parameters(
    entry: h5py.Group, geometry: Geometry, *, detector: str = "Detector", replace: bool = False
) -> bool:
    """Record ``geometry`` as NXRefine's ``instrument/calibration/refinement/parameters``.

    NXRefine builds its radial sum (``nxmax``) from these pyFAI parameters; a
    simulated scan or a configuration without a powder calibration gets them from its
    known geometry (:func:`nxrefine_bs.pyfai_geometry.poni_parameters`, which gives the
    same 2-theta for every pixel).  An existing refinement (a real powder calibration)
    is kept unless ``replace``.

    Parameters
    ----------
    entry : h5py.Group
        A rotation entry or configuration position (``fN``).
    geometry : Geometry
        Its detector geometry.
    detector : str
        pyFAI detector name (``"Detector"``: a generic detector of this pixel size).
    replace : bool
        Overwrite an existing ``refinement`` group.

    Returns
    -------
    bool
        True if the parameters were written.
    """
    inst = nx_group(entry, "instrument", "NXinstrument")
    cal = inst.get("calibration")
    if isinstance(cal, h5py.Group) and "refinement" in cal:
        if not replace:
            return False
        del cal["refinement"]
    cal = nx_group(inst, "calibration", "NXdata")
    poni = poni_parameters(geometry)
    proc = nx_group(cal, "refinement", "NXprocess")
    write_field(proc, "program", "pyFAI")
    write_field(proc, "version", metadata.version("pyFAI"))  # no need to import pyFAI
    write_field(proc, "note", "from the known geometry (no powder calibration)")
    pars = nx_group(proc, "parameters", "NXparameters")
    values = {
        "Detector": detector,
        "PixelSize1": poni["pixel1"],
        "PixelSize2": poni["pixel2"],
        "Distance": poni["dist"],
        "Poni1": poni["poni1"],
        "Poni2": poni["poni2"],
        "Rot1": poni["rot1"],
        "Rot2": poni["rot2"],
        "Rot3": poni["rot3"],
        "Wavelength": poni["wavelength"],
    }
    for key in PYFAI_PARAMETER_KEYS:
        write_field(pars, key, values[key])
    return True


def read_cell(group: h5py.Group) -> tuple[float, ...] | None:
    """Unit cell ``(a, b, c, alpha, beta, gamma)`` from an NXsample (or an entry's sample)."""
    sample = group.get("sample") if "sample" in group else group
    if sample is None:
        return None
    values = [read_field(sample, f) for f in CELL_FIELDS]
    if all(v is not None for v in values):
        return tuple(float(v) for v in values)
    cell = read_field(sample, "unit_cell")
    if cell is not None and np.size(cell) == 6:
        return tuple(float(v) for v in np.ravel(cell))
    return None


def write_cell(sample: h5py.Group, cell: tuple[float, ...] | list[float]) -> None:
    """Write ``unitcell_a..gamma`` into an NXsample group."""
    for name, value in zip(CELL_FIELDS, cell, strict=True):
        write_field(
            sample, name, float(value), units="angstrom" if name in CELL_FIELDS[:3] else "degree"
        )


def read_orientation(entry: h5py.Group) -> np.ndarray | None:
    """The orientation matrix U of an ``fN`` entry, or None if not yet determined."""
    value = read_field(entry, "instrument/detector/orientation_matrix")
    if value is None:
        return None
    u = np.asarray(value, dtype=float)
    return u if u.shape == (3, 3) else None


def write_orientation(entry: h5py.Group, u: np.ndarray) -> None:
    """Store the orientation matrix U in ``instrument/detector/orientation_matrix``."""
    det = nx_group(nx_group(entry, "instrument", "NXinstrument"), "detector", "NXdetector")
    write_field(det, "orientation_matrix", np.asarray(u, dtype=np.float64))


def read_ub(entry: h5py.Group) -> np.ndarray | None:
    """``U @ B`` of an ``fN`` entry, or None if the cell or U is missing."""
    u = read_orientation(entry)
    cell = read_cell(entry)
    if u is None or cell is None:
        return None
    return u @ b_matrix(*cell)
