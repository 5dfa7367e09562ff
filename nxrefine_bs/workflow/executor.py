"""Where the reduction graph runs: threads in this process, or a Dask cluster.

Both executors take the same graph (:class:`~.graph.TaskSpec` list, dependencies as
keys) and run :func:`~.task.run_task` on each node:

* :class:`LocalExecutor` -- a thread pool; a task is handed to the pool once its
  dependencies are finished (nothing waits in a pool thread), and memory-heavy
  tasks take a slot of a small semaphore so two never run at once.
* :class:`DaskExecutor` -- one Dask task per node with its dependencies as futures,
  readable keys, ``retries=`` for transient I/O errors and ``resources=`` for
  memory-heavy steps on workers that advertise ``reduce_memory``.  Every future is
  handed to ``fire_and_forget`` and :meth:`DaskExecutor.submit_graph` returns only
  once the scheduler holds every key, so a client that detaches or dies loses
  nothing.

:func:`run_scan_steps` runs one scan's graph serially in the calling thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..errors import WorkflowError
from ..reduce.steps import STEPS, Step
from ..settings_schema import NXREFINE_SERVER_TYPES
from .config import server_settings
from .database import WorkflowDB
from .graph import TaskSpec, build_graph, new_token
from .schema import Status
from .sync import register_scan_steps
from .task import DBArgs, run_task

logger = logging.getLogger(__name__)

__all__ = [
    "HEAVY_RESOURCE",
    "DaskExecutor",
    "Executor",
    "FutureLike",
    "LocalExecutor",
    "ScanResult",
    "StepOutcome",
    "db_args",
    "make_executor",
    "run_scan_steps",
]

HEAVY_RESOURCE = "reduce_memory"
"""Dask worker resource a memory-heavy task takes one unit of (``--resources``)."""

DEFAULT_RETRIES = 3


def db_args(db: WorkflowDB) -> DBArgs:
    """What a task needs to open the database: plain strings and a number."""
    root = None if db.experiment_dir is None else str(db.experiment_dir)
    return (db.url, root, db.experiment, db.lease)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class StepOutcome:
    """What happened to one step on one entry (DONE, FAILED or NOT_STARTED = skipped)."""

    step: str
    entry: str
    status: Status
    message: str | None = None
    result: dict[str, Any] | None = None
    ran: bool = False

    @classmethod
    def from_task(cls, out: Mapping[str, Any]) -> StepOutcome:
        """From the dict :func:`~.task.run_task` returns."""
        return cls(
            step=str(out["step"]),
            entry=str(out["entry"]),
            status=Status.parse(str(out["status"])),
            message=out.get("message"),
            result=out.get("summary"),
            ran=bool(out.get("ran", False)),
        )


@dataclass
class ScanResult:
    """Outcomes of the tasks of one scan file."""

    scan_file: Path
    outcomes: list[StepOutcome] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True if nothing failed."""
        return not self.failed

    @property
    def failed(self) -> list[StepOutcome]:
        """Outcomes with status FAILED."""
        return [o for o in self.outcomes if o.status is Status.FAILED]

    def outcome(self, step: str, entry: str) -> StepOutcome | None:
        """The outcome of ``step`` on ``entry``, if it was considered."""
        for o in self.outcomes:
            if o.step == step and o.entry == entry:
                return o
        return None

    def summary(self) -> str:
        """One line: counts per status."""
        counts: dict[str, int] = {}
        for o in self.outcomes:
            key = "skipped" if o.status is Status.NOT_STARTED else o.status.name.lower()
            counts[key] = counts.get(key, 0) + 1
        text = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        return f"{self.scan_file.name}: {text or 'nothing to do'}"


def group_results(outputs: Iterable[Mapping[str, Any]]) -> list[ScanResult]:
    """Task outputs -> one :class:`ScanResult` per scan file (in first-seen order)."""
    by_file: dict[str, ScanResult] = {}
    for out in outputs:
        name = str(out["scan_file"])
        result = by_file.setdefault(name, ScanResult(Path(name)))
        result.outcomes.append(StepOutcome.from_task(out))
    return list(by_file.values())


# --------------------------------------------------------------------------- executors


@runtime_checkable
class FutureLike(Protocol):
    """What executor futures provide (concurrent.futures and distributed)."""

    def result(self, timeout: float | None = None) -> Any:
        """Block until done; return the value or raise the exception."""

    def done(self) -> bool:
        """True when finished."""

    def cancel(self) -> Any:
        """Try to cancel."""


