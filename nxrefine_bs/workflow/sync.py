"""Rebuild workflow rows from the NXprocess records of the scan files.

The scan files are the truth: a step is done iff its NXprocess exists.  This module
sits above the persistence layer (:mod:`.database`), which knows nothing of NeXus
files or the step registry.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import h5py
from sqlalchemy.orm import Session

from ..errors import WorkflowError
from ..nexus.entries import rotation_entries
from ..nexus.provenance import process_done, read_process
from ..nexus.scanfile import open_scan_file
from ..reduce.steps import STEPS, Step
from ..reduce.steps import step_targets as scan_targets
from .database import WorkflowDB
from .schema import Status, parse_iso

logger = logging.getLogger(__name__)

__all__ = [
    "register_scan_steps",
    "registry_layout",
    "rotation_entries",
    "scan_targets",
    "sync_file",
    "sync_from_files",
]


def registry_layout(registry: Mapping[str, Step] | None = None) -> list[tuple[str, bool]]:
    """``[(step name, per_entry)]`` of a step registry, in order (for ``register_scan``)."""
    return [(s.name, s.per_entry) for s in (STEPS if registry is None else registry).values()]


def register_scan_steps(
    db: WorkflowDB,
    scan_file: str | os.PathLike[str],
    entries: Iterable[str],
    registry: Mapping[str, Step] | None = None,
) -> str:
    """Register a scan file with one row per task of every registry step."""
    return db.register_scan(scan_file, list(entries), steps=registry_layout(registry))


def is_scan_file(path: Path) -> bool:
    """True for ``<sample>/<label>/<sample>_<scan>.nxs`` (not parents, masks, transforms)."""
    sample = path.parent.parent.name
    stem = path.stem
    if not stem.startswith(sample + "_") or "_scans" in stem or "mask" in stem:
        return False
    return not stem.endswith("transform")


def sync_file(
    db: WorkflowDB,
    scan_file: str | os.PathLike[str],
    registry: Mapping[str, Step] | None = None,
) -> dict[str, Status]:
    """Update one scan file's rows from its NXprocess records.

    A step is DONE iff its NXprocess exists (times, host and pid come from the
    record); a row that says DONE without a record goes back to NOT_STARTED; QUEUED,
    IN_PROGRESS and FAILED rows without a record are kept.

    Returns
    -------
    dict
        Aggregated per-step status after the sync.
    """
    registry = STEPS if registry is None else registry
    path = Path(scan_file).absolute()
    records: dict[tuple[str, str], dict[str, Any] | None] = {}
    try:
        with open_scan_file(path) as f:
            entries = rotation_entries(f)
            for step in registry.values():
                for entry in scan_targets(step, entries):
                    group = f.get(entry)
                    if isinstance(group, h5py.Group) and process_done(group, step.process):
                        records[(entry, step.name)] = read_process(group, step.process) or {}
                    else:
                        records[(entry, step.name)] = None
    except OSError as exc:
        raise WorkflowError(f"cannot read scan file {path}: {exc}") from exc
    register_scan_steps(db, path, entries, registry)

    def fn(session: Session) -> None:
        row = db._require_file(session, path)
        row.entries = "|".join(entries)
        for (entry, step), record in records.items():
            task = db._task(session, row, entry, step)
            if record is not None:
                if task.status == Status.IN_PROGRESS:
                    continue  # being redone right now (overwrite)
                task.status = int(Status.DONE)
                task.start_time = parse_iso(record.get("start_time")) or task.start_time
                task.end_time = parse_iso(record.get("end_time")) or task.end_time
                task.host = record.get("host") or task.host
                pid = record.get("pid")
                task.pid = int(pid) if pid is not None else task.pid
                task.message = None
                task.lease_expires = None
            elif task.status == Status.DONE:
                task.status = int(Status.NOT_STARTED)
                task.start_time = task.end_time = None

    db._transaction(fn)
    return db.scan_status(path)


def sync_from_files(
    db: WorkflowDB,
    experiment_dir: str | os.PathLike[str] | None = None,
    *,
    prune: bool = True,
    registry: Mapping[str, Step] | None = None,
) -> list[str]:
    """Rebuild an experiment's rows from its scan files.

    Scan files are ``<experiment>/<sample>/<label>/<sample>_<scan>.nxs``; parent
    files (``*_scans.nxs``) and mask/transform files are skipped.  Only rows of the
    database's own experiment are touched.

    Parameters
    ----------
    experiment_dir : path-like, optional
        Defaults to the database's experiment directory.
    prune : bool
        Drop rows of registered files that no longer exist.

    Returns
    -------
    list of str
        Stored names of the files synced.
    """
    root = Path(experiment_dir).absolute() if experiment_dir else db.experiment_dir
    if root is None:
        raise WorkflowError(
            f"syncing {db.url} needs an experiment directory; pass --experiment DIR"
        )
    files = []
    for path in sorted(root.glob("*/*/*.nxs")):
        if not is_scan_file(path):
            continue
        try:
            sync_file(db, path, registry)
        except WorkflowError as exc:
            logger.warning("skipping %s: %s", path, exc)
            continue
        files.append(db.relative_name(path))
    if prune:
        for name in db.scan_files():
            if not db.absolute_path(name).exists():
                logger.info("dropping %s (file is gone)", name)
                db.unregister_scan(db.absolute_path(name))
    return files
