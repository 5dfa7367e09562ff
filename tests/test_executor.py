"""Tests of run_scan_steps, the executors and the reduction queue.

The steps here are real functions registered in a test-local registry: they read the
detector data through the scan file's external link and write NXprocess records, so
a broken link makes them fail for real.
"""

from __future__ import annotations

import os
import threading

import h5py
import numpy as np
import pytest

from nxrefine_bs.errors import DataLinkError, WorkflowError
from nxrefine_bs.nexus.h5tools import write_field
from nxrefine_bs.nexus.provenance import process_done, read_process, record_process
from nxrefine_bs.reduce.steps import Step
from nxrefine_bs.simulation.scan import make_simulated_scan
from nxrefine_bs.workflow import (
    DaskExecutor,
    LocalExecutor,
    ReductionQueue,
    Status,
    WorkflowDB,
    run_scan_steps,
)

MODULE = __name__
_gate = threading.Event()


def sum_step(scan_file, entry, *, overwrite=False, progress=False, first=0, **params):
    """Sum two frames read through the external link; record ``test_sum``.

    The frames are read with the scan file opened read-only: HDF5 opens externally
    linked files with the intent of the file holding the link, so reading them
    through an ``r+`` handle would open (and touch) the raw data read-write.
    """
    with h5py.File(scan_file, "r") as f:
        group = f[entry]
        try:
            data = group["data/data"]
        except KeyError as exc:  # dangling external link
            link = group["data"].get("data", getlink=True)
            raise DataLinkError(
                f"{scan_file}:{entry}/data/data -> {link.filename} cannot be opened"
            ) from exc
        total = float(np.sum(data[first : first + 2], dtype=np.int64))
    with h5py.File(scan_file, "r+") as f:
        record_process(f[entry], "test_sum", parameters={"first": first}, summary={"total": total})
    return {"total": total}


def after_step(scan_file, entry, *, overwrite=False, progress=False, **params):
    """Requires ``sum``; records ``test_after``."""
    with h5py.File(scan_file, "r+") as f:
        record_process(f[entry], "test_after")
    return {}


def orient_step(scan_file, entry, *, overwrite=False, progress=False, **params):
    """Stands for the orientation step (process ``nxrefine``)."""
    with h5py.File(scan_file, "r+") as f:
        record_process(f[entry], "nxrefine")
    return {}


def total_step(scan_file, entry, *, overwrite=False, progress=False, **params):
    """Per-scan step after ``sum`` on every entry."""
    with h5py.File(scan_file, "r+") as f:
        totals = [read_process(f[e], "test_sum")["summary"]["total"] for e in ("f1", "f2")]
        record_process(f["entry"], "test_total", summary={"total": sum(totals)})
    return {"total": sum(totals)}


def slow_step(scan_file, entry, *, overwrite=False, progress=False, **params):
    """Blocks until the test opens the gate."""
    if not _gate.wait(20):
        raise RuntimeError("gate never opened")
    with h5py.File(scan_file, "r+") as f:
        record_process(f[entry], "test_slow")
    return {}


REGISTRY = {
    s.name: s
    for s in (
        Step("slow", "test_slow", f"{MODULE}:slow_step"),
        Step("sum", "test_sum", f"{MODULE}:sum_step"),
        Step("refine", "nxrefine", f"{MODULE}:orient_step", from_parent=True),
        Step("after", "test_after", f"{MODULE}:after_step", requires=("sum",)),
        Step("total", "test_total", f"{MODULE}:total_step", per_entry=False, requires=("sum",)),
    )
}


@pytest.fixture
def scan(tmp_path):
    return make_simulated_scan(tmp_path, n_frames=6, omegas=(0.0, 30.0))


def _status(db, scan_file, step):
    return dict(db.status(scan_file)[step])


