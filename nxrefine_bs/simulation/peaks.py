"""Simulated Bragg-peak lists for indexing and refinement tests and benchmarks.

One shared set-up (:data:`PILATUS_2M_ROTATION`, :data:`TEST_SYSTEMS`) so that the orient
and refine tests and the refinement benchmark work on the same geometry and crystals.
Peaks are placed by :meth:`nxrefine_bs.geometry.Geometry.predict` (itself checked against
hand-worked reflections and xrayutilities in ``tests/test_geometry_reference.py``).
"""

from __future__ import annotations

import logging

import numpy as np
from numpy.typing import NDArray

from ..geometry import Geometry, all_hkl
from .crystal import SimCrystal

__all__ = [
    "FULL_ROTATION_FRAMES",
    "PILATUS_2M_ROTATION",
    "TEST_SYSTEMS",
    "garbage_peaks",
    "predicted_peaks",
]

logger = logging.getLogger(__name__)

PILATUS_2M_ROTATION = Geometry(
    wavelength=0.2,
    distance=400.0,
    pixel_size=0.172,
    shape=(1679, 1475),
    beam_center_x=737.3,
    beam_center_y=839.6,
    chi=-90.0,
    phi_start=-5.0,
    phi_step=0.1,
)
"""Pilatus-2M-like set-up: 0.172 mm pixels at 400 mm, phi axis vertical, 0.1 deg frames."""

FULL_ROTATION_FRAMES = 3600
"""Frames of a 360 deg rotation of :data:`PILATUS_2M_ROTATION`."""

TEST_SYSTEMS: dict[str, tuple[tuple[float, float, float, float, float, float], str, str]] = {
    "cubic": ((5.431, 5.431, 5.431, 90, 90, 90), "F", "Fm-3m"),
    "tetragonal": ((4.0, 4.0, 6.5, 90, 90, 90), "I", "I4/mmm"),
    "orthorhombic": ((5.1, 6.3, 7.7, 90, 90, 90), "P", "Pmmm"),
    "hexagonal": ((3.2, 3.2, 5.2, 90, 90, 120), "P", "P6/mmm"),
    "monoclinic": ((5.5, 6.2, 7.1, 90, 103.5, 90), "P", "P2/m"),
}
"""``{name: (cell, centring, space group)}``: symmorphic groups (the simulator knows
only centring), one per crystal system used by the tests."""

Peaks = tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]


def predicted_peaks(
    crystal: SimCrystal,
    rng: np.random.Generator,
    *,
    geometry: Geometry = PILATUS_2M_ROTATION,
    n_frames: int = FULL_ROTATION_FRAMES,
    noise_xy: float = 0.2,
    noise_z: float = 0.1,
    max_peaks: int | None = 600,
) -> Peaks:
    """Noisy positions and true indices of the allowed reflections of ``crystal``.

    Parameters
    ----------
    crystal : SimCrystal
        The crystal (its centring decides which reflections exist).
    rng : numpy.random.Generator
        Random numbers (the subset and the noise).
    geometry : Geometry
        The rotation.
    n_frames : int
        Frames of the rotation; peaks outside ``0 <= z <= n_frames - 1`` are dropped.
    noise_xy, noise_z : float
        Gaussian noise (pixels, frames) added to the predicted positions.
    max_peaks : int or None
        Keep a random subset of this many peaks (None: all).

    Returns
    -------
    tuple
        ``(x, y, z, hkl)``: pixel positions, fractional frames and the ``(n, 3)``
        true Miller indices.
    """
    hkl = all_hkl(1.0 / (geometry.q_max() * 1.001), crystal.B)
    hkl = hkl[crystal.allowed(hkl)]
    p = geometry.predict(hkl, crystal.UB)
    on = p["on_detector"].astype(bool) & (p["frame"] >= 0) & (p["frame"] <= n_frames - 1)
    x, y, z, h = p["x"][on], p["y"][on], p["frame"][on], p["hkl"][on]
    if max_peaks and len(x) > max_peaks:
        k = rng.choice(len(x), max_peaks, replace=False)
        x, y, z, h = x[k], y[k], z[k], h[k]
    return (
        x + rng.normal(0, noise_xy, len(x)),
        y + rng.normal(0, noise_xy, len(x)),
        z + rng.normal(0, noise_z, len(x)),
        h,
    )


def garbage_peaks(
    n: int,
    rng: np.random.Generator,
    *,
    geometry: Geometry = PILATUS_2M_ROTATION,
    n_frames: int = FULL_ROTATION_FRAMES,
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """``n`` uniformly random ``(x, y, z)`` positions on the detector (false peaks)."""
    ny, nx = geometry.shape
    return rng.uniform(0, nx - 1, n), rng.uniform(0, ny - 1, n), rng.uniform(0, n_frames - 1, n)
