"""Starting orientation of a rotation entry, in the setting of the parent scan or of f1.

Every rotation ``fN`` of a scan and every child scan of a parent must end up in **one
setting** of the crystal: equal orientation matrices (within the refinement error), not
merely equivalent ones.  :func:`reference_orientations` lists, in order of preference,
the orientations the entry should agree with:

1. the parent scan's orientation of the same entry (a child scan starts from its parent);
2. the orientation of another rotation of this scan file: ``f1`` first, then ``f2``...
   (rotations ``f2...`` start from ``f1``);
3. the parent scan's ``f1``... (a child scan's new rotation).

:func:`starting_orientation` then takes the entry's own orientation or the first
reference that indexes the peaks, and otherwise indexes the peaks automatically; in every
case the matrix is replaced by the equivalent one (same peak positions, see
:mod:`nxrefine_bs.reduce.setting`) closest to the first reference, so that a
twin-related relabelling found by an independent indexing never enters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from numpy.typing import NDArray

from ..errors import IndexingError, ScanFileError
from ..geometry import Geometry
from ..nexus.entries import rotation_entries
from ..nexus.geometry_io import read_orientation
from ..nexus.scanfile import find_parent, open_scan_file
from .lattice import Lattice, LatticeError, read_lattice
from .orient import auto_index, orthogonalize, peak_vectors
from .refine_model import PeakList
from .setting import SettingRelation, closest_setting

logger = logging.getLogger(__name__)

__all__ = [
    "Orientation",
    "References",
    "reference_orientations",
    "sibling_reference",
    "starting_orientation",
]


@dataclass(frozen=True)
class Orientation:
    """An orientation matrix and where it came from (e.g. ``"f1"``, ``"parent x.nxs:f2"``)."""

    U: NDArray[np.float64]
    source: str


@dataclass(frozen=True)
class References:
    """Orientations an entry should agree with, best first, and the parent's lattice."""

    orientations: tuple[Orientation, ...]
    parent_lattice: Lattice | None = None

    @property
    def first(self) -> Orientation | None:
        """The reference that fixes the setting (None if there is none)."""
        return self.orientations[0] if self.orientations else None


def _orientations(f: h5py.File, names: list[str], label: str) -> list[Orientation]:
    out = []
    for name in names:
        u = read_orientation(f[name]) if name in f else None
        if u is not None and np.all(np.isfinite(u)) and abs(np.linalg.det(u)) > 0.5:
            out.append(Orientation(orthogonalize(u), f"{label}{name}"))
    return out


def reference_orientations(scan_file: Path, entry: str) -> References:
    """Orientations of the parent scan and of the other rotations of ``scan_file``.

    A missing or unreadable parent is logged and skipped (it must not stop the step).
    """
    refs: list[Orientation] = []
    parent_refs: list[Orientation] = []
    parent_lattice: Lattice | None = None
    try:
        parent = find_parent(scan_file)
    except (ScanFileError, OSError) as exc:
        logger.warning("cannot locate the parent of %s: %s", scan_file, exc)
        parent = None
    if parent is not None and Path(parent).resolve() != Path(scan_file).resolve():
        try:
            with open_scan_file(parent) as f:
                names = rotation_entries(f)
                label = f"parent {Path(parent).name}:"
                refs += _orientations(f, [entry] if entry in names else [], label)
                parent_refs = _orientations(f, [n for n in names if n != entry], label)
                if "entry/sample" in f:
                    try:
                        parent_lattice = read_lattice(f["entry/sample"])
                    except LatticeError:
                        parent_lattice = None
        except (OSError, KeyError) as exc:
            logger.warning("cannot read parent %s of %s: %s", parent, scan_file, exc)
    with open_scan_file(scan_file) as f:
        refs += _orientations(f, [n for n in rotation_entries(f) if n != entry], "")
    return References(tuple(refs + parent_refs), parent_lattice)


def sibling_reference(f: h5py.File, entry: str) -> Orientation | None:
    """The orientation of this scan's first other rotation (``f1`` first) in an open file.

    Read again just before the refine step writes, inside the scan-file lock, so that of
    two rotations refined at the same time the later writer joins the earlier one's
    setting.
    """
    found = _orientations(f, [n for n in rotation_entries(f) if n != entry], "")
    return found[0] if found else None


def indexed_fraction(
    peaks: PeakList, geometry: Geometry, lattice: Lattice, u: NDArray, tol: float
) -> float:
    """Fraction of peaks within ``tol`` (1/Angstrom) of a reflection with ``U B``."""
    q = peak_vectors(geometry, peaks.x, peaks.y, peaks.z)
    hkl = q @ np.linalg.inv(u @ lattice.B).T
    diff = np.linalg.norm((hkl - np.rint(hkl)) @ lattice.B.T, axis=1)
    return float(np.mean(diff <= tol))


def starting_orientation(
    peaks: PeakList,
    geometry: Geometry,
    lattice: Lattice,
    own: NDArray | None,
    references: References,
    *,
    tol: float,
    min_fraction: float,
    max_forbidden: float,
    where: str = "",
) -> tuple[NDArray[np.float64], str, SettingRelation | None]:
    """Starting U for the refinement, in the setting of the first reference.

    Parameters
    ----------
    peaks, geometry, lattice :
        The entry's peaks, starting geometry and lattice.
    own : numpy.ndarray or None
        The entry's own orientation matrix.
    references : References
        From :func:`reference_orientations`.
    tol : float
        Indexing tolerance (1/Angstrom).
    min_fraction : float
        A candidate U must index at least this fraction of the peaks to be used.
    max_forbidden : float
        Passed to :func:`~nxrefine_bs.reduce.orient.auto_index`.
    where : str
        ``file:entry`` for messages.

    Returns
    -------
    U : numpy.ndarray
    source : str
        ``"entry"``, the reference's name or ``"auto-indexing"``.
    relation : SettingRelation or None
        How the chosen U related to the first reference before it was put in that
        reference's setting (None without a reference).

    Raises
    ------
    IndexingError
        If automatic indexing fails.
    """
    candidates = []
    if own is not None:
        candidates.append(Orientation(orthogonalize(own), "entry"))
    candidates += list(references.orientations)
    u0: NDArray | None = None
    source = ""
    for cand in candidates:
        frac = indexed_fraction(peaks, geometry, lattice, cand.U, tol)
        if frac >= min_fraction:
            u0, source = cand.U, cand.source
            break
        logger.warning(
            "%s: the %s orientation indexes only %.0f%% of the peaks; trying others",
            where,
            cand.source,
            100 * frac,
        )
    if u0 is None:
        q = peak_vectors(geometry, peaks.x, peaks.y, peaks.z)
        try:
            u0 = auto_index(q, lattice, max_forbidden=max_forbidden).U
        except IndexingError as exc:
            raise IndexingError(f"{where}: automatic indexing failed: {exc}") from None
        source = "auto-indexing"
    ref = references.first
    if ref is None:
        return u0, source, None
    u_set, relation = closest_setting(u0, ref.U, lattice)
    if not relation.same_setting:
        logger.info(
            "%s: %s orientation put in the setting of %s (%s)",
            where,
            source,
            ref.source,
            relation.describe(),
        )
    if relation.angle > 5.0:
        logger.warning(
            "%s: the orientation is %.1f deg from %s even in its setting; the crystal may "
            "have moved",
            where,
            relation.angle,
            ref.source,
        )
    return u_set, source, relation
