"""pyFAI detectors and calibrants, and the PONI <-> nxrefine-bs geometry conversion.

The detector geometry of nxrefine-bs is described, like NXRefine's, by a direct-beam
distance (mm), a beam centre (pixels) and three tilt angles ``yaw``, ``pitch`` and
``roll`` (degrees), interpreted by :class:`nxrefine_bs.geometry.Geometry` together with
the configuration's detector orientation.  pyFAI describes the same detector by a PONI
geometry: a distance ``dist`` from the sample to the detector plane along its normal,
the point of normal incidence ``(poni1, poni2)`` (metres from the detector origin) and
rotations ``rot1``, ``rot2``, ``rot3`` (radians).  :func:`poni_to_nxrefine` and
:func:`nxrefine_to_poni` convert between the two exactly (via
:mod:`nxrefine_bs.pyfai_geometry`): the ``Geometry`` made from a calibration gives every
pixel the 2-theta pyFAI gives it.  Beam centres count pixel ``i`` from its centre
(Fit2D's ``centerX`` counts from its corner, half a pixel more), and the tilts follow
``Geometry``'s ``Dinv = Rx(roll) Ry(pitch) Rz(yaw)``, not pyFAI's rotation order.
"""

from __future__ import annotations

import copy
import math
import os
from typing import TYPE_CHECKING, Any

from ..errors import CalibrationError
from ..geometry import Geometry
from ..pyfai_geometry import geometry_from_poni, poni_parameters

if TYPE_CHECKING:  # pragma: no cover
    from pyFAI.calibrant import Calibrant
    from pyFAI.detectors import Detector

__all__ = [
    "DEFAULT_ORIENTATION",
    "calibrant_names",
    "get_calibrant",
    "get_detector",
    "nxrefine_to_poni",
    "poni_to_nxrefine",
]


def get_detector(detector: str | Detector) -> Detector:
    """Return a pyFAI detector from its name (or the instance itself).

    Raises
    ------
    CalibrationError
        If pyFAI knows no detector of that name.
    """
    from pyFAI.detectors import Detector, detector_factory  # heavy: pyFAI, loaded on first use

    if isinstance(detector, Detector):
        return detector
    try:
        return detector_factory(str(detector))
    except Exception as exc:
        raise CalibrationError(
            f"unknown pyFAI detector {detector!r}; use a name such as 'Pilatus CdTe 2M', "
            "'Pilatus 1M' or 'Eiger 4M' (see pyFAI.detectors.ALL_DETECTORS)"
        ) from exc


def calibrant_names() -> list[str]:
    """Sorted names of the calibrants pyFAI knows."""
    from pyFAI.calibrant import CALIBRANT_FACTORY  # heavy: pyFAI, loaded on first use

    return sorted(CALIBRANT_FACTORY.keys(), key=str.lower)


def get_calibrant(calibrant: str | Calibrant, wavelength: float | None = None) -> Calibrant:
    """Return a fresh pyFAI calibrant, optionally set to ``wavelength`` (Angstrom).

    Parameters
    ----------
    calibrant : str or pyFAI.calibrant.Calibrant
        A pyFAI calibrant name (``"CeO2"``, ``"LaB6"``, ``"Si"``...), the path of a
        d-spacing file, or a calibrant instance (which is copied).
    wavelength : float, optional
        Wavelength in Angstrom.

    Raises
    ------
    CalibrationError
        If the calibrant is unknown.
    """
    from pyFAI.calibrant import CALIBRANT_FACTORY, Calibrant  # heavy: pyFAI, loaded on first use

    if isinstance(calibrant, Calibrant):
        cal = copy.copy(calibrant)
    elif str(calibrant) in CALIBRANT_FACTORY:
        cal = CALIBRANT_FACTORY(str(calibrant))
    elif os.path.isfile(str(calibrant)):
        cal = Calibrant(filename=str(calibrant))
    else:
        names = calibrant_names()
        examples = [n for n in ("CeO2", "LaB6", "Si", "Al2O3", "AgBh", "Ni") if n in names]
        raise CalibrationError(
            f"unknown calibrant {calibrant!r}; pyFAI knows {len(names)} calibrants, e.g. "
            f"{', '.join(examples)} (nxrefine_bs.calibration.calibrant_names() lists them all)"
        )
    if wavelength:
        cal.wavelength = float(wavelength) * 1e-10
    return cal


