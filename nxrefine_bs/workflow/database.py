"""Workflow-status database: which reduction step ran on which scan entry, and how it went.

A re-implementation of NXRefine's ``NXDatabase`` on SQLAlchemy 2.  The database is a
cache: the NeXus scan files are the truth (a step is done iff its NXprocess record
exists), and :meth:`WorkflowDB.sync_from_files` rebuilds the database from them.

Tables
------
``scan_files``
    One row per scan file: ``filename`` (relative to the experiment directory when the
    file lies inside it, else absolute), sample, label, scan and the ``|``-joined
    rotation entries.
``tasks``
    One row per (scan file, entry, step) holding the *current* state: ``status``
    (:class:`Status`), queue/start/end times (UTC), host, pid, worker, the error
    message of the last failure and the number of attempts.

Concurrency
-----------
Several threads and processes (Dask workers, CLI invocations) may update one SQLite
file at once.  Every connection uses WAL journaling and a busy timeout, every
transaction is short and starts with ``BEGIN IMMEDIATE`` (so a writer never has to
upgrade a read lock, which SQLite answers with an immediate "database is locked"), and
any remaining ``OperationalError`` about a locked/busy database is retried with
back-off.  WAL needs a local file system: for workers on several hosts use a server
database URL (``postgresql://...``) instead of SQLite on NFS.
"""

from __future__ import annotations

