"""The refinement model: peak lists and the forward model ``q_crystal(parameters)``.

Model
-----
A peak at pixel ``(x, y)`` on frame ``z`` gives, through the geometry (conventions of
:mod:`nxrefine_bs.geometry`), the vector ``q_i = G(phi_i)^-1 q_lab(x_i, y_i)`` in the
crystal-rotation frame.  Its Miller indices are ``h_i = (U B)^-1 q_i`` and its assigned
reflection ``H_i = round(h_i)``.  The residual of a peak is the 3-vector

``r_i = q_i - U B H_i = U B (h_i - H_i)``     (1/Angstrom, no 2 pi)

whose length is NXRefine's ``diff = |B (h - round(h))|`` (inventory §5.5).  Using the
vector rather than its length keeps the problem smooth and gives three residuals per
peak; residuals are unweighted, as in NXRefine.

Parameters
----------
* orientation: a small rotation ``(u_x, u_y, u_z)`` (degrees, rotation vector in the
  crystal-rotation frame) applied to the current U, ``U <- R(u) U``, so U stays a rotation;
* lattice: the free cell parameters of the crystal system (:attr:`Lattice.free_parameters`);
* goniometer: ``chi, omega, theta``;
* detector: ``distance, beam_center_x, beam_center_y, yaw, pitch, roll``; ``wavelength``
  only on request.

Some combinations are exactly degenerate: a rotation of the goniometer about the phi
axis is the same as rotating U (e.g. ``theta`` when ``chi = -90`` and ``omega = 0``), and
a detector ``roll`` about the beam is the same as tilting the phi axis.  Such parameters
are detected from the Jacobian at the start (a parameter whose normalised Jacobian column
lies within 1e-4 of the span of higher-priority columns) and kept fixed; they are listed
in the report.  By default ``roll`` and ``wavelength`` are not refined.

Peaks are re-assigned (``H_i``) and re-selected (``diff <= hkl_tolerance`` and
``two_theta <= polar_max``) between cycles until the selection no longer changes.
Uncertainties are ``sqrt(diag((J^T J)^-1) * chi2_red)`` with ``chi2_red = sum r^2 /
(m - n)``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np
from numpy.typing import NDArray

from ..errors import ReductionError
from ..geometry import Geometry, b_matrix, rotation_x, rotation_y, rotation_z
from .lattice import Lattice
from .orient import orthogonalize

logger = logging.getLogger(__name__)

__all__ = [
    "ORIENTATION_PARAMETERS",
    "GEOMETRY_PARAMETERS",
    "DEFAULT_GEOMETRY_PARAMETERS",
    "UNITS",
    "PeakList",
    "read_peaks",
    "default_hkl_tolerance",
]

ORIENTATION_PARAMETERS: tuple[str, ...] = ("u_x", "u_y", "u_z")
GEOMETRY_PARAMETERS: tuple[str, ...] = (
    "distance",
    "beam_center_x",
    "beam_center_y",
    "yaw",
    "pitch",
    "roll",
    "wavelength",
    "chi",
    "omega",
    "theta",
)
"""Refinable geometry parameters, in the priority order used to resolve degeneracies."""
DEFAULT_GEOMETRY_PARAMETERS: tuple[str, ...] = (
    "distance",
    "beam_center_x",
    "beam_center_y",
    "yaw",
    "pitch",
    "chi",
    "omega",
    "theta",
)
_GONIOMETER = ("chi", "omega", "theta")
UNITS = {
    "u_x": "degree",
    "u_y": "degree",
    "u_z": "degree",
    "a": "angstrom",
    "b": "angstrom",
    "c": "angstrom",
    "alpha": "degree",
    "beta": "degree",
    "gamma": "degree",
    "distance": "mm",
    "beam_center_x": "pixel",
    "beam_center_y": "pixel",
    "yaw": "degree",
    "pitch": "degree",
    "roll": "degree",
    "wavelength": "angstrom",
    "chi": "degree",
    "omega": "degree",
    "theta": "degree",
}
_DEGENERACY_TOL = 1e-4


# ---------------------------------------------------------------------- peaks
@dataclass(frozen=True)
class PeakList:
    """Peak positions of one rotation: pixels ``x, y`` and fractional frame ``z``."""

    x: NDArray[np.float64]
    y: NDArray[np.float64]
    z: NDArray[np.float64]
    intensity: NDArray[np.float64] | None = None

    def __post_init__(self) -> None:
        arrs = [np.ravel(np.asarray(getattr(self, n), dtype=np.float64)) for n in "xyz"]
        if len({a.size for a in arrs}) != 1:
            raise ReductionError(f"peak arrays x, y, z differ in length: {[a.size for a in arrs]}")
        for n, a in zip("xyz", arrs, strict=True):
            object.__setattr__(self, n, a)
        if self.intensity is not None:
            inten = np.ravel(np.asarray(self.intensity, dtype=np.float64))
            object.__setattr__(self, "intensity", inten if inten.size == arrs[0].size else None)

    def __len__(self) -> int:
        return int(self.x.size)


def read_peaks(entry: h5py.Group) -> PeakList:
    """Read the ``peaks`` NXreflections group of an ``fN`` entry (non-finite rows dropped).

    Raises
    ------
    ReductionError
        If the entry has no peaks group or it lacks ``x``, ``y`` or ``z``.
    """
    where = f"{entry.file.filename}:{entry.name}"
    grp = entry.get("peaks")
    if not isinstance(grp, h5py.Group):
        raise ReductionError(f"{where} has no peaks group; run the 'find' step first")
    missing = [n for n in "xyz" if n not in grp]
    if missing:
        raise ReductionError(f"{where}/peaks lacks {', '.join(missing)}; rerun the 'find' step")
    x, y, z = (np.ravel(np.asarray(grp[n][()], dtype=np.float64)) for n in "xyz")
    inten = (
        np.ravel(np.asarray(grp["intensity"][()], dtype=np.float64)) if "intensity" in grp else None
    )
    if not (x.size == y.size == z.size):
        raise ReductionError(f"{where}/peaks: x, y, z have different lengths")
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(z)
    if inten is not None and inten.size == x.size:
        return PeakList(x[ok], y[ok], z[ok], inten[ok])
    return PeakList(x[ok], y[ok], z[ok])


def default_hkl_tolerance(lattice: Lattice) -> float:
    """NXRefine's 0.05 1/Angstrom, capped at a quarter of the shortest reciprocal axis."""
    rec = np.linalg.norm(lattice.B, axis=0)
    return float(min(0.05, 0.25 * rec.min()))


