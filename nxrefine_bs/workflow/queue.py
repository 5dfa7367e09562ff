"""The reduction queue: the workflow database plus an executor.

``ReductionQueue.submit`` marks the tasks QUEUED in the database and hands one
:func:`~.executor.run_scan_steps` call per scan file to the executor; the worker claims
each task before running it, so :meth:`ReductionQueue.cancel` (or ``nxrefine-bs
workflow cancel`` from another process) stops tasks that have not started.  A scan
whose parent scan is being reduced by the same queue waits for the parent's job to
finish before it starts (the child's orientation step needs the parent's).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py

from ..errors import WorkflowError
from ..nexus.provenance import process_done
from ..nexus.scanfile import open_scan_file
from ..reduce.steps import STEPS, Step
from .database import Status, TaskRecord, WorkflowDB, rotation_entries, scan_targets
from .executor import (
    Executor,
    FutureLike,
    LocalExecutor,
    ScanResult,
    parent_scan_file,
    run_scan_steps,
    select_steps,
)

logger = logging.getLogger(__name__)

__all__ = ["Job", "ReductionQueue", "find_scan_files"]


def find_scan_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Expand files and directories into scan files (``<sample>_<scan>.nxs``).

    A directory is searched recursively for ``.nxs`` files whose name starts with
    the sample directory name; parent (``*_scans.nxs``), mask and transform files are
    skipped.  A file given explicitly is always kept.
    """
    out: list[Path] = []
    for item in paths:
        path = Path(item).expanduser().absolute()
        if path.is_file():
            out.append(path)
        elif path.is_dir():
            for nxs in sorted(path.rglob("*.nxs")):
                stem = nxs.stem
                sample = nxs.parent.parent.name
                if not stem.startswith(sample + "_") or "_scans" in stem:
                    continue
                if "mask" in stem or stem.endswith("transform"):
                    continue
                out.append(nxs)
        else:
            raise WorkflowError(f"{path} is neither a scan file nor a directory")
    seen: set[Path] = set()
    return [p for p in out if not (p in seen or seen.add(p))]


@dataclass
class Job:
    """One scan file handed to the executor."""

    scan_file: Path
    steps: list[str]
    entries: list[str]
    overwrite: bool = False
    params: dict[str, Any] = field(default_factory=dict)
    parent: Path | None = None
    future: FutureLike | None = None
    launched: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    collected: bool = False

    @property
    def deferred(self) -> bool:
        """True while the job waits for its parent's job."""
        return not self.launched.is_set()


