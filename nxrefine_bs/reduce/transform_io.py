"""Inputs and outputs of the transform: frame weights, pixel weights, transform files.

Output: ``<scan>/fN_transform.nxs`` (``fN_masked_transform.nxs``) with
``/entry/data/{v, n, Ql, Qk, Qh}`` (float32, ``[l, k, h]``), linked from the scan file
as ``fN/transform`` (``masked_transform``): ``data`` -> ``v``, ``weights`` -> ``n``, axes
``Ql, Qk, Qh`` with ``scaling_factor`` c*, b*, a* (1/Angstrom including 2 pi) and
attribute ``angles`` = (gamma*, beta*, alpha*).

Chunks are sized to the grid (:func:`grid_chunks`: edges of about 64 voxels that divide
each axis nearly evenly, instead of CCTW's fixed 50^3, which pads a 1001-point axis by
5 %); outputs may be compressed with any codec of :mod:`nxrefine_bs.nexus.codecs`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from numpy.typing import NDArray

from ..errors import DataLinkError, ReductionError
from ..geometry import Geometry, reciprocal_parameters
from ..nexus.codecs import compression_options
from ..nexus.h5tools import nx_group, read_field, write_external_link, write_field
from ..nexus.monitors import read_monitor
from ..nexus.safewrite import removing_on_error
from .accumulator import Accumulator, polarization_factor
from .grid import QGrid
from .parameters import resolve_frame_range

logger = logging.getLogger(__name__)

__all__ = [
    "CHUNK",
    "grid_chunks",
    "frame_weights",
    "scan_directory",
    "read_pixel_weight",
    "write_transform_file",
    "link_transform",
    "read_transform",
]

CHUNK = 64
"""Target output chunk edge (voxels); see :func:`grid_chunks`."""


def grid_chunks(shape: Sequence[int], target: int = CHUNK) -> tuple[int, ...]:
    """Chunk shape for a grid: per axis ``ceil(n / ceil(n / target))`` (little padding).

    Examples
    --------
    >>> grid_chunks((1001, 1001, 1001))
    (63, 63, 63)
    >>> grid_chunks((50, 161, 7))
    (50, 54, 7)
    """
    out = []
    for n in shape:
        n = max(1, int(n))
        pieces = max(1, math.ceil(n / target))
        out.append(math.ceil(n / pieces))
    return tuple(out)


def _where(scan_file: Path, entry: str) -> str:
    return f"{scan_file}:/{entry}"


def frame_weights(
    entry: h5py.Group,
    n_frames: int,
    *,
    norm: float | None = None,
    first: int | None = None,
    last: int | None = None,
    monitor: str | None = None,
) -> NDArray[np.float64]:
    """Per-frame weights: smoothed monitor / ``norm`` x transmission; 0 outside [first, last).

    The monitor is found as by every step
    (:func:`nxrefine_bs.nexus.monitors.read_monitor`: the ``monitor`` setting naming a
    channel, a group such as NXRefine's ``monitor1``, or ``instrument/logs/<name>``),
    divided by ``norm`` and smoothed.  Without ``norm`` the monitor is not used.
    Transmissions are ``instrument/attenuator/attenuator_transmission`` and
    ``instrument/filter/transmission`` (scalars or per frame) when present.  The frame
    range follows :func:`nxrefine_bs.reduce.parameters.resolve_frame_range`.
    """
    w = np.ones(n_frames, dtype=np.float64)
    if norm is not None:
        mon = read_monitor(entry, monitor, float(norm), n_frames)
        if mon is None:
            logger.warning(
                "%s:%s has no usable monitor %r for %d frames; not normalising",
                entry.file.filename,
                entry.name,
                monitor,
                n_frames,
            )
        else:
            w *= mon
    for path in ("instrument/attenuator/attenuator_transmission", "instrument/filter/transmission"):
        t = read_field(entry, path)
        if t is None:
            continue
        t = np.asarray(t, dtype=np.float64).ravel()
        if t.size == 1 or t.size == n_frames:
            w *= t if t.size == n_frames else float(t[0])
        else:
            logger.warning("%s has %d values for %d frames; ignored", path, t.size, n_frames)
    lo, hi = _frame_range(entry, n_frames, first, last)
    w[:lo] = 0.0
    w[hi:] = 0.0
    return w


def _frame_range(
    entry: h5py.Group, n_frames: int, first: int | None, last: int | None
) -> tuple[int, int]:
    """Frames ``[lo, hi)``: explicit values, else ``fN/data@first/last`` (NXRefine's nxmax)."""
    data = entry.get("data")
    if first is None and data is not None and "first" in data.attrs:
        first = int(data.attrs["first"])
    if last is None and data is not None and "last" in data.attrs:
        last = int(data.attrs["last"])
    lo, hi = resolve_frame_range(first, last, n_frames)
    if hi <= lo:
        raise ReductionError(
            f"{entry.file.filename}:{entry.name}: empty frame range first={first} last={last} "
            f"for {n_frames} frames"
        )
    return lo, hi


def scan_directory(scan_file: Path, raw_file: Path | None = None) -> Path:
    """The scan directory ``<label>/<scan>`` that holds derived files (created if needed).

    Derived from the scan-file name ``<sample>_<scan>.nxs``; if the file is not in an
    experiment tree, the directory of the raw data (or of the scan file) is used.
    """
    from ..errors import ExperimentError
    from ..experiment import ScanPaths

    try:
        path = ScanPaths.from_scan_file(scan_file).scan_dir
    except ExperimentError:
        path = raw_file.parent if raw_file is not None else scan_file.parent
    path.mkdir(parents=True, exist_ok=True)
    return path


def _external_target(scan_file: Path, group: h5py.Group, name: str) -> tuple[Path, str]:
    """Resolve the (relative) external link ``group[name]`` to ``(file, path)``."""
    link = group.get(name, getlink=True)
    if not isinstance(link, h5py.ExternalLink):
        raise DataLinkError(
            f"{scan_file}:{group.name}/{name} is not an external link to detector data"
        )
    target = Path(link.filename)
    if not target.is_absolute():
        target = scan_file.parent / target
    if not target.exists():
        raise DataLinkError(
            f"{scan_file}:{group.name}/{name} points at missing file {target}; "
            "check that the scan directory sits next to the scan file"
        )
    return target, link.path


def read_pixel_weight(entry: h5py.Group, geometry: Geometry, polarization: float) -> NDArray[Any]:
    """Polarization factor x (1 - pixel mask) of every pixel (float32)."""
    det = entry["instrument/detector"]
    pol = read_field(det, "polarization")
    if pol is not None and np.shape(pol) == tuple(geometry.shape):
        p = np.asarray(pol, dtype=np.float32)
    else:
        p = polarization_factor(geometry, polarization)
    mask = read_field(det, "pixel_mask")
    if mask is not None and np.shape(mask) == tuple(geometry.shape):
        p = np.where(np.asarray(mask) != 0, np.float32(0), p).astype(np.float32)
    return p


def _axis_attrs(name: str, scaling: float) -> dict[str, Any]:
    return {"long_name": f"{name.upper()} (r.l.u.)", "scaling_factor": scaling, "units": "rlu"}


def write_transform_file(
    path: Path,
    grid: QGrid,
    acc: Accumulator | None,
    *,
    arrays: dict[str, NDArray[np.float32]] | None = None,
    signal: str = "v",
    compression: str | None = None,
) -> None:
    """Write ``/entry/data/{v, n, Ql, Qk, Qh}`` (plus any extra ``arrays``) atomically.

    ``acc`` supplies ``v`` and ``n`` from its interleaved grid, slab by slab.  Chunks
    follow :func:`grid_chunks`; ``compression`` is a codec name of
    :func:`nxrefine_bs.nexus.codecs.compression_options` (None: uncompressed).
    """
    tmp = path.with_name(path.name + ".part")
    shape = grid.shape
    chunks = grid_chunks(shape)
    comp = compression_options(compression)
    with removing_on_error(tmp), h5py.File(tmp, "w") as f:
        f.attrs["default"] = "entry"
        entry = nx_group(f, "entry", "NXentry")
        entry.attrs["default"] = "data"
        data = nx_group(entry, "data", "NXdata")
        data.attrs["signal"] = signal
        data.attrs["axes"] = ["Ql", "Qk", "Qh"]
        for ax in reversed(grid.axes):
            write_field(data, f"Q{ax.name}", ax.values, attrs={"long_name": f"{ax.name.upper()}"})
        if acc is not None:
            dv = data.create_dataset("v", shape=shape, dtype=np.float32, chunks=chunks, **comp)
            dn = data.create_dataset("n", shape=shape, dtype=np.float32, chunks=chunks, **comp)
            g4 = acc.grid4
            for l0 in range(0, shape[0], chunks[0]):
                l1 = min(shape[0], l0 + chunks[0])
                dv[l0:l1] = np.ascontiguousarray(g4[l0:l1, :, :, 0])
                dn[l0:l1] = np.ascontiguousarray(g4[l0:l1, :, :, 1])
        for name, arr in (arrays or {}).items():
            data.create_dataset(name, data=arr, chunks=chunks, **comp)
    os.replace(tmp, path)


def link_transform(
    fe: h5py.Group,
    group: str,
    target: Path,
    grid: QGrid,
    cell: Sequence[float],
    *,
    signal_path: str = "/entry/data/v",
    weights_path: str | None = "/entry/data/n",
    title: str | None = None,
) -> h5py.Group:
    """Create ``fe/<group>`` NXdata linking a transform file (NXRefine layout).

    A rotation's transform links ``data`` -> ``v`` and ``weights`` -> ``n`` (the
    normalised intensity is ``data / weights``).  The combined ``entry/transform``
    links only ``data``, which is already normalised (NXRefine links the merged
    ``transform.nxs`` ``v`` alone): pass ``weights_path=None``.
    """
    if group in fe:
        del fe[group]
    grp = nx_group(fe, group, "NXdata")
    write_external_link(grp, "data", target, signal_path)
    if weights_path is not None:
        write_external_link(grp, "weights", target, weights_path)
    ast, bst, cst, alst, best, gast = reciprocal_parameters(*cell)
    scal = {"h": 2 * math.pi * ast, "k": 2 * math.pi * bst, "l": 2 * math.pi * cst}
    for ax in reversed(grid.axes):
        write_field(grp, f"Q{ax.name}", ax.values, attrs=_axis_attrs(ax.name, scal[ax.name]))
    grp.attrs["signal"] = "data"
    grp.attrs["axes"] = ["Ql", "Qk", "Qh"]
    grp.attrs["angles"] = np.array([gast, best, alst])
    if title:
        write_field(grp, "title", title)
    return grp


def read_transform(path: str | os.PathLike[str]) -> tuple[QGrid, h5py.File]:
    """Open a transform file; return its grid and the open file (caller closes it)."""
    from .grid import GridAxis

    f = h5py.File(path, "r")
    try:
        data = f["entry/data"]
        axes = []
        for name in ("h", "k", "l"):
            vals = np.asarray(data[f"Q{name}"][()], dtype=np.float64)
            step = float(vals[1] - vals[0]) if vals.size > 1 else 1.0
            axes.append(GridAxis(name, float(vals[0]), step, int(vals.size)))
    except (KeyError, IndexError) as exc:
        f.close()
        raise ReductionError(f"{path} is not a transform file ({exc})") from exc
    return QGrid(*axes), f
