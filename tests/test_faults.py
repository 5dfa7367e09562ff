"""Fault injection with real processes: kill -9, a full disk, 0MQ writer restarts, pickles.

Every process is started by the test on 127.0.0.1 and cleaned up; waits are on
conditions with generous time-outs.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import h5py
import msgpack
import numpy as np
import pytest
import zmq
from nexusformat.nexus import nxload

from nxrefine_bs.nexus.repair import is_marked_open, repair_scan_file

SCAN_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from nxrefine_bs.callbacks.isolation import BeamlineRunEngine
    from nxrefine_bs.callbacks.nexus_writer import NeXusScanWriter
    from nxrefine_bs.devices import make_sim_beamline
    from nxrefine_bs.plans import rotation_scan

    exp = Path(sys.argv[1])
    RE = BeamlineRunEngine({})
    RE.subscribe(NeXusScanWriter())
    bl = make_sim_beamline(exp, detector="small", shape=(48, 64), frame_time=0.01, seed=1,
                           temperature_time_constant=0.01)
    print("ready", flush=True)
    for i, entry in enumerate(sys.argv[2].split(",")):
        RE(rotation_scan(bl, experiment_dir=exp, sample="s", label="x", scan="300K",
                         entry=entry, phi_start=0.0, phi_end=20.0, phi_step=0.5))
    print("done", flush=True)
    """
)


