"""Leases, reset, job parameters and the [server] settings of the workflow (one host).

Real SQLite files, real processes (a client killed with SIGKILL), the real CLI parser.
"""

from __future__ import annotations

import argparse
import os
import signal

import h5py
import pytest
import wf_steps
from wf_services import python_client, wait_until

from nxrefine_bs.callbacks.reduction import PostScanReduction
from nxrefine_bs.errors import WorkflowError
from nxrefine_bs.nexus.provenance import read_process
from nxrefine_bs.simulation.scan import make_simulated_scan
from nxrefine_bs.workflow import (
    DaskExecutor,
    LocalExecutor,
    ReductionQueue,
    Status,
    WorkflowDB,
)
from nxrefine_bs.workflow.leases import Claim
from nxrefine_bs.workflow.params import parse_params

SCAN = "s/l/s_1.nxs"


def _cli(argv):
    from nxrefine_bs.cli import workflow

    parser = argparse.ArgumentParser(prog="nxrefine-bs")
    workflow.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_claim_heartbeat_and_takeover_rules(tmp_path):
    db = WorkflowDB(tmp_path, lease=0.5)
    db.queue(SCAN, "f1", "max", params={"first": 2}, key="max-a")
    assert db.claim(SCAN, "f1", "max", key="max-a", worker="w1") == Claim.CLAIMED
    rec = db.task(SCAN, "f1", "max")
    assert rec.status is Status.IN_PROGRESS and rec.lease_expires > rec.start_time
    assert rec.params == {"first": 2} and rec.key == "max-a" and rec.worker == "w1"
    # another key waits while the lease is alive; the same key (a rerun) takes over
    assert db.claim(SCAN, "f1", "max", key="max-b") == Claim.BUSY
    assert db.claim(SCAN, "f1", "max", key="max-a", worker="w2") == Claim.CLAIMED
    assert db.task(SCAN, "f1", "max").attempts == 2
    assert db.heartbeat(SCAN, "f1", "max", key="max-a")
    assert not db.heartbeat(SCAN, "f1", "max", key="max-b")
    # a queue() while the owner lives is refused
    assert not db.queue(SCAN, "f1", "max", key="max-c")
    wait_until(lambda: db.task(SCAN, "f1", "max").lease_expired, 10, "the lease to run out")
    assert db.claim(SCAN, "f1", "max", key="max-b") == Claim.CLAIMED  # expired: taken over
    db.done(SCAN, "f1", "max")
    assert db.claim(SCAN, "f1", "max", key="max-c") == Claim.DONE
    db.queue(SCAN, "f2", "max", key="k")
    db.cancel(SCAN, "f2", "max")
    assert db.claim(SCAN, "f2", "max", key="k") == Claim.SKIP


