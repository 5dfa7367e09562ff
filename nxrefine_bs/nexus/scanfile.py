"""Scan files ``<sample>_<scan>.nxs``: creation from a template, entries, parents, links.

A scan file lives in ``<experiment>/<sample>/<label>/`` next to its scan directory
``<scan>/`` and holds::

    /entry  (NXentry)
        sample (NXsample): name, label, temperature (units)
        instrument (NXinstrument, copied from the configuration)
        nxscans (NXprocess): parent (file name, relative to the scan file), date
    /f1 ... /fN  (NXentry, copied from the configuration)
        sample -> hard link to /entry/sample
        data (NXdata): data -> ExternalLink("<scan>/fN.h5", "/entry/data/data")

Creating a scan file never deletes or overwrites anything in the scan directory:
it holds raw data.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .. import __version__
from ..errors import (
    DataLinkError,
    ExperimentError,
    FileExistsNXError,
    InvalidNameError,
    ScanFileError,
)
from ..experiment import EXPERIMENT_SUBDIRS, ScanPaths
from .entries import rotation_entries
from .geometry_io import read_geometry
from .safewrite import LOCK_TIMEOUT, atomic_update, fsync_path, locked
from .template import DATA_PATH, read_configuration

__all__ = [
    "locked",
    "create_scan_file",
    "rotation_entries",
    "set_parent",
    "find_parent",
    "check_data_link",
    "read_geometry",
]

logger = logging.getLogger(__name__)

@contextlib.contextmanager
def update_scan_file(
    path: str | os.PathLike[str], mode: str = "r+", *, timeout: float | None = LOCK_TIMEOUT
) -> Iterator[h5py.File]:
    """Open a scan file for writing: locked (NXLock-compatible) and copy-on-write.

    Every writer of a scan file (the NeXus writer callback, the reduction steps, the
    calibration, masks and settings) goes through this, so concurrent writers never
    interleave, NeXpy/NXRefine writers are respected, and a crash or a full disk at any
    instant leaves the old or the new content (see :mod:`nxrefine_bs.nexus.safewrite`).
    Readers holding the file open never block it.
    """
    if mode not in ("r+", "a"):
        raise ScanFileError(f"update_scan_file opens for writing only ('r+' or 'a'), not {mode!r}")
    with atomic_update(path, create=mode == "a", timeout=timeout) as f:
        yield f


_BUSY_MESSAGES = ("already open for read-only", "unable to lock file")
"""HDF5 open errors meaning "another handle has the file open right now" (retried)."""


def open_scan_file(path: str | os.PathLike[str], *, timeout: float = LOCK_TIMEOUT) -> h5py.File:
    """Open a scan file read-only, waiting while a writer in another process holds it.

    Writers keep a scan file open only for the few milliseconds of one update, but
    HDF5 file locking makes a reader's open fail during that window ("unable to lock
    file"); the open is retried for up to ``timeout`` seconds.  Use as a context
    manager: ``with open_scan_file(path) as f: ...``.
    """
    return _open_retrying(Path(path), "r", timeout=timeout)


def _open_retrying(
    path: Path, mode: str, *, timeout: float = LOCK_TIMEOUT, poll: float = 0.01
) -> h5py.File:
    """Open ``path``, waiting while another handle holds it open.

    Readers (reduction steps, the workflow queue) open scan files read-only without the
    lock, briefly.  HDF5 refuses a read-write open while the same process has the file
    open read-only ("already open for read-only"), and while another process holds it
    with HDF5 file locking ("unable to lock file"); both pass as soon as the reader
    closes it, so the open is retried for up to ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            return h5py.File(path, mode)
        except OSError as exc:
            if not any(m in str(exc) for m in _BUSY_MESSAGES) or time.monotonic() > deadline:
                raise
            logger.debug("%s is open in a reader; retrying: %s", path, exc)
            time.sleep(poll)


def _now() -> str:
    return datetime.now().astimezone().isoformat()


def _relative(target: Path, start: Path) -> str:
    return Path(os.path.relpath(os.path.abspath(target), os.path.abspath(start))).as_posix()


def _write_parent(entry: h5py.Group, parent_name: str | None) -> None:
    if parent_name is None:
        if "nxscans" in entry and "parent" in entry["nxscans"]:
            del entry["nxscans/parent"]
        return
    group = entry.require_group("nxscans")
    group.attrs["NX_class"] = "NXprocess"
    for name, value in (("parent", parent_name), ("date", _now())):
        if name in group:
            del group[name]
        group.create_dataset(name, data=value)


