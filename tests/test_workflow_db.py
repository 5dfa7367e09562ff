"""Tests of the workflow-status database (real SQLite files, real threads and processes)."""

from __future__ import annotations

import multiprocessing
import threading

import h5py
import pytest

from nxrefine_bs.errors import WorkflowError
from nxrefine_bs.nexus.provenance import record_process
from nxrefine_bs.simulation.scan import make_simulated_scan
from nxrefine_bs.workflow.database import Status, WorkflowDB, aggregate_status
from nxrefine_bs.workflow.sync import registry_layout, sync_from_files

S = Status


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        ([], S.NOT_STARTED),
        ([S.DONE, S.DONE], S.DONE),
        ([S.DONE, S.FAILED, S.IN_PROGRESS], S.FAILED),
        ([S.QUEUED, S.IN_PROGRESS], S.IN_PROGRESS),
        ([S.QUEUED, S.DONE], S.IN_PROGRESS),
        ([S.QUEUED, S.NOT_STARTED], S.QUEUED),
        ([S.DONE, S.NOT_STARTED], S.IN_PROGRESS),
        ([S.NOT_STARTED, S.NOT_STARTED], S.NOT_STARTED),
        ([3, -1], S.FAILED),
    ],
)
def test_aggregation_follows_nxrefine_rules(statuses, expected):
    assert aggregate_status(statuses) is expected


def test_status_codes_and_parsing():
    assert [int(s) for s in (S.NOT_STARTED, S.QUEUED, S.IN_PROGRESS, S.DONE, S.FAILED)] == [
        0,
        1,
        2,
        3,
        -1,
    ]
    assert Status.parse("in-progress") is S.IN_PROGRESS
    assert Status.parse("-1") is S.FAILED
    with pytest.raises(WorkflowError, match="unknown task status"):
        Status.parse("bogus")


def test_lifecycle_and_queries(tmp_path):
    db = WorkflowDB(tmp_path)
    assert db.url == f"sqlite:///{tmp_path}/tasks/workflow.db"
    scan = tmp_path / "si" / "xtal1" / "si_300K.nxs"
    name = db.register_scan(scan, ["f1", "f2"], steps=registry_layout())
    assert name == "si/xtal1/si_300K.nxs"
    table = db.status(scan)
    assert set(table["max"]) == {"f1", "f2"} and set(table["combine"]) == {"entry"}
    assert all(s is S.NOT_STARTED for e in table.values() for s in e.values())

    db.queue(scan, "f1", "max")
    db.queue(scan, "f2", "max")
    assert db.scan_status(scan)["max"] is S.QUEUED
    assert db.start(scan, "f1", "max", worker="w1")
    db.done(scan, "f1", "max")
    assert db.scan_status(scan)["max"] is S.IN_PROGRESS
    assert db.cancel(scan, "f2", "max")
    assert not db.cancel(scan, "f2", "max")  # not queued any more
    assert db.task_status(scan, "f2", "max") is S.NOT_STARTED
    # a claim only starts a queued task
    assert not db.start(scan, "f2", "max", claim=True)
    db.queue(scan, "f2", "max")
    assert db.start(scan, "f2", "max", claim=True)
    db.fail(scan, "f2", "max", ValueError("bad frame 7"))
    assert db.scan_status(scan)["max"] is S.FAILED

    rec = db.task(scan, "f1", "max")
    assert rec.status is S.DONE and rec.worker == "w1" and rec.pid and rec.host
    assert rec.queue_time <= rec.start_time <= rec.end_time and rec.duration >= 0
    failed = db.list_tasks(status="failed")
    assert [(r.entry, r.step, r.message) for r in failed] == [
        ("f2", "max", "ValueError: bad frame 7")
    ]
    assert len(db.list_tasks(step="max")) == 2
    assert len(db.list_tasks(scan_file=scan, entry=["f1"])) == 5  # per-entry steps
    assert db.list_tasks(pattern="si/%", status=[S.DONE, S.FAILED], limit=1)[0].step == "max"
    grid = db.status_table()
    assert grid == {name: db.scan_status(scan)}
    with pytest.raises(WorkflowError, match="not registered"):
        db.status(tmp_path / "si" / "xtal1" / "si_10K.nxs")


def test_any_sqlalchemy_url_and_pickling(tmp_path):
    import pickle

    db = WorkflowDB(f"sqlite:///{tmp_path}/other.db", experiment_dir=tmp_path)
    db.queue(tmp_path / "a" / "b" / "a_1.nxs", "f1", "find")
    clone = pickle.loads(pickle.dumps(db))
    assert clone.url == db.url and clone.task_status("a/b/a_1.nxs", "f1", "find") is S.QUEUED
    # outside the experiment directory names stay absolute
    outside = tmp_path.parent / "elsewhere.nxs"
    assert db.relative_name(outside) == outside.as_posix()