def test_run_scan_steps_records_everything(tmp_path, scan):
    db = WorkflowDB(tmp_path)
    result = run_scan_steps(
        scan.scan_file,
        ["total", "after", "sum"],
        None,
        {"sum": {"first": 1}},
        db,
        registry=REGISTRY,
    )
    assert result.ok, result.failed
    # registry order: sum (f1, f2), after (f1, f2), total (entry)
    assert [(o.step, o.entry) for o in result.outcomes] == [
        ("sum", "f1"),
        ("sum", "f2"),
        ("after", "f1"),
        ("after", "f2"),
        ("total", "entry"),
    ]
    truth = sum(
        float(np.sum(scan.simulators[e].frames(1, 3), dtype=np.int64)) for e in ("f1", "f2")
    )
    with h5py.File(scan.scan_file, "r") as f:
        assert read_process(f["f1"], "test_sum")["parameters"] == {"first": 1}
        total = read_process(f["entry"], "test_total")["summary"]["total"]
    assert total == pytest.approx(truth) and total > 0
    assert _status(db, scan.scan_file, "sum") == {"f1": Status.DONE, "f2": Status.DONE}
    assert db.scan_status(scan.scan_file)["total"] is Status.DONE
    rec = db.task(scan.scan_file, "f2", "after")
    assert rec.pid == os.getpid() and rec.worker.startswith("thread:")
    # second run: nothing is redone without overwrite
    again = run_scan_steps(scan.scan_file, ["sum"], ["f1"], None, db, registry=REGISTRY)
    assert again.outcomes == [] and again.summary().endswith("nothing to do")
    redo = run_scan_steps(
        scan.scan_file, ["sum"], ["f1"], None, db, overwrite=True, registry=REGISTRY
    )
    assert redo.outcomes[0].ran and redo.outcomes[0].result["total"] > 0


def test_failing_step_is_recorded_and_blocks_dependents(tmp_path, scan):
    (scan.scan_dir / "f2.h5").rename(scan.scan_dir / "moved.h5")  # break f2's data link
    raw_before = (scan.scan_dir / "f1.h5").stat().st_mtime_ns
    db = WorkflowDB(tmp_path)
    result = run_scan_steps(
        scan.scan_file, ["sum", "after", "total"], None, None, db, registry=REGISTRY
    )
    assert not result.ok
    assert result.outcome("sum", "f1").status is Status.DONE
    assert result.outcome("after", "f1").status is Status.DONE
    failed = {(o.step, o.entry): o.message for o in result.failed}
    assert failed.keys() == {("sum", "f2"), ("after", "f2"), ("total", "entry")}
    assert failed[("sum", "f2")].startswith("DataLinkError:") and "f2.h5" in failed[("sum", "f2")]
    assert "requires sum on f2, which failed" in failed[("after", "f2")]
    assert "requires sum on f2" in failed[("total", "entry")]
    rows = {(r.step, r.entry): r for r in db.list_tasks(status="failed")}
    assert rows.keys() == failed.keys()
    assert rows[("sum", "f2")].message == failed[("sum", "f2")]
    assert db.scan_status(scan.scan_file)["sum"] is Status.FAILED
    assert (scan.scan_dir / "f1.h5").stat().st_mtime_ns == raw_before  # raw data untouched
    with h5py.File(scan.scan_file, "r") as f:
        assert not process_done(f["f2"], "test_sum")


def test_requirement_not_done_and_unknown_inputs(tmp_path, scan):
    db = WorkflowDB(tmp_path)
    result = run_scan_steps(scan.scan_file, ["after"], ["f1"], None, db, registry=REGISTRY)
    assert "requires sum on f1, which is not done" in result.failed[0].message
    with pytest.raises(WorkflowError, match="unknown reduction step"):
        run_scan_steps(scan.scan_file, ["nope"], registry=REGISTRY)
    with pytest.raises(WorkflowError, match="has no entries f9"):
        run_scan_steps(scan.scan_file, ["sum"], ["f9"], registry=REGISTRY)


