"""Peak angles, Miller indices and the orientation matrix U: automatic and two-peak indexing.

Conventions are those of :mod:`nxrefine_bs.geometry`: a peak at pixel ``(x, y)`` on
(fractional) frame ``z`` has the scattering vector ``q_lab`` (1/Angstrom, no 2 pi); its
vector in the *crystal-rotation frame* is ``q = G(phi)^-1 q_lab`` and ``q = U B hkl``.

Automatic indexing (:func:`auto_index`) needs no user input besides the lattice already
defined for the sample:

1. the lowest-|q| peaks (400 by default) are projected on a dense set of directions of a
   hemisphere; a histogram of the projections along a direction parallel to a real-space
   lattice vector ``R`` is periodic with period ``1/|R|``, which a 1-D FFT detects;
2. the strongest directions are refined into real-space vectors ``R`` with ``q . R``
   integer for as many peaks as possible (integer least squares), reduced to the shortest
   multiple, and the three shortest non-coplanar ones that index the most peaks *together*
   form a primitive basis (so a second twin domain or garbage peaks do not mix in);
3. the basis is reduced (Buerger) and every triple of short lattice vectors whose
   lengths and angles match the *given* conventional cell within tolerance (allowing a
   common scale error, e.g. from a wrong detector distance), right-handed and of the
   right volume, is a candidate; the symmetry-equivalent candidates are the ~24 (or fewer)
   proper rotations of the lattice.  The candidate with the smallest metric misfit whose
   indexed reflections respect the space group's systematic absences is kept;
4. ``U`` is the rotation (Kabsch fit) that best maps ``B hkl`` onto the observed vectors.

The method is robust to a few tens of percent of spurious peaks; a twinned crystal, a
wrong cell or a wrong centring fails with :class:`~nxrefine_bs.errors.IndexingError`.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..errors import IndexingError
from ..geometry import Geometry
from .lattice import Lattice

logger = logging.getLogger(__name__)

__all__ = [
    "MIN_PEAKS",
    "IndexingResult",
    "peak_vectors",
    "calculate_angles",
    "calculate_hkl",
    "hkl_difference",
    "orient_two_peaks",
    "fit_rotation",
    "orthogonalize",
    "rotation_angle",
    "misorientation",
    "reduce_basis",
    "auto_index",
]

MIN_PEAKS = 10
"""Fewest peaks accepted for indexing or refinement."""


# ---------------------------------------------------------------------- angles and HKL
def peak_vectors(
    geometry: Geometry, x: ArrayLike, y: ArrayLike, z: ArrayLike
) -> NDArray[np.float64]:
    """Scattering vectors of peaks in the crystal-rotation frame, ``G(phi)^-1 q_lab``.

    Parameters
    ----------
    geometry : Geometry
        Diffractometer geometry (sample offset included).
    x, y : array_like
        Peak positions in pixels.
    z : array_like
        Fractional frame indices.

    Returns
    -------
    numpy.ndarray, shape (n, 3)
        Vectors in 1/Angstrom (no 2 pi); ``q = U B hkl`` for an indexed peak.
    """
    return np.atleast_2d(geometry.pixel_to_hkl(x, y, z, np.eye(3)))


def calculate_angles(
    geometry: Geometry, x: ArrayLike, y: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Two-theta (polar) and azimuthal angles (degrees) of peaks at pixels ``(x, y)``.

    The azimuth is ``atan2(-s_y, s_z)`` of the sample-to-pixel vector, as in NXRefine.
    """
    return geometry.two_theta(x, y), geometry.azimuth(x, y)


def calculate_hkl(
    geometry: Geometry, x: ArrayLike, y: ArrayLike, z: ArrayLike, ub: ArrayLike
) -> NDArray[np.float64]:
    """Fractional Miller indices of peaks from an orientation matrix ``UB``, shape (n, 3)."""
    return np.atleast_2d(geometry.pixel_to_hkl(x, y, z, ub))


