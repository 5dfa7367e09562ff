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
from ..nexus.entries import rotation_entries
from ..nexus.geometry_io import read_cell, read_orientation
from ..nexus.h5tools import read_field
from ..nexus.provenance import now_iso, process_done, record_process
from ..nexus.safewrite import ensure_free_space
from ..nexus.scanfile import open_scan_file, update_scan_file
from .lattice import LatticeError, read_lattice
from .setting import setting_relation
from .transform import (
    _external_target,
    grid_chunks,
    link_transform,
    read_transform,
    scan_directory,
    write_transform_file,
)

logger = logging.getLogger(__name__)

__all__ = ["run", "check_settings"]

SETTING_ANGLE = 5.0
"""Degrees: orientations closer than this after a lattice rotation are compared as settings."""


def check_settings(f: h5py.File, entries: list[str], where: str) -> None:
    """Refuse rotations whose orientation is not in the setting of the first one.

    Parameters
    ----------
    f : h5py.File
        The open scan file.
    entries : list of str
        Rotation entries to be combined, the first being the reference.
    where : str
        The scan file, for messages.

    Raises
    ------
    ReductionError
        If an entry's orientation matrix is related to the first one's by a lattice
        rotation other than the identity (the message names the operation as the matrix
        ``M`` with ``h(fN) = M h(f1)`` and says whether it lies in the Laue group).
    """
    if len(entries) < 2:
        return
    sample = f[entries[0]].get("sample")
    if sample is None:
        sample = f.get("entry/sample")
    try:
        lattice = read_lattice(sample) if sample is not None else None
    except LatticeError as exc:
        logger.warning("%s: no lattice to compare the settings of %s (%s)", where, entries, exc)
        return
    orientations = {e: read_orientation(f[e]) for e in entries}
    ref = entries[0]
    u_ref = orientations[ref]
    if lattice is None or u_ref is None:
        logger.warning("%s: %s has no orientation or lattice; settings not compared", where, ref)
        return
    for e in entries[1:]:
        u = orientations[e]
        if u is None:
            continue
        rel = setting_relation(u_ref, u, lattice)
        if rel.angle > SETTING_ANGLE:
            logger.warning(
                "%s: %s and %s orientations differ by %.1f deg even allowing for the lattice "
                "symmetry; their settings cannot be compared",
                where,
                ref,
                e,
                rel.angle,
            )
            continue
        if rel.same_setting:
            continue
        if rel.in_laue_group:
            raise ReductionError(
                f"{where}: {e} is in another setting than {ref} ({rel.describe()}); the "
                "settings are equivalent but label the data differently. Rerun 'refine' "
                f"with overwrite on {e} (it starts from {ref}'s setting), then 'transform', "
                "before combining"
            )
        raise ReductionError(
            f"{where}: {e} and {ref} are indexed in twin-related settings ({rel.describe()}, "
            f"not a symmetry of {lattice.space_group!r}); combining would add different "
            f"reflections together. Rerun 'refine' with overwrite on {e} (it starts from "
            f"{ref}'s setting), then 'transform'; if the crystal is really twinned, "
            "combine the rotations separately"
        )


def run(
    scan_file: str | os.PathLike[str],
    entry: str = "entry",
    *,
    mask: bool = False,
    overwrite: bool = False,
    progress: bool = False,
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
        No rotation entries, a rotation not transformed, grids that differ, or rotations
        in different settings (see :func:`check_settings`).
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
        check_settings(f, entries, str(scan_file))
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
    tmp = out.with_name(out.name + ".part")
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
        # refuse up front: HDF5 must never meet a full disk (see nexus.safewrite)
        ensure_free_space(out.parent, 3 * 4 * int(np.prod(shape)), f"write {out.name}")
        write_transform_file(tmp, grid, None, signal="data")
        filled = 0
        with h5py.File(tmp, "r+") as of:
            data = of["entry/data"]
            chunks = grid_chunks(shape)
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
    except BaseException:
        tmp.unlink(missing_ok=True)  # no partial output (a full disk, an interrupt)
        raise
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
            weights_path=None,  # data is already v/n; a weights link would divide twice
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