import enum
import logging
import os
import random
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import h5py
from sqlalchemy import (
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from ..errors import WorkflowError
from ..nexus.provenance import process_done, read_process
from ..nexus.scanfile import open_scan_file
from ..nexus.scanfile import rotation_entries as _rotation_entries
from ..reduce.steps import STEPS, Step

logger = logging.getLogger(__name__)

__all__ = [
    "Status",
    "TaskRecord",
    "WorkflowDB",
    "aggregate_status",
    "default_db_path",
    "rotation_entries",
    "scan_targets",
    "SCAN_ENTRY",
    "status_symbols",
]

SCAN_ENTRY = "entry"
"""Entry name used for per-scan steps (``combine``), as in NXRefine."""

DB_FILENAME = "workflow.db"

T = TypeVar("T")


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


def _utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _parse_iso(value: Any) -> datetime | None:
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


def default_db_path(experiment_dir: str | os.PathLike[str]) -> Path:
    """``<experiment>/tasks/workflow.db``."""
    return Path(experiment_dir) / "tasks" / DB_FILENAME


def rotation_entries(h5file: h5py.File) -> list[str]:
    """Rotation entries ``f1``, ``f2``... of an open scan file, in numeric order."""
    return list(_rotation_entries(h5file))


def scan_targets(step: Step, entries: Sequence[str]) -> list[str]:
    """Entries a step works on: every rotation entry, or ``entry`` for per-scan steps."""
    return list(entries) if step.per_entry else [SCAN_ENTRY]


# --------------------------------------------------------------------------- schema


class _Base(DeclarativeBase):
    pass


class _ScanFile(_Base):
    __tablename__ = "scan_files"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    filename: Mapped[str] = mapped_column(String(1024), unique=True, index=True)
    sample: Mapped[str | None] = mapped_column(String(255))
    label: Mapped[str | None] = mapped_column(String(255))
    scan: Mapped[str | None] = mapped_column(String(255))
    entries: Mapped[str] = mapped_column(String(1024), default="")
    registered: Mapped[datetime] = mapped_column(DateTime, default=_utcnow)
    tasks: Mapped[list[_Task]] = relationship(
        back_populates="scan_file", cascade="all, delete-orphan"
    )


class _Task(_Base):
    __tablename__ = "tasks"
    __table_args__ = (UniqueConstraint("file_id", "entry", "step", name="uq_task"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    file_id: Mapped[int] = mapped_column(ForeignKey("scan_files.id", ondelete="CASCADE"))
    entry: Mapped[str] = mapped_column(String(64))
    step: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[int] = mapped_column(Integer, default=int(Status.NOT_STARTED), index=True)
    queue_time: Mapped[datetime | None] = mapped_column(DateTime)
    start_time: Mapped[datetime | None] = mapped_column(DateTime)
    end_time: Mapped[datetime | None] = mapped_column(DateTime)
    host: Mapped[str | None] = mapped_column(String(255))
    pid: Mapped[int | None] = mapped_column(Integer)
    worker: Mapped[str | None] = mapped_column(String(255))
    message: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    scan_file: Mapped[_ScanFile] = relationship(back_populates="tasks")


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

    @property
    def duration(self) -> float | None:
        """Run time in seconds (start to end), if both are known."""
        if self.start_time and self.end_time:
            return (self.end_time - self.start_time).total_seconds()
        return None


def _record(task: _Task, filename: str) -> TaskRecord:
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
        attempts=task.attempts,
    )


# --------------------------------------------------------------------------- engine


def _is_locked(exc: OperationalError) -> bool:
    text = str(exc.orig if exc.orig is not None else exc).lower()
    return "locked" in text or "busy" in text


def _make_engine(url: str, busy_timeout: float) -> Engine:
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(url, connect_args={"timeout": busy_timeout, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy emit BEGIN itself (pysqlite's implicit BEGIN is DEFERRED).
        dbapi_connection.isolation_level = None
        cur = dbapi_connection.cursor()
        cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        if ":memory:" not in url and url not in ("sqlite://", "sqlite:///"):
            cur.execute("PRAGMA journal_mode = WAL")
            cur.execute("PRAGMA synchronous = NORMAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


class WorkflowDB:
    """The workflow-status database of one experiment.

    Parameters
    ----------
    url_or_experiment_dir : str or path-like
        An experiment directory (the database is ``<dir>/tasks/workflow.db``), a
        ``.db`` file, or any SQLAlchemy URL (``sqlite:///...``, ``postgresql://...``).
    experiment_dir : path-like, optional
        Directory that stored file names are relative to.  Defaults to the experiment
        directory given or, for ``<experiment>/tasks/workflow.db``, its grand-parent.
        Without one, file names are stored as absolute paths.
    busy_timeout : float
        Seconds a connection waits for a lock before SQLite gives up.
    retries : int
        How many times a transaction that still met a locked database is retried.

    Notes
    -----
    Instances pickle as their URL, so they can be sent to Dask workers; each process
    opens its own connections.
    """

    def __init__(
        self,
        url_or_experiment_dir: str | os.PathLike[str],
        *,
        experiment_dir: str | os.PathLike[str] | None = None,
        busy_timeout: float = 30.0,
        retries: int = 10,
    ) -> None:
        target = os.fspath(url_or_experiment_dir)
        root: Path | None = Path(experiment_dir).absolute() if experiment_dir else None
        if "://" in target:
            url = target
            if root is None and url.startswith("sqlite:///"):
                db_file = Path(url[len("sqlite:///") :])
                if db_file.parent.name == "tasks":
                    root = db_file.parent.parent.absolute()
        else:
            path = Path(target).expanduser().absolute()
            if path.is_dir() or not path.suffix:
                root = root or path
                path = default_db_path(path)
            elif root is None and path.parent.name == "tasks":
                root = path.parent.parent
            path.parent.mkdir(parents=True, exist_ok=True)
            url = f"sqlite:///{path}"
        self.url = url
        self.experiment_dir = root
        self.busy_timeout = float(busy_timeout)
        self.retries = int(retries)
        self.engine = _make_engine(url, self.busy_timeout)
        self._with_retry(lambda: _Base.metadata.create_all(self.engine))

    # ------------------------------------------------------------------ plumbing

    def __repr__(self) -> str:
        return f"WorkflowDB({self.url!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "experiment_dir": self.experiment_dir,
            "busy_timeout": self.busy_timeout,
            "retries": self.retries,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(  # type: ignore[misc]
            state["url"],
            experiment_dir=state["experiment_dir"],
            busy_timeout=state["busy_timeout"],
            retries=state["retries"],
        )

    def close(self) -> None:
        """Release pooled connections."""
        self.engine.dispose()

    def _with_retry(self, fn: Callable[[], T]) -> T:
        delay = 0.02
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except OperationalError as exc:
                if not _is_locked(exc) or attempt == self.retries:
                    if _is_locked(exc):
                        raise WorkflowError(
                            f"workflow database {self.url} stayed locked after "
                            f"{self.retries} retries; is another process holding it open?"
                        ) from exc
                    raise
                logger.debug("database locked, retry %d: %s", attempt + 1, exc)
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 1.0)
        raise AssertionError("unreachable")  # pragma: no cover

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session

    def _transaction(self, fn: Callable[[Session], T]) -> T:
        def run() -> T:
            with self._session() as session:
                return fn(session)

        return self._with_retry(run)

    def relative_name(self, scan_file: str | os.PathLike[str]) -> str:
        """The name under which ``scan_file`` is stored (POSIX, relative if possible).

        A relative ``scan_file`` is taken as relative to the experiment directory (to
        the current directory when the database has none).
        """
        text = os.fspath(scan_file)
        path = Path(text)
        if not path.is_absolute():
            if self.experiment_dir is not None:
                return Path(os.path.normpath(path)).as_posix()
            path = path.absolute()
        path = Path(os.path.normpath(path))
        if self.experiment_dir is not None:
            try:
                return path.relative_to(self.experiment_dir).as_posix()
            except ValueError:
                pass
        return path.as_posix()

    def absolute_path(self, filename: str) -> Path:
        """Absolute path of a stored file name."""
        path = Path(filename)
        if path.is_absolute() or self.experiment_dir is None:
            return path
        return self.experiment_dir / path

    # ------------------------------------------------------------------ registration

    def _get_file(self, session: Session, scan_file: str | os.PathLike[str]) -> _ScanFile | None:
        name = self.relative_name(scan_file)
        return session.scalars(select(_ScanFile).where(_ScanFile.filename == name)).first()

    def _require_file(self, session: Session, scan_file: str | os.PathLike[str]) -> _ScanFile:
        row = self._get_file(session, scan_file)
        if row is None:
            raise WorkflowError(
                f"scan file {self.relative_name(scan_file)} is not registered in {self.url}; "
                "queue it or run 'nxrefine-bs workflow sync'"
            )
        return row

    def register_scan(
        self,
        scan_file: str | os.PathLike[str],
        entries: Sequence[str],
        *,
        steps: Iterable[str | Step] | None = None,
    ) -> str:
        """Add (or update) a scan file and create NOT_STARTED rows for its tasks.

        Parameters
        ----------
        scan_file : path-like
            The scan file.
        entries : sequence of str
            Its rotation entries (``f1``...).  Per-scan steps use ``entry``.
        steps : iterable of str or Step, optional
            Steps to create rows for (default: every step of the registry); names
            not in the registry are taken as per-entry steps.

        Returns
        -------
        str
            The stored file name.
        """
        name = self.relative_name(scan_file)
        entries = list(entries)
        step_objs = [
            s if isinstance(s, Step) else STEPS.get(s, Step(s, s, ""))
            for s in (STEPS.values() if steps is None else steps)
        ]
        sample = label = scan = None
        parts = Path(name).parts
        if len(parts) >= 3 and Path(name).stem.startswith(parts[-3] + "_"):
            sample, label = parts[-3], parts[-2]
            scan = Path(name).stem[len(sample) + 1 :]

        def fn(session: Session) -> str:
            row = self._get_file(session, scan_file)
            if row is None:
                row = _ScanFile(filename=name, sample=sample, label=label, scan=scan)
                session.add(row)
                session.flush()
            known = set(row.entries.split("|")) if row.entries else set()
            row.entries = "|".join(sorted(known | set(entries), key=lambda e: (len(e), e)))
            existing = {(t.entry, t.step) for t in row.tasks}
            for step in step_objs:
                for entry in scan_targets(step, entries):
                    if (entry, step.name) not in existing:
                        session.add(_Task(file_id=row.id, entry=entry, step=step.name))
            return name

        return self._transaction(fn)

    def unregister_scan(self, scan_file: str | os.PathLike[str]) -> bool:
        """Remove a scan file and its tasks; True if it was registered."""

        def fn(session: Session) -> bool:
            row = self._get_file(session, scan_file)
            if row is None:
                return False
            session.delete(row)
            return True

        return self._transaction(fn)

    def scan_files(self) -> list[str]:
        """Stored file names, sorted."""

        def fn(session: Session) -> list[str]:
            return sorted(session.scalars(select(_ScanFile.filename)))

        return self._transaction(fn)

    def entries(self, scan_file: str | os.PathLike[str]) -> list[str]:
        """Rotation entries recorded for a scan file."""

        def fn(session: Session) -> list[str]:
            row = self._require_file(session, scan_file)
            return row.entries.split("|") if row.entries else []

        return self._transaction(fn)

    # ------------------------------------------------------------------ transitions

    def _task(self, session: Session, file_row: _ScanFile, entry: str, step: str) -> _Task:
        task = session.scalars(
            select(_Task).where(
                _Task.file_id == file_row.id, _Task.entry == entry, _Task.step == step
            )
        ).first()
        if task is None:
            task = _Task(file_id=file_row.id, entry=entry, step=step, attempts=0)
            session.add(task)
            session.flush()
        return task

    def _transition(
        self,
        scan_file: str | os.PathLike[str],
        entry: str,
        step: str,
        update_fn: Callable[[_Task], bool],
        *,
        register: bool = True,
    ) -> bool:
        def fn(session: Session) -> bool:
            row = self._get_file(session, scan_file)
            if row is None:
                if not register:
                    raise WorkflowError(
                        f"scan file {self.relative_name(scan_file)} is not registered"
                    )
                row = _ScanFile(filename=self.relative_name(scan_file), entries="")
                session.add(row)
                session.flush()
            if entry != SCAN_ENTRY and entry not in (row.entries or "").split("|"):
                row.entries = "|".join([e for e in (row.entries or "").split("|") if e] + [entry])
            return update_fn(self._task(session, row, entry, step))

        return self._transaction(fn)

    def queue(self, scan_file: str | os.PathLike[str], entry: str, step: str) -> bool:
        """Mark a task QUEUED (unless it is IN_PROGRESS); False if it was running."""

        def fn(task: _Task) -> bool:
            if task.status == Status.IN_PROGRESS:
                return False
            task.status = int(Status.QUEUED)
            task.queue_time = _utcnow()
            task.start_time = task.end_time = None
            task.message = None
            return True

        return self._transition(scan_file, entry, step, fn)

    def start(
        self,
        scan_file: str | os.PathLike[str],
        entry: str,
        step: str,
        *,
        worker: str | None = None,
        claim: bool = False,
    ) -> bool:
        """Mark a task IN_PROGRESS with start time, host and pid.

        Parameters
        ----------
        claim : bool
            If True, only a QUEUED task is started (atomically), so a cancelled task
            is skipped; returns False when the task was not QUEUED.
        """

        def fn(task: _Task) -> bool:
            if claim and task.status != Status.QUEUED:
                return False
            task.status = int(Status.IN_PROGRESS)
            if task.queue_time is None:
                task.queue_time = _utcnow()
            task.start_time = _utcnow()
            task.end_time = None
            task.host = socket.gethostname()
            task.pid = os.getpid()
            task.worker = worker
            task.message = None
            task.attempts = (task.attempts or 0) + 1
            return True

        return self._transition(scan_file, entry, step, fn)

    def done(
        self,
        scan_file: str | os.PathLike[str],
        entry: str,
        step: str,
        *,
        message: str | None = None,
        record: Mapping[str, Any] | None = None,
    ) -> None:
        """Mark a task DONE with its end time.

        Parameters
        ----------
        message : str, optional
            A note (e.g. ``"already done"``).
        record : mapping, optional
            A provenance record (:func:`~nxrefine_bs.nexus.provenance.read_process`)
            whose start/end times, host and pid replace the current ones.
        """

        def fn(task: _Task) -> bool:
            task.status = int(Status.DONE)
            task.end_time = _utcnow()
            if record:
                task.start_time = _parse_iso(record.get("start_time")) or task.start_time
                task.end_time = _parse_iso(record.get("end_time")) or task.end_time
                task.host = record.get("host") or task.host
                if record.get("pid") is not None:
                    task.pid = int(record["pid"])
            if task.start_time is None:
                task.start_time = task.end_time
            task.message = message
            return True

        self._transition(scan_file, entry, step, fn)

    def fail(
        self, scan_file: str | os.PathLike[str], entry: str, step: str, error: str | BaseException
    ) -> None:
        """Mark a task FAILED, storing the error message."""
        if isinstance(error, BaseException):
            error = f"{type(error).__name__}: {error}"

        def fn(task: _Task) -> bool:
            task.status = int(Status.FAILED)
            task.end_time = _utcnow()
            task.message = str(error)
            return True

        self._transition(scan_file, entry, step, fn)

    def cancel(self, scan_file: str | os.PathLike[str], entry: str, step: str) -> bool:
        """Return a QUEUED task to NOT_STARTED; False if it was not queued."""

        def fn(task: _Task) -> bool:
            if task.status != Status.QUEUED:
                return False
            task.status = int(Status.NOT_STARTED)
            task.queue_time = None
            task.message = "cancelled"
            return True

        return self._transition(scan_file, entry, step, fn, register=False)

    def reset(self, scan_file: str | os.PathLike[str], entry: str, step: str) -> None:
        """Return a task to NOT_STARTED whatever its state."""

        def fn(task: _Task) -> bool:
            task.status = int(Status.NOT_STARTED)
            task.queue_time = task.start_time = task.end_time = None
            task.message = None
            return True

        self._transition(scan_file, entry, step, fn)

    # ------------------------------------------------------------------ queries

    def task(self, scan_file: str | os.PathLike[str], entry: str, step: str) -> TaskRecord | None:
        """The task row, or None."""

        def fn(session: Session) -> TaskRecord | None:
            row = self._get_file(session, scan_file)
            if row is None:
                return None
            task = session.scalars(
                select(_Task).where(
                    _Task.file_id == row.id, _Task.entry == entry, _Task.step == step
                )
            ).first()
            return None if task is None else _record(task, row.filename)

        return self._transaction(fn)

    def task_status(self, scan_file: str | os.PathLike[str], entry: str, step: str) -> Status:
        """Status of one task (NOT_STARTED if unknown)."""
        rec = self.task(scan_file, entry, step)
        return Status.NOT_STARTED if rec is None else rec.status

    def status(self, scan_file: str | os.PathLike[str]) -> dict[str, dict[str, Status]]:
        """Per-entry statuses: ``{step: {entry: Status}}`` in registry order."""

        def fn(session: Session) -> dict[str, dict[str, Status]]:
            row = self._require_file(session, scan_file)
            out: dict[str, dict[str, Status]] = {}
            for task in row.tasks:
                out.setdefault(task.step, {})[task.entry] = Status(task.status)
            return out

        table = self._transaction(fn)
        order = {name: i for i, name in enumerate(STEPS)}
        return {
            step: dict(sorted(table[step].items(), key=lambda kv: (len(kv[0]), kv[0])))
            for step in sorted(table, key=lambda s: (order.get(s, len(order)), s))
        }

    def scan_status(self, scan_file: str | os.PathLike[str]) -> dict[str, Status]:
        """Per-step status of a scan, aggregated over entries with :func:`aggregate_status`."""
        return {step: aggregate_status(e.values()) for step, e in self.status(scan_file).items()}

    def status_table(
        self, scan_files: Iterable[str | os.PathLike[str]] | None = None
    ) -> dict[str, dict[str, Status]]:
        """``{filename: {step: aggregated Status}}`` for many scans (all by default)."""
        names = (
            self.scan_files() if scan_files is None else [self.relative_name(f) for f in scan_files]
        )

        def fn(session: Session) -> dict[str, dict[str, list[Status]]]:
            raw: dict[str, dict[str, list[Status]]] = {name: {} for name in names}
            query = select(_ScanFile.filename, _Task.step, _Task.status).join(_Task)
            for filename, step, status in session.execute(query):
                if filename in raw:
                    raw[filename].setdefault(step, []).append(Status(status))
            return raw

        raw = self._transaction(fn)
        return {
            name: {step: aggregate_status(values) for step, values in steps.items()}
            for name, steps in sorted(raw.items())
        }

    def list_tasks(
        self,
        *,
        status: Status | str | int | Iterable[Status | str | int] | None = None,
        step: str | Iterable[str] | None = None,
        scan_file: str | os.PathLike[str] | None = None,
        entry: str | Iterable[str] | None = None,
        pattern: str | None = None,
        limit: int | None = None,
    ) -> list[TaskRecord]:
        """Task rows matching every filter given, most recently changed first.

        Parameters
        ----------
        status : Status, name or code, or several
            Keep these statuses.
        step, entry : str or several
            Keep these steps / entries.
        scan_file : path-like
            Keep one scan file.
        pattern : str
            SQL ``LIKE`` pattern on the stored file name (``%`` wildcard).
        limit : int
            At most this many rows.
        """

        def many(value: Any) -> list[Any] | None:
            if value is None:
                return None
            if isinstance(value, str | int | Status):
                return [value]
            return list(value)

        statuses = many(status)
        status_codes = None if statuses is None else [int(Status.parse(s)) for s in statuses]
        steps = many(step)
        entries = many(entry)
        name = None if scan_file is None else self.relative_name(scan_file)

        def fn(session: Session) -> list[TaskRecord]:
            query = select(_Task, _ScanFile.filename).join(_ScanFile)
            if status_codes is not None:
                query = query.where(_Task.status.in_(status_codes))
            if steps is not None:
                query = query.where(_Task.step.in_(steps))
            if entries is not None:
                query = query.where(_Task.entry.in_(entries))
            if name is not None:
                query = query.where(_ScanFile.filename == name)
            if pattern is not None:
                query = query.where(_ScanFile.filename.like(pattern))
            query = query.order_by(
                _Task.end_time.desc().nulls_last(),
                _Task.start_time.desc().nulls_last(),
                _Task.queue_time.desc().nulls_last(),
                _ScanFile.filename,
                _Task.id,
            )
            if limit is not None:
                query = query.limit(limit)
            return [_record(task, filename) for task, filename in session.execute(query)]

        return self._transaction(fn)

    def counts(self) -> dict[Status, int]:
        """Number of tasks in each status."""
        counts = dict.fromkeys(Status, 0)
        for rec in self.list_tasks():
            counts[rec.status] += 1
        return counts

    # ------------------------------------------------------------------ sync

    def sync_file(self, scan_file: str | os.PathLike[str]) -> dict[str, Status]:
        """Update one scan file's rows from its NXprocess records.

        A step is DONE iff its NXprocess exists (times, host and pid come from the
        record); a DB row that says DONE without a record goes back to NOT_STARTED;
        QUEUED, IN_PROGRESS and FAILED rows without a record are kept.

        Returns
        -------
        dict
            Aggregated per-step status after the sync.
        """
        path = Path(scan_file).absolute()
        records: dict[tuple[str, str], dict[str, Any] | None] = {}
        try:
            with open_scan_file(path) as f:
                entries = rotation_entries(f)
                for step in STEPS.values():
                    for entry in scan_targets(step, entries):
                        group = f.get(entry)
                        if isinstance(group, h5py.Group) and process_done(group, step.process):
                            records[(entry, step.name)] = read_process(group, step.process) or {}
                        else:
                            records[(entry, step.name)] = None
        except OSError as exc:
            raise WorkflowError(f"cannot read scan file {path}: {exc}") from exc
        self.register_scan(path, entries)

        def fn(session: Session) -> None:
            row = self._require_file(session, path)
            row.entries = "|".join(entries)
            for (entry, step), record in records.items():
                task = self._task(session, row, entry, step)
                if record is not None:
                    if task.status == Status.IN_PROGRESS:
                        continue  # being redone right now (overwrite)
                    task.status = int(Status.DONE)
                    task.start_time = _parse_iso(record.get("start_time")) or task.start_time
                    task.end_time = _parse_iso(record.get("end_time")) or task.end_time
                    task.host = record.get("host") or task.host
                    pid = record.get("pid")
                    task.pid = int(pid) if pid is not None else task.pid
                    task.message = None
                elif task.status == Status.DONE:
                    task.status = int(Status.NOT_STARTED)
                    task.start_time = task.end_time = None

        self._transaction(fn)
        return self.scan_status(path)

    def sync_from_files(
        self, experiment_dir: str | os.PathLike[str] | None = None, *, prune: bool = True
    ) -> list[str]:
        """Rebuild the database from the scan files of an experiment.

        Scan files are ``<experiment>/<sample>/<label>/<sample>_<scan>.nxs``; parent
        files (``*_scans.nxs``) and mask/transform files are skipped.

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
        root = Path(experiment_dir).absolute() if experiment_dir else self.experiment_dir
        if root is None:
            raise WorkflowError(f"sync_from_files needs an experiment directory for {self.url}")
        files = []
        for path in sorted(root.glob("*/*/*.nxs")):
            sample = path.parent.parent.name
            stem = path.stem
            if not stem.startswith(sample + "_") or "_scans" in stem or "mask" in stem:
                continue
            if stem.endswith("transform"):
                continue
            try:
                self.sync_file(path)
            except WorkflowError as exc:
                logger.warning("skipping %s: %s", path, exc)
                continue
            files.append(self.relative_name(path))
        if prune:
            for name in self.scan_files():
                if not self.absolute_path(name).exists():
                    logger.info("dropping %s (file is gone)", name)
                    self.unregister_scan(self.absolute_path(name))
        return files


def status_symbols() -> Mapping[Status, tuple[str, str]]:
    """Symbol and rich colour for each status (used by the CLI grid)."""
    return {
        Status.DONE: ("✓", "green"),
        Status.FAILED: ("✗", "bold red"),
        Status.IN_PROGRESS: ("▶", "yellow"),
        Status.QUEUED: ("○", "cyan"),
        Status.NOT_STARTED: ("·", "dim"),
    }
