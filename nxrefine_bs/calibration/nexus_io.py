"""Storing a powder calibration in a configuration template or scan file (atomically)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from importlib import metadata
from typing import Any

import h5py
import numpy as np
from numpy.typing import ArrayLike

from ..errors import CalibrationError
from ..nexus.entries import rotation_entries
from ..nexus.h5tools import nx_group, write_field
from ..nexus.safewrite import atomic_update
from .result import CalibrationResult

__all__ = [
    "POLARIZATION_FACTOR",
    "atomic_h5_update",
    "entry_names",
    "resolve_entries",
    "write_calibration",
]

logger = logging.getLogger(__name__)

POLARIZATION_FACTOR = 0.99
"""Polarization factor of the ``instrument/detector/polarization`` array (horizontal beam)."""


entry_names = rotation_entries
"""The rotation entries of an open file (:func:`nxrefine_bs.nexus.entries.rotation_entries`)."""


def resolve_entries(
    filename: str | os.PathLike[str], entries: Sequence[str] | str | None
) -> list[str]:
    """Check ``filename`` and return the entries to update (all ``fN`` when None).

    Each must exist and hold ``instrument/detector``.

    Raises
    ------
    CalibrationError
        If the file cannot be read or an entry is missing.
    """
    path = os.fspath(filename)
    if not os.path.isfile(path):
        raise CalibrationError(f"NeXus file {path!r} does not exist")
    try:
        with h5py.File(path, "r") as f:
            available = entry_names(f)
            if entries is None:
                wanted = available
            else:
                wanted = [entries] if isinstance(entries, str) else list(entries)
            if not wanted:
                raise CalibrationError(
                    f"NeXus file {path!r} has no f1, f2... entry; give entries explicitly"
                )
            for e in wanted:
                grp = f.get(e)
                if not isinstance(grp, h5py.Group):
                    raise CalibrationError(
                        f"NeXus file {path!r} has no entry {e!r} (entries: "
                        f"{', '.join(available) or 'none'})"
                    )
                if not isinstance(grp.get("instrument/detector"), h5py.Group):
                    raise CalibrationError(
                        f"entry {e!r} of {path!r} has no instrument/detector group"
                    )
    except CalibrationError:
        raise
    except OSError as exc:
        raise CalibrationError(f"cannot open NeXus file {path!r}: {exc}") from exc
    return wanted


@contextlib.contextmanager
def atomic_h5_update(filename: str | os.PathLike[str]) -> Iterator[Any]:
    """Open a copy of ``filename`` for writing; replace the original only on success.

    The one copy-on-write update of the package,
    :func:`nxrefine_bs.nexus.safewrite.atomic_update`: under the file's NXLock-compatible
    lock, checked for free space; on any error the original is left byte-identical.
    """
    with atomic_update(filename) as f:
        yield f


def write_calibration(
    filename: str | os.PathLike[str],
    result: CalibrationResult,
    image: ArrayLike,
    calibrant: str | None = None,
    entries: Sequence[str] | str | None = None,
) -> list[str]:
    """Store a powder calibration in a configuration template or scan file.

    For each entry ``fN`` this writes ``fN/instrument/calibration`` (NXdata of the
    powder image with ``x_pixel``/``y_pixel`` axes, a ``calibrant`` field and a
    ``refinement`` NXprocess with ``program='pyFAI'``, ``version`` and a ``parameters``
    NXparameters group holding ``Detector``, ``PixelSize1``, ``PixelSize2``,
    ``Distance``, ``Poni1``, ``Poni2``, ``Rot1``, ``Rot2``, ``Rot3``, ``Wavelength`` in
    pyFAI's SI units), and updates ``instrument/detector/{distance, beam_center_x,
    beam_center_y, yaw, pitch, roll, polarization}`` and
    ``instrument/monochromator/{wavelength, energy}``.  The polarization array is
    pyFAI's polarization correction with factor :data:`POLARIZATION_FACTOR`.  The
    image is stored once and hard-linked into the other entries.

    The update is atomic: on any error the file is left untouched.

    Parameters
    ----------
    filename : path
        Configuration template or scan file.
    result : CalibrationResult
        The refined geometry.
    image : array_like
        The powder image (detector shape).
    calibrant : str, optional
        Calibrant name; defaults to ``result.calibrant``.
    entries : str or sequence of str, optional
        Entries to update; ``None`` means every ``fN`` entry.

    Returns
    -------
    list of str
        The entries written.

    Raises
    ------
    CalibrationError
        If the file or an entry is missing, or the image shape does not match.
    """
    path = os.fspath(filename)
    img = np.asarray(image)
    if img.ndim != 2 or (result.shape and tuple(img.shape) != tuple(result.shape)):
        raise CalibrationError(
            f"calibration image shape {img.shape} does not match the detector shape "
            f"{tuple(result.shape)} of the calibration"
        )
    wanted = resolve_entries(path, entries)
    with h5py.File(path, "r") as f:
        for e in wanted:
            shape = f[e].get("instrument/detector/shape")
            if isinstance(shape, h5py.Dataset):
                s = tuple(int(v) for v in np.ravel(shape[()]))
                if len(s) == 2 and s != tuple(img.shape):
                    raise CalibrationError(
                        f"entry {e!r} of {path!r} has detector shape {s} but the calibration "
                        f"image has shape {img.shape}"
                    )
    cal_name = calibrant if calibrant is not None else result.calibrant
    ai = result.integrator()
    polarization = np.asarray(
        ai.polarization(shape=img.shape, factor=POLARIZATION_FACTOR), dtype=np.float32
    )
    nx = result.nxrefine_parameters()
    first_image = None
    with atomic_h5_update(path) as f:
        for e in wanted:
            inst = f[e]["instrument"]
            if "calibration" in inst:
                del inst["calibration"]
            calg = nx_group(inst, "calibration", "NXdata")
            calg.attrs["signal"] = "data"
            calg.attrs["axes"] = ["y_pixel", "x_pixel"]
            if first_image is None:
                first_image = calg.create_dataset(
                    "data", data=img, compression="gzip", compression_opts=4,
                    chunks=True,
                )  # fmt: skip
            else:
                calg["data"] = first_image
            write_field(calg, "x_pixel", np.arange(img.shape[1], dtype=np.float64))
            write_field(calg, "y_pixel", np.arange(img.shape[0], dtype=np.float64))
            write_field(calg, "calibrant", str(cal_name))
            proc = nx_group(calg, "refinement", "NXprocess")
            write_field(proc, "program", "pyFAI")
            write_field(proc, "version", metadata.version("pyFAI"))
            write_field(proc, "sequence_index", 1)
            write_field(
                proc,
                "note",
                f"{result.n_rings} rings, {result.n_points} points, "
                f"rms {result.rms_residual:.6f} deg ({result.rms_pixels:.3f} px)",
            )
            pars = nx_group(proc, "parameters", "NXparameters")
            for key, value in result.poni_parameters().items():
                write_field(pars, key, value)
            det = inst["detector"]
            write_field(det, "distance", nx["distance"], units="mm")
            write_field(det, "beam_center_x", nx["beam_center_x"], units="pixel")
            write_field(det, "beam_center_y", nx["beam_center_y"], units="pixel")
            write_field(det, "yaw", nx["yaw"], units="degree")
            write_field(det, "pitch", nx["pitch"], units="degree")
            write_field(det, "roll", nx["roll"], units="degree")
            write_field(det, "polarization", polarization, compression="gzip")
            mono = nx_group(inst, "monochromator", "NXmonochromator")
            write_field(mono, "wavelength", np.float32(nx["wavelength"]), units="Angstrom")
            write_field(mono, "energy", np.float32(nx["energy"]), units="keV")
    logger.info("wrote powder calibration to %s entries %s", path, ", ".join(wanted))
    return wanted