def test_expire_stale_and_reset_command(tmp_path, capsys):
    short = WorkflowDB(tmp_path, lease=0.3)
    long = WorkflowDB(tmp_path, lease=300)
    short.start(SCAN, "f1", "find", worker="dask:gone", key="find-x")
    long.start(SCAN, "f2", "find", worker="dask:alive", key="find-y")
    long.queue(SCAN, "f1", "refine")
    wait_until(lambda: short.task(SCAN, "f1", "find").lease_expired, 10, "the lease to run out")
    assert _cli(["workflow", "reset", "--stale", "-x", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "reset s/l/s_1.nxs f1 find: was in_progress (dask:gone" in out and "1 task(s)" in out
    assert long.task_status(SCAN, "f1", "find") is Status.NOT_STARTED
    assert long.task_status(SCAN, "f2", "find") is Status.IN_PROGRESS
    assert _cli(["workflow", "reset", "-x", str(tmp_path)]) == 0
    assert "2 task(s) reset" in capsys.readouterr().out
    assert long.counts()[Status.NOT_STARTED] == 3
    # expire_stale turns a dead owner's task FAILED with a message naming it
    short.start(SCAN, "f1", "max", worker="thread:x", key="max-x")
    wait_until(lambda: short.task(SCAN, "f1", "max").lease_expired, 10, "the lease to run out")
    (expired,) = long.expire_stale()
    assert expired.step == "max"
    rec = long.task(SCAN, "f1", "max")
    assert rec.status is Status.FAILED and "lease expired: thread:x" in rec.message


def test_killed_local_client_expires_and_retry_cleans_up(tmp_path, monkeypatch, capsys):
    sim = make_simulated_scan(tmp_path, n_frames=3, omegas=(0.0, 30.0))
    gate = tmp_path / "gate"
    script = f"""
from nxrefine_bs.workflow import LocalExecutor, ReductionQueue, WorkflowDB
import wf_steps
db = WorkflowDB({str(tmp_path)!r}, lease=1.0)
queue = ReductionQueue(db, LocalExecutor(1), registry=wf_steps.REGISTRY)
queue.submit({str(sim.scan_file)!r}, steps=["count", "grid"])
queue.wait()
"""
    client = python_client(script, wait=False, env={wf_steps.GATE_ENV: str(gate)})
    db = WorkflowDB(tmp_path)
    part = sim.scan_dir / "f1_transform.nxs.part"
    try:
        wait_until(part.exists, 60, "the grid step to write its .part file")
        # status shows where the running task runs
        assert _cli(["workflow", "status", "-x", str(tmp_path), "--no-color"]) == 0
        out = capsys.readouterr().out
        rec = db.task(sim.scan_file, "f1", "grid")
        assert rec.status is Status.IN_PROGRESS and rec.pid == client.pid
        assert "running" in out and rec.host in out and "thread:nxreduce" in out
    finally:
        os.kill(client.pid, signal.SIGKILL)
        client.communicate(timeout=30)  # reaped, pipes closed
    assert db.task_status(sim.scan_file, "f1", "grid") is Status.IN_PROGRESS
    # the queued grid of f2 lived only in the dead process: failed at once
    assert db.task_status(sim.scan_file, "f2", "grid") is Status.QUEUED
    lost = {(r.entry, r.step) for r in db.expire_stale()}
    assert ("f2", "grid") in lost
    assert db.task(sim.scan_file, "f2", "grid").message.startswith("lost: the process")
    def f1_expired():
        rec = db.task(sim.scan_file, "f1", "grid")
        return rec.lease_expired or rec.status is Status.FAILED  # (expired already above)

    wait_until(f1_expired, 30, "the lease")
    assert _cli(["workflow", "status", "-x", str(tmp_path), "--no-color"]) == 0
    rec = db.task(sim.scan_file, "f1", "grid")
    assert rec.status is Status.FAILED and "lease expired" in rec.message
    gate.touch()
    monkeypatch.setenv(wf_steps.GATE_ENV, str(gate))
    with ReductionQueue(db, LocalExecutor(1), registry=wf_steps.REGISTRY) as queue:
        (job,) = queue.retry()
        assert job.steps == ["grid"] and [t.entry for t in job.tasks] == ["f1", "f2"]
        (result,) = queue.wait(timeout=60)
    assert result.ok
    assert not part.exists() and (sim.scan_dir / "f1_transform.nxs").exists()
    with h5py.File(sim.scan_file, "r") as f:
        assert read_process(f["f1"], "wf_grid")["summary"]["stale_part"] is False


def test_param_parsing_follows_the_step_options():
    parsed = parse_params(
        ["transform.qh=-5,0.05,5", "threshold=3", "transform.mask=yes"], ["find", "transform"]
    )
    assert parsed == {
        "transform": {"qh": (-5.0, 0.05, 5.0), "mask": True},
        "find": {"threshold": 3.0},
    }
    with pytest.raises(WorkflowError, match="transform.qh"):
        parse_params(["transform.qh=1,2"])
    with pytest.raises(WorkflowError, match="no parameter|unknown parameter"):
        parse_params(["transform.qx=1,2,3"])
    with pytest.raises(WorkflowError, match="expected STEP.NAME=VALUE"):
        parse_params(["threshold"])


def test_queue_command_stores_the_parsed_grid(tmp_path):
    sim = make_simulated_scan(tmp_path, n_frames=3, omegas=(0.0,))
    argv = [
        "workflow", "queue", str(sim.scan_file), "-s", "transform", "-w", "1",
        "--param", "transform.qh=-5,0.05,5", "--param", "transform.ql=-1,0.5,1",
    ]  # fmt: skip
    assert _cli(argv) == 1  # transform is blocked: refine is not done
    rec = WorkflowDB(tmp_path).task(sim.scan_file, "f1", "transform")
    assert rec.status is Status.FAILED and "requires refine" in rec.message
    assert rec.params == {"qh": [-5.0, 0.05, 5.0], "ql": [-1.0, 0.5, 1.0]}


def test_postscan_reduction_uses_the_server_settings(tmp_path):
    experiment = tmp_path / "exp"
    sim = make_simulated_scan(experiment, n_frames=3, omegas=(0.0,))
    url = f"sqlite:///{tmp_path}/facility.db"
    settings = {
        "server": {"type": "dask", "dask_scheduler": "local", "cores": 1, "database": url,
                   "lease": 42.0},
    }  # fmt: skip
    reduction = PostScanReduction(("max",), params={"first": 0, "last": 3}, settings=settings)
    start = {
        "uid": "run-1", "sample": "sim", "label": "xtal1", "scan": "300K", "entry": "f1",
        "nxrefine": {"experiment_dir": str(experiment), "rotation_index": 1, "rotations": 1},
    }  # fmt: skip
    try:
        queue = reduction.queue_for(experiment)
        assert isinstance(queue.executor, DaskExecutor)
        assert queue.db.url == url and queue.db.lease == 42.0
        assert queue.db.experiment == experiment.absolute().as_posix()
        reduction("start", start)
        reduction("stop", {"run_start": "run-1", "exit_status": "success"})
        results = reduction.wait(timeout=120)
    finally:
        reduction.close()
    assert reduction.errors == [] and [r.ok for r in results] == [True]
    facility = WorkflowDB(url, experiment_dir=experiment)
    rec = facility.task(sim.scan_file, "f1", "max")
    assert rec.status is Status.DONE and rec.worker.startswith("dask:")
    assert not (experiment / "tasks" / "workflow.db").exists()  # nothing local


def test_local_executor_runs_heavy_tasks_one_at_a_time(tmp_path, monkeypatch):
    sims = [make_simulated_scan(tmp_path, scan=f"{i}K", n_frames=3, omegas=(0.0,)) for i in (1, 2)]
    gate = tmp_path / "gate"
    monkeypatch.setenv(wf_steps.GATE_ENV, str(gate))
    db = WorkflowDB(tmp_path)
    with ReductionQueue(db, LocalExecutor(3), registry=wf_steps.REGISTRY) as queue:
        queue.submit([s.scan_file for s in sims], steps=["count", "grid"])
        wait_until(lambda: db.list_tasks(status="in_progress", step="grid"), 30, "a grid")
        gate.touch()  # the first grid was held at the gate while threads were free
        results = queue.wait(timeout=60)
    grids = sorted(db.list_tasks(step="grid"), key=lambda r: r.start_time)
    assert grids[1].start_time >= grids[0].end_time  # never two at once
    assert all(r.ok for r in results) and len(db.list_tasks(status="done", step="grid")) == 2


def test_a_step_sent_to_a_worker_still_resolves_settings(tmp_path):
    """A pickled Step (as on a Dask worker) is still recognised as the registry's step."""
    import pickle

    from nxrefine_bs.reduce.steps import STEPS
    from nxrefine_bs.workflow.params import parse_param
    from nxrefine_bs.workflow.task import _kwargs

    sim = make_simulated_scan(tmp_path, n_frames=3, omegas=(0.0,))
    copy = pickle.loads(pickle.dumps(STEPS["find"]))
    assert copy is not STEPS["find"]
    kwargs = _kwargs(copy, sim.scan_file, {"threshold": 7}, copy.load())
    assert kwargs["threshold"] == 7.0 and kwargs["first"] == 10  # [nxreduce] first_frame
    assert parse_param(copy, "threshold", "5") == 5.0


def test_transient_io_errors_are_retried_by_dask(tmp_path):
    sim = make_simulated_scan(tmp_path, n_frames=3, omegas=(0.0, 30.0))
    db = WorkflowDB(tmp_path)
    with DaskExecutor("local", n_workers=1, processes=False, threads_per_worker=1) as ex:
        queue = ReductionQueue(db, ex, registry=wf_steps.FLAKY)
        queue.submit(sim.scan_file)
        (result,) = queue.wait(timeout=60)
    assert result.ok
    for entry in ("f1", "f2"):
        rec = db.task(sim.scan_file, entry, "flaky")
        assert rec.status is Status.DONE and rec.attempts == 2
    assert wf_steps.runs(sim.scan_file).count(("flaky", "f1")) == 2
