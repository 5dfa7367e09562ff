"""Automatic control-point picking on the rings of a calibrant.

Given a geometry (the 2-theta and azimuth of every valid pixel) and the calibrant's ring
angles, :func:`plan_rings` lists the rings that fall on the detector and are resolved from
their neighbours, and :func:`pick_ring` picks control points along one ring: the pixels of a
band of ``search_size`` pixels about the predicted ring are split into short azimuthal
sectors; in each sector the brightest pixel must stand out of the local background and the
point is the background-subtracted centroid of the pixels within a window about it.

Two details keep the points unbiased at the 0.01-pixel level the calibration needs:

* the window is re-centred on the centroid until it settles, so the clipped-noise weights
  (which pull a centroid towards the middle of its window) pull it towards the peak itself;
* the centroid is taken in 2-theta, not in pixel coordinates: the pixel centroid of a curved
  arc lies inside the arc (by ``s**2 / 24 r`` for a sector of arc length ``s`` at radius
  ``r``, 0.02 px for 8-px sectors at 150 px), which biases the distance.  The point returned
  is the pixel centroid moved along the 2-theta gradient onto the centroid's 2-theta.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:  # pragma: no cover
    from pyFAI.calibrant import Calibrant

__all__ = ["PixelTable", "RingPlan", "calibrant_rings", "pick_ring", "plan_rings"]

TthFunction = Callable[[NDArray[np.float64], NDArray[np.float64]], NDArray[np.float64]]
"""``tth(rows, cols)``: 2-theta (rad) at pixel coordinates (centre of pixel ``i`` at ``i``)."""


def calibrant_rings(calibrant: Calibrant) -> list[tuple[int, float]]:
    """``(index, 2-theta in rad)`` of the calibrant's reflections, sorted, without ``None``."""
    out = [(i, float(t)) for i, t in enumerate(calibrant.get_2th()) if t is not None]
    out.sort(key=lambda it: it[1])
    return out


@dataclass(frozen=True)
class RingPlan:
    """Where to look for one ring.

    Attributes
    ----------
    index : int
        Index of the reflection in the calibrant's list.
    tth : float
        Predicted 2-theta, rad.
    half_width : float
        Half-width of the searched band, rad of 2-theta.
    window : float
        Half-width of the centroid window about the peak, rad of 2-theta.
    n_sectors : int
        Number of azimuthal sectors.
    """

    index: int
    tth: float
    half_width: float
    window: float
    n_sectors: int


def plan_rings(
    rings: Sequence[tuple[int, float]],
    tmin: float,
    tmax: float,
    distance_m: float,
    pixel: float,
    search_size: float,
    sector_px: float = 8.0,
    window_px: float = 3.0,
) -> list[RingPlan]:
    """Rings between ``tmin`` and ``tmax`` (rad) that are resolved from their neighbours.

    Parameters
    ----------
    rings : sequence of (int, float)
        Output of :func:`calibrant_rings`.
    tmin, tmax : float
        2-theta range covered by the detector, rad.
    distance_m, pixel : float
        Distance and pixel size, metres (for the angular size of a pixel).
    search_size : float
        Half-width of the band searched about each ring, pixels.
    sector_px : float
        Arc length of an azimuthal sector, pixels.
    window_px : float
        Half-width of the centroid window about a ring's peak, pixels.
    """
    values = np.array([t for _, t in rings])
    plans = []
    for k, (idx, t0) in enumerate(rings):
        px = pixel * math.cos(t0) ** 2 / distance_m  # 2-theta per pixel, normal incidence
        gaps = []
        if k > 0:
            gaps.append(t0 - values[k - 1])
        if k + 1 < len(values):
            gaps.append(values[k + 1] - t0)
        gap = min(gaps) if gaps else np.inf
        half = min(search_size * px, 0.45 * gap)
        if half < 2.0 * px:  # unresolved from a neighbour
            continue
        if not tmin < t0 < tmax:  # ring not on the detector
            continue
        radius_px = distance_m * math.tan(t0) / pixel
        n_sec = int(np.clip(round(2 * math.pi * radius_px / sector_px), 8, 720))
        plans.append(RingPlan(idx, t0, half, min(half, window_px * px), n_sec))
    return plans


@dataclass
class PixelTable:
    """Valid pixels inside the bands of some rings, sorted by 2-theta."""

    tth: NDArray[np.float64]
    chi: NDArray[np.float64]
    intensity: NDArray[np.float64]
    row: NDArray[np.float64]
    col: NDArray[np.float64]

    @classmethod
    def build(
        cls,
        tth: NDArray[np.float64],
        chi: NDArray[np.float64],
        intensity: NDArray[np.float64],
        row: NDArray[np.float64],
        col: NDArray[np.float64],
        plans: Sequence[RingPlan],
    ) -> PixelTable:
        """Table of the pixels (1-D arrays of the valid ones) inside the bands of ``plans``."""
        edges = np.array([[p.tth - p.half_width, p.tth + p.half_width] for p in plans]).ravel()
        order_edges = np.argsort(edges, kind="stable")
        edges = edges[order_edges]
        inside = np.searchsorted(edges, tth) % 2 == 1
        sel = np.flatnonzero(inside)
        order = sel[np.argsort(tth[sel], kind="stable")]
        return cls(
            tth=tth[order],
            chi=chi[order],
            intensity=intensity[order].astype(np.float64),
            row=row[order],
            col=col[order],
        )

    def band(self, lo: float, hi: float) -> slice:
        """Slice of the pixels with ``lo <= tth < hi``."""
        i0, i1 = np.searchsorted(self.tth, [lo, hi])
        return slice(int(i0), int(i1))


