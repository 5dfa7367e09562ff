"""Run reduction steps on scan files, in threads or on a Dask cluster.

:func:`run_scan_steps` is the unit of work: it reduces one scan file (several steps on
several entries) in registry order, records every transition in the workflow database
and never lets an exception escape for a single step.  An :class:`Executor` decides
where that function runs: :class:`LocalExecutor` (a thread pool in this process) or
:class:`DaskExecutor` (a ``dask.distributed`` cluster, local or remote).
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import h5py

from ..errors import WorkflowError
from ..nexus.provenance import process_done, read_process
from ..nexus.scanfile import find_parent, open_scan_file
from ..reduce.steps import STEPS, Step
from .database import SCAN_ENTRY, Status, WorkflowDB, rotation_entries, scan_targets

logger = logging.getLogger(__name__)

__all__ = [
    "Executor",
    "FutureLike",
    "LocalExecutor",
    "DaskExecutor",
    "make_executor",
    "run_scan_steps",
    "ScanResult",
    "StepOutcome",
    "parent_scan_file",
    "select_steps",
    "PARENT_PROCESS",
]

PARENT_PROCESS = "nxrefine"
"""Process whose completion on the parent scan gates the child's orientation step."""


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class StepOutcome:
    """What happened to one step on one entry.

    ``status`` is DONE (ran, or was already done), FAILED (raised, or blocked by a
    failed/missing requirement or parent) or NOT_STARTED (skipped: cancelled, or not
    queued for this run).
    """

    step: str
    entry: str
    status: Status
    message: str | None = None
    result: dict[str, Any] | None = None
    ran: bool = False


@dataclass
class ScanResult:
    """Outcomes of :func:`run_scan_steps` on one scan file."""

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


# --------------------------------------------------------------------------- helpers


def select_steps(
    steps: Iterable[str] | None, registry: Mapping[str, Step] | None = None
) -> list[Step]:
    """Steps by name, validated and sorted in registry order (all steps if None)."""
    registry = STEPS if registry is None else registry
    if steps is None:
        return list(registry.values())
    names = [s.strip() for s in steps if s and s.strip()]
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise WorkflowError(
            f"unknown reduction step(s) {', '.join(unknown)}; choose from {', '.join(registry)}"
        )
    return [registry[n] for n in registry if n in names]


def parent_scan_file(scan_file: str | os.PathLike[str]) -> Path | None:
    """The parent scan named by ``/entry/nxscans/parent`` (None if none or itself)."""
    scan_file = Path(scan_file).absolute()
    found = find_parent(scan_file)
    parent = Path(found).absolute() if found else None
    if parent is None or parent.resolve() == scan_file.resolve():
        return None
    return parent


def _parent_blocker(scan_file: Path, entry: str) -> str | None:
    """Why the child's orientation step cannot run yet on ``entry`` (None if it can)."""
    try:
        parent = parent_scan_file(scan_file)
    except Exception as exc:  # a broken parent pointer is the child's failure
        return f"cannot resolve the parent scan of {scan_file.name}: {exc}"
    if parent is None:
        return None
    if not parent.exists():
        return f"parent scan {parent} does not exist; fix /entry/nxscans/parent or remove it"
    try:
        with open_scan_file(parent) as f:
            group = f.get(entry)
            done = isinstance(group, h5py.Group) and process_done(group, PARENT_PROCESS)
    except OSError as exc:
        return f"cannot read parent scan {parent}: {exc}"
    if not done:
        return (
            f"waiting for parent {parent.name}: its orientation ({PARENT_PROCESS}) on {entry} "
            "is not done; reduce the parent first, then retry this scan"
        )
    return None


