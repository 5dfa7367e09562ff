"""Recover scan files and detector files after a crash (``nxrefine-bs repair``).

A process killed while it wrote an HDF5 file with ``libver="latest"`` (every SWMR
detector file) leaves the superblock's *file consistency flags* set: HDF5 then refuses
any ordinary open ("file is already open for write ... h5clear"), so ``max``, NXRefine
and ``nxload`` cannot read the frames, although they are on disk.  ``h5clear -s`` fixes
that but is not always installed; :func:`clear_open_for_write` does the same thing in
Python: it zeroes the flags of a version-2/3 superblock and rewrites its Jenkins
lookup3 checksum (the checksum HDF5 uses for its metadata).

:func:`repair_scan_file` goes over the rotation entries of a scan file: it clears the
flags of every linked detector file whose writer is gone, and turns an entry still
marked ``running`` (its writer died) into ``crash`` with the number of frames that are
actually readable, so nothing is reduced as if complete.

A detector file cut off while HDF5 created it (the process killed between the first
bytes of the superblock and the root group: shorter than the end of allocation its
superblock records, and unreadable) holds no frame.  It is renamed
``<name>.truncated`` - kept, never deleted - so that every ``*.h5`` of the scan
directory opens again and a re-collection (``recollect=True``) starts cleanly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ..errors import ScanFileError
from ..experiment import ScanPaths
from .h5tools import nx_group, write_external_link, write_field
from .safewrite import remove_stale_temporaries
from .scanfile import rotation_entries, update_scan_file

logger = logging.getLogger(__name__)

__all__ = [
    "clear_open_for_write",
    "is_marked_open",
    "repair_scan_file",
    "set_aside_if_truncated",
    "RepairReport",
]

_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & 0xFFFFFFFF


def lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 ``hashlittle``, as HDF5's ``H5_checksum_lookup3``."""
    length = len(data)
    a = b = c = (0xDEADBEEF + length + initval) & 0xFFFFFFFF
    k = data
    i = 0
    m = 0xFFFFFFFF
    while length > 12:
        a = (a + struct.unpack_from("<I", k, i)[0]) & m
        b = (b + struct.unpack_from("<I", k, i + 4)[0]) & m
        c = (c + struct.unpack_from("<I", k, i + 8)[0]) & m
        a = (a - c) & m; a ^= _rot(c, 4); c = (c + b) & m  # noqa: E702
        b = (b - a) & m; b ^= _rot(a, 6); a = (a + c) & m  # noqa: E702
        c = (c - b) & m; c ^= _rot(b, 8); b = (b + a) & m  # noqa: E702
        a = (a - c) & m; a ^= _rot(c, 16); c = (c + b) & m  # noqa: E702
        b = (b - a) & m; b ^= _rot(a, 19); a = (a + c) & m  # noqa: E702
        c = (c - b) & m; c ^= _rot(b, 4); b = (b + a) & m  # noqa: E702
        length -= 12
        i += 12
    if length == 0:
        return c
    tail = k[i:] + b"\x00" * (12 - length)
    a = (a + struct.unpack_from("<I", tail, 0)[0]) & m
    b = (b + struct.unpack_from("<I", tail, 4)[0]) & m
    c = (c + struct.unpack_from("<I", tail, 8)[0]) & m
    c ^= b; c = (c - _rot(b, 14)) & m  # noqa: E702
    a ^= c; a = (a - _rot(c, 11)) & m  # noqa: E702
    b ^= a; b = (b - _rot(a, 25)) & m  # noqa: E702
    c ^= b; c = (c - _rot(b, 16)) & m  # noqa: E702
    a ^= c; a = (a - _rot(c, 4)) & m  # noqa: E702
    b ^= a; b = (b - _rot(a, 14)) & m  # noqa: E702
    c ^= b; c = (c - _rot(b, 24)) & m  # noqa: E702
    return c


def _superblock(path: Path) -> tuple[int, bytes]:
    """Offset and bytes of a version 2/3 superblock (searched at 0, 512, 1024...)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        offset = 0
        while offset + 48 <= size:
            f.seek(offset)
            head = f.read(12)
            if head[:8] == _SIGNATURE:
                version, sizeof_offsets = head[8], head[9]
                if version not in (2, 3):
                    return offset, b""  # old superblocks have no consistency flags here
                length = 12 + 4 * sizeof_offsets + 4
                f.seek(offset)
                return offset, f.read(length)
            offset = 512 if offset == 0 else offset * 2
    raise ScanFileError(f"{path} is not an HDF5 file (no superblock signature)")


def is_marked_open(path: str | os.PathLike[str]) -> bool:
    """True if ``path``'s superblock says a writer still has it open."""
    _, block = _superblock(Path(path))
    return bool(block) and block[11] != 0


def clear_open_for_write(path: str | os.PathLike[str]) -> bool:
    """Clear the "open for write" flags a crashed writer left (``h5clear -s``).

    Returns True if the flags were set and are now cleared.  Only call this when no
    process writes the file any more.
    """
    path = Path(path)
    offset, block = _superblock(path)
    if not block or block[11] == 0:
        return False
    stored = struct.unpack_from("<I", block, len(block) - 4)[0]
    if lookup3(block[:-4]) != stored:
        raise ScanFileError(f"{path}: superblock checksum mismatch; not touching it")
    fixed = bytearray(block)
    fixed[11] = 0
    # A crashed writer may not have stored its last end-of-allocation address: make it
    # cover the whole file, as ``h5clear -s --increment`` does.
    size_o = block[9]
    fmt = {4: "<I", 8: "<Q"}[size_o]
    base = struct.unpack_from(fmt, block, 12)[0]
    eoa_at = 12 + 2 * size_o
    eoa = struct.unpack_from(fmt, block, eoa_at)[0]
    struct.pack_into(fmt, fixed, eoa_at, max(eoa, path.stat().st_size - base))
    struct.pack_into("<I", fixed, len(fixed) - 4, lookup3(bytes(fixed[:-4])))
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(fixed)
        f.flush()
        os.fsync(f.fileno())
    logger.warning("cleared the open-for-write flag of %s", path)
    return True


