"""Automatic powder calibration: from the image alone to a refined, checked geometry.

:func:`calibrate_powder` needs only the image, the detector, the calibrant and the
wavelength:

1. starting geometries come from the image itself (:mod:`.search`: ring centre from the
   image's self-convolution, distance from matching the radial profile to the calibrant's
   rings), followed by the caller's nominal geometry if one is given;
2. from each start, control points are picked on the predicted rings (:mod:`.rings`) and the
   PONI geometry (``dist``, ``poni1``, ``poni2``, ``rot1``, ``rot2``; the wavelength too if
   asked) is fitted to them by least squares in 2-theta with pyFAI's own forward model
   (:meth:`pyFAI.geometry.Geometry.tth`), low-angle rings first, adding rings and
   re-picking with the refined geometry until all rings on the detector are used and the
   parameters have settled; points beyond five robust standard deviations of their ring are
   dropped and each ring is weighted by its own scatter;
3. a fit is accepted only if it uses enough rings (``min_rings``, and at least
   ``min_ring_fraction`` of the resolved rings on the detector) and its RMS residual is at
   most ``max_rms_pixels`` (in pixels across the ring).  The first accepted fit is returned;
   if none is accepted a :class:`~nxrefine_bs.errors.CalibrationQualityError` gives the
   numbers of the best attempt, so nothing wrong is ever written.

``rot3`` (``roll``) is a rotation about the incident beam: it leaves every pixel's 2-theta
unchanged, so powder rings cannot determine it; it keeps the value of the nominal ``roll``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..errors import CalibrationError, CalibrationQualityError
from .convert import DEFAULT_ORIENTATION, get_calibrant, nxrefine_to_poni
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


class _Model:
    """pyFAI's forward model for the valid pixels of one detector."""

    def __init__(self, detector: Detector, valid: NDArray[np.bool_]) -> None:
        from pyFAI.geometry import Geometry

        self.geometry = Geometry(detector=detector)
        rows, cols = np.nonzero(valid)
        self.rows = rows.astype(np.float64)
        self.cols = cols.astype(np.float64)

    def angles(self, param: Sequence[float]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """2-theta and azimuth (rad) of every valid pixel for PONI ``param`` (6 values)."""
        t3, t1, t2 = self.geometry.calc_pos_zyx(d1=self.rows, d2=self.cols, param=list(param))
        return np.arctan2(np.hypot(t1, t2), t3), np.arctan2(t1, t2)

    def positions(
        self, rows: NDArray[np.float64], cols: NDArray[np.float64]
    ) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
        """Detector-frame positions (m) of pixel coordinates (centre of pixel ``i`` at ``i``)."""
        p1, p2, p3 = self.geometry.detector.calc_cartesian_positions(rows, cols)
        p3 = np.zeros_like(p1) if p3 is None else np.asarray(p3, dtype=np.float64)
        return np.asarray(p1, np.float64), np.asarray(p2, np.float64), p3

    def tth_at(
        self,
        pos: tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]],
        param: Sequence[float],
    ) -> NDArray[np.float64]:
        """2-theta (rad) of detector positions ``pos`` for PONI ``param``.

        The same arithmetic as :meth:`pyFAI.geometry.Geometry.calc_pos_zyx` (pyFAI's own
        rotation matrix applied to ``(p1 - poni1, p2 - poni2, dist + p3)``), vectorised for
        the few thousand control points of a least-squares fit.
        """
        p1, p2, p3 = pos
        rot = self.geometry.rotation_matrix(list(param))
        d1, d2, d3 = p1 - param[1], p2 - param[2], p3 + param[0]
        t1 = rot[0, 0] * d1 + rot[0, 1] * d2 + rot[0, 2] * d3
        t2 = rot[1, 0] * d1 + rot[1, 1] * d2 + rot[1, 2] * d3
        t3 = rot[2, 0] * d1 + rot[2, 1] * d2 + rot[2, 2] * d3
        return np.arctan2(np.hypot(t1, t2), t3)

    def tth(
        self, rows: NDArray[np.float64], cols: NDArray[np.float64], param: Sequence[float]
    ) -> NDArray[np.float64]:
        """2-theta (rad) at pixel coordinates ``(rows, cols)`` (centre of pixel ``i`` at ``i``)."""
        return self.tth_at(self.positions(rows, cols), param)


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


def _two_theta(wavelength: float, d: NDArray[np.float64]) -> NDArray[np.float64]:
    return 2.0 * np.arcsin(np.clip(wavelength / (2.0 * d), -1.0, 1.0))


def _least_squares(
    model: _Model,
    points: NDArray[np.float64],
    dspacing: NDArray[np.float64],
    weights: NDArray[np.float64],
    param: list[float],
    wavelength: float,
    refine_wavelength: bool,
) -> tuple[list[float], float]:
    """Fit dist, poni1, poni2, rot1, rot2 (and the wavelength) to control points."""
    from scipy.optimize import least_squares

    pos = model.positions(points[:, 0], points[:, 1])
    d = dspacing[points[:, 2].astype(np.int64)]
    sw = np.sqrt(weights)
    rot3 = param[5]

    def residual(x: NDArray[np.float64]) -> NDArray[np.float64]:
        wl = x[5] if refine_wavelength else wavelength
        return (model.tth_at(pos, [*x[:5], rot3]) - _two_theta(wl, d)) * sw

    x0 = np.array(param[:5] + ([wavelength] if refine_wavelength else []))
    # all parameters are O(1e-2..1) in m, rad and Angstrom: one absolute difference step
    sol = least_squares(residual, x0, method="lm", diff_step=1e-7, xtol=1e-12, ftol=1e-12)
    x = sol.x
    return [*map(float, x[:5]), rot3], float(x[5]) if refine_wavelength else wavelength


