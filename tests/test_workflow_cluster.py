"""The reduction graph on a real cluster: a ``dask scheduler`` and two ``dask worker``
processes on 127.0.0.1, clients in their own processes, SQLite and a real PostgreSQL.

The steps are the small real steps of ``wf_steps`` (they read the detector data,
write NXprocess records and, for ``grid``, a ``.part`` file before waiting on a gate
file), so a test can kill a worker or a client at a known moment.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import wf_steps
from wf_services import DaskCluster, postgres_server, python_client, wait_until

from nxrefine_bs.nexus.provenance import read_process
from nxrefine_bs.simulation.scan import make_simulated_scan
from nxrefine_bs.workflow import DaskExecutor, ReductionQueue, Status, WorkflowDB
from nxrefine_bs.workflow.sync import sync_from_files

LEASE = 3.0
STEPS = ["count", "grid", "merge"]
TIMEOUT = 120


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("dask")
    env = {wf_steps.GATE_ENV: str(root / "gate"), wf_steps.FAIL_ENV: str(root / "fail")}
    c = DaskCluster(root, env)
    (root / "gate").touch()
    try:
        c.start(2)
        yield c
    finally:
        c.stop()


@pytest.fixture
def gate(cluster):
    """The gate file of the grid step: closed at the start, opened at the end."""
    path = cluster.root / "gate"
    path.unlink(missing_ok=True)
    cluster.ensure_workers(2)
    yield path
    path.touch()
    (cluster.root / "fail").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def pg():
    with postgres_server() as server:
        yield server


def _scans(experiment: Path, n: int = 2, entries: int = 2):
    omegas = tuple(float(30 * i) for i in range(entries))
    return [
        make_simulated_scan(experiment, scan=f"{100 + i}K", n_frames=3, omegas=omegas).scan_file
        for i in range(n)
    ]


def _client(url, experiment, address, files, *, steps=STEPS, params=None, wait=False):
    """A client process: submit, print SUBMITTED, optionally wait for the results."""
    script = f"""
from nxrefine_bs.workflow import DaskExecutor, ReductionQueue, WorkflowDB
import wf_steps
db = WorkflowDB({str(url)!r}, experiment_dir={str(experiment)!r}, lease={LEASE})
queue = ReductionQueue(db, DaskExecutor({address!r}), registry=wf_steps.REGISTRY,
                       own_executor=True)
jobs = queue.submit({[str(f) for f in files]!r}, steps={steps!r}, params={params!r})
print("SUBMITTED", sum(len(j.tasks) for j in jobs), flush=True)
if {wait!r}:
    queue.wait()
queue.close()
"""
    return python_client(script, wait=False)


def _restrictions(dask_scheduler) -> dict:
    """Runs on the scheduler: each task's resource restrictions."""
    return {
        str(k): dict(ts.resource_restrictions or {}) for k, ts in dask_scheduler.tasks.items()
    }


def _submitted(proc) -> int:
    line = proc.stdout.readline()
    assert line.startswith("SUBMITTED"), (line, proc.stderr.read() if proc.poll() else "")
    return int(line.split()[1])


def _rows(db, files):
    return [r for f in files for r in db.list_tasks(scan_file=f) if r.step in STEPS]


def _all_done(db, files):
    rows = _rows(db, files)
    return rows and all(r.status is Status.DONE for r in rows)


def test_killed_worker_and_killed_client_end_done(tmp_path, cluster, gate):
    files = _scans(tmp_path)
    db = WorkflowDB(tmp_path, lease=LEASE)
    client = _client(db.url, tmp_path, cluster.address, files, wait=True)
    assert _submitted(client) == 2 * (2 + 2 + 1)
    running = wait_until(
        lambda: db.list_tasks(status="in_progress", step="grid"), TIMEOUT, "a running grid task"
    )
    victim = running[0]
    scan_file = tmp_path / victim.filename
    scan_dir = scan_file.parent / scan_file.stem.split("_", 1)[1]
    wait_until(
        lambda: (scan_dir / f"{victim.entry}_transform.nxs.part").exists(), TIMEOUT, "the .part"
    )
    assert victim.worker.startswith("dask:w") and victim.host
    os.kill(client.pid, signal.SIGKILL)  # the client, mid-run
    client.communicate(timeout=30)  # reaped, pipes closed
    os.kill(victim.pid, signal.SIGKILL)  # the worker, mid-transform
    gate.touch()
    wait_until(lambda: _all_done(db, files), TIMEOUT, "every task DONE after the kills")
    assert not any(r.status is Status.FAILED for r in _rows(db, files))
    again = db.task(tmp_path / victim.filename, victim.entry, "grid")
    assert again.attempts >= 2 and again.pid != victim.pid
    assert not list(tmp_path.rglob("*.part"))
    with h5py.File(tmp_path / victim.filename, "r") as f:
        # the rerun found no stray .part: the engine removed the killed run's one
        assert read_process(f[victim.entry], "wf_grid")["summary"]["stale_part"] is False
    assert wf_steps.runs(tmp_path / victim.filename).count(("grid", victim.entry)) == 2