DEFAULT_ORIENTATION = "-y +z -x"
"""NXRefine's default detector orientation."""


def _base_geometry(pixel1: float, pixel2: float, detector_orientation: str) -> Any:
    if not math.isclose(pixel1, pixel2, rel_tol=1e-6):
        raise CalibrationError(
            f"pixels of {pixel1 * 1e6:g} x {pixel2 * 1e6:g} um are not square; nxrefine-bs "
            "geometry needs square pixels"
        )
    return Geometry(pixel_size=pixel2 * 1e3, detector_orientation=detector_orientation)


def poni_to_nxrefine(
    dist: float,
    poni1: float,
    poni2: float,
    rot1: float,
    rot2: float,
    rot3: float,
    pixel1: float,
    pixel2: float,
    detector_orientation: str = DEFAULT_ORIENTATION,
) -> dict[str, float]:
    """Convert a pyFAI PONI geometry to nxrefine-bs detector parameters.

    The conversion is exact: the :class:`~nxrefine_bs.geometry.Geometry` built from the
    result gives every pixel the same 2-theta as pyFAI does for the PONI (see
    :func:`nxrefine_bs.pyfai_geometry.geometry_from_poni`).

    Parameters
    ----------
    dist, poni1, poni2 : float
        PONI distance and point of normal incidence in metres.
    rot1, rot2, rot3 : float
        pyFAI rotations in radians.
    pixel1, pixel2 : float
        Pixel size along the slow (y) and fast (x) axes in metres (must be equal).
    detector_orientation : str
        The detector orientation of the configuration (default ``"-y +z -x"``).

    Returns
    -------
    dict
        ``distance`` (mm, along the beam to the detector plane), ``beam_center_x``,
        ``beam_center_y`` (pixels; the centre of pixel ``i`` is ``i``) and ``yaw``,
        ``pitch``, ``roll`` (degrees, :class:`~nxrefine_bs.geometry.Geometry` tilts).
    """
    g = geometry_from_poni(
        dist, poni1, poni2, rot1, rot2, rot3,
        base=_base_geometry(pixel1, pixel2, detector_orientation),
    )  # fmt: skip
    return {
        key: float(getattr(g, key))
        for key in ("distance", "beam_center_x", "beam_center_y", "yaw", "pitch", "roll")
    }


def nxrefine_to_poni(
    distance: float,
    beam_center_x: float,
    beam_center_y: float,
    yaw: float,
    pitch: float,
    roll: float,
    pixel1: float,
    pixel2: float,
    detector_orientation: str = DEFAULT_ORIENTATION,
) -> dict[str, float]:
    """Convert nxrefine-bs detector parameters to a pyFAI PONI geometry.

    The exact inverse of :func:`poni_to_nxrefine`.

    Parameters
    ----------
    distance : float
        Sample-to-detector distance along the incident beam (mm).
    beam_center_x, beam_center_y : float
        Direct-beam position on the detector in pixels (the centre of pixel ``i`` is ``i``).
    yaw, pitch, roll : float
        Detector tilts in degrees (:class:`~nxrefine_bs.geometry.Geometry` convention).
    pixel1, pixel2 : float
        Pixel size along the slow (y) and fast (x) axes in metres (must be equal).
    detector_orientation : str
        The detector orientation of the configuration.

    Returns
    -------
    dict
        ``dist``, ``poni1``, ``poni2`` (m) and ``rot1``, ``rot2``, ``rot3`` (rad).
    """
    g = _base_geometry(pixel1, pixel2, detector_orientation).replace(
        distance=distance,
        beam_center_x=beam_center_x,
        beam_center_y=beam_center_y,
        yaw=yaw,
        pitch=pitch,
        roll=roll,
    )
    par = poni_parameters(g)
    return {key: float(par[key]) for key in ("dist", "poni1", "poni2", "rot1", "rot2", "rot3")}
