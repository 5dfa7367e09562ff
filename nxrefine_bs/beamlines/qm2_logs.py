"""QM2's SPEC logs of a rotation: what they say (:func:`rotation_logs`) and where they go
in the scan file (:func:`write_rotation_logs`).

The SPEC file is read with :mod:`silx.io.specfile` through :mod:`nxrefine_bs.specfile`.
A rotation is one SPEC scan whose command is ``<macro> phi START END N ...``; the
per-frame monitors are the ``flyc1``/``flyc2`` columns, the sample temperature the
``sampleT`` column, and the goniometer angles ``chi = 90 - SPEC chi`` and
``theta = SPEC th``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from numpy.typing import NDArray

from ..errors import SpecFileError
from ..nexus.h5tools import nx_group, write_field
from ..nexus.provenance import record_process
from ..specfile import SpecScan
from .images import RawRotation

__all__ = [
    "CHI_MOTOR",
    "MONITOR_COLUMNS",
    "MONITOR_SIGNAL",
    "ROTATION_MOTOR",
    "TEMPERATURE_COLUMN",
    "THETA_MOTOR",
    "ImportedRotation",
    "RotationLogs",
    "rotation_logs",
    "write_rotation_logs",
]

logger = logging.getLogger(__name__)

ROTATION_MOTOR = "phi"
CHI_MOTOR = "chi"
THETA_MOTOR = "th"
MONITOR_COLUMNS: tuple[str, ...] = ("flyc1", "flyc2")
MONITOR_SIGNAL = "flyc1"
TEMPERATURE_COLUMN = "sampleT"


@dataclass(frozen=True)
class RotationLogs:
    """What the SPEC file says about one rotation (one SPEC scan).

    Attributes
    ----------
    scan_number : int
        SPEC scan number.
    scan_key : str
        The scan as silx addresses it, ``"<number>.<order>"`` (``"4.2"`` is the second
        ``#S 4`` of the file).
    phi : numpy.ndarray
        Rotation angle of every frame (deg): ``phi_start + phi_step * i``.
    phi_step, phi_end : float
        Step per frame and end of the rotation (deg).
    chi, theta : float or None
        Goniometer angles in nxrefine-bs convention (``90 - SPEC chi``, ``SPEC th``).
    monitors : dict
        Per-frame monitor counts, e.g. ``{'flyc1': ..., 'flyc2': ...}``.
    columns : dict
        Every SPEC data column (per frame).
    temperature : numpy.ndarray or None
        The ``sampleT`` column.
    start_time : str or None
        ISO 8601 date of the scan (SPEC's local time).
    count_time : float or None
        Seconds per frame (``#T``).
    command : str
        The SPEC scan command.
    positioners : dict
        Motor positions at the start of the scan.
    """

    scan_number: int
    phi: NDArray[np.float64]
    phi_step: float
    phi_end: float
    chi: float | None
    theta: float | None
    monitors: dict[str, NDArray[np.float64]]
    columns: dict[str, NDArray[np.float64]]
    temperature: NDArray[np.float64] | None
    start_time: str | None
    count_time: float | None
    command: str
    positioners: dict[str, float] = field(default_factory=dict)
    scan_key: str = ""

    @property
    def nframes(self) -> int:
        """Number of frames."""
        return int(self.phi.size)


def _phi_from_command(scan: SpecScan) -> tuple[float, float, int] | None:
    """``(start, end, npoints)`` from ``... phi START END N ...`` in the command."""
    tokens = scan.command.split()
    for i, token in enumerate(tokens):
        if token.lower() != ROTATION_MOTOR:
            continue
        try:
            start, end, count = (float(t) for t in tokens[i + 1 : i + 4])
        except ValueError:
            continue
        if count != int(count) or count < 1:
            raise SpecFileError(
                f"{scan.where}: command {scan.command!r} gives {tokens[i + 3]!r} "
                "points for phi; expected a positive whole number"
            )
        return start, end, int(count)
    return None


def rotation_logs(scan: SpecScan, nframes: int | None = None) -> RotationLogs:
    """Extract the logs of one rotation from its SPEC scan.

    The phi range comes from the command (``<macro> phi START END N ...``: N frames of
    ``(END - START) / N`` degrees); without one, from a ``phi`` data column.

    Parameters
    ----------
    scan : SpecScan
        The SPEC scan.
    nframes : int, optional
        Number of frames (images) expected; every per-frame quantity must match it.

    Raises
    ------
    SpecFileError
        If a data row is malformed (:meth:`SpecScan.check_data`), the phi range cannot
        be found, the number of frames or data rows differs from ``nframes``, or a
        monitor column is missing.
    """
    scan.check_data()
    parsed = _phi_from_command(scan)
    if parsed is not None:
        start, end, count = parsed
        step = (end - start) / count
        if nframes is not None and count != nframes:
            raise SpecFileError(
                f"{scan.where}: command {scan.command!r} records {count} phi points, but "
                f"the image directory holds {nframes} frames"
            )
        phi = start + step * np.arange(count, dtype=np.float64)
    elif scan.has_column(ROTATION_MOTOR) and scan.nrows >= 2:
        phi = scan.column(ROTATION_MOTOR)
        step = float(np.median(np.diff(phi)))
        end = float(phi[-1] + step)
    else:
        raise SpecFileError(
            f"{scan.where}: cannot find the phi range; the command {scan.command!r} has no "
            f"'{ROTATION_MOTOR} START END N' and there is no '{ROTATION_MOTOR}' data column"
        )
    if not step > 0 and not step < 0:
        raise SpecFileError(f"{scan.where}: the phi step is zero")
    n = int(phi.size)
    if nframes is not None and n != nframes:
        raise SpecFileError(
            f"{scan.where}: the SPEC scan has {n} phi values but the image directory "
            f"holds {nframes} frames"
        )
    if scan.nrows != n:
        raise SpecFileError(
            f"{scan.where}: the SPEC scan has {scan.nrows} data rows for {n} frames; "
            "was the scan aborted?"
        )
    columns = scan.columns()
    monitors = {}
    for name in MONITOR_COLUMNS:
        if scan.has_column(name):
            monitors[name] = scan.column(name)
    if MONITOR_SIGNAL not in monitors:
        raise SpecFileError(
            f"{scan.where}: no '{MONITOR_SIGNAL}' monitor column; columns: "
            f"{', '.join(scan.labels) or 'none'}"
        )
    chi = theta = None
    try:
        chi = 90.0 - scan.positioner(CHI_MOTOR)
    except SpecFileError:
        logger.warning("%s: no '%s' position; keeping the configuration's chi", scan.where, "chi")
    try:
        theta = scan.positioner(THETA_MOTOR)
    except SpecFileError:
        logger.warning("%s: no '%s' position; keeping the configuration's theta", scan.where, "th")
    temperature = scan.column(TEMPERATURE_COLUMN) if scan.has_column(TEMPERATURE_COLUMN) else None
    return RotationLogs(
        scan_number=scan.number,
        phi=phi,
        phi_step=float(step),
        phi_end=float(end),
        chi=chi,
        theta=theta,
        monitors=monitors,
        columns=columns,
        temperature=temperature,
        start_time=scan.start_time,
        count_time=scan.count_time,
        command=scan.command,
        positioners=dict(scan.positioners),
        scan_key=scan.key,
    )


@dataclass
class ImportedRotation:
    """One rotation of an import, checked and ready to write.

    Attributes
    ----------
    entry : str
        The scan-file entry (``f1``...).
    raw : RawRotation
        Its image directory.
    logs : RotationLogs
        Its SPEC logs.
    target : Path
        The detector stack to write.
    dataset : str
        Path of the frames inside ``target``.
    """

    entry: str
    raw: RawRotation
    logs: RotationLogs
    target: Path
    dataset: str


def _safe_key(name: str) -> str:
    key = re.sub(r"[^0-9A-Za-z_]+", "_", name).strip("_")
    return key or "column"


def write_rotation_logs(
    f: h5py.File, rotations: Sequence[ImportedRotation], spec_file: Path
) -> None:
    """Write the SPEC logs of ``rotations`` into the open scan file ``f``.

    ``/entry/start_time`` is the earliest rotation's; each ``fN`` gets ``scan_number``,
    ``start_time``, the goniometer ``phi``/``chi``/``theta``, the frame time, the
    per-frame monitors (``monitor``, signal ``flyc1``), every SPEC column and the
    start positions in ``instrument/logs``, and an ``nxlink`` NXprocess record.
    """
    starts = [r.logs.start_time for r in rotations if r.logs.start_time]
    if starts:
        write_field(f["entry"], "start_time", min(starts))
    for rot in rotations:
        logs = rot.logs
        fe = f[rot.entry]
        n = logs.nframes
        write_field(fe, "scan_number", np.int64(logs.scan_number))
        if logs.start_time:
            write_field(fe, "start_time", logs.start_time)
        inst = nx_group(fe, "instrument", "NXinstrument")
        gon = nx_group(inst, "goniometer", "NXgoniometer")
        write_field(
            gon,
            "phi",
            logs.phi,
            units="degree",
            attrs={"step": np.float64(logs.phi_step), "end": np.float64(logs.phi_end)},
        )
        if logs.chi is not None:
            write_field(gon, "chi", np.float64(logs.chi), units="degree")
        if logs.theta is not None:
            write_field(gon, "theta", np.float64(logs.theta), units="degree")
        det = nx_group(inst, "detector", "NXdetector")
        if logs.count_time is not None:
            write_field(det, "frame_time", np.float64(logs.count_time), units="s")
        frame_time = float(logs.count_time) if logs.count_time is not None else None
        data = nx_group(fe, "data", "NXdata")
        write_field(data, "frame_number", np.arange(n, dtype=np.int32))
        if frame_time is not None:
            write_field(
                data,
                "frame_time",
                frame_time * np.arange(n, dtype=np.float64),
                units="s",
                attrs={"start": logs.start_time or ""},
            )
        mon = nx_group(fe, "monitor", "NXmonitor")
        for name, values in logs.monitors.items():
            write_field(mon, name, np.asarray(values, dtype=np.float64))
        write_field(mon, "frame_number", np.arange(n, dtype=np.int32))
        mon.attrs["signal"] = MONITOR_SIGNAL
        mon.attrs["axes"] = "frame_number"
        collection = nx_group(inst, "logs", "NXcollection")
        for name, values in logs.columns.items():
            write_field(collection, _safe_key(name), values, attrs={"spec_label": name})
        write_field(collection, "spec_command", logs.command)
        write_field(collection, "spec_scan", logs.scan_key)
        write_field(collection, "spec_file", str(spec_file))
        positions = nx_group(collection, "positioners", "NXcollection")
        for name, value in logs.positioners.items():
            write_field(positions, _safe_key(name), np.float64(value), attrs={"spec_name": name})
        record_process(
            fe,
            "nxlink",
            parameters={
                "spec_scan_number": logs.scan_number,
                "spec_scan": logs.scan_key,
                "images": str(rot.raw.directory),
                "frames": n,
            },
            summary={
                "frames": n,
                "monitors": sorted(logs.monitors),
                "stack": rot.target.name,
            },
        )
