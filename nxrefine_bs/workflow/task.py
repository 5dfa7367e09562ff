"""The unit of work: run one step on one entry of one scan file, wherever it lands.

:func:`run_task` is what every node of the graph executes, in a Dask worker or in a
local thread.  It receives plain data only (a :class:`~.graph.TaskSpec`, the database
URL and experiment, the results of its dependencies), so nothing heavy is ever
unpickled by the scheduler, and it opens its database connections lazily and
disposes them when it ends.  It

1. gives up (FAILED, "blocked") if a dependency failed;
2. claims the row atomically with a lease (a row left IN_PROGRESS by a dead process
   is taken over; one held by a live process of an overlapping submission is waited
   for), renewing the lease from a heartbeat thread while the step runs;
3. waits for requirements owned by another submission, and for the parent's
   orientation of a child scan, instead of failing;
4. removes stray ``.part`` files of an earlier killed attempt, runs the step, and
   records DONE or FAILED.

Step failures never raise (the row says FAILED, dependents are blocked); transient
I/O errors raise so that Dask's ``retries=`` runs the task again, until the last try.
"""

from __future__ import annotations

import inspect
import logging
import random
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py

from ..errors import WorkflowError
from ..nexus.provenance import process_done, read_process
from ..nexus.scanfile import open_scan_file
from ..reduce.steps import STEPS, Step, step_parameters
from .database import WorkflowDB
from .engine import dispose_engines
from .graph import TaskSpec, from_parent, requirements, safe_parent
from .leases import Claim
from .schema import Status
from .sync import rotation_entries

logger = logging.getLogger(__name__)

__all__ = ["DBArgs", "TransientIOError", "run_task", "stray_part_files"]

DBArgs = tuple[str, str | None, str, float]
"""``(url, experiment_dir, experiment, lease)``: how a task opens the database."""

TRANSIENT_MARKERS = (
    "resource temporarily unavailable",
    "unable to lock file",
    "stale file handle",
    "input/output error",
    "connection reset",
)

PART_FILES: dict[str, tuple[str, ...]] = {
    "nxprepare_mask": ("{entry}_mask.nxs.part",),
    "nxtransform": ("{entry}_transform.nxs.part", "{entry}_masked_transform.nxs.part"),
    "nxcombine": ("transform.nxs.part", "masked_transform.nxs.part"),
}
"""Temporary outputs (written, then renamed) of each process, in the scan directory.

A step may declare its own with a ``part_files`` attribute (same patterns)."""

POLL = 0.25


class TransientIOError(OSError):
    """A step hit an I/O error worth retrying (a file lock, a flaky network mount)."""


def open_db(db_args: DBArgs) -> WorkflowDB:
    """A :class:`WorkflowDB` from plain arguments (no connection opened yet)."""
    url, experiment_dir, experiment, lease = db_args
    return WorkflowDB(url, experiment_dir=experiment_dir, experiment=experiment, lease=lease)


def stray_part_files(scan_file: Path, entry: str, step: Step) -> list[Path]:
    """Temporary files an earlier, killed run of ``step`` on ``entry`` may have left."""
    sample_scan = scan_file.stem
    sample = scan_file.parent.parent.name
    scan = sample_scan[len(sample) + 1 :] if sample_scan.startswith(sample + "_") else sample_scan
    scan_dir = scan_file.parent / scan
    found = []
    patterns = getattr(step, "part_files", None) or PART_FILES.get(step.process, ())
    for pattern in patterns:
        path = scan_dir / pattern.format(entry=entry)
        if path.exists():
            found.append(path)
    return found


def _worker_name() -> str:
    try:
        from distributed import get_worker  # optional: dask.distributed, only in a Dask worker

        worker = get_worker()
        return f"dask:{worker.name}@{worker.address}"
    except (ImportError, ValueError):
        return f"thread:{threading.current_thread().name}"


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, TransientIOError | BlockingIOError | TimeoutError):
        return True
    text = str(exc).lower()
    return isinstance(exc, OSError) and any(m in text for m in TRANSIENT_MARKERS)


def _file_done(scan_file: Path, entry: str, process: str) -> dict[str, Any] | None:
    """The NXprocess record of ``process`` on ``entry`` (None if not done)."""
    with open_scan_file(scan_file) as f:
        group = f.get(entry)
        if isinstance(group, h5py.Group) and process_done(group, process):
            return read_process(group, process) or {}
    return None


