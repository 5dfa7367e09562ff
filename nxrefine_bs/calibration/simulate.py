"""Synthetic powder-calibration images from a known detector geometry.

The rings are drawn by pyFAI itself (the two calls of
:meth:`pyFAI.calibrant.Calibrant.fake_calibration_image`, through an
:class:`~pyFAI.integrator.azimuthal.AzimuthalIntegrator` set up with the requested PONI
geometry, with a finer 1-D pattern, see :func:`_fake_image`), so an image made here is, by
construction, consistent with pyFAI's own geometry model.  They are used by the tests and
benchmarks of the calibration.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from ..errors import CalibrationError
from .convert import get_calibrant, get_detector

if TYPE_CHECKING:  # pragma: no cover
    from pyFAI.detectors import Detector

__all__ = ["simulate_powder_image"]

logger = logging.getLogger(__name__)

GAP_VALUE = -1.0
"""Value written into masked pixels (module gaps, dead pixels), as Pilatus detectors do."""


def simulate_powder_image(
    detector: str | Detector,
    calibrant: str = "CeO2",
    *,
    wavelength: float,
    distance_m: float,
    poni1: float,
    poni2: float,
    rot1: float = 0.0,
    rot2: float = 0.0,
    rot3: float = 0.0,
    seed: int | None = 0,
    background: float = 20.0,
    peak_intensity: float = 1000.0,
    fwhm_deg: float = 0.03,
    noise: bool = True,
) -> NDArray[np.float32]:
    """Simulate a powder diffraction image of a calibrant on a pyFAI detector.

    Parameters
    ----------
    detector : str or pyFAI.detectors.Detector
        pyFAI detector name (e.g. ``"Pilatus CdTe 2M"``) or instance.
    calibrant : str
        pyFAI calibrant name (e.g. ``"CeO2"``, ``"LaB6"``).
    wavelength : float
        X-ray wavelength in **Angstrom** (the package-wide convention; pyFAI itself uses m).
    distance_m, poni1, poni2 : float
        PONI geometry in metres, exactly as in a pyFAI ``.poni`` file.
    rot1, rot2, rot3 : float
        pyFAI detector rotations in **radians**.
    seed : int or None
        Seed of the Poisson noise generator (``numpy.random.default_rng``).
    background : float
        Flat background level added to every pixel (counts).
    peak_intensity : float
        Peak height of the rings before the solid-angle correction (counts).
    fwhm_deg : float
        Full width at half maximum of every ring, in degrees of 2-theta.
    noise : bool
        Draw Poisson counts (``True``) or return the noise-free expectation.

    Returns
    -------
    numpy.ndarray
        ``float32`` image of the detector shape; pixels masked by the detector definition
        (module gaps) hold ``-1``, like a Pilatus image.

    Raises
    ------
    CalibrationError
        If the detector or calibrant is unknown, or the wavelength does not look like Angstrom.
    """
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator  # heavy: pyFAI, loaded on first use

    if not 1e-3 < wavelength < 100:
        raise CalibrationError(
            f"wavelength {wavelength!r} is not in Angstrom (expected roughly 0.1-5 A)"
        )
    det = get_detector(detector)
    cal = get_calibrant(calibrant, wavelength)
    ai = AzimuthalIntegrator(
        dist=distance_m,
        poni1=poni1,
        poni2=poni2,
        rot1=rot1,
        rot2=rot2,
        rot3=rot3,
        detector=det,
        wavelength=wavelength * 1e-10,
    )
    logger.debug("simulating %s rings on %s: %s", cal.name, det.name, ai)
    rings = _fake_image(cal, ai, det.shape, peak_intensity, fwhm_deg)
    expected = np.asarray(rings, dtype=np.float64) + background
    if noise:
        rng = np.random.default_rng(seed)
        image = rng.poisson(np.clip(expected, 0.0, None)).astype(np.float32)
    else:
        image = expected.astype(np.float32)
    if det.mask is not None:
        image[np.asarray(det.mask, dtype=bool)] = GAP_VALUE
    return image


def _fake_image(
    calibrant: Any, ai: Any, shape: tuple[int, int], peak_intensity: float, fwhm_deg: float
) -> NDArray[np.float64]:
    """pyFAI's ``fake_calibration_image`` with a 1-D pattern fine enough for narrow rings.

    pyFAI draws the powder pattern on ``hypot(*shape)`` points across the image's 2-theta
    range and interpolates it linearly onto the pixels.  When a ring is narrower than about
    two such steps (0.03 deg rings on a Pilatus 300K at 150 mm: FWHM 0.9 step) the
    interpolated ring is no longer symmetric about its true 2-theta and moves by up to
    ~1e-4 of its radius, depending on where it falls between grid points.  Here the same
    two pyFAI calls (:meth:`~pyFAI.calibrant.Calibrant.fake_xrpdp` and
    :meth:`~pyFAI.integrator.azimuthal.AzimuthalIntegrator.calcfrom1d` with the solid-angle
    factor) are made with at least 20 points per FWHM.
    """
    from pyFAI import units  # heavy: pyFAI, loaded on first use

    tth = ai.array_from_unit(shape=shape, typ="center", unit=units.TTH_DEG, scale=True)
    tmin, tmax = float(tth.min()), float(tth.max())
    nbpt = max(int(math.hypot(*shape)), math.ceil((tmax - tmin) * 20.0 / fwhm_deg) + 1)
    pattern = calibrant.fake_xrpdp(
        nbpt, (tmin, tmax), background=0.0, Imax=peak_intensity, resolution=fwhm_deg
    )
    return np.asarray(
        ai.calcfrom1d(
            pattern.radial, pattern.intensity, shape=shape, mask=ai.mask,
            dim1_unit=pattern.unit, correctSolidAngle=True,
        ),
        dtype=np.float64,
    )  # fmt: skip