class ReductionQueue:
    """Queue reduction work on scan files and track it in a :class:`WorkflowDB`.

    Parameters
    ----------
    db : WorkflowDB or URL or experiment directory
        The workflow database.
    executor : Executor, optional
        Where the work runs (default: a :class:`LocalExecutor` with 2 threads, shut
        down by :meth:`close`).
    registry : mapping, optional
        Step registry (default :data:`~nxrefine_bs.reduce.steps.STEPS`).
    params : mapping, optional
        Default step parameters, merged under the ones given to :meth:`submit`.
    progress : bool
        Progress bars in the steps.
    own_executor : bool, optional
        Whether :meth:`close` shuts the executor down (default: only if created here).
    """

    def __init__(
        self,
        db: WorkflowDB | str | os.PathLike[str],
        executor: Executor | None = None,
        *,
        registry: Mapping[str, Step] | None = None,
        params: Mapping[str, Any] | None = None,
        progress: bool = False,
        own_executor: bool | None = None,
    ) -> None:
        self.db = db if isinstance(db, WorkflowDB) else WorkflowDB(db)
        self._owns_executor = executor is None if own_executor is None else own_executor
        self.executor: Executor = executor if executor is not None else LocalExecutor(2)
        self.registry = dict(STEPS if registry is None else registry)
        self.params = dict(params or {})
        self.progress = progress
        self.jobs: list[Job] = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ReductionQueue({self.db!r}, {self.executor!r})"

    def __enter__(self) -> ReductionQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ submit

    def _pending_job(self, scan_file: Path) -> Job | None:
        with self._lock:
            for job in reversed(self.jobs):
                finished = job.future is not None and job.future.done()
                if job.scan_file == scan_file and not finished and job.error is None:
                    return job
        return None

    def _plan(
        self,
        scan_file: Path,
        steps: Iterable[str] | None,
        entries: Sequence[str] | None,
        overwrite: bool,
    ) -> tuple[list[str], list[str], list[tuple[str, str]]]:
        """Entries, step names and the (step, entry) tasks that need queuing."""
        chosen = select_steps(steps, self.registry)
        try:
            with open_scan_file(scan_file) as f:
                all_entries = rotation_entries(f)
                wanted = list(entries) if entries is not None else all_entries
                missing = [e for e in wanted if e not in all_entries]
                if missing:
                    raise WorkflowError(
                        f"{scan_file.name} has no entries {', '.join(missing)}; "
                        f"it has {', '.join(all_entries) or 'none'}"
                    )
                todo = []
                for step in chosen:
                    for entry in scan_targets(step, wanted):
                        group = f.get(entry)
                        done = isinstance(group, h5py.Group) and process_done(group, step.process)
                        if overwrite or not done:
                            todo.append((step.name, entry))
        except OSError as exc:
            raise WorkflowError(f"cannot open scan file {scan_file}: {exc}") from exc
        self.db.register_scan(scan_file, all_entries, steps=self.registry.values())
        return [s.name for s in chosen], wanted, todo

    def submit(
        self,
        scan_files: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
        steps: Iterable[str] | None = None,
        entries: Sequence[str] | None = None,
        overwrite: bool = False,
        params: Mapping[str, Any] | None = None,
        after: Iterable[Job] = (),
    ) -> list[Job]:
        """Queue steps on scan files (files or directories).

        Tasks already done in the file are not queued unless ``overwrite``.  A scan
        whose parent is queued in this queue starts after the parent's job ends; every
        job also waits for the jobs listed in ``after`` (e.g. a combine step waiting
        for the per-rotation work of the same scan).

        Returns
        -------
        list of Job
            One job per scan file with something to do.
        """
        if isinstance(scan_files, str | os.PathLike):
            scan_files = [scan_files]
        files = find_scan_files(scan_files)
        merged = {**self.params, **(params or {})}
        # Parents first, so a child submitted with its parent can wait for it.
        parents = {f: self._parent(f) for f in files}
        files.sort(key=lambda f: (parents[f] is not None and parents[f] in parents, str(f)))
        jobs = []
        for scan_file in files:
            step_names, wanted, todo = self._plan(scan_file, steps, entries, overwrite)
            if not todo:
                logger.info("%s: nothing to do", scan_file.name)
                continue
            for step, entry in todo:
                if not self.db.queue(scan_file, entry, step):
                    logger.warning("%s %s:%s is running already", step, scan_file.name, entry)
            job = Job(
                scan_file,
                step_names,
                wanted,
                overwrite=overwrite,
                params=merged,
                parent=parents[scan_file],
            )
            parent_job = self._pending_job(job.parent) if job.parent is not None else None
            with self._lock:
                self.jobs.append(job)
            waits = [j for j in after if j is not None and j is not job]
            if parent_job is not None:
                logger.info("%s waits for its parent %s", scan_file.name, job.parent.name)
                waits.append(parent_job)
            if waits:
                self._after(waits, job)
            else:
                self._launch(job)
            jobs.append(job)
        return jobs

    @staticmethod
    def _parent(scan_file: Path) -> Path | None:
        """The parent scan, or None (a broken pointer fails the child's refine later)."""
        try:
            return parent_scan_file(scan_file)
        except Exception as exc:
            logger.warning("%s: cannot resolve its parent scan: %s", scan_file.name, exc)
            return None

    def _after(self, earlier: Sequence[Job], job: Job) -> None:
        """Launch ``job`` once every job in ``earlier`` has finished (in a watcher thread)."""

        def watcher() -> None:
            for other in earlier:
                other.launched.wait()
                if other.future is None:
                    continue
                finished = threading.Event()
                other.future.add_done_callback(lambda _=None, ev=finished: ev.set())
                finished.wait()
            self._launch(job)

        threading.Thread(target=watcher, daemon=True, name="nxreduce-defer").start()

    def _launch(self, job: Job) -> None:
        try:
            job.future = self.executor.submit(
                run_scan_steps,
                job.scan_file,
                job.steps,
                job.entries,
                job.params,
                self.db,
                overwrite=job.overwrite,
                progress=self.progress,
                claim=True,
                registry=self.registry,
            )
        except Exception as exc:  # executor shut down, scheduler gone...
            job.error = exc
            for step in job.steps:
                for entry in scan_targets(self.registry[step], job.entries):
                    if self.db.task_status(job.scan_file, entry, step) is Status.QUEUED:
                        self.db.fail(job.scan_file, entry, step, f"could not submit: {exc}")
        finally:
            job.launched.set()

    # ------------------------------------------------------------------ retry / cancel

    def retry(
        self,
        scan_files: Iterable[str | os.PathLike[str]] | None = None,
        steps: Iterable[str] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> list[Job]:
        """Queue again every FAILED task (optionally of some scan files / steps).

        Returns
        -------
        list of Job
            The new jobs.
        """
        failed = self._tasks(Status.FAILED, scan_files, steps)
        by_file: dict[str, tuple[set[str], set[str]]] = {}
        for rec in failed:
            names, entries = by_file.setdefault(rec.filename, (set(), set()))
            names.add(rec.step)
            if rec.entry != "entry":
                entries.add(rec.entry)
        jobs = []
        for filename, (names, entries) in sorted(by_file.items()):
            path = self.db.absolute_path(filename)
            if not entries:
                with open_scan_file(path) as f:
                    entries = set(rotation_entries(f))
            jobs += self.submit(
                path,
                steps=names,
                entries=sorted(entries, key=lambda e: (len(e), e)),
                params=params,
            )
        return jobs

    def cancel(
        self,
        scan_files: Iterable[str | os.PathLike[str]] | None = None,
        steps: Iterable[str] | None = None,
    ) -> list[TaskRecord]:
        """Return QUEUED tasks to NOT_STARTED; running tasks finish.

        Workers skip cancelled tasks when they reach them; jobs of this queue that
        have not started are also cancelled in the executor.

        Returns
        -------
        list of TaskRecord
            The tasks cancelled (as they were before).
        """
        queued = self._tasks(Status.QUEUED, scan_files, steps)
        cancelled = [
            rec
            for rec in queued
            if self.db.cancel(self.db.absolute_path(rec.filename), rec.entry, rec.step)
        ]
        names = {self.db.absolute_path(rec.filename) for rec in cancelled}
        with self._lock:
            for job in self.jobs:
                if job.scan_file in names and job.future is not None and not job.future.done():
                    job.future.cancel()
        return cancelled

    def _tasks(
        self,
        status: Status,
        scan_files: Iterable[str | os.PathLike[str]] | None,
        steps: Iterable[str] | None,
    ) -> list[TaskRecord]:
        step_list = list(steps) if steps is not None else None
        if scan_files is None:
            return self.db.list_tasks(status=status, step=step_list)
        out: list[TaskRecord] = []
        for path in find_scan_files(scan_files):
            out += self.db.list_tasks(status=status, step=step_list, scan_file=path)
        return out

    # ------------------------------------------------------------------ wait

    def wait(self, timeout: float | None = None) -> list[ScanResult]:
        """Wait for the jobs not waited for yet (deferred ones included); return results.

        A cancelled job yields no result.  A job whose worker died yields no result
        and its tasks still IN_PROGRESS or QUEUED are marked FAILED, so none is lost.

        Raises
        ------
        WorkflowError
            If ``timeout`` seconds pass first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        results: list[ScanResult] = []
        index = 0
        while True:
            with self._lock:
                if index >= len(self.jobs):
                    break
                job = self.jobs[index]
            index += 1
            if job.collected:
                continue
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not job.launched.wait(remaining):
                raise WorkflowError(f"timed out waiting for {job.scan_file.name} to start")
            if job.future is None:
                job.collected = True
                continue
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                results.append(job.future.result(timeout=remaining))
            except TimeoutError as exc:
                raise WorkflowError(f"timed out waiting for {job.scan_file.name}") from exc
            except Exception as exc:  # cancelled future, lost worker
                name = type(exc).__name__.lower()
                if "timeout" in name:
                    raise WorkflowError(f"timed out waiting for {job.scan_file.name}") from exc
                job.error = exc
                if "cancelled" not in name:
                    self._orphaned(job, exc)
            job.collected = True
        return results

    def _orphaned(self, job: Job, exc: BaseException) -> None:
        logger.error("job for %s was lost: %r", job.scan_file.name, exc)
        for step in job.steps:
            for entry in scan_targets(self.registry[step], job.entries):
                status = self.db.task_status(job.scan_file, entry, step)
                if status in (Status.IN_PROGRESS, Status.QUEUED):
                    self.db.fail(job.scan_file, entry, step, f"job lost: {exc!r}")

    def detach(self) -> None:
        """Leave submitted Dask work running after this process exits."""
        detach = getattr(self.executor, "detach", None)
        if detach is None:
            raise WorkflowError("only a Dask executor can run work after the queue closes")
        detach([j.future for j in self.jobs if j.future is not None])

    def close(self, wait: bool = True) -> None:
        """Shut down the executor if this queue created it."""
        if self._owns_executor:
            self.executor.shutdown(wait=wait)
