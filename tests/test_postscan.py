"""Post-scan reduction on a live RunEngine: queued per rotation, never blocking the scan.

A real RunEngine drives the simulated ophyd-async beamline (a Pilatus 100k sized
detector); :class:`~nxrefine_bs.callbacks.nexus_writer.NeXusScanWriter` writes the scan
file and :class:`~nxrefine_bs.callbacks.reduction.PostScanReduction` queues the
reduction of each rotation on a worker thread, tracked in the experiment's workflow
database.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from nxrefine_bs.callbacks.nexus_writer import NeXusScanWriter
from nxrefine_bs.callbacks.reduction import PostScanReduction
from nxrefine_bs.devices import make_sim_beamline
from nxrefine_bs.geometry import Geometry
from nxrefine_bs.nexus.geometry_io import read_orientation
from nxrefine_bs.nexus.provenance import process_done, read_process
from nxrefine_bs.nexus.scanfile import create_scan_file, update_scan_file
from nxrefine_bs.nexus.template import Position, create_configuration
from nxrefine_bs.plans import multi_rotation_scan
from nxrefine_bs.reduce.lattice import Lattice, write_lattice
from nxrefine_bs.reduce.orient import misorientation
from nxrefine_bs.simulation.crystal import SimCrystal
from nxrefine_bs.simulation.frames import DetectorModel
from nxrefine_bs.workflow import Status, WorkflowDB

NAMES = {"sample": "Si", "label": "xtal1", "scan": "300K"}
PHI = {"phi_start": 0.0, "phi_end": 90.0, "phi_step": 0.5}  # 180 frames per rotation
OMEGAS = (0.0, 15.0)
SI = Lattice.from_space_group("Fm-3m", 5.43)
GRID = (-3.0, 0.1, 3.0)
PARAMS = {"threshold": 50.0, "min_pixels": 4, "first": 0, "polar_max": 30.0}


@pytest.fixture
def beamline(experiment):
    """Simulated devices, a two-position configuration and the scan file with its lattice."""
    model = DetectorModel.from_pyfai("Pilatus 100k")
    ny, nx = model.shape
    geometry = Geometry(
        wavelength=0.3,
        distance=100.0,
        pixel_size=model.pixel_size,
        shape=model.shape,
        beam_center_x=nx / 2 + 0.3,
        beam_center_y=ny / 2 - 0.4,
        chi=-90.0,
        phi_start=PHI["phi_start"],
        phi_step=PHI["phi_step"],
    )
    crystal = SimCrystal.random(SI.cell, centring="F", seed=3)
    config = create_configuration(
        experiment.configuration_file("p100k"),
        detector="Pilatus 100k",
        wavelength=geometry.wavelength,
        distance=geometry.distance,
        beam_center_x=geometry.beam_center_x,
        beam_center_y=geometry.beam_center_y,
        positions=[Position(chi=-90.0, omega=omega) for omega in OMEGAS],
        **PHI,
    )
    experiment.new_sample(NAMES["sample"], NAMES["label"])
    scan_file = create_scan_file(config, experiment.directory, **NAMES, temperature=300.0)
    devices = make_sim_beamline(
        experiment.directory,
        crystal=crystal,
        detector=model,
        geometry=geometry,
        frame_time=0.005,
        seed=7,
        temperature_time_constant=0.01,
    )
    return devices, config, scan_file, crystal


def define_lattice(scan_file: Path, lattice: Lattice = SI) -> None:
    """ "Define lattice" as a user would before the scan."""
    with update_scan_file(scan_file) as f:
        write_lattice(f["entry/sample"], lattice)


def sha256(path: Path) -> str:
    """Digest of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


class StopTimes:
    """Callback recording the time of each rotation's stop document, by entry."""

    def __init__(self) -> None:
        self.entry = ""
        self.times: dict[str, float] = {}

    def __call__(self, name: str, doc: dict) -> None:
        if name == "start":
            self.entry = doc["entry"]
        elif name == "stop":
            self.times[self.entry] = doc["time"]


