"""Workflow database schema: task statuses, the ORM tables and read-only task records.

Tables (prefixed ``wf_`` so an older ``workflow.db`` in the same file is left alone)
-------------------------------------------------------------------------------------
``wf_meta``
    Key/value pairs; ``schema_version``.
``wf_experiments``
    One row per experiment sharing the database; ``key`` is the experiment
    directory (absolute POSIX path) or a name given by the facility.
``wf_scan_files``
    One row per scan file of an experiment: ``filename`` (relative to the experiment
    directory when inside it), sample, label, scan and the ``|``-joined entries.
``wf_tasks``
    One row per (scan file, entry, step): the *current* state (:class:`Status`),
    queue/start/end times (UTC, naive), host, pid and worker of the process running
    it, its lease (``lease_expires``, renewed by a heartbeat), the Dask key of the
    task that owns it, the job parameters it was submitted with (JSON) and the
    number of attempts.

This module imports nothing from the NeXus or reduction layers.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from ..errors import WorkflowError

__all__ = [
    "SCAN_ENTRY",
    "SCHEMA_VERSION",
    "Status",
    "TaskRecord",
    "aggregate_status",
    "status_symbols",
    "utcnow",
]

SCAN_ENTRY = "entry"
"""Entry name used for per-scan steps (``combine``), as in NXRefine."""

SCHEMA_VERSION = "2"
"""Stored in ``wf_meta``; bump when the tables change."""


class Status(enum.IntEnum):
    """Status of one task; the values are NXRefine's integer codes."""

    FAILED = -1
    NOT_STARTED = 0
    QUEUED = 1
    IN_PROGRESS = 2
    DONE = 3

    @classmethod
    def parse(cls, value: str | int | Status) -> Status:
        """Status from a name (any case, ``-`` or ``_``) or an NXRefine code."""
        if isinstance(value, Status):
            return value
        if isinstance(value, int):
            return cls(value)
        text = str(value).strip()
        try:
            return cls(int(text))
        except ValueError:
            pass
        try:
            return cls[text.upper().replace("-", "_").replace(" ", "_")]
        except KeyError:
            raise WorkflowError(
                f"unknown task status {value!r}; choose one of "
                + ", ".join(s.name.lower() for s in cls)
            ) from None


def aggregate_status(statuses: Iterable[Status | int]) -> Status:
    """Combine the statuses of one step over several entries (NXRefine's rules).

    All DONE -> DONE; any FAILED -> FAILED; any IN_PROGRESS -> IN_PROGRESS; any QUEUED
    -> IN_PROGRESS if some entry is DONE, else QUEUED; some DONE -> IN_PROGRESS;
    otherwise (or no entries) NOT_STARTED.
    """
    values = [Status(s) for s in statuses]
    if not values:
        return Status.NOT_STARTED
    if all(s is Status.DONE for s in values):
        return Status.DONE
    if Status.FAILED in values:
        return Status.FAILED
    if Status.IN_PROGRESS in values:
        return Status.IN_PROGRESS
    if Status.QUEUED in values:
        return Status.IN_PROGRESS if Status.DONE in values else Status.QUEUED
    if Status.DONE in values:
        return Status.IN_PROGRESS
    return Status.NOT_STARTED


def status_symbols() -> Mapping[Status, tuple[str, str]]:
    """Symbol and rich colour for each status (used by the CLI grid)."""
    return {
        Status.DONE: ("✓", "green"),
        Status.FAILED: ("✗", "bold red"),
        Status.IN_PROGRESS: ("▶", "yellow"),
        Status.QUEUED: ("○", "cyan"),
        Status.NOT_STARTED: ("·", "dim"),
    }


def utcnow() -> datetime:
    """The current UTC time as a naive datetime (how every time is stored)."""
    return datetime.now(UTC).replace(tzinfo=None)


def parse_iso(value: Any) -> datetime | None:
    """ISO time string (any zone) -> naive UTC datetime, or None."""
    if not value:
        return None
    try:
        dt = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    if dt.tzinfo is not None:
        dt = dt.astimezone(UTC).replace(tzinfo=None)
    return dt


# --------------------------------------------------------------------------- tables


class Base(DeclarativeBase):
    """Declarative base of the workflow tables."""


class MetaRow(Base):
    """``wf_meta``: key/value pairs (schema version)."""

    __tablename__ = "wf_meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(255))


