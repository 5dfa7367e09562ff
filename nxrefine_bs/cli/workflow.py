"""``nxrefine-bs workflow`` sub-commands: queue reduction work and follow it.

``queue`` hands scan files to a :class:`~nxrefine_bs.workflow.ReductionQueue` (threads
in this process, or Dask), ``status`` draws the workflow grid (rows scans, columns
steps) and the running tasks with their host and worker, ``tasks`` lists task rows,
``retry`` re-submits failed tasks with their stored parameters, ``cancel`` un-queues
tasks not started yet, ``reset`` returns stuck tasks to not-started, ``sync`` rebuilds
the database from the NXprocess records in the scan files.  ``nxrefine-bs queue`` is a
shortcut for ``workflow queue``.  The database is ``--db``, else ``[server] database``,
else ``<experiment>/tasks/workflow.db``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import WorkflowError
from ..reduce.parameters import split_parameters
from ..reduce.steps import STEP_ORDER, STEPS

logger = logging.getLogger(__name__)

__all__ = ["register"]


def _experiment_dir(args: argparse.Namespace, paths: list[str] | None = None) -> Path:
    """``--experiment``, else derived from the first scan file/dir, else the cwd."""
    if args.experiment:
        return Path(args.experiment).expanduser().absolute()
    for item in paths or []:
        path = Path(item).expanduser().absolute()
        if path.is_file() and path.suffix == ".nxs":
            return path.parent.parent.parent
        for candidate in (path, *path.parents):
            if (candidate / "tasks").is_dir():
                return candidate
    cwd = Path.cwd()
    for candidate in (cwd, *cwd.parents):
        if (candidate / "tasks").is_dir():
            return candidate
    raise WorkflowError(
        "cannot tell which experiment to use; pass --experiment DIR (the directory holding tasks/)"
    )


def _db(args: argparse.Namespace, paths: list[str] | None = None) -> Any:
    from ..workflow.config import open_experiment_db

    experiment = _experiment_dir(args, paths)
    if not experiment.is_dir():
        raise WorkflowError(f"experiment directory {experiment} does not exist")
    return open_experiment_db(experiment, url=args.db)


def _split(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    out = [v.strip() for item in values for v in item.split(",") if v.strip()]
    return out or None


def _executor(args: argparse.Namespace) -> Any:
    from ..workflow.executor import DaskExecutor, LocalExecutor, make_executor

    if args.dask:
        return DaskExecutor(args.dask, n_workers=args.workers or 1)
    if args.workers:
        return LocalExecutor(args.workers)
    return make_executor()


def _finish(queue: Any, jobs: list[Any], args: argparse.Namespace) -> int:
    executor = queue.executor
    if not jobs:
        print("nothing to do: every requested step is done (use --overwrite to redo)")
        queue.close()
        return 0
    remote = getattr(executor, "remote", False)
    if not args.wait and remote:
        count = sum(len(j.tasks) for j in jobs)
        print(
            f"submitted {count} task(s) of {len(jobs)} scan(s) to {executor.address}; "
            "they run without this client; follow with 'workflow status'"
        )
        queue.close()
        return 0
    if not args.wait:
        print(f"running {len(jobs)} scan(s) in this process (local executors cannot detach)")
    try:
        results = queue.wait()
    finally:
        queue.close()
    failed = 0
    for result in results:
        print(result.summary())
        for outcome in result.failed:
            failed += 1
            print(f"  FAILED {outcome.step} {outcome.entry}: {outcome.message}")
    return 1 if failed else 0


def _console(args: argparse.Namespace) -> Any:
    """A rich console; wide when the output is not a terminal (files, pipes)."""
    from rich.console import Console

    width = None if sys.stdout.isatty() else 200
    return Console(no_color=args.no_color or "NO_COLOR" in os.environ, width=width)


# --------------------------------------------------------------------------- commands


def _cmd_queue(args: argparse.Namespace) -> int:
    from ..workflow.params import parse_params
    from ..workflow.queue import ReductionQueue

    db = _db(args, args.paths)
    params: dict[str, Any] = parse_params(args.param or [], _split(args.steps))
    # a misspelled or foreign parameter is an error naming the valid ones
    split_parameters(_split(args.steps) or list(STEP_ORDER), params)
    queue = ReductionQueue(db, _executor(args), own_executor=True)
    jobs = queue.submit(
        args.paths,
        steps=_split(args.steps),
        entries=_split(args.entries),
        overwrite=args.overwrite,
        params=params,
    )
    return _finish(queue, jobs, args)


def _cmd_retry(args: argparse.Namespace) -> int:
    from ..workflow.params import parse_params
    from ..workflow.queue import ReductionQueue

    db = _db(args, args.paths)
    params = parse_params(args.param or [], _split(args.steps))
    queue = ReductionQueue(db, _executor(args), own_executor=True)
    jobs = queue.retry(args.paths or None, steps=_split(args.steps), params=params)
    return _finish(queue, jobs, args)


def _cmd_reset(args: argparse.Namespace) -> int:
    db = _db(args, args.paths)
    records = db.reset_tasks(stale_only=args.stale)
    for rec in records:
        where = f" ({rec.worker or '?'} on {rec.host or '?'})" if rec.host else ""
        print(f"reset {rec.filename} {rec.entry} {rec.step}: was {rec.status.name.lower()}{where}")
    print(f"{len(records)} task(s) reset")
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    from ..workflow.queue import find_scan_files

    db = _db(args, args.paths)
    steps = _split(args.steps)
    files = find_scan_files(args.paths) if args.paths else [None]
    count = 0
    for path in files:
        for rec in db.list_tasks(status="queued", step=steps, scan_file=path):
            if db.cancel(db.absolute_path(rec.filename), rec.entry, rec.step):
                count += 1
                print(f"cancelled {rec.filename} {rec.entry} {rec.step}")
    print(f"{count} task(s) cancelled")
    return 0


def _cmd_sync(args: argparse.Namespace) -> int:
    from ..workflow.sync import sync_file, sync_from_files

    db = _db(args, args.paths)
    if args.paths:
        from ..workflow.queue import find_scan_files

        names = []
        for path in find_scan_files(args.paths):
            sync_file(db, path)
            names.append(db.relative_name(path))
    else:
        names = sync_from_files(db, prune=not args.keep)
    print(f"synced {len(names)} scan file(s) into {db.url}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from rich.table import Table

    from ..workflow.database import status_symbols
    from ..workflow.queue import find_scan_files

    db = _db(args, args.paths)
    for rec in db.expire_stale():
        logger.warning(
            "%s %s %s: lease expired (%s)", rec.filename, rec.entry, rec.step, rec.worker
        )
    files = find_scan_files(args.paths) if args.paths else None
    grid = db.status_table(files)
    if not grid:
        print(f"no scan files in {db.url}; queue some or run 'nxrefine-bs workflow sync'")
        return 0
    symbols = status_symbols()
    steps = [s for s in STEPS if any(s in row for row in grid.values())]
    steps += sorted({s for row in grid.values() for s in row} - set(steps))
    table = Table(title=f"workflow status ({db.experiment_dir or db.url})", header_style="bold")
    table.add_column("scan file", no_wrap=True)
    for step in steps:
        table.add_column(step, justify="center")
    for name, row in grid.items():
        cells = []
        for step in steps:
            status = row.get(step)
            if status is None:
                cells.append("")
                continue
            symbol, colour = symbols[status]
            cells.append(f"[{colour}]{symbol}[/]")
        table.add_row(name, *cells)
    console = _console(args)
    console.print(table)
    legend = "  ".join(f"[{c}]{s}[/] {st.name.lower()}" for st, (s, c) in symbols.items())
    console.print(legend)
    running = db.running()
    if running:
        table = Table(title="running", header_style="bold")
        columns = ("scan file", "entry", "step", "host", "worker", "pid", "started", "lease until")
        for col in columns:
            table.add_column(col, overflow="fold")
        for rec in running:
            table.add_row(
                rec.filename,
                rec.entry,
                rec.step,
                rec.host or "",
                rec.worker or "",
                str(rec.pid or ""),
                rec.start_time.strftime("%H:%M:%S") if rec.start_time else "",
                rec.lease_expires.strftime("%H:%M:%S") if rec.lease_expires else "",
            )
        console.print(table)
    return 0


def _cmd_tasks(args: argparse.Namespace) -> int:
    from rich.table import Table

    from ..workflow.database import status_symbols

    db = _db(args, args.paths)
    scan_file = None
    pattern = None
    if args.paths:
        if len(args.paths) != 1:
            raise WorkflowError("tasks takes at most one scan file or directory")
        target = Path(args.paths[0]).absolute()
        if target.is_dir():  # the experiment, or a sample/label directory in it
            under = db.relative_name(target)
            if under not in (".", ""):
                pattern = under.replace("%", r"\%").replace("_", r"\_") + "/%"
        else:
            scan_file = target
    records = db.list_tasks(
        status=_split(args.status),
        step=_split(args.steps),
        entry=_split(args.entries),
        scan_file=scan_file,
        pattern=pattern,
        limit=args.limit,
    )
    if not args.all and not args.status:
        from ..workflow.database import Status

        records = [r for r in records if r.status is not Status.NOT_STARTED]
    symbols = status_symbols()
    table = Table(header_style="bold")
    table.add_column("scan file", no_wrap=True)
    for col in ("entry", "step", "status", "started", "s", "host:pid", "worker", "message"):
        table.add_column(col, overflow="fold")
    for rec in records:
        symbol, colour = symbols[rec.status]
        started = rec.start_time.strftime("%Y-%m-%d %H:%M:%S") if rec.start_time else ""
        duration = f"{rec.duration:.1f}" if rec.duration is not None else ""
        where = f"{rec.host}:{rec.pid}" if rec.host else ""
        table.add_row(
            rec.filename,
            rec.entry,
            rec.step,
            f"[{colour}]{symbol} {rec.status.name.lower()}[/]",
            started,
            duration,
            where,
            rec.worker or "",
            rec.message or "",
        )
    console = _console(args)
    console.print(table)
    console.print(f"{len(records)} task(s)")
    return 0


# --------------------------------------------------------------------------- parsers


def _common(p: argparse.ArgumentParser, *, paths: str = "*") -> None:
    p.add_argument(
        "paths",
        nargs=paths,
        metavar="PATH",
        help="scan files or directories searched for scan files",
    )
    p.add_argument(
        "-x",
        "--experiment",
        metavar="DIR",
        help="experiment directory (default: from the scan files, else the current one)",
    )
    p.add_argument(
        "--db",
        metavar="URL",
        help="workflow database URL or file (default: <experiment>/tasks/workflow.db)",
    )


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dask",
        metavar="ADDRESS",
        help="run on a Dask scheduler ADDRESS, or 'local' for a new local cluster "
        "(default: [server] type/dask_scheduler settings; threads if unset)",
    )
    p.add_argument("-w", "--workers", type=int, help="threads or local Dask workers")
    p.add_argument(
        "--wait",
        action="store_true",
        help="wait and print a summary (always the case without a remote Dask scheduler)",
    )


def _add(sub: Any, name: str, func: Any, help_text: str, **kw: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text, **kw)
    p.set_defaults(func=func)
    return p


def _queue_parser(sub: Any, name: str = "queue") -> None:
    p = _add(sub, name, _cmd_queue, "queue reduction steps on scan files")
    _common(p, paths="+")
    p.add_argument(
        "-s", "--steps", action="append", help="comma-separated steps, e.g. max,find (default: all)"
    )
    p.add_argument("-e", "--entries", action="append", help="comma-separated rotation entries")
    p.add_argument("-o", "--overwrite", action="store_true", help="redo steps already done")
    _param_option(p)
    _run_options(p)


def _param_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-p",
        "--param",
        action="append",
        metavar="KEY=VALUE",
        help="step parameter parsed as its command-line option is (STEP.KEY=VALUE for one "
        "step only, e.g. transform.qh=-5,0.05,5); stored with the task and reused by retry",
    )


def register(subparsers: Any) -> None:
    """Add ``workflow`` (and the ``queue`` shortcut) to the ``nxrefine-bs`` parser."""
    wf = subparsers.add_parser(
        "workflow",
        help="queue reduction work and follow its status",
        description="Queue reduction work and follow its status in the workflow database.",
    )
    sub = wf.add_subparsers(dest="workflow_command", metavar="SUBCOMMAND", required=True)
    _queue_parser(sub)

    p = _add(sub, "status", _cmd_status, "per-scan workflow grid: rows scans, columns steps")
    _common(p)
    p.add_argument("--no-color", action="store_true", help="plain symbols")

    p = _add(sub, "tasks", _cmd_tasks, "list tasks with filters")
    _common(p)
    p.add_argument("--status", action="append", help="e.g. failed,queued")
    p.add_argument("-s", "--steps", action="append", help="comma-separated steps")
    p.add_argument("-e", "--entries", action="append", help="comma-separated entries")
    p.add_argument("-n", "--limit", type=int, help="at most N rows (newest first)")
    p.add_argument("-a", "--all", action="store_true", help="include not-started tasks")
    p.add_argument("--no-color", action="store_true", help="plain symbols")

    p = _add(sub, "retry", _cmd_retry, "submit failed tasks again with their stored parameters")
    _common(p)
    p.add_argument("-s", "--steps", action="append", help="only these steps")
    _param_option(p)
    _run_options(p)

    p = _add(
        sub,
        "reset",
        _cmd_reset,
        "return queued and running tasks to not-started (after a crash; see --stale)",
    )
    _common(p)
    p.add_argument(
        "--stale",
        action="store_true",
        help="only running tasks whose lease expired (their process is gone)",
    )

    p = _add(sub, "cancel", _cmd_cancel, "cancel queued tasks that have not started")
    _common(p)
    p.add_argument("-s", "--steps", action="append", help="only these steps")

    p = _add(sub, "sync", _cmd_sync, "rebuild the database from the NXprocess records")
    _common(p)
    p.add_argument("--keep", action="store_true", help="keep rows of files that are gone")

    _queue_parser(subparsers, "queue")
