"""Least squares of control points with pyFAI's forward model.

:class:`PixelModel` gives the 2-theta and azimuth of pixels for a PONI parameter vector
(pyFAI's own :meth:`~pyFAI.geometry.Geometry.calc_pos_zyx` for whole images, the same
arithmetic vectorised for control points), without ever setting the geometry on a pyFAI
object (whose setters reset caches and run the garbage collector each time).
:func:`fit_with_rejection` fits ``dist``, ``poni1``, ``poni2``, ``rot1``, ``rot2`` (and the
wavelength) to control points in 2-theta, weighting each ring by its own scatter and
dropping points beyond five robust standard deviations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray
from scipy import optimize

if TYPE_CHECKING:  # pragma: no cover
    from pyFAI.detectors import Detector

__all__ = ["PixelModel", "fit_with_rejection", "least_squares", "rms_pixels", "two_theta"]


class PixelModel:
    """pyFAI's forward model for the valid pixels of one detector."""

    def __init__(self, detector: Detector, valid: NDArray[np.bool_]) -> None:
        from pyFAI.geometry import Geometry  # heavy: pyFAI, loaded on first use

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


def two_theta(wavelength: float, d: NDArray[np.float64]) -> NDArray[np.float64]:
    return 2.0 * np.arcsin(np.clip(wavelength / (2.0 * d), -1.0, 1.0))


def least_squares(
    model: PixelModel,
    points: NDArray[np.float64],
    dspacing: NDArray[np.float64],
    weights: NDArray[np.float64],
    param: list[float],
    wavelength: float,
    refine_wavelength: bool,
) -> tuple[list[float], float]:
    """Fit dist, poni1, poni2, rot1, rot2 (and the wavelength) to control points."""
    pos = model.positions(points[:, 0], points[:, 1])
    d = dspacing[points[:, 2].astype(np.int64)]
    sw = np.sqrt(weights)
    rot3 = param[5]

    def residual(x: NDArray[np.float64]) -> NDArray[np.float64]:
        wl = x[5] if refine_wavelength else wavelength
        return (model.tth_at(pos, [*x[:5], rot3]) - two_theta(wl, d)) * sw

    x0 = np.array(param[:5] + ([wavelength] if refine_wavelength else []))
    # all parameters are O(1e-2..1) in m, rad and Angstrom: one absolute difference step
    sol = optimize.least_squares(residual, x0, method="lm", diff_step=1e-7, xtol=1e-12, ftol=1e-12)
    x = sol.x
    return [*map(float, x[:5]), rot3], float(x[5]) if refine_wavelength else wavelength


def fit_with_rejection(
    model: PixelModel,
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
        param, wavelength = least_squares(
            model, points, dspacing, weights, param, wavelength, refine_wavelength
        )
        resid = model.tth(points[:, 0], points[:, 1], param) - two_theta(wavelength, dspacing[ring])
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


def rms_pixels(
    model: PixelModel, points: NDArray[np.float64], resid: NDArray, param: list
) -> float:
    """RMS of the residuals measured across the rings, in pixels."""
    r, c = points[:, 0], points[:, 1]
    g_r = model.tth(r + 0.5, c, param) - model.tth(r - 0.5, c, param)
    g_c = model.tth(r, c + 0.5, param) - model.tth(r, c - 0.5, param)
    grad = np.maximum(np.hypot(g_r, g_c), 1e-12)
    return float(np.sqrt(np.mean((resid / grad) ** 2)))