def wait_for(condition, timeout: float = 120.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def free_ports(n: int) -> list[int]:
    """``n`` consecutive free ports (the proxy uses out_port + 1 too)."""
    for _ in range(50):
        base = random.randint(20000, 60000)
        ok = True
        for p in range(base, base + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return list(range(base, base + n))
    raise RuntimeError("no free ports")


def _check_after_kill(exp_dir: Path) -> dict[str, Any]:
    """Everything on disk is readable (after repair); return what was found."""
    scan_file = exp_dir / "s" / "x" / "s_300K.nxs"
    outcome: dict[str, Any] = {"scan_file": scan_file.exists()}
    leftovers = [p for p in scan_file.parent.glob(".*") if p.is_file()]
    if not scan_file.exists():
        return outcome
    with h5py.File(scan_file, "r") as f:  # the scan file is always valid
        outcome["entries"] = sorted(k for k in f if k.startswith("f"))
    nxload(str(scan_file))
    report = repair_scan_file(scan_file)
    outcome["cleared"] = len(report.cleared)
    outcome["crashed"] = dict(report.crashed)
    outcome["linked_by_repair"] = list(report.linked)
    for raw in (scan_file.parent / "300K").glob("*.h5"):
        assert not is_marked_open(raw)
        with h5py.File(raw, "r") as f:  # an ordinary open, as max, nxload and NXRefine do
            if "entry/data/data" in f:
                data = f["entry/data/data"]
                if data.shape[0]:
                    data[data.shape[0] - 1]
    with h5py.File(scan_file, "r") as f:
        for entry in outcome["entries"]:
            status = f[f"{entry}/acquisition/status"][()].decode()
            assert status in ("success", "crash"), status
            raw = scan_file.parent / "300K" / f"{entry}.h5"
            if raw.exists():  # every frame on disk is reachable from the scan file
                with h5py.File(raw, "r") as r:
                    on_disk = r["entry/data/data"].shape[0] if "entry/data/data" in r else 0
                if on_disk:
                    assert f[f"{entry}/data/data"].shape[0] == on_disk
            if status == "crash":
                n = f[f"{entry}/data/frame_number"].shape[0]
                assert f[f"{entry}/data/data"].shape[0] >= n if n else True
    outcome["leftovers"] = [p.name for p in leftovers if p.exists()]
    assert not outcome["leftovers"]  # repair removed what a killed update left
    return outcome


def _kill_trials(experiment_factory, trials: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    outcomes = []
    for _ in range(trials):
        exp_dir = experiment_factory()
        proc = subprocess.Popen(
            [sys.executable, "-c", SCAN_SCRIPT, str(exp_dir), "f1,f2"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert proc.stdout.readline().strip() == "ready"
            scan_file = exp_dir / "s" / "x" / "s_300K.nxs"
            wait_for(scan_file.exists, what="the scan file")
            time.sleep(rng.uniform(0.0, 2.5))  # the fault: kill at a random instant
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(60)
            proc.stdout.close()
        outcomes.append(_check_after_kill(exp_dir))
    return outcomes


@pytest.fixture
def experiment_factory(tmp_path, server_settings):
    from nxrefine_bs.experiment import Experiment

    counter = iter(range(1000))

    def make() -> Path:
        return Experiment.create(tmp_path / f"a{next(counter)}", "exp", beamline="sim").directory

    return make


def test_kill_9_of_the_runengine_process_leaves_everything_readable(experiment_factory):
    outcomes = _kill_trials(experiment_factory, 2, seed=11)
    assert all(o["scan_file"] for o in outcomes)


@pytest.mark.slow
def test_kill_9_twenty_trials(experiment_factory, capsys):
    outcomes = _kill_trials(experiment_factory, 20, seed=12)
    with capsys.disabled():
        for o in outcomes:
            print("kill -9 trial:", o)
    assert all(o["scan_file"] for o in outcomes)


# ---------------------------------------------------------------------- full disk
@pytest.fixture
def small_tmpfs(tmp_path):
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)],
            check=True, capture_output=True,
        )  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a small tmpfs here (needs root/CAP_SYS_ADMIN): {exc}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(directory: Path, leave: int) -> Path:
    filler = directory / "filler"
    free = shutil.disk_usage(directory).free
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


ACQUIRE_ON_FULL_DISK = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from nxrefine_bs.callbacks.isolation import BeamlineRunEngine
    from nxrefine_bs.callbacks.nexus_writer import NeXusScanWriter
    from nxrefine_bs.devices import make_sim_beamline
    from nxrefine_bs.plans import rotation_scan

    exp, mount = Path(sys.argv[1]), Path(sys.argv[2])
    RE = BeamlineRunEngine({})
    RE.subscribe(NeXusScanWriter())
    bl = make_sim_beamline(exp, detector="small", shape=(48, 64), frame_time=0.005, seed=1)

    def plan(entry):
        return rotation_scan(bl, experiment_dir=exp, sample="s", label="x", scan="300K",
                             entry=entry, phi_start=0.0, phi_end=5.0, phi_step=0.5)

    RE(plan("f1"))
    free = __import__("shutil").disk_usage(mount).free
    with open(mount / "filler", "wb") as f:
        f.write(b"\\0" * max(0, free - 64 * 1024))
    try:
        RE(plan("f2"))
    except Exception as exc:
        print("FAILED:", type(exc).__name__, exc, repr(exc.__context__), flush=True)
        raise SystemExit(3)
    print("no failure", flush=True)
    """
)


def test_full_disk_during_acquisition_fails_the_run_cleanly(small_tmpfs, server_settings):
    """The RunEngine process (a child: a full disk inside HDF5 can spoil the library's
    state for the rest of a process) fails the run with a clear error; the scan file
    keeps its content and stays readable."""
    from nxrefine_bs.experiment import Experiment

    exp_dir = Experiment.create(small_tmpfs, "exp", beamline="sim").directory
    out = subprocess.run(
        [sys.executable, "-c", ACQUIRE_ON_FULL_DISK, str(exp_dir), str(small_tmpfs)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 3, out.stdout + out.stderr[-3000:]  # failed, did not crash
    assert "space" in out.stdout, out.stdout
    (small_tmpfs / "filler").unlink()
    scan_file = exp_dir / "s" / "x" / "s_300K.nxs"
    with h5py.File(scan_file, "r") as f:  # intact, readable by h5py and nexusformat
        assert f["f1/acquisition/status"][()].decode() == "success"
        if "f2" in f:
            assert f["f2/acquisition/status"][()].decode() != "success"
    nxload(str(scan_file))


def test_full_disk_during_a_reduction_step_keeps_the_scan_file(small_tmpfs, server_settings):
    from nxrefine_bs.errors import ScanFileError
    from nxrefine_bs.nexus.scanfile import update_scan_file

    path = small_tmpfs / "scan.nxs"
    with h5py.File(path, "w") as f:
        f["entry/x"] = np.arange(1000.0)
    before = path.read_bytes()
    _fill(small_tmpfs, leave=256 * 1024)
    with pytest.raises(ScanFileError, match="disk"), update_scan_file(path) as f:
        f["entry/big"] = np.ones(200_000)  # 1.6 MB: does not fit
    assert path.read_bytes() == before
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["entry/x"][()], np.arange(1000.0))


# ---------------------------------------------------------------------- 0MQ
@contextlib.contextmanager
def _process(*args: str) -> Any:
    """A ``nxrefine-bs`` process whose output lines are collected by a thread."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "nxrefine_bs.cli", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    proc.lines = []  # type: ignore[attr-defined]
    reader = threading.Thread(
        target=lambda: proc.lines.extend(iter(proc.stdout.readline, "")), daemon=True
    )
    reader.start()
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        reader.join(10)
        proc.stdout.close()


def _output(proc) -> str:
    return "".join(proc.lines)


def _wait_line(proc, text: str, timeout: float = 120) -> None:
    wait_for(lambda: text in _output(proc) or proc.poll() is not None, timeout, repr(text))
    assert text in _output(proc), _output(proc)


def _status(scan_file: Path, entry: str) -> str | None:
    try:
        with h5py.File(scan_file, "r") as f:
            return f[f"{entry}/acquisition/status"][()].decode()
    except (OSError, KeyError):
        return None


def test_zmq_writer_restarted_mid_run_recovers_it_and_pickles_are_rejected(
    experiment, tmp_path
):
    from test_nexus_writer import NF, _fly_run

    from nxrefine_bs.callbacks.remote import Publisher

    exp_dir = experiment.directory
    port_in, port_out, _ = free_ports(3)
    marker = tmp_path / "pwned"
    scan_file = exp_dir / "CsV3Sb5" / "xtal1" / "CsV3Sb5_80K.nxs"
    docs: list[tuple[str, dict]] = []

    class Recorder:
        last_scan_file = None

        def __call__(self, name, doc):
            docs.append((name, doc))

    _fly_run(Recorder(), exp_dir, finish=True)
    half = len(docs) // 2
    ctx = zmq.Context()
    raw = ctx.socket(zmq.PUB)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(f"tcp://127.0.0.1:{port_in}")
    publisher = Publisher(f"127.0.0.1:{port_in}")
    try:
        with _process("proxy", "--in-port", str(port_in), "--out-port", str(port_out)) as proxy:
            _wait_line(proxy, "proxy listening")
            with _process("-v", "writer", "--zmq", f"127.0.0.1:{port_out}") as writer:
                _wait_line(writer, "listening on")

                def started() -> bool:
                    raw.send(pickle.dumps(_Evil(str(marker))))  # must never run
                    publisher._seq.clear()  # 0MQ slow joiner: resend the start (seq 0)
                    publisher(*docs[0])
                    return scan_file.exists()

                wait_for(started, what="the writer to create the scan file")
                for name, doc in docs[1:half]:
                    publisher(name, doc)
                wait_for(lambda: _status(scan_file, "f1") == "running", what="running")
                writer.send_signal(signal.SIGKILL)  # the writer dies mid-run
                writer.wait(30)
            for name, doc in docs[half:]:
                publisher(name, doc)  # the rest of the run while no writer runs
            with _process("-v", "writer", "--zmq", f"127.0.0.1:{port_out}") as writer2:
                wait_for(lambda: _status(scan_file, "f1") == "success", what="catch-up")
                writer2.send_signal(signal.SIGTERM)
                assert writer2.wait(60) == 0  # flushes and exits cleanly
            assert "caught up" in _output(writer2)
            assert "dropped a message" in _output(proxy)  # the pickles
    finally:
        publisher.close()
        raw.close()
        ctx.term()
    assert not marker.exists()  # the pickle was never executed
    with h5py.File(scan_file, "r") as f:
        assert f["f1/data/data"].shape[0] == NF
        assert f["f1/monitor/MCS1"].shape == (NF,)


class _Evil:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_decode_rejects_anything_but_msgpack_envelopes():
    from nxrefine_bs.callbacks.remote import decode, encode

    with pytest.raises(ValueError):
        decode(pickle.dumps(_Evil("/tmp/x")))
    with pytest.raises(ValueError):
        decode(msgpack.packb({"name": "start"}))
    msg = {"run": "u", "seq": 0, "name": "start", "doc": {"a": np.arange(3)}}
    assert decode(encode(msg))["doc"] == {"a": [0, 1, 2]}


@pytest.mark.parametrize("step", ["max", "find", "refine", "prepare", "transform", "combine"])
def test_full_disk_during_each_reduction_step(small_tmpfs, server_settings, step):
    """Each step on a full disk: a clear error, the scan file unchanged and readable,
    no partial output left; after space is freed the step runs."""
    from nxrefine_bs.reduce.steps import run_step
    from nxrefine_bs.simulation.scan import make_simulated_scan

    sim = make_simulated_scan(
        small_tmpfs, n_frames=30, write_truth_orientation=True, omegas=(0,),
        geometry=None, seed=3,
    )  # fmt: skip
    grid = {"qh": (-2, 0.2, 2), "qk": (-2, 0.2, 2), "ql": (-2, 0.2, 2)}
    order = ["max", "find", "refine", "prepare", "transform", "combine"]
    params = {"transform": grid, "find": {"threshold": 50}}
    for before in order[: order.index(step)]:
        entry = "entry" if before == "combine" else "f1"
        run_step(before, sim.scan_file, entry, **params.get(before, {}))
    entry = "entry" if step == "combine" else "f1"
    snapshot = sim.scan_file.read_bytes()
    outputs_before = {p.name for p in sim.scan_dir.iterdir()}
    filler = _fill(small_tmpfs, leave=4 * 1024)
    # the failing step runs in a child: a full disk inside HDF5 (large outputs are
    # written by HDF5 directly) can spoil the library's state for the rest of a process
    code = (
        "import sys, json; from nxrefine_bs.reduce.steps import run_step\n"
        "try:\n"
        "    run_step(sys.argv[1], sys.argv[2], sys.argv[3], **json.loads(sys.argv[4]))\n"
        "except Exception as exc:\n"
        "    print('FAILED:', type(exc).__name__, exc, repr(exc.__context__))\n"
        "    raise SystemExit(3)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, step, str(sim.scan_file), entry,
         json.dumps(params.get(step, {}))],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 3, out.stdout + out.stderr[-3000:]  # a clean failure
    assert "space" in out.stdout or "disk" in out.stdout, out.stdout  # says why
    assert sim.scan_file.read_bytes() == snapshot  # old content, byte for byte
    nxload(str(sim.scan_file))
    left = {p.name for p in sim.scan_dir.iterdir()} - outputs_before
    assert not left, f"partial output left after ENOSPC: {left}"
    filler.unlink()
    result = run_step(step, sim.scan_file, entry, **params.get(step, {}))
    assert result.get("status", "done") in ("done", "skipped")


def test_repair_sets_aside_a_detector_file_cut_off_at_creation(experiment_factory):
    """A kill while HDF5 created ``f1.h5`` leaves 48 bytes that nothing can open (seen in
    the twenty-trial run): repair renames it ``f1.h5.truncated`` (kept, not deleted),
    marks the entry crash with 0 frames, and every ``*.h5`` of the scan opens again."""
    exp_dir = experiment_factory()
    proc = subprocess.Popen(
        [sys.executable, "-c", SCAN_SCRIPT, str(exp_dir), "f1"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert proc.stdout.readline().strip() == "done"
    finally:
        proc.wait(60)
        proc.stdout.close()
    scan_file = exp_dir / "s" / "x" / "s_300K.nxs"
    raw = scan_file.parent / "300K" / "f1.h5"
    with h5py.File(scan_file, "r+") as f:  # as if the writer had died during f1
        f["f1/acquisition/status"][()] = "running"
    with open(raw, "r+b") as fh:  # as if killed while HDF5 created the file: superblock only
        fh.truncate(48)
    with pytest.raises(OSError):
        h5py.File(raw, "r")
    report = repair_scan_file(scan_file)
    assert report.set_aside == [raw.with_name("f1.h5.truncated")]
    assert not raw.exists() and raw.with_name("f1.h5.truncated").stat().st_size == 48
    assert report.crashed == {"f1": 0}
    outcome = _check_after_kill(exp_dir)  # every detector file and the scan file open
    assert outcome["crashed"] == {} and outcome["entries"] == ["f1"]
    with h5py.File(scan_file, "r") as f:
        assert f["f1/acquisition/status"][()].decode() == "crash"
    # a file that opens is never touched, whatever its size
    assert repair_scan_file(scan_file).set_aside == []
