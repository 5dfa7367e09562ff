"""Reciprocal-space (H, K, L) grids for the transform.

A grid axis is a uniform set of points ``start + step * i`` (``i = 0 .. n-1``) in
reciprocal-lattice units.  A pixel is binned into the *nearest* grid point:
``i = floor((h - start) / step + 0.5)``, kept if ``0 <= i < n``.

Arrays are stored in the CCTW / NXRefine order ``[l, k, h]`` (H varies fastest) with
the axes named ``Ql``, ``Qk``, ``Qh``.

The default grid follows NXRefine (inventory §5.7): for each axis
``h_max = 0.8 * Q_max / a*`` rounded *up* to an even integer, a step chosen from
``{1, 2, 5, 10} x 10^n`` nearest to ``2 h_max / 1000``, and the points
``-h_max .. +h_max`` (about 1001 per axis).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from ..errors import ReductionError
from ..geometry import Geometry, reciprocal_parameters

logger = logging.getLogger(__name__)

__all__ = ["GridAxis", "QGrid", "nice_step", "default_axis", "axis_from_range", "make_grid"]

AXIS_NAMES = ("h", "k", "l")


def nice_step(value: float) -> float:
    """The number in ``{1, 2, 5, 10} x 10^n`` nearest to ``value`` (> 0).

    Examples
    --------
    >>> nice_step(0.024), nice_step(0.016), nice_step(0.04)
    (0.02, 0.02, 0.05)
    """
    if not value > 0 or not math.isfinite(value):
        raise ReductionError(f"grid step must be positive and finite, got {value}")
    exponent = math.floor(math.log10(value))
    base = 10.0**exponent
    candidates = [m * base for m in (1.0, 2.0, 5.0, 10.0)]
    best = min(candidates, key=lambda c: abs(c - value))
    return float(f"{best:.12g}")


@dataclass(frozen=True)
class GridAxis:
    """One uniform grid axis in reciprocal-lattice units.

    Parameters
    ----------
    name : str
        ``"h"``, ``"k"`` or ``"l"``.
    start : float
        First grid point.
    step : float
        Spacing (> 0).
    n : int
        Number of points.
    """

    name: str
    start: float
    step: float
    n: int

    def __post_init__(self) -> None:
        if self.n < 1 or not self.step > 0:
            raise ReductionError(
                f"grid axis {self.name}: need n >= 1 and step > 0, got n={self.n}, step={self.step}"
            )

    @property
    def stop(self) -> float:
        """Last grid point."""
        return self.start + self.step * (self.n - 1)

    @property
    def values(self) -> NDArray[np.float64]:
        """The grid points."""
        return np.linspace(self.start, self.stop, self.n)

    def index(self, value: NDArray[np.float64] | float) -> NDArray[np.int64]:
        """Nearest-point index of ``value`` (may be out of ``0 .. n-1``)."""
        return np.floor(
            (np.asarray(value, dtype=np.float64) - self.start) / self.step + 0.5
        ).astype(np.int64)

    def as_range(self) -> tuple[float, float, float]:
        """``(min, step, max)``, the form used on the command line."""
        return (self.start, self.step, self.stop)


@dataclass(frozen=True)
class QGrid:
    """Three grid axes ``(h, k, l)``; arrays are stored as ``[l, k, h]``."""

    h: GridAxis
    k: GridAxis
    l: GridAxis  # noqa: E741 - crystallographic name

    @property
    def axes(self) -> tuple[GridAxis, GridAxis, GridAxis]:
        """``(h, k, l)``."""
        return (self.h, self.k, self.l)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Storage shape ``(nl, nk, nh)``."""
        return (self.l.n, self.k.n, self.h.n)

    @property
    def size(self) -> int:
        """Number of voxels."""
        return self.h.n * self.k.n * self.l.n

    @property
    def origin(self) -> NDArray[np.float64]:
        """First point ``(h0, k0, l0)``."""
        return np.array([a.start for a in self.axes])

    @property
    def steps(self) -> NDArray[np.float64]:
        """Steps ``(dh, dk, dl)``."""
        return np.array([a.step for a in self.axes])

    @property
    def counts(self) -> NDArray[np.int64]:
        """Points per axis ``(nh, nk, nl)``."""
        return np.array([a.n for a in self.axes], dtype=np.int64)

    def flat_index(self, hkl: NDArray[np.float64]) -> NDArray[np.int64]:
        """Flat ``[l, k, h]`` index of the nearest voxel of each row of ``hkl``; -1 if outside."""
        hkl = np.asarray(hkl, dtype=np.float64)
        idx = [a.index(hkl[..., i]) for i, a in enumerate(self.axes)]
        ok = np.ones(idx[0].shape, dtype=bool)
        for i, a in zip(idx, self.axes, strict=True):
            ok &= (i >= 0) & (i < a.n)
        flat = (idx[2] * self.k.n + idx[1]) * self.h.n + idx[0]
        return np.where(ok, flat, -1)

    def describe(self) -> str:
        """Short text such as ``h -8:8:0.02 (801) ...``."""
        return ", ".join(f"{a.name} {a.start:g}:{a.stop:g}:{a.step:g} ({a.n})" for a in self.axes)