class ExperimentRow(Base):
    """``wf_experiments``: one row per experiment sharing the database."""

    __tablename__ = "wf_experiments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(1024), unique=True)
    registered: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class ScanFileRow(Base):
    """``wf_scan_files``: one row per scan file of an experiment."""

    __tablename__ = "wf_scan_files"
    __table_args__ = (UniqueConstraint("experiment_id", "filename", name="uq_wf_scan_file"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    experiment_id: Mapped[int] = mapped_column(
        ForeignKey("wf_experiments.id", ondelete="CASCADE"), index=True
    )
    filename: Mapped[str] = mapped_column(String(1024), index=True)
    sample: Mapped[str | None] = mapped_column(String(255))
    label: Mapped[str | None] = mapped_column(String(255))
    scan: Mapped[str | None] = mapped_column(String(255))
    entries: Mapped[str] = mapped_column(String(1024), default="")
    registered: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    tasks: Mapped[list[TaskRow]] = relationship(
        back_populates="scan_file", cascade="all, delete-orphan", order_by="TaskRow.id"
    )


class TaskRow(Base):
    """``wf_tasks``: the current state of one (scan file, entry, step)."""

    __tablename__ = "wf_tasks"
    __table_args__ = (UniqueConstraint("file_id", "entry", "step", name="uq_wf_task"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    file_id: Mapped[int] = mapped_column(
        ForeignKey("wf_scan_files.id", ondelete="CASCADE"), index=True
    )
    entry: Mapped[str] = mapped_column(String(64))
    step: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[int] = mapped_column(Integer, default=int(Status.NOT_STARTED), index=True)
    queue_time: Mapped[datetime | None] = mapped_column(DateTime)
    start_time: Mapped[datetime | None] = mapped_column(DateTime)
    end_time: Mapped[datetime | None] = mapped_column(DateTime)
    lease_expires: Mapped[datetime | None] = mapped_column(DateTime)
    host: Mapped[str | None] = mapped_column(String(255))
    pid: Mapped[int | None] = mapped_column(Integer)
    worker: Mapped[str | None] = mapped_column(String(255))
    key: Mapped[str | None] = mapped_column(String(255))
    params: Mapped[str | None] = mapped_column(Text)
    overwrite: Mapped[int] = mapped_column(Integer, default=0)
    message: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    scan_file: Mapped[ScanFileRow] = relationship(back_populates="tasks")


@dataclass(frozen=True)
class TaskRecord:
    """A read-only snapshot of one task row."""

    id: int
    filename: str
    entry: str
    step: str
    status: Status
    queue_time: datetime | None
    start_time: datetime | None
    end_time: datetime | None
    host: str | None
    pid: int | None
    worker: str | None
    message: str | None
    attempts: int
    lease_expires: datetime | None = None
    key: str | None = None
    params: dict[str, Any] | None = None
    overwrite: bool = False

    @property
    def duration(self) -> float | None:
        """Run time in seconds (start to end), if both are known."""
        if self.start_time and self.end_time:
            return (self.end_time - self.start_time).total_seconds()
        return None

    @property
    def lease_expired(self) -> bool:
        """True for an IN_PROGRESS task whose lease ran out (its process is gone)."""
        return (
            self.status is Status.IN_PROGRESS
            and self.lease_expires is not None
            and self.lease_expires < utcnow()
        )


def decode_params(text: str | None) -> dict[str, Any] | None:
    """Stored JSON job parameters -> dict (None if none)."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def encode_params(params: Mapping[str, Any] | None) -> str | None:
    """Job parameters -> JSON text (tuples become lists)."""
    if params is None:
        return None
    try:
        return json.dumps(dict(params), sort_keys=True)
    except TypeError as exc:
        raise WorkflowError(
            f"job parameters {dict(params)!r} cannot be stored as JSON ({exc}); "
            "use numbers, strings, booleans and lists"
        ) from exc


def to_record(task: TaskRow, filename: str) -> TaskRecord:
    """Snapshot a task row."""
    return TaskRecord(
        id=task.id,
        filename=filename,
        entry=task.entry,
        step=task.step,
        status=Status(task.status),
        queue_time=task.queue_time,
        start_time=task.start_time,
        end_time=task.end_time,
        host=task.host,
        pid=task.pid,
        worker=task.worker,
        message=task.message,
        attempts=task.attempts or 0,
        lease_expires=task.lease_expires,
        key=task.key,
        params=decode_params(task.params),
        overwrite=bool(task.overwrite),
    )