def _split_params(
    params: Mapping[str, Any] | None, step: Step, fn: Callable[..., Any]
) -> dict[str, Any]:
    """Parameters for one step: ``params[step.name]`` (a mapping) over common ones.

    Common parameters the step function does not accept are dropped (``threshold``
    means nothing to ``max``); per-step ones are always passed.
    """
    common: dict[str, Any] = {}
    nested: dict[str, Any] = {}
    for key, value in (params or {}).items():
        if isinstance(value, Mapping):
            if key == step.name:
                nested.update(value)
        elif value is not None:
            common[key] = value
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        sig = None
    if sig is not None and not any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()
    ):
        common = {k: v for k, v in common.items() if k in sig.parameters}
    return {**common, **nested}


def _step_kwargs(
    step: Step,
    registry: Mapping[str, Step],
    scan_file: Path,
    params: Mapping[str, Any] | None,
    fn: Callable[..., Any],
) -> dict[str, Any]:
    """Explicit parameters, resolved through the settings layers for registry steps."""
    explicit = _split_params(params, step, fn)
    if STEPS.get(step.name) is step:
        from ..reduce import steps as steps_module

        resolver = getattr(steps_module, "step_parameters", None)
        if resolver is not None:
            return resolver(step.name, scan_file, explicit)
    return explicit


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return f"dask:{get_worker().name}"
    except (ImportError, ValueError):
        return f"thread:{threading.current_thread().name}"


def _read_done(scan_file: Path, pairs: Iterable[tuple[Step, str]]) -> dict[tuple[str, str], Any]:
    """``{(step, entry): record or None}`` from the scan file, opened read-only briefly."""
    out: dict[tuple[str, str], Any] = {}
    with open_scan_file(scan_file) as f:
        for step, entry in pairs:
            group = f.get(entry)
            if isinstance(group, h5py.Group) and process_done(group, step.process):
                out[(step.name, entry)] = read_process(group, step.process) or {}
            else:
                out[(step.name, entry)] = None
    return out


# --------------------------------------------------------------------------- the unit of work


