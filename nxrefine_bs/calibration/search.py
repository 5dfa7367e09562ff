"""Starting geometries for a powder calibration from the image alone (no hint).

Only the calibrant's ring angles, the pixel size and the image are used:

1. **Ring centre** (:func:`find_centres`).  The pixels that stand out of a smooth
   background are the rings.  About the right centre their radii cluster at the ring
   radii; about a wrong one they spread out.  A coarse grid of centres over the detector
   (and a margin about it) is scored by how sharply the radii cluster, and the best local
   maxima are refined on finer grids.  This works for complete rings and for arcs alike
   (the beam near an edge, or large rings of which only arcs reach the detector), where a
   centro-symmetry test (self-convolution of the image) fails.
2. **Distance** (:func:`find_distances`).  The azimuthally averaged profile about a
   candidate centre shows the rings as peaks at radii ``r_k = D tan(2 theta_k)``.  ``D``
   (pixels) is scanned on a fine logarithmic grid; each value is scored by the fraction of
   predicted rings (on the detector) that match an observed peak times the (SNR-weighted)
   fraction of observed peaks that a predicted ring explains.  Requiring both removes the
   scale ambiguities of cubic calibrants (``D/2``, ``2D``, ``sqrt(2) D`` put many predicted
   rings on observed ones but leave rings unexplained or predict rings where there are
   none).  The best ``D`` is then fitted by least squares to its matched peaks.

The starts are only approximate for a tilted detector (the rings are ellipses whose centres
move away from the beam with 2-theta); :func:`nxrefine_bs.calibration.refine.calibrate_powder`
refines them, low-angle rings first.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

__all__ = ["StartGeometry", "find_centres", "find_distances", "find_starts", "radial_profile"]

logger = logging.getLogger(__name__)

MAX_SEARCH_TTH = math.radians(75.0)
"""Rings beyond this 2-theta are not used by the distance search."""


@dataclass(frozen=True)
class StartGeometry:
    """An untilted starting geometry found by the search.

    Attributes
    ----------
    beam_center_x, beam_center_y : float
        Ring centre, pixels (the centre of pixel ``i`` is ``i``).
    distance_px : float
        Distance in pixels.
    score : float
        Match score of the distance search (0 to 1).
    n_matched : int
        Number of calibrant rings matched to profile peaks.
    ring_width : float
        Median full width at half maximum of the strongest profile peaks, pixels (an upper
        bound of the ring width: tilts and centre errors broaden the profile).
    """

    beam_center_x: float
    beam_center_y: float
    distance_px: float
    score: float
    n_matched: int
    ring_width: float = float("nan")


# --------------------------------------------------------------------------------------
# Beam centre
# --------------------------------------------------------------------------------------
def _bin(a: NDArray, b: int) -> NDArray[np.float64]:
    ny, nx = (a.shape[0] // b) * b, (a.shape[1] // b) * b
    return a[:ny, :nx].reshape(ny // b, b, nx // b, b).sum(axis=(1, 3), dtype=np.float64)


def _ring_pixels(
    image: NDArray[np.float64], valid: NDArray[np.bool_], b: int, min_snr: float
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Binned pixels standing ``min_snr`` noise levels above a smooth background.

    Returns their (row, column) in binned pixels and a weight (the SNR, capped at 20).
    """
    total = _bin(np.where(valid, image, 0.0), b)
    count = _bin(valid, b)
    ok = count > 0.5 * b * b
    mean = np.where(ok, total / np.maximum(count, 1.0), 0.0)
    num = ndimage.uniform_filter(mean * ok, 25)
    den = ndimage.uniform_filter(ok.astype(np.float64), 25)
    bkg = num / np.maximum(den, 1e-6)
    noise = np.sqrt(np.maximum(bkg, 1.0) / np.maximum(count, 1.0))
    snr = np.where(ok, (mean - bkg) / noise, 0.0)
    rows, cols = np.nonzero(snr > min_snr)
    return rows.astype(np.float64), cols.astype(np.float64), np.minimum(snr[rows, cols], 20.0)


