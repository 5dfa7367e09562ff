"""A small crystal model for simulations: unit cell, centring, atoms and orientation.

Intensities are kinematic: ``|F(hkl)|^2`` from point atoms with a Gaussian form factor
and an isotropic Debye-Waller factor, so lattice centring produces the right systematic
absences and intensities fall off with |Q| as they do in real data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..geometry import GeometryError, b_matrix, random_rotation

__all__ = ["SimCrystal", "CENTRING_TRANSLATIONS"]

CENTRING_TRANSLATIONS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "P": ((0, 0, 0),),
    "A": ((0, 0, 0), (0, 0.5, 0.5)),
    "B": ((0, 0, 0), (0.5, 0, 0.5)),
    "C": ((0, 0, 0), (0.5, 0.5, 0)),
    "I": ((0, 0, 0), (0.5, 0.5, 0.5)),
    "F": ((0, 0, 0), (0, 0.5, 0.5), (0.5, 0, 0.5), (0.5, 0.5, 0)),
    "R": ((0, 0, 0), (2 / 3, 1 / 3, 1 / 3), (1 / 3, 2 / 3, 2 / 3)),
}


@dataclass(frozen=True)
class SimCrystal:
    """A simulated single crystal.

    Parameters
    ----------
    cell : tuple of float
        ``(a, b, c, alpha, beta, gamma)`` in Angstrom and degrees.
    U : array_like, shape (3, 3)
        Orientation matrix (rotation).
    centring : str
        Lattice centring ``P, A, B, C, I, F`` or ``R`` (obverse, hexagonal axes).
    atoms : tuple of (x, y, z, Z)
        Atoms of the asymmetric motif in fractional coordinates with atomic number
        ``Z``; each is repeated by the centring translations.
    b_iso : float
        Isotropic displacement parameter B in square Angstrom.
    """

    cell: tuple[float, float, float, float, float, float]
    U: NDArray[np.float64] = field(default_factory=lambda: np.eye(3))
    centring: str = "P"
    atoms: tuple[tuple[float, float, float, float], ...] = ((0.0, 0.0, 0.0, 30.0),)
    b_iso: float = 0.5

    def __post_init__(self) -> None:
        if self.centring not in CENTRING_TRANSLATIONS:
            raise GeometryError(
                f"unknown centring {self.centring!r}; use one of {''.join(CENTRING_TRANSLATIONS)}"
            )
        u = np.asarray(self.U, dtype=np.float64)
        if u.shape != (3, 3) or not np.allclose(u @ u.T, np.eye(3), atol=1e-8):
            raise GeometryError("U must be a 3x3 rotation matrix")
        object.__setattr__(self, "U", u)
        object.__setattr__(self, "cell", tuple(float(v) for v in self.cell))
        b_matrix(*self.cell)  # validates the cell

    @classmethod
    def random(
        cls,
        cell: tuple[float, float, float, float, float, float],
        *,
        centring: str = "P",
        seed: int = 0,
        n_atoms: int = 2,
    ) -> SimCrystal:
        """A crystal with a random (seeded) orientation and motif of ``n_atoms`` atoms."""
        rng = np.random.default_rng(seed)
        atoms = [(0.0, 0.0, 0.0, 40.0)]
        for _ in range(max(0, n_atoms - 1)):
            x, y, z = rng.uniform(0, 1, 3)
            atoms.append((float(x), float(y), float(z), float(rng.integers(8, 30))))
        return cls(cell=cell, U=random_rotation(rng), centring=centring, atoms=tuple(atoms))

    @property
    def B(self) -> NDArray[np.float64]:
        """Busing-Levy B matrix."""
        return b_matrix(*self.cell)

    @property
    def UB(self) -> NDArray[np.float64]:
        """Orientation matrix times B."""
        return self.U @ self.B

    def allowed(self, hkl: ArrayLike) -> NDArray[np.bool_]:
        """True where the lattice centring allows reflection ``hkl``."""
        hkl = np.atleast_2d(np.asarray(hkl, dtype=np.float64))
        phase = np.zeros(len(hkl), dtype=complex)
        for t in CENTRING_TRANSLATIONS[self.centring]:
            phase += np.exp(2j * np.pi * (hkl @ np.asarray(t)))
        return np.abs(phase) > 0.5

    def intensity(self, hkl: ArrayLike) -> NDArray[np.float64]:
        """Kinematic ``|F(hkl)|^2`` (electrons^2), zero for systematic absences."""
        hkl = np.atleast_2d(np.asarray(hkl, dtype=np.float64))
        s2 = np.sum((hkl @ self.B.T) ** 2, axis=1) / 4.0  # (sin(theta)/lambda)^2
        f = np.zeros(len(hkl), dtype=complex)
        for t in CENTRING_TRANSLATIONS[self.centring]:
            for x, y, z, Z in self.atoms:
                pos = np.array([x, y, z]) + np.asarray(t)
                form = Z * np.exp(-10.0 * s2)  # crude Gaussian atomic form factor
                f += form * np.exp(2j * np.pi * (hkl @ pos))
        return np.abs(f) ** 2 * np.exp(-2.0 * self.b_iso * s2)