def test_child_waits_for_parent_orientation(tmp_path):
    parent = make_simulated_scan(tmp_path, scan="100K", n_frames=4, omegas=(0.0,))
    child = make_simulated_scan(tmp_path, scan="200K", n_frames=4, omegas=(0.0,))
    with h5py.File(child.scan_file, "r+") as f:
        grp = f["entry"].require_group("nxscans")
        write_field(grp, "parent", parent.scan_file.name)
    db = WorkflowDB(tmp_path)
    blocked = run_scan_steps(child.scan_file, ["refine"], None, None, db, registry=REGISTRY)
    message = blocked.failed[0].message
    assert "waiting for parent sim_100K.nxs" in message and "f1" in message
    assert db.task(child.scan_file, "f1", "refine").message == message

    # With both in one queue, the child is deferred until the parent's job is done.
    with ReductionQueue(db, LocalExecutor(2), registry=REGISTRY) as queue:
        jobs = queue.submit([child.scan_file, parent.scan_file], steps=["refine"])
        assert [j.scan_file for j in jobs] == [parent.scan_file, child.scan_file]
        results = queue.wait(timeout=30)
    assert all(r.ok for r in results)
    assert db.scan_status(child.scan_file)["refine"] is Status.DONE


def test_queue_cancel_and_retry(tmp_path, scan):
    db = WorkflowDB(tmp_path)
    other = make_simulated_scan(tmp_path, scan="10K", n_frames=4, omegas=(0.0,))
    _gate.clear()
    queue = ReductionQueue(db, LocalExecutor(1), registry=REGISTRY)
    try:
        queue.submit(scan.scan_file, steps=["slow"], entries=["f1"])
        queue.submit(other.scan_file, steps=["sum"])
        assert db.task_status(other.scan_file, "f1", "sum") is Status.QUEUED
        cancelled = queue.cancel([other.scan_file])
        assert [(r.step, r.entry) for r in cancelled] == [("sum", "f1")]
        _gate.set()
        queue.wait(timeout=30)
        assert db.task_status(scan.scan_file, "f1", "slow") is Status.DONE
        assert db.task_status(other.scan_file, "f1", "sum") is Status.NOT_STARTED
        with h5py.File(other.scan_file, "r") as f:
            assert not process_done(f["f1"], "test_sum")

        # a failure, fixed, then retried
        (other.scan_dir / "f1.h5").rename(other.scan_dir / "away.h5")
        queue.submit(other.scan_file, steps=["sum", "after"])
        queue.wait(timeout=30)
        assert {r.step for r in db.list_tasks(status="failed")} == {"sum", "after"}
        (other.scan_dir / "away.h5").rename(other.scan_dir / "f1.h5")
        jobs = queue.retry()
        assert [j.steps for j in jobs] == [["sum", "after"]]
        queue.wait(timeout=30)
        assert db.list_tasks(status="failed") == []
        assert db.scan_status(other.scan_file)["after"] is Status.DONE
    finally:
        _gate.set()
        queue.close()


def test_dask_local_cluster_runs_a_step(tmp_path, scan):
    db = WorkflowDB(tmp_path)
    with DaskExecutor("local", n_workers=1, processes=False, threads_per_worker=1) as ex:
        queue = ReductionQueue(db, ex, registry=REGISTRY)
        queue.submit(scan.scan_file, steps=["sum", "total"])
        (result,) = queue.wait(timeout=60)
    assert result.ok
    rec = db.task(scan.scan_file, "f2", "sum")
    assert rec.status is Status.DONE and rec.worker.startswith("dask:")
    assert db.scan_status(scan.scan_file)["total"] is Status.DONE