@dataclass
class RepairReport:
    """What :func:`repair_scan_file` did."""

    scan_file: Path
    cleared: list[Path] = field(default_factory=list)
    crashed: dict[str, int] = field(default_factory=dict)  # entry -> readable frames
    linked: list[str] = field(default_factory=list)  # entries whose frames were unlinked
    removed: list[Path] = field(default_factory=list)  # stale temporary copies deleted
    set_aside: list[Path] = field(default_factory=list)  # truncated files, renamed


def _stored_eoa(path: Path) -> int | None:
    """End-of-allocation address a version-2/3 superblock records (None if unknown)."""
    try:
        offset, block = _superblock(path)
    except (ScanFileError, OSError):
        return None
    if not block:
        return None
    size_o = block[9]
    fmt = {4: "<I", 8: "<Q"}.get(size_o)
    if fmt is None or len(block) < 12 + 3 * size_o:
        return None
    base = struct.unpack_from(fmt, block, 12)[0]
    return int(offset + base + struct.unpack_from(fmt, block, 12 + 2 * size_o)[0])


def set_aside_if_truncated(path: str | os.PathLike[str]) -> Path | None:
    """Rename a detector file cut off during its creation to ``<name>.truncated``.

    Only a file that HDF5 cannot open *and* that is shorter than the end of allocation
    its own superblock records is touched; anything else is left as it is.  Returns the
    new path, or None.
    """
    path = Path(path)
    try:
        with h5py.File(path, "r"):
            return None
    except OSError:
        pass
    eoa = _stored_eoa(path)
    size = path.stat().st_size
    if eoa is None or size >= eoa:
        return None
    target = path.with_name(path.name + ".truncated")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.truncated{n}")
    path.rename(target)
    logger.warning(
        "%s was cut off while it was created (%d of %d bytes, no frame): renamed %s",
        path,
        size,
        eoa,
        target.name,
    )
    return target


def _readable_frames(path: Path, dataset: str) -> int:
    try:
        with h5py.File(path, "r") as f:
            return int(f[dataset].shape[0])
    except (OSError, KeyError):
        return 0


def repair_scan_file(scan_file: str | os.PathLike[str]) -> RepairReport:
    """Make a scan file and its detector files readable after a crash.

    Raises
    ------
    ScanFileError
        If the scan file itself cannot be read.
    """
    scan_file = Path(scan_file)
    report = RepairReport(scan_file)
    links: dict[str, tuple[Path, str]] = {}
    running: list[str] = []
    try:
        with h5py.File(scan_file, "r") as f:
            for entry in rotation_entries(f):
                link = f[entry].get("data/data", getlink=True)
                if isinstance(link, h5py.ExternalLink):
                    links[entry] = ((scan_file.parent / link.filename).resolve(), link.path)
                status = f[entry].get("acquisition/status")
                if status is not None and status[()] in (b"running", "running"):
                    running.append(entry)
    except OSError as exc:
        raise ScanFileError(f"cannot read {scan_file}: {exc}") from exc
    candidates = {path for path, _ in links.values()}
    scan_dir: Path | None = None
    with contextlib.suppress(Exception):  # the scan directory, linked or not yet linked
        scan_dir = ScanPaths.from_scan_file(scan_file).scan_dir
        candidates.update(scan_dir.glob("*.h5"))
    for entry in running:  # the writer died before it linked the detector file
        if entry not in links and scan_dir is not None:
            found = sorted(
                scan_dir.glob(f"{entry}_*.h5"), key=lambda p: int(p.stem.rpartition("_")[2])
                if p.stem.rpartition("_")[2].isdigit() else 0,
            )
            path = found[-1] if found else scan_dir / f"{entry}.h5"
            if path.is_file():
                links[entry] = (path.resolve(), "/entry/data/data")
                report.linked.append(entry)
    for path in sorted(candidates):
        if not path.is_file():
            continue
        with contextlib.suppress(ScanFileError):  # e.g. a superblock cut short
            if clear_open_for_write(path):
                report.cleared.append(path)
        aside = set_aside_if_truncated(path)
        if aside is not None:
            report.set_aside.append(aside)
    report.removed = remove_stale_temporaries(scan_file)  # copies a killed update left
    if running:
        with update_scan_file(scan_file) as f:
            for entry in running:
                link = links.get(entry)
                n = _readable_frames(*link) if link is not None else 0
                fe = f[entry]
                if entry in report.linked and link is not None:
                    write_external_link(nx_group(fe, "data", "NXdata"), "data", *link)
                acq = nx_group(fe, "acquisition", "NXcollection")
                write_field(acq, "status", "crash")
                write_field(
                    acq,
                    "reason",
                    f"the writer died during the run; {n} frames are readable "
                    "(repaired by nxrefine-bs repair)",
                )
                write_field(acq, "frames_collected", np.int64(n))
                data = fe["data"]
                if "frame_number" in data:
                    del data["frame_number"]
                write_field(data, "frame_number", np.arange(n, dtype=np.int32))
                report.crashed[entry] = n
    return report
