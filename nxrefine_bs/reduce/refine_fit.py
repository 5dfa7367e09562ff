"""Least-squares refinement of lattice, orientation and diffractometer geometry.

:func:`refine_peaks` fits the model of :mod:`nxrefine_bs.reduce.refine_model` to a peak
list: peaks are (re-)assigned to the nearest reflection between cycles, degenerate
parameters are found from the Jacobian and kept fixed, outliers are clipped, and the
result (:class:`RefinementResult`) carries values, uncertainties and a fit report.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import least_squares

from ..errors import IndexingError, RefinementError
from ..geometry import Geometry, GeometryError
from .lattice import Lattice, LatticeError
from .orient import MIN_PEAKS, orthogonalize
from .refine_model import (
    _GONIOMETER,
    DEFAULT_GEOMETRY_PARAMETERS,
    GEOMETRY_PARAMETERS,
    ORIENTATION_PARAMETERS,
    UNITS,
    PeakList,
    _independent,
    _jacobian,
    _Model,
    default_hkl_tolerance,
)

logger = logging.getLogger(__name__)

__all__ = ["RefinementResult", "refine_peaks"]


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
                f"    {n:14s} = {self.values[n]:.8g} +/- {self.errors[n]:.3g} {UNITS.get(n, '')}"
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
