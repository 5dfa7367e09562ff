"""Read-only queries on the task rows of one experiment (mixed into ``WorkflowDB``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .schema import ScanFileRow, Status, TaskRecord, TaskRow, aggregate_status, to_record

if TYPE_CHECKING:
    from .schema import ScanFileRow as _ScanFileRow

__all__ = ["QueriesMixin"]


def _entry_order(entry: str) -> tuple[int, str]:
    return (len(entry), entry)


class QueriesMixin:
    """Queries; needs the plumbing of :class:`~.database.WorkflowDB`."""

    _transaction: Callable[..., Any]
    _get_file: Callable[..., _ScanFileRow | None]
    _require_file: Callable[..., _ScanFileRow]
    _exp_id: Callable[[Session], int]
    relative_name: Callable[..., str]
    scan_files: Callable[[], list[str]]

    def task(self, scan_file: str | os.PathLike[str], entry: str, step: str) -> TaskRecord | None:
        """The task row, or None."""

        def fn(session: Session) -> TaskRecord | None:
            row = self._get_file(session, scan_file)
            if row is None:
                return None
            task = session.scalars(
                select(TaskRow).where(
                    TaskRow.file_id == row.id, TaskRow.entry == entry, TaskRow.step == step
                )
            ).first()
            return None if task is None else to_record(task, row.filename)

        return self._transaction(fn)

    def task_status(self, scan_file: str | os.PathLike[str], entry: str, step: str) -> Status:
        """Status of one task (NOT_STARTED if unknown)."""
        rec = self.task(scan_file, entry, step)
        return Status.NOT_STARTED if rec is None else rec.status

    def status(self, scan_file: str | os.PathLike[str]) -> dict[str, dict[str, Status]]:
        """Per-entry statuses ``{step: {entry: Status}}``, steps in the order first registered."""

        def fn(session: Session) -> dict[str, dict[str, Status]]:
            row = self._require_file(session, scan_file)
            out: dict[str, dict[str, Status]] = {}
            for task in sorted(row.tasks, key=lambda t: t.id):
                out.setdefault(task.step, {})[task.entry] = Status(task.status)
            return out

        table = self._transaction(fn)
        return {
            step: dict(sorted(entries.items(), key=lambda kv: _entry_order(kv[0])))
            for step, entries in table.items()
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
            query = (
                select(ScanFileRow.filename, TaskRow.step, TaskRow.status)
                .join(TaskRow)
                .where(ScanFileRow.experiment_id == self._exp_id(session))
                .order_by(TaskRow.id)
            )
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
        """Task rows of this experiment matching every filter given, newest first.

        Parameters
        ----------
        status : Status, name or code, or several
            Keep these statuses.
        step, entry : str or several
            Keep these steps / entries.
        scan_file : path-like
            Keep one scan file.
        pattern : str
            SQL ``LIKE`` pattern on the stored file name (``%`` wildcard, ``\\``
            escapes a literal ``%`` or ``_``).
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
            query = (
                select(TaskRow, ScanFileRow.filename)
                .join(ScanFileRow)
                .where(ScanFileRow.experiment_id == self._exp_id(session))
            )
            if status_codes is not None:
                query = query.where(TaskRow.status.in_(status_codes))
            if steps is not None:
                query = query.where(TaskRow.step.in_(steps))
            if entries is not None:
                query = query.where(TaskRow.entry.in_(entries))
            if name is not None:
                query = query.where(ScanFileRow.filename == name)
            if pattern is not None:
                query = query.where(ScanFileRow.filename.like(pattern, escape="\\"))
            query = query.order_by(
                TaskRow.end_time.desc().nulls_last(),
                TaskRow.start_time.desc().nulls_last(),
                TaskRow.queue_time.desc().nulls_last(),
                ScanFileRow.filename,
                TaskRow.id,
            )
            if limit is not None:
                query = query.limit(limit)
            return [to_record(task, filename) for task, filename in session.execute(query)]

        return self._transaction(fn)

    def running(self) -> list[TaskRecord]:
        """IN_PROGRESS tasks with their host, pid, worker and lease."""
        return self.list_tasks(status=Status.IN_PROGRESS)

    def counts(self) -> dict[Status, int]:
        """Number of tasks in each status."""
        counts = dict.fromkeys(Status, 0)
        for rec in self.list_tasks():
            counts[rec.status] += 1
        return counts