def hkl_difference(hkl: ArrayLike, B: ArrayLike) -> NDArray[np.float64]:
    """NXRefine's indexing misfit ``|B (h - round(h))|`` in 1/Angstrom (no 2 pi)."""
    h = np.atleast_2d(np.asarray(hkl, dtype=np.float64))
    return np.linalg.norm((h - np.rint(h)) @ np.asarray(B, dtype=np.float64).T, axis=1)


# ---------------------------------------------------------------------- rotations
def orthogonalize(m: ArrayLike) -> NDArray[np.float64]:
    """Nearest proper rotation matrix to ``m`` (polar decomposition)."""
    w, _, vt = np.linalg.svd(np.asarray(m, dtype=np.float64))
    d = np.sign(np.linalg.det(w @ vt))
    return w @ np.diag([1.0, 1.0, d]) @ vt


def rotation_angle(r: ArrayLike) -> float:
    """Rotation angle (degrees) of a rotation matrix (accurate for small angles too)."""
    m = np.asarray(r, dtype=np.float64)
    sin2 = np.linalg.norm([m[2, 1] - m[1, 2], m[0, 2] - m[2, 0], m[1, 0] - m[0, 1]])
    return math.degrees(math.atan2(sin2, float(np.trace(m)) - 1.0))


def misorientation(u1: ArrayLike, u2: ArrayLike, lattice: Lattice | None = None) -> float:
    """Angle (degrees) between two orientation matrices, modulo the lattice symmetry.

    With a ``lattice``, ``U`` and ``U @ R`` for every Laue-group rotation ``R`` describe
    the same crystal and the smallest angle is returned.
    """
    m = np.asarray(u1, dtype=np.float64).T @ np.asarray(u2, dtype=np.float64)
    if lattice is None:
        return rotation_angle(m)
    rots = lattice.cartesian_rotations()
    tr = np.einsum("nji,ji->n", rots, m)  # trace(R^T m)
    return rotation_angle(rots[int(np.argmax(tr))].T @ m)


def orient_two_peaks(
    q1: ArrayLike, q2: ArrayLike, hkl1: ArrayLike, hkl2: ArrayLike, B: ArrayLike
) -> NDArray[np.float64]:
    """Orientation matrix from two indexed peaks (Busing & Levy 1967, eqs 23-27).

    Parameters
    ----------
    q1, q2 : array_like, shape (3,)
        Observed scattering vectors in the crystal-rotation frame (``G(phi)^-1 q_lab``).
    hkl1, hkl2 : array_like, shape (3,)
        Their Miller indices.
    B : array_like, shape (3, 3)
        Busing-Levy matrix of the cell.

    Returns
    -------
    numpy.ndarray
        ``U`` with ``U B hkl1`` parallel to ``q1`` and ``U B hkl2`` in the plane of
        ``q1, q2``.

    Raises
    ------
    IndexingError
        If either pair of vectors is (nearly) parallel.
    """

    def triad(v1: NDArray, v2: NDArray, what: str) -> NDArray[np.float64]:
        t1 = v1 / np.linalg.norm(v1)
        t3 = np.cross(v1, v2)
        n3 = np.linalg.norm(t3)
        if n3 < 1e-6 * np.linalg.norm(v1) * np.linalg.norm(v2):
            raise IndexingError(f"two-peak orientation: the two {what} are parallel")
        t3 /= n3
        return np.column_stack([t1, np.cross(t3, t1), t3])

    b = np.asarray(B, dtype=np.float64)
    tc = triad(b @ np.asarray(hkl1, float), b @ np.asarray(hkl2, float), "reflections")
    tg = triad(np.asarray(q1, float), np.asarray(q2, float), "peak vectors")
    return tg @ tc.T


def fit_rotation(q: ArrayLike, hkl: ArrayLike, B: ArrayLike) -> NDArray[np.float64]:
    """Rotation ``U`` minimising ``sum |U B hkl_i - q_i|^2`` (Kabsch / orthogonal Procrustes)."""
    p = np.atleast_2d(np.asarray(hkl, dtype=np.float64)) @ np.asarray(B, dtype=np.float64).T
    h = p.T @ np.atleast_2d(np.asarray(q, dtype=np.float64))
    w, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ w.T))
    return vt.T @ np.diag([1.0, 1.0, d]) @ w.T


