"""Per-pixel geometry of a rotation and the interleaved (v, n) grid it is accumulated into.

:class:`Accumulator` owns the float32 grid (``v`` and ``n`` interleaved, so one update
touches one cache line) and the per-pixel vectors, and adds blocks of frames with
:func:`~nxrefine_bs.reduce.transform_kernel.scatter_block`, which visits only the pixels
in a column range per row.  With ``nthreads > 1`` the pixels are
split into bands of equal ``Q`` component along the rotation axis - which the rotation
does not change - separated by guard bands wider than one voxel, so the threads never
write the same voxel; the guard pixels (a fraction of a percent) are added afterwards by
the calling thread.  Totals equal the one-thread result (each voxel receives the same additions;
only their order, hence float32 rounding of ``v``, may differ).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..errors import ReductionError
from ..geometry import Geometry
from .grid import QGrid, make_grid
from .transform_kernel import row_ranges, scatter_block

logger = logging.getLogger(__name__)

# (band label or -1 for all, first column, one-past-last column per row); see row_ranges
_PixelList = tuple[int, NDArray[np.int64], NDArray[np.int64]]

__all__ = [
    "Accumulator",
    "polarization_factor",
    "pixel_vectors",
    "frame_matrices",
    "pixel_hkl",
]


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
        self.band = np.zeros(geometry.shape, dtype=np.int8)
        self._lists: list[_PixelList] = [(-1, *row_ranges(self.pixel_weight > 0))]
        self._guard: _PixelList | None = None
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
        self._lists = [(b, *row_ranges((band == b) & good)) for b in range(self.nthreads)]
        self._guard = (self.nthreads, *row_ranges((band == self.nthreads) & good))
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

        def one(pixels: _PixelList) -> tuple[int, float]:
            return scatter_block(*args, *pixels, *tail)

        results: list[tuple[int, float]] = []
        if self._pool is None:
            results.append(one(self._lists[0]))
        else:
            futures = [self._pool.submit(one, lst) for lst in self._lists]
            results.extend(fu.result() for fu in futures)
            if self._guard is not None:
                results.append(one(self._guard))
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