def test_detached_client_exits_and_graph_completes(tmp_path, cluster, gate):
    files = _scans(tmp_path, n=1)
    db = WorkflowDB(tmp_path, lease=LEASE)
    client = _client(db.url, tmp_path, cluster.address, files)
    assert _submitted(client) == 5
    client.communicate(timeout=60)
    assert client.returncode == 0  # the client is gone...
    assert not _all_done(db, files)  # ...before the work is done (the gate is shut)
    with cluster.client() as c:  # the graph is in the scheduler, heavy steps restricted
        held = c.run_on_scheduler(_restrictions)
    grids = {k: v for k, v in held.items() if k.startswith("grid-sim_100K-")}
    assert len(grids) == 2 and all(v == {"reduce_memory": 1} for v in grids.values())
    assert any(k.startswith("merge-sim_100K-") and v == {} for k, v in held.items())
    gate.touch()
    wait_until(lambda: _all_done(db, files), TIMEOUT, "the detached graph to complete")
    # dependency order held: merge ran after both grids
    order = wf_steps.runs(files[0])
    assert order.index(("merge", "entry")) > max(order.index(("grid", e)) for e in ("f1", "f2"))


def test_overlapping_submissions_wait_instead_of_failing(tmp_path, cluster, gate):
    files = _scans(tmp_path)
    db = WorkflowDB(tmp_path, lease=LEASE)
    first = _client(db.url, tmp_path, cluster.address, files[:1], steps=["count", "grid"])
    assert _submitted(first) == 4
    second = _client(db.url, tmp_path, cluster.address, files)
    # the first scan's count and grid are pending: only its merge is new
    assert _submitted(second) == 1 + 5
    gate.touch()
    wait_until(lambda: _all_done(db, files), TIMEOUT, "both submissions to complete")
    assert db.list_tasks(status="failed") == []
    # the first scan's count and grid ran as tasks of the first submission only
    rows = db.list_tasks(scan_file=files[0])
    tokens = {r.key.rsplit("-", 1)[1] for r in rows if r.step != "merge"}
    assert len(tokens) == 1
    for f in files:
        assert set(wf_steps.runs(f)) == {
            ("count", "f1"), ("count", "f2"), ("grid", "f1"), ("grid", "f2"), ("merge", "entry")
        }
    for proc in (first, second):
        proc.communicate(timeout=60)
        assert proc.returncode == 0


def test_retry_reproduces_the_submitted_grid(tmp_path, cluster, gate):
    files = _scans(tmp_path, n=1)
    (cluster.root / "fail").touch()
    gate.touch()
    db = WorkflowDB(tmp_path, lease=LEASE)
    grid = {"grid": {"qh": [-5.0, 0.05, 5.0]}}
    client = _client(db.url, tmp_path, cluster.address, files, params=grid)
    assert _submitted(client) == 5
    client.communicate(timeout=60)  # the client exits once it has submitted
    wait_until(
        lambda: db.task_status(files[0], "entry", "merge") is Status.FAILED,
        TIMEOUT,
        "the grid failure to block merge",
    )
    failed = db.list_tasks(status="failed")
    expected = {("grid", "f1"), ("grid", "f2"), ("merge", "entry")}
    assert {(r.step, r.entry) for r in failed} == expected
    assert all(r.params == {"qh": [-5.0, 0.05, 5.0]} for r in failed if r.step == "grid")
    (cluster.root / "fail").unlink()
    with DaskExecutor(cluster.address) as ex:
        queue = ReductionQueue(db, ex, registry=wf_steps.REGISTRY)
        jobs = queue.retry()
        # grids before the merge that needs them
        keys = jobs[0].keys
        assert [k.split("-")[0] for k in keys] == ["grid", "grid", "merge"]
        assert keys[0].startswith("grid-sim_100K-f1-")
        results = queue.wait(timeout=TIMEOUT)
    assert all(r.ok for r in results)
    assert _all_done(db, files)
    with h5py.File(files[0], "r") as f:
        for entry in ("f1", "f2"):
            rec = read_process(f[entry], "wf_grid")
            assert rec["parameters"]["qh"] == [-5.0, 0.05, 5.0]
            assert rec["summary"]["shape"][2] == 201