class Timed:
    """Wrap a callback; record how long each call took, per document name, and the
    workflow status of each rotation's ``max`` step right after its stop document."""

    def __init__(self, callback, db=None, scan_file=None) -> None:
        self.callback = callback
        self.seconds: dict[str, float] = {}
        self.threads: set[int] = set()
        self.db, self.scan_file, self.entry = db, scan_file, None
        self.status_at_stop: dict[str, Status] = {}

    def __call__(self, name: str, doc: dict) -> None:
        t0 = time.perf_counter()
        self.threads.add(threading.get_ident())
        self.callback(name, doc)
        self.seconds[name] = max(self.seconds.get(name, 0.0), time.perf_counter() - t0)
        if name == "start":
            self.entry = doc.get("entry")
        elif name == "stop" and self.db is not None:
            self.status_at_stop[self.entry] = self.db.task_status(self.scan_file, self.entry, "max")


def run_scan(RE, devices, experiment, config, reduction):
    """Subscribe the writer and the (timed) reduction, run two rotations.

    Returns the run uids, the stop documents, the stop times by entry, the timed
    reduction callback, the RunEngine's wall time, the scan directory and the sha256 of
    each detector file taken when the RunEngine returns (the detector closes ``fN.h5``
    when it unstages, just after the run's stop document).
    """
    scan_dir = experiment.directory / NAMES["sample"] / NAMES["label"] / NAMES["scan"]
    RE.subscribe(NeXusScanWriter())
    stop_times = StopTimes()
    RE.subscribe(stop_times)
    scan_file = scan_dir.parent / f"{NAMES['sample']}_{NAMES['scan']}.nxs"
    timed = Timed(reduction, WorkflowDB(experiment.directory), scan_file)
    RE.subscribe(timed)
    docs: list[tuple[str, dict]] = []
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    t0 = time.perf_counter()
    uids = RE(
        multi_rotation_scan(
            devices,
            experiment_dir=experiment.directory,
            **NAMES,
            rotations=[{"omega": omega} for omega in OMEGAS],
            temperature=300.0,
            configuration=config,
            **PHI,
        )
    )
    scan_seconds = time.perf_counter() - t0
    stops = [doc for name, doc in docs if name == "stop"]
    digests = {e: sha256(scan_dir / f"{e}.h5") for e in ("f1", "f2")}
    return uids, stops, stop_times, timed, scan_seconds, scan_dir, digests


def test_max_find_after_each_rotation(RE, experiment, beamline):
    devices, config, scan_file, _ = beamline
    reduction = PostScanReduction(("max", "find"), params=PARAMS)
    uids, stops, stop_times, timed, scan_seconds, scan_dir, digests = run_scan(
        RE, devices, experiment, config, reduction
    )
    assert len(uids) == 2 and [s["exit_status"] for s in stops] == ["success"] * 2
    # Queuing does not wait for the work: when the stop document of f2 had been handled,
    # f2's reduction had not finished (it runs on an executor thread, not the RunEngine's).
    assert timed.status_at_stop["f2"] is not Status.DONE
    t0 = time.perf_counter()
    results = reduction.wait(timeout=60)
    wait_seconds = time.perf_counter() - t0
    reduction.close()
    assert [r.ok for r in results] == [True, True] and reduction.errors == []

    db = WorkflowDB(experiment.directory)
    records = {(r.step, r.entry): r for r in db.list_tasks(scan_file=scan_file)}
    for entry in ("f1", "f2"):
        for step in ("max", "find"):
            rec = records[(step, entry)]
            assert rec.status is Status.DONE, rec
            assert rec.worker.startswith("thread:")
        assert records[("refine", entry)].status is Status.NOT_STARTED
    # f1's reduction ran while f2 was still being acquired
    f1_started = records[("max", "f1")].start_time.timestamp()
    assert f1_started < stop_times.times["f2"], (f1_started, stop_times.times)
    with h5py.File(scan_file, "r") as f:
        for entry in ("f1", "f2"):
            assert process_done(f[entry], "nxlink")
            assert process_done(f[entry], "nxmax") and process_done(f[entry], "nxfind")
            assert f[f"{entry}/peaks/x"].size > 10
            assert read_process(f[entry], "nxfind")["parameters"]["threshold"] == 50.0
    for entry, digest in digests.items():
        assert sha256(scan_dir / f"{entry}.h5") == digest  # raw data untouched
    print(f"scan {scan_seconds:.1f} s, reduction wait after the scan {wait_seconds:.1f} s")