def _wait_for(
    db: WorkflowDB, scan_file: Path, entry: str, step: Step, stop_at: float
) -> Status:
    """Wait while another submission runs or queues ``step``; its final status."""
    while True:
        rec = db.task(scan_file, entry, step.name)
        status = Status.NOT_STARTED if rec is None else rec.status
        if status is Status.IN_PROGRESS and rec is not None and rec.lease_expired:
            return Status.FAILED
        if status not in (Status.QUEUED, Status.IN_PROGRESS) or time.monotonic() > stop_at:
            return status
        time.sleep(POLL)


def _requirement_problem(
    db: WorkflowDB,
    spec: TaskSpec,
    registry: Mapping[str, Step],
    entries: Sequence[str],
    stop_at: float,
) -> str | None:
    """Why the step cannot run (None if every requirement is done in the file)."""
    scan_file = Path(spec.scan_file)
    checks: list[tuple[Path, str, Step, str]] = []
    try:
        pairs = requirements(spec.step, registry, spec.entry, entries, shared=False)
    except WorkflowError as exc:
        return str(exc)
    for req, target in pairs:
        checks.append((scan_file, target, req, f"requires {req.name} on {target}"))
    if from_parent(spec.step):
        parent = safe_parent(scan_file)
        if parent is not None:
            if not parent.exists():
                return (
                    f"parent scan {parent} does not exist; fix /entry/nxscans/parent or remove it"
                )
            checks.append((parent, spec.entry, spec.step, f"waiting for parent {parent.name}"))
    for path, entry, req, what in checks:
        if _file_done(path, entry, req.process) is not None:
            continue
        status = _wait_for(db, path, entry, req, stop_at)
        if status is Status.DONE and _file_done(path, entry, req.process) is not None:
            continue
        if path != scan_file:
            return (
                f"{what}: its orientation ({req.process}) on {entry} is not done; "
                "reduce the parent first, then retry this scan"
            )
        if status is Status.FAILED:
            return f"blocked: {what}, which failed"
        return f"blocked: {what}, which is not done; run {req.name} first"
    return None


class _Heartbeat:
    """Renews a task's lease every third of the lease time, in a daemon thread."""

    def __init__(self, db: WorkflowDB, spec: TaskSpec) -> None:
        self._db = db
        self._spec = spec
        self._stop = threading.Event()
        self.lost = False
        self._thread = threading.Thread(
            target=self._run, name=f"heartbeat-{spec.key}", daemon=True
        )

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        spec = self._spec
        while not self._stop.wait(self._db.lease / 3):
            try:
                if not self._db.heartbeat(spec.scan_file, spec.entry, spec.step.name, key=spec.key):
                    self.lost = True
                    logger.warning("%s: lost its lease (taken over or reset)", spec.key)
            except Exception as exc:  # a database hiccup must not kill the step
                logger.warning("%s: heartbeat failed: %s", spec.key, exc)


def _result(spec: TaskSpec, status: Status, message: str | None = None, **extra: Any) -> dict:
    return {
        "key": spec.key,
        "scan_file": spec.scan_file,
        "entry": spec.entry,
        "step": spec.step.name,
        "status": status.name.lower(),
        "message": message,
        **extra,
    }


def run_task(
    spec: TaskSpec,
    db_args: DBArgs,
    *dep_results: Mapping[str, Any] | None,
    registry: Mapping[str, Step] | None = None,
    progress: bool = False,
    max_attempts: int = 3,
    wait_timeout: float = 24 * 3600.0,
) -> dict[str, Any]:
    """Run one task of the graph; a summary dict (``status`` done, failed or skipped).

    Parameters
    ----------
    spec : TaskSpec
        What to run.
    db_args : tuple
        ``(url, experiment_dir, experiment, lease)`` of the workflow database.
    *dep_results : dict
        Results of the dependencies (passed by the executor).
    registry : mapping, optional
        Step registry for requirement lookup (default the global one).
    max_attempts : int
        Tries for transient I/O errors (the Dask ``retries`` + 1).
    wait_timeout : float
        Longest wait for a requirement owned by another submission.
    """
    registry = STEPS if registry is None else registry
    db = open_db(db_args)
    try:
        return _run(spec, db, dep_results, registry, progress, max_attempts, wait_timeout)
    finally:
        db.close()
        dispose_engines(db_args[0])