# ---------------------------------------------------------------------- indexing
@dataclass(frozen=True)
class IndexingResult:
    """Outcome of :func:`auto_index`.

    Attributes
    ----------
    U : numpy.ndarray
        Orientation matrix for the given lattice.
    ub : numpy.ndarray
        Unconstrained ``UB`` fitted to the peaks (columns: a*, b*, c* as observed).
    lattice : Lattice
        The lattice indexed against.
    n_peaks : int
        Peaks offered (with a finite, non-zero vector).
    n_used : int
        Lowest-|q| peaks used for the search (``max_peaks``).
    n_indexed : int
        Of those, peaks within ``hkl_tolerance`` of an allowed reflection with ``ub``.
    indexed_fraction : float
        ``n_indexed / n_used``.  (Low-angle peaks are used because an approximate
        geometry distorts high-angle peaks beyond an affine fit.)
    n_indexed_all : int
        Peaks of the whole list indexed with ``ub``.
    n_forbidden : int
        Indexed peaks at systematically absent positions of the space group.
    primitive_cell : tuple of float
        Reduced primitive cell found in the data.
    observed_cell : tuple of float
        Conventional cell of ``ub``.
    metric_misfit : float
        RMS relative length / angle (radian) misfit between observed and given cell,
        after removing a common scale factor.
    scale : float
        Common length scale of the observed cell relative to the given one.
    """

    U: NDArray[np.float64]
    ub: NDArray[np.float64]
    lattice: Lattice
    n_peaks: int
    n_used: int
    n_indexed: int
    indexed_fraction: float
    n_indexed_all: int
    n_forbidden: int
    primitive_cell: tuple[float, ...]
    observed_cell: tuple[float, ...]
    metric_misfit: float
    scale: float


def _cell_of_rows(a: NDArray[np.float64]) -> tuple[float, ...]:
    """Cell parameters of real-space basis vectors given as rows."""
    la, lb, lc = np.linalg.norm(a, axis=1)

    def ang(u: NDArray, v: NDArray) -> float:
        return math.degrees(
            math.acos(np.clip(u @ v / np.linalg.norm(u) / np.linalg.norm(v), -1, 1))
        )

    return (
        float(la),
        float(lb),
        float(lc),
        ang(a[1], a[2]),
        ang(a[0], a[2]),
        ang(a[0], a[1]),
    )


def _fibonacci_hemisphere(n: int) -> NDArray[np.float64]:
    i = np.arange(n) + 0.5
    z = i / n  # uniform in z over (0, 1]: equal-area
    r = np.sqrt(1.0 - z * z)
    phi = i * math.pi * (3.0 - math.sqrt(5.0))
    return np.column_stack([r * np.cos(phi), r * np.sin(phi), z])


def _frac_error(q: NDArray, r: NDArray) -> NDArray[np.float64]:
    x = q @ r
    return np.abs(x - np.rint(x))


def _refine_vector(
    q: NDArray, r: NDArray, d_min: float, tols: tuple[float, ...] = (0.3, 0.2, 0.12)
) -> NDArray[np.float64] | None:
    """Least-squares real-space vector ``r`` making ``q . r`` integer for most peaks.

    Returns None if too few peaks agree or ``r`` collapses below ``d_min`` (the zero
    vector trivially makes every ``q . r`` integer).
    """
    for tol in tols:
        x = q @ r
        n = np.rint(x)
        sel = np.abs(x - n) < tol
        if sel.sum() < 6 or not np.any(n[sel]):
            return None
        r = np.linalg.lstsq(q[sel], n[sel], rcond=None)[0]
        if np.linalg.norm(r) < d_min:
            return None
    return r


