"""Fill punched holes of a volume by discrete Laplace or Matérn interpolation (no Julia).

Inside a hole the filled values ``u`` solve ``(eps^2 - L)^m u = 0`` with the values
around the hole as Dirichlet data, where ``L`` is the 7-point discrete Laplacian with
spacings ``(dl, dk, dh)`` (``m = 1, eps = 0``: discrete Laplace interpolation, the
harmonic fill of Weber & Simonov; ``m = 1, 2`` with ``eps > 0``: the Matérn variants of
LaplaceInterpolation.jl).  At the edge of the volume a missing neighbour is left out of
the stencil (zero-flux boundary).

Only the hole voxels are unknowns: the system is assembled on the hole voxels and the
``m``-voxel shell around them (:func:`hole_system`), never on the whole grid.  Punched
Bragg peaks all have the same shape, so :func:`fill_holes` factorises that one local
system once (SuperLU, :class:`BlockLU`) and solves every isolated interior hole with it,
in blocks of right-hand sides (holes clipped alike by the volume's edge share one
factorisation too);
holes that overlap are solved together in one block-diagonal sparse system
(:func:`fill_mask`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from numpy.typing import NDArray
from scipy.spatial import cKDTree

from ..errors import ReductionError

logger = logging.getLogger(__name__)

__all__ = ["FillResult", "BlockLU", "hole_system", "fill_mask", "fill_holes", "neighbours"]

_STEPS = ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))


@dataclass
class FillResult:
    """What :func:`fill_holes` did.

    Attributes
    ----------
    holes : int
        Holes filled.
    shared : int
        Isolated holes, solved with a factorisation shared by all holes that the
        volume's edge clips alike (one for all interior holes).
    factorisations : int
        Sparse LU factorisations made for them.
    grouped : int
        Holes solved in groups (overlapping or at the edge).
    groups : int
        Number of such groups.
    voxels : int
        Voxels filled.
    seconds : float
        Wall time.
    """

    holes: int = 0
    shared: int = 0
    factorisations: int = 0
    grouped: int = 0
    groups: int = 0
    voxels: int = 0
    seconds: float = 0.0


def _check(m: int, epsilon: float, spacing: Sequence[float]) -> NDArray[np.float64]:
    if m not in (1, 2):
        raise ReductionError(f"fill: Matérn order m must be 1 or 2, got {m!r}")
    if not (epsilon >= 0 and np.isfinite(epsilon)):
        raise ReductionError(f"fill: epsilon must be >= 0, got {epsilon!r}")
    sp_ = np.asarray(spacing, dtype=np.float64)
    if sp_.shape != (3,) or not np.all(sp_ > 0):
        raise ReductionError(f"fill: spacing must be three positive numbers, got {spacing!r}")
    return sp_


def neighbours(
    flat: NDArray[np.int64], shape: tuple[int, int, int]
) -> list[tuple[NDArray[np.int64], NDArray[np.bool_], int]]:
    """The six neighbours of each flat index: ``[(index, inside, axis), ...]``."""
    nl, nk, nh = shape
    il, rem = np.divmod(flat, nk * nh)
    ik, ih = np.divmod(rem, nh)
    out = []
    for dl, dk, dh in _STEPS:
        jl, jk, jh = il + dl, ik + dk, ih + dh
        inside = (jl >= 0) & (jl < nl) & (jk >= 0) & (jk < nk) & (jh >= 0) & (jh < nh)
        axis = 0 if dl else (1 if dk else 2)
        out.append(((jl * nk + jk) * nh + jh, inside, axis))
    return out


def unique_indices(values: NDArray[np.integer]) -> NDArray[np.int64]:
    """Sorted unique flat indices (sort-based: numpy's hash-based ``unique`` is slow on
    millions of scattered indices)."""
    a = np.sort(np.asarray(values, dtype=np.int64).ravel())
    if a.size:
        a = a[np.concatenate(([True], a[1:] != a[:-1]))]
    return a


def _dilate(flat: NDArray[np.int64], shape: tuple[int, int, int]) -> NDArray[np.int64]:
    """``flat`` plus its in-volume 6-neighbours (sorted, unique)."""
    parts = [flat] + [idx[inside] for idx, inside, _ in neighbours(flat, shape)]
    return unique_indices(np.concatenate(parts))


def _stencil(
    rows: NDArray[np.int64],
    cols: NDArray[np.int64],
    shape: tuple[int, int, int],
    inv2: NDArray[np.float64],
    eps2: float,
) -> sp.csr_matrix:
    """Rows ``rows`` of ``eps^2 - L`` restricted to columns ``cols`` (both sorted)."""
    diag = np.full(len(rows), eps2)
    ri, ci, vals = [], [], []
    for idx, inside, axis in neighbours(rows, shape):
        diag[inside] += inv2[axis]
        r = np.nonzero(inside)[0]
        pos = np.searchsorted(cols, idx[inside])
        ok = (pos < len(cols)) & (cols[np.minimum(pos, len(cols) - 1)] == idx[inside])
        if not np.all(ok):
            raise ReductionError("fill: internal error, a stencil neighbour is not a column")
        ri.append(r)
        ci.append(pos)
        vals.append(np.full(len(r), -inv2[axis]))
    pos = np.searchsorted(cols, rows)
    ri.append(np.arange(len(rows)))
    ci.append(pos)
    vals.append(diag)
    return sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(ri), np.concatenate(ci))),
        shape=(len(rows), len(cols)),
    )


def hole_system(
    shape: tuple[int, int, int],
    holes: NDArray[np.int64],
    *,
    m: int = 1,
    epsilon: float = 0.0,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> tuple[sp.csc_matrix, sp.csr_matrix, NDArray[np.int64]]:
    """The linear system of the hole voxels ``holes`` (flat ``[l, k, h]`` indices).

    Returns
    -------
    A : csc_matrix
        ``(eps^2 - L)^m`` on the holes (symmetric positive definite when every hole
        group touches known voxels).
    B : csr_matrix
        Its coupling to the known voxels.
    known : ndarray
        Flat indices of those known voxels; the fill is ``A^-1 (-B @ volume[known])``.
    """
    inv2 = 1.0 / _check(m, epsilon, spacing) ** 2
    holes = unique_indices(holes)
    shell1 = _dilate(holes, shape)
    if m == 1:
        full = _stencil(holes, shell1, shape, inv2, epsilon**2)
        cols = shell1
    else:
        shell2 = _dilate(shell1, shape)
        m_hp = _stencil(holes, shell1, shape, inv2, epsilon**2)
        m_pq = _stencil(shell1, shell2, shape, inv2, epsilon**2)
        full = (m_hp @ m_pq).tocsr()
        cols = shell2
    is_hole = np.isin(cols, holes, assume_unique=True)
    a = full[:, np.nonzero(is_hole)[0]].tocsc()
    b = full[:, np.nonzero(~is_hole)[0]].tocsr()
    return a, b, cols[~is_hole]


def fill_mask(
    volume: NDArray[np.floating],
    holes: NDArray[np.int64],
    *,
    m: int = 1,
    epsilon: float = 0.0,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> int:
    """Fill the voxels ``holes`` (flat indices) of ``volume`` in place with one sparse solve.

    Returns the number of voxels filled.
    """
    holes = unique_indices(holes)
    if holes.size == 0:
        return 0
    a, b, known = hole_system(volume.shape, holes, m=m, epsilon=epsilon, spacing=spacing)
    if known.size == 0:
        raise ReductionError("fill: the holes cover the whole volume; nothing to fill from")
    flat = volume.reshape(-1)
    rhs = -(b @ flat[known].astype(np.float64))
    flat[holes] = spla.spsolve(a, rhs)
    return int(holes.size)


def _groups(centres: NDArray[np.int64], reach: int) -> list[list[int]]:
    """Groups (size > 1) of holes whose centres lie within ``reach`` voxels (Chebyshev)."""
    if len(centres) < 2:
        return []
    pairs = cKDTree(centres).query_pairs(r=reach + 0.5, p=np.inf, output_type="ndarray")
    if len(pairs) == 0:
        return []
    parent = np.arange(len(centres))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        ri, rj = root(int(i)), root(int(j))
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    members: dict[int, list[int]] = {}
    for i in np.unique(pairs):
        members.setdefault(root(int(i)), []).append(int(i))
    return list(members.values())


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _lower_unit(indptr, indices, data, x):  # pragma: no cover - compiled
    """Solve ``L y = x`` in place (``L`` CSR, unit diagonal) for all columns of ``x``."""
    n, k = x.shape
    for i in range(n):
        for p in range(indptr[i], indptr[i + 1]):
            j = indices[p]
            if j < i:
                v = data[p]
                for c in range(k):
                    x[i, c] -= v * x[j, c]


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _upper(indptr, indices, data, x):  # pragma: no cover - compiled
    """Solve ``U y = x`` in place (``U`` CSR, upper triangular) for all columns of ``x``."""
    n, k = x.shape
    for i in range(n - 1, -1, -1):
        d = 1.0
        for p in range(indptr[i], indptr[i + 1]):
            j = indices[p]
            if j > i:
                v = data[p]
                for c in range(k):
                    x[i, c] -= v * x[j, c]
            elif j == i:
                d = data[p]
        for c in range(k):
            x[i, c] /= d


class BlockLU:
    """Sparse LU (SuperLU) of a small system, solving blocks of right-hand sides at once.

    SuperLU's own ``solve`` sweeps its triangular factors once per right-hand side; here
    each row of the factors updates the whole block (a vectorised loop), which is what
    makes one factorisation per hole shape pay off for thousands of punched reflections.
    """

    def __init__(self, a: sp.spmatrix) -> None:
        lu = spla.splu(sp.csc_matrix(a), permc_spec="MMD_AT_PLUS_A")
        lower, upper = lu.L.tocsr(), lu.U.tocsr()
        self._l = (lower.indptr, lower.indices, lower.data)
        self._u = (upper.indptr, upper.indices, upper.data)
        self._perm_r = lu.perm_r
        self._perm_c = lu.perm_c
        self.nnz = int(lower.nnz + upper.nnz)

    def solve(self, rhs: NDArray[np.float64]) -> NDArray[np.float64]:
        """``a^-1 rhs`` for ``rhs`` of shape ``(n,)`` or ``(n, k)``."""
        b = np.asarray(rhs, dtype=np.float64)
        one = b.ndim == 1
        b = b.reshape(b.shape[0], -1)
        y = np.empty_like(b)
        y[self._perm_r] = b  # A = Pr^T L U Pc^T
        _lower_unit(*self._l, y)
        _upper(*self._u, y)
        x = y[self._perm_c]
        return x[:, 0] if one else x


def fill_holes(
    volume: NDArray[np.floating],
    centres: NDArray[np.int64],
    stencil: NDArray[np.bool_],
    *,
    m: int = 1,
    epsilon: float = 0.0,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    batch: int | None = None,
) -> tuple[FillResult, NDArray[np.int64]]:
    """Punch a hole of shape ``stencil`` at each centre and fill it, in place.

    Parameters
    ----------
    volume : ndarray, 3-D ``[l, k, h]``, float
        Modified in place.
    centres : ndarray, shape (n, 3), int
        Voxel index ``(il, ik, ih)`` of each hole's centre (may lie outside the volume
        as long as part of the hole is inside).
    stencil : ndarray of bool, odd shape
        The hole around its centre voxel.
    m, epsilon, spacing
        Matérn order, ``eps`` (inverse length in the units of ``spacing``) and voxel
        spacings ``(dl, dk, dh)``.
    batch : int, optional
        Holes solved per right-hand-side block (default: about 4 M unknowns).

    Returns
    -------
    FillResult
        Counts and time.
    ndarray of int64
        Flat indices of every filled voxel (sorted, unique).
    """
    t0 = time.perf_counter()
    _check(m, epsilon, spacing)
    stencil = np.asarray(stencil, dtype=bool)
    if stencil.ndim != 3 or any(s % 2 == 0 for s in stencil.shape):
        raise ReductionError(f"fill: the hole stencil needs an odd 3-D shape, got {stencil.shape}")
    if volume.ndim != 3 or not volume.flags.c_contiguous:
        raise ReductionError("fill: the volume must be a C-contiguous 3-D array (filled in place)")
    shape = volume.shape
    nl, nk, nh = shape
    half = np.array(stencil.shape) // 2
    offs = np.argwhere(stencil) - half  # (p, 3) offsets (dl, dk, dh)
    centres = np.asarray(centres, dtype=np.int64).reshape(-1, 3)
    pad = half + m
    dims = np.array(shape)
    grouped = _groups(centres, int(2 * pad.max()))
    in_group = np.zeros(len(centres), dtype=bool)
    for g in grouped:
        in_group[g] = True
    result = FillResult(holes=len(centres))
    filled: list[NDArray[np.int64]] = []
    flat = volume.reshape(-1)

    # Isolated holes: one factorisation per way the volume's edge clips the local box
    # (interior holes all share one), solved in batches of right-hand sides.
    alone = np.nonzero(~in_group)[0]
    clip_lo = np.maximum(pad - centres[alone], 0)
    clip_hi = np.maximum(centres[alone] + pad - (dims - 1), 0)
    keys, which = np.unique(np.hstack([clip_lo, clip_hi]), axis=0, return_inverse=True)
    full = tuple(int(2 * p + 1) for p in pad)
    template = np.zeros(full, dtype=bool)
    template[tuple(slice(m, m + s) for s in stencil.shape)] = stencil
    for key_index, key in enumerate(keys):
        lo, hi = key[:3], key[3:]
        if np.any(lo + hi >= np.array(full)):
            continue  # the box lies outside the volume
        local = template[tuple(slice(a, f - b) for a, f, b in zip(lo, full, hi, strict=True))]
        members = alone[which.ravel() == key_index]
        if not local.any():
            continue  # only the hole's shell reaches into the volume
        box = local.shape
        lholes = np.flatnonzero(local)
        a, b, lknown = hole_system(box, lholes, m=m, epsilon=epsilon, spacing=spacing)
        solve = BlockLU(a).solve

        def to_global(
            lflat: NDArray[np.int64], lo: NDArray[np.int64] = lo, box: tuple[int, ...] = box
        ) -> NDArray[np.int64]:
            ll, rem = np.divmod(lflat, box[1] * box[2])
            lk, lh = np.divmod(rem, box[2])
            off = np.stack([ll, lk, lh], axis=1) + lo - pad
            return (off[:, 0] * nk + off[:, 1]) * nh + off[:, 2]

        g_holes = to_global(lholes)
        g_known = to_global(lknown)
        cflat = (centres[members, 0] * nk + centres[members, 1]) * nh + centres[members, 2]
        step = batch or max(16, (1 << 22) // max(1, lholes.size))
        for s0 in range(0, len(cflat), step):
            c = cflat[s0 : s0 + step]
            known_vals = flat[g_known[:, None] + c[None, :]].astype(np.float64)
            u = solve(np.asarray(-(b @ known_vals)))
            flat[g_holes[:, None] + c[None, :]] = u
        filled.append((g_holes[:, None] + cflat[None, :]).ravel())
        result.shared += int(members.size)
        result.factorisations += 1

    # Overlapping holes: one block-diagonal sparse system for all groups.
    if grouped:
        idx = np.concatenate([np.asarray(g) for g in grouped])
        pts = (centres[idx][:, None, :] + offs[None, :, :]).reshape(-1, 3)
        pts = pts[np.all((pts >= 0) & (pts < dims), axis=1)]
        vox = unique_indices((pts[:, 0] * nk + pts[:, 1]) * nh + pts[:, 2])
        if vox.size:
            fill_mask(volume, vox, m=m, epsilon=epsilon, spacing=spacing)
            filled.append(vox)
        result.grouped = int(idx.size)
        result.groups = len(grouped)
    voxels = unique_indices(np.concatenate(filled)) if filled else np.zeros(0, dtype=np.int64)
    result.voxels = int(voxels.size)
    result.seconds = time.perf_counter() - t0
    logger.debug(
        "filled %d holes (%d with %d factorisations, %d in %d groups), %d voxels in %.2f s",
        result.holes,
        result.shared,
        result.factorisations,
        result.grouped,
        result.groups,
        result.voxels,
        result.seconds,
    )
    return result, voxels
