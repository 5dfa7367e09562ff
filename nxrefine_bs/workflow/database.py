"""Workflow-status database: which reduction step ran on which scan entry, and how it went.

A re-implementation of NXRefine's ``NXDatabase`` on SQLAlchemy 2, split by job:

* :mod:`.schema` -- statuses, tables, records;
* :mod:`.engine` -- engines per URL and process, lock retries, safe schema creation;
* :mod:`.leases` -- the task state machine and leases (:class:`TransitionsMixin`);
* :mod:`.queries` -- read-only queries (:class:`QueriesMixin`);
* this module -- :class:`WorkflowDB`: the URL, the experiment its rows belong to,
  sessions and scan-file rows;
* :mod:`.sync` (a higher layer) -- rebuilding rows from the NXprocess records.

The database is a cache: the NeXus scan files are the truth (a step is done iff its
NXprocess record exists).  One database may serve a whole facility: every row belongs
to an experiment (its directory, or a name), so experiments never see each other's
rows.  Nothing here imports the NeXus or reduction layers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..errors import WorkflowError
from .engine import dispose_engines, ensure_schema, get_engine, normalise_url, with_retry
from .leases import DEFAULT_LEASE, TransitionsMixin
from .queries import QueriesMixin
from .schema import (
    SCAN_ENTRY,
    ExperimentRow,
    ScanFileRow,
    Status,
    TaskRecord,
    TaskRow,
    aggregate_status,
    status_symbols,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DB_FILENAME",
    "SCAN_ENTRY",
    "Status",
    "TaskRecord",
    "WorkflowDB",
    "aggregate_status",
    "default_db_path",
    "status_symbols",
]

DB_FILENAME = "workflow.db"

T = TypeVar("T")


def default_db_path(experiment_dir: str | os.PathLike[str]) -> Path:
    """``<experiment>/tasks/workflow.db``."""
    return Path(experiment_dir) / "tasks" / DB_FILENAME


class WorkflowDB(TransitionsMixin, QueriesMixin):
    """The workflow-status rows of one experiment, in a local or a shared database.

    Parameters
    ----------
    url_or_experiment_dir : str or path-like
        An experiment directory (the database is ``<dir>/tasks/workflow.db``), a
        ``.db`` file, or any SQLAlchemy URL (``sqlite:///...``,
        ``postgresql://user@host/db``).
    experiment_dir : path-like, optional
        Directory that stored file names are relative to, and (unless
        ``experiment`` is given) the key of this experiment's rows.  Defaults to the
        experiment directory given or, for ``<experiment>/tasks/workflow.db``, its
        grand-parent.  Without one, names are absolute and the key is ``""``.
    experiment : str, optional
        Key of this experiment's rows (default: the experiment directory).
    busy_timeout : float
        Seconds a SQLite connection waits for a lock.
    retries : int
        How many times a transaction that met a locked database is retried.
    lease : float
        Seconds an IN_PROGRESS task stays owned without a heartbeat.

    Notes
    -----
    No connection is opened until the first query, and instances pickle as their
    URL and experiment, so they can be sent anywhere; each process opens (and
    :meth:`close` disposes) its own small connection pool.
    """

    def __init__(
        self,
        url_or_experiment_dir: str | os.PathLike[str],
        *,
        experiment_dir: str | os.PathLike[str] | None = None,
        experiment: str | None = None,
        busy_timeout: float = 30.0,
        retries: int = 10,
        lease: float = DEFAULT_LEASE,
    ) -> None:
        target = os.fspath(url_or_experiment_dir)
        root: Path | None = Path(experiment_dir).absolute() if experiment_dir else None
        if "://" in target:
            url = normalise_url(target)
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
        if lease <= 0:
            raise WorkflowError(f"workflow lease must be positive seconds, got {lease!r}")
        self.url = url
        self.experiment_dir = root
        self.experiment = experiment if experiment is not None else (
            root.as_posix() if root is not None else ""
        )
        self.busy_timeout = float(busy_timeout)
        self.retries = int(retries)
        self.lease = float(lease)
        self._experiment_id: int | None = None

    # ------------------------------------------------------------------ plumbing

    def __repr__(self) -> str:
        return f"WorkflowDB({self.url!r}, experiment={self.experiment!r})"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_experiment_id"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @property
    def engine(self) -> Engine:
        """This process's engine for :attr:`url` (schema checked on first use)."""
        engine = get_engine(self.url, self.busy_timeout)
        ensure_schema(engine, self.url, self.retries)
        return engine

    def close(self) -> None:
        """Release this process's pooled connections to the database."""
        dispose_engines(self.url)

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session

    def _transaction(self, fn: Callable[[Session], T]) -> T:
        def run() -> T:
            with self._session() as session:
                return fn(session)

        return with_retry(run, url=self.url, retries=self.retries)

    def _exp_id(self, session: Session) -> int:
        """Id of this experiment's row (created on first use, race-safe)."""
        if self._experiment_id is not None:
            return self._experiment_id
        found = session.scalar(select(ExperimentRow.id).where(ExperimentRow.key == self.experiment))
        if found is None:
            try:
                with session.begin_nested():
                    row = ExperimentRow(key=self.experiment)
                    session.add(row)
                found = row.id
            except IntegrityError:  # another process registered it just now
                found = session.scalar(
                    select(ExperimentRow.id).where(ExperimentRow.key == self.experiment)
                )
        if found is None:
            raise WorkflowError(f"experiment {self.experiment!r} could not be registered")
        self._experiment_id = int(found)
        return self._experiment_id

    def relative_name(self, scan_file: str | os.PathLike[str]) -> str:
        """The name under which ``scan_file`` is stored (POSIX, relative if possible)."""
        path = Path(os.fspath(scan_file))
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

    def absolute_path(self, name: str) -> Path:
        """The path of a stored file name."""
        path = Path(name)
        if path.is_absolute() or self.experiment_dir is None:
            return path
        return self.experiment_dir / path

    def _get_file(self, session: Session, scan_file: str | os.PathLike[str]) -> ScanFileRow | None:
        return session.scalars(
            select(ScanFileRow).where(
                ScanFileRow.experiment_id == self._exp_id(session),
                ScanFileRow.filename == self.relative_name(scan_file),
            )
        ).first()

    def _require_file(self, session: Session, scan_file: str | os.PathLike[str]) -> ScanFileRow:
        row = self._get_file(session, scan_file)
        if row is None:
            raise WorkflowError(
                f"scan file {self.relative_name(scan_file)} is not registered in {self.url} "
                f"(experiment {self.experiment!r}); queue it or run 'nxrefine-bs workflow sync'"
            )
        return row

    def _file_row(self, session: Session, scan_file: str | os.PathLike[str]) -> ScanFileRow:
        """The scan-file row, created if needed (race-safe)."""
        row = self._get_file(session, scan_file)
        if row is not None:
            return row
        name = self.relative_name(scan_file)
        sample = label = scan = None
        parts = Path(name).parts
        if len(parts) >= 3 and Path(name).stem.startswith(parts[-3] + "_"):
            sample, label = parts[-3], parts[-2]
            scan = Path(name).stem[len(sample) + 1 :]
        try:
            with session.begin_nested():
                row = ScanFileRow(
                    experiment_id=self._exp_id(session),
                    filename=name,
                    sample=sample,
                    label=label,
                    scan=scan,
                    entries="",
                )
                session.add(row)
        except IntegrityError:
            row = self._get_file(session, scan_file)
            assert row is not None
        return row

    def _task(self, session: Session, file_row: ScanFileRow, entry: str, step: str) -> TaskRow:
        """The task row, created if needed (race-safe)."""
        query = select(TaskRow).where(
            TaskRow.file_id == file_row.id, TaskRow.entry == entry, TaskRow.step == step
        )
        task = session.scalars(query).first()
        if task is None:
            try:
                with session.begin_nested():
                    task = TaskRow(file_id=file_row.id, entry=entry, step=step, attempts=0)
                    session.add(task)
            except IntegrityError:
                task = session.scalars(query).first()
                assert task is not None
        return task

    # ------------------------------------------------------------------ scan files

    def register_scan(
        self,
        scan_file: str | os.PathLike[str],
        entries: Sequence[str],
        *,
        steps: Iterable[tuple[str, bool]] = (),
    ) -> str:
        """Add (or update) a scan file and create NOT_STARTED rows for its tasks.

        Parameters
        ----------
        scan_file : path-like
            The scan file.
        entries : sequence of str
            Its rotation entries (``f1``...).
        steps : iterable of (name, per_entry)
            Steps to create rows for: per-entry steps get one row per entry,
            per-scan steps one row on ``entry``
            (see :func:`nxrefine_bs.workflow.sync.registry_layout`).

        Returns
        -------
        str
            The stored file name.
        """
        entries = list(entries)
        layout = list(steps)

        def fn(session: Session) -> str:
            row = self._file_row(session, scan_file)
            known = set(row.entries.split("|")) if row.entries else set()
            row.entries = "|".join(sorted(known | set(entries), key=lambda e: (len(e), e)))
            existing = {(t.entry, t.step) for t in row.tasks}
            for name, per_entry in layout:
                for entry in entries if per_entry else [SCAN_ENTRY]:
                    if (entry, name) not in existing:
                        session.add(TaskRow(file_id=row.id, entry=entry, step=name, attempts=0))
            return row.filename

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
        """Stored file names of this experiment, sorted."""

        def fn(session: Session) -> list[str]:
            query = select(ScanFileRow.filename).where(
                ScanFileRow.experiment_id == self._exp_id(session)
            )
            return sorted(session.scalars(query))

        return self._transaction(fn)

    def entries(self, scan_file: str | os.PathLike[str]) -> list[str]:
        """Rotation entries recorded for a scan file."""

        def fn(session: Session) -> list[str]:
            row = self._require_file(session, scan_file)
            return row.entries.split("|") if row.entries else []

        return self._transaction(fn)

    def experiments(self) -> list[str]:
        """Keys of every experiment in the database (not only this one)."""

        def fn(session: Session) -> list[str]:
            return sorted(session.scalars(select(ExperimentRow.key)))

        return self._transaction(fn)
