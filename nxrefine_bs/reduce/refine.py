"""Reduction step ``refine`` (NXRefine's ``nxrefine``): orient, then refine lattice and geometry.

The step reads an entry's peaks, geometry and lattice, picks a starting orientation in the
setting of the parent scan or of ``f1`` (:mod:`nxrefine_bs.reduce.refine_start`), runs the
least squares (:mod:`nxrefine_bs.reduce.refine_fit`, model in
:mod:`nxrefine_bs.reduce.refine_model`), validates the result and writes it.  The names
of those modules used by callers are re-exported here.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import IndexingError, ReductionError, RefinementError, ScanFileError
from ..nexus.geometry_io import read_geometry, read_orientation, write_geometry, write_orientation
from ..nexus.h5tools import nx_group, write_field
from ..nexus.nxreduce import store_parameters
from ..nexus.provenance import now_iso, process_done, record_process
from ..nexus.scanfile import open_scan_file, update_scan_file
from .lattice import Lattice, LatticeError, read_lattice, write_lattice
from .orient import MIN_PEAKS, rotation_angle
from .refine_fit import RefinementResult, refine_peaks
from .refine_model import (
    DEFAULT_GEOMETRY_PARAMETERS,
    GEOMETRY_PARAMETERS,
    ORIENTATION_PARAMETERS,
    UNITS,
    PeakList,
    default_hkl_tolerance,
    read_peaks,
)
from .refine_start import reference_orientations, sibling_reference, starting_orientation
from .setting import closest_setting, format_operation

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
) -> dict[str, Any]:
    """Reduction step ``refine``: orient the crystal and refine lattice and geometry.

    Reads ``<entry>/peaks``, the geometry of ``<entry>`` and the lattice of
    ``entry/sample``.  The starting orientation is the first of the entry's own
    ``instrument/detector/orientation_matrix``, the parent scan's orientation of this
    entry, this scan's other rotations (``f1`` first) and the parent's other rotations
    that indexes at least half of ``min_indexed`` of the peaks; if none does, the peaks
    are indexed automatically (:func:`~nxrefine_bs.reduce.orient.auto_index`).  The
    starting U is then replaced by its equivalent (same peak positions, any rotation of
    the lattice's metric symmetry) closest to the first available of those references,
    so that every rotation and every child scan comes out in one setting
    (:mod:`nxrefine_bs.reduce.refine_start`).

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
        Largest two-theta (degrees) of peaks used.  Default (None, also an empty
        ``polar_max`` setting): every peak, so every indexed peak enters the fit
        (NXRefine's 10 degrees leaves most peaks of a large detector unused).
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
        ``setting`` (reference, the operation applied as a matrix, remaining angle),
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
    references = reference_orientations(path, entry)
    if start_lattice is None:
        start_lattice = references.parent_lattice
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
    u0, source, relation = starting_orientation(
        peaks,
        geometry,
        start_lattice,
        u_entry,
        references,
        tol=tol,
        min_fraction=0.5 * min_indexed,
        max_forbidden=max_forbidden,
        where=f"{path}:{entry}",
    )
    ref = references.first
    setting: dict[str, Any] = {"reference": ref.source if ref is not None else None}
    if relation is not None:
        setting["operation"] = format_operation(relation.operation)
        setting["in_laue_group"] = relation.in_laue_group
        setting["angle_to_reference"] = relation.angle

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
        "setting": setting,
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
        if ref is None or not ref.source.startswith("parent"):
            # A rotation refined meanwhile (concurrent tasks): join its setting.
            late = sibling_reference(f, entry)
            if late is not None:
                u_late, rel_late = closest_setting(result.U, late.U, result.lattice)
                if not rel_late.same_setting:
                    logger.info(
                        "%s: put in the setting of %s, refined meanwhile (%s)",
                        where,
                        late.source,
                        rel_late.describe(),
                    )
                    result = dataclasses.replace(result, U=u_late)
                    summary["U"] = result.U.tolist()
                    summary["orientation_change"] = rotation_angle(u0.T @ result.U)
                    setting.update(
                        reference=late.source,
                        operation=format_operation(rel_late.operation),
                        in_laue_group=rel_late.in_laue_group,
                        angle_to_reference=rel_late.angle,
                    )
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
        # the values asked for (None: every peak / the default tolerance), where NXRefine
        # reads them; the effective ones are in the NXprocess
        used = {"polar_max": polar_max, "hkl_tolerance": hkl_tolerance}
        store_parameters(f, {k: v for k, v in used.items() if v is not None})
        res_grp = nx_group(proc, "results", "NXparameters")
        for name in result.values:
            write_field(
                res_grp,
                name,
                float(result.values[name]),
                units=UNITS.get(name),
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