# ---------------------------------------------------------------------- the model
def _rodrigues(u_deg: NDArray[np.float64]) -> NDArray[np.float64]:
    v = np.radians(u_deg)
    ang = float(np.linalg.norm(v))
    if ang < 1e-15:
        return np.eye(3)
    k = v / ang
    kx = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + math.sin(ang) * kx + (1.0 - math.cos(ang)) * (kx @ kx)


class _Model:
    """Vectorised forward model ``q_crystal(params)`` for a fixed set of peaks."""

    def __init__(
        self,
        geometry: Geometry,
        lattice: Lattice,
        U: NDArray[np.float64],
        names: Sequence[str],
        peaks: PeakList,
    ) -> None:
        self.geometry = geometry
        self.lattice = lattice
        self.U0 = np.asarray(U, dtype=np.float64)
        self.names = list(names)
        self.x = peaks.x
        self.y = peaks.y
        phi = np.radians(geometry.phi(peaks.z))
        self.c, self.s = np.cos(phi), np.sin(phi)
        self.OT = geometry.O.T * geometry.pixel_size
        off = np.array([geometry.xs, geometry.ys, geometry.zs])
        self.off: NDArray[np.float64] | None = None
        if np.any(off):
            # Rz(phi) . offset for every peak; G(phi) off = M . that
            self.off = np.column_stack(
                [
                    self.c * off[0] - self.s * off[1],
                    self.s * off[0] + self.c * off[1],
                    np.full_like(self.c, off[2]),
                ]
            )
        self.base = {n: float(getattr(geometry, n)) for n in GEOMETRY_PARAMETERS}
        self.base.update(dict.fromkeys(ORIENTATION_PARAMETERS, 0.0))
        self.base.update({n: float(getattr(lattice, n)) for n in lattice.free_parameters})
        self.x0 = np.array([self.base[n] for n in self.names])

    def values(self, p: NDArray[np.float64]) -> dict[str, float]:
        v = dict(self.base)
        v.update(zip(self.names, (float(x) for x in p), strict=True))
        return v

    def ub(self, v: dict[str, float]) -> NDArray[np.float64]:
        cell = self.lattice.constrain(v)
        u = _rodrigues(np.array([v["u_x"], v["u_y"], v["u_z"]])) @ self.U0
        return u @ b_matrix(*cell)

    def q(self, v: dict[str, float], rows: NDArray[np.bool_] | slice = slice(None)) -> NDArray:
        dinv = rotation_x(v["roll"]) @ rotation_y(v["pitch"]) @ rotation_z(v["yaw"])
        e = dinv @ self.OT
        dx = self.x[rows] - v["beam_center_x"]
        dy = self.y[rows] - v["beam_center_y"]
        s = dx[:, None] * e[:, 0] + dy[:, None] * e[:, 1]
        s[:, 0] += v["distance"]
        m = rotation_y(v["theta"]) @ rotation_z(v["omega"]) @ rotation_x(v["chi"])
        if self.off is not None:
            s -= self.off[rows] @ m.T
        s /= np.linalg.norm(s, axis=1, keepdims=True)
        s[:, 0] -= 1.0
        w = (s @ m) / v["wavelength"]  # rows of M^T q_lab
        c, sn = self.c[rows], self.s[rows]
        out = np.empty_like(w)
        out[:, 0] = c * w[:, 0] + sn * w[:, 1]
        out[:, 1] = c * w[:, 1] - sn * w[:, 0]
        out[:, 2] = w[:, 2]
        return out

    def residual(self, p: NDArray, hint: NDArray, rows: NDArray[np.bool_]) -> NDArray:
        v = self.values(p)
        return (self.q(v, rows) - hint @ self.ub(v).T).ravel()

    def geometry_of(self, v: dict[str, float]) -> Geometry:
        return self.geometry.replace(**{n: v[n] for n in GEOMETRY_PARAMETERS})

    def lattice_of(self, v: dict[str, float]) -> Lattice:
        return self.lattice.with_cell(v)

    def U_of(self, v: dict[str, float]) -> NDArray[np.float64]:
        return orthogonalize(_rodrigues(np.array([v["u_x"], v["u_y"], v["u_z"]])) @ self.U0)


def _jacobian(fun: Any, x0: NDArray, f0: NDArray) -> NDArray:
    jac = np.empty((f0.size, x0.size))
    for j in range(x0.size):
        h = 1e-6 * max(1.0, abs(x0[j]))
        x = x0.copy()
        x[j] += h
        jac[:, j] = (fun(x) - f0) / h
    return jac


def _independent(jac: NDArray) -> list[int]:
    """Indices of columns not (nearly) in the span of the preceding kept columns."""
    basis: list[NDArray] = []
    keep: list[int] = []
    for j in range(jac.shape[1]):
        col = jac[:, j]
        nrm = np.linalg.norm(col)
        if nrm == 0 or not np.isfinite(nrm):
            continue
        v = col / nrm
        for b in basis:
            v = v - (b @ v) * b
        r = np.linalg.norm(v)
        if r < _DEGENERACY_TOL:
            continue
        basis.append(v / r)
        keep.append(j)
    return keep
