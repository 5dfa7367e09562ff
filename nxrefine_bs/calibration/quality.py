"""Checks that decide whether a powder-calibration fit may be used.

A fit is refused (:func:`judge` gives the reason) when

* it uses fewer than ``min_rings`` rings, or less than ``min_ring_fraction`` of the lowest-angle
  resolved calibrant rings that fall on the detector (a wrong calibrant, wavelength or start
  leaves most predicted rings empty);
* its RMS residual, measured across the rings in pixels, exceeds ``max_rms_pixels`` (a good
  fit scatters by a few hundredths of a pixel; a converged wrong geometry by pixels);
* the image holds a strong ring the calibrant does not explain (:func:`unexplained_rings`):
  with the distance free, a calibrant whose reflections are a subset of the true one's with
  a slightly different cell (Si for CeO2: 0.4 %) fits the rings it has perfectly, and only
  the rings left over show the mistake.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

__all__ = ["judge", "unexplained_rings"]


def judge(
    *,
    failure: str,
    n_rings: int,
    n_low_found: int,
    n_low_expected: int,
    rms_pixels: float,
    rms_deg: float,
    min_rings: int,
    min_ring_fraction: float,
    max_rms_pixels: float,
) -> str:
    """Why a fit is not acceptable, or ``''`` when it is.

    ``n_low_found`` of the ``n_low_expected`` lowest-angle resolved rings on the detector
    were found (the share of rings is judged on low-angle rings, which every calibrant
    shows strongly, so that weak high-angle rings missed in a good image do not count).
    """
    if failure:
        return failure
    if n_rings < min_rings:
        return f"only {n_rings} ring(s) found (at least {min_rings} needed)"
    if n_low_found < min_ring_fraction * n_low_expected:
        return (
            f"only {n_low_found} of the {n_low_expected} lowest-angle rings expected on the "
            f"detector were found (at least {min_ring_fraction:.0%} needed)"
        )
    if not rms_pixels <= max_rms_pixels:
        return (
            f"RMS residual {rms_pixels:.3f} px ({rms_deg:.5f} deg 2-theta) exceeds "
            f"{max_rms_pixels:g} px"
        )
    return ""


def unexplained_rings(
    tth: NDArray[np.float64],
    intensity: NDArray[np.float64],
    ring_tth: Sequence[float],
    bin_width: float,
    *,
    min_snr: float = 10.0,
    tolerance_bins: float = 6.0,
) -> list[tuple[float, float]]:
    """Peaks of the 2-theta profile that no calibrant reflection explains.

    Parameters
    ----------
    tth : numpy.ndarray
        2-theta (rad) of every valid pixel for the fitted geometry.
    intensity : numpy.ndarray
        Their intensities.
    ring_tth : sequence of float
        2-theta (rad) of every calibrant reflection (resolved or not).
    bin_width : float
        Width of a profile bin, rad (about half a pixel).
    min_snr : float
        Smallest peak height over the local background, in noise standard deviations.
    tolerance_bins : float
        A peak within this many bins of a reflection is explained by it.

    Returns
    -------
    list of (float, float)
        ``(2-theta in degrees, height relative to the highest explained peak)`` of every
        unexplained peak, highest first.  Empty when no explained peak is found.
    """
    from scipy import signal  # heavy: scipy.signal (~1 s), loaded on first use

    if tth.size == 0 or not bin_width > 0:
        return []
    lo = float(tth.min())
    idx = ((tth - lo) / bin_width).astype(np.int64)
    nb = int(idx.max()) + 1
    count = np.bincount(idx, minlength=nb).astype(np.float64)
    total = np.bincount(idx, weights=intensity, minlength=nb)
    ok = count >= 20
    if ok.sum() < 10:
        return []
    good = np.flatnonzero(ok)
    mean = np.interp(np.arange(nb), good, total[good] / count[good])
    bkg = ndimage.percentile_filter(mean, 20, size=61)
    noise = np.sqrt(np.maximum(bkg, 1.0) / np.maximum(count, 1.0))
    height = np.where(ok, mean - bkg, 0.0)
    peaks, _ = signal.find_peaks(np.where(ok, height / noise, 0.0), height=min_snr, distance=3)
    if peaks.size == 0:
        return []
    centres = lo + (peaks + 0.5) * bin_width
    refs = np.sort(np.asarray([t for t in ring_tth if t is not None and math.isfinite(t)]))
    if refs.size == 0:
        return []
    j = np.clip(np.searchsorted(refs, centres), 1, max(1, refs.size - 1))
    near = np.minimum(np.abs(refs[j] - centres), np.abs(refs[j - 1] - centres))
    explained = near <= tolerance_bins * bin_width
    if not explained.any():
        return []
    top = float(height[peaks[explained]].max())
    out = [
        (math.degrees(float(c)), float(height[p]) / top)
        for c, p, e in zip(centres, peaks, explained, strict=True)
        if not e
    ]
    out.sort(key=lambda item: -item[1])
    return out
