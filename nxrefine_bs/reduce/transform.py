"""Transform a rotation scan into reciprocal space (``nxtransform`` / ``nxmasked_transform``).

Every pixel ``(x, y)`` of every frame ``z`` of rotation ``fN`` is mapped to Miller
indices with the full geometry of :class:`~nxrefine_bs.geometry.Geometry` (detector
orientation and tilts, goniometer ``theta, omega, chi, phi``, sample offset) and the
orientation matrix ``UB``, exactly as :meth:`Geometry.pixel_to_hkl`, and added to the
*nearest* voxel of an ``[l, k, h]`` grid (see :mod:`nxrefine_bs.reduce.grid`).

Accumulation (the CCTW semantics with ``--normalization 0``)::

    v[voxel] += counts(x, y, z)
    n[voxel] += w_frame(z) * P(x, y)

with ``w_frame = smoothed monitor / norm x attenuator/filter transmission`` (1 without
``norm``; 0 outside ``[first, last)``) and ``P`` the pixel polarization factor (pyFAI
convention).  ``v / n`` (where ``n > 0``) is then the normalised intensity
``S(Q) = <counts / (w_frame P)>`` averaged over every pixel that fell in the voxel.
Pixels are skipped, contributing to neither array, when the pixel mask is set, the
counts are negative (detector gaps, -1) or NaN, the frame weight is 0, the 3-D mask is
set (masked transform), or the voxel lies outside the grid.

The step is split over four modules: the numba kernel
(:mod:`~nxrefine_bs.reduce.transform_kernel`), the grid accumulator and per-pixel
geometry (:mod:`~nxrefine_bs.reduce.accumulator`), inputs and transform files
(:mod:`~nxrefine_bs.reduce.transform_io`) and this one, which runs the step: it chooses
and checks the grid (:func:`~nxrefine_bs.reduce.grid.grid_budget` states the grid,
memory and output size and refuses a grid that does not fit), streams the frames (read
ahead and decompressed in background threads, :mod:`~nxrefine_bs.reduce.framestream`)
into the accumulator with one thread per core by default, and writes and links the
result.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from numpy.typing import NDArray
from tqdm import tqdm

from ..errors import FileExistsNXError, ReductionError
from ..nexus.codecs import ChunkReader, ensure_plugins
from ..nexus.geometry_io import read_cell, read_geometry, read_ub
from ..nexus.h5tools import read_field, write_field
from ..nexus.nxreduce import store_parameters
from ..nexus.provenance import now_iso, process_done, record_process
from ..nexus.scanfile import open_scan_file, update_scan_file
from .accumulator import (
    Accumulator,
    frame_matrices,
    pixel_hkl,
    pixel_vectors,
    polarization_factor,
)
from .framestream import available_cores, open_frames
from .grid import grid_budget, make_grid
from .parameters import settings_values
from .transform_io import (
    CHUNK,
    _external_target,
    _where,
    frame_weights,
    grid_chunks,
    link_transform,
    read_pixel_weight,
    read_transform,
    scan_directory,
    write_transform_file,
)
from .transform_kernel import scatter_block

logger = logging.getLogger(__name__)

__all__ = [
    "run",
    "transform_threads",
    "Accumulator",
    "polarization_factor",
    "pixel_vectors",
    "frame_matrices",
    "pixel_hkl",
    "frame_weights",
    "read_transform",
    "write_transform_file",
    "link_transform",
    "read_pixel_weight",
    "scan_directory",
    "grid_chunks",
    "scatter_block",
    "CHUNK",
]

BLOCK_FRAMES = 16
"""Frames per block of the blocked kernel (performance-baselines §2d: 16-32)."""

MAX_THREADS = 8
"""Most kernel threads chosen by default."""


def transform_threads(nthreads: int | None = None) -> int:
    """Kernel threads: ``nthreads`` if given (>= 1), else one per available core (max 8)."""
    if nthreads is None or int(nthreads) <= 0:
        return min(MAX_THREADS, available_cores())
    return int(nthreads)


def _accumulate(
    acc: Accumulator,
    scan_file: Path,
    entry: str,
    mask_file: Path | None,
    mask_path: str,
    weights: NDArray[np.float64],
    lo: int,
    hi: int,
    block_frames: int,
    progress: bool,
) -> None:
    """Stream frames ``[lo, hi)`` (and their 3-D mask) into ``acc`` in blocks.

    Frames come from :func:`open_frames` (read ahead, decompressed in background
    threads); a block of ``block_frames`` frames is assembled for the kernel.
    """
    ny, nx = acc.geometry.shape
    mf = h5py.File(mask_file, "r") if mask_file is not None else None
    try:
        mreader = ChunkReader(mf[mask_path]) if mf is not None else None
        with open_frames(scan_file, entry) as stream:
            buf = np.empty((block_frames, ny, nx), dtype=stream.dtype)
            mbuf = np.empty((block_frames, ny, nx), dtype=np.int8) if mreader else None
            filled, b0 = 0, lo
            with tqdm(
                total=hi - lo, disable=not progress, desc=f"{entry} transform", unit="frame"
            ) as bar:
                for start, block in stream.blocks(lo, hi):
                    k = block.shape[0]
                    pos = 0
                    while pos < k:
                        take = min(k - pos, block_frames - filled)
                        buf[filled : filled + take] = block[pos : pos + take]
                        filled += take
                        pos += take
                        if filled == block_frames or start + pos == hi:
                            m3 = None
                            if mreader is not None and mbuf is not None:
                                mreader.read(mbuf, b0, b0 + filled)
                                m3 = mbuf[:filled]
                            acc.add(buf[:filled], b0, weights[b0 : b0 + filled], m3)
                            bar.update(filled)
                            b0 += filled
                            filled = 0
    finally:
        if mf is not None:
            mf.close()


# ----------------------------------------------------------------------------- step
def run(
    scan_file: str | os.PathLike[str],
    entry: str,
    *,
    qh: Sequence[float] | None = None,
    qk: Sequence[float] | None = None,
    ql: Sequence[float] | None = None,
    mask: bool = False,
    first: int | None = None,
    last: int | None = None,
    norm: float | None = None,
    monitor: str | None = None,
    polarization: float = 0.99,
    nthreads: int | None = None,
    block_frames: int = BLOCK_FRAMES,
    compression: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Transform rotation ``entry`` (``f1``...) of ``scan_file`` into an HKL grid.

    Parameters
    ----------
    scan_file : path-like
        The scan file ``<sample>_<scan>.nxs``.
    entry : str
        Rotation entry, e.g. ``"f1"``.
    qh, qk, ql : (min, step, max), optional
        Grid axes in r.l.u.; any not given follows the data
        (:func:`~nxrefine_bs.reduce.grid.data_grid`).  A grid that would not fit in
        memory or on disk is refused before anything is allocated.
    mask : bool
        Apply the 3-D mask of ``nxprepare_mask`` (writes the *masked* transform).
    first, last : int, optional
        Frames ``first <= z < last`` (default: ``fN/data`` attributes written by the
        ``max`` step, else :func:`~nxrefine_bs.reduce.parameters.resolve_frame_range`).
    norm : float, optional
        Monitor normalisation; frames are weighted by the smoothed monitor / norm.
    monitor : str, optional
        Monitor channel or group (see :mod:`nxrefine_bs.nexus.monitors`).
    polarization : float
        pyFAI polarization factor used if the entry has no ``polarization`` array.
    nthreads : int, optional
        Threads of the race-free banded kernel (1 = serial; default: one per core).
    block_frames : int
        Frames per kernel block.
    compression : str, optional
        Compress ``v`` and ``n`` with this codec (``gzip``, ``lz4``, ``bslz4``, ``zstd``...;
        see :func:`nxrefine_bs.nexus.codecs.compression_options`).
    overwrite : bool
        Redo a completed transform and replace its file.
    progress : bool
        Show a progress bar.

    Returns
    -------
    dict
        Summary: ``status``, ``file``, ``grid``, ``frames``, ``pixels``, ``counts``,
        ``seconds``, ``mpix_per_s``, ``threads``, ``memory_gb``, ``output_gb``.

    Raises
    ------
    ReductionError
        No orientation matrix or unit cell, missing 3-D mask, bad grid or frame range.
    FileExistsNXError
        An output file exists without a completion record and ``overwrite`` is False.
    """
    scan_file = Path(scan_file)
    process = "nxmasked_transform" if mask else "nxtransform"
    group_name = "masked_transform" if mask else "transform"
    start_time = now_iso()
    with open_scan_file(scan_file) as f:
        if entry not in f:
            raise ReductionError(f"{scan_file} has no entry {entry!r}")
        fe = f[entry]
        raw_file, raw_path = _external_target(scan_file, fe["data"], "data")
        out = scan_directory(scan_file, raw_file) / f"{entry}_{group_name}.nxs"
        if process_done(fe, process) and not overwrite:
            logger.info("%s already done; use overwrite=True to redo it", _where(scan_file, entry))
            return {"status": "skipped", "entry": entry, "file": str(out)}
        if out.exists() and not overwrite:
            raise FileExistsNXError(
                f"{out} exists but {_where(scan_file, entry)} has no {process} record; "
                "rerun with overwrite=True to replace it"
            )
        ub = read_ub(fe)
        cell = read_cell(fe)
        if cell is None:
            raise ReductionError(
                f"{_where(scan_file, entry)} has no unit cell (sample/unitcell_*); "
                "set the lattice parameters first"
            )
        if ub is None:
            raise ReductionError(
                f"{_where(scan_file, entry)} has no orientation matrix "
                "(instrument/detector/orientation_matrix); run the 'refine' step first"
            )
        geometry = read_geometry(fe)
        pixel_weight = read_pixel_weight(fe, geometry, polarization)
        mask_file: Path | None = None
        mask_path = ""
        if mask:
            if not process_done(fe, "nxprepare_mask") or "data_mask" not in fe["data"]:
                raise ReductionError(
                    f"{_where(scan_file, entry)} has no 3-D mask; run the 'prepare' step "
                    "before a masked transform"
                )
            mask_file, mask_path = _external_target(scan_file, fe["data"], "data_mask")
    ensure_plugins()
    with h5py.File(raw_file, "r") as rf:
        raw = rf[raw_path]
        n_frames = raw.shape[0]
        itemsize = raw.dtype.itemsize
        if tuple(raw.shape[1:]) != tuple(geometry.shape):
            raise ReductionError(
                f"{raw_file}:{raw_path} frames {raw.shape[1:]} != detector shape {geometry.shape}"
            )
    with open_scan_file(scan_file) as f:
        weights = frame_weights(
            f[entry], n_frames, norm=norm, first=first, last=last, monitor=monitor
        )
    lo = int(np.argmax(weights > 0)) if (weights > 0).any() else 0
    hi = int(len(weights) - np.argmax(weights[::-1] > 0)) if (weights > 0).any() else 0
    grid = make_grid(geometry, cell, qh=qh, qk=qk, ql=ql, ub=ub, frames=(lo, max(hi, lo + 1)))
    bf = max(1, int(block_frames))
    budget = grid_budget(
        grid,
        out.parent,
        frame_shape=tuple(geometry.shape),  # type: ignore[arg-type]
        frame_itemsize=itemsize,
        buffered_frames=3 * bf,
        compressed=compression is not None,
    )
    threads = transform_threads(nthreads)
    plan = (
        f"{_where(scan_file, entry)}: transforming frames {lo}..{hi - 1} with {threads} "
        f"thread(s); {budget.describe()}"
    )
    logger.info("%s", plan)
    if progress:  # the command line shows progress bars, not INFO logs: state it there
        tqdm.write(plan, file=sys.stderr)
    t0 = time.perf_counter()
    acc = Accumulator(grid, geometry, ub, pixel_weight, nthreads=threads)
    try:
        _accumulate(acc, scan_file, entry, mask_file, mask_path, weights, lo, hi, bf, progress)
        t_kernel = time.perf_counter() - t0
        write_transform_file(out, grid, acc, compression=compression)
    finally:
        acc.close()
    seconds = time.perf_counter() - t0
    npix = (hi - lo) * geometry.shape[0] * geometry.shape[1]
    summary = {
        "status": "done",
        "entry": entry,
        "file": str(out),
        "grid": [list(a.as_range()) for a in grid.axes],
        "frames": [lo, hi],
        "pixels": int(acc.added),
        "counts": float(acc.total),
        "seconds": round(seconds, 3),
        "mpix_per_s": round(npix / max(t_kernel, 1e-9) / 1e6, 2),
        "threads": acc.nthreads,
        **budget.as_dict(),
    }
    with update_scan_file(scan_file) as f:
        fe = f[entry]
        write_field(fe["data"], "monitor_weight", weights, attrs={"axes": "frame_number"})
        sample = read_field(fe, "sample/name") or "sample"
        link_transform(fe, group_name, out, grid, cell, title=f"{sample} {entry} Transform")
        record_process(
            fe,
            process,
            parameters={
                "qh": list(grid.h.as_range()),
                "qk": list(grid.k.as_range()),
                "ql": list(grid.l.as_range()),
                "mask": bool(mask),
                "first": lo,
                "last": hi,
                "norm": norm,
                "monitor": monitor,
                "polarization": polarization,
                "nthreads": acc.nthreads,
                "compression": compression,
            },
            start_time=start_time,
            summary=summary,
        )
        used = {"first": lo, "last": hi, "norm": norm, "monitor": monitor}
        store_parameters(f, settings_values("transform", used))  # where NXRefine reads them
    logger.info(
        "%s: %d pixels in %.1f s (%.1f Mpix/s) -> %s",
        _where(scan_file, entry),
        acc.added,
        seconds,
        summary["mpix_per_s"],
        out,
    )
    return summary
