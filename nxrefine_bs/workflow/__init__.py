"""Workflow tracking and execution: the status database, the reduction graph, executors.

Persistence (no NeXus or reduction imports):

* :mod:`.schema` -- :class:`Status`, tables, :class:`TaskRecord`;
* :mod:`.engine` -- engines per URL and process, retries, safe schema creation;
* :mod:`.leases` -- the task state machine and leases;
* :mod:`.queries` -- read-only queries;
* :mod:`.database` -- :class:`WorkflowDB`, the rows of one experiment.

Above it:

* :mod:`.sync` -- rows rebuilt from the NXprocess records of the scan files;
* :mod:`.params` -- ``--param STEP.NAME=VALUE`` parsing;
* :mod:`.graph` -- one task per (scan, entry, step) from the step registry;
* :mod:`.task` -- :func:`run_task`, what every node runs (claim, lease, step);
* :mod:`.executor` -- :class:`LocalExecutor`, :class:`DaskExecutor`;
* :mod:`.queue` -- :class:`ReductionQueue`: submit, retry, cancel, reset, wait;
* :mod:`.config` -- the ``[server]`` settings every path uses.
"""

from .database import WorkflowDB
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
from .schema import Status, TaskRecord, aggregate_status

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
