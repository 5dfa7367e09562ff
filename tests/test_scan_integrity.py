"""The scan is sacred: readers, other writers, interruptions and hostile documents.

Real RunEngine, simulated ophyd-async devices, real HDF5 files and real processes.
Process-level faults (kill -9, full disk, 0MQ, Tiled outages) are in ``test_faults.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.utils import RunEngineInterrupted
from event_model import compose_run, compose_stream_resource
from nexusformat.nexus import nxload
from nexusformat.nexus.lock import NXLock, NXLockException

from nxrefine_bs.callbacks.isolation import NonCritical
from nxrefine_bs.callbacks.nexus_writer import NeXusScanWriter
from nxrefine_bs.callbacks.reduction import PostScanReduction
from nxrefine_bs.devices import make_sim_beamline
from nxrefine_bs.errors import MetadataError, ScanFileError, WriterError
from nxrefine_bs.geometry import RUN_GEOMETRY_KEYS, Geometry
from nxrefine_bs.nexus.safewrite import ScanFileLock, locked
from nxrefine_bs.nexus.scanfile import update_scan_file
from nxrefine_bs.plans import rotation_scan

NAMES = {"sample": "TiSe2", "label": "xtal1"}

HOLDER = """
import sys, h5py
f = h5py.File(sys.argv[1], "r")          # a viewer holding the scan file (HDF5 locking on)
print("holding", flush=True)
sys.stdin.readline()                     # until the test says so
print(f["f1/acquisition/status"][()].decode(), flush=True)
f.close()
"""


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def small_beamline(exp_dir: Path, frame_time: float = 0.01):
    return make_sim_beamline(
        exp_dir, detector="small", shape=(48, 64), frame_time=frame_time, seed=7,
        temperature_time_constant=0.01,
    )  # fmt: skip


def scan(bl, exp_dir: Path, entry: str = "f1", phi_end: float = 10.0, **kw):
    return rotation_scan(
        bl, experiment_dir=exp_dir, **NAMES, scan="300K", entry=entry, phi_start=0.0,
        phi_end=phi_end, phi_step=0.5, **kw,
    )  # fmt: skip


@pytest.fixture
def exp_dir(experiment) -> Path:
    return experiment.directory


def test_a_reader_holding_the_scan_file_never_stalls_or_fails_the_scan(RE, exp_dir):
    """A viewer holds the scan file open (HDF5 file locking on) for a whole scan."""
    bl = small_beamline(exp_dir)
    writer = NeXusScanWriter()
    RE.subscribe(writer)
    RE(scan(bl, exp_dir, phi_end=2.0))  # create the file
    scan_file = writer.last_scan_file
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(scan_file)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "holding"
        RE(scan(bl, exp_dir, entry="f2", phi_end=20.0))
        # the scan finished and its entry is complete while the reader still holds
        # its (old) view of the file
        assert holder.poll() is None
        with h5py.File(scan_file, "r") as f:
            assert text(f["f2/acquisition/status"][()]) == "success"
            assert f["f2/data/data"].shape[0] == 40
            assert f["f2/monitor/MCS1"].shape == (40,)
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "success"  # its view of f1
    finally:
        holder.kill()
        holder.wait(30)
        holder.stdin.close()
        holder.stdout.close()


def test_an_nxlock_holder_delays_the_writer_thread_not_the_scan(RE, exp_dir):
    """NeXpy/NXRefine writing the file (NXLock) delays only the writer thread."""
    bl = small_beamline(exp_dir)
    writer = NeXusScanWriter()
    RE.subscribe(writer)
    RE(scan(bl, exp_dir, phi_end=2.0))
    scan_file = writer.last_scan_file
    lock = NXLock(scan_file, timeout=5)
    lock.acquire()
    try:
        uids = RunEngine.__call__(RE, scan(bl, exp_dir, entry="f2"))
        assert len(uids) == 1  # the RunEngine finished while the NXLock was held
        assert not writer.flush(0.5)  # the writer thread waits for the lock ...
        with h5py.File(scan_file, "r") as f:
            assert "f2" not in f
    finally:
        lock.release()
    assert writer.flush(60)  # ... and completes the entry once it is released
    with h5py.File(scan_file, "r") as f:
        assert text(f["f2/acquisition/status"][()]) == "success"


def test_our_lock_is_an_nxlock(tmp_path):
    target = tmp_path / "scan.nxs"
    with locked(target):
        lock = NXLock(target, timeout=0.3, check_interval=0.1)
        with pytest.raises(NXLockException):
            lock.acquire()
    lock = NXLock(target, timeout=1)
    lock.acquire()
    with pytest.raises(ScanFileError, match="held by"), locked(target, timeout=0.3):
        pass
    lock.release()


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    target = tmp_path / "scan.nxs"
    code = (
        "import sys, os; from nxrefine_bs.nexus.safewrite import ScanFileLock;"
        "lock = ScanFileLock(sys.argv[1]); lock.acquire(); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", code, str(target)], check=True)
    assert ScanFileLock(target).lock_file.exists()
    with locked(target, timeout=5):
        pass


def test_failed_update_leaves_the_previous_content(tmp_path):
    path = tmp_path / "scan.nxs"
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(5)
    before = path.read_bytes()
    with pytest.raises(RuntimeError), update_scan_file(path) as f:
        f["x"][0] = 99
        f["y"] = 1
        raise RuntimeError("interrupted")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["scan.nxs"]  # no temporary left


def _pause_after_frames(RE, n):
    """A callback that asks ``RE`` to pause (once) when ``n`` frames have been declared."""
    requested: list[int] = []

    def pause_early(name, doc):
        if name == "stream_datum" and doc["indices"]["stop"] >= n and not requested:
            requested.append(1)
            threading.Thread(target=RE.request_pause).start()

    return pause_early


@pytest.mark.parametrize("how", ["stop", "abort", "halt"])
def test_interrupted_rotation_is_recorded_truthfully_and_not_reduced(RE, exp_dir, how):
    bl = small_beamline(exp_dir, frame_time=0.02)
    writer = NeXusScanWriter()
    reduction = PostScanReduction(["max"], writer=writer)
    RE.subscribe(reduction, critical=True)
    RE.subscribe(writer)
    pause_early = _pause_after_frames(RE, 5)
    RE.subscribe(pause_early, critical=True)
    with pytest.raises(RunEngineInterrupted):
        RE(scan(bl, exp_dir, phi_end=30.0))
    getattr(RE, how)()
    reduction.wait(60)
    scan_file = writer.last_scan_file
    with h5py.File(scan_file, "r") as f:
        acq = f["f1/acquisition"]
        assert text(acq["status"][()]) == how
        collected = int(acq["frames_collected"][()])
        assert 0 < collected < 60
        assert int(acq["frames_expected"][()]) == 60
        assert str(collected) in text(acq["reason"][()]) or how != "stop"
        assert "nxworkflow" not in f["f1"] or "nxlink" not in f["f1/nxworkflow"]
        assert "nxmax" not in f["f1"].get("nxworkflow", {})  # not reduced as complete
    assert nxload(str(scan_file))["f1/data/frame_number"].shape == (collected,)


def _start(exp_dir: Path, **nxrefine: Any) -> dict:
    geometry = Geometry(shape=(8, 10), beam_center_x=5, beam_center_y=4, phi_step=0.1)
    g = {k: getattr(geometry, k) for k in RUN_GEOMETRY_KEYS}
    g["shape"], g["phi_end"] = [8, 10], 1.0
    md = {
        "experiment_dir": str(exp_dir), "beamline": "sim", "configuration": None,
        "detector": {"name": "synthetic", "data_key": "det", "frame_time": 0.1},
        "monitors": ["MCS1"], "geometry": g, "n_frames": 10,
    }  # fmt: skip
    md.update(nxrefine)
    return {"plan_name": "rotation_scan", **NAMES, "scan": "1K", "entry": "f1", "nxrefine": md}


def _run_docs(exp_dir: Path, uri: str, stop: int = 10, **nxrefine: Any):
    bundle = compose_run(metadata=_start(exp_dir, **nxrefine))
    desc = bundle.compose_descriptor(
        data_keys={"det": {"dtype": "array", "shape": [1, 8, 10], "source": "s",
                           "external": "STREAM:"}},
        name="primary",
    )  # fmt: skip
    res = compose_stream_resource(
        mimetype="application/x-hdf5", uri=uri, data_key="det",
        parameters={"dataset": "/entry/data/data"},
    )  # fmt: skip
    datum = res.compose_stream_datum(
        indices={"start": 0, "stop": stop}, descriptor=desc.descriptor_doc
    )
    return bundle, desc, res, datum


def test_links_outside_the_experiment_fail_the_run(exp_dir):
    writer = NeXusScanWriter()
    bundle, desc, res, datum = _run_docs(exp_dir, "file:///etc/passwd")
    writer("start", bundle.start_doc)
    writer("descriptor", desc.descriptor_doc)
    writer("stream_resource", res.stream_resource_doc)
    writer.flush(60)
    with pytest.raises(WriterError, match="outside the experiment"):
        writer("stream_datum", datum)
    writer("stop", bundle.compose_stop(exit_status="fail"))
    assert writer.flush(60)
    with h5py.File(writer.last_scan_file, "r") as f:
        assert text(f["f1/acquisition/status"][()]) == "fail"
        assert "data" not in f["f1/data"]  # no link to /etc/passwd


def test_stream_datum_beyond_the_declared_frames_is_refused(exp_dir):
    writer = NeXusScanWriter()
    uri = f"file://localhost{exp_dir}/TiSe2/xtal1/1K/f1.h5"
    bundle, desc, res, _ = _run_docs(exp_dir, uri)
    writer("start", bundle.start_doc)
    writer("descriptor", desc.descriptor_doc)
    writer("stream_resource", res.stream_resource_doc)
    huge = res.compose_stream_datum(
        indices={"start": 0, "stop": 50_000_000}, descriptor=desc.descriptor_doc
    )
    with pytest.raises(MetadataError, match="outside the 10 frames"):
        writer("stream_datum", huge)
    writer("stop", bundle.compose_stop(exit_status="fail"))
    assert writer.flush(60)
    assert writer.last_scan_file.stat().st_size < 1_000_000


def test_stream_datum_before_its_resource_is_kept(exp_dir):
    writer = NeXusScanWriter()
    det = exp_dir / "TiSe2" / "xtal1" / "1K" / "f1.h5"
    det.parent.mkdir(parents=True)
    with h5py.File(det, "w") as f:
        f["/entry/data/data"] = np.ones((10, 8, 10), dtype="i4")
    bundle, desc, res, datum = _run_docs(exp_dir, f"file://localhost{det}")
    writer("start", bundle.start_doc)
    writer("descriptor", desc.descriptor_doc)
    writer("stream_datum", datum)  # out of order
    writer("stream_resource", res.stream_resource_doc)
    writer("stop", bundle.compose_stop(exit_status="success"))
    assert writer.flush(60)
    with h5py.File(writer.last_scan_file, "r") as f:
        assert f["f1/data/frame_number"].shape == (10,)
        assert f["f1/data/data"].shape == (10, 8, 10)


def test_a_directory_that_is_not_an_experiment_is_refused(tmp_path):
    writer = NeXusScanWriter()
    (tmp_path / "etc").mkdir()
    bundle, *_ = _run_docs(tmp_path / "etc", "file:///x.h5")
    with pytest.raises(MetadataError, match="not an nxrefine-bs experiment"):
        writer("start", bundle.start_doc)
    assert not list(tmp_path.rglob("*.nxs"))


def test_interleaved_runs_are_routed_by_uid(exp_dir):
    writer = NeXusScanWriter(normalize=False)
    det = exp_dir / "TiSe2" / "xtal1" / "1K"
    det.mkdir(parents=True)
    runs = []
    for entry, value in (("f1", 1.0), ("f2", 2.0)):
        bundle = compose_run(metadata={**_start(exp_dir), "entry": entry})
        desc = bundle.compose_descriptor(
            data_keys={"MCS1": {"dtype": "number", "shape": [], "source": "s"}}, name="primary"
        )
        runs.append((bundle, desc, value))
        writer("start", bundle.start_doc)
        writer("descriptor", desc.descriptor_doc)
    for i in range(10):
        for _, desc, value in runs:
            writer("event", desc.compose_event(data={"MCS1": value}, timestamps={"MCS1": i}))
    for bundle, _, _ in runs:
        writer("stop", bundle.compose_stop(exit_status="success"))
    assert writer.flush(60)
    with h5py.File(writer.last_scan_file, "r") as f:
        np.testing.assert_array_equal(f["f1/monitor/MCS1"][()], np.full(10, 1.0))
        np.testing.assert_array_equal(f["f2/monitor/MCS1"][()], np.full(10, 2.0))


def test_a_failing_or_blocking_callback_cannot_break_the_scan(RE, exp_dir):
    bl = small_beamline(exp_dir)
    writer = NeXusScanWriter()
    seen: list[str] = []
    release = threading.Event()

    def broken(name, doc):
        raise RuntimeError("third-party bug")

    def blocking(name, doc):
        release.wait(120)  # a Tiled server that does not answer
        seen.append(name)

    RE.subscribe(broken)  # BeamlineRunEngine isolates both
    blocker = NonCritical(blocking)
    RE.subscribe(blocker)
    RE.subscribe(writer)
    (uid,) = RunEngine.__call__(RE, scan(bl, exp_dir, phi_end=3.0))
    release.set()
    assert blocker.flush(60)
    assert seen[0] == "start" and seen[-1] == "stop"
    assert writer.flush(60)
    with h5py.File(writer.last_scan_file, "r") as f:
        assert text(f["f1/acquisition/status"][()]) == "success"
        assert json.loads(text(f["f1/acquisition/start_document"][()]))["uid"] == uid


def test_an_interrupted_rotation_is_recollected_into_the_same_entry(RE, exp_dir):
    bl = small_beamline(exp_dir, frame_time=0.02)
    writer = NeXusScanWriter()
    RE.subscribe(writer)
    pause_early = _pause_after_frames(RE, 5)
    token = RE.subscribe(pause_early, critical=True)
    with pytest.raises(RunEngineInterrupted):
        RE(scan(bl, exp_dir, phi_end=15.0))
    RE.abort("beam lost")
    RE.unsubscribe(token)
    with pytest.raises(MetadataError, match="recollect=True"):
        RE(scan(bl, exp_dir, phi_end=15.0))  # raw data are never overwritten
    RE(scan(bl, exp_dir, phi_end=15.0, recollect=True))
    scan_file = writer.last_scan_file
    raw = scan_file.parent / "300K"
    assert sorted(p.name for p in raw.glob("*.h5")) == ["f1.h5", "f1_2.h5"]
    with h5py.File(scan_file, "r") as f:
        fe = f["f1"]
        assert text(fe["acquisition/status"][()]) == "success"
        assert int(fe["acquisition/attempts"][()]) == 2
        assert fe.get("data/data", getlink=True).filename == "300K/f1_2.h5"
        assert fe["data/data"].shape[0] == 30
        assert fe["monitor/MCS1"].shape == (30,)
        assert fe["data/frame_number"].shape == (30,)