def _direction_candidates(
    q: NDArray, d_min: float, d_max: float, *, n_candidates: int, max_directions: int
) -> list[NDArray[np.float64]]:
    """Real-space vector guesses from FFTs of peak projections on hemisphere directions."""
    qlim = float(np.linalg.norm(q, axis=1).max()) * 1.0001
    eps = 0.3 / (qlim * d_max)
    n_dir = int(min(max(2.0 * math.pi / eps**2, 3000), max_directions))
    dirs = _fibonacci_hemisphere(n_dir)
    k_lo = max(1, int(math.floor(2.0 * qlim * d_min)))
    k_hi_needed = int(math.ceil(2.0 * qlim * d_max))
    nb = 64
    while nb // 2 < 2 * k_hi_needed:
        nb *= 2
    k_hi = k_hi_needed
    scores = np.empty(n_dir)
    kbest = np.empty(n_dir, dtype=np.int64)
    chunk = max(1, 2_000_000 // max(nb, len(q)))
    for start in range(0, n_dir, chunk):
        d = dirs[start : start + chunk]
        p = q @ d.T  # (N, K)
        b = np.clip(((p + qlim) * (nb / (2.0 * qlim))).astype(np.int64), 0, nb - 1)
        k = d.shape[0]
        hist = np.bincount((b + nb * np.arange(k)).ravel(), minlength=k * nb).reshape(k, nb)
        mag = np.abs(np.fft.rfft(hist, axis=1))[:, k_lo : k_hi + 1]
        idx = np.argmax(mag, axis=1)
        scores[start : start + k] = mag[np.arange(k), idx]
        kbest[start : start + k] = idx + k_lo
    # Greedy non-maximum suppression on the sphere.
    order = np.argsort(-scores)[: max(50 * n_candidates, 2000)]
    cos_sep = math.cos(2.5 * eps)
    chosen: list[int] = []
    for i in order:
        if chosen and np.max(np.abs(dirs[chosen] @ dirs[i])) > cos_sep:
            continue
        chosen.append(int(i))
        if len(chosen) >= n_candidates:
            break
    # Fine 1-D scan of the length along each chosen direction.
    out = []
    for i in chosen:
        t = dirs[i]
        d0 = kbest[i] / (2.0 * qlim)
        dgrid = d0 + np.linspace(-0.75, 0.75, 31) / (2.0 * qlim)
        dgrid = dgrid[dgrid > 0]
        phase = np.exp(2j * np.pi * np.outer(dgrid, q @ t))
        best = dgrid[np.argmax(np.abs(phase.sum(axis=1)))]
        out.append(best * t)
    return out


def reduce_basis(a: ArrayLike) -> NDArray[np.float64]:
    """Buerger-reduce three real-space basis vectors (rows): shortest, right-handed basis."""
    a = np.array(a, dtype=np.float64)
    for _ in range(100):
        changed = False
        a = a[np.argsort(np.linalg.norm(a, axis=1))]
        for i, j in itertools.permutations(range(3), 2):
            m = np.rint(a[j] @ a[i] / (a[i] @ a[i]))
            if m != 0:
                new = a[j] - m * a[i]
                if new @ new < a[j] @ a[j] * (1 - 1e-12):
                    a[j] = new
                    changed = True
        for k in range(3):
            i, j = (x for x in range(3) if x != k)
            for s1, s2 in itertools.product((-1.0, 1.0), repeat=2):
                new = a[k] + s1 * a[i] + s2 * a[j]
                if new @ new < a[k] @ a[k] * (1 - 1e-12):
                    a[k] = new
                    changed = True
        if not changed:
            break
    a = a[np.argsort(np.linalg.norm(a, axis=1))]
    if np.linalg.det(a) < 0:
        a = -a
    return a


def _fit_basis(q: NDArray, a: NDArray, tol: float) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """Refine real-space basis rows ``a`` so that ``a q`` is integer for indexed peaks."""
    for t in (max(tol, 0.2), tol, tol):
        h = q @ a.T
        sel = np.all(np.abs(h - np.rint(h)) < t, axis=1)
        if sel.sum() < 6:
            break
        new = np.linalg.lstsq(q[sel], np.rint(h[sel]), rcond=None)[0].T
        # Keep the old basis if the fit collapses (an index that is always zero).
        if (
            abs(np.linalg.det(new)) < 0.5 * abs(np.linalg.det(a))
            or np.min(np.linalg.norm(new, axis=1) / np.linalg.norm(a, axis=1)) < 0.5
        ):
            break
        a = new
    h = q @ a.T
    sel = np.all(np.abs(h - np.rint(h)) < tol, axis=1)
    return a, sel


def _primitive_basis(q: NDArray, lattice: Lattice, tol: float, max_directions: int) -> NDArray:
    """Three real-space vectors (rows) of the lattice seen in ``q``."""
    d_max = 1.3 * max(lattice.a, lattice.b, lattice.c)
    d_min = 0.45 * min(lattice.a, lattice.b, lattice.c)
    guesses = _direction_candidates(q, d_min, d_max, n_candidates=60, max_directions=max_directions)
    vecs: list[NDArray] = []
    scores: list[float] = []
    for g in guesses:
        r = _refine_vector(q, g, d_min)
        if r is None:
            continue
        s = float(np.mean(_frac_error(q, r) < tol))
        for m in (6, 5, 4, 3, 2):  # shortest multiple that indexes as well
            rm = _refine_vector(q, r / m, d_min)
            if rm is not None:
                sm = float(np.mean(_frac_error(q, rm) < tol))
                if sm >= 0.9 * s:
                    r, s = rm, sm
                    break
        vecs.append(r)
        scores.append(s)
    if not vecs:
        raise IndexingError("no periodicity found in the peak positions")
    best = max(scores)
    good = [v for v, s in zip(vecs, scores, strict=True) if s >= max(0.75 * best, 0.35)]
    # Deduplicate (+-r) and add pairwise sums/differences.
    uniq: list[NDArray] = []
    for v in sorted(good, key=lambda v: float(np.linalg.norm(v))):
        if not any(
            min(np.linalg.norm(v - u), np.linalg.norm(v + u)) < 0.03 * np.linalg.norm(u)
            for u in uniq
        ):
            uniq.append(v)
    extra = []
    for u, v in itertools.combinations(uniq[:12], 2):
        for w in (u + v, u - v):
            if np.linalg.norm(w) >= d_min and np.mean(_frac_error(q, w) < tol) >= 0.75 * best:
                extra.append(w)
    for w in extra:
        if not any(
            min(np.linalg.norm(w - u), np.linalg.norm(w + u)) < 0.03 * np.linalg.norm(u)
            for u in uniq
        ):
            uniq.append(w)
    uniq.sort(key=lambda v: float(np.linalg.norm(v)))
    cand = np.array(uniq[:15])
    if len(cand) < 3:
        raise IndexingError(
            f"only {len(cand)} independent lattice directions found in the peak positions"
        )
    # The triples indexing (nearly) the most peaks together; of those the smallest volume.
    fracs = np.abs(q @ cand.T - np.rint(q @ cand.T)) < tol  # (N, K)
    lengths = np.linalg.norm(cand, axis=1)
    triples = []
    for i, j, k in itertools.combinations(range(len(cand)), 3):
        vol = abs(np.linalg.det(cand[[i, j, k]]))
        if vol < 0.05 * lengths[i] * lengths[j] * lengths[k]:
            continue
        joint = float(np.mean(fracs[:, i] & fracs[:, j] & fracs[:, k]))
        triples.append((joint, vol, (i, j, k)))
    if not triples:
        raise IndexingError("the lattice directions found in the peaks are coplanar")
    top = max(t[0] for t in triples)
    best_triple = min((t for t in triples if t[0] >= top - 0.03), key=lambda t: t[1])[2]
    return cand[list(best_triple)]


def _conventional_candidates(
    a_red: NDArray, lattice: Lattice, length_tol: float, angle_tol: float
) -> list[tuple[float, float, NDArray]]:
    """Right-handed triples of lattice vectors matching the given conventional cell."""
    rng = np.arange(-3, 4)
    n = np.stack(np.meshgrid(rng, rng, rng, indexing="ij"), -1).reshape(-1, 3)
    n = n[np.any(n != 0, axis=1)]
    v = n @ a_red
    lv = np.linalg.norm(v, axis=1)
    target = np.array([lattice.a, lattice.b, lattice.c])
    idx = [np.nonzero(np.abs(lv / t - 1.0) < 2 * length_tol)[0] for t in target]
    if any(len(i) == 0 for i in idx):
        return []
    va, vb, vc = (v[i] for i in idx)
    ua, ub, uc = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (va, vb, vc))
    al, be, ga = np.radians([lattice.alpha, lattice.beta, lattice.gamma])
    tol = math.radians(angle_tol)
    cg = np.arccos(np.clip(ua @ ub.T, -1, 1)) - ga  # (na, nb)
    cb = np.arccos(np.clip(ua @ uc.T, -1, 1)) - be  # (na, nc)
    ca = np.arccos(np.clip(ub @ uc.T, -1, 1)) - al  # (nb, nc)
    ia, ib, ic = np.nonzero(
        (np.abs(cg)[:, :, None] < tol) & (np.abs(cb)[:, None, :] < tol) & (np.abs(ca)[None] < tol)
    )
    out = []
    vol0 = lattice.volume
    for i, j, k in zip(ia, ib, ic, strict=True):
        basis = np.array([va[i], vb[j], vc[k]])
        det = float(np.linalg.det(basis))
        if det <= 0:
            continue
        lens = np.linalg.norm(basis, axis=1) / target
        scale = float(np.mean(lens))
        if abs(scale - 1.0) > length_tol or abs(det / vol0 / scale**3 - 1.0) > 0.05:
            continue
        err = np.concatenate([lens / scale - 1.0, [ca[j, k], cb[i, k], cg[i, j]]])
        out.append((float(np.sqrt(np.mean(err**2))), scale, basis))
    out.sort(key=lambda t: t[0])
    return out