def _concentration(
    rows: NDArray[np.float64],
    cols: NDArray[np.float64],
    weight: NDArray[np.float64],
    cy: NDArray[np.float64],
    cx: NDArray[np.float64],
    width: float,
) -> NDArray[np.float64]:
    """How sharply the ring pixels' radii about each candidate centre cluster.

    The weighted radius histogram (bins of ``width / 2``, summed in pairs so that a ring on
    a bin edge counts fully) is squared and summed, relative to the squared total weight:
    1 when every pixel is at one radius, small when the radii are spread out.
    """
    out = np.empty(len(cy))
    total = float(weight.sum()) ** 2
    for sl in np.array_split(np.arange(len(cy)), max(1, len(cy) * len(rows) // 2_000_000)):
        r = np.hypot(rows[None, :] - cy[sl, None], cols[None, :] - cx[sl, None])
        idx = (r / (0.5 * width)).astype(np.int64)
        nb = int(idx.max()) + 2
        flat = (np.arange(len(sl))[:, None] * nb + idx).ravel()
        h = np.bincount(flat, np.broadcast_to(weight, idx.shape).ravel(), len(sl) * nb)
        h = h.reshape(len(sl), nb)
        pair = h[:, :-1] + h[:, 1:]
        out[sl] = (pair**2).sum(axis=1) / total
    return out


def find_centres(
    image: NDArray[np.float64],
    valid: NDArray[np.bool_],
    n: int = 3,
    *,
    max_binned: int = 600,
    margin: float = 0.25,
    max_pixels: int = 3000,
    min_snr: float = 5.0,
) -> list[tuple[float, float, float]]:
    """Candidate ring centres: the points about which the ring pixels' radii cluster best.

    Pixels that stand out of the smooth background (the rings) are taken from the binned
    image.  Every point of a coarse grid covering the detector and a ``margin`` about it is
    scored by :func:`_concentration` with bins twice the grid step; the ``n`` best local
    maxima are then refined on finer and finer grids (step / 3 each time, down to a tenth
    of a binned pixel).  Unlike a symmetry test this works for partial rings too (the beam
    near an edge, or only arcs of large rings on the detector).

    Parameters
    ----------
    image : numpy.ndarray
        The powder image.
    valid : numpy.ndarray of bool
        Pixels to use.
    n : int
        Number of candidates.
    max_binned : int
        The image is binned so that its larger side has at most this many bins.
    margin : float
        Centres up to this fraction of the detector size outside it are considered.
    max_pixels : int
        At most this many ring pixels (a fixed-seed random subset) are used.
    min_snr : float
        Signal-to-noise ratio that makes a binned pixel a ring pixel.

    Returns
    -------
    list of (x, y, score)
        Centres in pixels (centre of pixel ``i`` at ``i``), best first, with their
        concentration score (0 to 1).
    """
    b = max(1, math.ceil(max(image.shape) / max_binned))
    rows, cols, weight = _ring_pixels(image, valid, b, min_snr)
    if rows.size < 20:
        return []
    if rows.size > max_pixels:
        pick = np.random.default_rng(0).choice(rows.size, max_pixels, replace=False)
        rows, cols, weight = rows[pick], cols[pick], weight[pick]
    ny, nx = (image.shape[0] // b, image.shape[1] // b)
    step = max(2.0, max(ny, nx) / 48.0)
    gy = np.arange(-margin * ny, (1 + margin) * ny, step)
    gx = np.arange(-margin * nx, (1 + margin) * nx, step)
    cy, cx = (a.ravel() for a in np.meshgrid(gy, gx, indexing="ij"))
    coarse = min(rows.size, 1500)  # a (random) subset is enough on the coarse grid
    # bins twice the grid step: the true centre's basin is wider than the grid's spacing
    score = _concentration(rows[:coarse], cols[:coarse], weight[:coarse], cy, cx, 2.0 * step)
    score = score.reshape(gy.size, gx.size)
    local = (score == ndimage.maximum_filter(score, size=5)) & (score > 0)
    iy, ix = np.nonzero(local)
    out: list[tuple[float, float, float]] = []
    for k in np.argsort(score[iy, ix])[::-1][: 2 * n]:
        y, x, s = float(gy[iy[k]]), float(gx[ix[k]]), step
        best = float(score[iy[k], ix[k]])
        while s > 0.25:
            s /= 3.0
            off = np.arange(-6, 7) * s
            oy, ox = (a.ravel() for a in np.meshgrid(off, off, indexing="ij"))
            c = _concentration(rows, cols, weight, y + oy, x + ox, max(4.0 * s, 0.5))
            j = int(np.argmax(c))
            y, x, best = y + float(oy[j]), x + float(ox[j]), float(c[j])
        centre = (x * b + (b - 1) / 2, y * b + (b - 1) / 2, best)
        if all(math.hypot(centre[0] - o[0], centre[1] - o[1]) > 2.0 * b for o in out):
            out.append(centre)  # two maxima of one basin end on the same centre
        if len(out) >= n:
            break
    out.sort(key=lambda c: -c[2])
    return out


# --------------------------------------------------------------------------------------
# Distance
# --------------------------------------------------------------------------------------
def radial_profile(
    image: NDArray[np.float64],
    valid: NDArray[np.bool_],
    cx: float,
    cy: float,
    step: float = 0.5,
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Mean intensity against radius about ``(cx, cy)``.

    Returns
    -------
    radius, mean, count : numpy.ndarray
        Bin centres (pixels), mean intensity (NaN in empty bins) and pixel counts.
    """
    yy, xx = np.nonzero(valid)
    r = np.hypot(xx - cx, yy - cy)
    nb = int(r.max() / step) + 2 if r.size else 1
    idx = (r / step).astype(np.int64)
    s = np.bincount(idx, image[yy, xx], nb)
    n = np.bincount(idx, None, nb)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, s / n, np.nan)
    radius = (np.arange(nb, dtype=np.float64) + 0.5) * step
    return radius, mean.astype(np.float64), n.astype(np.float64)


def _profile_peaks(
    radius: NDArray[np.float64],
    mean: NDArray[np.float64],
    count: NDArray[np.float64],
    min_snr: float,
) -> tuple[NDArray[np.float64], NDArray[np.float64], float, float, float]:
    """Peaks of a radial profile: radii, SNR, the radius range covered and the ring width.

    The width is the median FWHM (pixels) of the five highest peaks.
    """
    from scipy import signal  # heavy: scipy.signal (~1 s), loaded on first use

    step = float(radius[1] - radius[0]) if radius.size > 1 else 1.0
    ok = count >= 20
    if ok.sum() < 10:
        return np.empty(0), np.empty(0), 0.0, 0.0, float("nan")
    good = np.flatnonzero(ok)
    filled = np.interp(np.arange(mean.size), good, mean[good])
    bkg = ndimage.percentile_filter(filled, 20, size=max(3, int(30 / step)))
    noise = np.sqrt(np.maximum(bkg, 1.0) / np.maximum(count, 1.0))
    snr = np.where(ok, (filled - bkg) / noise, 0.0)
    pk, _ = signal.find_peaks(snr, height=min_snr, distance=max(1, int(1.5 / step)))
    width = float("nan")
    if pk.size:
        top = pk[np.argsort(snr[pk])[::-1][:5]]
        width = float(np.median(signal.peak_widths(snr, top, rel_height=0.5)[0])) * step
    return radius[pk], snr[pk], float(radius[good[0]]), float(radius[good[-1]]), width


def find_distances(
    peaks: NDArray[np.float64],
    strength: NDArray[np.float64],
    rlo: float,
    rhi: float,
    ring_tth: Sequence[float],
    n: int = 2,
    *,
    tol_px: float = 2.0,
    tol_rel: float = 4e-3,
) -> list[tuple[float, float, int]]:
    """Distances (pixels) whose predicted rings match the observed profile peaks.

    Parameters
    ----------
    peaks, strength : numpy.ndarray
        Radii (pixels) and SNR of the observed peaks.
    rlo, rhi : float
        Radius range covered by the profile.
    ring_tth : sequence of float
        Calibrant 2-theta values, rad, ascending.
    n : int
        Number of distinct candidates to return.
    tol_px, tol_rel : float
        A predicted ring matches a peak within ``tol_px + tol_rel * r`` pixels.

    Returns
    -------
    list of (distance, score, n_matched)
        Best first; distances refined by least squares on their matched peaks.
    """
    tan2t = np.tan(np.asarray([t for t in ring_tth if 0 < t < MAX_SEARCH_TTH]))
    if len(peaks) < 2 or tan2t.size < 2 or rhi <= rlo:
        return []
    obs = np.asarray(peaks, dtype=np.float64)
    w_obs = np.minimum(np.asarray(strength, dtype=np.float64), 50.0)
    # no more predicted rings inside the profile than 3x the peaks seen (+5): beyond that
    # the match fraction of the prediction is small anyway
    k_max = min(tan2t.size - 1, 3 * len(obs) + 5)
    tan2t = tan2t[: k_max + 1]
    dmin = max(rhi / tan2t[-1], max(rlo, 1.0) / tan2t[-1])
    dmax = rhi / tan2t[0]
    if not dmax > dmin:
        return []
    grid = np.exp(np.arange(math.log(dmin), math.log(dmax), 1e-3))
    pred = grid[:, None] * tan2t[None, :]  # (nD, nR), ascending along rows
    on = (pred > rlo) & (pred < rhi)
    n_pred = on.sum(axis=1)
    # predicted ring -> nearest observed peak
    j = np.clip(np.searchsorted(obs, pred), 1, len(obs) - 1)
    near = np.minimum(np.abs(obs[j] - pred), np.abs(obs[j - 1] - pred))
    pred_hit = on & (near < tol_px + tol_rel * pred)
    # observed peak -> nearest predicted ring (in units of D: x = r / D against tan2t)
    x = obs[None, :] / grid[:, None]
    k = np.clip(np.searchsorted(tan2t, x), 1, tan2t.size - 1)
    near_o = np.minimum(np.abs(tan2t[k] - x), np.abs(tan2t[k - 1] - x)) * grid[:, None]
    obs_hit = near_o < tol_px + tol_rel * obs[None, :]
    frac_pred = np.where(n_pred >= 2, pred_hit.sum(axis=1) / np.maximum(n_pred, 1), 0.0)
    frac_obs = (obs_hit * w_obs[None, :]).sum(axis=1) / w_obs.sum()
    score = np.where(pred_hit.sum(axis=1) >= 2, frac_pred * frac_obs, 0.0)
    out: list[tuple[float, float, int]] = []
    for i in np.argsort(score)[::-1]:
        if score[i] <= 0 or len(out) >= n:
            break
        d0 = float(grid[i])
        if any(abs(math.log(d0 / d)) < 0.01 for d, _, _ in out):
            continue
        d_fit, n_matched = _fit_distance(d0, obs, tan2t, tol_px, tol_rel)
        out.append((d_fit, float(score[i]), n_matched))
    return out


def _fit_distance(
    d0: float, obs: NDArray[np.float64], tan2t: NDArray[np.float64], tol_px: float, tol_rel: float
) -> tuple[float, int]:
    """Least-squares distance from the peaks matched at ``d0``: ``(distance, n_matched)``."""
    d = d0
    n_matched = 0
    for _ in range(3):
        pred = d * tan2t
        j = np.clip(np.searchsorted(obs, pred), 1, max(1, len(obs) - 1))
        cand = np.where(np.abs(obs[j] - pred) < np.abs(obs[j - 1] - pred), obs[j], obs[j - 1])
        hit = np.abs(cand - pred) < tol_px + tol_rel * pred
        n_matched = int(hit.sum())
        if n_matched < 2:
            break
        d = float(np.sum(cand[hit] * tan2t[hit]) / np.sum(tan2t[hit] ** 2))
    return d, n_matched


# --------------------------------------------------------------------------------------
# Both
# --------------------------------------------------------------------------------------
def find_starts(
    image: NDArray[np.float64],
    valid: NDArray[np.bool_],
    ring_tth: Sequence[float],
    *,
    n_centres: int = 3,
    n_distances: int = 2,
    min_snr: float = 8.0,
) -> list[StartGeometry]:
    """Untilted starting geometries for the calibration, most promising first.

    Parameters
    ----------
    image : numpy.ndarray
        The powder image.
    valid : numpy.ndarray of bool
        Pixels to use (not masked, not negative, finite).
    ring_tth : sequence of float
        The calibrant's ring 2-theta values at the wavelength, rad, ascending.
    n_centres, n_distances : int
        Candidate centres, and candidate distances per centre.
    min_snr : float
        Minimum signal-to-noise ratio of a radial-profile peak.

    Returns
    -------
    list of StartGeometry
        Empty if no ring pattern was found.
    """
    starts: list[StartGeometry] = []
    for cx, cy, concentration in find_centres(image, valid, n_centres):
        radius, mean, count = radial_profile(image, valid, cx, cy)
        peaks, snr, rlo, rhi, width = _profile_peaks(radius, mean, count, min_snr)
        cands = find_distances(peaks, snr, rlo, rhi, ring_tth, n_distances)
        logger.debug(
            "centre (%.1f, %.1f) concentration %.3f: %d profile peaks, distances %s",
            cx, cy, concentration, len(peaks), [(round(d, 1), round(s, 3)) for d, s, _ in cands],
        )  # fmt: skip
        starts.extend(StartGeometry(cx, cy, d, s, m, width) for d, s, m in cands)
    starts.sort(key=lambda s: -s.score)
    return starts