def test_sync_from_files(tmp_path):
    sim = make_simulated_scan(tmp_path, n_frames=4, omegas=(0.0, 30.0))
    with h5py.File(sim.scan_file, "r+") as f:
        record_process(
            f["f1"],
            "nxmax",
            start_time="2026-01-02T03:04:05+00:00",
            end_time="2026-01-02T03:05:05+00:00",
        )
        record_process(f["entry"], "nxcombine")
    db = WorkflowDB(tmp_path)
    # a stale DONE (no NXprocess) must go back to NOT_STARTED; a FAILED row is kept
    db.register_scan(sim.scan_file, ["f1", "f2"], steps=registry_layout())
    db.done(sim.scan_file, "f2", "find")
    db.fail(sim.scan_file, "f1", "find", "boom")
    ghost = tmp_path / "sim" / "xtal1" / "sim_10K.nxs"
    db.register_scan(ghost, ["f1"])

    synced = sync_from_files(db)
    assert synced == ["sim/xtal1/sim_300K.nxs"]
    assert db.scan_files() == ["sim/xtal1/sim_300K.nxs"]  # ghost pruned
    table = db.status(sim.scan_file)
    assert table["max"] == {"f1": S.DONE, "f2": S.NOT_STARTED}
    assert table["find"] == {"f1": S.FAILED, "f2": S.NOT_STARTED}
    assert table["combine"] == {"entry": S.DONE}
    rec = db.task(sim.scan_file, "f1", "max")
    assert rec.start_time.isoformat() == "2026-01-02T03:04:05"
    assert rec.end_time.isoformat() == "2026-01-02T03:05:05"
    assert rec.pid is not None and rec.host
    assert db.entries(sim.scan_file) == ["f1", "f2"]


# --------------------------------------------------------------------------- concurrency

N_WORKERS = 4
N_TASKS = 15


def _hammer(url: str, worker: int, n_tasks: int) -> None:
    """Each worker: full lifecycle on its own tasks + bump one shared task."""
    db = WorkflowDB(url, busy_timeout=5.0, retries=50)
    scan = "s/l/s_1.nxs"
    for i in range(n_tasks):
        entry = f"f{worker * 1000 + i}"
        db.queue(scan, entry, "max")
        db.start(scan, entry, "max", worker=f"w{worker}")
        db.done(scan, entry, "max")
        db.start(scan, "entry", "shared")  # attempts += 1, contended by everyone
    db.close()


def _check_hammered(db: WorkflowDB, n_workers: int) -> None:
    tasks = db.list_tasks(scan_file="s/l/s_1.nxs", step="max")
    assert len(tasks) == n_workers * N_TASKS
    assert all(t.status is S.DONE and t.attempts == 1 for t in tasks)
    shared = db.task("s/l/s_1.nxs", "entry", "shared")
    assert shared.attempts == n_workers * N_TASKS  # no lost update
    assert len(db.entries("s/l/s_1.nxs")) == n_workers * N_TASKS


def test_concurrent_threads(tmp_path):
    url = f"sqlite:///{tmp_path}/tasks/workflow.db"
    (tmp_path / "tasks").mkdir()
    db = WorkflowDB(url, experiment_dir=tmp_path)
    errors: list[BaseException] = []

    def run(worker: int) -> None:
        try:
            _hammer(url, worker, N_TASKS)
        except BaseException as exc:  # collected and reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(N_WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    _check_hammered(db, N_WORKERS)


def test_concurrent_processes(tmp_path):
    url = f"sqlite:///{tmp_path}/tasks/workflow.db"
    (tmp_path / "tasks").mkdir()
    db = WorkflowDB(url, experiment_dir=tmp_path)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_hammer, args=(url, w, N_TASKS)) for w in range(N_WORKERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * N_WORKERS
    _check_hammered(db, N_WORKERS)
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_persistence_layer_imports_no_nexus_or_reduction_code():
    """schema/engine/leases/queries/database stay below the NeXus and reduction layers."""
    import ast
    from pathlib import Path

    import nxrefine_bs.workflow as wf

    root = Path(wf.__file__).parent
    for name in ("schema", "engine", "leases", "queries", "database"):
        tree = ast.parse((root / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = "." * node.level + (node.module or "")
                assert not any(
                    part in ("nexus", "reduce", "h5py", "sync", "task", "graph")
                    for part in module.replace(".", " ").split()
                ), f"{name}.py imports {module}"
            elif isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] != "h5py" for a in node.names), name


def test_two_experiments_in_one_sqlite_file(tmp_path):
    url = f"sqlite:///{tmp_path}/facility.db"
    a = WorkflowDB(url, experiment_dir=tmp_path / "a")
    b = WorkflowDB(url, experiment_dir=tmp_path / "b")
    a.queue("s/l/s_1.nxs", "f1", "max", params={"first": 1})
    b.fail("s/l/s_1.nxs", "f1", "max", "only b")
    assert a.task_status("s/l/s_1.nxs", "f1", "max") is S.QUEUED
    assert b.task_status("s/l/s_1.nxs", "f1", "max") is S.FAILED
    assert a.list_tasks(status="failed") == [] and len(b.list_tasks()) == 1
    assert a.task("s/l/s_1.nxs", "f1", "max").params == {"first": 1}
    assert sorted(a.experiments()) == [(tmp_path / "a").as_posix(), (tmp_path / "b").as_posix()]