def run_scan_steps(
    scan_file: str | os.PathLike[str],
    steps: Iterable[str] | None = None,
    entries: Sequence[str] | None = None,
    params: Mapping[str, Any] | None = None,
    db: WorkflowDB | str | os.PathLike[str] | None = None,
    *,
    overwrite: bool = False,
    progress: bool = False,
    claim: bool = False,
    registry: Mapping[str, Step] | None = None,
) -> ScanResult:
    """Run reduction steps on one scan file, recording every transition.

    Steps run in registry order; per-entry steps run on each entry in turn, per-scan
    steps once on ``entry``.  A step whose requirement failed (or is neither done in
    the file nor part of this run) is marked FAILED with a message naming the
    requirement, so nothing is silently lost.  The orientation step (process
    ``nxrefine``) of a scan with a parent (``/entry/nxscans/parent``) fails with a
    "waiting for parent" message unless the parent's ``nxrefine`` is done on the same
    entry.  A step already done (its NXprocess exists) is not rerun unless
    ``overwrite``.  The raw detector files are never opened for writing here.

    Parameters
    ----------
    scan_file : path-like
        The scan file ``<sample>_<scan>.nxs``.
    steps : iterable of str, optional
        Step names (default: every step of the registry).
    entries : sequence of str, optional
        Rotation entries (default: all of the file's).
    params : mapping, optional
        Keyword arguments for the steps; a value that is a mapping under a step's
        name holds parameters for that step only.  Common parameters a step does not
        accept are dropped.  For steps of the global registry, unset parameters are
        resolved through the settings layers
        (:func:`nxrefine_bs.reduce.steps.step_parameters`).
    db : WorkflowDB or URL or experiment directory, optional
        Where to record transitions; nothing is recorded if None.
    overwrite : bool
        Rerun steps that are already done.
    progress : bool
        Passed to the steps (tqdm progress bars).
    claim : bool
        Only run tasks that are QUEUED in ``db``, claiming them atomically; tasks
        cancelled meanwhile are skipped.  Used by :class:`~.queue.ReductionQueue`.
    registry : mapping, optional
        Step registry to use instead of :data:`~nxrefine_bs.reduce.steps.STEPS`.

    Returns
    -------
    ScanResult
        One :class:`StepOutcome` per (step, entry) considered.

    Raises
    ------
    WorkflowError
        Only for errors before any step runs (unknown step, unreadable scan file).
    """
    scan_file = Path(scan_file).absolute()
    registry = STEPS if registry is None else registry
    chosen = select_steps(steps, registry)
    if db is not None and not isinstance(db, WorkflowDB):
        db = WorkflowDB(db)
    try:
        with open_scan_file(scan_file) as f:
            all_entries = rotation_entries(f)
    except OSError as exc:
        raise WorkflowError(f"cannot open scan file {scan_file}: {exc}") from exc
    if entries is None:
        entries = all_entries
    else:
        missing = [e for e in entries if e not in all_entries]
        if missing:
            raise WorkflowError(
                f"{scan_file.name} has no entr{'y' if len(missing) == 1 else 'ies'} "
                f"{', '.join(missing)}; it has {', '.join(all_entries) or 'none'}"
            )
        entries = list(entries)
    worker = _worker_name()
    result = ScanResult(scan_file)
    state: dict[tuple[str, str], Status] = {}

    def record(outcome: StepOutcome) -> None:
        result.outcomes.append(outcome)
        state[(outcome.step, outcome.entry)] = outcome.status

    def requirement_problem(step: Step, entry: str) -> str | None:
        for req_name in step.requires:
            req = registry.get(req_name) or STEPS.get(req_name)
            if req is None:
                return f"requires unknown step {req_name!r}"
            if req.per_entry:
                targets = [entry] if step.per_entry else list(all_entries)
            else:
                targets = [SCAN_ENTRY]
            for target in targets:
                got = state.get((req.name, target))
                if got is Status.DONE:
                    continue
                if got is Status.FAILED:
                    return f"blocked: requires {req.name} on {target}, which failed"
                if _read_done(scan_file, [(req, target)])[(req.name, target)] is None:
                    return (
                        f"blocked: requires {req.name} on {target}, which is not done; "
                        f"run {req.name} first"
                    )
        return None

    for step in chosen:
        targets = scan_targets(step, entries)
        done_records = _read_done(scan_file, [(step, t) for t in targets])
        for entry in targets:
            label = f"{step.name} on {scan_file.name}:{entry}"
            claimed = (
                db.start(scan_file, entry, step.name, worker=worker, claim=True)
                if db is not None and claim
                else True
            )
            if not claimed:  # not queued: cancelled, or not part of this submission
                current = db.task_status(scan_file, entry, step.name)  # type: ignore[union-attr]
                status = Status.DONE if current is Status.DONE else Status.NOT_STARTED
                if done_records[(step.name, entry)] is not None:
                    status = Status.DONE
                record(StepOutcome(step.name, entry, status, "not queued"))
                continue
            record_done = done_records[(step.name, entry)]
            if record_done is not None and not overwrite:
                if db is not None:
                    db.done(scan_file, entry, step.name, message="already done", record=record_done)
                record(StepOutcome(step.name, entry, Status.DONE, "already done"))
                logger.info("%s: already done", label)
                continue
            problem = requirement_problem(step, entry)
            if problem is None and step.process == PARENT_PROCESS:
                problem = _parent_blocker(scan_file, entry)
            if problem is not None:
                if db is not None:
                    db.fail(scan_file, entry, step.name, problem)
                record(StepOutcome(step.name, entry, Status.FAILED, problem))
                logger.warning("%s: %s", label, problem)
                continue
            if db is not None and not claim:
                db.start(scan_file, entry, step.name, worker=worker)
            try:
                fn: Callable[..., Any] = step.load()
                kwargs = _step_kwargs(step, registry, scan_file, params, fn)
                out = fn(scan_file, entry, overwrite=overwrite, progress=progress, **kwargs)
            except Exception as exc:  # one failing step must not stop the workflow
                message = f"{type(exc).__name__}: {exc}"
                logger.warning("%s failed: %s", label, message)
                logger.debug("%s", traceback.format_exc())
                if db is not None:
                    db.fail(scan_file, entry, step.name, message)
                record(StepOutcome(step.name, entry, Status.FAILED, message, ran=True))
                continue
            if db is not None:
                db.done(scan_file, entry, step.name)
            summary = dict(out) if isinstance(out, Mapping) else None
            record(StepOutcome(step.name, entry, Status.DONE, None, summary, ran=True))
            logger.info("%s: done", label)
    return result


