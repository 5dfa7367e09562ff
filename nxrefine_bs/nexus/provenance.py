"""Provenance records: one NXprocess per completed reduction step.

A step is *done* on an entry when ``<entry>/nxworkflow/<process>`` exists (NXRefine's
rule).  The record holds the program, version, parameters, start/end times, host, pid
and a JSON summary of the results.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import h5py
import numpy as np

from .. import __version__
from .h5tools import nx_group, read_field, write_field

logger = logging.getLogger(__name__)

__all__ = ["now_iso", "record_process", "process_done", "read_process", "remove_process"]

WORKFLOW_GROUP = "nxworkflow"


def now_iso() -> str:
    """Current time as an ISO-8601 string with time zone."""
    return datetime.now(UTC).astimezone().isoformat(timespec="seconds")


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def record_process(
    entry: h5py.Group,
    process: str,
    *,
    parameters: Mapping[str, Any] | None = None,
    start_time: str | None = None,
    end_time: str | None = None,
    summary: Mapping[str, Any] | None = None,
    note: str | None = None,
) -> h5py.Group:
    """Write ``entry/nxworkflow/<process>`` (NXprocess), replacing an older record.

    Parameters
    ----------
    entry : h5py.Group
        The NXentry (``entry`` or ``fN``) the step worked on.
    process : str
        Process name, e.g. ``"nxmax"``.
    parameters : mapping, optional
        Parameters used; scalars and strings become fields of an NXparameters group,
        other values are stored as JSON text.
    start_time, end_time : str, optional
        ISO times; ``end_time`` defaults to now.
    summary : mapping, optional
        Results summary, stored as JSON text in ``summary``.
    note : str, optional
        Free text (e.g. a fit report) stored in ``note/data``.
    """
    workflow = nx_group(entry, WORKFLOW_GROUP, "NXcollection")
    if process in workflow:
        del workflow[process]
    proc = nx_group(workflow, process, "NXprocess")
    sequence = len([k for k in workflow if k != process]) + 1
    write_field(proc, "program", process)
    write_field(proc, "sequence_index", np.int32(sequence))
    write_field(proc, "version", f"nxrefine-bs v{__version__}")
    end = end_time or now_iso()
    write_field(proc, "date", end)
    write_field(proc, "start_time", start_time or end)
    write_field(proc, "end_time", end)
    write_field(proc, "host", socket.gethostname())
    write_field(proc, "pid", np.int64(os.getpid()))
    params = nx_group(proc, "parameters", "NXparameters")
    for key, value in (parameters or {}).items():
        if value is None:
            continue
        if isinstance(value, str | int | float | bool | np.generic):
            write_field(params, key, value)
        else:
            write_field(params, key, json.dumps(_jsonable(value)), attrs={"format": "json"})
    if summary is not None:
        write_field(proc, "summary", json.dumps(_jsonable(summary)), attrs={"format": "json"})
    text = f"Current machine: {socket.gethostname()}\nCurrent directory: {os.getcwd()}\n"
    if note:
        text += note
    nxnote = nx_group(proc, "note", "NXnote")
    write_field(nxnote, "description", process)
    write_field(nxnote, "data", text)
    write_field(nxnote, "date", end)
    logger.debug("recorded %s in %s:%s", process, entry.file.filename, entry.name)
    return proc


def process_done(entry: h5py.Group, process: str) -> bool:
    """True if ``entry`` holds an NXprocess record for ``process`` (or a legacy bare one)."""
    return f"{WORKFLOW_GROUP}/{process}" in entry or (
        process in entry and entry[process].attrs.get("NX_class") in ("NXprocess", b"NXprocess")
    )


def read_process(entry: h5py.Group, process: str) -> dict[str, Any] | None:
    """Return a dict view of a process record, or None if the step was not done."""
    path = f"{WORKFLOW_GROUP}/{process}"
    if path not in entry:
        if process in entry and isinstance(entry[process], h5py.Group):
            path = process
        else:
            return None
    grp = entry[path]
    out: dict[str, Any] = {
        key: read_field(grp, key)
        for key in ("program", "version", "date", "start_time", "end_time", "host", "pid")
    }
    params: dict[str, Any] = {}
    if "parameters" in grp:
        for key, ds in grp["parameters"].items():
            val = read_field(grp["parameters"], key)
            if ds.attrs.get("format") == "json":
                val = json.loads(val)
            params[key] = val
    out["parameters"] = params
    summary = read_field(grp, "summary")
    out["summary"] = json.loads(summary) if summary else {}
    return out


def remove_process(entry: h5py.Group, process: str) -> bool:
    """Delete a process record; return True if one existed."""
    path = f"{WORKFLOW_GROUP}/{process}"
    if path in entry:
        del entry[path]
        return True
    return False
