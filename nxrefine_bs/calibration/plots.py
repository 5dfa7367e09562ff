"""Diagnostic plots of a powder calibration (cake and ring overlay), Agg canvas only."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .convert import get_calibrant
from .result import CalibrationResult

__all__ = ["save_plots"]


def _display_image(image: NDArray, valid: NDArray[np.bool_] | None = None) -> NDArray:
    img = np.asarray(image, dtype=np.float64)
    ok = np.isfinite(img) & (img > 0)
    if valid is not None:
        ok &= valid
    out = np.full(img.shape, np.nan)
    out[ok] = np.log10(img[ok])
    return out


def save_plots(
    result: CalibrationResult,
    image: ArrayLike,
    outdir: str | os.PathLike[str],
    *,
    prefix: str = "calibration",
) -> dict[str, Path]:
    """Save a cake plot and a ring-overlay plot of a calibration as PNG files.

    Matplotlib's object-oriented API is used with the Agg canvas, so nothing global
    (backend, pyplot state) is touched.

    Parameters
    ----------
    result : CalibrationResult
        The refined geometry.
    image : array_like
        The powder image.
    outdir : path
        Output directory (created if needed).
    prefix : str
        File-name prefix.

    Returns
    -------
    dict
        ``{"cake": path, "rings": path}``.
    """
    # heavy: matplotlib and pyFAI, only for the plots
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from pyFAI import units

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    img = np.asarray(image, dtype=np.float64)
    ai = result.integrator()
    det = ai.detector
    mask = ~(np.isfinite(img) & (img >= 0))
    if det.mask is not None and det.mask.shape == img.shape:
        mask |= det.mask.astype(bool)
    cal = get_calibrant(result.calibrant or "CeO2", result.wavelength_angstrom)
    ring_tth = [math.degrees(t) for t in cal.get_2th() if t is not None]

    # cake
    cake = ai.integrate2d(
        np.where(mask, 0.0, img), 1000, 360, unit="2th_deg", mask=mask.astype(np.int8),
        correctSolidAngle=False,
    )  # fmt: skip
    fig = Figure(figsize=(9, 5.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    radial, azim = np.asarray(cake.radial), np.asarray(cake.azimuthal)
    ax.imshow(
        _display_image(cake.intensity),
        origin="lower", aspect="auto", cmap="viridis",
        extent=(radial[0], radial[-1], azim[0], azim[-1]),
    )  # fmt: skip
    for t in ring_tth:
        if radial[0] <= t <= radial[-1]:
            ax.axvline(t, color="r", lw=0.5, alpha=0.6)
    ax.set_xlabel("2θ (deg)")
    ax.set_ylabel("χ (deg)")
    ax.set_title(f"{result.calibrant}: cake (red: calibrant rings)")
    cake_path = out / f"{prefix}_cake.png"
    fig.savefig(cake_path)

    # ring overlay
    fig = Figure(figsize=(8, 8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(_display_image(img, ~mask), origin="lower", cmap="gray_r", interpolation="nearest")
    tth = np.degrees(ai.center_array(img.shape, unit=units.TTH_RAD, scale=False))
    levels = [t for t in ring_tth if np.nanmin(tth) < t < np.nanmax(tth)]
    if levels:
        ax.contour(tth, levels=levels, colors="r", linewidths=0.6)
    pts = result.control_points
    if pts is not None and len(pts):
        ax.plot(pts[:, 1], pts[:, 0], ".", color="tab:cyan", ms=1.5)
    ax.plot([result.beam_center_x - 0.5], [result.beam_center_y - 0.5], "r+", ms=12)
    ax.set_xlabel("x (pixel)")
    ax.set_ylabel("y (pixel)")
    ax.set_title(
        f"distance {result.distance:.2f} mm, centre ({result.beam_center_x:.2f}, "
        f"{result.beam_center_y:.2f}), rms {result.rms_residual:.4f}°"
    )
    rings_path = out / f"{prefix}_rings.png"
    fig.savefig(rings_path)
    return {"cake": cake_path, "rings": rings_path}