def create_scan_file(
    template: str | os.PathLike[str],
    experiment_dir: str | os.PathLike[str],
    sample: str,
    label: str,
    scan: str,
    *,
    temperature: float | None = None,
    temperature_units: str = "K",
    parent: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    data_directory: str | os.PathLike[str] | None = None,
) -> Path:
    """Create ``<experiment>/<sample>/<label>/<sample>_<scan>.nxs`` from a configuration.

    The scan directory ``<scan>/`` is created if needed; nothing inside it is touched.

    Parameters
    ----------
    template : path-like
        Configuration file (see :mod:`nxrefine_bs.nexus.template`).
    experiment_dir : path-like
        Existing experiment directory.
    sample, label, scan : str
        Names (validated).
    temperature : float, optional
        Written to ``/entry/sample/temperature`` with ``temperature_units``.
    temperature_units : str
        Units of ``temperature``.
    parent : path-like, optional
        Parent scan file, recorded in ``/entry/nxscans/parent`` relative to the scan
        file's directory.
    overwrite : bool
        Replace an existing scan file (atomically; the scan directory is kept).
    data_directory : path-like, optional
        Directory holding ``fN.h5`` (default: the scan directory, as for the ``sim``
        beamline; see :meth:`nxrefine_bs.beamlines.BeamLine.scan_data_directory`).

    Returns
    -------
    Path
        The scan file.

    Raises
    ------
    FileExistsNXError
        If the scan file exists and ``overwrite`` is False.
    InvalidNameError
        On an unsafe name.
    TemplateError
        If the configuration is unreadable.
    ExperimentError, ScanFileError
        If the experiment or parent is missing.
    """
    info = read_configuration(template)
    template = Path(template)
    experiment_dir = Path(experiment_dir)
    if not experiment_dir.is_dir():
        raise ExperimentError(f"experiment directory {experiment_dir} does not exist")
    if sample in EXPERIMENT_SUBDIRS:
        raise InvalidNameError(f"sample name {sample!r} is reserved for an experiment directory")
    paths = ScanPaths.from_names(experiment_dir, sample, label, scan)
    scan_file = paths.scan_file
    data_dir = Path(data_directory) if data_directory is not None else paths.scan_dir
    parent_name = None
    if parent is not None:
        parent_path = Path(parent)
        if not parent_path.is_absolute():
            parent_path = paths.label_dir / parent_path
        if not parent_path.is_file():
            raise ScanFileError(f"parent scan file {parent_path} does not exist")
        parent_name = _relative(parent_path, paths.label_dir)
    paths.label_dir.mkdir(parents=True, exist_ok=True)

    with locked(scan_file):
        if scan_file.exists() and not overwrite:
            raise FileExistsNXError(
                f"scan file {scan_file} already exists; pass overwrite=True "
                "(--overwrite) to replace it (the scan directory is kept)"
            )
        paths.scan_dir.mkdir(exist_ok=True)
        tmp = scan_file.with_name(f".{scan_file.name}.{os.getpid()}.tmp")
        try:
            with h5py.File(template, "r") as tf, h5py.File(tmp, "w") as f:
                _write_scan(
                    tf,
                    f,
                    paths=paths,
                    entries=info.entries,
                    data_dir=data_dir,
                    temperature=temperature,
                    temperature_units=temperature_units,
                    parent_name=parent_name,
                )
            fsync_path(tmp)
            os.replace(tmp, scan_file)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    logger.info("created scan file %s (%d rotations)", scan_file, len(info.entries))
    return scan_file


def _write_scan(
    tf: h5py.File,
    f: h5py.File,
    *,
    paths: ScanPaths,
    entries: Iterable[str],
    data_dir: Path,
    temperature: float | None,
    temperature_units: str,
    parent_name: str | None,
) -> None:
    f.attrs["NX_class"] = "NXroot"
    f.attrs["file_name"] = paths.scan_file.name
    f.attrs["file_time"] = _now()
    f.attrs["creator"] = f"nxrefine-bs {__version__}"
    f.attrs["HDF5_Version"] = h5py.version.hdf5_version
    f.attrs["h5py_version"] = h5py.version.version
    f.attrs["default"] = "entry"

    entry = f.create_group("entry")
    entry.attrs["NX_class"] = "NXentry"
    if "entry/instrument" in tf:
        tf.copy(tf["entry/instrument"], entry, name="instrument")
    sample = entry.create_group("sample")
    sample.attrs["NX_class"] = "NXsample"
    sample.attrs["target"] = "/entry/sample"  # NeXus link target, for nexusformat
    sample.create_dataset("name", data=paths.sample)
    sample.create_dataset("label", data=paths.label)
    if temperature is not None:
        try:
            value = float(temperature)
        except (TypeError, ValueError):
            raise ScanFileError(f"temperature must be a number, got {temperature!r}") from None
        dset = sample.create_dataset("temperature", data=np.float64(value))
        dset.attrs["units"] = temperature_units
    _write_parent(entry, parent_name)

    for name in entries:
        tf.copy(tf[name], f, name=name)
        fe = f[name]
        fe.attrs["NX_class"] = "NXentry"
        if "sample" in fe:
            del fe["sample"]
        fe["sample"] = sample  # hard link
        data = fe.require_group("data")
        data.attrs["NX_class"] = "NXdata"
        old = data.get("data", getlink=True)
        filename, target_path = f"{name}.h5", DATA_PATH
        if isinstance(old, h5py.ExternalLink):
            filename = Path(old.filename).name or filename
            target_path = old.path or target_path
        if old is not None:
            del data["data"]
        data["data"] = h5py.ExternalLink(
            _relative(data_dir / filename, paths.label_dir), target_path
        )


