"""Least-squares refinement of lattice, orientation and diffractometer geometry (``nxrefine``).

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
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import least_squares

from ..errors import IndexingError, ReductionError, RefinementError, ScanFileError
from ..geometry import Geometry, GeometryError, b_matrix, rotation_x, rotation_y, rotation_z
from ..nexus.geometry_io import read_geometry, read_orientation, write_geometry, write_orientation
from ..nexus.h5tools import nx_group, write_field
from ..nexus.provenance import now_iso, process_done, record_process
from ..nexus.scanfile import open_scan_file, update_scan_file
from .lattice import Lattice, LatticeError, read_lattice, write_lattice
from .orient import MIN_PEAKS, auto_index, orthogonalize, peak_vectors, rotation_angle

logger = logging.getLogger(__name__)

__all__ = [
    "PROCESS",
    "ORIENTATION_PARAMETERS",
    "GEOMETRY_PARAMETERS",
    "DEFAULT_GEOMETRY_PARAMETERS",
    "PeakList",
    "RefinementResult",
    "read_peaks",
    "default_hkl_tolerance",
    "refine_peaks",
    "run",
]

PROCESS = "nxrefine"
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
_UNITS = {
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
        if np.any(off):
            # Rz(phi) . offset for every peak; G(phi) off = M . that
            self.off = np.column_stack(
                [
                    self.c * off[0] - self.s * off[1],
                    self.s * off[0] + self.c * off[1],
                    np.full_like(self.c, off[2]),
                ]
            )
        else:
            self.off = None
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


# ---------------------------------------------------------------------- results
@dataclass(frozen=True)
class RefinementResult:
    """Outcome of :func:`refine_peaks`.

    Attributes
    ----------
    geometry, lattice, U :
        Refined geometry, lattice and orientation matrix.
    parameters : tuple of str
        Names of the refined parameters.
    values, errors, initial : dict
        Final values, standard uncertainties and starting values of the refined
        parameters (orientation ``u_*`` are the rotation applied to the starting U).
    degenerate : tuple of str
        Requested parameters kept fixed because they are degenerate with others.
    n_peaks, n_used, n_indexed, n_fit, n_forbidden : int
        Peaks offered, peaks inside ``polar_max``, indexed peaks (``diff <=
        hkl_tolerance``), peaks in the final fit (indexed, outliers clipped), indexed
        peaks at systematically absent positions.
    indexed_fraction : float
        ``n_indexed / n_used``.
    hkl_tolerance, polar_max : float
        Selection limits (1/Angstrom, degrees).
    rms_residual : float
        RMS of ``diff`` over the indexed peaks (1/Angstrom).
    rms_hkl : float
        RMS of ``h - round(h)`` over the indexed peaks (r.l.u.).
    chi2_red : float
        ``sum r^2 / (m - n)``.
    hkl : numpy.ndarray
        Fractional indices of every peak (n_peaks, 3).
    diff : numpy.ndarray
        ``|B (h - round(h))|`` of every peak.
    indexed : numpy.ndarray
        Mask of the indexed peaks.
    cycles, nfev : int
        Assignment cycles and function evaluations.
    success : bool
        True if every least-squares cycle converged.
    message : str
        Last optimiser message.
    """

    geometry: Geometry
    lattice: Lattice
    U: NDArray[np.float64]
    parameters: tuple[str, ...]
    values: dict[str, float]
    errors: dict[str, float]
    initial: dict[str, float]
    degenerate: tuple[str, ...]
    n_peaks: int
    n_used: int
    n_indexed: int
    n_fit: int
    n_forbidden: int
    indexed_fraction: float
    hkl_tolerance: float
    polar_max: float
    rms_residual: float
    rms_hkl: float
    chi2_red: float
    hkl: NDArray[np.float64] = field(repr=False)
    diff: NDArray[np.float64] = field(repr=False)
    indexed: NDArray[np.bool_] = field(repr=False)
    cycles: int = 0
    nfev: int = 0
    success: bool = True
    message: str = ""

    @property
    def ub(self) -> NDArray[np.float64]:
        """``U @ B`` of the refined model."""
        return self.U @ self.lattice.B

    def report(self) -> str:
        """Human-readable fit report."""
        lines = [
            "[[Fit Statistics]]",
            f"    success            = {self.success} ({self.message})",
            f"    cycles / nfev      = {self.cycles} / {self.nfev}",
            f"    peaks offered      = {self.n_peaks}",
            f"    peaks <= polar_max = {self.n_used} (polar_max {self.polar_max:.4g} deg)",
            f"    peaks indexed      = {self.n_indexed} ({100 * self.indexed_fraction:.2f}%, "
            f"hkl_tolerance {self.hkl_tolerance:.4g} 1/A)",
            f"    peaks in last fit  = {self.n_fit}",
            f"    forbidden indexed  = {self.n_forbidden}",
            f"    rms diff           = {self.rms_residual:.4g} 1/A",
            f"    rms hkl error      = {self.rms_hkl:.4g} r.l.u.",
            f"    reduced chi-square = {self.chi2_red:.4g}",
            "[[Variables]]",
        ]
        for n in self.parameters:
            lines.append(
                f"    {n:14s} = {self.values[n]:.8g} +/- {self.errors[n]:.3g} {_UNITS.get(n, '')}"
                f" (init = {self.initial[n]:.8g})"
            )
        if self.degenerate:
            lines.append("[[Fixed (degenerate with other parameters)]]")
            lines.extend(f"    {n}" for n in self.degenerate)
        lines.append(f"[[Lattice]]\n    {self.lattice}")
        lines.append("[[Orientation matrix U]]")
        lines.extend("    " + " ".join(f"{v: .8f}" for v in row) for row in self.U)
        return "\n".join(lines) + "\n"


def _resolve_parameters(
    lattice: Lattice,
    parameters: Sequence[str] | None,
    refine_lattice: bool,
    refine_geometry: bool,
) -> list[str]:
    if parameters is None:
        names = list(ORIENTATION_PARAMETERS)
        if refine_lattice:
            names += list(lattice.free_parameters)
        names += list(DEFAULT_GEOMETRY_PARAMETERS if refine_geometry else _GONIOMETER)
        return names
    wanted: list[str] = []
    for n in parameters:
        if n in ("orientation", "U"):
            wanted += list(ORIENTATION_PARAMETERS)
        elif n == "lattice":
            wanted += list(lattice.free_parameters)
        elif n == "goniometer":
            wanted += list(_GONIOMETER)
        elif n == "detector":
            wanted += ["distance", "beam_center_x", "beam_center_y", "yaw", "pitch", "roll"]
        else:
            wanted.append(n)
    allowed = set(ORIENTATION_PARAMETERS) | set(GEOMETRY_PARAMETERS) | set(lattice.free_parameters)
    bad = [n for n in wanted if n not in allowed]
    if bad:
        raise RefinementError(
            f"cannot refine {', '.join(bad)}; choose from {', '.join(sorted(allowed))} "
            f"(free cell parameters of a {lattice.crystal_system} lattice: "
            f"{', '.join(lattice.free_parameters)})"
        )
    order = list(ORIENTATION_PARAMETERS) + list(lattice.free_parameters) + list(GEOMETRY_PARAMETERS)
    return [n for n in order if n in set(wanted)]


def refine_peaks(
    peaks: PeakList,
    geometry: Geometry,
    lattice: Lattice,
    U: ArrayLike,
    *,
    parameters: Sequence[str] | None = None,
    refine_lattice: bool = True,
    refine_geometry: bool = True,
    hkl_tolerance: float | None = None,
    polar_max: float | None = None,
    clip_sigma: float | None = 5.0,
    max_cycles: int = 8,
) -> RefinementResult:
    """Refine orientation, lattice and geometry against a peak list.

    Parameters
    ----------
    peaks : PeakList
        Peak positions.
    geometry : Geometry
        Starting geometry.
    lattice : Lattice
        Starting lattice (its space group sets the cell constraints).
    U : array_like
        Starting orientation matrix.
    parameters : sequence of str, optional
        Parameters to refine (names from :data:`ORIENTATION_PARAMETERS`,
        :data:`GEOMETRY_PARAMETERS` and the free cell parameters, or the groups
        ``orientation``, ``lattice``, ``goniometer``, ``detector``).  Default:
        orientation, the free cell parameters (if ``refine_lattice``), ``chi, omega,
        theta`` and, if ``refine_geometry``, :data:`DEFAULT_GEOMETRY_PARAMETERS`.
    refine_lattice, refine_geometry : bool
        Used only when ``parameters`` is None.
    hkl_tolerance : float, optional
        Largest ``|B (h - round(h))|`` (1/Angstrom) of a peak used in the fit; default
        :func:`default_hkl_tolerance`.
    polar_max : float, optional
        Largest two-theta (degrees) of a peak used; default all.
    clip_sigma : float or None
        After the first cycle, peaks whose ``diff`` exceeds this many robust standard
        deviations (per component) are left out of the fit (spurious peaks that happen to
        fall near a reflection); None keeps every peak within ``hkl_tolerance``.
    max_cycles : int
        Most assignment/fit cycles.

    Returns
    -------
    RefinementResult

    Raises
    ------
    IndexingError
        Fewer than :data:`MIN_PEAKS` peaks can be indexed.
    RefinementError
        Invalid parameter names, a failed optimisation or an impossible result.
    """
    names = _resolve_parameters(lattice, parameters, refine_lattice, refine_geometry)
    tol = float(hkl_tolerance) if hkl_tolerance is not None else default_hkl_tolerance(lattice)
    u0 = orthogonalize(np.asarray(U, dtype=np.float64))
    n_peaks = len(peaks)
    if n_peaks < MIN_PEAKS:
        raise IndexingError(f"only {n_peaks} peaks; refinement needs at least {MIN_PEAKS}")
    tth = geometry.two_theta(peaks.x, peaks.y)
    pmax = float(polar_max) if polar_max is not None else float(np.nanmax(tth)) + 1e-6
    inside = tth <= pmax
    n_used = int(inside.sum())
    if n_used < MIN_PEAKS:
        raise IndexingError(
            f"only {n_used} peaks have two-theta <= polar_max = {pmax:g} deg; "
            f"need at least {MIN_PEAKS} (raise polar_max)"
        )
    model = _Model(geometry, lattice, u0, names, peaks)

    def assign(model: _Model, p: NDArray) -> tuple[NDArray, NDArray, NDArray, NDArray]:
        v = model.values(p)
        ub = model.ub(v)
        hkl = model.q(v) @ np.linalg.inv(ub).T
        hint = np.rint(hkl)
        diff = np.linalg.norm((hkl - hint) @ ub.T, axis=1)  # = |B (h - H)|
        use = inside & (diff <= tol) & np.any(hint != 0, axis=1)
        return hkl, hint, diff, use

    def clip(diff: NDArray, use: NDArray) -> NDArray:
        """Drop outliers: ``diff`` above ``clip_sigma`` robust standard deviations."""
        if clip_sigma is None or use.sum() < 2 * MIN_PEAKS:
            return use
        # diff is the length of a 3-D residual: median = 1.538 sigma per component.
        sigma = float(np.median(diff[use])) / 1.538
        return use & (diff <= clip_sigma * sigma)

    initial = {n: model.base[n] for n in names}
    p = model.x0.copy()
    active = list(range(len(names)))
    degenerate: tuple[str, ...] = ()
    prev_use: NDArray | None = None
    nfev = 0
    n_fit = 0
    cycles = 0
    success = True
    message = ""
    res = None
    for cycle in range(max_cycles):
        hkl_now, hint, diff_now, use = assign(model, p)
        if cycle > 0:
            use = clip(diff_now, use)
        if use.sum() < MIN_PEAKS:
            raise IndexingError(
                f"only {int(use.sum())} of {n_used} peaks index within {tol:.3g} 1/A with the "
                f"current model; need at least {MIN_PEAKS}"
            )
        if prev_use is not None and np.array_equal(use, prev_use):
            break
        prev_use = use
        n_fit = int(use.sum())
        cycles = cycle + 1
        h_use = hint[use]
        if cycle == 0:
            # Degeneracies from the noise-free model: with the observed fractional
            # indices the residual is exactly zero at the start, so its Jacobian holds
            # only model derivatives (no contamination by the residuals themselves).
            full = p.copy()
            h_frac = hkl_now[use]

            def f_all(x: NDArray, h_frac: NDArray = h_frac, use: NDArray = use) -> NDArray:
                return model.residual(x, h_frac, use)

            jac0 = _jacobian(f_all, full, f_all(full))
            active = _independent(jac0)
            degenerate = tuple(names[j] for j in range(len(names)) if j not in active)
            if degenerate:
                logger.info("fixed degenerate parameters: %s", ", ".join(degenerate))
        if 3 * int(use.sum()) <= len(active):
            raise IndexingError(
                f"{int(use.sum())} indexed peaks cannot determine {len(active)} parameters"
            )

        def fun(
            xa: NDArray,
            h_use: NDArray = h_use,
            use: NDArray = use,
            active: list[int] = active,
            p: NDArray = p,
        ) -> NDArray:
            x = p.copy()
            x[active] = xa
            return model.residual(x, h_use, use)

        try:
            res = least_squares(fun, p[active], method="lm", x_scale="jac")
        except (ValueError, np.linalg.LinAlgError, GeometryError) as exc:
            raise RefinementError(f"least-squares refinement failed: {exc}") from exc
        nfev += int(res.nfev)
        success = success and bool(res.success)
        message = str(res.message)
        if not np.all(np.isfinite(res.x)):
            raise RefinementError("least-squares refinement diverged (non-finite parameters)")
        p[active] = res.x
    assert res is not None
    hkl, hint, diff, use = assign(model, p)
    v = model.values(p)
    try:
        geom = model.geometry_of(v)
        lat = model.lattice_of(v)
    except (GeometryError, LatticeError) as exc:
        raise RefinementError(f"refinement produced an impossible model: {exc}") from exc
    u = model.U_of(v)
    # Uncertainties from the Jacobian of the last fit.
    m = res.fun.size
    n = len(active)
    dof = max(1, m - n)
    chi2_red = float(2.0 * res.cost / dof)
    jac = res.jac
    try:
        cov = np.linalg.pinv(jac.T @ jac) * chi2_red
        err_active = np.sqrt(np.clip(np.diag(cov), 0, None))
    except np.linalg.LinAlgError:
        err_active = np.full(n, np.nan)
    errors = dict.fromkeys(names, 0.0)
    for k, j in enumerate(active):
        errors[names[j]] = float(err_active[k])
    values = {nm: v[nm] for nm in names}
    allowed = lat.is_allowed(hint[use]) if use.any() else np.zeros(0, bool)
    n_indexed = int(use.sum())
    frac_err = (hkl - hint)[use]
    result = RefinementResult(
        geometry=geom,
        lattice=lat,
        U=u,
        parameters=tuple(names[j] for j in active),
        values={nm: values[nm] for nm in names if nm not in degenerate},
        errors={nm: errors[nm] for nm in names if nm not in degenerate},
        initial={nm: initial[nm] for nm in names if nm not in degenerate},
        degenerate=degenerate,
        n_peaks=n_peaks,
        n_used=n_used,
        n_indexed=n_indexed,
        n_fit=n_fit,
        n_forbidden=int((~np.asarray(allowed)).sum()),
        indexed_fraction=n_indexed / n_used,
        hkl_tolerance=tol,
        polar_max=pmax,
        rms_residual=float(np.sqrt(np.mean(diff[use] ** 2))) if n_indexed else float("nan"),
        rms_hkl=float(np.sqrt(np.mean(frac_err**2))) if n_indexed else float("nan"),
        chi2_red=chi2_red,
        hkl=hkl,
        diff=diff,
        indexed=use,
        cycles=cycles,
        nfev=nfev,
        success=success,
        message=message,
    )
    logger.info(
        "refined %d parameters on %d/%d peaks (%.1f%% indexed), rms diff %.3g 1/A",
        len(active),
        n_indexed,
        n_used,
        100 * result.indexed_fraction,
        result.rms_residual,
    )
    return result


# ---------------------------------------------------------------------- the step
def _parent_values(scan_file: Path, entry: str) -> tuple[NDArray | None, Lattice | None, str]:
    """Orientation matrix and lattice of ``entry`` in the parent scan, if there is one."""
    try:
        from ..nexus.scanfile import find_parent  # written by another module; may be absent
    except ImportError:
        logger.debug("nexus.scanfile.find_parent not available; no parent orientation")
        return None, None, ""
    try:
        parent = find_parent(scan_file)
    except (ScanFileError, OSError) as exc:  # a broken parent must not stop the step
        logger.warning("cannot locate the parent of %s: %s", scan_file, exc)
        return None, None, ""
    if parent is None or Path(parent).resolve() == Path(scan_file).resolve():
        return None, None, ""
    try:
        with open_scan_file(parent) as f:
            u = read_orientation(f[entry]) if entry in f else None
            lat = None
            if "entry/sample" in f:
                try:
                    lat = read_lattice(f["entry/sample"])
                except LatticeError:
                    lat = None
    except (OSError, KeyError) as exc:
        logger.warning("cannot read parent %s: %s", parent, exc)
        return None, None, ""
    return u, lat, str(parent)


def _initial_fraction(
    peaks: PeakList, geometry: Geometry, lattice: Lattice, u: NDArray, tol: float
) -> float:
    q = peak_vectors(geometry, peaks.x, peaks.y, peaks.z)
    ub = u @ lattice.B
    hkl = q @ np.linalg.inv(ub).T
    diff = np.linalg.norm((hkl - np.rint(hkl)) @ lattice.B.T, axis=1)
    return float(np.mean(diff <= tol))


def run(
    scan_file: str | Path,
    entry: str,
    *,
    polar_max: float | None = None,
    hkl_tolerance: float | None = None,
    refine_geometry: bool = True,
    lattice: bool | Lattice | None = None,
    overwrite: bool = False,
    progress: bool = False,
    parameters: Sequence[str] | None = None,
    min_indexed: float = 0.7,
    max_forbidden: float = 0.1,
    max_cell_change: float = 0.05,
    **_: Any,
) -> dict[str, Any]:
    """Reduction step ``refine``: orient the crystal and refine lattice and geometry.

    Reads ``<entry>/peaks``, the geometry of ``<entry>`` and the lattice of
    ``entry/sample``.  The starting orientation is, in order, the entry's own
    ``instrument/detector/orientation_matrix``, the parent scan's (when
    ``nexus.scanfile.find_parent`` exists and finds one), or automatic indexing
    (:func:`~nxrefine_bs.reduce.orient.auto_index`).  A starting U that indexes fewer
    than half of ``min_indexed`` of the peaks (before refinement) is replaced by
    automatic indexing.

    Everything is computed and validated before the file is opened for writing, so a
    failure leaves earlier results untouched.  On success the step writes U
    (``instrument/detector/orientation_matrix``), the refined geometry, the refined
    lattice (``entry/sample``) and the NXprocess ``nxworkflow/nxrefine`` (parameters, a
    ``results`` NXparameters group with values and uncertainties, a JSON summary and
    the fit report).

    Parameters
    ----------
    scan_file : path
        Scan file ``<sample>_<scan>.nxs``.
    entry : str
        Rotation entry, e.g. ``"f1"``.
    polar_max : float, optional
        Largest two-theta (degrees) of peaks used; default all.
    hkl_tolerance : float, optional
        Largest ``|B (h - round(h))|`` (1/Angstrom) of an indexed peak; default
        :func:`default_hkl_tolerance` (NXRefine's 0.05 capped at a quarter of the
        shortest reciprocal axis).
    refine_geometry : bool
        Also refine the detector (distance, beam centre, yaw, pitch); the goniometer
        angles and the orientation are always refined.
    lattice : bool or Lattice, optional
        True/None: refine the free cell parameters (NXRefine ``--lattice``); False: keep
        the cell fixed; a :class:`Lattice`: use it instead of ``entry/sample`` (and refine).
    overwrite : bool
        Redo the step if ``nxrefine`` was already recorded.
    progress : bool
        Unused (the step takes well under a second).
    parameters : sequence of str, optional
        Explicit parameter list (see :func:`refine_peaks`); overrides ``refine_geometry``.
    min_indexed : float
        Smallest acceptable indexed fraction after refinement.
    max_forbidden : float
        Largest acceptable fraction of indexed peaks at systematically absent positions.
    max_cell_change : float
        Largest acceptable relative change of a cell length.

    Returns
    -------
    dict
        Summary: ``status`` (``"done"`` or ``"skipped"``), ``orientation_source``,
        ``indexed_fraction``, ``n_peaks``, ``n_indexed``, ``cell``, ``U``, ``values``,
        ``errors``, ``rms_residual``...

    Raises
    ------
    IndexingError
        Too few peaks, no orientation indexes the peaks, too few peaks indexed after
        refinement, or too many forbidden reflections.
    RefinementError
        The least squares failed or gave an implausible cell.
    ReductionError, ScanFileError
        Missing entry, peaks, geometry or lattice.
    """
    del progress
    start = now_iso()
    t0 = time.perf_counter()
    path = Path(scan_file)
    if not path.is_file():
        raise ScanFileError(f"scan file {path} does not exist")
    parent_lattice: Lattice | None = None
    with open_scan_file(path) as f:
        fe = f.get(entry)
        if not isinstance(fe, h5py.Group):
            raise ScanFileError(f"{path} has no entry {entry!r}")
        if process_done(fe, PROCESS) and not overwrite:
            logger.info("%s:%s already refined; use overwrite=True to redo", path, entry)
            return {"status": "skipped", "entry": entry, "reason": "nxrefine already done"}
        peaks = read_peaks(fe)
        geometry = read_geometry(fe)
        phi_end = None
        gon_phi = fe.get("instrument/goniometer/phi")
        if gon_phi is not None and "end" in gon_phi.attrs:
            phi_end = float(gon_phi.attrs["end"])
        u_entry = read_orientation(fe)
        sample = fe.get("sample")
        if sample is None:
            sample = f.get("entry/sample")
        lat_error: LatticeError | None = None
        start_lattice: Lattice | None = None
        if isinstance(lattice, Lattice):
            start_lattice = lattice
        elif sample is not None:
            try:
                start_lattice = read_lattice(sample)
            except LatticeError as exc:
                lat_error = exc
    u_parent, parent_lattice, parent_name = (None, None, "")
    if u_entry is None or start_lattice is None:
        u_parent, parent_lattice, parent_name = _parent_values(path, entry)
    if start_lattice is None:
        start_lattice = parent_lattice
    if start_lattice is None:
        raise ReductionError(
            f"{path}:{entry}: no usable lattice in entry/sample"
            + (f" ({lat_error})" if lat_error else "")
            + "; define the cell and space group first"
        )
    refine_lattice = lattice is not False
    tol = (
        float(hkl_tolerance) if hkl_tolerance is not None else default_hkl_tolerance(start_lattice)
    )
    if len(peaks) < MIN_PEAKS:
        raise IndexingError(
            f"{path}:{entry} has only {len(peaks)} peaks; refinement needs at least {MIN_PEAKS} "
            "(lower the peak-search threshold)"
        )

    # Starting orientation: entry -> parent -> automatic indexing.
    u0: NDArray | None = None
    source = ""
    for cand, name in ((u_entry, "entry"), (u_parent, f"parent {parent_name}")):
        if cand is None:
            continue
        frac = _initial_fraction(peaks, geometry, start_lattice, orthogonalize(cand), tol)
        if frac >= 0.5 * min_indexed:
            u0, source = orthogonalize(cand), name
            break
        logger.warning(
            "%s:%s: the %s orientation indexes only %.0f%% of the peaks; trying others",
            path,
            entry,
            name,
            100 * frac,
        )
    if u0 is None:
        q = peak_vectors(geometry, peaks.x, peaks.y, peaks.z)
        try:
            idx = auto_index(q, start_lattice, max_forbidden=max_forbidden)
        except IndexingError as exc:
            raise IndexingError(f"{path}:{entry}: automatic indexing failed: {exc}") from None
        u0, source = idx.U, "auto-indexing"

    try:
        result = refine_peaks(
            peaks,
            geometry,
            start_lattice,
            u0,
            parameters=parameters,
            refine_lattice=refine_lattice,
            refine_geometry=refine_geometry,
            hkl_tolerance=tol,
            polar_max=polar_max,
        )
    except IndexingError as exc:
        raise IndexingError(f"{path}:{entry}: {exc}") from None
    except RefinementError as exc:
        raise RefinementError(f"{path}:{entry}: {exc}") from None

    # Validate everything before writing anything.
    where = f"{path}:{entry}"
    if not result.success:
        raise RefinementError(f"{where}: refinement did not converge ({result.message})")
    if result.indexed_fraction < min_indexed:
        raise IndexingError(
            f"{where}: only {result.n_indexed} of {result.n_used} peaks "
            f"({100 * result.indexed_fraction:.1f}%) index within {result.hkl_tolerance:.3g} 1/A "
            f"after refinement (need {100 * min_indexed:.0f}%); the crystal may be twinned, "
            "have changed phase, or the peak list may be mostly spurious"
        )
    if result.n_forbidden > max_forbidden * max(1, result.n_indexed):
        raise IndexingError(
            f"{where}: {result.n_forbidden} of {result.n_indexed} indexed peaks are "
            f"systematically absent in {start_lattice.space_group!r}; check the space group"
        )
    rel = np.abs(np.array(result.lattice.cell[:3]) / np.array(start_lattice.cell[:3]) - 1.0)
    if rel.max() > max_cell_change:
        raise RefinementError(
            f"{where}: refined cell {result.lattice.cell_text()} differs from the starting cell "
            f"{start_lattice.cell_text()} by {100 * rel.max():.1f}% (limit "
            f"{100 * max_cell_change:.0f}%); check the lattice or suspect a phase transition"
        )

    summary: dict[str, Any] = {
        "status": "done",
        "entry": entry,
        "orientation_source": source,
        "n_peaks": result.n_peaks,
        "n_used": result.n_used,
        "n_indexed": result.n_indexed,
        "n_fit": result.n_fit,
        "indexed_fraction": result.indexed_fraction,
        "n_forbidden": result.n_forbidden,
        "hkl_tolerance": result.hkl_tolerance,
        "polar_max": result.polar_max,
        "rms_residual": result.rms_residual,
        "rms_hkl": result.rms_hkl,
        "chi2_red": result.chi2_red,
        "space_group": result.lattice.space_group,
        "cell": list(result.lattice.cell),
        "U": result.U.tolist(),
        "values": result.values,
        "errors": result.errors,
        "degenerate": list(result.degenerate),
        "orientation_change": rotation_angle(u0.T @ result.U),
    }
    with update_scan_file(path) as f:
        fe = f[entry]
        write_orientation(fe, result.U)
        write_geometry(fe, result.geometry, phi_end=phi_end)
        sample = fe.get("sample")
        if sample is None:
            sample = nx_group(nx_group(f, "entry", "NXentry"), "sample", "NXsample")
        write_lattice(sample, result.lattice)
        proc = record_process(
            fe,
            PROCESS,
            parameters={
                "polar_max": result.polar_max,
                "hkl_tolerance": result.hkl_tolerance,
                "refine_geometry": bool(refine_geometry),
                "refine_lattice": bool(refine_lattice),
                "refined_parameters": list(result.parameters),
                "orientation_source": source,
                "min_indexed": float(min_indexed),
            },
            start_time=start,
            summary=summary,
            note=result.report(),
        )
        res_grp = nx_group(proc, "results", "NXparameters")
        for name in result.values:
            write_field(
                res_grp,
                name,
                float(result.values[name]),
                units=_UNITS.get(name),
                attrs={"uncertainty": float(result.errors[name])},
            )
        write_field(res_grp, "indexed_fraction", float(result.indexed_fraction))
        write_field(res_grp, "n_indexed", np.int64(result.n_indexed))
        write_field(res_grp, "rms_residual", float(result.rms_residual), units="1/angstrom")
        write_field(res_grp, "orientation_matrix", result.U)
    logger.info(
        "%s: refined (%s start) in %.2f s: %.1f%% of %d peaks indexed, cell %s",
        where,
        source,
        time.perf_counter() - t0,
        100 * result.indexed_fraction,
        result.n_used,
        result.lattice.cell_text(),
    )
    return summary
