"""Merge the transforms of every rotation of a scan (``nxcombine`` / ``nxmasked_combine``).

``v`` and ``n`` of the rotations ``f1 .. fN`` are summed voxel by voxel (the grids must
be identical) and the normalised intensity ``data = v / n`` (0 where ``n == 0``) is
added, streaming over slabs of ``l`` planes so that memory stays at a few slabs.  The
result ``<scan>/transform.nxs`` (``masked_transform.nxs``) holds ``/entry/data/{data, v,
n, Ql, Qk, Qh}`` and is linked from the scan file as ``entry/transform``
(``masked_transform``): ``data`` -> ``/entry/data/data``, ``weights`` ->
``/entry/data/n``, axes with scaling factors as for the per-rotation transforms.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tqdm import tqdm

from ..errors import FileExistsNXError, ReductionError
from ..nexus.geometry_io import read_cell
from ..nexus.h5tools import read_field
from ..nexus.provenance import now_iso, process_done, record_process
from ..nexus.scanfile import open_scan_file, update_scan_file
from .transform import (
    CHUNK,
    _external_target,
    link_transform,
    read_transform,
    scan_directory,
    write_transform_file,
)

logger = logging.getLogger(__name__)

__all__ = ["run", "rotation_entries"]


def rotation_entries(f: h5py.File) -> list[str]:
    """Names of the rotation entries ``f1, f2, ...`` in numerical order."""
    names = [k for k in f if k[:1] == "f" and k[1:].isdigit() and isinstance(f[k], h5py.Group)]
    return sorted(names, key=lambda k: int(k[1:]))


def run(
    scan_file: str | os.PathLike[str],
    entry: str = "entry",
    *,
    mask: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    **_: Any,
) -> dict[str, Any]:
    """Sum the per-rotation transforms of ``scan_file`` into ``<scan>/transform.nxs``.

    Parameters
    ----------
    scan_file : path-like
        The scan file.
    entry : str
        The common entry receiving the result (``"entry"``).
    mask : bool
        Combine the masked transforms.
    overwrite : bool
        Redo a completed combine.
    progress : bool
        Show a progress bar.

    Returns
    -------
    dict
        ``status``, ``file``, ``entries``, ``voxels_filled``, ``seconds``.

    Raises
    ------
    ReductionError
        No rotation entries, a rotation not transformed, or grids that differ.
    """
    scan_file = Path(scan_file)
    process = "nxmasked_combine" if mask else "nxcombine"
    sub_process = "nxmasked_transform" if mask else "nxtransform"
    group = "masked_transform" if mask else "transform"
    start_time = now_iso()
    t0 = time.perf_counter()
    with open_scan_file(scan_file) as f:
        if entry not in f:
            raise ReductionError(f"{scan_file} has no entry {entry!r}")
        out = scan_directory(scan_file) / f"{group}.nxs"
        if process_done(f[entry], process) and not overwrite:
            logger.info("%s: %s already done; use overwrite=True", scan_file, process)
            return {"status": "skipped", "file": str(out)}
        entries = rotation_entries(f)
        if not entries:
            raise ReductionError(f"{scan_file} has no rotation entries f1, f2, ...")
        missing = [e for e in entries if not process_done(f[e], sub_process) or group not in f[e]]
        if missing:
            raise ReductionError(
                f"{scan_file}: {', '.join(missing)} not transformed yet; run the "
                f"{'masked ' if mask else ''}transform step on every rotation before combining"
            )
        sources = [_external_target(scan_file, f[e][group], "data") for e in entries]
        cell = read_cell(f[entries[0]])
        name = read_field(f, f"{entry}/sample/name") or "sample"
        temp = read_field(f, f"{entry}/sample/temperature")
    if out.exists() and not overwrite:
        raise FileExistsNXError(
            f"{out} exists but {scan_file}:/{entry} has no {process} record; "
            "rerun with overwrite=True to replace it"
        )
    files = []
    grid = None
    try:
        for path, _ in sources:
            g, fh = read_transform(path)
            files.append(fh)
            if grid is None:
                grid = g
            elif g != grid:
                raise ReductionError(
                    f"{path} grid ({g.describe()}) differs from {sources[0][0]} "
                    f"({grid.describe()}); transform every rotation on the same grid"
                )
        assert grid is not None
        shape = grid.shape
        tmp = out.with_name(out.name + ".part")
        write_transform_file(tmp, grid, None, signal="data")
        filled = 0
        with h5py.File(tmp, "r+") as of:
            data = of["entry/data"]
            chunks = tuple(min(CHUNK, s) for s in shape)
            dv = data.create_dataset("v", shape=shape, dtype=np.float32, chunks=chunks)
            dn = data.create_dataset("n", shape=shape, dtype=np.float32, chunks=chunks)
            dd = data.create_dataset("data", shape=shape, dtype=np.float32, chunks=chunks)
            data["data"].attrs["long_name"] = "normalised intensity v/n"
            v = np.empty((chunks[0],) + shape[1:], dtype=np.float32)
            n = np.empty_like(v)
            tmpbuf = np.empty_like(v)
            for l0 in tqdm(
                range(0, shape[0], chunks[0]), disable=not progress, desc="combine", unit="slab"
            ):
                l1 = min(shape[0], l0 + chunks[0])
                sl = np.s_[0 : l1 - l0]
                v[sl] = 0
                n[sl] = 0
                for fh in files:
                    fh["entry/data/v"].read_direct(tmpbuf, np.s_[l0:l1], sl)
                    v[sl] += tmpbuf[sl]
                    fh["entry/data/n"].read_direct(tmpbuf, np.s_[l0:l1], sl)
                    n[sl] += tmpbuf[sl]
                dv[l0:l1] = v[sl]
                dn[l0:l1] = n[sl]
                good = n[sl] > 0
                filled += int(np.count_nonzero(good))
                dd[l0:l1] = np.divide(v[sl], n[sl], out=np.zeros_like(v[sl]), where=good)
    finally:
        for fh in files:
            fh.close()
    os.replace(tmp, out)
    seconds = time.perf_counter() - t0
    summary = {
        "status": "done",
        "file": str(out),
        "entries": entries,
        "voxels_filled": filled,
        "seconds": round(seconds, 3),
    }
    title = f"{name} {temp:g}K Transform" if isinstance(temp, int | float) else f"{name} Transform"
    with update_scan_file(scan_file) as f:
        link_transform(
            f[entry],
            group,
            out,
            grid,
            cell or (1, 1, 1, 90, 90, 90),
            signal_path="/entry/data/data",
            title=title,
        )
        record_process(
            f[entry],
            process,
            parameters={"entries": entries, "mask": bool(mask)},
            start_time=start_time,
            summary=summary,
        )
    logger.info("%s: combined %s in %.1f s -> %s", scan_file, ", ".join(entries), seconds, out)
    return summary