def _run(
    spec: TaskSpec,
    db: WorkflowDB,
    dep_results: Sequence[Mapping[str, Any] | None],
    registry: Mapping[str, Step],
    progress: bool,
    max_attempts: int,
    wait_timeout: float,
) -> dict[str, Any]:
    scan_file = Path(spec.scan_file)
    step, entry = spec.step, spec.entry
    label = f"{step.name} on {scan_file.name}:{entry}"
    for dep in dep_results:
        if (
            isinstance(dep, Mapping)
            and dep.get("status") == "failed"
            and dep.get("key") not in spec.soft
        ):
            other = Path(str(dep.get("scan_file")))
            of = "" if other == scan_file else f" of {other.name}"
            problem = f"blocked: requires {dep.get('step')} on {dep.get('entry')}{of}, which failed"
            db.fail(scan_file, entry, step.name, problem)
            logger.warning("%s: %s", label, problem)
            return _result(spec, Status.FAILED, problem)
    stop_at = time.monotonic() + wait_timeout
    worker = _worker_name()
    while True:
        outcome = db.claim(scan_file, entry, step.name, key=spec.key, worker=worker)
        if outcome != Claim.BUSY:
            break
        status = _wait_for(db, scan_file, entry, step, stop_at)
        if status is Status.DONE:
            return _result(spec, Status.DONE, "done by another submission")
        if time.monotonic() > stop_at:
            break
    if outcome == Claim.DONE:
        return _result(spec, Status.DONE, "already done")
    if outcome != Claim.CLAIMED:
        return _result(spec, Status.NOT_STARTED, "not queued (cancelled or reset)")
    with open_scan_file(scan_file) as f:
        entries = list(_entries(f))
    record = _file_done(scan_file, entry, step.process)
    if record is not None and not spec.overwrite:
        db.done(scan_file, entry, step.name, message="already done", record=record)
        return _result(spec, Status.DONE, "already done")
    with _Heartbeat(db, spec):
        blocked = _requirement_problem(db, spec, registry, entries, stop_at)
        if blocked is not None:
            problem = blocked
            db.fail(scan_file, entry, step.name, problem)
            logger.warning("%s: %s", label, problem)
            return _result(spec, Status.FAILED, problem)
        for stray in stray_part_files(scan_file, entry, step):
            logger.info("%s: removing %s left by an earlier, interrupted run", label, stray)
            stray.unlink(missing_ok=True)
        try:
            fn: Callable[..., Any] = step.load()
            kwargs = _kwargs(step, scan_file, spec.params, fn)
            out = fn(scan_file, entry, overwrite=spec.overwrite, progress=progress, **kwargs)
        except Exception as exc:  # one failing step must not stop the workflow
            message = f"{type(exc).__name__}: {exc}"
            attempts = (db.task(scan_file, entry, step.name) or _NoRecord).attempts
            if _is_transient(exc) and attempts < max_attempts:
                db.queue(
                    scan_file,
                    entry,
                    step.name,
                    params=spec.params,
                    overwrite=spec.overwrite,
                    key=spec.key,
                    retrying=True,
                )
                logger.warning("%s: transient error, will retry: %s", label, message)
                time.sleep(min(0.2 * 2**attempts, 5.0) * (0.5 + random.random()))
                raise
            logger.warning("%s failed: %s", label, message)
            logger.debug("%s", traceback.format_exc())
            db.fail(scan_file, entry, step.name, message)
            return _result(spec, Status.FAILED, message)
    db.done(scan_file, entry, step.name)
    logger.info("%s: done", label)
    summary = dict(out) if isinstance(out, Mapping) else None
    return _result(spec, Status.DONE, None, ran=True, summary=_small(summary))


class _NoRecord:
    attempts = 0


def _entries(f: h5py.File) -> list[str]:
    return rotation_entries(f)


def _small(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    """Keep scalar summary values only (results travel through the scheduler)."""
    if summary is None:
        return None
    return {k: v for k, v in summary.items() if isinstance(v, int | float | str | bool)}


def _kwargs(
    step: Step, scan_file: Path, params: Mapping[str, Any], fn: Callable[..., Any]
) -> dict[str, Any]:
    """Explicit parameters, resolved through the settings layers for registry steps."""
    explicit = dict(params or {})
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        sig = None
    if sig is not None and not any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()
    ):
        explicit = {k: v for k, v in explicit.items() if k in sig.parameters}
    if STEPS.get(step.name) == step:
        return step_parameters(step.name, scan_file, explicit)
    return explicit
