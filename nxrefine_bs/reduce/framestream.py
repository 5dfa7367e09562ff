"""Stream the detector frames of a rotation entry in small blocks with bounded memory.

The scan file's ``fN/data/data`` is an HDF5 external link to ``<scan>/fN.h5``.  Rather
than letting HDF5 follow the link (which would open the detector file with the scan
file's access mode, e.g. read-write while a step writes results), the link is resolved
here: its file name is taken relative to the directory of the scan file (inventory
§2.1), checked, and the detector file is opened read-only, optionally in SWMR mode so
that a file still being written by an areaDetector/ophyd-async writer can be read.

Frames are read into a small ring of reused buffers whose depth is the dataset's chunk
depth along the frame axis (one frame for areaDetector files, which is also the fastest
case: the buffer stays in the L3 cache; see ``performance-baselines.md`` §1), capped by
``max_block_bytes``.  Reading overlaps the caller's computation: ``readers`` background
threads fill the next blocks while the caller works on the current one.  Compressed
stacks (bitshuffle-LZ4, gzip, LZ4, Blosc, ...) are read chunk by chunk and decoded in
those threads without h5py's lock (:class:`nxrefine_bs.nexus.codecs.ChunkReader`), so two
readers decode on two cores; the HDF5 filter plugins of :mod:`hdf5plugin` are registered
before any detector file is opened.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from numpy.typing import NDArray

from ..errors import DataLinkError, ReductionError, ScanFileError
from ..geometry import Geometry
from ..nexus.codecs import ChunkReader, ensure_plugins
from ..nexus.geometry_io import read_geometry
from ..nexus.h5tools import read_field
from ..nexus.nxreduce import resolve_parameters
from ..nexus.provenance import process_done, read_process
from ..nexus.scanfile import open_scan_file, rotation_entries
from .parameters import resolve_frame_range

logger = logging.getLogger(__name__)

__all__ = [
    "DataSource",
    "FrameStream",
    "resolve_data_link",
    "open_frames",
    "frame_range",
    "read_pixel_mask",
    "DEFAULT_MAX_BLOCK_BYTES",
    "default_readers",
    "available_cores",
    "step_parameters",
    "replace_group",
    "rotation_entries",
    "open_entry",
    "frame_window",
]

DEFAULT_MAX_BLOCK_BYTES = 64 * 1024 * 1024
"""Largest read buffer (bytes) used by :class:`FrameStream` unless told otherwise."""


def available_cores() -> int:
    """Cores this process may run on (CPU affinity, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def default_readers(parallel_decode: bool) -> int:
    """Background reader threads: one for plain data, up to the core count (max 4) to decode."""
    return min(4, available_cores()) if parallel_decode else 1


@dataclass(frozen=True)
class DataSource:
    """Where the frames of an entry live.

    Parameters
    ----------
    scan_file : Path
        The scan file holding the entry.
    entry : str
        Entry name (``f1``...).
    data_file : Path
        Absolute path of the detector file.
    data_path : str
        Path of the 3-D dataset inside ``data_file``.
    external : bool
        True if ``fN/data/data`` is an external link (False: the data are stored in
        the scan file itself).
    """

    scan_file: Path
    entry: str
    data_file: Path
    data_path: str
    external: bool


def resolve_data_link(
    scan_file: str | os.PathLike[str], entry: str, *, swmr: bool = False
) -> DataSource:
    """Find the detector file and dataset of ``entry`` without following the link.

    Parameters
    ----------
    scan_file : path-like
        Scan file ``<sample>_<scan>.nxs``.
    entry : str
        Rotation entry (``f1``...).
    swmr : bool
        Open the scan file in SWMR-read mode (for a scan file still being written).

    Returns
    -------
    DataSource

    Raises
    ------
    ScanFileError
        If the scan file cannot be opened or has no ``<entry>/data/data``.
    DataLinkError
        If the external link points at a missing file or a missing dataset.
    """
    scan_file = Path(scan_file).absolute()
    try:
        f = _open_h5(scan_file, swmr)
    except OSError as exc:
        raise ScanFileError(f"cannot open scan file {scan_file}: {exc}") from exc
    with f:
        if entry not in f:
            raise ScanFileError(f"{scan_file} has no entry {entry!r}")
        data_group = f[entry].get("data")
        if not isinstance(data_group, h5py.Group):
            raise ScanFileError(f"{scan_file}:/{entry} has no data group; link the data first")
        link = data_group.get("data", getlink=True)
        if link is None:
            raise ScanFileError(
                f"{scan_file}:/{entry}/data has no 'data' field; link the detector data first"
            )
        if isinstance(link, h5py.ExternalLink):
            target = Path(link.filename)
            data_file = target if target.is_absolute() else scan_file.parent / target
            source = DataSource(scan_file, entry, data_file, link.path, True)
        elif isinstance(link, h5py.HardLink):
            source = DataSource(scan_file, entry, scan_file, f"/{entry}/data/data", False)
        else:  # soft link inside the file
            source = DataSource(scan_file, entry, scan_file, str(link.path), False)
    if source.external and not source.data_file.is_file():
        raise DataLinkError(
            f"{scan_file}:/{entry}/data/data links to {source.data_file} "
            f"(stored as {link.filename!r}, relative to {scan_file.parent}), which does not "
            "exist; restore the detector file or relink the scan"
        )
    return source


class FrameStream:
    """An open 3-D frame stack ``(nframes, ny, nx)`` read block by block.

    Use :func:`open_frames` to create one.  The object holds the open detector file;
    :meth:`close` (or leaving the ``with`` block of :func:`open_frames`) closes it.

    Parameters
    ----------
    source : DataSource
        Where the data live.
    swmr : bool
        Open the detector file in SWMR-read mode (falls back to a normal read-only
        open for files that were not written with SWMR support).
    max_block_bytes : int
        Upper bound on the read buffer size.
    readers : int, optional
        Background threads that read (and decode) the next blocks while the caller
        computes; 0 reads in the caller's thread.  Default: :func:`default_readers`.
    """

    def __init__(
        self,
        source: DataSource,
        *,
        swmr: bool = False,
        max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
        readers: int | None = None,
    ) -> None:
        self.source = source
        self._file = _open_data_file(source.data_file, swmr)
        try:
            ds = self._file.get(source.data_path)
        except (KeyError, OSError):
            ds = None
        if not isinstance(ds, h5py.Dataset):
            self._file.close()
            raise DataLinkError(
                f"{source.scan_file}:/{source.entry}/data/data points at "
                f"{source.data_file}#{source.data_path}, which is not a dataset"
            )
        if ds.ndim != 3:
            self._file.close()
            raise ScanFileError(
                f"{source.data_file}#{source.data_path} has shape {ds.shape}; "
                "expected (nframes, ny, nx)"
            )
        self.dataset = ds
        self.swmr = bool(swmr)
        frame_bytes = max(1, ds.shape[1] * ds.shape[2] * ds.dtype.itemsize)
        depth = ds.chunks[0] if ds.chunks else 1
        self.block_frames = int(max(1, min(depth, max_block_bytes // frame_bytes)))
        self.reader = ChunkReader(ds)
        self.readers = (
            default_readers(self.reader.parallel) if readers is None else max(0, int(readers))
        )

    # ------------------------------------------------------------------ properties
    @property
    def shape(self) -> tuple[int, int, int]:
        """``(nframes, ny, nx)``."""
        if self.swmr:
            self.dataset.refresh()
        return tuple(int(v) for v in self.dataset.shape)  # type: ignore[return-value]

    @property
    def nframes(self) -> int:
        """Number of frames currently in the stack."""
        return self.shape[0]

    @property
    def frame_shape(self) -> tuple[int, int]:
        """``(ny, nx)``."""
        return self.shape[1], self.shape[2]

    @property
    def dtype(self) -> np.dtype:
        """Data type of the stored frames."""
        return self.dataset.dtype

    # ------------------------------------------------------------------ reading
    def blocks(
        self, first: int = 0, last: int | None = None
    ) -> Iterator[tuple[int, NDArray[np.generic]]]:
        """Yield ``(start, block)`` for frames ``[first, last)`` in order.

        ``block`` has shape ``(n, ny, nx)`` and is a view of one reused buffer: it is
        overwritten by the next iteration, so copy anything that must be kept.  Blocks
        are aligned to the dataset's chunks along the frame axis.
        """
        n, ny, nx = self.shape
        last = n if last is None else min(int(last), n)
        first = max(0, int(first))
        if last <= first:
            return
        depth = self.block_frames
        ranges: list[tuple[int, int]] = []
        start = first
        while start < last:
            stop = min(last, (start // depth + 1) * depth)
            ranges.append((start, stop))
            start = stop
        if self.readers <= 0:
            buf = np.empty((depth, ny, nx), dtype=self.dtype)
            for start, stop in ranges:
                self.reader.read(buf, start, stop)
                yield start, buf[: stop - start]
            return
        yield from self._prefetched(ranges, depth, ny, nx)

    def _prefetched(
        self, ranges: list[tuple[int, int]], depth: int, ny: int, nx: int
    ) -> Iterator[tuple[int, NDArray[np.generic]]]:
        """Blocks read ahead by ``self.readers`` threads into a ring of ``readers + 1`` buffers.

        Block ``i`` lives in slot ``i % nslots``; it is refilled (with block
        ``i + nslots``) only after the caller has asked for block ``i + 1``.
        """
        workers = self.readers
        nslots = workers + 1
        slots = [np.empty((depth, ny, nx), dtype=self.dtype) for _ in range(nslots)]
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="frames")
        pending: deque[Future[None]] = deque()

        def submit(i: int) -> None:
            a, b = ranges[i]
            pending.append(pool.submit(self.reader.read, slots[i % nslots], a, b))

        try:
            for i in range(min(workers, len(ranges))):
                submit(i)
            for i, (a, b) in enumerate(ranges):
                pending.popleft().result()
                if i + workers < len(ranges):
                    submit(i + workers)  # into the slot of block i - 1, released now
                yield a, slots[i % nslots][: b - a]
        finally:
            for fu in pending:
                fu.cancel()
            pool.shutdown(wait=True)

    def read(self, first: int, last: int) -> NDArray[np.generic]:
        """Frames ``[first, last)`` as a new array (for small reads only)."""
        n, ny, nx = self.shape
        first, last = max(0, int(first)), min(int(last), n)
        out = np.empty((max(0, last - first), ny, nx), dtype=self.dtype)
        if last > first:
            self.reader.read(out, first, last)
        return out

    def close(self) -> None:
        """Close the detector file."""
        if self._file.id.valid:
            self._file.close()

    def __enter__(self) -> FrameStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_h5(path: Path, swmr: bool) -> h5py.File:
    """Open ``path`` read-only, in SWMR-read mode if asked and possible."""
    ensure_plugins()
    if swmr:
        try:
            return h5py.File(path, "r", swmr=True, libver="latest")
        except OSError as exc:
            if not path.is_file():
                raise
            logger.debug("SWMR open of %s failed (%s); opening read-only", path, exc)
    return h5py.File(path, "r")


def _open_data_file(path: Path, swmr: bool) -> h5py.File:
    try:
        return _open_h5(path, swmr)
    except FileNotFoundError as exc:
        raise DataLinkError(f"detector file {path} does not exist") from exc
    except OSError as exc:
        raise DataLinkError(f"cannot open detector file {path}: {exc}") from exc


@contextmanager
def open_frames(
    scan_file: str | os.PathLike[str],
    entry: str,
    *,
    swmr: bool = False,
    max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
    readers: int | None = None,
) -> Iterator[FrameStream]:
    """Open the frames of ``scan_file:/entry`` for streaming.

    ``readers`` is the number of background reader/decoder threads (see
    :class:`FrameStream`).

    Examples
    --------
    >>> with open_frames(scan_file, "f1") as frames:  # doctest: +SKIP
    ...     for start, block in frames.blocks(10, 100):
    ...         ...
    """
    stream = FrameStream(
        resolve_data_link(scan_file, entry, swmr=swmr),
        swmr=swmr,
        max_block_bytes=max_block_bytes,
        readers=readers,
    )
    try:
        yield stream
    finally:
        stream.close()


def frame_range(first: int | None, last: int | None, nframes: int) -> tuple[int, int]:
    """The frames ``[first, last)`` used on a stack of ``nframes`` (NXRefine's convention).

    See :func:`nxrefine_bs.reduce.parameters.resolve_frame_range`: ``first`` None is 0,
    ``last`` None is ``nframes - 10``; negative values count from the end; clipped to
    the stack.  The result may be empty (``first >= last``); callers decide whether
    that is an error.
    """
    return resolve_frame_range(first, last, nframes)


def read_pixel_mask(entry: h5py.Group, shape: tuple[int, int]) -> NDArray[np.bool_]:
    """The entry's 2-D pixel mask as booleans (True = masked); all False if absent.

    Raises
    ------
    ScanFileError
        If the stored mask has the wrong shape.
    """
    mask = read_field(entry, "instrument/detector/pixel_mask")
    if mask is None:
        return np.zeros(shape, dtype=bool)
    mask = np.asarray(mask)
    if mask.shape != tuple(shape):
        raise ScanFileError(
            f"{entry.file.filename}:{entry.name}/instrument/detector/pixel_mask has shape "
            f"{mask.shape}, but the frames are {tuple(shape)}"
        )
    return mask != 0


# --------------------------------------------------------------------------- shared step helpers


def step_parameters(
    keys: tuple[str, ...], explicit: dict[str, Any], scan_file: str | os.PathLike[str]
) -> dict[str, Any]:
    """Resolve reduction parameters: explicit value, then the settings layers, then defaults.

    See :func:`nxrefine_bs.nexus.nxreduce.resolve_parameters`.
    """
    return resolve_parameters(keys, explicit=explicit, scan_file=scan_file)


def open_entry(
    scan_file: Path, entry: str, process: str, *, overwrite: bool
) -> tuple[Geometry | None, dict[str, Any] | None]:
    """Start a step on ``scan_file:/entry``: its geometry, or the summary of a done step.

    Returns ``(geometry, None)`` when the step must run, or ``(None, summary)`` when the
    NXprocess ``process`` exists and ``overwrite`` is False (the step is skipped).

    Raises
    ------
    ScanFileError
        If the scan file cannot be opened or has no such entry.
    """
    try:
        f = open_scan_file(scan_file)
    except FileNotFoundError as exc:
        raise ScanFileError(f"scan file {scan_file} does not exist") from exc
    except OSError as exc:
        raise ScanFileError(f"cannot open scan file {scan_file}: {exc}") from exc
    with f:
        group = f.get(entry)
        if not isinstance(group, h5py.Group):
            raise ScanFileError(
                f"{scan_file} has no entry {entry!r}; entries: {', '.join(rotation_entries(f))}"
            )
        if not overwrite and process_done(group, process):
            record = read_process(group, process) or {}
            logger.info("%s:%s: %s already done; skipping", scan_file, entry, process)
            return None, {"entry": entry, "skipped": True, **record.get("summary", {})}
        return read_geometry(group), None


def frame_window(
    stream: FrameStream,
    geometry: Geometry,
    first: int | None,
    last: int | None,
    scan_file: Path,
    entry: str,
) -> tuple[int, int, NDArray[np.bool_]]:
    """Check the stack against the detector; return the frame range and the pixel mask.

    Raises
    ------
    ScanFileError
        If the frames do not have the detector's shape.
    ReductionError
        If ``[first, last)`` holds no frame or the pixel mask masks every pixel.
    """
    nframes, ny, nx = stream.shape
    if (ny, nx) != tuple(geometry.shape):
        raise ScanFileError(
            f"{scan_file}:/{entry}: frames are {ny}x{nx} but the detector shape is "
            f"{geometry.shape[0]}x{geometry.shape[1]}"
        )
    lo, hi = frame_range(first, last, nframes)
    if hi <= lo:
        raise ReductionError(
            f"{scan_file}:/{entry}: no frames to process (stack has {nframes} frames, "
            f"requested first={first}, last={last})"
        )
    with open_scan_file(scan_file) as f:
        masked = read_pixel_mask(f[entry], (ny, nx))
    if masked.all():
        raise ReductionError(
            f"{scan_file}:/{entry}/instrument/detector/pixel_mask masks every pixel"
        )
    return lo, hi, masked


def replace_group(parent: h5py.Group, name: str, build: Callable[[h5py.Group], None]) -> None:
    """Write ``parent[name]`` in one go: build it as a temporary group, then rename it.

    A crash while ``build`` runs leaves only ``.<name>.partial`` (removed by the next
    call), never a half-written ``name``.
    """
    tmp = f".{name}.partial"
    if tmp in parent:
        del parent[tmp]
    group = parent.create_group(tmp)
    build(group)
    if name in parent:
        del parent[name]
    parent.move(tmp, name)
