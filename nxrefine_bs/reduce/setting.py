"""One crystal setting: lattice symmetry, Laue group and equivalent orientation matrices.

An orientation matrix ``U`` and ``U @ R`` describe the same peak *positions* for every
proper rotation ``R`` of the lattice's metric symmetry (its holohedry: ``6/mmm`` for every
hexagonal cell, ``m-3m`` for every cubic one...).  Only the rotations of the crystal's
**Laue group** also give the same *intensities*; a rotation of the lattice outside the
Laue group (for example ``h' = h + k, k' = -k, l' = -l`` in ``P -3 m 1``) relabels the
reflections of a twin-related crystal.  Indexing peak positions alone cannot tell those
settings apart, so rotations and scans of one crystal are put in one setting by choosing,
among the equivalent matrices, the one closest to a reference orientation (the parent
scan's or the first rotation's), and merged data are refused when two entries differ by
an operation outside the Laue group.

Conventions
-----------
``W`` (integer, fractional coordinates) acts on real-space coordinates, ``x' = W x``;
its Cartesian form in the crystal frame is ``R = B^-T W B^T`` and ``U @ R`` indexes a
reflection ``h`` as ``W^T h`` relative to ``U``.  Operations are *reported* as the matrix
``M = W^T`` that maps Miller indices of one entry onto those of the other
(``h_other = M h_reference``).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .lattice import Lattice
from .orient import orthogonalize, rotation_angle

logger = logging.getLogger(__name__)

__all__ = [
    "SettingRelation",
    "lattice_rotations",
    "laue_rotations",
    "cartesian_rotation",
    "setting_relation",
    "closest_setting",
    "format_operation",
]

_METRIC_RTOL = 1e-5


@lru_cache(maxsize=1)
def _candidate_matrices() -> NDArray[np.int64]:
    """All 3x3 matrices with entries in {-1, 0, 1} and determinant +1."""
    vals = np.array(list(itertools.product((-1, 0, 1), repeat=9)), dtype=np.int64)
    m = vals.reshape(-1, 3, 3)
    det = np.rint(np.linalg.det(m.astype(np.float64))).astype(np.int64)
    return m[det == 1]


def _centring_vectors(lattice: Lattice) -> NDArray[np.float64]:
    ops = lattice.gemmi_space_group.operations()
    return np.array([np.array(t, dtype=np.float64) / 24.0 for t in ops.cen_ops])


def lattice_rotations(lattice: Lattice) -> NDArray[np.int64]:
    """Proper rotations ``W`` of the lattice's metric symmetry (holohedry), ``(n, 3, 3)``.

    ``W`` preserves the metric ``G = A^T A`` of the conventional cell and maps the
    centring translations onto lattice translations.  The identity comes first.
    """
    a = np.linalg.inv(lattice.B).T  # real-space basis vectors as columns
    g = a.T @ a
    m = _candidate_matrices().astype(np.float64)
    gm = np.einsum("nji,jk,nkl->nil", m, g, m)
    ok = np.all(np.abs(gm - g) <= _METRIC_RTOL * np.abs(g).max(), axis=(1, 2))
    cand = m[ok]
    cen = _centring_vectors(lattice)
    if len(cen) > 1:
        keep = []
        for w in cand:
            moved = cen @ w.T
            diff = moved[:, None, :] - cen[None, :, :]
            hit = np.all(np.abs(diff - np.rint(diff)) < 1e-6, axis=2).any(axis=1)
            keep.append(bool(hit.all()))
        cand = cand[np.array(keep, dtype=bool)]
    ident = np.all(cand == np.eye(3), axis=(1, 2))
    order = np.r_[np.nonzero(ident)[0], np.nonzero(~ident)[0]]
    return np.rint(cand[order]).astype(np.int64)


def laue_rotations(lattice: Lattice) -> NDArray[np.int64]:
    """Proper rotations ``W`` of the space group's Laue group (from GEMMI), ``(n, 3, 3)``."""
    return np.rint(lattice.symmetry_rotations()).astype(np.int64)