def default_axis(name: str, q_max: float, reciprocal_length: float) -> GridAxis:
    """NXRefine's default axis for ``Q_max`` and one reciprocal cell length (same units).

    Examples
    --------
    >>> ax = default_axis("h", 2.0, 0.16)
    >>> (ax.start, ax.step, ax.n)
    (-10.0, 0.02, 1001)
    """
    if not (q_max > 0 and reciprocal_length > 0):
        raise ReductionError(
            f"cannot derive a default grid: Q_max={q_max}, reciprocal length={reciprocal_length}"
        )
    h_max = 0.8 * q_max / reciprocal_length
    h_max = 2.0 * math.ceil(h_max / 2.0 - 1e-12)
    h_max = max(h_max, 2.0)
    step = nice_step(2.0 * h_max / 1000.0)
    n = int(round(2.0 * h_max / step)) + 1
    return GridAxis(name, -h_max, step, n)


def axis_from_range(name: str, spec: Sequence[float]) -> GridAxis:
    """Axis from ``(min, step, max)``: ``n = round((max - min) / step) + 1``."""
    try:
        lo, step, hi = (float(v) for v in spec)
    except (TypeError, ValueError) as exc:
        raise ReductionError(f"grid axis {name}: expected (min, step, max), got {spec!r}") from exc
    if not step > 0 or hi < lo:
        raise ReductionError(f"grid axis {name}: need step > 0 and max >= min, got {spec!r}")
    n = int(round((hi - lo) / step)) + 1
    return GridAxis(name, lo, step, n)


def make_grid(
    geometry: Geometry,
    cell: Sequence[float],
    *,
    qh: Sequence[float] | None = None,
    qk: Sequence[float] | None = None,
    ql: Sequence[float] | None = None,
) -> QGrid:
    """The transform grid: NXRefine's default, overridden per axis by ``(min, step, max)``.

    Parameters
    ----------
    geometry : Geometry
        Geometry of the rotation (gives ``Q_max`` of the detector corners).
    cell : sequence of float
        ``(a, b, c, alpha, beta, gamma)``.
    qh, qk, ql : (min, step, max), optional
        Explicit axes.

    Returns
    -------
    QGrid
    """
    rec = reciprocal_parameters(*cell)[:3]
    q_max = geometry.q_max()
    axes = []
    for name, spec, rlen in zip(AXIS_NAMES, (qh, qk, ql), rec, strict=True):
        axes.append(
            axis_from_range(name, spec) if spec is not None else default_axis(name, q_max, rlen)
        )
    grid = QGrid(*axes)
    logger.debug("transform grid %s", grid.describe())
    return grid
