"""Laue symmetrisation of (H, K, L) volumes from the space group's own operators.

The Laue group of a crystal is its point group plus the inversion.  Its operators are
taken from GEMMI: the rotation parts ``R`` of the space group's symmetry operations act
on Miller indices as row vectors, ``h' = h R``, so on the column vector ``(h, k, l)`` as
``R^T``; the inversion is added.  They are applied in the grid's own (H, K, L) frame,
which makes the result exact for every Laue group, including the trigonal and hexagonal
ones (``h' = -h - k`` ...) that cannot be written as flips and transposes.

A volume is symmetrised by summing the signal ``v`` and the weights ``n`` over every
operator and dividing, ``S(x) = sum_g v(g x) / sum_g n(g x)`` (0 where the summed weight
is 0), so that the members of each symmetry orbit that fall inside the grid all get the
same weighted mean (orbit members outside the grid count as missing data).

An operator maps the grid onto itself only if the grid is centred on ``H = K = L = 0``,
the axes that the operator mixes have equal steps and point counts, and the index
offsets come out whole (e.g. an even point count cannot hold ``h' = -h - k``);
:func:`index_operators` checks this and names the axis and the fix.

Arrays are stored ``[l, k, h]`` (H fastest), as everywhere in :mod:`nxrefine_bs.reduce`.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import gemmi
import numba
import numpy as np
from numpy.typing import NDArray

from ..errors import ReductionError
from ..geometry import b_matrix
from .grid import QGrid

logger = logging.getLogger(__name__)

__all__ = [
    "LAUE_GROUPS",
    "LaueGroup",
    "laue_group",
    "check_cell",
    "index_operators",
    "symmetrize",
    "symmetrize_at",
]

LAUE_GROUPS: dict[str, str] = {
    "-1": "P -1",
    "2/m": "P 1 2/m 1",
    "mmm": "P m m m",
    "4/m": "P 4/m",
    "4/mmm": "P 4/m m m",
    "-3": "P -3",
    "-3m": "P -3 m 1",
    "-3m1": "P -3 m 1",
    "-31m": "P -3 1 m",
    "6/m": "P 6/m",
    "6/mmm": "P 6/m m m",
    "m-3": "P m -3",
    "m-3m": "P m -3 m",
}
"""Laue-class symbols accepted as an override, with a centrosymmetric space group of each
(in the standard setting: *b*-unique monoclinic, hexagonal axes for the trigonal groups;
``-3m`` means ``-3m1``)."""

_RHOMBOHEDRAL = {"-3": "R -3:R", "-3m": "R -3 m:R", "-3m1": "R -3 m:R"}


@dataclass(frozen=True)
class LaueGroup:
    """The operators of a Laue group acting on column vectors ``(h, k, l)``.

    Parameters
    ----------
    name : str
        Laue-class symbol (``'m-3m'``, ``'6/mmm'``...).
    source : str
        The space group the operators were taken from.
    operators : ndarray, shape (n, 3, 3), int
        Every operator of the group (proper rotations and their products with the
        inversion), the identity first.
    """

    name: str
    source: str
    operators: NDArray[np.int64]

    @property
    def order(self) -> int:
        """Number of operators."""
        return int(len(self.operators))

    @property
    def rotations(self) -> NDArray[np.int64]:
        """The proper rotations (det +1); the group is these times ``{1, -1}``."""
        return self.operators[np.linalg.det(self.operators) > 0]


def _operators(sg: gemmi.SpaceGroup) -> NDArray[np.int64]:
    mats: list[NDArray[np.int64]] = []
    for op in sg.operations().sym_ops:
        r = np.array(op.rot, dtype=np.int64) // op.DEN
        for w in (r.T, -r.T):
            if not any(np.array_equal(w, m) for m in mats):
                mats.append(w)
    mats.sort(key=lambda m: (not np.array_equal(m, np.eye(3, dtype=np.int64)), tuple(m.ravel())))
    return np.array(mats, dtype=np.int64)


def laue_group(
    space_group: str | None = None, laue: str | None = None, *, crystal_system: str | None = None
) -> LaueGroup:
    """The Laue group of ``space_group``, or the Laue class ``laue`` given explicitly.

    Parameters
    ----------
    space_group : str, optional
        Space-group symbol as GEMMI reads it (the sample's ``space_group``); its own
        setting fixes the operators (e.g. ``-3m1`` vs ``-31m``, rhombohedral axes).
    laue : str, optional
        Laue class overriding the space group's, one of :data:`LAUE_GROUPS`.  If it is the
        space group's own class, the space group's operators are used.
    crystal_system : str, optional
        ``'rhombohedral'`` selects rhombohedral axes for an explicit ``-3`` / ``-3m``.

    Raises
    ------
    ReductionError
        Unknown space group or Laue class, or neither given.

    Examples
    --------
    >>> g = laue_group("P 63/m m c")
    >>> g.name, g.order
    ('6/mmm', 24)
    >>> laue_group(laue="m-3m").order
    48
    """
    sg = None
    if space_group:
        try:
            sg = gemmi.SpaceGroup(str(space_group))
        except ValueError as exc:
            raise ReductionError(f"unknown space group {space_group!r} ({exc})") from None
    if laue is not None:
        key = str(laue).replace(" ", "")
        if key not in LAUE_GROUPS:
            raise ReductionError(
                f"unknown Laue group {laue!r}; choose one of {', '.join(LAUE_GROUPS)}"
            )
        own = sg is not None and (
            sg.laue_str() == key or (key in ("-3m1", "-31m") and sg.laue_str() == "-3m")
        )
        if not own:
            symbol = LAUE_GROUPS[key]
            if crystal_system == "rhombohedral" and key in _RHOMBOHEDRAL:
                symbol = _RHOMBOHEDRAL[key]
            sg = gemmi.SpaceGroup(symbol)
    if sg is None:
        raise ReductionError("give a space group or a Laue group to symmetrise with")
    return LaueGroup(name=str(sg.laue_str()), source=str(sg.xhm()), operators=_operators(sg))


def check_cell(group: LaueGroup, cell: tuple[float, ...] | list[float], *, what: str = "") -> None:
    """Raise if an operator of ``group`` changes ``|Q|`` of a reflection of ``cell``.

    A Laue group given explicitly must be a symmetry of the lattice: e.g. ``4/mmm``
    needs ``a = b`` and right angles, ``6/mmm`` needs ``a = b`` and ``gamma = 120``.
    """
    b = b_matrix(*cell)
    metric = b.T @ b
    scale = np.abs(metric).max()
    for op in group.operators:
        if not np.allclose(op.T @ metric @ op, metric, atol=1e-6 * scale):
            raise ReductionError(
                f"{what + ': ' if what else ''}Laue group {group.name} is not a symmetry of "
                f"the cell {tuple(round(float(c), 6) for c in cell)} (operator "
                f"{op.tolist()} changes |Q|); give the sample's own Laue group or fix the "
                "lattice"
            )


def index_operators(
    group: LaueGroup, grid: QGrid, *, what: str = "grid"
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """The proper rotations of ``group`` as maps between voxel indices of ``grid``.

    A voxel with index vector ``i = (ih, ik, il)`` maps to ``W i + t``; the inversion
    (always in a Laue group) maps ``i`` to ``n - 1 - i``.

    Returns
    -------
    W : ndarray, shape (m, 3, 3), int64
        The rotations in index space.
    t : ndarray, shape (m, 3), int64
        The index offsets.

    Raises
    ------
    ReductionError
        If the grid is not centred on zero, or an operator mixes axes whose steps or
        point counts differ, or needs a grid point at the origin that the grid lacks.
    """
    steps = grid.steps
    counts = grid.counts.astype(np.float64)
    names = [a.name for a in grid.axes]
    for ax in grid.axes:
        if abs(ax.start + ax.stop) > 1e-6 * ax.step:
            raise ReductionError(
                f"{what}: Laue group {group.name} needs a grid centred on 0 but axis "
                f"{ax.name} runs {ax.start:g}..{ax.stop:g}; transform on a symmetric range "
                f"(e.g. --q{ax.name}={-max(abs(ax.start), abs(ax.stop)):g},{ax.step:g},"
                f"{max(abs(ax.start), abs(ax.stop)):g})"
            )
    centre = (counts - 1) / 2
    ws, ts = [], []
    for rot in group.rotations:
        w = rot / steps[:, None] * steps[None, :]
        wi = np.rint(w).astype(np.int64)
        for i in range(3):
            for j in range(3):
                if (
                    i != j
                    and rot[i, j] != 0
                    and (abs(steps[i] - steps[j]) > 1e-9 * steps[i] or counts[i] != counts[j])
                ):
                    raise ReductionError(
                        f"{what}: Laue group {group.name} maps {names[j]} onto {names[i]} but "
                        f"the axes differ ({names[j]}: step {steps[j]:g}, {int(counts[j])} "
                        f"points; {names[i]}: step {steps[i]:g}, {int(counts[i])} points); "
                        "transform with equal steps and ranges on these axes"
                    )
        t = centre - wi @ centre
        if not np.allclose(t, np.rint(t), atol=1e-9):
            raise ReductionError(
                f"{what}: Laue group {group.name} needs a grid point at H=K=L=0 (odd point "
                f"counts); the grid has {', '.join(str(int(c)) for c in counts)} points"
            )
        ws.append(wi)
        ts.append(np.rint(t).astype(np.int64))
    return np.array(ws, dtype=np.int64), np.array(ts, dtype=np.int64)


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _symmetrize_planes(v, n, w, t, mirror, l0, l1, out, out_n):  # pragma: no cover - compiled
    # Output tiles of TILE^3 voxels, operators outside the voxel loops: for one operator
    # the images of a tile form one tile, so the reads stay in cache even for operators
    # that swap axes (which otherwise read across planes voxel by voxel).
    tile = 16
    nl, nk, nh = v.shape
    nops = w.shape[0]
    acc_v = np.zeros((tile, tile, tile))
    acc_n = np.zeros((tile, tile, tile))
    for tl in range(l0, l1, tile):
        el = min(tl + tile, l1)
        for tk in range(0, nk, tile):
            ek = min(tk + tile, nk)
            for th in range(0, nh, tile):
                eh = min(th + tile, nh)
                acc_v[:] = 0.0
                acc_n[:] = 0.0
                for o in range(nops):
                    for il in range(tl, el):
                        for ik in range(tk, ek):
                            bh = w[o, 0, 1] * ik + w[o, 0, 2] * il + t[o, 0]
                            bk = w[o, 1, 1] * ik + w[o, 1, 2] * il + t[o, 1]
                            bl = w[o, 2, 1] * ik + w[o, 2, 2] * il + t[o, 2]
                            ch = w[o, 0, 0]
                            ck = w[o, 1, 0]
                            cl = w[o, 2, 0]
                            for ih in range(th, eh):
                                sh = bh + ch * ih
                                sk = bk + ck * ih
                                sl = bl + cl * ih
                                if 0 <= sh < nh and 0 <= sk < nk and 0 <= sl < nl:
                                    sv = v[sl, sk, sh]
                                    sn = n[sl, sk, sh]
                                    if mirror:
                                        sv += v[nl - 1 - sl, nk - 1 - sk, nh - 1 - sh]
                                        sn += n[nl - 1 - sl, nk - 1 - sk, nh - 1 - sh]
                                    acc_v[il - tl, ik - tk, ih - th] += sv
                                    acc_n[il - tl, ik - tk, ih - th] += sn
                for il in range(tl, el):
                    for ik in range(tk, ek):
                        for ih in range(th, eh):
                            sn = acc_n[il - tl, ik - tk, ih - th]
                            sv = acc_v[il - tl, ik - tk, ih - th]
                            out[il, ik, ih] = sv / sn if sn > 0 else 0.0
                            if out_n.shape[0] > 0:
                                out_n[il, ik, ih] = sn


def _diagonal_split(
    w: NDArray[np.int64],
) -> tuple[list[tuple[int, ...]], list[int]] | None:
    """For a group of signed permutations: flips generating its diagonal subgroup, and
    one operator per coset of it (indices into ``w``); None for other groups.

    With ``D`` the diagonal (axis-flip) operators of the group ``G = {W} x {1, -1}``,
    ``sum_G A(g x) = sum_r B(r x)`` with ``B = sum_D A(d x)`` over coset representatives
    ``r``, because ``D`` is normal in ``G``; and ``B`` follows from one flip-and-add per
    generator of ``D`` (an elementary abelian 2-group).  Axes are array axes ``[l, k, h]``.
    """
    if not all(np.count_nonzero(m, axis=1).max() == 1 for m in w):
        return None
    signs = []
    for m in list(w) + [-m for m in w]:
        if np.count_nonzero(m - np.diag(np.diag(m))) == 0:
            signs.append(tuple(int(x) for x in np.diag(m)))
    span: set[tuple[int, ...]] = {(1, 1, 1)}
    flips = []
    for sgn in signs:
        if sgn not in span:
            span |= {tuple(a * b for a, b in zip(sgn, x, strict=True)) for x in span}
            flips.append(tuple(2 - i for i in range(3) if sgn[i] < 0))  # (h, k, l) -> axis
    reps: list[int] = []
    patterns: list[bytes] = []
    for i, m in enumerate(w):
        key = np.abs(m).tobytes()
        if key not in patterns:
            patterns.append(key)
            reps.append(i)
    return flips, reps


def symmetrize(
    v: NDArray[np.floating],
    n: NDArray[np.floating] | None,
    group: LaueGroup,
    grid: QGrid,
    *,
    nthreads: int = 1,
    weights_out: bool = False,
    overwrite_input: bool = False,
    what: str = "grid",
) -> tuple[NDArray[np.float32], NDArray[np.float32] | None]:
    """Laue-symmetrise a volume: ``S = sum_g v(g x) / sum_g n(g x)``.

    Parameters
    ----------
    v : ndarray, shape ``grid.shape``
        Accumulated signal (CCTW's ``v``), or normalised data with ``n`` the occupancy.
    n : ndarray or None
        Accumulated weights (``n``); None uses 1 where ``v`` is non-zero.
    group : LaueGroup
        The Laue group.
    grid : QGrid
        The (H, K, L) grid of ``v`` (checked with :func:`index_operators`).
    nthreads : int
        Threads over ``l`` planes.
    weights_out : bool
        Also return the symmetrised weight sum.
    overwrite_input : bool
        Allow ``v`` and ``n`` (float32, C-contiguous) to be used as work space.
    what : str
        Name of the data for error messages.

    Returns
    -------
    S : ndarray of float32
        The symmetrised normalised signal (0 where no operator finds data).
    N : ndarray of float32 or None
        ``sum_g n(g x)`` if ``weights_out``.
    """
    if v.shape != grid.shape or (n is not None and n.shape != grid.shape):
        raise ReductionError(
            f"{what}: array shape {v.shape} does not match the grid {grid.shape} ([l, k, h])"
        )
    w, t = index_operators(group, grid, what=what)
    v = np.ascontiguousarray(v, dtype=np.float32)
    n = (v != 0).astype(np.float32) if n is None else np.ascontiguousarray(n, dtype=np.float32)
    mirror = True
    split = _diagonal_split(w)
    if split is not None:
        # signed permutations: sum over the axis flips first (whole-array passes), then
        # over one representative per coset, without mirror reads
        flips, reps = split
        if not overwrite_input:
            v, n = v.copy(), n.copy()
        for axes in flips:
            for arr in (v, n):
                arr += np.flip(arr, axis=axes)
        w, t = w[reps], t[reps]
        mirror = False
    out = np.empty(grid.shape, dtype=np.float32)
    out_n = np.empty(grid.shape if weights_out else (0, 0, 0), dtype=np.float32)
    nl = grid.shape[0]
    nthreads = max(1, min(int(nthreads), nl))
    bounds = np.unique(np.linspace(0, nl, min(nl, 4 * nthreads) + 1).astype(int) // 16 * 16)
    bounds = np.append(bounds[bounds < nl], nl)
    if nthreads == 1:
        _symmetrize_planes(v, n, w, t, mirror, 0, nl, out, out_n)
    else:
        with ThreadPoolExecutor(nthreads) as pool:
            list(
                pool.map(
                    lambda b: _symmetrize_planes(v, n, w, t, mirror, b[0], b[1], out, out_n),
                    zip(bounds[:-1], bounds[1:], strict=True),
                )
            )
    logger.debug("symmetrised %s with %s (%d operators)", what, group.name, group.order)
    return out, (out_n if weights_out else None)


def symmetrize_at(
    values: NDArray[np.floating],
    flat: NDArray[np.int64],
    group: LaueGroup,
    grid: QGrid,
) -> NDArray[np.float64]:
    """Orbit means of values known only on a symmetric set of voxels.

    ``values[i]`` belongs to the voxel with flat ``[l, k, h]`` index ``flat[i]``; every
    image of such a voxel under the group that lies inside the grid must be in ``flat``
    too (e.g. the punched holes of all symmetry-equivalent reflections).  Returns the
    mean over each voxel's in-grid orbit.
    """
    w, t = index_operators(group, grid)
    nl, nk, nh = grid.shape
    order = np.argsort(flat)
    sflat = flat[order]
    svals = np.asarray(values, dtype=np.float64)[order]
    il, rem = np.divmod(sflat, nk * nh)
    ik, ih = np.divmod(rem, nh)
    idx = np.stack([ih, ik, il])
    dims = np.array([nh, nk, nl])[:, None]

    def lookup(src: NDArray[np.int64], vals: NDArray[np.float64]) -> NDArray[np.float64]:
        f = (src[2] * nk + src[1]) * nh + src[0]
        pos = np.minimum(np.searchsorted(sflat, f), len(sflat) - 1)
        if not np.array_equal(sflat[pos], f):
            raise ReductionError(
                "symmetrize_at: the voxel set is not closed under the Laue group "
                f"{group.name}; punch every symmetry-equivalent reflection"
            )
        return vals[pos]

    split = _diagonal_split(w)
    if split is not None:  # signed permutations: flips, then one operator per coset
        flips, reps = split
        summed = svals.copy()
        for axes in flips:
            img = idx.copy()
            for axis in axes:  # array axis [l, k, h] -> index component (h, k, l)
                img[2 - axis] = dims[2 - axis, 0] - 1 - img[2 - axis]
            summed = summed + lookup(img, summed)
        total = np.zeros(len(sflat))
        for r in reps:
            total += lookup(w[r] @ idx + t[r][:, None], summed)
        out = np.empty_like(total)
        out[order] = total / (len(reps) * 2 ** len(flips))
        return out
    total = np.zeros(len(sflat))
    count = np.zeros(len(sflat))
    for wi, ti in zip(w, t, strict=True):
        src = wi @ idx + ti[:, None]
        for s in (src, dims - 1 - src):
            ok = np.all((s >= 0) & (s < dims), axis=0)
            f = (s[2] * nk + s[1]) * nh + s[0]
            pos = np.searchsorted(sflat, f[ok])
            pos = np.minimum(pos, len(sflat) - 1)
            found = sflat[pos] == f[ok]
            if not np.all(found):
                raise ReductionError(
                    "symmetrize_at: the voxel set is not closed under the Laue group "
                    f"{group.name}; punch every symmetry-equivalent reflection"
                )
            total[ok] += svals[pos]
            count[ok] += 1
    out = np.empty_like(total)
    out[order] = total / count
    return out
