"""Automatic powder calibration: from the image alone to a refined, checked geometry.

:func:`calibrate_powder` needs only the image, the detector, the calibrant and the
wavelength:

1. starting geometries come from the image itself (:mod:`.search`: ring centre from where
   the ring pixels' radii cluster best, distance from matching the radial profile to the
   calibrant's rings), followed by the caller's nominal geometry if one is given;
2. from each start, control points are picked on the predicted rings (:mod:`.rings`:
   per-sector Gaussian fits in 2-theta) and the PONI geometry (``dist``, ``poni1``,
   ``poni2``, ``rot1``, ``rot2``; the wavelength too if asked) is fitted to them by least
   squares in 2-theta with pyFAI's own forward model (:mod:`.fit`), low-angle rings first,
   adding rings and re-picking with the refined geometry until all rings on the detector
   are used and the parameters have settled;
3. a fit is accepted only if it passes the checks of :mod:`.quality` (enough rings, small
   RMS residual across the rings, no strong ring the calibrant does not explain).  The
   first accepted fit is returned; if none is accepted a
   :class:`~nxrefine_bs.errors.CalibrationQualityError` gives the numbers of the best
   attempt, so nothing wrong is ever written.

Measured on pyFAI-drawn CeO2/LaB6 images with Poisson noise (Pilatus 300K/1M, Eiger 1M,
tilts up to 2 deg, rings 0.03-0.3 deg wide, no hint): distance within 2e-5, beam centre
within 0.01 px, tilts within 0.005 deg (``tests/test_calibration_search.py``).  Rings
broader than about a quarter of their spacing are not picked (the band background is then
the ring itself).

``rot3`` (``roll``) is a rotation about the incident beam: it leaves every pixel's 2-theta
unchanged, so powder rings cannot determine it; it keeps the value of the nominal ``roll``.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..errors import CalibrationError, CalibrationQualityError
from .convert import DEFAULT_ORIENTATION, get_calibrant, nxrefine_to_poni
from .fit import PixelModel, fit_with_rejection, rms_pixels
from .images import prepare_image
from .quality import judge, unexplained_rings
from .result import CalibrationResult, result_from_parameters
from .rings import PixelTable, calibrant_rings, pick_ring, plan_rings
from .search import find_starts

if TYPE_CHECKING:  # pragma: no cover
    from pyFAI.calibrant import Calibrant
    from pyFAI.detectors import Detector

__all__ = ["calibrate_powder"]

logger = logging.getLogger(__name__)

_PARAMS = ("dist", "poni1", "poni2", "rot1", "rot2")

LOW_RINGS = 10
"""The share of rings found is judged on this many lowest-angle rings on the detector
(weak high-angle rings of a good image are often missed)."""


@dataclass
class _Fit:
    """State of one refinement from one start."""

    param: list[float]  # dist, poni1, poni2, rot1, rot2, rot3 (m, rad)
    wavelength: float  # Angstrom
    points: NDArray[np.float64]  # (n, 3) row, col, ring index
    rings: list[int]
    n_expected: int
    rms_deg: float
    rms_pixels: float
    failure: str = ""
    n_low_found: int = 0  # rings found among the LOW_RINGS lowest-angle expected ones
    n_low_expected: int = 0


def _refine_from(
    start: list[float],
    model: PixelModel,
    intensity: NDArray[np.float64],
    rings: list[tuple[int, float]],
    dspacing: NDArray[np.float64],
    wavelength: float,
    *,
    pixel: float,
    fix_wavelength: bool,
    max_rings: int,
    search_size: float,
    window: float,
    snr: float,
    max_iterations: int,
    give_up: float,
    give_up_fraction: float,
) -> _Fit:
    """Pick-and-refine cycles from one start (the geometry is never set on a pyFAI object).

    Stops early, as a failure, when two cycles with every ring tried still leave an RMS
    residual above ``give_up`` pixels or fewer than ``give_up_fraction`` of the rings found;
    stops after four such cycles even if the parameters still move (they then move by the
    scatter of the re-picked points).
    """
    param = list(start)
    n_use = min(3, max_rings)
    previous = None
    cycles_all_used = 0
    fit = _Fit(param, wavelength, np.empty((0, 3)), [], 0, math.inf, math.inf)
    for iteration in range(max_iterations):
        tth, chi = model.angles(param)
        plans = plan_rings(
            rings, float(tth.min()), float(tth.max()), param[0], pixel, search_size,
            window_px=window,
        )[:max_rings]  # fmt: skip
        if not plans:
            fit.failure = "no ring falls on the detector"
            return fit
        table = PixelTable.build(tth, chi, intensity, model.rows, model.cols, plans)

        def tth_at(r: NDArray, c: NDArray, p: list[float] = param) -> NDArray[np.float64]:
            return model.tth(r, c, p)

        picked: list[NDArray[np.float64]] = []
        used: list[int] = []
        for plan in plans:
            if len(used) >= n_use:
                break
            found = pick_ring(table, plan, snr, tth_at)
            if len(found.points) >= max(6, 0.15 * found.searched):
                used.append(plan.index)
                picked.append(
                    np.column_stack([found.points, np.full(len(found.points), plan.index)])
                )
        fit.n_expected = len(plans)
        if len(used) < 2:
            fit.rings = used
            fit.failure = f"found {len(used)} ring(s) with enough points"
            return fit
        points = np.concatenate(picked)
        param, wavelength, points, resid = fit_with_rejection(
            model, points, dspacing, param, wavelength, False
        )
        low = {plan.index for plan in plans[:LOW_RINGS]}
        fit = _Fit(
            param, wavelength, points, sorted(used), len(plans),
            float(np.degrees(np.sqrt(np.mean(resid**2)))),
            rms_pixels(model, points, resid, param),
            n_low_found=len(low.intersection(used)), n_low_expected=len(low),
        )  # fmt: skip
        logger.debug(
            "calibration cycle %d: %d of %d rings, %d points, rms %.5f deg (%.3f px)",
            iteration + 1, len(used), len(plans), len(points), fit.rms_deg, fit.rms_pixels,
        )  # fmt: skip
        now = np.array(param[:5])
        all_used = n_use >= len(plans)
        # converged: shifts below 2e-6 of the distance, 0.003 pixel and 2e-6 rad (1e-4 deg)
        tol = [2e-6 * param[0], 0.003 * pixel, 0.003 * pixel, 2e-6, 2e-6]
        converged = previous is not None and bool(np.all(np.abs(now - previous) < tol))
        previous = now
        if all_used and converged:
            break
        cycles_all_used += all_used
        hopeless = fit.rms_pixels > give_up or (
            fit.n_low_found < give_up_fraction * fit.n_low_expected
        )
        if cycles_all_used >= 4 or (cycles_all_used >= 2 and hopeless):
            break
        n_use = len(plans) if all_used else min(len(plans), max(n_use + 2, 2 * n_use))
    if not fix_wavelength:
        param, wavelength, points, resid = fit_with_rejection(
            model, fit.points, dspacing, fit.param, fit.wavelength, True
        )
        fit = _Fit(
            param, wavelength, points, fit.rings, fit.n_expected,
            float(np.degrees(np.sqrt(np.mean(resid**2)))),
            rms_pixels(model, points, resid, param),
            n_low_found=fit.n_low_found, n_low_expected=fit.n_low_expected,
        )  # fmt: skip
    return fit


def _check_unexplained(
    fit: _Fit,
    model: PixelModel,
    intensity: NDArray[np.float64],
    calibrant: Calibrant,
    max_unexplained: float,
    pixel: float,
) -> str:
    """Reason to refuse ``fit`` for strong rings the calibrant does not explain, or ''."""
    tth, _ = model.angles(fit.param)
    every = [t for t in calibrant.get_2th() if t is not None]
    found = unexplained_rings(tth, intensity, every, 0.5 * pixel / fit.param[0])
    strong = [(t, h) for t, h in found if h > max_unexplained]
    if not strong:
        return ""
    listed = ", ".join(f"{t:.3f} deg ({h:.0%})" for t, h in strong[:5])
    return (
        f"{len(strong)} ring(s) higher than {max_unexplained:.0%} of the strongest are not "
        f"explained by {calibrant.name}: 2-theta {listed}"
    )


def calibrate_powder(
    image: NDArray | str | os.PathLike[str],
    detector: str | Detector,
    calibrant: str | Calibrant = "CeO2",
    *,
    wavelength: float,
    distance: float | None = None,
    beam_center_x: float | None = None,
    beam_center_y: float | None = None,
    yaw: float = 0.0,
    pitch: float = 0.0,
    roll: float = 0.0,
    fix_wavelength: bool = True,
    max_rings: int = 20,
    search_size: float | None = None,
    mask: ArrayLike | None = None,
    snr: float = 5.0,
    min_rings: int = 3,
    min_ring_fraction: float = 0.5,
    max_rms_pixels: float = 0.5,
    max_unexplained: float | None = 0.1,
    max_iterations: int = 12,
    search: bool = True,
    max_starts: int = 4,
    detector_orientation: str = DEFAULT_ORIENTATION,
) -> CalibrationResult:
    """Calibrate the detector geometry from a powder image, without a starting geometry.

    Parameters
    ----------
    image : numpy.ndarray or path
        Powder image, or a file for :func:`~nxrefine_bs.calibration.images.load_image`.
        Negative and non-finite pixels are ignored, as are the detector's masked pixels.
    detector : str or pyFAI.detectors.Detector
        pyFAI detector name (e.g. ``"Pilatus CdTe 2M"``) or instance; its shape must
        match the image.
    calibrant : str or pyFAI.calibrant.Calibrant
        Calibrant name (default ``"CeO2"``), d-spacing file or instance.
    wavelength : float
        Wavelength in Angstrom.
    distance, beam_center_x, beam_center_y : float, optional
        A nominal geometry (mm; pixels, centre of pixel ``i`` at ``i``).  Not needed: it is
        tried after the starts found in the image (or only it, with ``search=False``).
    yaw, pitch, roll : float
        Nominal tilts, degrees (:class:`~nxrefine_bs.geometry.Geometry` convention), used
        with the nominal geometry.  ``roll`` is kept: it does not change any 2-theta.
    fix_wavelength : bool
        Keep the wavelength fixed (default).  If ``False`` it is refined in a last stage.
    max_rings : int
        Use at most this many (resolved) rings, from low angle up.
    search_size : float, optional
        Half-width in pixels of the band about each predicted ring searched for points
        (default: 10, or 3 ring widths for rings broader than about 3 pixels, as measured in
        the search's radial profile).
    mask : array_like, optional
        Extra pixel mask (nonzero = masked) of the image shape.
    snr : float
        Minimum peak height over the local background, in noise standard deviations.
    min_rings : int
        Fewest rings an accepted fit must use (at least 2).
    min_ring_fraction : float
        Smallest fraction of the :data:`LOW_RINGS` lowest-angle resolved rings on the
        detector an accepted fit must use.
    max_rms_pixels : float
        Largest RMS residual (pixels, measured across the rings) of an accepted fit.
    max_unexplained : float or None
        Refuse a fit when the 2-theta profile holds a ring that no calibrant reflection
        explains and that is higher than this fraction of the highest explained ring
        (``None``: no check).
    max_iterations : int
        Maximum number of pick-and-refine cycles per start.
    search : bool
        Look for starting geometries in the image (default).  ``False`` needs the nominal
        ``distance`` and beam centre.
    max_starts : int
        Most starts from the search to try.
    detector_orientation : str
        Detector orientation of the configuration (default ``"-y +z -x"``).

    Returns
    -------
    CalibrationResult

    Raises
    ------
    CalibrationQualityError
        If no start gives an acceptable fit; the message gives the rings found and expected
        and the RMS residual of the best attempt.
    CalibrationError
        If the image cannot be read or does not match the detector, or the calibrant is
        unknown.
    """
    img, det, valid, source = prepare_image(image, detector, mask)
    cal = get_calibrant(calibrant, wavelength)
    cal_name = cal.name if getattr(cal, "name", None) else str(calibrant)
    if not valid.any():
        raise CalibrationError(f"powder image {source} has no valid (unmasked) pixel")
    rings = calibrant_rings(cal)
    if not rings:
        raise CalibrationError(
            f"calibrant {cal_name} has no reflection at wavelength {wavelength} A"
        )
    dspacing = np.full(max(i for i, _ in rings) + 1, np.nan)
    for i, d in enumerate(cal.dspacing):
        if i < dspacing.size:
            dspacing[i] = d
    pixel = math.sqrt(det.pixel1 * det.pixel2)
    min_rings = max(2, int(min_rings))

    def poni_start(dist_mm: float, xc: float, yc: float, y: float, p: float) -> list[float]:
        par = nxrefine_to_poni(
            dist_mm, xc, yc, y, p, roll, det.pixel1, det.pixel2, detector_orientation
        )
        return [par[k] for k in (*_PARAMS, "rot3")]

    starts: list[tuple[str, list[float], float]] = []  # label, PONI, ring width (px)
    if search:
        for s in find_starts(img, valid, [t for _, t in rings])[: max(1, max_starts)]:
            label = (
                f"search start ({s.beam_center_x:.1f}, {s.beam_center_y:.1f}) px, "
                f"{s.distance_px * pixel * 1e3:.2f} mm"
            )
            par = poni_start(s.distance_px * pixel * 1e3, s.beam_center_x, s.beam_center_y, 0, 0)
            starts.append((label, par, s.ring_width))
    if distance is not None and beam_center_x is not None and beam_center_y is not None:
        label = f"nominal start ({beam_center_x:.1f}, {beam_center_y:.1f}) px, {distance:.2f} mm"
        width = starts[0][2] if starts else float("nan")
        par = poni_start(distance, beam_center_x, beam_center_y, yaw, pitch)
        starts.append((label, par, width))
    elif not search:
        raise CalibrationError(
            "calibration without search needs the nominal distance and beam centre"
        )
    if not starts:
        raise CalibrationQualityError(
            f"found no ring pattern of {cal_name} in powder image {source} (no radial-profile "
            f"peaks matching the calibrant at {wavelength} A); check the calibrant, the "
            "wavelength and that the image shows powder rings"
        )
    model = PixelModel(det, valid)
    intensity = img[valid]
    attempts: list[tuple[str, _Fit, str]] = []
    for label, start, ring_width in starts:
        # broad rings (FWHM > ~3 px) need a wider band and centroid window
        width = ring_width if math.isfinite(ring_width) else 0.0
        fit = _refine_from(
            start, model, intensity, rings, dspacing, wavelength, pixel=pixel,
            fix_wavelength=fix_wavelength, max_rings=max_rings,
            search_size=search_size if search_size else max(10.0, 3.0 * width),
            window=max(3.0, 1.5 * width), snr=snr, max_iterations=max_iterations,
            give_up=max_rms_pixels, give_up_fraction=min_ring_fraction,
        )  # fmt: skip
        verdict = judge(
            failure=fit.failure, n_rings=len(fit.rings), n_low_found=fit.n_low_found,
            n_low_expected=fit.n_low_expected,
            rms_pixels=fit.rms_pixels, rms_deg=fit.rms_deg, min_rings=min_rings,
            min_ring_fraction=min_ring_fraction, max_rms_pixels=max_rms_pixels,
        )  # fmt: skip
        good_fit = not verdict
        if good_fit and max_unexplained is not None:
            verdict = _check_unexplained(fit, model, intensity, cal, max_unexplained, pixel)
        logger.info(
            "%s: %d of %d rings, rms %.3f px -> %s",
            label, len(fit.rings), fit.n_expected, fit.rms_pixels, verdict or "accepted",
        )  # fmt: skip
        attempts.append((label, fit, verdict))
        if good_fit:  # accepted, or a good fit of the wrong calibrant: no start does better
            break
    # the best attempt: accepted, else a good fit refused for another reason, else most rings
    label, fit, verdict = min(
        attempts,
        key=lambda a: (bool(a[2]), not a[1].rms_pixels <= max_rms_pixels, -len(a[1].rings),
                       a[1].rms_pixels),
    )  # fmt: skip
    if verdict:
        raise CalibrationQualityError(
            f"powder calibration of {source} with {cal_name} at {wavelength} A failed: "
            f"best of {len(attempts)} start(s) ({label}) used {len(fit.rings)} of "
            f"{fit.n_expected} rings expected on the detector with RMS "
            f"{fit.rms_pixels:.3f} px ({fit.rms_deg:.5f} deg 2-theta): {verdict}; "
            "check the calibrant, wavelength and detector, or relax min_rings/"
            "max_rms_pixels if the image is known to be good"
        )

    parameters = dict(zip((*_PARAMS, "rot3"), fit.param, strict=True))
    parameters["wavelength"] = fit.wavelength * 1e-10
    result = result_from_parameters(
        parameters,
        det,
        calibrant=cal_name,
        rings=fit.rings,
        points=fit.points,
        rms=fit.rms_deg,
        rms_pixels=fit.rms_pixels,
        n_expected=fit.n_expected,
        detector_orientation=detector_orientation,
    )
    logger.info("powder calibration: %s", result.summary())
    return result
