"""Workflow tracking and execution: the status database, executors and the queue.

* :class:`~.database.WorkflowDB` -- which step ran on which scan entry (SQLAlchemy).
* :func:`~.executor.run_scan_steps` -- reduce one scan file, recording every transition.
* :class:`~.executor.LocalExecutor`, :class:`~.executor.DaskExecutor` -- where it runs.
* :class:`~.queue.ReductionQueue` -- database + executor: submit, retry, cancel, wait.
"""

from .database import Status, TaskRecord, WorkflowDB, aggregate_status
from .executor import (
    DaskExecutor,
    Executor,
    LocalExecutor,
    ScanResult,
    StepOutcome,
    make_executor,
    run_scan_steps,
)
from .queue import Job, ReductionQueue, find_scan_files

__all__ = [
    "Status",
    "TaskRecord",
    "WorkflowDB",
    "aggregate_status",
    "Executor",
    "LocalExecutor",
    "DaskExecutor",
    "make_executor",
    "run_scan_steps",
    "ScanResult",
    "StepOutcome",
    "Job",
    "ReductionQueue",
    "find_scan_files",
]