def _cli(argv):
    """Run the workflow sub-commands through their own parser (as ``nxrefine-bs`` does)."""
    import argparse

    from nxrefine_bs.cli import workflow

    parser = argparse.ArgumentParser(prog="nxrefine-bs")
    workflow.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_status_tasks_cancel_sync(tmp_path, scan, capsys):
    with h5py.File(scan.scan_file, "r+") as f:
        record_process(f["f1"], "nxmax")
    assert _cli(["workflow", "sync", "-x", str(tmp_path)]) == 0
    db = WorkflowDB(tmp_path)
    db.fail(scan.scan_file, "f2", "max", "DataLinkError: f2.h5 is missing")
    db.queue(scan.scan_file, "f1", "find")
    capsys.readouterr()
    assert _cli(["workflow", "status", "-x", str(tmp_path), "--no-color"]) == 0
    out = capsys.readouterr().out
    assert "sim/xtal1/sim_300K.nxs" in out and "✗" in out and "○" in out
    assert _cli(["workflow", "tasks", str(scan.scan_file), "--status", "failed"]) == 0
    out = capsys.readouterr().out
    assert "f2.h5 is missing" in out and "1 task(s)" in out
    # a directory lists the tasks of the scans under it: the experiment, or a sample
    assert _cli(["workflow", "tasks", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "3 task(s)" in out and "queued" in out and "failed" in out and "done" in out
    assert _cli(["workflow", "tasks", str(scan.scan_file.parent)]) == 0
    assert "3 task(s)" in capsys.readouterr().out
    other = tmp_path / "sim" / "xtal2"
    other.mkdir()
    assert _cli(["workflow", "tasks", str(other)]) == 0
    assert "0 task(s)" in capsys.readouterr().out
    assert _cli(["workflow", "cancel", str(scan.scan_file)]) == 0
    assert "1 task(s) cancelled" in capsys.readouterr().out
    assert db.task_status(scan.scan_file, "f1", "find") is Status.NOT_STARTED
    with pytest.raises(SystemExit) as exc:
        _cli(["workflow", "queue", "--help"])
    assert exc.value.code == 0 and "--dask" in capsys.readouterr().out
    with pytest.raises(WorkflowError, match="does not exist"):
        _cli(["workflow", "status", "-x", str(tmp_path / "nowhere")])


def test_graph_comes_from_the_step_registry(tmp_path):
    from nxrefine_bs.reduce.steps import STEPS
    from nxrefine_bs.workflow.graph import build_graph

    parent = make_simulated_scan(tmp_path, scan="100K", n_frames=3, omegas=(0.0, 30.0, 60.0))
    child = make_simulated_scan(tmp_path, scan="200K", n_frames=3, omegas=(0.0, 30.0, 60.0))
    with h5py.File(child.scan_file, "r+") as f:
        write_field(f["entry"].require_group("nxscans"), "parent", parent.scan_file.name)
    with h5py.File(parent.scan_file, "r+") as f:
        record_process(f["f2"], "nxmax")  # done: not in the graph, not a dependency
    tasks, _ = build_graph([child.scan_file, parent.scan_file], token="t0", overwrite=False)
    by_key = {t.key: t for t in tasks}
    assert tasks[0].scan_file == str(parent.scan_file)  # parents first
    assert len(tasks) == 2 * (5 * 3 + 2) - 1 and len(by_key) == len(tasks)
    assert set(by_key["find-sim_100K-f1-t0"].deps) == {"max-sim_100K-f1-t0"}
    assert by_key["find-sim_100K-f2-t0"].deps == ()
    # max of f2... reads f1's transmission
    assert by_key["max-sim_100K-f3-t0"].deps == ("max-sim_100K-f1-t0",)
    # refine: its own find, the previous rotation's refine, the parent's refine
    assert set(by_key["refine-sim_200K-f3-t0"].deps) == {
        "find-sim_200K-f3-t0", "refine-sim_200K-f2-t0", "refine-sim_100K-f3-t0"
    }  # fmt: skip
    # prepare and transform read the lattice every rotation's refine rewrites
    # (ordering only: a failed refine elsewhere does not block them)
    refines = {f"refine-sim_100K-f{i}-t0" for i in (1, 2, 3)}
    assert set(by_key["prepare-sim_100K-f3-t0"].deps) == refines
    t1 = by_key["transform-sim_100K-f1-t0"]
    assert set(t1.deps) == refines and set(t1.soft) == refines - {"refine-sim_100K-f1-t0"}
    assert set(by_key["refine-sim_200K-f3-t0"].soft) == {"refine-sim_200K-f2-t0"}
    assert set(by_key["combine-sim_100K-t0"].deps) == {
        f"transform-sim_100K-f{i}-t0" for i in (1, 2, 3)
    }
    assert by_key["pdf-sim_100K-t0"].deps == ("combine-sim_100K-t0",)  # any registered step
    heavy = {t.step.name for t in tasks if t.heavy}
    assert heavy == {s.name for s in STEPS.values() if s.memory_heavy}
    # every dependency comes earlier in the list
    seen: set[str] = set()
    for t in tasks:
        assert set(t.deps) <= seen, t.key
        seen.add(t.key)
