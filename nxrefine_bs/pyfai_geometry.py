"""Convert a :class:`~nxrefine_bs.geometry.Geometry` into a pyFAI ``AzimuthalIntegrator``.

The mapping is exact (closed form), for any detector orientation string and any
yaw/pitch/roll:

* ``Geometry`` gives the sample-to-pixel vector ``s = L x + p C [x - xc, y - yc, 0]`` with
  ``C = Dinv O^T`` (lab frame: +X beam, +Z up).
* pyFAI gives ``t = M [p1 - poni1, p2 - poni2, dist]`` in its own frame (axis 3 along the
  beam, axis 1 vertical, axis 2 horizontal), with ``M = M(rot1, rot2, rot3)``:
  ``M[2, 0] = sin(rot2)``, ``M[2, 1] = -cos(rot2) sin(rot1)``,
  ``M[2, 2] = cos(rot1) cos(rot2)``, ``M[0, 0] = cos(rot2) cos(rot3)``,
  ``M[1, 0] = cos(rot2) sin(rot3)``.
* With ``P`` the lab -> pyFAI axis permutation (``t1 = Z``, ``t2 = -Y``, ``t3 = X``) the
  detector's row direction ``P C e_y`` is pyFAI's first column, its column direction
  ``P C e_x`` the second, and their cross product the third; ``dist``, ``poni1``,
  ``poni2`` follow from splitting ``L X`` along these three directions.  pyFAI pixel
  ``i`` has its centre at ``(i + 0.5) * pixel`` whereas ``Geometry`` puts it at ``i``,
  hence the half-pixel shift in the PONI.
* A detector whose pixel axes form a mirror image (x cross y pointing away from the
  beam) cannot be written as a pyFAI rotation; the lab frame is then mirrored in the
  horizontal (Y) axis, which
  leaves 2-theta, the solid angle and the polarization factor unchanged and only flips
  the sign of pyFAI's ``chi``.

pyFAI's ``chi = 0`` lies in the horizontal plane, so its polarization factor with
``factor = f`` equals ``Geometry``'s ``p (1 - s_y^2) + (1 - p)(1 - s_z^2)`` with
``p = (1 + f) / 2``.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .geometry import Geometry, GeometryError

if TYPE_CHECKING:  # pragma: no cover
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

logger = logging.getLogger(__name__)

__all__ = ["poni_parameters", "integrator", "geometry_from_poni"]

_LAB_TO_PYFAI = np.array([[0.0, 0.0, 1.0], [0.0, -1.0, 0.0], [1.0, 0.0, 0.0]])
"""Rows: pyFAI axes 1 (vertical = lab +Z), 2 (horizontal = lab -Y), 3 (beam = lab +X)."""


def poni_parameters(geometry: Geometry) -> dict[str, Any]:
    """pyFAI PONI parameters reproducing ``geometry``'s pixel 2-theta exactly.

    Parameters
    ----------
    geometry : Geometry
        Detector geometry (the goniometer and sample offset are ignored, as pyFAI
        has no notion of them).

    Returns
    -------
    dict
        ``dist``, ``poni1``, ``poni2`` (m), ``rot1``, ``rot2``, ``rot3`` (rad),
        ``pixel1``, ``pixel2`` (m), ``wavelength`` (m), ``max_shape`` (ny, nx) and
        ``mirrored`` (True when the detector orientation is a mirror image).

    Raises
    ------
    GeometryError
        If the beam would lie in the detector plane.
    """
    # Only the in-plane axes (columns 0 and 1) place pixels; the normal row of O is unused.
    c = geometry.Dinv @ geometry.O.T
    p = _LAB_TO_PYFAI.copy()
    beam = np.array([0.0, 0.0, 1.0])
    mirrored = bool(np.cross(p @ c[:, 1], p @ c[:, 0]) @ beam < 0)
    if mirrored:
        p[1] *= -1.0  # mirror the lab frame in Y: 2-theta, solid angle, polarization kept
    a0 = p @ c[:, 1]  # pyFAI dim1 (rows, detector y)
    a1 = p @ c[:, 0]  # pyFAI dim2 (columns, detector x)
    a2 = np.cross(a0, a1)
    m = np.column_stack([a0, a1, a2])
    length = geometry.distance * 1e-3  # m
    dist = length * float(beam @ a2)
    if dist <= 1e-9 * length:
        raise GeometryError(
            f"detector orientation {geometry.detector_orientation!r} with yaw/pitch/roll "
            f"{geometry.yaw}/{geometry.pitch}/{geometry.roll} puts the beam in the "
            "detector plane; pyFAI cannot describe it"
        )
    pix = geometry.pixel_size * 1e-3
    poni1 = pix * (geometry.beam_center_y + 0.5) - length * float(beam @ a0)
    poni2 = pix * (geometry.beam_center_x + 0.5) - length * float(beam @ a1)
    s2 = float(np.clip(m[2, 0], -1.0, 1.0))
    rot2 = math.asin(s2)
    rot1 = math.atan2(-m[2, 1], m[2, 2])
    rot3 = math.atan2(m[1, 0], m[0, 0])
    return {
        "dist": dist,
        "poni1": poni1,
        "poni2": poni2,
        "rot1": rot1,
        "rot2": rot2,
        "rot3": rot3,
        "pixel1": pix,
        "pixel2": pix,
        "wavelength": geometry.wavelength * 1e-10,
        "max_shape": tuple(geometry.shape),
        "mirrored": mirrored,
    }


def integrator(geometry: Geometry, mask: ArrayLike | None = None) -> AzimuthalIntegrator:
    """A pyFAI ``AzimuthalIntegrator`` whose ``twoThetaArray()`` equals ``geometry.two_theta``.

    Parameters
    ----------
    geometry : Geometry
        Detector geometry of the entry.
    mask : array_like, optional
        Pixel mask of shape ``geometry.shape`` (nonzero = masked), set as the
        detector mask (pyFAI's convention).

    Returns
    -------
    pyFAI.integrator.azimuthal.AzimuthalIntegrator
    """
    # heavy: pyFAI (~1 s), imported only when an integrator is built; the rest of this
    # module is numpy (nexus.geometry_io uses poni_parameters without pyFAI)
    from pyFAI.detectors import Detector
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    par = poni_parameters(geometry)
    det = Detector(pixel1=par["pixel1"], pixel2=par["pixel2"], max_shape=par["max_shape"])
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != tuple(geometry.shape):
            raise GeometryError(f"mask shape {m.shape} differs from detector {geometry.shape}")
        det.mask = (m != 0).astype(np.int8)
    ai = AzimuthalIntegrator(
        dist=par["dist"],
        poni1=par["poni1"],
        poni2=par["poni2"],
        rot1=par["rot1"],
        rot2=par["rot2"],
        rot3=par["rot3"],
        detector=det,
        wavelength=par["wavelength"],
    )
    logger.debug("pyFAI integrator for %s: %s", geometry, par)
    return ai


def two_theta_image(geometry: Geometry) -> NDArray[np.float64]:
    """2-theta (degrees) of every pixel centre, computed by ``Geometry`` (shape ``(ny, nx)``)."""
    ny, nx = geometry.shape
    x = np.arange(nx, dtype=np.float64)
    y = np.arange(ny, dtype=np.float64)[:, None]
    return geometry.two_theta(x, y)


def geometry_from_poni(
    dist: float,
    poni1: float,
    poni2: float,
    rot1: float,
    rot2: float,
    rot3: float,
    *,
    base: Geometry,
) -> Geometry:
    """The inverse of :func:`poni_parameters`: ``base`` with its detector geometry from a PONI.

    ``distance``, ``beam_center_x``/``_y`` and ``yaw``/``pitch``/``roll`` are replaced so
    that the pixel 2-theta map equals pyFAI's for the PONI (SI units and radians, as
    pyFAI); ``base`` supplies the detector orientation, pixel size and everything else.

    Raises
    ------
    GeometryError
        If the PONI puts the detector behind the sample or parallel to the beam.
    """
    from pyFAI.geometry import Geometry as PyFAIGeometry  # heavy: pyFAI, see integrator()

    m = PyFAIGeometry(dist=dist, poni1=poni1, poni2=poni2, rot1=rot1, rot2=rot2, rot3=rot3)
    m = np.asarray(m.rotation_matrix(), dtype=float)
    p = _LAB_TO_PYFAI.copy()
    c0 = base.Dinv @ base.O.T
    if np.cross(p @ c0[:, 1], p @ c0[:, 0]) @ np.array([0.0, 0.0, 1.0]) < 0:
        p[1] *= -1.0  # the same mirror as in poni_parameters
    c = np.empty((3, 3))
    c[:, 1] = p.T @ m[:, 0]  # detector y (rows) in the lab
    c[:, 0] = p.T @ m[:, 1]  # detector x (columns) in the lab
    c[:, 2] = np.linalg.det(base.O) * np.cross(c[:, 0], c[:, 1])
    dinv = c @ base.O  # C = Dinv O^T and O is orthogonal
    pitch = math.degrees(math.asin(float(np.clip(dinv[0, 2], -1.0, 1.0))))
    yaw = math.degrees(math.atan2(-dinv[0, 1], dinv[0, 0]))
    roll = math.degrees(math.atan2(-dinv[1, 2], dinv[2, 2]))
    if m[2, 2] <= 1e-12:
        raise GeometryError(f"PONI rot1={rot1}, rot2={rot2} puts the detector along the beam")
    length = dist / m[2, 2]  # m, along the beam to the detector plane
    pix = base.pixel_size * 1e-3
    return base.replace(
        distance=length * 1e3,
        beam_center_y=(poni1 + length * m[2, 0]) / pix - 0.5,
        beam_center_x=(poni2 + length * m[2, 1]) / pix - 0.5,
        yaw=yaw,
        pitch=pitch,
        roll=roll,
    )