def auto_index(
    q: ArrayLike,
    lattice: Lattice,
    *,
    max_peaks: int = 400,
    hkl_tolerance: float = 0.12,
    accept_tolerance: float = 0.2,
    length_tolerance: float = 0.03,
    angle_tolerance: float = 3.0,
    min_indexed: float = 0.5,
    max_forbidden: float = 0.1,
    max_directions: int = 40000,
) -> IndexingResult:
    """Find the orientation matrix of ``lattice`` from peak vectors, with no user input.

    Parameters
    ----------
    q : array_like, shape (n, 3)
        Peak scattering vectors in the crystal-rotation frame (see :func:`peak_vectors`).
    lattice : Lattice
        The sample's cell and space group (from ``entry/sample``).
    max_peaks : int
        Number of lowest-|q| peaks used to search for the lattice.
    hkl_tolerance : float
        Largest ``|h - round(h)|`` (any index, r.l.u.) of a peak used to find and fit
        the lattice.
    accept_tolerance : float
        The same limit for counting indexed peaks (looser, because the geometry may still
        be approximate: a beam-centre error shifts every q by a constant).
    length_tolerance : float
        Relative tolerance on a common length scale between the observed and the given
        cell; individual lengths must agree to twice this after removing that scale.
    angle_tolerance : float
        Tolerance on the cell angles in degrees.
    min_indexed : float
        Smallest acceptable fraction of the ``max_peaks`` lowest-angle peaks indexed.
        The default is lenient because the geometry is not refined yet; the refinement
        step applies the stricter final test.
    max_forbidden : float
        Largest acceptable fraction of indexed peaks at systematically absent positions.
    max_directions : int
        Cap on the number of search directions (memory/time bound).

    Returns
    -------
    IndexingResult

    Raises
    ------
    IndexingError
        Too few peaks, no lattice found, no match with the given cell, too few peaks
        indexed (twinned crystal, garbage, phase transition) or too many forbidden
        reflections (wrong space group).
    """
    q = np.atleast_2d(np.asarray(q, dtype=np.float64))
    if q.ndim != 2 or q.shape[1] != 3:
        raise IndexingError(f"peak vectors must have shape (n, 3), got {q.shape}")
    qn = np.linalg.norm(q, axis=1)
    finite = np.isfinite(qn) & (qn > 1e-6)
    n_all = int(finite.sum())
    if n_all < MIN_PEAKS:
        raise IndexingError(
            f"only {n_all} usable peaks; automatic indexing needs at least {MIN_PEAKS} "
            "(lower the peak-search threshold or widen the frame range)"
        )
    qa = q[finite]
    sub = qa[np.argsort(qn[finite])[:max_peaks]]
    a_prim = _primitive_basis(sub, lattice, hkl_tolerance, max_directions)
    a_prim, _ = _fit_basis(sub, a_prim, hkl_tolerance)
    a_red = reduce_basis(a_prim)
    prim_cell = _cell_of_rows(a_red)
    cands = _conventional_candidates(a_red, lattice, length_tolerance, angle_tolerance)
    if not cands:
        raise IndexingError(
            "the peaks index on a primitive cell "
            + " ".join(f"{x:.4g}" for x in prim_cell)
            + f" (volume {abs(np.linalg.det(a_red)):.4g} A^3) that contains no cell matching "
            f"the given lattice {lattice} (volume {lattice.volume:.4g} A^3, "
            f"{lattice.n_lattice_points} lattice points); check the unit cell and space group "
            "or suspect a phase transition"
        )
    best_fail = None
    for misfit, scale, basis in cands[:100]:
        basis_fit, sel = _fit_basis(sub, basis, hkl_tolerance)
        h = np.rint(sub[sel] @ basis_fit.T)
        allowed = np.asarray(lattice.is_allowed(h), dtype=bool)
        n_forb = int((~allowed).sum())
        n_idx = int(allowed.sum())
        if n_forb > max_forbidden * max(1, len(h)):
            if best_fail is None or n_forb / max(1, len(h)) < best_fail[0]:
                best_fail = (n_forb / max(1, len(h)), len(h))
            continue
        u = fit_rotation(sub[sel][allowed], h[allowed], lattice.B)
        ub = np.asarray(np.linalg.inv(basis_fit), dtype=np.float64)
        h_sub = sub @ basis_fit.T
        ok = np.all(np.abs(h_sub - np.rint(h_sub)) < accept_tolerance, axis=1)
        n_idx = int((ok & np.asarray(lattice.is_allowed(np.rint(h_sub)), dtype=bool)).sum())
        frac = n_idx / len(sub)
        h_all = qa @ basis_fit.T
        n_idx_all = int(np.all(np.abs(h_all - np.rint(h_all)) < accept_tolerance, axis=1).sum())
        result = IndexingResult(
            U=u,
            ub=ub,
            lattice=lattice,
            n_peaks=n_all,
            n_used=len(sub),
            n_indexed=n_idx,
            indexed_fraction=frac,
            n_indexed_all=n_idx_all,
            n_forbidden=n_forb,
            primitive_cell=prim_cell,
            observed_cell=_cell_of_rows(basis_fit),
            metric_misfit=misfit,
            scale=scale,
        )
        if frac < min_indexed:
            raise IndexingError(
                f"only {n_idx} of the {len(sub)} lowest-angle peaks ({100 * frac:.1f}%) index "
                f"on {lattice} (need {100 * min_indexed:.0f}%); the peak list may come from a "
                "twinned crystal or contain many spurious peaks, or the cell may be wrong"
            )
        logger.info(
            "auto-indexed %d/%d low-angle peaks (%.1f%%; %d/%d in all) on %s; observed cell %s",
            n_idx,
            len(sub),
            100 * frac,
            n_idx_all,
            n_all,
            lattice.space_group,
            " ".join(f"{x:.5g}" for x in result.observed_cell),
        )
        return result
    assert best_fail is not None
    raise IndexingError(
        f"{100 * best_fail[0]:.0f}% of the {best_fail[1]} indexed peaks are systematically "
        f"absent in space group {lattice.space_group!r} (allowed {100 * max_forbidden:.0f}%); "
        "the space group or lattice centring is probably wrong"
    )
