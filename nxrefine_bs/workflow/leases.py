"""The task state machine and leases (mixed into :class:`~.database.WorkflowDB`).

::

    NOT_STARTED --queue--> QUEUED --claim--> IN_PROGRESS --done--> DONE
         ^                   |                  |   ^  \\--fail--> FAILED
         +------cancel-------+                  |   |
                                     lease runs out: expire_stale -> FAILED or QUEUED
                                     same Dask key rerun / expired: claim takes it over

A process running a task holds a *lease*: ``lease_expires`` is set when it claims the
task and renewed by :meth:`TransitionsMixin.heartbeat`.  A task whose lease ran out
belongs to a process that is gone (killed worker, killed client, rebooted host): a
new claim takes it over, and :meth:`TransitionsMixin.expire_stale` turns it back to
QUEUED or FAILED so that ``queue``, ``retry`` and ``status`` see the truth.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..errors import WorkflowError
from .schema import (
    SCAN_ENTRY,
    ScanFileRow,
    Status,
    TaskRecord,
    TaskRow,
    encode_params,
    parse_iso,
    to_record,
    utcnow,
)

if TYPE_CHECKING:
    from .schema import ScanFileRow as _ScanFileRow

__all__ = ["DEFAULT_LEASE", "Claim", "TransitionsMixin"]

DEFAULT_LEASE = 300.0
"""Seconds a running task stays owned without a heartbeat (``[server] lease``)."""


class Claim:
    """Outcomes of :meth:`TransitionsMixin.claim` (plain strings)."""

    CLAIMED = "claimed"
    """The caller now owns the task (IN_PROGRESS with its lease)."""
    BUSY = "busy"
    """Another live process owns it: wait and look again."""
    DONE = "done"
    """Done already."""
    SKIP = "skip"
    """Cancelled, failed elsewhere or never queued: do not run it."""


class TransitionsMixin:
    """State transitions of task rows; needs the plumbing of :class:`~.database.WorkflowDB`."""

    lease: float
    _transaction: Callable[..., Any]
    _file_row: Callable[..., _ScanFileRow]
    _get_file: Callable[..., _ScanFileRow | None]
    _task: Callable[..., TaskRow]
    _exp_id: Callable[[Session], int]

    def _transition(
        self,
        scan_file: str | os.PathLike[str],
        entry: str,
        step: str,
        update_fn: Callable[[TaskRow], Any],
    ) -> Any:
        def fn(session: Session) -> Any:
            row = self._file_row(session, scan_file)
            known = [e for e in (row.entries or "").split("|") if e]
            if entry != SCAN_ENTRY and entry not in known:
                row.entries = "|".join(sorted([*known, entry], key=lambda e: (len(e), e)))
            return update_fn(self._task(session, row, entry, step))

        return self._transaction(fn)

    def _own(self, task: TaskRow, worker: str | None, key: str | None) -> None:
        now = utcnow()
        task.status = int(Status.IN_PROGRESS)
        if task.queue_time is None:
            task.queue_time = now
        task.start_time = now
        task.end_time = None
        task.lease_expires = now + timedelta(seconds=self.lease)
        task.host = socket.gethostname()
        task.pid = os.getpid()
        task.worker = worker
        if key is not None:
            task.key = key
        task.message = None
        task.attempts = (task.attempts or 0) + 1

    # ------------------------------------------------------------------ transitions

    def queue(
        self,
        scan_file: str | os.PathLike[str],
        entry: str,
        step: str,
        *,
        params: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        key: str | None = None,
        retrying: bool = False,
        holder: str | None = None,
    ) -> bool:
        """Mark a task QUEUED with its job spec; False if a live process is running it.

        Parameters
        ----------
        params : mapping, optional
            The parameters the task is submitted with (stored as JSON, reused by
            ``retry``).
        overwrite : bool
            Whether the job redoes a step that is done.
        key : str, optional
            The Dask (or local) task key that will run it.
        retrying : bool
            The running task itself asks to be run again (a transient error): its
            own IN_PROGRESS row is requeued and the attempts are kept.
        holder : str, optional
            ``"local"`` when the queued task lives only in this process (a thread
            executor): its host and pid are recorded, and :meth:`expire_stale` fails
            the task if that process is gone before the task started.
        """
        spec = encode_params(params)

        def fn(task: TaskRow) -> bool:
            if task.status == Status.IN_PROGRESS and not _expired(task) and not retrying:
                return False
            if not retrying:
                task.attempts = 0
            task.status = int(Status.QUEUED)
            task.queue_time = utcnow()
            task.start_time = task.end_time = task.lease_expires = None
            task.message = None
            task.key = key
            task.params = spec
            task.overwrite = int(bool(overwrite))
            if holder is not None:
                task.worker = f"queued:{holder}"
                task.host = socket.gethostname()
                task.pid = os.getpid()
            return True

        return self._transition(scan_file, entry, step, fn)

    def claim(
        self,
        scan_file: str | os.PathLike[str],
        entry: str,
        step: str,
        *,
        key: str | None,
        worker: str | None = None,
    ) -> str:
        """Atomically take a task to run it; a :class:`Claim` outcome.

        A QUEUED task is claimed.  An IN_PROGRESS task is taken over when its lease
        ran out or when it carries the caller's own ``key`` (the scheduler reruns a
        key only after the worker that ran it died); otherwise it is BUSY.  A FAILED
        task is taken over only by its own key (its lease was expired meanwhile).
        """

        def fn(task: TaskRow) -> str:
            status = Status(task.status)
            if status is Status.QUEUED:
                self._own(task, worker, key)
                return Claim.CLAIMED
            if status is Status.IN_PROGRESS:
                if _expired(task) or (key is not None and task.key == key):
                    self._own(task, worker, key)
                    return Claim.CLAIMED
                return Claim.BUSY
            if status is Status.DONE:
                return Claim.DONE
            if status is Status.FAILED and key is not None and task.key == key:
                self._own(task, worker, key)
                return Claim.CLAIMED
            return Claim.SKIP

        return self._transition(scan_file, entry, step, fn)

    def heartbeat(
        self, scan_file: str | os.PathLike[str], entry: str, step: str, *, key: str | None
    ) -> bool:
        """Renew the lease of a task the caller runs; False if it lost the task."""

        def fn(task: TaskRow) -> bool:
            if task.status != Status.IN_PROGRESS or (key is not None and task.key != key):
                return False
            task.lease_expires = utcnow() + timedelta(seconds=self.lease)
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
        key: str | None = None,
    ) -> bool:
        """Mark a task IN_PROGRESS with start time, host, pid and a lease.

        Parameters
        ----------
        claim : bool
            If True, only a QUEUED task is started (atomically); returns False when
            the task was not QUEUED.
        """

        def fn(task: TaskRow) -> bool:
            if claim and task.status != Status.QUEUED:
                return False
            self._own(task, worker, key)
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
        """Mark a task DONE; ``record`` (an NXprocess record) supplies times, host, pid."""

        def fn(task: TaskRow) -> None:
            task.status = int(Status.DONE)
            task.end_time = utcnow()
            task.lease_expires = None
            if record:
                task.start_time = parse_iso(record.get("start_time")) or task.start_time
                task.end_time = parse_iso(record.get("end_time")) or task.end_time
                task.host = record.get("host") or task.host
                if record.get("pid") is not None:
                    task.pid = int(record["pid"])
            if task.start_time is None:
                task.start_time = task.end_time
            task.message = message

        self._transition(scan_file, entry, step, fn)

    def fail(
        self, scan_file: str | os.PathLike[str], entry: str, step: str, error: str | BaseException
    ) -> None:
        """Mark a task FAILED, storing the error message."""
        if isinstance(error, BaseException):
            error = f"{type(error).__name__}: {error}"

        def fn(task: TaskRow) -> None:
            task.status = int(Status.FAILED)
            task.end_time = utcnow()
            task.lease_expires = None
            task.message = str(error)

        self._transition(scan_file, entry, step, fn)

    def cancel(self, scan_file: str | os.PathLike[str], entry: str, step: str) -> bool:
        """Return a QUEUED task to NOT_STARTED; False if it was not queued."""

        def fn(session: Session) -> bool:
            row = self._get_file(session, scan_file)
            if row is None:
                raise WorkflowError(f"scan file {scan_file} is not registered")
            task = self._task(session, row, entry, step)
            if task.status != Status.QUEUED:
                return False
            task.status = int(Status.NOT_STARTED)
            task.queue_time = None
            task.message = "cancelled"
            return True

        return self._transaction(fn)

    def reset(self, scan_file: str | os.PathLike[str], entry: str, step: str) -> None:
        """Return a task to NOT_STARTED whatever its state."""

        def fn(task: TaskRow) -> None:
            _clear(task)

        self._transition(scan_file, entry, step, fn)

    # ------------------------------------------------------------------ many at once

    def _rows(
        self, session: Session, statuses: Iterable[Status]
    ) -> list[tuple[TaskRow, str]]:
        query = (
            select(TaskRow, ScanFileRow.filename)
            .join(ScanFileRow)
            .where(ScanFileRow.experiment_id == self._exp_id(session))
            .where(TaskRow.status.in_([int(s) for s in statuses]))
        )
        return list(session.execute(query).tuples())

    def expire_stale(self, *, requeue: bool = False) -> list[TaskRecord]:
        """Turn IN_PROGRESS tasks whose lease ran out to FAILED (or QUEUED).

        QUEUED tasks held by a local (thread) executor whose process on this host is
        gone are turned FAILED too: nothing will ever run them.

        Parameters
        ----------
        requeue : bool
            QUEUED instead of FAILED (for a scheduler that will run them again).

        Returns
        -------
        list of TaskRecord
            The tasks changed, as they were before.
        """

        def fn(session: Session) -> list[TaskRecord]:
            out = []
            for task, filename in self._rows(session, [Status.QUEUED]):
                if _orphaned(task):
                    out.append(to_record(task, filename))
                    task.status = int(Status.FAILED)
                    task.end_time = utcnow()
                    task.message = (
                        f"lost: the process that queued it (pid {task.pid} on {task.host}) "
                        "is gone; run 'nxrefine-bs workflow retry'"
                    )
            for task, filename in self._rows(session, [Status.IN_PROGRESS]):
                if not _expired(task):
                    continue
                out.append(to_record(task, filename))
                where = f"{task.worker or 'a worker'} on {task.host or '?'} (pid {task.pid})"
                if requeue:
                    task.status = int(Status.QUEUED)
                    task.message = f"lease expired: {where} stopped; queued again"
                else:
                    task.status = int(Status.FAILED)
                    task.end_time = utcnow()
                    task.message = (
                        f"lease expired: {where} stopped renewing it (killed worker, client "
                        "or host?); run 'nxrefine-bs workflow retry' to run it again"
                    )
                task.lease_expires = None
            return out

        return self._transaction(fn)

    def reset_tasks(self, *, stale_only: bool = False) -> list[TaskRecord]:
        """Return QUEUED and IN_PROGRESS tasks to NOT_STARTED (only expired ones if asked).

        Returns
        -------
        list of TaskRecord
            The tasks reset, as they were before.
        """

        def fn(session: Session) -> list[TaskRecord]:
            out = []
            for task, filename in self._rows(session, [Status.QUEUED, Status.IN_PROGRESS]):
                if stale_only and not _expired(task):
                    continue
                out.append(to_record(task, filename))
                _clear(task)
                task.message = "reset"
            return out

        return self._transaction(fn)


def _expired(task: TaskRow) -> bool:
    return task.lease_expires is not None and task.lease_expires < utcnow()


def _orphaned(task: TaskRow) -> bool:
    """A QUEUED task held by a thread executor whose process on this host has died."""
    if task.worker != "queued:local" or task.pid is None or task.host != socket.gethostname():
        return False
    try:
        os.kill(task.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _clear(task: TaskRow) -> None:
    task.status = int(Status.NOT_STARTED)
    task.queue_time = task.start_time = task.end_time = task.lease_expires = None
    task.message = None