def test_two_experiments_share_one_postgres_database(tmp_path, cluster, gate, pg):
    url = pg.new_database()
    a, b = tmp_path / "a" / "exp", tmp_path / "b" / "exp"
    files_a, files_b = _scans(a), _scans(b, n=1)  # same relative names in both
    gate.touch()
    clients = [
        _client(url, a, cluster.address, files_a),
        _client(url, b, cluster.address, files_b),
    ]
    assert [_submitted(c) for c in clients] == [10, 5]
    db_a = WorkflowDB(url, experiment_dir=a, lease=LEASE)
    db_b = WorkflowDB(url, experiment_dir=b, lease=LEASE)
    wait_until(lambda: _all_done(db_a, files_a) and _all_done(db_b, files_b), TIMEOUT, "both")
    assert db_a.scan_files() == ["sim/xtal1/sim_100K.nxs", "sim/xtal1/sim_101K.nxs"]
    assert db_b.scan_files() == ["sim/xtal1/sim_100K.nxs"]
    assert set(db_a.experiments()) == {a.as_posix(), b.as_posix()}
    # pruning one experiment never touches the other's rows
    files_b[0].unlink()
    sync_from_files(db_b, registry=wf_steps.REGISTRY)
    assert db_b.scan_files() == []
    assert len(db_a.scan_files()) == 2 and _all_done(db_a, files_a)
    db_b.fail(files_a[0], "f1", "count", "only in b")  # same name, other experiment
    assert db_a.task_status(files_a[0], "f1", "count") is Status.DONE
    for c in clients:
        c.communicate(timeout=60)
        assert c.returncode == 0
    db_a.close()


def test_concurrent_first_use_of_a_fresh_postgres_database(pg):
    url = pg.new_database()
    script = (
        "import sys; from nxrefine_bs.workflow import WorkflowDB; "
        f"db = WorkflowDB({url!r}, experiment='e' + sys.argv[1]); "
        "db.queue('s/l/s_1.nxs', 'f1', 'max'); print(db.experiments())"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(i)], stderr=subprocess.PIPE, text=True)
        for i in range(6)
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, errors
    db = WorkflowDB(url, experiment="e0")
    assert db.experiments() == [f"e{i}" for i in range(6)]
    assert db.task_status("s/l/s_1.nxs", "f1", "max") is Status.QUEUED
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM wf_meta").scalar() == 1
    db.close()


def test_scheduler_files_and_database_connections_stay_flat(tmp_path, cluster, gate, pg):
    gate.touch()
    url = pg.new_database()
    database = url.rsplit("/", 1)[1]
    omegas = tuple(float(i) for i in range(50))
    files = [
        make_simulated_scan(tmp_path, scan=f"{i}K", n_frames=1, omegas=omegas).scan_file
        for i in range(2)
    ]
    db = WorkflowDB(url, experiment_dir=tmp_path, lease=LEASE)
    counts = []
    with DaskExecutor(cluster.address) as ex:
        queue = ReductionQueue(db, ex, registry=wf_steps.CHEAP)
        for f in files:  # 2 x 100 tasks
            jobs = queue.submit(f)
            assert sum(len(j.tasks) for j in jobs) == 100
            results = queue.wait(timeout=TIMEOUT)
            assert all(r.ok for r in results)
            db.close()
            counts.append((cluster.scheduler_fds(), pg.connections(database)))
    (fds1, conns1), (fds2, conns2) = counts
    assert fds2 <= fds1 + 2, counts  # no handle per task
    assert conns1 == 0 and conns2 == 0, counts  # workers disposed their connections
    assert db.counts()[Status.DONE] == 200
    db.close()