@dataclass(frozen=True)
class RingPoints:
    """Control points picked on one ring.

    Attributes
    ----------
    points : numpy.ndarray
        ``(n, 2)`` (row, column) positions on the ring, centre of pixel ``i`` at ``i``.
    weight : numpy.ndarray
        Background-subtracted counts behind each point (a precision weight).
    searched : int
        Number of sectors that held enough pixels to be searched.
    """

    points: NDArray[np.float64]
    weight: NDArray[np.float64]
    searched: int


def _empty(searched: int = 0) -> RingPoints:
    return RingPoints(np.empty((0, 2)), np.empty(0), searched)


def pick_ring(
    table: PixelTable,
    plan: RingPlan,
    snr: float,
    tth_at: TthFunction,
    recentre: int = 3,
    gaussian: bool = True,
) -> RingPoints:
    """Pick control points on one ring.

    Pixels within ``plan.half_width`` of the predicted 2-theta are split into
    ``plan.n_sectors`` azimuthal sectors.  In each sector the background is the median and
    the noise the spread between the 16th and 50th percentiles.  The brightest pixel must
    stand ``snr`` noise levels above the background, away from the band edges, and the summed
    excess of the pixels within ``plan.window`` of the peak must be significant at ``snr``
    standard deviations as well.  The window is re-centred ``recentre`` times on the
    background-subtracted 2-theta centroid of its pixels, and the point is placed where the
    2-theta of the current geometry equals that centroid (see the module docstring).

    Parameters
    ----------
    table : PixelTable
        Pixels of the ring bands.
    plan : RingPlan
        The ring.
    snr : float
        Significance threshold, in noise standard deviations.
    tth_at : callable
        ``tth_at(rows, cols)``: 2-theta (rad) of the current geometry at pixel coordinates.
    recentre : int
        Number of window re-centring passes.
    """
    n_sectors, window = plan.n_sectors, plan.window
    sl = table.band(plan.tth - plan.half_width, plan.tth + plan.half_width)
    if sl.stop - sl.start < 10:
        return _empty()
    t = table.tth[sl]
    inten = table.intensity[sl]
    sector = np.floor((table.chi[sl] + np.pi) / (2 * np.pi) * n_sectors).astype(np.int64)
    np.clip(sector, 0, n_sectors - 1, out=sector)
    order = np.lexsort((inten, sector))
    counts = np.bincount(sector, minlength=n_sectors)
    starts = np.cumsum(counts) - counts
    ok = counts >= 8
    searched = int(ok.sum())
    if not searched:
        return _empty()
    s_ok = np.flatnonzero(ok)
    c_ok = counts[s_ok]
    st_ok = starts[s_ok]
    sorted_i = inten[order]
    bkg = sorted_i[st_ok + c_ok // 2]
    low = sorted_i[st_ok + (c_ok * 16) // 100]
    sigma = np.maximum(bkg - low, 1e-9 + 1e-4 * np.abs(bkg))
    peak_pos = order[st_ok + c_ok - 1]
    height = inten[peak_pos] - bkg
    t_peak = t[peak_pos]
    good = (height > snr * sigma) & (np.abs(t_peak - plan.tth) < 0.8 * plan.half_width)

    # per-pixel lookup of its sector's statistics
    bkg_s = np.zeros(n_sectors)
    sig_s = np.full(n_sectors, np.inf)
    centre = np.full(n_sectors, np.nan)
    bkg_s[s_ok[good]] = bkg[good]
    sig_s[s_ok[good]] = sigma[good]
    centre[s_ok[good]] = t_peak[good]
    excess = inten - bkg_s[sector]
    w_all = np.clip(excess, 0.0, None)
    for _ in range(max(1, recentre)):
        near = np.abs(t - centre[sector]) < window
        w = np.where(near, w_all, 0.0)
        wsum = np.bincount(sector, weights=w, minlength=n_sectors)
        tsum = np.bincount(sector, weights=w * t, minlength=n_sectors)
        with np.errstate(invalid="ignore", divide="ignore"):
            new = tsum / wsum
        # keep the centre where a sector lost all its weight
        centre = np.where(wsum > 0, new, centre)
    if gaussian:
        centre = _gaussian_centres(t, inten, sector, n_sectors, centre, bkg_s, window)
    near = np.abs(t - centre[sector]) < window
    w = np.where(near, w_all, 0.0)
    total = np.bincount(sector, weights=np.where(near, excess, 0.0), minlength=n_sectors)
    n_near = np.bincount(sector, weights=near.astype(np.float64), minlength=n_sectors)
    wsum = np.bincount(sector, weights=w, minlength=n_sectors)
    rows = np.bincount(sector, weights=w * table.row[sl], minlength=n_sectors)
    cols = np.bincount(sector, weights=w * table.col[sl], minlength=n_sectors)
    keep = (
        (wsum > 0)
        & np.isfinite(centre)
        & (total > snr * sig_s * np.sqrt(np.maximum(n_near, 1.0)))
        & (np.abs(centre - plan.tth) < 0.9 * plan.half_width)
    )
    if not keep.any():
        return _empty(searched)
    r0 = rows[keep] / wsum[keep]
    c0 = cols[keep] / wsum[keep]
    target = centre[keep]
    r1, c1 = _onto_contour(r0, c0, target, tth_at)
    return RingPoints(np.column_stack([r1, c1]), total[keep], searched)


def _onto_contour(
    rows: NDArray[np.float64],
    cols: NDArray[np.float64],
    target: NDArray[np.float64],
    tth_at: TthFunction,
    step: float = 0.5,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Move each point along the 2-theta gradient onto the 2-theta ``target`` (two Newton steps)."""
    for _ in range(2):
        t0 = tth_at(rows, cols)
        g_r = (tth_at(rows + step, cols) - tth_at(rows - step, cols)) / (2 * step)
        g_c = (tth_at(rows, cols + step) - tth_at(rows, cols - step)) / (2 * step)
        g2 = g_r * g_r + g_c * g_c
        scale = np.where(g2 > 0, (target - t0) / np.where(g2 > 0, g2, 1.0), 0.0)
        rows = rows + scale * g_r
        cols = cols + scale * g_c
    return rows, cols


def _gaussian_centres(
    t: NDArray[np.float64],
    inten: NDArray[np.float64],
    sector: NDArray[np.int64],
    n_sectors: int,
    centre: NDArray[np.float64],
    bkg: NDArray[np.float64],
    window: float,
    iterations: int = 6,
) -> NDArray[np.float64]:
    """Refine sector centres by fitting ``B + A exp(-(t - mu)^2 / 2 s^2)`` to their pixels.

    All sectors are fitted at once (Gauss-Newton with the normal equations summed per
    sector by ``bincount``).  A first pass fits ``s`` in every sector and takes the ring's
    width as their median; the second fits ``B``, ``A`` and ``mu`` with that width.  Where a
    fit fails (non-finite, ``A <= 0`` or ``mu`` moving more than half the window) the
    centroid is kept.
    """
    has = np.isfinite(centre)
    if not has.any():
        return centre
    c0 = np.where(has, centre, 0.0)
    near = np.abs(t - c0[sector]) < window
    near &= has[sector]
    ts, ys, ss = t[near], inten[near], sector[near]
    u = (ts - c0[ss]) / window  # offsets in units of the window
    n = np.bincount(ss, minlength=n_sectors).astype(np.float64)
    fit_ok = has & (n >= 5)
    b = np.where(fit_ok, bkg, 0.0)
    top = np.zeros(n_sectors)
    np.maximum.at(top, ss, ys)
    a = np.maximum(top - b, 1e-9)
    mu = np.zeros(n_sectors)
    width = np.full(n_sectors, 0.25)

    def solve(n_par: int) -> None:
        nonlocal b, a, mu, width
        for _ in range(iterations):
            d = u - mu[ss]
            w2 = width[ss] ** 2
            g = np.exp(-0.5 * d * d / w2)
            resid = ys - (b[ss] + a[ss] * g)
            jac = [np.ones_like(g), g, a[ss] * g * d / w2, a[ss] * g * d * d / (w2 * width[ss])]
            jac = jac[:n_par]
            mat = np.empty((n_sectors, n_par, n_par))
            vec = np.empty((n_sectors, n_par))
            for i in range(n_par):
                vec[:, i] = np.bincount(ss, jac[i] * resid, n_sectors)
                for j in range(i, n_par):
                    mat[:, i, j] = mat[:, j, i] = np.bincount(ss, jac[i] * jac[j], n_sectors)
            mat += (
                np.eye(n_par)
                * (1e-9 + 1e-6 * np.abs(np.diagonal(mat, axis1=1, axis2=2)))[:, :, None]
            )
            with np.errstate(all="ignore"):
                step = np.linalg.solve(mat[fit_ok], vec[fit_ok][..., None])[..., 0]
            step = np.where(np.isfinite(step), step, 0.0)
            b[fit_ok] += step[:, 0]
            a[fit_ok] += step[:, 1]
            mu[fit_ok] = np.clip(mu[fit_ok] + step[:, 2], -0.5, 0.5)
            if n_par > 3:
                width[fit_ok] = np.clip(width[fit_ok] + step[:, 3], 0.02, 1.0)

    solve(4)
    good = fit_ok & (a > 0) & np.isfinite(width)
    if good.any():
        width[:] = float(np.median(width[good]))
    mu[:] = 0.0
    solve(3)
    good = fit_ok & (a > 0) & np.isfinite(mu) & (np.abs(mu) < 0.5)
    return np.where(good, c0 + mu * window, centre)
