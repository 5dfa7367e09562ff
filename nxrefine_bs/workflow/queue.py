"""The reduction queue: the workflow database plus an executor.

:meth:`ReductionQueue.submit` builds the graph of the requested work
(:func:`~.graph.build_graph`), marks its tasks QUEUED in the database together with
their job spec (parameters, overwrite, task key), and hands the whole graph to the
executor, which returns once the graph is in the engine: nothing waits in client
threads, so a client that exits loses nothing on a Dask scheduler.  Work still pending
from an earlier submission is not submitted twice: the new tasks depend on its keys.

:meth:`ReductionQueue.retry` rebuilds the graph of FAILED tasks from their stored job
specs, in dependency order; :meth:`ReductionQueue.cancel` un-queues tasks (they are
skipped when reached); :meth:`ReductionQueue.reset` returns stuck tasks to
NOT_STARTED.  Tasks whose lease ran out are turned FAILED before each submission.
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

from ..errors import WorkflowError
from ..reduce.steps import STEPS, Step
from .database import WorkflowDB
from .executor import Executor, FutureLike, LocalExecutor, ScanResult, db_args, group_results
from .graph import TaskSpec, build_graph, new_token
from .params import step_params
from .schema import Status, TaskRecord
from .sync import is_scan_file, register_scan_steps

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
            out.extend(nxs for nxs in sorted(path.rglob("*.nxs")) if is_scan_file(nxs))
        else:
            raise WorkflowError(f"{path} is neither a scan file nor a directory")
    return list(dict.fromkeys(out))


@dataclass
class Job:
    """The tasks of one scan file in one submission."""

    scan_file: Path
    steps: list[str]
    entries: list[str]
    tasks: list[TaskSpec] = field(default_factory=list)
    futures: dict[str, FutureLike] = field(default_factory=dict)
    collected: bool = False

    @property
    def keys(self) -> list[str]:
        """Task keys, in dependency order."""
        return [t.key for t in self.tasks]


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

    def _pending_keys(self) -> dict[tuple[str, str, str], str]:
        """``{(stored name, entry, step): key}`` of queued/running tasks the engine still has."""
        rows = self.db.list_tasks(status=[Status.QUEUED, Status.IN_PROGRESS])
        keyed = {(r.filename, r.entry, r.step): r.key for r in rows if r.key}
        alive = self.executor.pending(keyed.values()) if keyed else set()
        return {k: v for k, v in keyed.items() if v in alive}

    def _submit_graph(
        self,
        files: list[Path],
        *,
        steps: Iterable[str] | None,
        entries: Sequence[str] | None,
        params: Mapping[str, Any],
        overwrite: bool,
        only: set[tuple[Path, str, str]] | None = None,
        stored: Mapping[tuple[Path, str, str], TaskRecord] | None = None,
    ) -> list[Job]:
        self.db.expire_stale()
        pending = self._pending_keys()

        def running(scan_file: Path, entry: str, step: str) -> str | None:
            return pending.get((self.db.relative_name(scan_file), entry, step))

        def params_for(scan_file: Path, entry: str, step: str) -> Mapping[str, Any] | None:
            rec = (stored or {}).get((scan_file, entry, step))
            if rec is None or rec.params is None:
                return None
            return {**rec.params, **_for_step(params, step)}

        tasks, entries_of = build_graph(
            files,
            steps=steps,
            entries=entries,
            params=params,
            overwrite=overwrite,
            registry=self.registry,
            token=new_token(self.db.experiment),
            running=running,
            only=only,
            params_for=params_for if stored else None,
        )
        for scan_file, all_entries in entries_of.items():
            register_scan_steps(self.db, scan_file, all_entries, self.registry)
        for spec in tasks:
            if not self.db.queue(
                spec.scan_file,
                spec.entry,
                spec.step.name,
                params=spec.params,
                overwrite=spec.overwrite,
                key=spec.key,
                holder="local" if isinstance(self.executor, LocalExecutor) else None,
            ):
                logger.info("%s is running elsewhere; this task will wait for it", spec.key)
        jobs: dict[str, Job] = {}
        for spec in tasks:
            job = jobs.get(spec.scan_file)
            if job is None:
                path = Path(spec.scan_file)
                job = jobs[spec.scan_file] = Job(path, [], list(entries or entries_of[path]))
            if spec.step.name not in job.steps:
                job.steps.append(spec.step.name)
            job.tasks.append(spec)
        if not tasks:
            return []
        try:
            futures = self.executor.submit_graph(
                tasks,
                db_args(self.db),
                registry=self.registry,
                progress=self.progress,
            )
        except Exception as exc:  # executor shut down, scheduler gone...
            for spec in tasks:
                self.db.fail(spec.scan_file, spec.entry, spec.step.name, f"could not submit: {exc}")
            raise WorkflowError(f"could not submit {len(tasks)} task(s): {exc}") from exc
        for job in jobs.values():
            job.futures = {t.key: futures[t.key] for t in job.tasks}
        with self._lock:
            self.jobs.extend(jobs.values())
        return list(jobs.values())

    def submit(
        self,
        scan_files: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
        steps: Iterable[str] | None = None,
        entries: Sequence[str] | None = None,
        overwrite: bool = False,
        params: Mapping[str, Any] | None = None,
    ) -> list[Job]:
        """Queue steps on scan files (files or directories) and submit their graph.

        Tasks done in the file are not queued unless ``overwrite``; tasks still
        pending from an earlier submission are not queued again.

        Returns
        -------
        list of Job
            One job per scan file with something to do.
        """
        if isinstance(scan_files, str | os.PathLike):
            scan_files = [scan_files]
        files = find_scan_files(scan_files)
        merged = {**self.params, **(params or {})}
        jobs = self._submit_graph(
            files, steps=steps, entries=entries, params=merged, overwrite=overwrite
        )
        if not jobs:
            logger.info("nothing to do for %s", ", ".join(f.name for f in files))
        return jobs

    # ------------------------------------------------------------------ retry / cancel

    def retry(
        self,
        scan_files: Iterable[str | os.PathLike[str]] | None = None,
        steps: Iterable[str] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> list[Job]:
        """Submit every FAILED task again with the job spec it was submitted with.

        Parameters given here override the stored ones.  Tasks run in dependency
        order (parents before children, requirements first).

        Returns
        -------
        list of Job
            The new jobs.
        """
        self.db.expire_stale()
        failed = self._tasks(Status.FAILED, scan_files, steps)
        if not failed:
            return []
        stored = {(self.db.absolute_path(r.filename), r.entry, r.step): r for r in failed}
        files = sorted({path for path, _, _ in stored})
        names = sorted({r.step for r in failed})
        return self._submit_graph(
            files,
            steps=names,
            entries=None,
            params=dict(params or {}),
            overwrite=any(r.overwrite for r in failed),
            only=set(stored),
            stored=stored,
        )

    def cancel(
        self,
        scan_files: Iterable[str | os.PathLike[str]] | None = None,
        steps: Iterable[str] | None = None,
    ) -> list[TaskRecord]:
        """Return QUEUED tasks to NOT_STARTED; running tasks finish.

        Workers skip cancelled tasks when they reach them.

        Returns
        -------
        list of TaskRecord
            The tasks cancelled (as they were before).
        """
        queued = self._tasks(Status.QUEUED, scan_files, steps)
        return [
            rec
            for rec in queued
            if self.db.cancel(self.db.absolute_path(rec.filename), rec.entry, rec.step)
        ]

    def reset(self, *, stale_only: bool = False) -> list[TaskRecord]:
        """Return QUEUED and IN_PROGRESS tasks (only those with expired leases) to NOT_STARTED."""
        return self.db.reset_tasks(stale_only=stale_only)

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
        """Wait for the tasks of jobs not waited for yet; one result per job.

        Raises
        ------
        WorkflowError
            If ``timeout`` seconds pass first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        results: list[ScanResult] = []
        with self._lock:
            jobs = [j for j in self.jobs if not j.collected]
        for job in jobs:
            outputs: list[dict[str, Any]] = []
            for key, future in job.futures.items():
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    out = future.result(timeout=remaining)
                except Exception as exc:
                    name = type(exc).__name__.lower()
                    if "timeout" in name:
                        raise WorkflowError(
                            f"timed out after {timeout} s waiting for {key}; the work goes on "
                            "(follow it with 'nxrefine-bs workflow status')"
                        ) from exc
                    if "cancelled" in name:
                        continue
                    logger.error("task %s was lost: %r", key, exc)
                    spec = next(t for t in job.tasks if t.key == key)
                    out = {
                        "key": key,
                        "scan_file": spec.scan_file,
                        "entry": spec.entry,
                        "step": spec.step.name,
                        "status": "failed",
                        "message": f"lost: {exc!r}",
                    }
                if isinstance(out, dict):
                    outputs.append(out)
            job.collected = True
            results.extend(group_results(outputs))
        return results

    def detach(self) -> None:
        """Nothing to do: submitted graphs never depend on this client staying."""

    def close(self, wait: bool = True) -> None:
        """Shut down the executor if this queue created it."""
        if self._owns_executor:
            self.executor.shutdown(wait=wait)


def _for_step(params: Mapping[str, Any] | None, step: str) -> dict[str, Any]:
    return step_params(params, step)