def _fit_with_rejection(
    model: _Model,
    points: NDArray[np.float64],
    dspacing: NDArray[np.float64],
    param: list[float],
    wavelength: float,
    refine_wavelength: bool,
    rounds: int = 4,
) -> tuple[list[float], float, NDArray[np.float64], NDArray[np.float64]]:
    """Weighted fit; drop points beyond 5 robust standard deviations of their ring; repeat.

    Returns the parameters, wavelength, the points kept and their residuals (rad).
    """
    ring = points[:, 2].astype(np.int64)
    weights = np.ones(len(points))
    resid = np.zeros(len(points))
    for _ in range(rounds):
        param, wavelength = _least_squares(
            model, points, dspacing, weights, param, wavelength, refine_wavelength
        )
        resid = model.tth(points[:, 0], points[:, 1], param) - _two_theta(
            wavelength, dspacing[ring]
        )
        sigma = np.empty(len(points))
        for k in np.unique(ring):
            sel = ring == k
            r = resid[sel]
            sigma[sel] = max(1.4826 * float(np.median(np.abs(r - np.median(r)))), 1e-9)
        good = np.abs(resid) <= 5.0 * sigma
        weights = 1.0 / sigma**2
        if good.all() or good.sum() < 10:
            break
        points, resid, weights, ring = points[good], resid[good], weights[good], ring[good]
    return param, wavelength, points, resid


def _rms_pixels(model: _Model, points: NDArray[np.float64], resid: NDArray, param: list) -> float:
    """RMS of the residuals measured across the rings, in pixels."""
    r, c = points[:, 0], points[:, 1]
    g_r = model.tth(r + 0.5, c, param) - model.tth(r - 0.5, c, param)
    g_c = model.tth(r, c + 0.5, param) - model.tth(r, c - 0.5, param)
    grad = np.maximum(np.hypot(g_r, g_c), 1e-12)
    return float(np.sqrt(np.mean((resid / grad) ** 2)))


def _refine_from(
    start: list[float],
    model: _Model,
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
    give_up_rms: float,
) -> _Fit:
    """Pick-and-refine cycles from one start (the geometry is never set on a pyFAI object).

    Stops early, as a failure, when two cycles with every ring tried still leave an RMS
    residual above ``give_up_rms`` pixels.
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
        param, wavelength, points, resid = _fit_with_rejection(
            model, points, dspacing, param, wavelength, False
        )
        fit = _Fit(
            param, wavelength, points, sorted(used), len(plans),
            float(np.degrees(np.sqrt(np.mean(resid**2)))),
            _rms_pixels(model, points, resid, param),
        )  # fmt: skip
        logger.debug(
            "calibration cycle %d: %d of %d rings, %d points, rms %.5f deg (%.3f px)",
            iteration + 1, len(used), len(plans), len(points), fit.rms_deg, fit.rms_pixels,
        )  # fmt: skip
        now = np.array(param[:5])
        all_used = n_use >= len(plans)
        # converged: shifts below 1e-6 of the distance, 0.002 pixel and 1e-6 rad
        tol = [1e-6 * param[0], 0.002 * pixel, 0.002 * pixel, 1e-6, 1e-6]
        converged = previous is not None and bool(np.all(np.abs(now - previous) < tol))
        previous = now
        if all_used and converged:
            break
        cycles_all_used += all_used
        if cycles_all_used >= 2 and fit.rms_pixels > give_up_rms:
            break
        n_use = len(plans) if all_used else min(len(plans), max(n_use + 2, 2 * n_use))
    if not fix_wavelength:
        param, wavelength, points, resid = _fit_with_rejection(
            model, fit.points, dspacing, fit.param, fit.wavelength, True
        )
        fit = _Fit(
            param, wavelength, points, fit.rings, fit.n_expected,
            float(np.degrees(np.sqrt(np.mean(resid**2)))),
            _rms_pixels(model, points, resid, param),
        )  # fmt: skip
    return fit


def _check_unexplained(
    fit: _Fit,
    model: _Model,
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
        Smallest fraction of the resolved rings on the detector an accepted fit must use.
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
    model = _Model(det, valid)
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
            give_up_rms=3.0 * max_rms_pixels,
        )  # fmt: skip
        verdict = judge(
            failure=fit.failure, n_rings=len(fit.rings), n_expected=fit.n_expected,
            rms_pixels=fit.rms_pixels, rms_deg=fit.rms_deg, min_rings=min_rings,
            min_ring_fraction=min_ring_fraction, max_rms_pixels=max_rms_pixels,
        )  # fmt: skip
        if not verdict and max_unexplained is not None:
            verdict = _check_unexplained(fit, model, intensity, cal, max_unexplained, pixel)
        logger.info(
            "%s: %d of %d rings, rms %.3f px -> %s",
            label, len(fit.rings), fit.n_expected, fit.rms_pixels, verdict or "accepted",
        )  # fmt: skip
        attempts.append((label, fit, verdict))
        if not verdict:
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
