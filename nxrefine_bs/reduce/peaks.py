"""Reduction step ``find`` (NXRefine's ``nxfind``): 3-D Bragg peak search.

The frames ``[first, last)`` are streamed once, frame by frame, through a numba sparse
labeller (``performance-baselines.md`` §2b, variant C):

1. **Threshold pass** -- a pixel is *hot* when it is not masked (pixel mask) and its
   value is strictly greater than ``threshold``.  Detector gaps (negative values) are
   never hot.  The pass looks at 256-pixel blocks and only scans a block whose
   maximum exceeds the threshold, so it runs at close to memory speed.
2. **Union-find over the hot pixels** -- hot pixels are joined with their hot left
   and upper neighbours in the same frame and with the peak that owned the same pixel
   in the previous frame.  The features are therefore exactly the connected
   components of the thresholded 3-D stack with **6-connectivity** (face neighbours
   in x, y and frame), the same as ``scipy.ndimage.label`` with its default structure
   on ``(data > threshold) & ~mask``.  Only two ``int32`` pixel maps and the hot-pixel
   lists are kept: memory is O(frame), independent of the number of frames.
3. A feature is complete when no hot pixel of the current frame touches it; its
   moments are then final.

**Moments.**  Weights are the raw counts of the feature's voxels (no background is
subtracted; the weighting is that of ``scipy.ndimage.center_of_mass(data, labels)``):
``x, y, z`` are the intensity-weighted means of the column, row and frame indices
(pixel centres at integer coordinates, ``z`` = absolute frame number, as in
NXRefine), ``sigx, sigy, sigz`` the square roots of the weighted second central
moments, ``intensity`` the sum of the voxel values.

**Zingers and small peaks.**  Every connected component is a candidate, whatever its
voxel count: a sharp Bragg peak (sigma ~ 1 pixel, < 1 frame) may have only a handful of
voxels above the threshold.  Isolated hot voxels -- zingers, single-frame spikes of one
or two pixels -- are rejected by a **shape test** at the feature's brightest voxel
instead: with the background ``b`` taken as the median of the valid pixels on the 5x5
ring around it (Chebyshev distance 2, same frame) and ``h = max - b``, the feature's
*spread* is ``min(sx, sy)`` where ``sx = (max(left, right) - b) / h`` and
``sy = (max(up, down) - b) / h``.  Any spot imaged by the detector spreads into its
neighbours in both directions (a centred Gaussian spot of sigma 0.5 pixel still puts
23 % of its peak value into each neighbour, sigma 1 pixel 60 %), while a zinger or a
one- or two-pixel spike leaves at least one direction at background.  Features with
``spread < min_spread`` (default 0.1, i.e. spots narrower than sigma ~ 0.37 pixel are
rejected; 0 disables the test) are dropped; where the ring or the neighbours are
masked, off the detector or in a gap, the test keeps the feature.  A zinger landing on
top of a real peak is the one case this test gets wrong (the peak is dropped).

``min_voxels`` (default 1: keep any size) is an additional minimum number of voxels
above threshold.  NXRefine's ``min_pixels`` is the minimum *separation* of local maxima
(and the half-width of its centroid box) in its local-maximum search; a
connected-component search has no such parameter, so ``min_pixels`` is accepted and
recorded with the peaks (an NXRefine settings file keeps its meaning) but never removes
a peak.

**Threshold.**  An absolute count level (NXRefine's ``threshold`` setting, default
50000 counts) resolved from the explicit argument, then the settings layers.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import h5py
import numba
import numpy as np
from numpy.typing import NDArray
from tqdm import tqdm

from ..errors import ReductionError
from ..geometry import Geometry
from ..nexus.h5tools import write_field
from ..nexus.nxreduce import store_parameters
from ..nexus.provenance import now_iso, record_process
from ..nexus.scanfile import update_scan_file
from .framestream import (
    FrameStream,
    frame_window,
    open_entry,
    open_frames,
    replace_group,
    step_parameters,
)

logger = logging.getLogger(__name__)

__all__ = ["run", "find_peaks", "PeakLabeller", "peak_table_from_moments", "PROCESS", "FIELDS"]

PROCESS = "nxfind"
FIELDS = (
    "x",
    "y",
    "z",
    "sigx",
    "sigy",
    "sigz",
    "intensity",
    "polar_angle",
    "azimuthal_angle",
    "npixels",
    "spread",
)
"""Fields of the ``peaks`` group (all 1-D float64; ``npixels`` is the voxel count,
``spread`` the shape measure of the zinger test at the brightest voxel)."""

_NSTAT = 10  # npix, sw, swx, swy, swz, swxx, swyy, swzz, max value, spread at the max
_NMOM = 8
DEFAULT_MIN_SPREAD = 0.1
"""Default of ``min_spread``, the zinger test (see the module docstring)."""


# --------------------------------------------------------------------------- kernels


@numba.njit(cache=True, nogil=True)
def _threshold(row, ok, thr, hot_idx, hot_val):  # pragma: no cover - numba
    """Indices and values of unmasked pixels with ``value > thr``; returns their number.

    The maximum of every 256-pixel block is taken first (vectorised); only blocks
    above the threshold are scanned pixel by pixel.
    """
    n = row.size
    nh = 0
    nblocks = n // 256
    for b in range(nblocks):
        base = b * 256
        blk = row[base : base + 256]
        m = blk[0]
        for i in range(256):
            m = max(m, blk[i])
        if m > thr:
            for i in range(base, base + 256):
                v = row[i]
                if v > thr and ok[i] != 0:
                    hot_idx[nh] = i
                    hot_val[nh] = v
                    nh += 1
    for i in range(nblocks * 256, n):
        v = row[i]
        if v > thr and ok[i] != 0:
            hot_idx[nh] = i
            hot_val[nh] = v
            nh += 1
    return nh


@numba.njit(cache=True, nogil=True)
def _find(parent, i):  # pragma: no cover - numba
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


@numba.njit(cache=True, nogil=True)
def _spread(row, ok, p, nx):  # pragma: no cover - numba
    """Shape measure of the voxel ``p`` of a frame (see the module docstring).

    Returns ``min(sx, sy)``, or 1.0 where it cannot be judged (ring or both neighbour
    pairs unusable).
    """
    npix = row.size
    ny = npix // nx
    cx = p % nx
    cy = p // nx
    ring = np.empty(16, dtype=np.float64)
    nr = 0
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            if abs(dx) != 2 and abs(dy) != 2:
                continue
            xx = cx + dx
            yy = cy + dy
            if xx < 0 or xx >= nx or yy < 0 or yy >= ny:
                continue
            q = yy * nx + xx
            v = float(row[q])
            if ok[q] != 0 and v >= 0.0:
                ring[nr] = v
                nr += 1
    if nr < 4:
        return 1.0
    bkg = np.median(ring[:nr])
    h = float(row[p]) - bkg
    if h <= 0.0:
        return 1.0
    out = np.inf
    best = -np.inf
    for dx in (-1, 1):
        xx = cx + dx
        if 0 <= xx < nx:
            q = p + dx
            v = float(row[q])
            if ok[q] != 0 and v >= 0.0 and v > best:
                best = v
    if best > -np.inf:
        out = min(out, (best - bkg) / h)
    best = -np.inf
    for dy in (-1, 1):
        yy = cy + dy
        if 0 <= yy < ny:
            q = p + dy * nx
            v = float(row[q])
            if ok[q] != 0 and v >= 0.0 and v > best:
                best = v
    if best > -np.inf:
        out = min(out, (best - bkg) / h)
    if out == np.inf:
        return 1.0
    return out


@numba.njit(cache=True, nogil=True)
def _link_frame(
    hot_idx,
    hot_val,
    nh,
    nx,
    z,
    cur_map,
    prev_map,
    prev_hot,
    n_prev_hot,
    prev_stats,
    n_prev,
    parent,
    newid,
    new_stats,
    out,
    min_voxels,
    min_spread,
    row,
    ok,
    best,
):  # pragma: no cover - numba
    """Label the hot pixels of frame ``z`` and link them to the open peaks.

    Nodes ``0 .. n_prev-1`` are the open peaks of the previous frame, nodes
    ``n_prev + j`` the hot pixels.  Returns ``(n_new, n_out, n_zingers)``: the number
    of peaks still open (their moments in ``new_stats``, their pixels marked in
    ``prev_map``), of completed peaks with at least ``min_voxels`` voxels that pass the
    shape test written to ``out``, and of completed features rejected by the shape test.
    """
    nn = n_prev + nh
    for i in range(nn):
        parent[i] = i
        newid[i] = -1
    for j in range(nh):
        p = hot_idx[j]
        cur_map[p] = j
        node = n_prev + j
        col = p % nx
        if col > 0:
            q = cur_map[p - 1]
            if q >= 0:
                a = _find(parent, node)
                b = _find(parent, n_prev + q)
                if a != b:
                    parent[max(a, b)] = min(a, b)
        if p >= nx:
            q = cur_map[p - nx]
            if q >= 0:
                a = _find(parent, node)
                b = _find(parent, n_prev + q)
                if a != b:
                    parent[max(a, b)] = min(a, b)
        q = prev_map[p]
        if q >= 0:
            a = _find(parent, node)
            b = _find(parent, q)
            if a != b:
                parent[max(a, b)] = min(a, b)
    # New ids for every set holding a hot pixel of this frame.
    n_new = 0
    fz = float(z)
    for j in range(nh):
        r = _find(parent, n_prev + j)
        k = newid[r]
        if k < 0:
            k = n_new
            newid[r] = k
            n_new += 1
            for s in range(10):
                new_stats[k, s] = 0.0
            new_stats[k, 8] = -np.inf
        p = hot_idx[j]
        w = float(hot_val[j])
        if w > new_stats[k, 8]:
            new_stats[k, 8] = w
            best[k] = p
        fx = float(p % nx)
        fy = float(p // nx)
        new_stats[k, 0] += 1.0
        new_stats[k, 1] += w
        new_stats[k, 2] += w * fx
        new_stats[k, 3] += w * fy
        new_stats[k, 4] += w * fz
        new_stats[k, 5] += w * fx * fx
        new_stats[k, 6] += w * fy * fy
        new_stats[k, 7] += w * fz * fz
    # Shape measure at the brightest voxel of each set in this frame.
    for k in range(n_new):
        new_stats[k, 9] = _spread(row, ok, best[k], nx) if min_spread > 0.0 else 1.0
    # Open peaks: merge into their continuation or complete them.
    n_out = 0
    n_zingers = 0
    for i in range(n_prev):
        r = _find(parent, i)
        k = newid[r]
        if k >= 0:
            for s in range(8):
                new_stats[k, s] += prev_stats[i, s]
            if prev_stats[i, 8] > new_stats[k, 8]:
                new_stats[k, 8] = prev_stats[i, 8]
                new_stats[k, 9] = prev_stats[i, 9]
        elif prev_stats[i, 0] >= min_voxels:
            if min_spread > 0.0 and prev_stats[i, 9] < min_spread:
                n_zingers += 1
            else:
                for s in range(10):
                    out[n_out, s] = prev_stats[i, s]
                n_out += 1
    # Pixel maps for the next frame.
    for j in range(n_prev_hot):
        prev_map[prev_hot[j]] = -1
    for j in range(nh):
        p = hot_idx[j]
        prev_map[p] = newid[_find(parent, n_prev + j)]
        cur_map[p] = -1
    return n_new, n_out, n_zingers


# --------------------------------------------------------------------------- labeller


class PeakLabeller:
    """Streaming 3-D connected-component labeller (6-connectivity) with moments.

    Feed frames in order with :meth:`add_frame`; call :meth:`finish` once at the end.

    Parameters
    ----------
    frame_shape : tuple of int
        ``(ny, nx)``.
    threshold : float
        A pixel is hot if its value is strictly greater.
    masked : ndarray of bool, optional
        Pixel mask (True = masked; never hot).
    min_voxels : int
        Minimum number of voxels of a reported feature.
    min_spread : float
        Zinger test: smallest shape measure at the brightest voxel (see the module
        docstring); 0 disables the test.

    Attributes
    ----------
    n_zingers : int
        Features rejected by the shape test so far.
    """

    def __init__(
        self,
        frame_shape: tuple[int, int],
        threshold: float,
        masked: NDArray[np.bool_] | None = None,
        min_voxels: int = 1,
        *,
        min_spread: float = DEFAULT_MIN_SPREAD,
    ) -> None:
        ny, nx = (int(v) for v in frame_shape)
        self.nx = nx
        self.npix = ny * nx
        self.threshold = float(threshold)
        self.min_voxels = int(min_voxels)
        self.min_spread = float(min_spread)
        if not math.isfinite(self.min_spread):
            raise ReductionError(f"min_spread must be a finite number, got {min_spread!r}")
        self.n_zingers = 0
        ok = np.ones(self.npix, np.uint8) if masked is None else (~masked).ravel()
        self.ok = np.ascontiguousarray(ok, dtype=np.uint8)
        self.cur_map = np.full(self.npix, -1, dtype=np.int32)
        self.prev_map = np.full(self.npix, -1, dtype=np.int32)
        self.hot_idx = np.empty(self.npix, dtype=np.int32)
        self.prev_hot = np.empty(self.npix, dtype=np.int32)
        self.n_prev_hot = 0
        self.hot_val: NDArray | None = None
        cap = 1024
        self.stats = np.zeros((cap, _NSTAT))
        self.new_stats = np.zeros((cap, _NSTAT))
        self.out = np.zeros((cap, _NSTAT))
        self.parent = np.empty(2 * cap, dtype=np.int64)
        self.newid = np.empty(2 * cap, dtype=np.int64)
        self.best = np.empty(cap, dtype=np.int64)
        self.n_open = 0
        self.done: list[NDArray[np.float64]] = []
        self._thr_cache: dict[np.dtype, Any] = {}

    def _typed_threshold(self, dtype: np.dtype) -> Any:
        """The threshold in the frames' dtype (exact for integers: ``v > floor(thr)``)."""
        if dtype not in self._thr_cache:
            if dtype.kind in "iu":
                info = np.iinfo(dtype)
                t = math.floor(self.threshold)
                t = min(max(t, int(info.min)), int(info.max))
                self._thr_cache[dtype] = dtype.type(t)
            else:
                self._thr_cache[dtype] = dtype.type(self.threshold)
        return self._thr_cache[dtype]

    def _ensure(self, n_nodes: int, n_rows: int) -> None:
        if self.parent.size < n_nodes:
            size = max(n_nodes, 2 * self.parent.size)
            self.parent = np.empty(size, dtype=np.int64)
            self.newid = np.empty(size, dtype=np.int64)
        if self.stats.shape[0] < n_rows:
            rows = max(n_rows, 2 * self.stats.shape[0])
            stats = np.zeros((rows, _NSTAT))
            stats[: self.n_open] = self.stats[: self.n_open]
            self.stats = stats
            self.new_stats = np.zeros((rows, _NSTAT))
            self.out = np.zeros((rows, _NSTAT))
            self.best = np.empty(rows, dtype=np.int64)

    def add_frame(self, frame: NDArray, z: int) -> None:
        """Process frame number ``z`` (frames must come in increasing, consecutive order)."""
        row = frame.reshape(-1)
        if self.hot_val is None or self.hot_val.dtype != row.dtype:
            self.hot_val = np.empty(self.npix, dtype=row.dtype)
        thr = self._typed_threshold(row.dtype)
        nh = _threshold(row, self.ok, thr, self.hot_idx, self.hot_val)
        self._ensure(self.n_open + nh, max(self.n_open, nh))
        n_new, n_out, n_zingers = _link_frame(
            self.hot_idx,
            self.hot_val,
            nh,
            self.nx,
            z,
            self.cur_map,
            self.prev_map,
            self.prev_hot,
            self.n_prev_hot,
            self.stats,
            self.n_open,
            self.parent,
            self.newid,
            self.new_stats,
            self.out,
            self.min_voxels,
            self.min_spread,
            row,
            self.ok,
            self.best,
        )
        self.n_zingers += n_zingers
        if n_out:
            self.done.append(self.out[:n_out].copy())
        self.stats, self.new_stats = self.new_stats, self.stats
        self.n_open = n_new
        self.hot_idx, self.prev_hot = self.prev_hot, self.hot_idx
        self.n_prev_hot = nh

    def finish(self) -> NDArray[np.float64]:
        """Complete the open features and return all moments, shape ``(n, 10)``.

        Columns: voxel count, sum w, sum w x, sum w y, sum w z, sum w x^2, sum w y^2,
        sum w z^2, brightest value, shape measure at the brightest voxel.  The labeller
        is reset for a new stack (:attr:`n_zingers` keeps counting).
        """
        open_rows = self.stats[: self.n_open]
        keep = open_rows[:, 0] >= self.min_voxels
        if self.min_spread > 0:
            zinger = keep & (open_rows[:, 9] < self.min_spread)
            self.n_zingers += int(zinger.sum())
            keep &= ~zinger
        parts = [*self.done, open_rows[keep].copy()]
        for j in range(self.n_prev_hot):
            self.prev_map[self.prev_hot[j]] = -1
        self.n_prev_hot = 0
        self.n_open = 0
        self.done = []
        return np.concatenate(parts) if parts else np.zeros((0, _NSTAT))


