"""3-D mask around Bragg peaks (``nxprepare_mask``).

Bragg reflections leave halos in a CdTe sensor (Compton scattering, fluorescence) that
must not be transformed with the diffuse scattering.  They are found, as NXRefine does
(inventory §5.6), from the difference of consecutive frames:

1. ``D_k = frame[k+1] - frame[k]`` (masked pixels and detector gaps set to 0);
2. ``m1 = |box_mean(D_k, h1 x h1)| >= t1`` (edge-padded box filter);
3. across detector gaps (rows or columns masked over the whole detector), ``m1`` takes
   the larger value of the rows/columns on either side, so that the next step is
   continuous across a gap;
4. ``m2 = box_sum(m1, h2 x h2) > t2``: with ``t2 < 1`` this dilates ``m1`` by ``h2 // 2``
   pixels (a pixel is masked if any pixel of ``m1`` lies in its ``h2 x h2`` box).  The
   inventory calls this filter a "local mean"; a mean of a binary mask above 0.8 would
   instead *erase* every blob smaller than 80 % of the 51 x 51 box, so the filter is
   read here as the dilation it is meant to be;
5. frame ``j`` is masked where ``m2[j-1]`` or ``m2[j]`` is set (a change into or out of
   the frame); frames before ``first`` or after ``last`` are fully masked.

Implementation: one numba pass per frame pair (:func:`change_mask`).  Both box filters
are separable running sums (cost independent of ``h1``/``h2``): the vertical sum of
``D_k`` is rolled down the detector one row at a time, computing ``D_k`` on the fly from
the two frames, and the horizontal sum is rolled along each row and thresholded at
once, so ``D_k`` and the filtered image are never stored.  The sums are exact (float64
sums of integer counts) where :func:`scipy.ndimage.uniform_filter` rounds a running
mean in float32; the dilation only visits rows near a set pixel of ``m1``.  The scipy
implementation is kept as :func:`frame_difference_mask_reference`; the tests check that
both give identical masks.

Frames are streamed with :func:`~nxrefine_bs.reduce.framestream.open_frames` (read ahead
and decompressed in background threads; the previous frame is kept for the difference),
so memory is a few frames.  The mask is written to ``<scan>/fN_mask.nxs`` as int8
``/entry/mask`` with the raw data's frame shape as chunks (gzip level 1, it is mostly
zeros; the chunks are compressed in a writer thread and stored with
``write_direct_chunk``) and linked from the scan file as ``fN/data/data_mask``.  The raw
data are opened read-only and never written.
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import h5py
import numba
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage
from tqdm import tqdm

from ..errors import FileExistsNXError, PathSafetyError, ReductionError
from ..nexus.h5tools import nx_group, read_field, write_external_link
from ..nexus.nxreduce import store_parameters
from ..nexus.provenance import now_iso, process_done, record_process
from ..nexus.safewrite import ensure_free_space, removing_on_error
from ..nexus.scanfile import open_scan_file, update_scan_file
from .framestream import FrameStream, open_frames
from .parameters import resolve_frame_range, settings_values
from .transform import _external_target, scan_directory

logger = logging.getLogger(__name__)

__all__ = [
    "run",
    "change_mask",
    "frame_difference_mask",
    "frame_difference_mask_reference",
    "fill_gaps",
    "gap_runs",
]

PROCESS = "nxprepare_mask"
BLOCK_FRAMES = 10


def gap_runs(pixel_mask: NDArray[Any], axis: int) -> list[tuple[int, int]]:
    """Runs ``[a, b)`` of rows (``axis=0``) or columns (``axis=1``) masked everywhere."""
    full = np.asarray(np.asarray(pixel_mask != 0).all(axis=1 - axis), dtype=bool)
    runs: list[tuple[int, int]] = []
    i, n = 0, full.size
    while i < n:
        if full[i]:
            j = i
            while j < n and full[j]:
                j += 1
            runs.append((i, j))
            i = j
        else:
            i += 1
    return runs


def fill_gaps(
    m: NDArray[np.bool_], rows: list[tuple[int, int]], cols: list[tuple[int, int]]
) -> NDArray[np.bool_]:
    """Set gap rows/columns of ``m`` to the max of their neighbours on both sides (in place)."""
    ny, nx = m.shape
    for a, b in rows:
        nb = [m[i] for i in (a - 1, b) if 0 <= i < ny]
        if nb:
            m[a:b] = np.logical_or.reduce(nb)[None, :]
    for a, b in cols:
        nb = [m[:, i] for i in (a - 1, b) if 0 <= i < nx]
        if nb:
            m[:, a:b] = np.logical_or.reduce(nb)[:, None]
    return m


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _box_threshold(f0, f1, bad, h1, limit, m1):  # pragma: no cover - compiled
    """``m1 = |box_sum(D, h1 x h1)| >= limit`` with edge padding; returns the set count.

    ``D = f1 - f0`` (0 where ``bad``, either count is negative/NaN, or ``D`` is not
    finite) is computed one detector row at a time into a small ring of rows (each row
    once).  ``colsum[x]`` holds the sum of ``D`` over the rows of the current window
    (rows clipped to the detector = edge padding) and is rolled down one row at a time;
    each row's horizontal window sum is rolled along ``x`` and thresholded at once.
    """
    ny, nx = f0.shape
    lo = h1 // 2
    hi = h1 - lo - 1
    nring = h1 + 2
    ring = np.empty((nring, nx), dtype=np.float64)
    held = np.full(nring, -1, dtype=np.int64)  # detector row held by each ring slot
    colsum = np.zeros(nx, dtype=np.float64)
    for k in range(-lo, hi + 1):
        row = _d_row(f0, f1, bad, min(max(k, 0), ny - 1), ring, held)
        for x in range(nx):
            colsum[x] += row[x]
    nset = 0
    for y in range(ny):
        if y > 0:
            ra = min(y + hi, ny - 1)
            rs = max(y - lo - 1, 0)
            if ra != rs:
                add = _d_row(f0, f1, bad, ra, ring, held)
                sub = _d_row(f0, f1, bad, rs, ring, held)
                for x in range(nx):
                    colsum[x] += add[x] - sub[x]
        s = 0.0
        for k in range(-lo, hi + 1):
            s += colsum[min(max(k, 0), nx - 1)]
        for x in range(nx):
            if x > 0:
                s += colsum[min(x + hi, nx - 1)] - colsum[max(x - lo - 1, 0)]
            hit = abs(s) >= limit
            m1[y, x] = hit
            nset += hit
    return nset


@numba.njit(inline="always", boundscheck=False)
def _d_row(f0, f1, bad, r, ring, held):  # pragma: no cover - compiled
    """Row ``r`` of ``D`` from the ring, computed on first use."""
    slot = r % ring.shape[0]
    out = ring[slot]
    if held[slot] != r:
        for x in range(f0.shape[1]):
            a = np.float64(f0[r, x])
            b = np.float64(f1[r, x])
            d = b - a
            ok = (not bad[r, x]) and a >= 0.0 and b >= 0.0 and abs(d) < np.inf
            out[x] = d if ok else 0.0
        held[slot] = r
    return out


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _dilate(m1, h2, limit, out):  # pragma: no cover - compiled
    """``out = box_sum(m1, h2 x h2) > limit`` with zero padding; returns the set count.

    Rows whose vertical window holds no set pixel are zero without any work.
    """
    ny, nx = m1.shape
    lo = h2 // 2
    hi = h2 - lo - 1
    rowcount = np.zeros(ny, dtype=np.int64)
    for y in range(ny):
        c = 0
        for x in range(nx):
            c += m1[y, x]
        rowcount[y] = c
    col = np.zeros(nx, dtype=np.int64)
    window = 0  # set pixels in the rows of the vertical window
    for k in range(0, min(hi, ny - 1) + 1):
        if rowcount[k]:
            window += rowcount[k]
            for x in range(nx):
                col[x] += m1[k, x]
    nset = 0
    for y in range(ny):
        if y > 0:
            ra = y + hi
            rs = y - lo - 1
            if ra < ny and rowcount[ra]:
                window += rowcount[ra]
                for x in range(nx):
                    col[x] += m1[ra, x]
            if rs >= 0 and rowcount[rs]:
                window -= rowcount[rs]
                for x in range(nx):
                    col[x] -= m1[rs, x]
        if window == 0:
            for x in range(nx):
                out[y, x] = 0
            continue
        s = 0
        for k in range(0, min(hi, nx - 1) + 1):
            s += col[k]
        for x in range(nx):
            if x > 0:
                if x + hi < nx:
                    s += col[x + hi]
                if x - lo - 1 >= 0:
                    s -= col[x - lo - 1]
            if s > limit:
                out[y, x] = 1
                nset += 1
            else:
                out[y, x] = 0
    return nset


def change_mask(
    frame0: NDArray[Any],
    frame1: NDArray[Any],
    bad: NDArray[np.bool_],
    out: NDArray[np.uint8],
    *,
    t1: float = 2.0,
    h1: int = 11,
    t2: float = 0.8,
    h2: int = 51,
    rows: list[tuple[int, int]] | None = None,
    cols: list[tuple[int, int]] | None = None,
    work: NDArray[np.uint8] | None = None,
) -> int:
    """Write the 2-D mask ``m2`` of the change between two frames into ``out`` (uint8).

    The fast equivalent of :func:`frame_difference_mask_reference` (steps 1-4 of the
    module docstring).  Returns the number of masked pixels.  ``work`` is an optional
    ``uint8`` scratch array of the frame shape.
    """
    if work is None:
        work = np.empty(frame0.shape, dtype=np.uint8)
    area = float(h1 * h1)
    if _box_threshold(frame0, frame1, bad, int(h1), float(t1) * area, work) == 0:
        out[...] = 0
        return 0
    if rows or cols:
        fill_gaps(work.view(np.bool_), rows or [], cols or [])
    return int(_dilate(work, int(h2), float(t2) + 1e-3, out))


def frame_difference_mask(
    frame0: NDArray[Any],
    frame1: NDArray[Any],
    bad: NDArray[np.bool_],
    *,
    t1: float = 2.0,
    h1: int = 11,
    t2: float = 0.8,
    h2: int = 51,
    rows: list[tuple[int, int]] | None = None,
    cols: list[tuple[int, int]] | None = None,
) -> NDArray[np.bool_]:
    """The 2-D mask ``m2`` of the change between two consecutive frames (steps 1-4).

    Convenience wrapper of :func:`change_mask` returning a new boolean array.
    """
    out = np.empty(frame0.shape, dtype=np.uint8)
    change_mask(frame0, frame1, bad, out, t1=t1, h1=h1, t2=t2, h2=h2, rows=rows, cols=cols)
    return out.view(np.bool_)


def frame_difference_mask_reference(
    frame0: NDArray[Any],
    frame1: NDArray[Any],
    bad: NDArray[np.bool_],
    *,
    t1: float = 2.0,
    h1: int = 11,
    t2: float = 0.8,
    h2: int = 51,
    rows: list[tuple[int, int]] | None = None,
    cols: list[tuple[int, int]] | None = None,
) -> NDArray[np.bool_]:
    """The first implementation of :func:`frame_difference_mask`, with scipy box filters.

    Kept as the reference the fast kernel is tested and benchmarked against (16.6
    Pilatus-2M frame pairs/s on one core).
    """
    d = frame1.astype(np.float32) - frame0.astype(np.float32)
    d[bad | ~np.isfinite(d) | (frame0 < 0) | (frame1 < 0)] = 0.0
    m1 = np.abs(ndimage.uniform_filter(d, size=h1, mode="nearest")) >= t1
    if not m1.any():
        return m1
    fill_gaps(m1, rows or [], cols or [])
    area = float(h2 * h2)
    s = ndimage.uniform_filter(m1.astype(np.float32), size=h2, mode="constant") * area
    return s > t2 + 1e-3  # float rounding of the box sum


def _write_mask(
    stream: FrameStream,
    path: Path,
    bad: NDArray[np.bool_],
    lo: int,
    hi: int,
    params: dict[str, Any],
    *,
    progress: bool = False,
    label: str = "mask",
) -> int:
    """Stream the frames once and write the 3-D mask to ``path``; returns the masked voxels.

    Frame ``j`` is masked where the change into it (``m2[j-1]``) or out of it
    (``m2[j]``) is set; frames outside ``lo .. hi`` are fully masked.  Each finished
    frame is gzip-compressed in a writer thread and stored with ``write_direct_chunk``.
    """
    nf, ny, nx = stream.shape
    bad = np.ascontiguousarray(bad, dtype=np.bool_)
    rows, cols = gap_runs(bad, 0), gap_runs(bad, 1)
    prev = np.empty((ny, nx), dtype=stream.dtype)  # frame j
    work = np.empty((ny, nx), dtype=np.uint8)
    m_in = np.zeros((ny, nx), dtype=np.uint8)  # m2[j-1]: change into frame j
    m_out = np.zeros((ny, nx), dtype=np.uint8)  # m2[j]: change out of frame j
    full = np.ones((ny, nx), dtype=np.int8)
    masked = 0
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mask-writer")
    pending: list[Future[None]] = []
    # refuse up front (the uncompressed size bounds the file): HDF5 must never meet a
    # full disk, see nxrefine_bs.nexus.safewrite
    ensure_free_space(Path(path).parent, nf * ny * nx, f"write {Path(path).name}")
    with h5py.File(path, "w") as mf:
        mf.attrs["default"] = "entry"
        ment = nx_group(mf, "entry", "NXentry")
        ds = ment.create_dataset(
            "mask",
            shape=(nf, ny, nx),
            dtype=np.int8,
            chunks=(1, ny, nx),
            fillvalue=0,
            compression="gzip",
            compression_opts=1,
        )
        dsid = ds.id

        def store(j: int, frame: NDArray[np.int8]) -> None:
            dsid.write_direct_chunk((j, 0, 0), zlib.compress(frame.tobytes(), 1))

        def emit(j: int, frame: NDArray[np.int8]) -> None:
            nonlocal masked
            masked += int(np.count_nonzero(frame))
            if len(pending) > 2:  # bounded: at most a few frames in flight
                pending.pop(0).result()
            pending.append(writer.submit(store, j, frame))

        def finish(j: int) -> None:
            """Frame ``j`` is complete once ``m2[j]`` (``m_out``) is known."""
            if j < lo or j > hi:
                emit(j, full)
            else:
                emit(j, (m_in | m_out).view(np.int8).copy())

        try:
            with tqdm(total=nf, disable=not progress, desc=label, unit="frame") as bar:
                for start, block in stream.blocks(0, nf):
                    for i in range(block.shape[0]):
                        j = start + i  # frame j arrives: m2[j-1] = change(j-1 -> j)
                        if j > 0:
                            m_in, m_out = m_out, m_in
                            if lo <= j - 1 <= hi or lo <= j <= hi:
                                change_mask(
                                    prev, block[i], bad, m_out, rows=rows, cols=cols,
                                    work=work, **params,
                                )  # fmt: skip
                            else:
                                m_out[...] = 0
                            finish(j - 1)
                        np.copyto(prev, block[i])
                        bar.update(1)
                m_in, m_out = m_out, m_in
                m_out[...] = 0
                finish(nf - 1)
            for fu in pending:
                fu.result()
        finally:
            writer.shutdown(wait=True)
    return masked


def run(
    scan_file: str | os.PathLike[str],
    entry: str,
    *,
    t1: float = 2,
    h1: int = 11,
    t2: float = 0.8,
    h2: int = 51,
    first: int | None = None,
    last: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Compute the 3-D mask of rotation ``entry`` and link it as ``fN/data/data_mask``.

    Parameters
    ----------
    scan_file : path-like
        The scan file.
    entry : str
        Rotation entry (``f1``...).
    t1, h1 : float, int
        Threshold (counts) and box size (pixels) of the frame-difference test.
    t2, h2 : float, int
        Threshold and box size of the dilation.
    first, last : int, optional
        Frames outside ``first <= j < last`` are fully masked (default: ``fN/data``
        attributes ``first``/``last`` written by ``max``, else
        :func:`~nxrefine_bs.reduce.parameters.resolve_frame_range`).
    overwrite : bool
        Redo a completed mask and replace its file.
    progress : bool
        Show a progress bar.

    Returns
    -------
    dict
        ``status``, ``file``, ``frames``, ``masked_fraction``, ``seconds``.
    """
    scan_file = Path(scan_file)
    if h1 < 1 or h2 < 1:
        raise ReductionError(f"mask box sizes must be >= 1, got h1={h1}, h2={h2}")
    start_time = now_iso()
    t0 = time.perf_counter()
    with open_scan_file(scan_file) as f:
        if entry not in f:
            raise ReductionError(f"{scan_file} has no entry {entry!r}")
        fe = f[entry]
        raw_file, raw_path = _external_target(scan_file, fe["data"], "data")
        out = scan_directory(scan_file, raw_file) / f"{entry}_mask.nxs"
        if process_done(fe, PROCESS) and not overwrite:
            logger.info("%s:%s mask already done; use overwrite=True", scan_file, entry)
            return {"status": "skipped", "entry": entry, "file": str(out)}
        if out.exists() and not overwrite:
            raise FileExistsNXError(
                f"{out} exists but {scan_file}:/{entry} has no {PROCESS} record; "
                "rerun with overwrite=True to replace it"
            )
        pixel_mask = read_field(fe, "instrument/detector/pixel_mask")
        data_grp = fe["data"]
        first = (
            int(data_grp.attrs["first"]) if first is None and "first" in data_grp.attrs else first
        )
        last = int(data_grp.attrs["last"]) if last is None and "last" in data_grp.attrs else last
    if out.resolve() == raw_file.resolve():
        raise PathSafetyError(f"refusing to write the 3-D mask over raw data {raw_file}")
    tmp = out.with_name(out.name + ".part")
    with removing_on_error(tmp), open_frames(scan_file, entry) as stream:
        nf, ny, nx = stream.shape
        bad = (
            np.asarray(pixel_mask) != 0
            if pixel_mask is not None and np.shape(pixel_mask) == (ny, nx)
            else np.zeros((ny, nx), dtype=bool)
        )
        lo, stop = resolve_frame_range(first, last, nf)  # frames lo <= j < stop
        hi = stop - 1  # inclusive bound of the masking loop
        masked = _write_mask(
            stream,
            tmp,
            bad,
            lo,
            hi,
            {"t1": t1, "h1": h1, "t2": t2, "h2": h2},
            progress=progress,
            label=f"{entry} mask",
        )
    os.replace(tmp, out)
    seconds = time.perf_counter() - t0
    summary = {
        "status": "done",
        "entry": entry,
        "file": str(out),
        "frames": [lo, stop],
        "masked_fraction": masked / float(nf * ny * nx),
        "seconds": round(seconds, 3),
    }
    with update_scan_file(scan_file) as f:
        fe = f[entry]
        write_external_link(fe["data"], "data_mask", out, "/entry/mask")
        record_process(
            fe,
            PROCESS,
            parameters={"t1": t1, "h1": h1, "t2": t2, "h2": h2, "first": lo, "last": stop},
            start_time=start_time,
            summary=summary,
        )
        used = {"t1": t1, "h1": h1, "t2": t2, "h2": h2, "first": lo, "last": stop}
        store_parameters(f, settings_values("prepare", used))  # where NXRefine reads them
    logger.info(
        "%s:/%s 3-D mask: %.3f%% of voxels masked in %.1f s -> %s",
        scan_file,
        entry,
        100.0 * masked / float(nf * ny * nx),
        seconds,
        out,
    )
    return summary
