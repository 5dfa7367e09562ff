"""Reciprocal-space (H, K, L) grids for the transform.

A grid axis is a uniform set of points ``start + step * i`` (``i = 0 .. n-1``) in
reciprocal-lattice units.  A pixel is binned into the *nearest* grid point:
``i = floor((h - start) / step + 0.5)``, kept if ``0 <= i < n``.

Arrays are stored in the CCTW / NXRefine order ``[l, k, h]`` (H varies fastest) with
the axes named ``Ql``, ``Qk``, ``Qh``.

Default grid.  With the orientation matrix known (the transform), the grid follows the
data (:func:`data_grid`): each axis spans the H, K or L range the detector actually
reaches during the rotation (every 32nd pixel of the detector, edges included, at up to
181 angles of the scan, widened by one step), and its step is the data's own resolution
in Q - the larger of the Q width of one pixel (``pixel / distance / lambda``) and of one
frame at the largest Q (``Q_max x phi_step``) - expressed in r.l.u. and rounded *up* to
``{1, 2, 5} x 10^n``, coarsened further if needed so that no axis has more than
``max_points`` (1001) points.  Without ``UB``, NXRefine's rule (inventory §5.7): for
each axis ``h_max = 0.8 * Q_max / a*`` rounded up to an even integer, a step from
``{1, 2, 5, 10} x 10^n`` nearest to ``2 h_max / 1000``, points ``-h_max .. +h_max``.

:func:`grid_budget` states what a grid costs - memory of the ``(v, n)`` float32 grid
plus the per-pixel arrays and frame buffers, and the output file size - and refuses,
before anything is allocated, a grid that would not fit in the available memory or on
the output's disk, saying how to change it.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..errors import ReductionError
from ..geometry import Geometry, reciprocal_parameters

logger = logging.getLogger(__name__)

__all__ = [
    "GridAxis",
    "QGrid",
    "nice_step",
    "nice_step_up",
    "default_axis",
    "axis_from_range",
    "data_grid",
    "make_grid",
    "GridBudget",
    "grid_budget",
    "MAX_POINTS",
]

MAX_POINTS = 1001
"""Most points per axis of a default grid (NXRefine asks for about 1000)."""

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


def nice_step_up(value: float) -> float:
    """The smallest number in ``{1, 2, 5} x 10^n`` that is >= ``value`` (> 0).

    Examples
    --------
    >>> nice_step_up(0.011), nice_step_up(0.02), nice_step_up(0.3)
    (0.02, 0.02, 0.5)
    """
    if not value > 0 or not math.isfinite(value):
        raise ReductionError(f"grid step must be positive and finite, got {value}")
    exponent = math.floor(math.log10(value))
    for e in (exponent, exponent + 1):
        for m in (1.0, 2.0, 5.0):
            c = float(f"{m * 10.0**e:.12g}")
            if c >= value * (1 - 1e-9):
                return c
    return float(f"{10.0 ** (exponent + 2):.12g}")  # pragma: no cover - unreachable


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


def q_resolution(geometry: Geometry) -> float:
    """The data's Q resolution (1/Angstrom, no 2 pi): max of one pixel's and one frame's width."""
    pixel = geometry.pixel_size / geometry.distance / geometry.wavelength
    frame = geometry.q_max() * math.radians(abs(geometry.phi_step))
    return max(pixel, frame)