def peak_table_from_moments(
    moments: NDArray[np.float64], geometry: Geometry | None = None
) -> dict[str, NDArray[np.float64]]:
    """Convert raw moments (:meth:`PeakLabeller.finish`) to the peak fields, sorted by z."""
    m = np.asarray(moments, dtype=np.float64).reshape(-1, _NSTAT)
    sw = m[:, 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        x, y, z = m[:, 2] / sw, m[:, 3] / sw, m[:, 4] / sw
        varx = np.maximum(m[:, 5] / sw - x * x, 0.0)
        vary = np.maximum(m[:, 6] / sw - y * y, 0.0)
        varz = np.maximum(m[:, 7] / sw - z * z, 0.0)
    order = np.lexsort((x, y, z))
    out = {
        "x": x,
        "y": y,
        "z": z,
        "sigx": np.sqrt(varx),
        "sigy": np.sqrt(vary),
        "sigz": np.sqrt(varz),
        "intensity": sw.copy(),
        "npixels": m[:, 0].copy(),
        "spread": m[:, 9].copy(),
    }
    out = {k: np.ascontiguousarray(v[order], dtype=np.float64) for k, v in out.items()}
    if geometry is not None and len(out["x"]):
        out["polar_angle"] = np.asarray(geometry.two_theta(out["x"], out["y"]), dtype=np.float64)
        out["azimuthal_angle"] = np.asarray(geometry.azimuth(out["x"], out["y"]), dtype=np.float64)
    else:
        out["polar_angle"] = np.zeros(len(out["x"]))
        out["azimuthal_angle"] = np.zeros(len(out["x"]))
    return out


def find_peaks(
    stream: FrameStream,
    first: int,
    last: int,
    threshold: float,
    masked: NDArray[np.bool_] | None = None,
    *,
    min_voxels: int = 1,
    min_spread: float = DEFAULT_MIN_SPREAD,
    geometry: Geometry | None = None,
    progress: bool = False,
    stats: dict[str, int] | None = None,
) -> dict[str, NDArray[np.float64]]:
    """Search frames ``[first, last)`` of ``stream`` for peaks (see the module docstring).

    Parameters
    ----------
    stream : FrameStream
        The entry's frames.
    first, last : int
        Frame range ``[first, last)``.
    threshold : float
        Pixels strictly above it are hot.
    masked : ndarray of bool, optional
        Pixel mask (True = masked).
    min_voxels : int
        Fewest voxels above threshold of a peak.
    min_spread : float
        Zinger test (0 disables it).
    geometry : Geometry, optional
        For the polar and azimuthal angles.
    progress : bool
        Show a progress bar.
    stats : dict, optional
        Receives ``"zingers"``: the number of features rejected by the shape test.

    Returns
    -------
    dict
        1-D float64 arrays ``x, y, z, sigx, sigy, sigz, intensity, npixels, spread,
        polar_angle, azimuthal_angle`` (angles only if ``geometry`` is given, else 0),
        sorted by ``z``.
    """
    labeller = PeakLabeller(
        stream.frame_shape, threshold, masked, min_voxels, min_spread=min_spread
    )
    with tqdm(
        total=max(0, last - first),
        disable=not progress,
        desc=f"nxfind {stream.source.entry}",
        unit="frame",
    ) as bar:
        for start, block in stream.blocks(first, last):
            for j in range(block.shape[0]):
                labeller.add_frame(block[j], start + j)
            bar.update(block.shape[0])
    table = peak_table_from_moments(labeller.finish(), geometry)
    if stats is not None:
        stats["zingers"] = labeller.n_zingers
    return table


# --------------------------------------------------------------------------- step


def run(
    scan_file: str | os.PathLike[str],
    entry: str,
    *,
    threshold: float | None = None,
    first: int | None = None,
    last: int | None = None,
    min_voxels: int | None = None,
    min_spread: float = DEFAULT_MIN_SPREAD,
    min_pixels: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
    swmr: bool = False,
) -> dict[str, Any]:
    """Run the ``find`` step (process ``nxfind``) on rotation entry ``entry``.

    Parameters
    ----------
    scan_file : path-like
        Scan file ``<sample>_<scan>.nxs``.
    entry : str
        Rotation entry, e.g. ``"f1"``.
    threshold : float, optional
        Absolute count threshold (pixels strictly above it are hot); default: the
        settings (``threshold``, 50000).
    first, last : int, optional
        Frame range ``[first, last)``; default: settings ``first_frame`` /
        ``last_frame``, clipped to the stack.
    min_voxels : int, optional
        Fewest voxels above threshold of a peak (default: settings ``min_voxels``, 1:
        any size).
    min_spread : float
        Zinger test: smallest shape measure at a peak's brightest voxel (module
        docstring); 0 disables it.
    min_pixels : int, optional
        NXRefine's minimum peak separation (default: settings ``min_pixels``, 10);
        recorded with the peaks for NXRefine, never used to drop peaks.
    overwrite : bool
        Search again even if ``nxfind`` is recorded (results are replaced).
    progress : bool
        Show a progress bar.
    swmr : bool
        Open the files in SWMR-read mode.

    Returns
    -------
    dict
        ``entry``, ``skipped``, ``npeaks``, ``zingers`` (features rejected by the
        shape test), ``first``, ``last``, ``threshold``, ``min_voxels``, ``min_spread``,
        ``min_pixels``, ``elapsed_s``.

    Raises
    ------
    ScanFileError, DataLinkError
        Missing entry, geometry or detector data.
    ReductionError
        No frames in ``[first, last)``, a negative threshold, or every pixel masked.
    """
    t0 = time.perf_counter()
    start_time = now_iso()
    scan_file = Path(scan_file)
    geometry, skipped = open_entry(scan_file, entry, PROCESS, overwrite=overwrite)
    if skipped is not None:
        return skipped
    assert geometry is not None  # open_entry returns one of the two
    params = step_parameters(
        ("threshold", "first_frame", "last_frame", "min_voxels", "min_pixels"),
        {
            "threshold": threshold,
            "first_frame": first,
            "last_frame": last,
            "min_voxels": min_voxels,
            "min_pixels": min_pixels,
        },
        scan_file,
    )
    thr = params["threshold"]
    if thr is None or not math.isfinite(float(thr)) or float(thr) < 0:
        raise ReductionError(
            f"{scan_file}:/{entry}: peak-search threshold must be a count >= 0, got {thr!r}; "
            "set it with threshold=... or in settings [nxreduce] threshold"
        )
    thr = float(thr)
    nvox_min = max(1, int(params["min_voxels"]))
    separation = params["min_pixels"]
    separation = int(separation) if separation is not None else None
    spread = float(min_spread)
    if not math.isfinite(spread) or spread >= 1.0:
        raise ReductionError(
            f"{scan_file}:/{entry}: min_spread must be a number below 1 (0 disables the zinger "
            f"test), got {min_spread!r}"
        )
    counts: dict[str, int] = {}
    with open_frames(scan_file, entry, swmr=swmr) as stream:
        lo, hi, masked = frame_window(
            stream, geometry, params["first_frame"], params["last_frame"], scan_file, entry
        )
        peaks = find_peaks(
            stream,
            lo,
            hi,
            thr,
            masked,
            min_voxels=nvox_min,
            min_spread=spread,
            geometry=geometry,
            progress=progress,
            stats=counts,
        )
    npeaks = len(peaks["x"])
    if npeaks == 0:
        logger.warning(
            "%s:%s: no peaks above threshold %g in frames %d-%d", scan_file, entry, thr, lo, hi
        )

    def build(group: h5py.Group) -> None:
        group.attrs["NX_class"] = "NXreflections"
        group.attrs["first"] = lo
        group.attrs["last"] = hi
        group.attrs["threshold"] = thr
        group.attrs["min_voxels"] = nvox_min
        group.attrs["min_spread"] = spread
        if separation is not None:
            group.attrs["min_pixels"] = separation
        for name in FIELDS:
            units = "degree" if name.endswith("angle") else None
            write_field(group, name, peaks[name].astype(np.float64), units=units)

    summary = {
        "npeaks": npeaks,
        "zingers": counts.get("zingers", 0),
        "first": lo,
        "last": hi,
        "threshold": thr,
        "min_voxels": nvox_min,
        "min_spread": spread,
        "min_pixels": separation,
    }
    with update_scan_file(scan_file) as f:
        group = f[entry]
        replace_group(group, "peaks", build)
        record_process(
            group,
            PROCESS,
            parameters={
                "threshold": thr,
                "first_frame": lo,
                "last_frame": hi,
                "min_voxels": nvox_min,
                "min_spread": spread,
                "min_pixels": separation,
            },
            start_time=start_time,
            summary=summary,
        )
        # the parameters used, where NXRefine reads them (/entry/nxreduce)
        store_parameters(f, {"threshold": thr, "first_frame": lo, "last_frame": hi})
    elapsed = time.perf_counter() - t0
    logger.info(
        "%s:%s: nxfind %d peaks in frames %d-%d (%.2f s)", scan_file, entry, npeaks, lo, hi, elapsed
    )
    return {"entry": entry, "skipped": False, **summary, "elapsed_s": elapsed}