def _open(path: Path, mode: str) -> h5py.File:
    try:
        return h5py.File(path, mode)
    except FileNotFoundError:
        raise ScanFileError(f"scan file {path} does not exist") from None
    except OSError as exc:
        raise ScanFileError(f"cannot open scan file {path}: {exc}") from exc


def set_parent(
    scan_files: Iterable[str | os.PathLike[str]], parent: str | os.PathLike[str] | None
) -> None:
    """Record ``parent`` as the parent of every scan file (None removes the record).

    The parent is stored in ``/entry/nxscans/parent`` as a path relative to each scan
    file's directory; the parent file itself is skipped.

    Raises
    ------
    ScanFileError
        If the parent or a scan file is missing or unreadable.
    """
    parent_path = Path(parent) if parent is not None else None
    if parent_path is not None and not parent_path.is_file():
        raise ScanFileError(f"parent scan file {parent_path} does not exist")
    for scan_file in scan_files:
        scan_file = Path(scan_file)
        if parent_path is not None and scan_file.resolve() == parent_path.resolve():
            continue
        name = None if parent_path is None else _relative(parent_path, scan_file.parent)
        if not scan_file.is_file():
            raise ScanFileError(f"scan file {scan_file} does not exist")
        with update_scan_file(scan_file) as f:
            entry = f.get("entry")
            if not isinstance(entry, h5py.Group):
                raise ScanFileError(f"{scan_file} has no /entry group")
            _write_parent(entry, name)
        logger.debug("parent of %s: %s", scan_file, name)


def find_parent(scan_file: str | os.PathLike[str]) -> Path | None:
    """The parent recorded in ``scan_file``, or None if it has none.

    Raises
    ------
    ScanFileError
        If the scan file is unreadable or its recorded parent does not exist.
    """
    scan_file = Path(scan_file)
    with _open(scan_file, "r") as f:
        item = f.get("entry/nxscans/parent")
        if not isinstance(item, h5py.Dataset):
            return None
        value: Any = item[()]
    if isinstance(value, bytes):
        value = value.decode()
    value = str(value).strip()
    if not value:
        return None
    parent = scan_file.parent / value
    if not parent.is_file():
        raise ScanFileError(
            f"{scan_file}: parent {value!r} (from /entry/nxscans/parent) does not exist at {parent}"
        )
    return parent


def check_data_link(scan_file: str | os.PathLike[str], entry: str) -> Path:
    """Check that ``/<entry>/data/data`` of a scan file resolves to a dataset.

    Returns
    -------
    Path
        The file holding the data (the linked ``fN.h5``, or the scan file itself).

    Raises
    ------
    ScanFileError
        If the scan file or entry is missing.
    DataLinkError
        If the link is missing or its target file or dataset does not exist; the
        message names the file expected.
    """
    scan_file = Path(scan_file)
    with _open(scan_file, "r") as f:
        if entry not in f:
            raise ScanFileError(f"{scan_file} has no entry {entry!r}")
        data = f[entry].get("data")
        if not isinstance(data, h5py.Group):
            raise DataLinkError(f"{scan_file}: /{entry}/data is missing")
        link = data.get("data", getlink=True)
        if link is None:
            raise DataLinkError(f"{scan_file}: /{entry}/data/data is missing")
        if not isinstance(link, h5py.ExternalLink):
            if "data" not in data:
                raise DataLinkError(f"{scan_file}: /{entry}/data/data is a dangling link")
            return scan_file
    target = Path(link.filename)
    if not target.is_absolute():
        target = scan_file.parent / target
    if not target.is_file():
        raise DataLinkError(
            f"{scan_file}: /{entry}/data/data links to {target}, which does not exist"
        )
    try:
        with h5py.File(target, "r") as df:
            if not isinstance(df.get(link.path), h5py.Dataset):
                raise DataLinkError(
                    f"{scan_file}: /{entry}/data/data links to {target}, which has no "
                    f"dataset {link.path}"
                )
    except OSError as exc:
        raise DataLinkError(f"{scan_file}: cannot read linked file {target}: {exc}") from exc
    return target