def reached_hkl(
    geometry: Geometry,
    ub: NDArray[np.float64],
    frames: tuple[int, int],
    *,
    pixel_stride: int = 32,
    max_angles: int = 181,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Smallest and largest ``(h, k, l)`` reached by the detector over frames ``[lo, hi)``."""
    ny, nx = geometry.shape
    ys = np.unique(np.r_[np.arange(0, ny, pixel_stride), ny - 1]).astype(np.float64)
    xs = np.unique(np.r_[np.arange(0, nx, pixel_stride), nx - 1]).astype(np.float64)
    yy, xx = (a.ravel() for a in np.meshgrid(ys, xs, indexing="ij"))
    lo, hi = int(frames[0]), int(frames[1])
    zs = np.unique(np.linspace(lo, max(lo, hi - 1), max(2, min(max_angles, hi - lo))))
    x = np.broadcast_to(xx[None, :], (zs.size, xx.size))
    y = np.broadcast_to(yy[None, :], (zs.size, yy.size))
    z = np.broadcast_to(zs[:, None], (zs.size, xx.size))
    hkl = np.asarray(geometry.pixel_to_hkl(x, y, z, ub)).reshape(-1, 3)
    return hkl.min(axis=0), hkl.max(axis=0)


def data_grid(
    geometry: Geometry,
    ub: NDArray[np.float64],
    cell: Sequence[float],
    frames: tuple[int, int],
    *,
    max_points: int = MAX_POINTS,
) -> QGrid:
    """The default grid of a rotation: the HKL range reached, at the data's resolution.

    See the module docstring.  ``frames`` is the ``[first, last)`` range transformed.
    """
    rec = reciprocal_parameters(*cell)[:3]
    dq = q_resolution(geometry)
    lo, hi = reached_hkl(geometry, ub, frames)
    axes = []
    for i, name in enumerate(AXIS_NAMES):
        span = max(float(hi[i] - lo[i]), 1e-6)
        step = nice_step_up(max(dq / rec[i], span / max(1, max_points - 3)))
        start = math.floor(lo[i] / step - 1e-9) * step - step
        n = int(math.ceil((hi[i] - start) / step - 1e-9)) + 2
        while n > max_points:  # rounding pushed it over: next nice step
            step = nice_step_up(step * 1.0001)
            start = math.floor(lo[i] / step - 1e-9) * step - step
            n = int(math.ceil((hi[i] - start) / step - 1e-9)) + 2
        axes.append(GridAxis(name, float(f"{start:.12g}"), step, n))
    return QGrid(*axes)


def make_grid(
    geometry: Geometry,
    cell: Sequence[float],
    *,
    qh: Sequence[float] | None = None,
    qk: Sequence[float] | None = None,
    ql: Sequence[float] | None = None,
    ub: NDArray[np.float64] | None = None,
    frames: tuple[int, int] | None = None,
    max_points: int = MAX_POINTS,
) -> QGrid:
    """The transform grid: the default, overridden per axis by ``(min, step, max)``.

    Parameters
    ----------
    geometry : Geometry
        Geometry of the rotation.
    cell : sequence of float
        ``(a, b, c, alpha, beta, gamma)``.
    qh, qk, ql : (min, step, max), optional
        Explicit axes.
    ub, frames : optional
        Orientation matrix and ``[first, last)`` frames: the default axes then follow
        the data (:func:`data_grid`); without them, NXRefine's rule (:func:`default_axis`).
    max_points : int
        Most points per default axis.

    Returns
    -------
    QGrid
    """
    specs = (qh, qk, ql)
    if all(s is not None for s in specs):
        default = None
    elif ub is not None and frames is not None:
        default = data_grid(geometry, ub, cell, frames, max_points=max_points).axes
    else:
        rec = reciprocal_parameters(*cell)[:3]
        q_max = geometry.q_max()
        hq, kq, lq = (default_axis(n, q_max, r) for n, r in zip(AXIS_NAMES, rec, strict=True))
        default = (hq, kq, lq)
    axes = []
    for i, (name, spec) in enumerate(zip(AXIS_NAMES, specs, strict=True)):
        axes.append(axis_from_range(name, spec) if spec is not None else default[i])  # type: ignore[index]
    grid = QGrid(*axes)
    logger.debug("transform grid %s", grid.describe())
    return grid


# ----------------------------------------------------------------------------- sizes
def available_memory() -> int:
    """Bytes of memory available to a new allocation (``MemAvailable``, else total RAM)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - non-Linux
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 1 << 62


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


@dataclass(frozen=True)
class GridBudget:
    """What a transform on a grid costs.

    Attributes
    ----------
    grid_bytes : int
        The float32 ``(v, n)`` grid.
    memory_bytes : int
        Working memory: grid + per-pixel arrays + frame buffers + one output slab.
    output_bytes : int
        Output file size without compression (an upper bound with compression).
    available_memory, free_disk : int
        What the machine offers now.
    """

    grid: QGrid
    grid_bytes: int
    memory_bytes: int
    output_bytes: int
    available_memory: int
    free_disk: int

    def describe(self) -> str:
        """One line: grid, memory and output size against what is available."""
        return (
            f"grid {self.grid.describe()} = {self.grid.size:,} voxels; memory "
            f"{_gb(self.memory_bytes)} (grid {_gb(self.grid_bytes)}) of "
            f"{_gb(self.available_memory)} available; output {_gb(self.output_bytes)} "
            f"of {_gb(self.free_disk)} free"
        )

    def as_dict(self) -> dict[str, Any]:
        """The figures, for summaries."""
        return {
            "voxels": int(self.grid.size),
            "memory_gb": round(self.memory_bytes / 1e9, 3),
            "output_gb": round(self.output_bytes / 1e9, 3),
        }


def grid_budget(
    grid: QGrid,
    out_dir: str | os.PathLike[str],
    *,
    frame_shape: tuple[int, int],
    frame_itemsize: int = 4,
    buffered_frames: int = 64,
    compressed: bool = False,
    memory: int | None = None,
    disk: int | None = None,
    check: bool = True,
) -> GridBudget:
    """State (and check) the memory and disk a transform on ``grid`` needs.

    Parameters
    ----------
    grid : QGrid
        The grid.
    out_dir : path-like
        Directory of the output file (its file system's free space is checked).
    frame_shape, frame_itemsize : detector frame shape and bytes per count
    buffered_frames : int
        Frames held in read-ahead and kernel buffers.
    compressed : bool
        Output compression requested: the disk check is then a warning, since the
        uncompressed size is only an upper bound.
    memory, disk : int, optional
        Available memory and free disk (bytes); measured when omitted.
    check : bool
        Raise if the grid does not fit.

    Raises
    ------
    ReductionError
        If the working memory exceeds 90 % of the available memory or the uncompressed
        output exceeds the free disk space; the message gives the numbers and how to
        choose a smaller grid.
    """
    npix = int(frame_shape[0]) * int(frame_shape[1])
    grid_bytes = 8 * grid.size
    slab = 8 * grid.shape[1] * grid.shape[2] * min(grid.shape[0], 64)
    per_pixel = 24 + 4 + 1  # lab vectors (float64 x 3), pixel weight, band label
    frames = buffered_frames * npix * (int(frame_itemsize) + 1)  # counts + 3-D mask
    memory_bytes = grid_bytes + npix * per_pixel + frames + slab
    output_bytes = grid_bytes + 8 * sum(grid.counts)
    out_dir = Path(out_dir)
    avail = available_memory() if memory is None else int(memory)
    probe = out_dir if out_dir.exists() else out_dir.parent
    free = shutil.disk_usage(probe).free if disk is None else int(disk)
    budget = GridBudget(grid, grid_bytes, memory_bytes, output_bytes, avail, free)
    if not check:
        return budget
    problems = []
    if memory_bytes > 0.9 * avail:
        problems.append(
            f"needs {_gb(memory_bytes)} of memory but {_gb(avail)} is available"
        )
    if output_bytes > free:
        if compressed:
            logger.warning(
                "uncompressed output would be %s with %s free in %s; relying on compression",
                _gb(output_bytes),
                _gb(free),
                out_dir,
            )
        else:
            problems.append(
                f"writes {_gb(output_bytes)} to {out_dir} but only {_gb(free)} is free"
            )
    if problems:
        fit = min(0.9 * avail - (memory_bytes - grid_bytes), free if not compressed else 1e30)
        scale = (max(fit, 8.0) / grid_bytes) ** (1 / 3)
        raise ReductionError(
            f"transform grid {grid.describe()} ({grid.size:,} voxels) "
            + " and ".join(problems)
            + f"; choose a coarser step or a smaller range with --qh/--qk/--ql MIN,STEP,MAX "
            f"(about {scale:.2g} x the points per axis fits), free memory/disk, or compress "
            "the output (--compression)"
        )
    return budget