def test_failed_reduction_is_recorded_not_raised(RE, experiment, beamline, caplog):
    devices, config, scan_file, _ = beamline
    reduction = PostScanReduction(("max", "find"), params={**PARAMS, "threshold": -1.0})
    with caplog.at_level(logging.WARNING, logger="nxrefine_bs"):
        uids, stops, _, _, _, scan_dir, digests = run_scan(
            RE, devices, experiment, config, reduction
        )
        assert len(uids) == 2 and [s["exit_status"] for s in stops] == ["success"] * 2
        results = reduction.wait(timeout=60)
        reduction.close()
    assert [r.ok for r in results] == [False, False]
    db = WorkflowDB(experiment.directory)
    for entry in ("f1", "f2"):
        assert db.task_status(scan_file, entry, "max") is Status.DONE
        rec = db.task(scan_file, entry, "find")
        assert rec.status is Status.FAILED
        assert "threshold" in rec.message and rec.attempts == 1
    assert len(reduction.errors) == 2
    assert all("find on Si_300K.nxs" in e and "threshold" in e for e in reduction.errors)
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("find on Si_300K.nxs:f1 failed" in m and "threshold" in m for m in logged)
    with h5py.File(scan_file, "r") as f:
        for entry in ("f1", "f2"):
            assert f[entry]["acquisition/exit_status"][()].decode() == "success"
            assert f[f"{entry}/data/data"].shape[0] == 180
            assert not process_done(f[entry], "nxfind")
    for entry, digest in digests.items():
        assert sha256(scan_dir / f"{entry}.h5") == digest


def test_refine_without_lattice_fails_cleanly(RE, experiment, beamline):
    devices, config, scan_file, _ = beamline
    with update_scan_file(scan_file) as f:  # no cell at all: nothing to index against
        for name in [k for k in f["entry/sample"] if k.startswith("unitcell")]:
            del f["entry/sample"][name]
    reduction = PostScanReduction(("max", "find", "refine"), params=PARAMS)
    _, stops, _, _, _, _, _ = run_scan(RE, devices, experiment, config, reduction)
    assert [s["exit_status"] for s in stops] == ["success"] * 2
    reduction.wait(timeout=60)
    reduction.close()
    db = WorkflowDB(experiment.directory)
    rec = db.task(scan_file, "f1", "refine")
    assert rec.status is Status.FAILED and "lattice" in rec.message
    assert db.task_status(scan_file, "f1", "find") is Status.DONE


def test_transform_and_combine_after_last_rotation(RE, experiment, beamline):
    devices, config, scan_file, crystal = beamline
    define_lattice(scan_file)
    grid = {"qh": GRID, "qk": GRID, "ql": GRID}
    steps = ("max", "find", "refine", "transform", "combine")
    reduction = PostScanReduction(steps, params={**PARAMS, **grid})
    _, stops, _, timed, _, scan_dir, digests = run_scan(RE, devices, experiment, config, reduction)
    assert [s["exit_status"] for s in stops] == ["success"] * 2
    assert timed.seconds["stop"] < 0.5
    results = reduction.wait(timeout=120)
    reduction.close()
    assert all(r.ok for r in results), [r.summary() for r in results]

    db = WorkflowDB(experiment.directory)
    for entry in ("f1", "f2"):
        for step in ("max", "find", "refine", "transform"):
            assert db.task_status(scan_file, entry, step) is Status.DONE, (step, entry)
    combine = db.task(scan_file, "entry", "combine")
    assert combine.status is Status.DONE
    transforms = [db.task(scan_file, e, "transform").end_time for e in ("f1", "f2")]
    assert combine.start_time >= max(transforms)  # combine waited for both rotations
    with h5py.File(scan_file, "r") as f:
        for entry in ("f1", "f2"):
            assert misorientation(read_orientation(f[entry]), crystal.U, SI) < 0.1
            assert process_done(f[entry], "nxtransform")
        assert process_done(f["entry"], "nxcombine")
        data = f["entry/transform/data"][()]
        assert data.shape == (61, 61, 61) and np.nanmax(data) > 0
    assert (scan_dir / "transform.nxs").is_file()
    for entry, digest in digests.items():
        assert sha256(scan_dir / f"{entry}.h5") == digest
