"""Transform a rotation scan into reciprocal space (``nxtransform`` / ``nxmasked_transform``).

Every pixel ``(x, y)`` of every frame ``z`` of rotation ``fN`` is mapped to Miller
indices with the full geometry of :class:`~nxrefine_bs.geometry.Geometry` (detector
orientation and tilts, goniometer ``theta, omega, chi, phi``, sample offset) and the
orientation matrix ``UB``, exactly as :meth:`Geometry.pixel_to_hkl`, and added to the
*nearest* voxel of an ``[l, k, h]`` grid (see :mod:`nxrefine_bs.reduce.grid`).

Accumulation (the CCTW semantics with ``--normalization 0``)::

    v[voxel] += counts(x, y, z)
    n[voxel] += w_frame(z) * P(x, y)

with ``w_frame = smoothed monitor / norm x attenuator/filter transmission`` (1 without
``norm``; 0 outside ``first .. last``) and ``P`` the pixel polarization factor (pyFAI
convention).  ``v / n`` (where ``n > 0``) is then the normalised intensity
``S(Q) = <counts / (w_frame P)>`` averaged over every pixel that fell in the voxel.
Pixels are skipped, contributing to neither array, when the pixel mask is set, the
counts are negative (detector gaps, -1) or NaN, the frame weight is 0, the 3-D mask is
set (masked transform), or the voxel lies outside the grid.

Output: ``<scan>/fN_transform.nxs`` (``fN_masked_transform.nxs``) with
``/entry/data/{v, n, Ql, Qk, Qh}`` (float32, ``[l, k, h]``, 50^3 chunks), linked from
the scan file as ``fN/transform`` (``masked_transform``): ``data`` -> ``v``,
``weights`` -> ``n``, axes ``Ql, Qk, Qh`` with ``scaling_factor`` c*, b*, a*
(1/Angstrom including 2 pi) and attribute ``angles`` = (gamma*, beta*, alpha*).

Frames are streamed in blocks; memory is the grid (``8 x voxels`` bytes) plus a few
blocks of frames.  The kernel loops *row -> frame block -> pixel* so that consecutive
updates hit neighbouring voxels (performance-baselines §2d).  With ``nthreads > 1`` the
pixels are split into bands of equal ``Q`` component along the rotation axis - which
the rotation does not change - separated by guard bands wider than one voxel, so the
threads never write the same voxel; the guard pixels are added afterwards.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import h5py
import numba
import numpy as np
from numpy.typing import NDArray
from tqdm import tqdm

from ..errors import DataLinkError, FileExistsNXError, ReductionError
from ..geometry import Geometry, reciprocal_parameters
from ..nexus.geometry_io import read_cell, read_geometry, read_ub
from ..nexus.h5tools import nx_group, read_field, write_external_link, write_field
from ..nexus.provenance import now_iso, process_done, record_process
from ..nexus.scanfile import open_scan_file, update_scan_file
from .grid import QGrid, make_grid

logger = logging.getLogger(__name__)

__all__ = [
    "run",
    "Accumulator",
    "polarization_factor",
    "pixel_vectors",
    "frame_matrices",
    "pixel_hkl",
    "frame_weights",
    "read_transform",
    "write_transform_file",
    "plot_slice",
    "scatter_block",
    "random_scatter",
]

BLOCK_FRAMES = 16
"""Frames per block of the blocked kernel (performance-baselines §2d: 16-32)."""

CHUNK = 50
"""Output chunk edge (CCTW's 50^3)."""


# ----------------------------------------------------------------------------- kernels
@numba.njit(cache=True, nogil=True, boundscheck=False)
def scatter_block(
    frames,
    frame_weight,
    mats,
    offs,
    sample_shift,
    vec,
    pixel_weight,
    band,
    which,
    row0,
    row1,
    mask3d,
    use_mask3d,
    offset_mode,
    inv_wavelength,
    dims,
    vn,
):  # pragma: no cover - compiled
    """Accumulate a block of frames into the interleaved ``(v, n)`` grid.

    Parameters
    ----------
    frames : ndarray (nb, ny, nx)
        Counts of any numeric dtype.
    frame_weight : ndarray (nb,) float64
        Frame weights; frames with weight <= 0 are skipped.
    mats : ndarray (nb, 3, 3) float64
        ``diag(1/step) (UB)^-1 G(phi)^T``: lab vector -> fractional voxel index.
    offs : ndarray (nb, 3) float64
        ``0.5 - start/step`` for (h, k, l), so that ``floor(mats @ q + offs)`` is the
        nearest voxel.
    sample_shift : ndarray (nb, 3) float64
        ``G(phi) . (xs, ys, zs)`` (mm), used in offset mode only.
    vec : ndarray (ny, nx, 3) float64
        Lab scattering vector per pixel, or the sample-to-pixel vector in offset mode.
    pixel_weight : ndarray (ny, nx) float32
        Polarization x (1 - pixel mask); pixels with weight <= 0 are skipped.
    band, which : ndarray (ny, nx) int8, int
        Only pixels with ``band == which`` are visited unless ``which < 0``.
    row0, row1 : int
        Detector rows visited.
    mask3d : ndarray (nb, ny, nx) int8
        3-D mask, read only if ``use_mask3d``.
    use_mask3d, offset_mode : bool
    inv_wavelength : float
        1 / lambda (offset mode).
    dims : ndarray (3,) int64
        ``(nh, nk, nl)``.
    vn : ndarray (nl * nk * nh * 2,) float32
        Flat interleaved grid: ``vn[2 i] = v``, ``vn[2 i + 1] = n``.

    Returns
    -------
    (int, float)
        Pixels added and the sum of their counts.
    """
    nb = frames.shape[0]
    nx = frames.shape[2]
    nh = dims[0]
    nk = dims[1]
    fh = np.float64(dims[0])
    fk = np.float64(dims[1])
    fl = np.float64(dims[2])
    added = 0
    total = 0.0
    for y in range(row0, row1):
        for f in range(nb):
            wf = frame_weight[f]
            if wf <= 0.0:
                continue
            m00 = mats[f, 0, 0]
            m01 = mats[f, 0, 1]
            m02 = mats[f, 0, 2]
            m10 = mats[f, 1, 0]
            m11 = mats[f, 1, 1]
            m12 = mats[f, 1, 2]
            m20 = mats[f, 2, 0]
            m21 = mats[f, 2, 1]
            m22 = mats[f, 2, 2]
            o0 = offs[f, 0]
            o1 = offs[f, 1]
            o2 = offs[f, 2]
            sx = sample_shift[f, 0]
            sy = sample_shift[f, 1]
            sz = sample_shift[f, 2]
            for x in range(nx):
                wp = pixel_weight[y, x]
                if wp <= 0.0:
                    continue
                if which >= 0 and band[y, x] != which:
                    continue
                c = frames[f, y, x]
                if not (c >= 0):  # detector gaps (-1) and NaN
                    continue
                if use_mask3d and mask3d[f, y, x] != 0:
                    continue
                qx = vec[y, x, 0]
                qy = vec[y, x, 1]
                qz = vec[y, x, 2]
                if offset_mode:
                    dx = qx - sx
                    dy = qy - sy
                    dz = qz - sz
                    r = inv_wavelength / math.sqrt(dx * dx + dy * dy + dz * dz)
                    qx = dx * r - inv_wavelength
                    qy = dy * r
                    qz = dz * r
                uh = m00 * qx + m01 * qy + m02 * qz + o0
                uk = m10 * qx + m11 * qy + m12 * qz + o1
                ul = m20 * qx + m21 * qy + m22 * qz + o2
                # truncation == floor for the non-negative values kept
                if uh < 0.0 or uk < 0.0 or ul < 0.0 or uh >= fh or uk >= fk or ul >= fl:
                    continue
                idx = ((np.int64(ul) * nk + np.int64(uk)) * nh + np.int64(uh)) * 2
                cf = np.float32(c)
                vn[idx] += cf
                vn[idx + 1] += np.float32(wf * wp)
                added += 1
                total += cf
    return added, total


@numba.njit(cache=True, nogil=True, boundscheck=False)
def random_scatter(index, values, weights, vn):  # pragma: no cover - compiled
    """Benchmark yardstick: ``vn[2 i] += value``, ``vn[2 i + 1] += weight`` at given ``i``."""
    for j in range(index.shape[0]):
        i = index[j] * 2
        vn[i] += values[j]
        vn[i + 1] += weights[j]
    return index.shape[0]


# ----------------------------------------------------------------------------- geometry
def polarization_factor(geometry: Geometry, factor: float = 0.99) -> NDArray[np.float32]:
    """pyFAI polarization factor of every pixel (float32, shape ``geometry.shape``).

    ``P = (1 + cos^2 2t - f cos 2chi sin^2 2t) / 2`` with ``chi`` the azimuth measured
    from the horizontal lab axis +Y, i.e. ``P = 1 - (1+f)/2 s_y^2 - (1-f)/2 s_z^2`` for
    the unit diffracted direction ``s``.  ``f = 0.99``: 99.5 % horizontally polarized.
    """
    ny, nx = geometry.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    s = geometry.pixel_vectors(xx, yy)
    s /= np.linalg.norm(s, axis=-1, keepdims=True)
    p = 1.0 - 0.5 * (1.0 + factor) * s[..., 1] ** 2 - 0.5 * (1.0 - factor) * s[..., 2] ** 2
    return p.astype(np.float32)


def _has_offset(geometry: Geometry) -> bool:
    return bool(geometry.xs or geometry.ys or geometry.zs)


def pixel_vectors(geometry: Geometry) -> NDArray[np.float64]:
    """Per-pixel vectors used by the kernel, shape ``(ny, nx, 3)``.

    The lab scattering vector ``(s_hat - x_hat) / lambda`` (1/Angstrom) without a sample
    offset; the sample-to-pixel vector in mm (normalised per frame) with one.
    """
    ny, nx = geometry.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    if _has_offset(geometry):
        return np.ascontiguousarray(geometry.pixel_vectors(xx, yy))
    return np.ascontiguousarray(geometry.pixel_q_lab(xx, yy))


def frame_matrices(
    geometry: Geometry, ub: NDArray[np.float64], grid: QGrid, frames: NDArray[Any]
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Per-frame kernel constants for frame indices ``frames``.

    Returns
    -------
    mats : ndarray (nf, 3, 3)
        ``diag(1/step) @ inv(UB) @ G(phi)^T``.
    offs : ndarray (nf, 3)
        ``0.5 - start/step``.
    shift : ndarray (nf, 3)
        ``G(phi) @ (xs, ys, zs)`` (mm).
    """
    z = np.asarray(frames, dtype=np.float64)
    g = geometry.goniometer(geometry.phi(z))
    inv_ub = np.linalg.inv(np.asarray(ub, dtype=np.float64))
    scale = 1.0 / grid.steps
    mats = np.einsum("i,ij,fkj->fik", scale, inv_ub, g)
    offs = np.broadcast_to(0.5 - grid.origin * scale, (len(z), 3)).copy()
    shift = np.einsum("fij,j->fi", g, np.array([geometry.xs, geometry.ys, geometry.zs]))
    return np.ascontiguousarray(mats), offs, np.ascontiguousarray(shift)


def pixel_hkl(
    geometry: Geometry, ub: NDArray[np.float64], x: Any, y: Any, z: Any
) -> NDArray[np.float64]:
    """Miller indices of pixel positions computed the way the transform kernel does.

    Uses the same per-pixel vectors and per-frame matrices as the kernel (with a unit
    grid), so it checks the kernel's mapping against :meth:`Geometry.pixel_to_hkl`.
    """
    x, y, z = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float), np.asarray(z, float))
    unit = make_grid(geometry, (1, 1, 1, 90, 90, 90), qh=(0, 1, 0), qk=(0, 1, 0), ql=(0, 1, 0))
    mats, _, shift = frame_matrices(geometry, ub, unit, z.ravel())
    if _has_offset(geometry):
        s = geometry.pixel_vectors(x, y).reshape(-1, 3) - shift
        s /= np.linalg.norm(s, axis=1, keepdims=True)
        s[:, 0] -= 1.0
        q = s / geometry.wavelength
    else:
        q = geometry.pixel_q_lab(x, y).reshape(-1, 3)
    return np.einsum("fij,fj->fi", mats, q).reshape(x.shape + (3,))


# ----------------------------------------------------------------------------- accumulator
class Accumulator:
    """An interleaved float32 ``(v, n)`` grid and the per-pixel data of one rotation.

    Parameters
    ----------
    grid : QGrid
        Output grid.
    geometry : Geometry
        Geometry of the rotation.
    ub : ndarray (3, 3)
        Orientation matrix ``U B``.
    pixel_weight : ndarray (ny, nx)
        Polarization x (1 - pixel mask); 0 excludes a pixel.
    nthreads : int
        Threads (race-free bands, see the module docstring); 1 = serial.
    vn : ndarray, optional
        Existing flat float32 array of ``2 * grid.size`` to accumulate into (reused
        between calls, e.g. by the benchmark); allocated zeroed if omitted.
    """

    def __init__(
        self,
        grid: QGrid,
        geometry: Geometry,
        ub: NDArray[np.float64],
        pixel_weight: NDArray[Any],
        *,
        nthreads: int = 1,
        vn: NDArray[np.float32] | None = None,
    ) -> None:
        self.grid = grid
        self.geometry = geometry
        self.ub = np.asarray(ub, dtype=np.float64)
        if tuple(pixel_weight.shape) != tuple(geometry.shape):
            raise ReductionError(
                f"pixel weights shape {pixel_weight.shape} != detector shape {geometry.shape}"
            )
        self.pixel_weight = np.ascontiguousarray(pixel_weight, dtype=np.float32)
        self.vec = pixel_vectors(geometry)
        self.offset_mode = _has_offset(geometry)
        self.dims = grid.counts.astype(np.int64)
        if vn is None:
            vn = np.zeros(2 * grid.size, dtype=np.float32)
        elif vn.dtype != np.float32 or vn.size != 2 * grid.size:
            raise ReductionError(f"accumulator array must be float32 of size {2 * grid.size}")
        self.vn = vn.reshape(-1)
        self.added = 0
        self.total = 0.0
        self._dummy_mask = np.zeros((1, 1, 1), dtype=np.int8)
        self.nthreads = max(1, int(nthreads))
        if self.nthreads > 1 and self.offset_mode:
            logger.info("sample offset set: Q along the axis is not invariant; using 1 thread")
            self.nthreads = 1
        self._pool: ThreadPoolExecutor | None = None
        ny = geometry.shape[0]
        self.band = np.zeros(geometry.shape, dtype=np.int8)
        self._bands: list[tuple[int, int, int]] = [(-1, 0, ny)]
        if self.nthreads > 1:
            self._make_bands()

    # -------------------------------------------------------------- threads
    def _make_bands(self) -> None:
        """Split pixels into ``nthreads`` bands of the invariant ``Q`` along the axis."""
        g = self.geometry
        axis_lab = g.goniometer_base[:, 2]
        t = np.einsum("yxi,i->yx", self.vec, axis_lab)  # (Gbase^T q)_z, phi-invariant
        extent = float(np.abs(self.ub[2]) @ self.grid.steps)  # a voxel's extent along t
        guard = 1.05 * extent + 1e-9
        good = self.pixel_weight > 0
        splits = np.quantile(t[good], np.linspace(0, 1, self.nthreads + 1)[1:-1])
        band = np.searchsorted(splits, t).astype(np.int8)
        near = np.zeros(t.shape, dtype=bool)
        for s in splits:
            near |= np.abs(t - s) < guard
        band[near] = self.nthreads  # guard band, added serially afterwards
        self.band = band
        self._bands = []
        for b in range(self.nthreads + 1):
            rows = np.nonzero(((band == b) & good).any(axis=1))[0]
            if rows.size:
                self._bands.append((b, int(rows[0]), int(rows[-1]) + 1))
        self._pool = ThreadPoolExecutor(max_workers=self.nthreads, thread_name_prefix="transform")
        logger.debug(
            "transform bands: %d threads, guard %.3g 1/A, %.2f%% guard pixels",
            self.nthreads,
            guard,
            100.0 * near[good].mean(),
        )

    def close(self) -> None:
        """Shut the thread pool down."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self) -> Accumulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- accumulate
    def add(
        self,
        frames: NDArray[Any],
        start: int,
        frame_weight: NDArray[np.float64],
        mask3d: NDArray[np.int8] | None = None,
    ) -> int:
        """Add a block of consecutive frames whose first frame index is ``start``.

        Returns the number of pixels added.
        """
        nb = frames.shape[0]
        mats, offs, shift = frame_matrices(
            self.geometry, self.ub, self.grid, np.arange(start, start + nb)
        )
        fw = np.ascontiguousarray(frame_weight[:nb], dtype=np.float64)
        use_mask = mask3d is not None
        m3 = mask3d if mask3d is not None else self._dummy_mask
        args = (
            frames,
            fw,
            mats,
            offs,
            shift,
            self.vec,
            self.pixel_weight,
            self.band,
        )
        tail = (
            m3,
            use_mask,
            self.offset_mode,
            1.0 / self.geometry.wavelength,
            self.dims,
            self.vn,
        )

        def one(b: int, r0: int, r1: int) -> tuple[int, float]:
            return scatter_block(*args, b, r0, r1, *tail)

        results: list[tuple[int, float]] = []
        if self._pool is None:
            results.append(one(*self._bands[0]))
        else:
            parallel = [bd for bd in self._bands if bd[0] < self.nthreads]
            futures = [self._pool.submit(one, *bd) for bd in parallel]
            results.extend(fu.result() for fu in futures)
            results.extend(one(*bd) for bd in self._bands if bd[0] == self.nthreads)
        added = sum(r[0] for r in results)
        self.added += added
        self.total += sum(r[1] for r in results)
        return added

    # -------------------------------------------------------------- results
    @property
    def grid4(self) -> NDArray[np.float32]:
        """The grid as ``(nl, nk, nh, 2)``."""
        return self.vn.reshape(self.grid.shape + (2,))

    @property
    def v(self) -> NDArray[np.float32]:
        """Signal ``v`` as a strided ``(nl, nk, nh)`` view."""
        return self.grid4[..., 0]

    @property
    def n(self) -> NDArray[np.float32]:
        """Weights ``n`` as a strided ``(nl, nk, nh)`` view."""
        return self.grid4[..., 1]


# ----------------------------------------------------------------------------- inputs
def _where(scan_file: Path, entry: str) -> str:
    return f"{scan_file}:/{entry}"


def _savgol_window(n: int) -> int:
    if n > 1000:
        w = 501
    elif n > 200:
        w = 101
    else:
        w = n if n % 2 else n - 1
    return w


def frame_weights(
    entry: h5py.Group,
    n_frames: int,
    *,
    norm: float | None = None,
    first: int | None = None,
    last: int | None = None,
) -> NDArray[np.float64]:
    """Per-frame weights: smoothed monitor / ``norm`` x transmission; 0 outside first..last.

    The monitor is the signal of ``entry/monitor`` (NXRefine §5.9): its first and last
    values are replaced by their neighbours, it is divided by ``norm`` and smoothed with
    a Savitzky-Golay filter (order 2; window 501 above 1000 frames, 101 above 200, else
    the whole length).  Without ``norm`` the monitor is not used.  Transmissions are
    ``instrument/attenuator/attenuator_transmission`` and ``instrument/filter/transmission``
    (scalars or per frame) when present.
    """
    w = np.ones(n_frames, dtype=np.float64)
    if norm is not None:
        mon = None
        grp = entry.get("monitor")
        if isinstance(grp, h5py.Group):
            signal = grp.attrs.get("signal")
            if isinstance(signal, bytes):
                signal = signal.decode()
            if signal is not None and signal in grp:
                mon = np.asarray(grp[signal][()], dtype=np.float64).ravel()
        if mon is None or mon.size != n_frames:
            logger.warning(
                "%s:%s has no usable monitor (%s values for %d frames); not normalising",
                entry.file.filename,
                entry.name,
                None if mon is None else mon.size,
                n_frames,
            )
        else:
            mon = mon.copy()
            if n_frames > 2:
                mon[0], mon[-1] = mon[1], mon[-2]
            mon /= float(norm)
            win = _savgol_window(n_frames)
            if win >= 3:
                from scipy.signal import savgol_filter

                mon = savgol_filter(mon, win, 2)
            w *= mon
    for path in ("instrument/attenuator/attenuator_transmission", "instrument/filter/transmission"):
        t = read_field(entry, path)
        if t is None:
            continue
        t = np.asarray(t, dtype=np.float64).ravel()
        if t.size == 1 or t.size == n_frames:
            w *= t if t.size == n_frames else float(t[0])
        else:
            logger.warning("%s has %d values for %d frames; ignored", path, t.size, n_frames)
    lo, hi = _frame_range(entry, n_frames, first, last)
    w[:lo] = 0.0
    w[hi + 1 :] = 0.0
    return w


def _frame_range(
    entry: h5py.Group, n_frames: int, first: int | None, last: int | None
) -> tuple[int, int]:
    data = entry.get("data")
    if first is None and data is not None and "first" in data.attrs:
        first = int(data.attrs["first"])
    if last is None and data is not None and "last" in data.attrs:
        last = int(data.attrs["last"])
    lo = 0 if first is None else max(0, int(first))
    hi = n_frames - 1 if last is None else min(n_frames - 1, int(last))
    if hi < lo:
        raise ReductionError(
            f"{entry.file.filename}:{entry.name}: empty frame range first={lo} last={hi}"
        )
    return lo, hi


def scan_directory(scan_file: Path, raw_file: Path | None = None) -> Path:
    """The scan directory ``<label>/<scan>`` that holds derived files (created if needed).

    Derived from the scan-file name ``<sample>_<scan>.nxs``; if the file is not in an
    experiment tree, the directory of the raw data (or of the scan file) is used.
    """
    from ..errors import ExperimentError
    from ..experiment import ScanPaths

    try:
        path = ScanPaths.from_scan_file(scan_file).scan_dir
    except ExperimentError:
        path = raw_file.parent if raw_file is not None else scan_file.parent
    path.mkdir(parents=True, exist_ok=True)
    return path


def _external_target(scan_file: Path, group: h5py.Group, name: str) -> tuple[Path, str]:
    """Resolve the (relative) external link ``group[name]`` to ``(file, path)``."""
    link = group.get(name, getlink=True)
    if not isinstance(link, h5py.ExternalLink):
        raise DataLinkError(
            f"{scan_file}:{group.name}/{name} is not an external link to detector data"
        )
    target = Path(link.filename)
    if not target.is_absolute():
        target = scan_file.parent / target
    if not target.exists():
        raise DataLinkError(
            f"{scan_file}:{group.name}/{name} points at missing file {target}; "
            "check that the scan directory sits next to the scan file"
        )
    return target, link.path


def read_pixel_weight(entry: h5py.Group, geometry: Geometry, polarization: float) -> NDArray[Any]:
    """Polarization factor x (1 - pixel mask) of every pixel (float32)."""
    det = entry["instrument/detector"]
    pol = read_field(det, "polarization")
    if pol is not None and np.shape(pol) == tuple(geometry.shape):
        p = np.asarray(pol, dtype=np.float32)
    else:
        p = polarization_factor(geometry, polarization)
    mask = read_field(det, "pixel_mask")
    if mask is not None and np.shape(mask) == tuple(geometry.shape):
        p = np.where(np.asarray(mask) != 0, np.float32(0), p).astype(np.float32)
    return p


# ----------------------------------------------------------------------------- output
def _axis_attrs(name: str, scaling: float) -> dict[str, Any]:
    return {"long_name": f"{name.upper()} (r.l.u.)", "scaling_factor": scaling, "units": "rlu"}


def write_transform_file(
    path: Path,
    grid: QGrid,
    acc: Accumulator | None,
    *,
    arrays: dict[str, NDArray[np.float32]] | None = None,
    signal: str = "v",
) -> None:
    """Write ``/entry/data/{v, n, Ql, Qk, Qh}`` (plus any extra ``arrays``) atomically.

    ``acc`` supplies ``v`` and ``n`` from its interleaved grid, slab by slab.
    """
    tmp = path.with_name(path.name + ".part")
    shape = grid.shape
    chunks = tuple(min(CHUNK, s) for s in shape)
    with h5py.File(tmp, "w") as f:
        f.attrs["default"] = "entry"
        entry = nx_group(f, "entry", "NXentry")
        entry.attrs["default"] = "data"
        data = nx_group(entry, "data", "NXdata")
        data.attrs["signal"] = signal
        data.attrs["axes"] = ["Ql", "Qk", "Qh"]
        for ax in reversed(grid.axes):
            write_field(data, f"Q{ax.name}", ax.values, attrs={"long_name": f"{ax.name.upper()}"})
        if acc is not None:
            dv = data.create_dataset("v", shape=shape, dtype=np.float32, chunks=chunks)
            dn = data.create_dataset("n", shape=shape, dtype=np.float32, chunks=chunks)
            g4 = acc.grid4
            for l0 in range(0, shape[0], chunks[0]):
                l1 = min(shape[0], l0 + chunks[0])
                dv[l0:l1] = np.ascontiguousarray(g4[l0:l1, :, :, 0])
                dn[l0:l1] = np.ascontiguousarray(g4[l0:l1, :, :, 1])
        for name, arr in (arrays or {}).items():
            data.create_dataset(name, data=arr, chunks=chunks)
    os.replace(tmp, path)


def link_transform(
    fe: h5py.Group,
    group: str,
    target: Path,
    grid: QGrid,
    cell: Sequence[float],
    *,
    signal_path: str = "/entry/data/v",
    weights_path: str = "/entry/data/n",
    title: str | None = None,
) -> h5py.Group:
    """Create ``fe/<group>`` NXdata linking a transform file (NXRefine layout)."""
    if group in fe:
        del fe[group]
    grp = nx_group(fe, group, "NXdata")
    write_external_link(grp, "data", target, signal_path)
    write_external_link(grp, "weights", target, weights_path)
    ast, bst, cst, alst, best, gast = reciprocal_parameters(*cell)
    scal = {"h": 2 * math.pi * ast, "k": 2 * math.pi * bst, "l": 2 * math.pi * cst}
    for ax in reversed(grid.axes):
        write_field(grp, f"Q{ax.name}", ax.values, attrs=_axis_attrs(ax.name, scal[ax.name]))
    grp.attrs["signal"] = "data"
    grp.attrs["axes"] = ["Ql", "Qk", "Qh"]
    grp.attrs["angles"] = np.array([gast, best, alst])
    if title:
        write_field(grp, "title", title)
    return grp


def read_transform(path: str | os.PathLike[str]) -> tuple[QGrid, h5py.File]:
    """Open a transform file; return its grid and the open file (caller closes it)."""
    from .grid import GridAxis

    f = h5py.File(path, "r")
    try:
        data = f["entry/data"]
        axes = []
        for name in ("h", "k", "l"):
            vals = np.asarray(data[f"Q{name}"][()], dtype=np.float64)
            step = float(vals[1] - vals[0]) if vals.size > 1 else 1.0
            axes.append(GridAxis(name, float(vals[0]), step, int(vals.size)))
    except (KeyError, IndexError) as exc:
        f.close()
        raise ReductionError(f"{path} is not a transform file ({exc})") from exc
    return QGrid(*axes), f


# ----------------------------------------------------------------------------- step
def run(
    scan_file: str | os.PathLike[str],
    entry: str,
    *,
    qh: Sequence[float] | None = None,
    qk: Sequence[float] | None = None,
    ql: Sequence[float] | None = None,
    mask: bool = False,
    first: int | None = None,
    last: int | None = None,
    norm: float | None = None,
    polarization: float = 0.99,
    nthreads: int = 1,
    block_frames: int = BLOCK_FRAMES,
    overwrite: bool = False,
    progress: bool = False,
    **_: Any,
) -> dict[str, Any]:
    """Transform rotation ``entry`` (``f1``...) of ``scan_file`` into an HKL grid.

    Parameters
    ----------
    scan_file : path-like
        The scan file ``<sample>_<scan>.nxs``.
    entry : str
        Rotation entry, e.g. ``"f1"``.
    qh, qk, ql : (min, step, max), optional
        Grid axes in r.l.u.; NXRefine's default for any not given.
    mask : bool
        Apply the 3-D mask of ``nxprepare_mask`` (writes the *masked* transform).
    first, last : int, optional
        Frame range used (default: ``fN/data`` attributes, else every frame).
    norm : float, optional
        Monitor normalisation; frames are weighted by the smoothed monitor / norm.
    polarization : float
        pyFAI polarization factor used if the entry has no ``polarization`` array.
    nthreads : int
        Threads for the race-free banded kernel (1 = serial).
    block_frames : int
        Frames per kernel block.
    overwrite : bool
        Redo a completed transform and replace its file.
    progress : bool
        Show a progress bar.

    Returns
    -------
    dict
        Summary: ``status``, ``file``, ``grid``, ``frames``, ``pixels``, ``counts``,
        ``seconds``, ``mpix_per_s``.

    Raises
    ------
    ReductionError
        No orientation matrix or unit cell, missing 3-D mask, bad grid or frame range.
    FileExistsNXError
        An output file exists without a completion record and ``overwrite`` is False.
    """
    scan_file = Path(scan_file)
    process = "nxmasked_transform" if mask else "nxtransform"
    group_name = "masked_transform" if mask else "transform"
    start_time = now_iso()
    with open_scan_file(scan_file) as f:
        if entry not in f:
            raise ReductionError(f"{scan_file} has no entry {entry!r}")
        fe = f[entry]
        raw_file, raw_path = _external_target(scan_file, fe["data"], "data")
        out = scan_directory(scan_file, raw_file) / f"{entry}_{group_name}.nxs"
        if process_done(fe, process) and not overwrite:
            logger.info("%s already done; use overwrite=True to redo it", _where(scan_file, entry))
            return {"status": "skipped", "entry": entry, "file": str(out)}
        if out.exists() and not overwrite:
            raise FileExistsNXError(
                f"{out} exists but {_where(scan_file, entry)} has no {process} record; "
                "rerun with overwrite=True to replace it"
            )
        ub = read_ub(fe)
        cell = read_cell(fe)
        if cell is None:
            raise ReductionError(
                f"{_where(scan_file, entry)} has no unit cell (sample/unitcell_*); "
                "set the lattice parameters first"
            )
        if ub is None:
            raise ReductionError(
                f"{_where(scan_file, entry)} has no orientation matrix "
                "(instrument/detector/orientation_matrix); run the 'refine' step first"
            )
        geometry = read_geometry(fe)
        grid = make_grid(geometry, cell, qh=qh, qk=qk, ql=ql)
        pixel_weight = read_pixel_weight(fe, geometry, polarization)
        mask_file: Path | None = None
        if mask:
            if not process_done(fe, "nxprepare_mask") or "data_mask" not in fe["data"]:
                raise ReductionError(
                    f"{_where(scan_file, entry)} has no 3-D mask; run the 'prepare' step "
                    "before a masked transform"
                )
            mask_file, mask_path = _external_target(scan_file, fe["data"], "data_mask")
    with h5py.File(raw_file, "r") as rf:
        raw = rf[raw_path]
        n_frames = raw.shape[0]
        if tuple(raw.shape[1:]) != tuple(geometry.shape):
            raise ReductionError(
                f"{raw_file}:{raw_path} frames {raw.shape[1:]} != detector shape {geometry.shape}"
            )
    with open_scan_file(scan_file) as f:
        weights = frame_weights(f[entry], n_frames, norm=norm, first=first, last=last)
    lo = int(np.argmax(weights > 0)) if (weights > 0).any() else 0
    hi = int(len(weights) - np.argmax(weights[::-1] > 0)) if (weights > 0).any() else 0
    nbytes = 8 * grid.size
    logger.info(
        "%s: transforming frames %d..%d onto %s (%.2f GB)",
        _where(scan_file, entry),
        lo,
        hi - 1,
        grid.describe(),
        nbytes / 1e9,
    )
    t0 = time.perf_counter()
    acc = Accumulator(grid, geometry, ub, pixel_weight, nthreads=nthreads)
    try:
        with h5py.File(raw_file, "r") as rf:
            raw = rf[raw_path]
            mf = h5py.File(mask_file, "r") if mask_file is not None else None
            try:
                mds = mf[mask_path] if mf is not None else None
                bf = max(1, int(block_frames))
                buf = np.empty((bf,) + tuple(geometry.shape), dtype=raw.dtype)
                mbuf = np.empty((bf,) + tuple(geometry.shape), dtype=np.int8) if mds else None
                for i0 in tqdm(
                    range(lo, hi, bf), disable=not progress, desc=f"{entry} transform", unit="block"
                ):
                    i1 = min(hi, i0 + bf)
                    nb = i1 - i0
                    raw.read_direct(buf, np.s_[i0:i1], np.s_[0:nb])
                    m3 = None
                    if mds is not None and mbuf is not None:
                        mds.read_direct(mbuf, np.s_[i0:i1], np.s_[0:nb])
                        m3 = mbuf[:nb]
                    acc.add(buf[:nb], i0, weights[i0:i1], m3)
            finally:
                if mf is not None:
                    mf.close()
        t_kernel = time.perf_counter() - t0
        write_transform_file(out, grid, acc)
    finally:
        acc.close()
    seconds = time.perf_counter() - t0
    npix = (hi - lo) * geometry.shape[0] * geometry.shape[1]
    summary = {
        "status": "done",
        "entry": entry,
        "file": str(out),
        "grid": [list(a.as_range()) for a in grid.axes],
        "frames": [lo, hi - 1],
        "pixels": int(acc.added),
        "counts": float(acc.total),
        "seconds": round(seconds, 3),
        "mpix_per_s": round(npix / max(t_kernel, 1e-9) / 1e6, 2),
    }
    with update_scan_file(scan_file) as f:
        fe = f[entry]
        write_field(fe["data"], "monitor_weight", weights, attrs={"axes": "frame_number"})
        sample = read_field(fe, "sample/name") or "sample"
        link_transform(fe, group_name, out, grid, cell, title=f"{sample} {entry} Transform")
        record_process(
            fe,
            process,
            parameters={
                "qh": list(grid.h.as_range()),
                "qk": list(grid.k.as_range()),
                "ql": list(grid.l.as_range()),
                "mask": bool(mask),
                "first": lo,
                "last": hi - 1,
                "norm": norm,
                "polarization": polarization,
                "nthreads": acc.nthreads,
            },
            start_time=start_time,
            summary=summary,
        )
    logger.info(
        "%s: %d pixels in %.1f s (%.1f Mpix/s) -> %s",
        _where(scan_file, entry),
        acc.added,
        seconds,
        summary["mpix_per_s"],
        out,
    )
    return summary


# ----------------------------------------------------------------------------- plot
def plot_slice(
    transform_file: str | os.PathLike[str],
    axis: str = "l",
    value: float = 0.0,
    png: str | os.PathLike[str] = "slice.png",
    *,
    vmin: float | None = None,
    vmax: float | None = None,
) -> Path:
    """Save a PNG of one slice (e.g. HK0) of a transform with a log colour scale.

    Parameters
    ----------
    transform_file : path-like
        A per-entry or combined transform file.  Plots ``/entry/data/data`` if present
        (combined), else ``v / n``.
    axis : {"h", "k", "l"}
        Axis held fixed.
    value : float
        Its value in r.l.u. (the nearest grid plane is used).
    png : path-like
        Output file.
    vmin, vmax : float, optional
        Colour limits (default: positive 1st and 99.9th percentiles).

    Returns
    -------
    pathlib.Path
        The PNG written.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    axis = axis.lower()
    order = {"l": 0, "k": 1, "h": 2}
    if axis not in order:
        raise ReductionError(f"plot axis must be one of h, k, l, got {axis!r}")
    grid, f = read_transform(transform_file)
    with f:
        data = f["entry/data"]
        ax_obj = {"h": grid.h, "k": grid.k, "l": grid.l}[axis]
        i = int(ax_obj.index(value))
        if not 0 <= i < ax_obj.n:
            raise ReductionError(
                f"{axis} = {value} is outside the grid {ax_obj.start:g}..{ax_obj.stop:g}"
            )
        sel: list[Any] = [slice(None)] * 3
        sel[order[axis]] = i
        if "data" in data:
            img = np.asarray(data["data"][tuple(sel)], dtype=np.float64)
        else:
            v = np.asarray(data["v"][tuple(sel)], dtype=np.float64)
            n = np.asarray(data["n"][tuple(sel)], dtype=np.float64)
            img = np.divide(v, n, out=np.zeros_like(v), where=n > 0)
    others = [a for a in ("h", "k", "l") if a != axis]  # x = first (fastest), y = second
    ax_x = {"h": grid.h, "k": grid.k, "l": grid.l}[others[0]]
    ax_y = {"h": grid.h, "k": grid.k, "l": grid.l}[others[1]]
    # img is (slow, fast) = (y, x) in storage order [l, k, h] minus the fixed axis.
    pos = img[img > 0]
    lo_c = vmin if vmin is not None else (float(np.percentile(pos, 1)) if pos.size else 1e-3)
    hi_c = vmax if vmax is not None else (float(np.percentile(pos, 99.9)) if pos.size else 1.0)
    hi_c = max(hi_c, lo_c * 10)
    fig, axp = plt.subplots(figsize=(6.4, 5.6), dpi=100)
    masked = np.ma.masked_less_equal(img, 0)
    im = axp.imshow(
        masked,
        origin="lower",
        extent=(ax_x.start, ax_x.stop, ax_y.start, ax_y.stop),
        norm=LogNorm(vmin=lo_c, vmax=hi_c),
        cmap="viridis",
        aspect="auto",
        interpolation="nearest",
    )
    axp.set_xlabel(f"{others[0].upper()} (r.l.u.)")
    axp.set_ylabel(f"{others[1].upper()} (r.l.u.)")
    axp.set_title(
        f"{Path(transform_file).name}: {axis.upper()} = {round(float(ax_obj.values[i]), 6):g}"
    )
    fig.colorbar(im, ax=axp)
    png = Path(png)
    fig.savefig(png)
    plt.close(fig)
    return png
