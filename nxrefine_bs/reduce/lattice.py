"""Unit cell and space group of a sample: constraints, reflection conditions and NeXus I/O.

A :class:`Lattice` couples the six cell parameters with a space group (interpreted by
GEMMI).  The space group fixes the crystal system, the Laue group and the lattice
centring, and therefore

* the symmetry constraints on the cell (cubic ``a``; tetragonal and hexagonal ``a, c``;
  orthorhombic ``a, b, c``; monoclinic ``a, b, c, beta`` with *b* unique; rhombohedral
  axes ``a, alpha``; triclinic all six), used by the refinement;
* the systematic absences, used to check an indexing and to list allowed reflections.

The lattice is stored in ``entry/sample`` the way NXRefine stores it (inventory §2.2):
``space_group`` (H-M symbol), ``laue_group``, ``unit_cell_group`` (crystal system),
``lattice_centring`` and ``unitcell_a`` ... ``unitcell_gamma``.

All lengths in Angstrom, angles in degrees; reciprocal vectors without 2 pi, as in
:mod:`nxrefine_bs.geometry`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import gemmi
import h5py
import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..errors import GeometryError, LatticeError
from ..geometry import b_matrix, cell_volume
from ..nexus.geometry_io import read_cell, write_cell
from ..nexus.h5tools import read_field, write_field

logger = logging.getLogger(__name__)

__all__ = [
    "LatticeError",
    "Lattice",
    "CELL_NAMES",
    "CRYSTAL_SYSTEMS",
    "minimal_space_group",
    "read_lattice",
    "write_lattice",
]

CELL_NAMES: tuple[str, ...] = ("a", "b", "c", "alpha", "beta", "gamma")
"""Names of the six cell parameters, in order."""

CRYSTAL_SYSTEMS: tuple[str, ...] = (
    "triclinic",
    "monoclinic",
    "orthorhombic",
    "tetragonal",
    "rhombohedral",
    "hexagonal",
    "cubic",
)
"""Values of ``unit_cell_group`` (trigonal groups on hexagonal axes are 'hexagonal')."""

# Free cell parameters per lattice system (the unit_cell_group).
_FREE: dict[str, tuple[str, ...]] = {
    "triclinic": CELL_NAMES,
    "monoclinic": ("a", "b", "c", "beta"),
    "orthorhombic": ("a", "b", "c"),
    "tetragonal": ("a", "c"),
    "hexagonal": ("a", "c"),
    "rhombohedral": ("a", "alpha"),
    "cubic": ("a",),
}

# Lowest-symmetry space group of each (lattice system, centring) pair, used when a
# sample records only its crystal system and/or centring.
_MINIMAL: dict[tuple[str, str], str] = {
    ("triclinic", "P"): "P 1",
    ("monoclinic", "P"): "P 1 2 1",
    ("monoclinic", "C"): "C 1 2 1",
    ("monoclinic", "A"): "A 1 2 1",
    ("monoclinic", "I"): "I 1 2 1",
    ("orthorhombic", "P"): "P 2 2 2",
    ("orthorhombic", "A"): "A 2 2 2",
    ("orthorhombic", "B"): "B 2 2 2",
    ("orthorhombic", "C"): "C 2 2 2",
    ("orthorhombic", "I"): "I 2 2 2",
    ("orthorhombic", "F"): "F 2 2 2",
    ("tetragonal", "P"): "P 4",
    ("tetragonal", "I"): "I 4",
    ("hexagonal", "P"): "P 3",
    ("hexagonal", "R"): "R 3:H",
    ("rhombohedral", "P"): "R 3:R",
    ("rhombohedral", "R"): "R 3:R",
    ("cubic", "P"): "P 2 3",
    ("cubic", "I"): "I 2 3",
    ("cubic", "F"): "F 2 3",
}

# NXRefine's choice when only the centring is known (inventory §4).
_CENTRING_ONLY: dict[str, str] = {
    "P": "P 1",
    "A": "A m m 2",
    "B": "B m m 2",
    "C": "C 1 2 1",
    "I": "I 2 2 2",
    "F": "F 2 2 2",
    "R": "R 3:H",
}

_LENGTH_RTOL = 1e-4
_ANGLE_ATOL = 0.01


def _find_space_group(symbol: str | int) -> gemmi.SpaceGroup:
    """GEMMI space group from an H-M symbol (spaces optional), a number or ``"225"``."""
    if isinstance(symbol, int | np.integer):
        sg = gemmi.find_spacegroup_by_number(int(symbol))
    else:
        text = str(symbol).strip()
        if not text:
            raise LatticeError("empty space-group symbol")
        sg = (
            gemmi.find_spacegroup_by_number(int(text))
            if text.isdigit()
            else gemmi.find_spacegroup_by_name(text)
        )
    if sg is None:
        raise LatticeError(
            f"unknown space group {symbol!r}; give an H-M symbol such as 'Fm-3m', "
            "'P 1 21/c 1' or 'R-3m:H', or an International Tables number 1-230"
        )
    return sg


def _lattice_system(sg: gemmi.SpaceGroup) -> str:
    system = sg.crystal_system_str()
    if system == "trigonal":
        return "rhombohedral" if sg.ext == "R" else "hexagonal"
    return system


def minimal_space_group(crystal_system: str | None = None, centring: str | None = None) -> str:
    """Lowest-symmetry space group for a lattice system and centring.

    Parameters
    ----------
    crystal_system : str, optional
        One of :data:`CRYSTAL_SYSTEMS` (``trigonal`` is read as ``hexagonal``).
    centring : str, optional
        Lattice centring letter ``P, A, B, C, I, F, R``.

    Returns
    -------
    str
        An H-M symbol; NXRefine's choice (P1, Amm2, C121, I222, F222, R3) when the crystal
        system is unknown.

    Raises
    ------
    LatticeError
        If the combination does not exist (e.g. a face-centred tetragonal lattice).
    """
    cen = (centring or "P").strip().upper()[:1] or "P"
    if not crystal_system:
        if cen not in _CENTRING_ONLY:
            raise LatticeError(f"unknown lattice centring {centring!r}; use P, A, B, C, I, F or R")
        return _CENTRING_ONLY[cen]
    system = crystal_system.strip().lower()
    system = "hexagonal" if system == "trigonal" else system
    try:
        return _MINIMAL[(system, cen)]
    except KeyError:
        raise LatticeError(
            f"no {system} lattice with centring {cen!r}; choose a crystal system from "
            f"{', '.join(CRYSTAL_SYSTEMS)} and a centring that exists for it"
        ) from None


@dataclass(frozen=True)
class Lattice:
    """Unit cell plus space group.

    Parameters
    ----------
    a, b, c : float
        Cell lengths in Angstrom.
    alpha, beta, gamma : float
        Cell angles in degrees.
    space_group : str
        Hermann-Mauguin symbol (any spelling GEMMI accepts, or a number as text); stored
        normalised to GEMMI's extended H-M symbol.  Default ``"P 1"``.

    Raises
    ------
    LatticeError
        If the space group is unknown, the cell impossible, a monoclinic group is not in
        a *b*-unique setting, or the cell breaks the constraints of the crystal system
        (e.g. a cubic group with ``a != b``).

    Examples
    --------
    >>> lat = Lattice.from_space_group("Fm-3m", a=5.431)
    >>> lat.crystal_system, lat.laue_group, lat.centring, lat.free_parameters
    ('cubic', 'm-3m', 'F', ('a',))
    >>> bool(lat.is_allowed([1, 1, 1])), bool(lat.is_allowed([1, 0, 0]))
    (True, False)
    """

    a: float
    b: float
    c: float
    alpha: float = 90.0
    beta: float = 90.0
    gamma: float = 90.0
    space_group: str = "P 1"
    _sg: Any = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        for name in CELL_NAMES:
            object.__setattr__(self, name, float(getattr(self, name)))
        sg = _find_space_group(self.space_group)
        object.__setattr__(self, "_sg", sg)
        object.__setattr__(self, "space_group", sg.xhm())
        try:
            cell_volume(*self.cell)
        except GeometryError as exc:
            raise LatticeError(str(exc)) from None
        if sg.crystal_system_str() == "monoclinic" and sg.monoclinic_unique_axis() != "b":
            raise LatticeError(
                f"space group {sg.xhm()!r} is a {sg.monoclinic_unique_axis()}-unique setting; "
                "nxrefine-bs uses the b-unique setting (e.g. 'P 1 21/c 1'): relabel the axes"
            )
        problems = self._constraint_violations()
        if problems:
            raise LatticeError(
                f"cell {self.cell_text()} is inconsistent with {self.crystal_system} space group "
                f"{self.space_group!r}: {'; '.join(problems)}"
            )

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_space_group(
        cls,
        space_group: str | int,
        a: float,
        b: float | None = None,
        c: float | None = None,
        alpha: float | None = None,
        beta: float | None = None,
        gamma: float | None = None,
    ) -> Lattice:
        """Lattice from a space group (symbol or number) and its free cell parameters.

        Parameters fixed by the crystal system may be omitted: ``from_space_group(225,
        5.43)`` is cubic, ``from_space_group("P6_3/mmc", 3.2, c=5.2)`` hexagonal.
        """
        sg = _find_space_group(space_group)
        system = _lattice_system(sg)
        given = {"a": a, "b": b, "c": c, "alpha": alpha, "beta": beta, "gamma": gamma}
        missing = [n for n in _FREE[system] if given[n] is None]
        if missing:
            raise LatticeError(
                f"a {system} cell in {sg.xhm()!r} needs {', '.join(_FREE[system])}; "
                f"missing {', '.join(missing)}"
            )
        values = _apply_constraints(system, {k: v for k, v in given.items() if v is not None})
        return cls(*values, space_group=sg.xhm())

    @classmethod
    def from_cif(cls, path: str | os.PathLike[str], block: str | None = None) -> Lattice:
        """Read the cell and space group of a (small-molecule or mmCIF) CIF file with GEMMI.

        Parameters
        ----------
        path : path-like
            The CIF file.
        block : str, optional
            Data block name; default the first block that has a cell.
        """
        try:
            doc = gemmi.cif.read(str(path))
        except (RuntimeError, ValueError, OSError) as exc:
            raise LatticeError(f"cannot read CIF {path}: {exc}") from exc
        blocks = [doc.find_block(block)] if block else list(doc)
        cell_tags = [
            [f"_cell_length_{x}" for x in "abc"] + [f"_cell_angle_{x}" for x in CELL_NAMES[3:]],
            [f"_cell.length_{x}" for x in "abc"] + [f"_cell.angle_{x}" for x in CELL_NAMES[3:]],
        ]
        sg_tags = (
            "_space_group_name_H-M_alt",
            "_symmetry_space_group_name_H-M",
            "_symmetry.space_group_name_H-M",
            "_space_group.name_H-M_alt",
        )
        num_tags = (
            "_space_group_IT_number",
            "_symmetry_Int_Tables_number",
            "_space_group.IT_number",
        )
        for blk in blocks:
            if blk is None:
                continue
            for tags in cell_tags:
                values = [blk.find_value(t) for t in tags]
                if all(v is not None for v in values):
                    cell = [gemmi.cif.as_number(v) for v in values]
                    break
            else:
                continue
            symbol: str | None = None
            for tag in sg_tags:
                v = blk.find_value(tag)
                if v is not None and gemmi.cif.as_string(v).strip() not in ("", "?", "."):
                    symbol = gemmi.cif.as_string(v).strip()
                    break
            if symbol is None:
                for tag in num_tags:
                    v = blk.find_value(tag)
                    if v is not None and gemmi.cif.as_string(v).strip().isdigit():
                        symbol = gemmi.cif.as_string(v).strip()
                        break
            if symbol is None:
                raise LatticeError(f"CIF {path} block {blk.name!r} has a cell but no space group")
            if any(math.isnan(x) for x in cell):
                raise LatticeError(f"CIF {path} block {blk.name!r}: unreadable cell {values}")
            a, b, c, alpha, beta, gamma = cell
            return cls(a, b, c, alpha, beta, gamma, space_group=symbol)
        raise LatticeError(f"CIF {path} has no block with _cell_length_a..._cell_angle_gamma")

    # ------------------------------------------------------------------ symmetry
    @property
    def gemmi_space_group(self) -> gemmi.SpaceGroup:
        """The GEMMI space group object."""
        return self._sg

    @property
    def space_group_number(self) -> int:
        """International Tables number."""
        return int(self._sg.number)

    @property
    def crystal_system(self) -> str:
        """Lattice system stored as ``unit_cell_group``: one of :data:`CRYSTAL_SYSTEMS`."""
        return _lattice_system(self._sg)

    @property
    def laue_group(self) -> str:
        """Laue class, e.g. ``'m-3m'``, ``'4/mmm'``, ``'2/m'``."""
        return str(self._sg.laue_str())

    @property
    def centring(self) -> str:
        """Lattice centring letter (``R`` only for rhombohedral centring on hexagonal axes)."""
        return str(self._sg.centring_type())

    @property
    def n_lattice_points(self) -> int:
        """Lattice points per conventional cell (1, 2, 3 or 4)."""
        return len(self._sg.operations().cen_ops)

    @property
    def free_parameters(self) -> tuple[str, ...]:
        """Cell parameters free under the crystal-system constraints."""
        return _FREE[self.crystal_system]

    @property
    def free_values(self) -> NDArray[np.float64]:
        """Values of :attr:`free_parameters`."""
        return np.array([getattr(self, n) for n in self.free_parameters])

    @property
    def cell(self) -> tuple[float, float, float, float, float, float]:
        """``(a, b, c, alpha, beta, gamma)``."""
        return (self.a, self.b, self.c, self.alpha, self.beta, self.gamma)

    @property
    def volume(self) -> float:
        """Conventional cell volume in cubic Angstrom."""
        return cell_volume(*self.cell)

    @property
    def B(self) -> NDArray[np.float64]:
        """Busing-Levy B matrix (1/Angstrom, no 2 pi)."""
        return b_matrix(*self.cell)

    @cached_property
    def _rotations(self) -> NDArray[np.float64]:
        rots: list[NDArray[np.float64]] = []
        for op in self._sg.operations().sym_ops:
            w = np.array(op.rot, dtype=np.float64) / op.DEN
            if np.linalg.det(w) < 0:
                w = -w
            if not any(np.allclose(w, r) for r in rots):
                rots.append(w)
        return np.array(rots)

    def symmetry_rotations(self) -> NDArray[np.float64]:
        """Proper rotations of the Laue group acting on fractional coordinates, ``(n, 3, 3)``."""
        return self._rotations.copy()

    def cartesian_rotations(self) -> NDArray[np.float64]:
        """The Laue-group rotations as Cartesian matrices ``R`` in the crystal frame.

        ``U @ R`` describes the same crystal as ``U`` for every returned ``R``.
        """
        b = self.B
        binv_t = np.linalg.inv(b).T
        return np.einsum("ij,njk,kl->nil", binv_t, self._rotations, b.T)

    # ------------------------------------------------------------------ constraints
    def constrain(
        self, params: Mapping[str, float] | Sequence[float] | ArrayLike
    ) -> tuple[float, float, float, float, float, float]:
        """Full cell obeying the crystal-system constraints.

        Parameters
        ----------
        params : mapping or sequence
            A mapping may hold any cell parameters by name (missing free ones are taken
            from this lattice); a sequence holds the six parameters ``a..gamma``, of which
            only the free ones are used, or exactly the free parameters in order.

        Returns
        -------
        tuple of float
            ``(a, b, c, alpha, beta, gamma)``, e.g. for cubic ``(a, a, a, 90, 90, 90)``.
        """
        free = self.free_parameters
        if isinstance(params, Mapping):
            values = {n: float(params.get(n, getattr(self, n))) for n in free}
        else:
            arr = np.ravel(np.asarray(params, dtype=np.float64))
            if arr.size == 6:
                values = {n: float(arr[CELL_NAMES.index(n)]) for n in free}
            elif arr.size == len(free):
                values = {n: float(v) for n, v in zip(free, arr, strict=True)}
            else:
                raise LatticeError(
                    f"constrain() needs 6 cell parameters or the {len(free)} free ones "
                    f"({', '.join(free)}), got {arr.size}"
                )
        base = {n: getattr(self, n) for n in CELL_NAMES}
        base.update(values)
        return _apply_constraints(self.crystal_system, base)

    def with_cell(self, params: Mapping[str, float] | Sequence[float] | ArrayLike) -> Lattice:
        """A copy with a new (constrained) cell and the same space group."""
        return Lattice(*self.constrain(params), space_group=self.space_group)

    def _constraint_violations(self) -> list[str]:
        expected = _apply_constraints(
            self.crystal_system, {n: getattr(self, n) for n in CELL_NAMES}
        )
        out = []
        for name, want, have in zip(CELL_NAMES, expected, self.cell, strict=True):
            if name in ("a", "b", "c"):
                bad = abs(have - want) > _LENGTH_RTOL * want
            else:
                bad = abs(have - want) > _ANGLE_ATOL
            if bad:
                out.append(f"{name} must be {want:g}, not {have:g}")
        return out

    # ------------------------------------------------------------------ reflections
    def is_allowed(self, hkl: ArrayLike) -> NDArray[np.bool_] | bool:
        """True where reflection ``hkl`` is not systematically absent (GEMMI).

        Accepts one index triple (returns a bool) or an ``(n, 3)`` array.  Non-integer
        indices are rounded.  ``000`` is reported as not allowed.
        """
        arr = np.asarray(hkl)
        single = arr.ndim == 1
        h = np.rint(np.atleast_2d(arr)).astype(np.int32)
        if h.shape[-1] != 3:
            raise LatticeError(f"hkl must have shape (3,) or (n, 3), got {arr.shape}")
        ok = ~self._sg.operations().systematic_absences(np.ascontiguousarray(h))
        ok &= np.any(h != 0, axis=1)
        return bool(ok[0]) if single else ok

    def d_spacing(self, hkl: ArrayLike) -> NDArray[np.float64]:
        """d-spacings (Angstrom) of reflections ``hkl``."""
        h = np.atleast_2d(np.asarray(hkl, dtype=np.float64))
        with np.errstate(divide="ignore"):
            return 1.0 / np.linalg.norm(h @ self.B.T, axis=1)

    def allowed_reflections(self, d_min: float, *, unique: bool = False) -> NDArray[np.int32]:
        """Allowed reflections with ``d >= d_min``, sorted by decreasing d.

        Parameters
        ----------
        d_min : float
            Smallest d-spacing in Angstrom (``lambda / (2 sin(two_theta_max / 2))``).
        unique : bool
            If True, one representative per symmetry orbit (with Friedel mates merged);
            otherwise every index.
        """
        if d_min <= 0:
            raise LatticeError(f"d_min must be positive, got {d_min}")
        cell = gemmi.UnitCell(*self.cell)
        hkl = np.asarray(gemmi.make_miller_array(cell, self._sg, float(d_min), unique=unique))
        hkl = hkl[np.any(hkl != 0, axis=1)]
        d = self.d_spacing(hkl)
        order = np.lexsort((-hkl[:, 2], -hkl[:, 1], -hkl[:, 0], -np.round(d, 9)))
        return hkl[order].astype(np.int32)

    # ------------------------------------------------------------------ misc
    def cell_text(self) -> str:
        """Cell as compact text, e.g. ``'a=5.431 b=5.431 c=5.431 alpha=90 beta=90 gamma=90'``."""
        return " ".join(f"{n}={getattr(self, n):.6g}" for n in CELL_NAMES)

    def __str__(self) -> str:
        return f"{self.space_group} ({self.crystal_system}) {self.cell_text()}"


def _apply_constraints(
    system: str, values: Mapping[str, float]
) -> tuple[float, float, float, float, float, float]:
    v = {n: float(values[n]) if n in values and values[n] is not None else None for n in CELL_NAMES}
    a = v["a"]
    if a is None:
        raise LatticeError("cell parameter a is required")
    if system == "cubic":
        return (a, a, a, 90.0, 90.0, 90.0)
    if system == "tetragonal":
        return (a, a, _need(v, "c"), 90.0, 90.0, 90.0)
    if system == "hexagonal":
        return (a, a, _need(v, "c"), 90.0, 90.0, 120.0)
    if system == "rhombohedral":
        al = _need(v, "alpha")
        return (a, a, a, al, al, al)
    if system == "orthorhombic":
        return (a, _need(v, "b"), _need(v, "c"), 90.0, 90.0, 90.0)
    if system == "monoclinic":
        return (a, _need(v, "b"), _need(v, "c"), 90.0, _need(v, "beta"), 90.0)
    return tuple(_need(v, n) for n in CELL_NAMES)  # type: ignore[return-value]


def _need(values: Mapping[str, float | None], name: str) -> float:
    val = values.get(name)
    if val is None:
        raise LatticeError(f"cell parameter {name} is required")
    return float(val)


# ---------------------------------------------------------------------- NeXus I/O
def write_lattice(sample: h5py.Group, lattice: Lattice) -> None:
    """Store ``lattice`` in an NXsample group (``entry/sample``).

    Writes ``space_group``, ``laue_group``, ``unit_cell_group``, ``lattice_centring`` and
    ``unitcell_a`` ... ``unitcell_gamma``.
    """
    write_field(sample, "space_group", lattice.space_group)
    write_field(sample, "laue_group", lattice.laue_group)
    write_field(sample, "unit_cell_group", lattice.crystal_system)
    write_field(sample, "lattice_centring", lattice.centring)
    write_cell(sample, lattice.cell)


def read_lattice(sample: h5py.Group) -> Lattice:
    """Read the lattice stored in an NXsample group (or an entry holding ``sample``).

    When ``space_group`` is absent the lowest-symmetry group of the stored
    ``unit_cell_group`` and ``lattice_centring`` is used (see :func:`minimal_space_group`).

    Raises
    ------
    LatticeError
        If there is no cell, or the cell contradicts the space group; the message names
        the file and group.
    """
    grp = (
        sample["sample"]
        if "sample" in sample and isinstance(sample["sample"], h5py.Group)
        else sample
    )
    where = f"{grp.file.filename}:{grp.name}"
    cell = read_cell(grp)
    if cell is None:
        raise LatticeError(
            f"{where} has no unit cell (unitcell_a...unitcell_gamma); define the lattice first"
        )
    symbol = read_field(grp, "space_group")
    symbol = symbol.strip() if isinstance(symbol, str) else None
    if not symbol:
        system = read_field(grp, "unit_cell_group")
        centring = read_field(grp, "lattice_centring")
        symbol = minimal_space_group(
            system if isinstance(system, str) and system.strip() else None,
            centring if isinstance(centring, str) else None,
        )
        logger.debug("%s has no space group; using %s", where, symbol)
    try:
        a, b, c, alpha, beta, gamma = cell
        return Lattice(a, b, c, alpha, beta, gamma, space_group=symbol)
    except LatticeError as exc:
        raise LatticeError(f"{where}: {exc}") from None
