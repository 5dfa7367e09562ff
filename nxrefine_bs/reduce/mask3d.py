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

Frames are streamed in blocks (the previous frame is kept for the difference), so memory
is a few frames.  The mask is written to ``<scan>/fN_mask.nxs`` as int8 ``/entry/mask``
with the raw data's chunking (gzip level 1, it is mostly zeros) and linked from the scan
file as ``fN/data/data_mask``.  The raw data are opened read-only and never written.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage
from tqdm import tqdm

from ..errors import FileExistsNXError, PathSafetyError, ReductionError
from ..nexus.h5tools import nx_group, read_field, write_external_link
from ..nexus.provenance import now_iso, process_done, record_process
from ..nexus.scanfile import open_scan_file, update_scan_file
from .transform import _external_target, scan_directory

logger = logging.getLogger(__name__)

__all__ = ["run", "frame_difference_mask", "fill_gaps", "gap_runs"]

PROCESS = "nxprepare_mask"
BLOCK_FRAMES = 10


def gap_runs(pixel_mask: NDArray[Any], axis: int) -> list[tuple[int, int]]:
    """Runs ``[a, b)`` of rows (``axis=0``) or columns (``axis=1``) masked everywhere."""
    full = np.asarray(pixel_mask != 0).all(axis=1 - axis)
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
    """The 2-D mask ``m2`` of the change between two consecutive frames (steps 1-4)."""
    d = frame1.astype(np.float32) - frame0.astype(np.float32)
    d[bad | ~np.isfinite(d) | (frame0 < 0) | (frame1 < 0)] = 0.0
    m1 = np.abs(ndimage.uniform_filter(d, size=h1, mode="nearest")) >= t1
    if not m1.any():
        return m1
    fill_gaps(m1, rows or [], cols or [])
    area = float(h2 * h2)
    s = ndimage.uniform_filter(m1.astype(np.float32), size=h2, mode="constant") * area
    return s > t2 + 1e-3  # float rounding of the box sum


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
    **_: Any,
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
        Frames outside ``first .. last`` are fully masked (default: ``fN/data``
        attributes ``first``/``last``, else none).
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
    masked = 0
    with h5py.File(raw_file, "r") as rf:
        raw = rf[raw_path]
        nf, ny, nx = raw.shape
        bad = (
            np.asarray(pixel_mask) != 0
            if pixel_mask is not None and np.shape(pixel_mask) == (ny, nx)
            else np.zeros((ny, nx), dtype=bool)
        )
        rows, cols = gap_runs(bad, 0), gap_runs(bad, 1)
        lo = 0 if first is None else max(0, int(first))
        hi = nf - 1 if last is None else min(nf - 1, int(last))
        chunks = raw.chunks or (1, ny, nx)
        with h5py.File(tmp, "w") as mf:
            mf.attrs["default"] = "entry"
            ment = nx_group(mf, "entry", "NXentry")
            ds = ment.create_dataset(
                "mask",
                shape=(nf, ny, nx),
                dtype=np.int8,
                chunks=chunks,
                fillvalue=0,
                compression="gzip",
                compression_opts=1,
            )
            buf = np.empty((BLOCK_FRAMES + 1, ny, nx), dtype=raw.dtype)
            prev_m2: NDArray[np.bool_] | None = None  # mask of the change into frame j
            out_block = np.zeros((BLOCK_FRAMES, ny, nx), dtype=np.int8)
            for j0 in tqdm(
                range(0, nf, BLOCK_FRAMES),
                disable=not progress,
                desc=f"{entry} mask",
                unit="block",
            ):
                j1 = min(nf, j0 + BLOCK_FRAMES)
                # frames j0 .. j1 (one beyond the block for the outgoing difference)
                k1 = min(nf, j1 + 1)
                raw.read_direct(buf, np.s_[j0:k1], np.s_[0 : k1 - j0])
                for j in range(j0, j1):
                    i = j - j0
                    # change from frame j to j+1: needed by frame j and by frame j+1
                    nxt = None
                    if j + 1 < nf and (lo <= j <= hi or lo <= j + 1 <= hi):
                        nxt = frame_difference_mask(
                            buf[i],
                            buf[i + 1],
                            bad,
                            t1=t1,
                            h1=h1,
                            t2=t2,
                            h2=h2,
                            rows=rows,
                            cols=cols,
                        )
                    if j < lo or j > hi:
                        out_block[i] = 1
                    else:
                        m = np.zeros((ny, nx), dtype=bool)
                        if prev_m2 is not None:
                            m |= prev_m2
                        if nxt is not None:
                            m |= nxt
                        out_block[i] = m
                    prev_m2 = nxt
                nb = j1 - j0
                masked += int(np.count_nonzero(out_block[:nb]))
                ds[j0:j1] = out_block[:nb]
    os.replace(tmp, out)
    seconds = time.perf_counter() - t0
    summary = {
        "status": "done",
        "entry": entry,
        "file": str(out),
        "frames": [lo, hi],
        "masked_fraction": masked / float(nf * ny * nx),
        "seconds": round(seconds, 3),
    }
    with update_scan_file(scan_file) as f:
        fe = f[entry]
        write_external_link(fe["data"], "data_mask", out, "/entry/mask")
        record_process(
            fe,
            PROCESS,
            parameters={"t1": t1, "h1": h1, "t2": t2, "h2": h2, "first": lo, "last": hi},
            start_time=start_time,
            summary=summary,
        )
    logger.info(
        "%s:/%s 3-D mask: %.3f%% of voxels masked in %.1f s -> %s",
        scan_file,
        entry,
        100 * summary["masked_fraction"],
        seconds,
        out,
    )
    return summary
