"""Post-scan reduction: queue the reduction of every rotation as soon as it is written.

:class:`PostScanReduction` is a *non-critical* callback.  On the ``stop`` document of a
successful rotation run it hands the configured per-rotation steps (``max``, ``find``,
``refine``...) for that entry to a :class:`~nxrefine_bs.workflow.queue.ReductionQueue`,
and after the last rotation of a scan it queues the per-scan steps (``combine``) to run
once the rotations' work is over.  The work runs on the queue's executor (threads by
default, or Dask), so the RunEngine is never blocked; every failure is recorded in the
workflow database and logged, never raised into the RunEngine.

Subscribe it *after* the :class:`~nxrefine_bs.callbacks.nexus_writer.NeXusScanWriter`
so the scan file is complete when the stop document arrives here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..reduce.steps import STEP_ORDER, get_step
from ..workflow.config import open_experiment_db, server_settings
from ..workflow.executor import make_executor
from ..workflow.queue import ReductionQueue
from .run_writer import scan_file_for_start

logger = logging.getLogger(__name__)

__all__ = ["PostScanReduction"]

DEFAULT_STEPS: tuple[str, ...] = ("max", "find", "refine", "transform", "combine")


class PostScanReduction:
    """Queue reduction steps for each finished rotation without blocking the scan.

    Parameters
    ----------
    steps : sequence of str
        Steps to run (default: max, find, refine, transform, combine).
    queue : ReductionQueue, optional
        Where to queue the work.  By default a queue is created on first use (one per
        experiment directory) as the ``[server]`` settings say: the workflow database
        ``[server] database`` (else the experiment's ``tasks/workflow.db``) and the
        executor ``[server] type`` (``dask`` with ``dask_scheduler``, else threads).
    settings : mapping, optional
        Server settings ``{section: {key: value}}`` for the default queues (default:
        the server settings file).
    params : mapping, optional
        Explicit step parameters (``threshold``, ``qh``...) for every job.
    on_queued : callable, optional
        Called with ``(scan_file, entry, jobs)`` after each submission (e.g. to
        register the scan in Tiled or to update a display).
    writer : NeXusScanWriter, optional
        The writer of the runs.  When given, each rotation is reduced only after the
        writer has finished its entry, and only if it recorded ``success`` (all
        frames and monitors present); the waiting happens off the RunEngine thread.
    """

    def __init__(
        self,
        steps: Sequence[str] = DEFAULT_STEPS,
        *,
        queue: Any | None = None,
        params: Mapping[str, Any] | None = None,
        on_queued: Callable[[Path, str, list[Any]], None] | None = None,
        writer: Any | None = None,
        settings: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        for name in steps:
            get_step(name)
        self.steps = tuple(s for s in STEP_ORDER if s in steps)
        self.params = dict(params or {})
        self.on_queued = on_queued
        self.writer = writer
        self.settings = settings
        self._waiters: list[threading.Thread] = []
        self._queue = queue
        self._queues: dict[Path, Any] = {}
        self._start: dict[str, Any] | None = None
        self._jobs: dict[Path, list[Any]] = {}
        self.errors: list[str] = []
        """Failures: submissions that raised, and failed steps seen by :meth:`wait`."""

    # ------------------------------------------------------------------ queues
    def queue_for(self, experiment_dir: Path) -> Any:
        """The queue used for an experiment (the one given, or a local default)."""
        if self._queue is not None:
            return self._queue
        if experiment_dir not in self._queues:
            settings = self.settings if self.settings is not None else server_settings()
            db = open_experiment_db(experiment_dir, settings=settings)
            executor = make_executor(settings=settings)
            self._queues[experiment_dir] = ReductionQueue(db, executor, own_executor=True)
        return self._queues[experiment_dir]

    def wait(self, timeout: float | None = None) -> list[Any]:
        """Wait for every queued reduction (for scripts and tests); return the results.

        Every failed step of the results is also added to :attr:`errors` as
        ``"<step> on <scan file>:<entry> failed: <message>"`` (the workflow database
        and the log hold the same message).

        Returns
        -------
        list of ScanResult
            One per job finished since the last call.
        """
        for waiter in self._waiters:
            waiter.join(timeout)
        self._waiters = [w for w in self._waiters if w.is_alive()]
        results: list[Any] = []
        queues = [self._queue] if self._queue is not None else list(self._queues.values())
        for q in queues:
            results.extend(q.wait(timeout))
        for result in results:
            for outcome in getattr(result, "failed", ()):
                message = (
                    f"{outcome.step} on {result.scan_file.name}:{outcome.entry} failed: "
                    f"{outcome.message}"
                )
                if message not in self.errors:
                    self.errors.append(message)
        return results

    def close(self) -> None:
        """Wait for and shut down the default queues created by this callback."""
        for q in self._queues.values():
            q.close(wait=True)
        self._queues.clear()

    # ------------------------------------------------------------------ documents
    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        try:
            if name == "start":
                self._start = doc if "nxrefine" in doc else None
            elif name == "stop" and self._start is not None:
                start, self._start = self._start, None
                if doc.get("exit_status") == "success" and self.writer is not None:
                    waiter = threading.Thread(
                        target=self._submit_when_written, args=(start,), daemon=True
                    )
                    self._waiters.append(waiter)
                    waiter.start()
                elif doc.get("exit_status") == "success":
                    self._submit(start)
                else:
                    logger.info(
                        "run %s ended with %s; not reducing it",
                        start.get("uid"),
                        doc.get("exit_status"),
                    )
        except Exception as exc:  # non-critical: never break the RunEngine
            message = f"post-scan reduction of run {doc.get('run_start', '?')} failed: {exc}"
            self.errors.append(message)
            logger.exception(message)

    def _submit_when_written(self, start: Mapping[str, Any]) -> None:
        uid = str(start.get("uid"))
        assert self.writer is not None  # only called when a writer is attached
        try:
            status = self.writer.wait_run(uid)
            if status != "success":
                logger.warning(
                    "run %s: the scan file records %s, not success; not reducing it",
                    uid,
                    status,
                )
                return
            self._submit(start)
        except Exception as exc:  # non-critical: log and record
            message = f"post-scan reduction of run {uid} failed: {exc}"
            self.errors.append(message)
            logger.exception(message)

    def _submit(self, start: Mapping[str, Any]) -> None:
        experiment_dir, scan_file, entry = scan_file_for_start(start)
        md = start["nxrefine"]
        queue = self.queue_for(experiment_dir)
        per_entry = [s for s in self.steps if get_step(s).per_entry]
        per_scan = [s for s in self.steps if not get_step(s).per_entry]
        jobs = []
        if per_entry:
            jobs = queue.submit(scan_file, steps=per_entry, entries=[entry], params=self.params)
            self._jobs.setdefault(scan_file, []).extend(jobs)
        last = int(md.get("rotation_index", 1)) >= int(md.get("rotations", 1))
        if per_scan and last:
            # the graph makes the per-scan steps wait for the rotations' pending tasks
            self._jobs.pop(scan_file, None)
            jobs += queue.submit(scan_file, steps=per_scan, params=self.params)
        logger.info("queued %s for %s:%s", ",".join(self.steps), scan_file.name, entry)
        if self.on_queued is not None:
            self.on_queued(scan_file, entry, jobs)
