"""The result of a powder calibration: pyFAI's PONI geometry and its nxrefine-bs view."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from ..errors import CalibrationError
from ..geometry import HC_KEV_ANGSTROM
from .convert import DEFAULT_ORIENTATION, get_detector, poni_to_nxrefine

if TYPE_CHECKING:  # pragma: no cover
    from pyFAI.detectors import Detector
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

__all__ = ["CalibrationResult", "result_from_parameters"]


@dataclass(frozen=True)
class CalibrationResult:
    """Refined detector geometry from a powder calibration.

    The primary parameters are pyFAI's (SI units, radians); the NXRefine parameters
    (``distance``, ``beam_center_x``/``_y``, ``yaw``/``pitch``/``roll``) are derived
    properties, see :func:`poni_to_nxrefine`.

    Attributes
    ----------
    detector : str
        pyFAI detector name.
    pixel1, pixel2 : float
        Pixel size along y (slow) and x (fast), metres.
    shape : tuple of int
        Detector shape ``(ny, nx)``.
    wavelength : float
        Wavelength in metres (pyFAI convention); see :attr:`wavelength_angstrom`.
    dist, poni1, poni2 : float
        PONI distance and point of normal incidence, metres.
    rot1, rot2, rot3 : float
        pyFAI rotations, radians.
    calibrant : str
        Calibrant name.
    n_rings, n_points : int
        Number of rings and of control points used in the final refinement.
    rms_residual : float
        Root-mean-square 2-theta residual of the control points, degrees.
    rms_pixels : float
        The same residual measured across the rings, pixels.
    n_expected : int
        Number of resolved calibrant rings on the detector (at most ``max_rings``).
    rings : tuple of int
        Indices (in the calibrant's reflection list) of the rings used.
    control_points : numpy.ndarray or None
        ``(n, 3)`` array of ``(row, column, ring index)``, pixel-centre coordinates
        (the centre of pixel ``i`` is ``i``), as pyFAI's control points.
    """

    detector: str
    pixel1: float
    pixel2: float
    shape: tuple[int, int]
    wavelength: float
    dist: float
    poni1: float
    poni2: float
    rot1: float
    rot2: float
    rot3: float
    calibrant: str = ""
    n_rings: int = 0
    n_points: int = 0
    rms_residual: float = float("nan")
    rms_pixels: float = float("nan")
    n_expected: int = 0
    rings: tuple[int, ...] = ()
    control_points: NDArray[np.float64] | None = field(default=None, repr=False, compare=False)
    pyfai_detector: Any = field(default=None, repr=False, compare=False)
    detector_orientation: str = DEFAULT_ORIENTATION

    # ---- NXRefine view ---------------------------------------------------------------
    def _nx(self) -> dict[str, float]:
        return poni_to_nxrefine(
            self.dist, self.poni1, self.poni2, self.rot1, self.rot2, self.rot3,
            self.pixel1, self.pixel2, self.detector_orientation,
        )  # fmt: skip

    @property
    def distance(self) -> float:
        """Sample-to-detector distance along the beam, mm."""
        return self._nx()["distance"]

    @property
    def beam_center_x(self) -> float:
        """Direct-beam x position, pixels (centre of pixel ``i`` at ``i``)."""
        return self._nx()["beam_center_x"]

    @property
    def beam_center_y(self) -> float:
        """Direct-beam y position, pixels (centre of pixel ``i`` at ``i``)."""
        return self._nx()["beam_center_y"]

    @property
    def yaw(self) -> float:
        """Detector yaw, degrees (``Geometry`` convention)."""
        return self._nx()["yaw"]

    @property
    def pitch(self) -> float:
        """Detector pitch, degrees (``Geometry`` convention)."""
        return self._nx()["pitch"]

    @property
    def roll(self) -> float:
        """Detector roll, degrees (``Geometry`` convention)."""
        return self._nx()["roll"]

    @property
    def wavelength_angstrom(self) -> float:
        """Wavelength in Angstrom."""
        return self.wavelength * 1e10

    @property
    def energy(self) -> float:
        """Photon energy in keV."""
        return HC_KEV_ANGSTROM / self.wavelength_angstrom

    def nxrefine_parameters(self) -> dict[str, float]:
        """NXRefine detector parameters (distance, beam centre, tilts) plus wavelength/energy."""
        out = self._nx()
        out["wavelength"] = self.wavelength_angstrom
        out["energy"] = self.energy
        return out

    def poni_parameters(self) -> dict[str, Any]:
        """pyFAI parameters as written in ``refinement/parameters`` (SI units)."""
        return {
            "Detector": self.detector,
            "PixelSize1": self.pixel1,
            "PixelSize2": self.pixel2,
            "Distance": self.dist,
            "Poni1": self.poni1,
            "Poni2": self.poni2,
            "Rot1": self.rot1,
            "Rot2": self.rot2,
            "Rot3": self.rot3,
            "Wavelength": self.wavelength,
        }

    def pyfai_detector_instance(self) -> Detector:
        """The pyFAI detector (rebuilt from name and pixel size if needed)."""
        if self.pyfai_detector is not None:
            return self.pyfai_detector
        try:
            return get_detector(self.detector)
        except CalibrationError:
            from pyFAI.detectors import Detector  # heavy: pyFAI, loaded on first use

            det = Detector(pixel1=self.pixel1, pixel2=self.pixel2, max_shape=self.shape)
            return det

    def integrator(self) -> AzimuthalIntegrator:
        """A pyFAI azimuthal integrator with this geometry."""
        # heavy: pyFAI, loaded on first use
        from pyFAI.integrator.azimuthal import AzimuthalIntegrator

        return AzimuthalIntegrator(
            dist=self.dist, poni1=self.poni1, poni2=self.poni2,
            rot1=self.rot1, rot2=self.rot2, rot3=self.rot3,
            detector=self.pyfai_detector_instance(), wavelength=self.wavelength,
        )  # fmt: skip

    def summary(self) -> str:
        """One-paragraph human-readable summary."""
        return (
            f"{self.detector}, {self.calibrant or 'no calibrant'}, "
            f"lambda={self.wavelength_angstrom:.5f} A: distance={self.distance:.3f} mm, "
            f"beam centre=({self.beam_center_x:.2f}, {self.beam_center_y:.2f}) px, "
            f"yaw={self.yaw:.4f} pitch={self.pitch:.4f} roll={self.roll:.4f} deg; "
            f"{self.n_rings} rings, {self.n_points} points, "
            f"rms={self.rms_residual:.5f} deg 2-theta ({self.rms_pixels:.3f} px)"
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain-data dictionary (no arrays) including the NXRefine parameters."""
        skip = ("control_points", "pyfai_detector")
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        out["shape"] = list(self.shape)
        out["rings"] = list(self.rings)
        out.update(self.nxrefine_parameters())
        return out


def _shape2(shape: Any) -> tuple[int, int]:
    """A detector shape as ``(ny, nx)`` integers."""
    ny, nx = (int(s) for s in shape)
    return ny, nx



def result_from_parameters(
    parameters: Mapping[str, float],
    detector: Detector,
    *,
    calibrant: str = "",
    rings: Sequence[int] = (),
    points: NDArray[np.float64] | None = None,
    rms: float = float("nan"),
    rms_pixels: float = float("nan"),
    n_expected: int = 0,
    detector_orientation: str = DEFAULT_ORIENTATION,
) -> CalibrationResult:
    """Build a :class:`CalibrationResult` from PONI ``parameters`` on ``detector``.

    ``parameters`` holds ``dist``, ``poni1``, ``poni2`` (m), ``rot1``, ``rot2``, ``rot3``
    (rad) and ``wavelength`` (m).
    """
    return CalibrationResult(
        detector_orientation=detector_orientation,
        detector=str(detector.name),
        pixel1=float(detector.pixel1),
        pixel2=float(detector.pixel2),
        shape=_shape2(detector.shape or detector.max_shape),
        wavelength=float(parameters["wavelength"]),
        dist=float(parameters["dist"]),
        poni1=float(parameters["poni1"]),
        poni2=float(parameters["poni2"]),
        rot1=float(parameters["rot1"]),
        rot2=float(parameters["rot2"]),
        rot3=float(parameters["rot3"]),
        calibrant=calibrant,
        n_rings=len(rings),
        n_points=0 if points is None else len(points),
        rms_residual=rms,
        rms_pixels=rms_pixels,
        n_expected=n_expected,
        rings=tuple(int(r) for r in rings),
        control_points=points,
        pyfai_detector=detector,
    )