# --------------------------------------------------------------------------- executors


@runtime_checkable
class FutureLike(Protocol):
    """What :class:`Executor` futures provide (concurrent.futures and distributed)."""

    def result(self, timeout: float | None = None) -> Any:
        """Block until done; return the value or raise the exception."""

    def done(self) -> bool:
        """True when finished."""

    def cancel(self) -> Any:
        """Try to cancel."""

    def add_done_callback(self, fn: Callable[[Any], Any]) -> None:
        """Call ``fn(future)`` when finished."""


@runtime_checkable
class Executor(Protocol):
    """Somewhere to run :func:`run_scan_steps`."""

    name: str

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> FutureLike:
        """Schedule ``fn(*args, **kwargs)``."""

    def shutdown(self, wait: bool = True) -> None:
        """Stop accepting work and release resources."""


class LocalExecutor:
    """A thread pool in this process (NXRefine's ``direct`` server).

    Parameters
    ----------
    max_workers : int
        Simultaneous scans (default 2; keep it small, steps are multi-threaded).
    """

    name = "local"

    def __init__(self, max_workers: int = 2) -> None:
        if max_workers < 1:
            raise WorkflowError(f"LocalExecutor needs max_workers >= 1, got {max_workers}")
        self.max_workers = int(max_workers)
        self._pool = ThreadPoolExecutor(self.max_workers, thread_name_prefix="nxreduce")

    def __repr__(self) -> str:
        return f"LocalExecutor(max_workers={self.max_workers})"

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> FutureLike:
        """Schedule ``fn(*args, **kwargs)`` on the pool."""
        return self._pool.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True) -> None:
        """Shut the pool down (queued work is cancelled if ``wait`` is False)."""
        self._pool.shutdown(wait=wait, cancel_futures=not wait)

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


class DaskExecutor:
    """A ``dask.distributed`` client, on a new local cluster or an existing scheduler.

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

    Notes
    -----
    Workers must see the experiment files at the same paths and be able to import
    ``nxrefine_bs``.  With SQLite workflow databases, all workers must share a
    local file system with the database (use a server database otherwise).
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
    ) -> None:
        try:
            from distributed import Client, LocalCluster
        except ImportError as exc:  # pragma: no cover - a declared dependency
            raise WorkflowError("DaskExecutor needs dask.distributed installed") from exc
        self._cluster = None
        self._owns_client = client is None
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

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> FutureLike:
        """Schedule ``fn(*args, **kwargs)`` on the cluster (never cached: ``pure=False``)."""
        return self.client.submit(fn, *args, pure=False, **kwargs)

    def detach(self, futures: Iterable[Any]) -> None:
        """Let submitted work continue after this client closes (``fire_and_forget``)."""
        from distributed import fire_and_forget

        fire_and_forget(list(futures))

    def shutdown(self, wait: bool = True) -> None:
        """Close the client and the local cluster this executor started."""
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
        Settings ``{section: {key: value}}``; default: the server settings file if
        it exists, else the built-in defaults.
    """
    if settings is None:
        from ..errors import SettingsError
        from ..settings import default_settings, load_server_settings

        try:
            settings = load_server_settings()
        except SettingsError:
            settings = default_settings()
    server = dict(settings.get("server", {}))
    kind = (kind or server.get("type") or "local").lower()
    workers = int(workers or server.get("cores") or 2)
    if kind == "local":
        return LocalExecutor(max_workers=workers)
    if kind == "dask":
        address = address or server.get("dask_scheduler") or "local"
        return DaskExecutor(address, n_workers=workers)
    raise WorkflowError(f"unknown executor type {kind!r}; use 'local' or 'dask'")