def cartesian_rotation(lattice: Lattice, w: ArrayLike) -> NDArray[np.float64]:
    """Cartesian form ``B^-T W B^T`` of fractional rotation(s) ``W`` in the crystal frame."""
    b = lattice.B
    return np.einsum("ij,...jk,kl->...il", np.linalg.inv(b).T, np.asarray(w, np.float64), b.T)


def format_operation(m: ArrayLike) -> str:
    """An integer matrix as ``[[1, 1, 0], [0, -1, 0], [0, 0, -1]]``."""
    rows = np.rint(np.asarray(m, dtype=np.float64)).astype(int).tolist()
    return "[" + ", ".join("[" + ", ".join(str(v) for v in r) + "]" for r in rows) + "]"


def _in_group(w: NDArray, group: NDArray) -> bool:
    return bool(np.any(np.all(group == w, axis=(1, 2))))


@dataclass(frozen=True)
class SettingRelation:
    """How orientation ``U`` relates to a reference ``U_ref`` of the same lattice.

    Attributes
    ----------
    operation : numpy.ndarray
        Integer matrix ``M`` with ``h(U) = M h(U_ref)`` for the same peak, i.e. the lattice
        rotation that best explains ``U_ref^T U``; the identity when both share a setting.
    angle : float
        Remaining misorientation (degrees) after that operation.
    in_laue_group : bool
        True if ``M`` belongs to the Laue group (an equivalent setting of the same
        crystal); False for a twin-related relabelling.
    """

    operation: NDArray[np.int64]
    angle: float
    in_laue_group: bool

    @property
    def same_setting(self) -> bool:
        """True if the operation is the identity."""
        return bool(np.array_equal(self.operation, np.eye(3, dtype=np.int64)))

    def describe(self) -> str:
        """One-line description naming the operation."""
        kind = "inside" if self.in_laue_group else "outside"
        return (
            f"Miller indices related by h' = M h with M = {format_operation(self.operation)} "
            f"({kind} the Laue group), {self.angle:.3g} deg apart after it"
        )


def setting_relation(u_ref: ArrayLike, u: ArrayLike, lattice: Lattice) -> SettingRelation:
    """The lattice operation relating orientation ``u`` to the reference ``u_ref``.

    Parameters
    ----------
    u_ref, u : array_like, shape (3, 3)
        Orientation matrices of the same lattice.
    lattice : Lattice
        The lattice (its holohedry and Laue group).

    Returns
    -------
    SettingRelation
    """
    m = orthogonalize(u_ref).T @ orthogonalize(u)
    ws = lattice_rotations(lattice)
    rots = cartesian_rotation(lattice, ws)
    tr = np.einsum("nji,ji->n", rots, m)  # trace(R^T m)
    k = int(np.argmax(tr))
    w = ws[k]
    angle = rotation_angle(rots[k].T @ m)
    return SettingRelation(
        operation=w.T.copy(),
        angle=float(angle),
        in_laue_group=_in_group(w, laue_rotations(lattice)),
    )


def closest_setting(
    u: ArrayLike, u_ref: ArrayLike, lattice: Lattice
) -> tuple[NDArray[np.float64], SettingRelation]:
    """Of the orientations ``u @ R`` equivalent for peak positions, the one closest to ``u_ref``.

    Parameters
    ----------
    u : array_like
        An orientation found for the peaks (e.g. by automatic indexing).
    u_ref : array_like
        The reference orientation (parent scan, first rotation).
    lattice : Lattice
        The lattice.

    Returns
    -------
    numpy.ndarray
        The re-labelled orientation ``u @ R``, in the reference's setting.
    SettingRelation
        How the given ``u`` related to ``u_ref`` (identity if nothing changed).
    """
    rel = setting_relation(u_ref, u, lattice)
    w = rel.operation.T  # u ~ u_ref R_w  ->  u R_w^-1 ~ u_ref
    u_new = orthogonalize(np.asarray(u, np.float64) @ cartesian_rotation(lattice, w).T)
    return u_new, rel