@runtime_checkable
class Executor(Protocol):
    """Somewhere to run the reduction graph."""

    name: str

    def submit_graph(
        self,
        tasks: Sequence[TaskSpec],
        args: DBArgs,
        *,
        registry: Mapping[str, Step] | None = None,
        progress: bool = False,
    ) -> Mapping[str, FutureLike]:
        """Submit every task (dependencies first); ``{key: future}``."""

    def pending(self, keys: Iterable[str]) -> set[str]:
        """The keys, of this or earlier submissions, that have not finished yet."""

    def shutdown(self, wait: bool = True) -> None:
        """Stop accepting work and release resources."""


class LocalExecutor:
    """The graph on a thread pool in this process (NXRefine's ``direct`` server).

    Parameters
    ----------
    max_workers : int
        Threads (default 2; keep it small, steps are multi-threaded).
    heavy_slots : int
        Memory-heavy tasks (transform, combine...) running at once.
    """

    name = "local"

    def __init__(self, max_workers: int = 2, *, heavy_slots: int = 1) -> None:
        if max_workers < 1 or heavy_slots < 1:
            raise WorkflowError(
                f"LocalExecutor needs max_workers >= 1 and heavy_slots >= 1, "
                f"got {max_workers} and {heavy_slots}"
            )
        self.max_workers = int(max_workers)
        self._pool = ThreadPoolExecutor(self.max_workers, thread_name_prefix="nxreduce")
        self._heavy = threading.BoundedSemaphore(heavy_slots)
        self._futures: dict[str, Future[Any]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LocalExecutor(max_workers={self.max_workers})"

    def _run(self, fn: Callable[..., Any], heavy: bool, *args: Any, **kw: Any) -> Any:
        if not heavy:
            return fn(*args, **kw)
        with self._heavy:
            return fn(*args, **kw)

    def submit_graph(
        self,
        tasks: Sequence[TaskSpec],
        args: DBArgs,
        *,
        registry: Mapping[str, Step] | None = None,
        progress: bool = False,
    ) -> dict[str, Future[Any]]:
        """Run each task once its dependencies (of any earlier submission too) finished."""
        out: dict[str, Future[Any]] = {}
        for spec in tasks:
            outer: Future[Any] = Future()
            with self._lock:
                deps = [self._futures[k] for k in spec.deps if k in self._futures]
                self._futures[spec.key] = outer
            out[spec.key] = outer
            self._when_ready(spec, deps, outer, args, registry, progress)
        return out

    def _when_ready(
        self,
        spec: TaskSpec,
        deps: list[Future[Any]],
        outer: Future[Any],
        args: DBArgs,
        registry: Mapping[str, Step] | None,
        progress: bool,
    ) -> None:
        remaining = [len(deps)]
        lock = threading.Lock()

        def launch() -> None:
            if not outer.set_running_or_notify_cancel():
                return
            results = []
            for d in deps:
                try:
                    results.append(d.result())
                except BaseException:  # cancelled or crashed dependency
                    results.append(None)
            try:
                inner = self._pool.submit(
                    self._run,
                    run_task,
                    spec.heavy,
                    spec,
                    args,
                    *results,
                    registry=registry,
                    progress=progress,
                    max_attempts=1,
                )
            except RuntimeError as exc:  # pool shut down
                outer.set_exception(exc)
                return

            def chain(f: Future[Any]) -> None:
                exc = f.exception()
                if exc is not None:
                    outer.set_exception(exc)
                else:
                    outer.set_result(f.result())

            inner.add_done_callback(chain)

        def one_done(_: Any) -> None:
            with lock:
                remaining[0] -= 1
                ready = remaining[0] == 0
            if ready:
                launch()

        if not deps:
            launch()
        for d in deps:
            d.add_done_callback(one_done)

    def pending(self, keys: Iterable[str]) -> set[str]:
        """Keys of this executor not finished yet."""
        with self._lock:
            return {k for k in keys if k in self._futures and not self._futures[k].done()}

    def shutdown(self, wait: bool = True) -> None:
        """Shut the pool down (tasks not started are cancelled if ``wait`` is False)."""
        if not wait:
            with self._lock:
                for fut in self._futures.values():
                    fut.cancel()
        else:
            with self._lock:
                futures = list(self._futures.values())
            for fut in futures:
                with contextlib.suppress(BaseException):  # cancelled
                    fut.exception()
        self._pool.shutdown(wait=wait, cancel_futures=not wait)

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _scheduler_states(dask_scheduler: Any, keys: list[str]) -> dict[str, str]:
    """Runs on the scheduler: the state of each known key."""
    out = {}
    for key in keys:
        ts = dask_scheduler.tasks.get(key)
        if ts is not None:
            out[key] = ts.state
    return out


_PENDING_STATES = {"waiting", "queued", "processing", "no-worker", "released"}


class DaskExecutor:
    """The graph on a ``dask.distributed`` cluster (a new local one, or a scheduler).

    Parameters
    ----------
    address : str, optional
        Scheduler address (``tcp://host:8786``).  None or ``"local"`` starts a
        :class:`distributed.LocalCluster` owned by this executor.
    n_workers : int
        Workers of the local cluster.
    processes : bool
        Local cluster with worker processes (True) or threads in this process.
    threads_per_worker : int
        Threads per local worker.
    client : distributed.Client, optional
        Use this client instead of creating one (not closed by :meth:`shutdown`).
    retries : int
        Dask ``retries=`` for transient I/O errors.

    Notes
    -----
    Workers must see the experiment files at the same paths, run the same
    environment and reach the workflow database (see ``docs/deployment.md``).
    """

    name = "dask"

    def __init__(
        self,
        address: str | None = None,
        *,
        n_workers: int = 1,
        processes: bool = False,
        threads_per_worker: int = 2,
        client: Any = None,
        retries: int = DEFAULT_RETRIES,
    ) -> None:
        # optional: dask.distributed, only for the Dask executor
        from distributed import Client, LocalCluster

        self._cluster = None
        self._owns_client = client is None
        self.retries = int(retries)
        if client is not None:
            self.client = client
            self.address = getattr(client.scheduler, "address", None)
        elif address in (None, "", "local"):
            self._cluster = LocalCluster(
                n_workers=n_workers,
                processes=processes,
                threads_per_worker=threads_per_worker,
                dashboard_address=None,
            )
            self.client = Client(self._cluster)
            self.address = "local"
        else:
            try:
                self.client = Client(address, timeout="10s")
            except OSError as exc:
                raise WorkflowError(
                    f"cannot connect to the Dask scheduler at {address}: {exc}; start it with "
                    "'dask scheduler' or set [server] dask_scheduler"
                ) from exc
            self.address = address

    def __repr__(self) -> str:
        return f"DaskExecutor(address={self.address!r})"

    @property
    def remote(self) -> bool:
        """True when connected to a scheduler this executor did not start."""
        return self._cluster is None

    def _heavy_resource(self) -> str | None:
        workers = self.client.scheduler_info().get("workers", {})
        if any(HEAVY_RESOURCE in (w.get("resources") or {}) for w in workers.values()):
            return HEAVY_RESOURCE
        return None

    def submit_graph(
        self,
        tasks: Sequence[TaskSpec],
        args: DBArgs,
        *,
        registry: Mapping[str, Step] | None = None,
        progress: bool = False,
        timeout: float = 60.0,
    ) -> dict[str, Any]:
        """Submit the graph; return once the scheduler holds every key.

        Raises
        ------
        WorkflowError
            If the scheduler has not received the graph within ``timeout`` seconds.
        """
        # optional: dask.distributed, only for the Dask executor
        from distributed import Future, fire_and_forget

        heavy = self._heavy_resource()
        if registry is not None and all(STEPS.get(k) == v for k, v in registry.items()):
            registry = None
        futures: dict[str, Any] = {}
        for spec in tasks:
            deps = [futures[k] if k in futures else Future(k, self.client) for k in spec.deps]
            extra: dict[str, Any] = {}
            if spec.heavy and heavy:
                extra["resources"] = {heavy: 1}
            futures[spec.key] = self.client.submit(
                run_task,
                spec,
                args,
                *deps,
                key=spec.key,
                pure=False,
                retries=self.retries,
                registry=registry,
                progress=progress,
                max_attempts=self.retries + 1,
                **extra,
            )
        fire_and_forget(list(futures.values()))
        keys = list(futures)
        deadline = time.monotonic() + timeout
        while keys:
            known = self.client.run_on_scheduler(_scheduler_states, keys=keys)
            keys = [k for k in keys if k not in known]
            if keys and time.monotonic() > deadline:
                raise WorkflowError(
                    f"the Dask scheduler {self.address} has not received {len(keys)} task(s) "
                    f"after {timeout:.0f} s (e.g. {keys[0]}); check the scheduler"
                )
            if keys:
                time.sleep(0.05)
        return futures

    def pending(self, keys: Iterable[str]) -> set[str]:
        """Keys the scheduler still has to run."""
        keys = [k for k in keys if k]
        if not keys:
            return set()
        states = self.client.run_on_scheduler(_scheduler_states, keys=keys)
        return {k for k, state in states.items() if state in _PENDING_STATES}

    def shutdown(self, wait: bool = True) -> None:
        """Close the client (the graph stays on a remote scheduler) and an owned cluster."""
        if self._owns_client:
            self.client.close()
        if self._cluster is not None:
            self._cluster.close()

    def __enter__(self) -> DaskExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def make_executor(
    kind: str | None = None,
    *,
    address: str | None = None,
    workers: int | None = None,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
) -> LocalExecutor | DaskExecutor:
    """Build the executor chosen by the arguments or by the ``[server]`` settings.

    Parameters
    ----------
    kind : {"local", "dask"}, optional
        Default: ``[server] type``.
    address : str, optional
        Dask scheduler address or ``"local"``; default ``[server] dask_scheduler``.
    workers : int, optional
        Threads (local) or local Dask workers; default ``[server] cores``.
    settings : mapping, optional
        Settings ``{section: {key: value}}``; default: the server settings.
    """
    if settings is None:
        settings = server_settings()
    server = dict(settings.get("server", {}))
    kind = (kind or server.get("type") or "local").lower()
    kind = NXREFINE_SERVER_TYPES.get(kind, kind)  # an NXRefine server file's type
    workers = int(workers or server.get("cores") or 2)
    if kind == "local":
        return LocalExecutor(max_workers=workers)
    if kind == "dask":
        address = address or server.get("dask_scheduler") or "local"
        return DaskExecutor(address, n_workers=workers)
    raise WorkflowError(f"unknown executor type {kind!r}; use 'local' or 'dask'")


# --------------------------------------------------------------------------- serial


def run_scan_steps(
    scan_file: str | os.PathLike[str],
    steps: Iterable[str] | None = None,
    entries: Sequence[str] | None = None,
    params: Mapping[str, Any] | None = None,
    db: WorkflowDB | str | os.PathLike[str] | None = None,
    *,
    overwrite: bool = False,
    progress: bool = False,
    registry: Mapping[str, Step] | None = None,
) -> ScanResult:
    """Run the graph of one scan file serially in this thread, recording every transition.

    Parameters
    ----------
    scan_file : path-like
        The scan file ``<sample>_<scan>.nxs``.
    steps, entries : optional
        Step names (default all) and rotation entries (default all).
    params : mapping, optional
        Step parameters (``{step: {...}}`` for one step only).
    db : WorkflowDB or URL or experiment directory, optional
        Where to record transitions (default: the scan's experiment database).
    overwrite, progress : bool
        Redo done steps; progress bars.
    registry : mapping, optional
        Step registry instead of the global one.
    """
    path = Path(scan_file).absolute()
    if db is None:
        db = WorkflowDB(path.parent.parent.parent)
    elif not isinstance(db, WorkflowDB):
        db = WorkflowDB(db)
    registry = STEPS if registry is None else registry
    tasks, entries_of = build_graph(
        [path],
        steps=steps,
        entries=entries,
        params=params,
        overwrite=overwrite,
        registry=registry,
        token=new_token(db.experiment),
    )
    register_scan_steps(db, path, entries_of[path], registry)
    for spec in tasks:
        db.queue(path, spec.entry, spec.step.name, params=spec.params, overwrite=overwrite,
                 key=spec.key)
    results: dict[str, dict[str, Any]] = {}
    for spec in tasks:
        deps = [results.get(k) for k in spec.deps]
        results[spec.key] = run_task(
            spec, db_args(db), *deps, registry=registry, progress=progress, max_attempts=1
        )
    grouped = group_results(results.values())
    return grouped[0] if grouped else ScanResult(path)
