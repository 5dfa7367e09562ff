"""Spherical Tukey taper and the Fourier transform of an (H, K, L) volume to a PDF.

* **Taper** (NXRefine's window, inventory §5.10): with ``R = 2 |Q| / qmax`` (``|Q|`` in
  1/Angstrom, 2 pi included), ``w = 1`` for ``R <= 1``, ``w = (1 - cos(pi R)) / 2`` for
  ``1 < R < 2``, and the smallest of those values for ``R >= 2`` (so ``1 / w`` stays
  finite).
* **PDF**: ``F = Re[fftshift(fftn(ifftshift(S w)))] / N`` over the volume with the last
  point of every axis dropped (an odd ``2n + 1`` grid centred on 0 becomes ``2n`` with the
  origin at index ``n``).  It is computed without any shifted copy: for even lengths the
  two shifts are the factors ``(-1)^j`` on the input and ``(-1)^(q + N/2)`` on the output;
  the real-to-complex FFT (scipy.fft, threaded) returns half of the spectrum, and the
  other half of the real part follows from Hermitian symmetry.  Peak memory is about
  three float32 volumes.
* **Axes**: ``x = fftshift(fftfreq(N_h, step_h)) * a`` in Angstrom along the cell edges
  ``a, b, c`` (arrays ``[z, y, x]`` follow ``[l, k, h]``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import scipy.fft
from numpy.typing import NDArray

from ..errors import ReductionError
from ..geometry import b_matrix
from .grid import QGrid

logger = logging.getLogger(__name__)

__all__ = ["q_matrix", "inscribed_qmax", "taper_floor", "taper_slab", "pdf_fft", "pdf_axes"]


def q_matrix(cell: Sequence[float]) -> NDArray[np.float64]:
    """``G = 2 pi B``: ``G @ (h, k, l)`` is Q in 1/Angstrom."""
    return 2.0 * math.pi * b_matrix(*cell)


def inscribed_qmax(grid: QGrid, cell: Sequence[float]) -> float:
    """Radius (1/Angstrom) of the largest sphere about Q = 0 inside the grid.

    The face ``h = h_max`` lies ``2 pi h_max / a`` from the origin.
    """
    lengths = cell[:3]
    return float(
        min(
            2.0 * math.pi * min(abs(ax.start), abs(ax.stop)) / length
            for ax, length in zip(grid.axes, lengths, strict=True)
        )
    )


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _taper(origin, steps, g, qmax, floor, l0, l1, nk, nh, out):  # pragma: no cover - compiled
    lowest = 1.0
    for il in range(l0, l1):
        l = origin[2] + il * steps[2]  # noqa: E741
        for ik in range(nk):
            k = origin[1] + ik * steps[1]
            for ih in range(nh):
                h = origin[0] + ih * steps[0]
                qx = g[0, 0] * h + g[0, 1] * k + g[0, 2] * l
                qy = g[1, 0] * h + g[1, 1] * k + g[1, 2] * l
                qz = g[2, 0] * h + g[2, 1] * k + g[2, 2] * l
                r = 2.0 * math.sqrt(qx * qx + qy * qy + qz * qz) / qmax
                if r <= 1.0:
                    w = 1.0
                elif r < 2.0:
                    w = 0.5 * (1.0 - math.cos(math.pi * r))
                    if w < lowest and w > 0.0:
                        lowest = w
                    if w < floor:
                        w = floor
                else:
                    w = floor
                if out.shape[0] > 0:
                    out[il - l0, ik, ih] = w
    return lowest


def taper_floor(grid: QGrid, cell: Sequence[float], qmax: float) -> float:
    """The smallest positive taper value on the grid (used for ``R >= 2``)."""
    if not qmax > 0:
        raise ReductionError(f"taper: qmax must be positive, got {qmax!r}")
    empty = np.zeros((0, 0, 0), dtype=np.float32)
    nl, nk, nh = grid.shape
    low = _taper(grid.origin, grid.steps, q_matrix(cell), float(qmax), 0.0, 0, nl, nk, nh, empty)
    return float(max(low, np.finfo(np.float32).tiny))


def taper_slab(
    grid: QGrid, cell: Sequence[float], qmax: float, floor: float, l0: int, l1: int
) -> NDArray[np.float32]:
    """The taper on planes ``l0 .. l1 - 1`` (float32, shape ``(l1 - l0, nk, nh)``)."""
    _, nk, nh = grid.shape
    out = np.empty((l1 - l0, nk, nh), dtype=np.float32)
    _taper(grid.origin, grid.steps, q_matrix(cell), float(qmax), float(floor), l0, l1, nk, nh, out)
    return out


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _unfold(spec, out, scale, q0a, q0b):  # pragma: no cover - compiled
    n0, n1, n2 = out.shape
    half = spec.shape[2]
    for q0 in range(q0a, q0b):
        m0 = (n0 - q0) % n0
        for q1 in range(n1):
            m1 = (n1 - q1) % n1
            for q2 in range(n2):
                if q2 < half:
                    val = spec[q0, q1, q2].real
                else:
                    val = spec[m0, m1, n2 - q2].real
                if (q0 + q1 + q2) & 1:
                    out[q0, q1, q2] = -val * scale
                else:
                    out[q0, q1, q2] = val * scale


def pdf_fft(
    volume: NDArray[np.floating],
    grid: QGrid,
    cell: Sequence[float],
    qmax: float,
    floor: float,
    *,
    nthreads: int = 1,
    slab: int = 32,
) -> NDArray[np.float32]:
    """``Re[fftshift(fftn(ifftshift(volume * taper)))] / N`` on the grid minus its last points.

    Parameters
    ----------
    volume : ndarray ``[l, k, h]``
        The (symmetrised, possibly filled) intensity; every axis must have an odd number
        of points (centred grid).
    grid : QGrid
        Its grid.
    cell : sequence of float
        Unit cell (for ``|Q|``).
    qmax, floor : float
        Taper radius (1/Angstrom) and floor (:func:`taper_floor`).
    nthreads : int
        Threads for the FFT and the unfolding.
    slab : int
        Planes tapered at a time.

    Returns
    -------
    ndarray of float32, shape ``(nl - 1, nk - 1, nh - 1)``
    """
    nl, nk, nh = volume.shape
    if any(n % 2 == 0 or n < 3 for n in volume.shape):
        raise ReductionError(
            f"PDF: every grid axis needs an odd number (>= 3) of points centred on 0, got "
            f"{volume.shape} ([l, k, h]); transform on a grid -X..X"
        )
    n0, n1, n2 = nl - 1, nk - 1, nh - 1
    y = np.empty((n0, n1, n2), dtype=np.float32)
    checker = np.where((np.add.outer(np.arange(n1), np.arange(n2)) & 1) == 1, -1, 1).astype(
        np.float32
    )
    for l0 in range(0, n0, slab):
        l1 = min(n0, l0 + slab)
        w = taper_slab(grid, cell, qmax, floor, l0, l1)
        for j in range(l0, l1):
            sign = np.float32(-1.0 if j & 1 else 1.0)
            np.multiply(volume[j, :n1, :n2], w[j - l0, :n1, :n2], out=y[j])
            y[j] *= checker * sign
    spec = scipy.fft.rfftn(y, workers=max(1, int(nthreads)), overwrite_x=True)
    del y
    out = np.empty((n0, n1, n2), dtype=np.float32)
    scale = (-1.0) ** ((n0 // 2 + n1 // 2 + n2 // 2) % 2) / float(n0 * n1 * n2)
    nthreads = max(1, min(int(nthreads), n0))
    bounds = np.linspace(0, n0, nthreads + 1).astype(int)
    if nthreads == 1:
        _unfold(spec, out, scale, 0, n0)
    else:
        with ThreadPoolExecutor(nthreads) as pool:
            list(
                pool.map(
                    lambda b: _unfold(spec, out, scale, b[0], b[1]),
                    zip(bounds[:-1], bounds[1:], strict=True),
                )
            )
    return out


def pdf_axes(grid: QGrid, cell: Sequence[float]) -> tuple[NDArray[np.float64], ...]:
    """PDF axes ``(x, y, z)`` in Angstrom along ``a, b, c`` for a PDF from ``grid``."""
    out = []
    for ax, length in zip(grid.axes, cell[:3], strict=True):
        n = ax.n - 1
        out.append(np.fft.fftshift(np.fft.fftfreq(n, d=ax.step)) * float(length))
    return tuple(out)
