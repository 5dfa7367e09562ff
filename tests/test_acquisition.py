"""End-to-end acquisition: a real RunEngine, simulated devices and the NeXus writer.

Every test flies (or steps) a rotation of the simulated beamline with
:class:`~nxrefine_bs.callbacks.nexus_writer.NeXusScanWriter` subscribed (in process, or
out of process behind a 0MQ proxy) and reads the scan file back -- through its relative
external links -- with nexusformat's ``nxload`` and with h5py.  The expected values come
from the plan's arguments, the device geometry and the detector files themselves.
The composed-document tests of the writer are in ``test_nexus_writer.py``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.utils import RunEngineInterrupted
from nexusformat.nexus import nxload

from nxrefine_bs.callbacks.nexus_writer import NeXusScanWriter
from nxrefine_bs.devices import (
    DATA_PATH,
    NDATTRIBUTES_PATH,
    make_sim_beamline,
)
from nxrefine_bs.errors import MetadataError
from nxrefine_bs.plans import (
    frame_count,
    multi_rotation_scan,
    rotation_scan,
    step_rotation_scan,
    temperature_series,
)

SHAPE = (48, 64)
NAMES = {"sample": "TiSe2", "label": "xtal1"}


# ---------------------------------------------------------------------- fixtures, helpers


@pytest.fixture
def exp_dir(experiment) -> Path:
    """The experiment directory of the conftest ``experiment`` fixture."""
    return experiment.directory


def small_beamline(exp_dir: Path, frame_time: float = 0.005, **kw: Any):
    """The synthetic 48 x 64 detector beamline (connected on the RunEngine's loop)."""
    kw.setdefault("temperature_time_constant", 0.01)
    return make_sim_beamline(
        exp_dir, detector="small", shape=SHAPE, frame_time=frame_time, seed=7, **kw
    )


def subscribe_writer(RE: RunEngine) -> NeXusScanWriter:
    writer = NeXusScanWriter()
    RE.subscribe(writer)
    return writer


def collector(RE: RunEngine) -> list[tuple[str, dict]]:
    docs: list[tuple[str, dict]] = []
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    return docs


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def tree_files(directory: Path) -> set[Path]:
    return {p.relative_to(directory) for p in directory.rglob("*")}


def check_rotation(
    scan_file: Path,
    entry: str,
    *,
    scan: str,
    n: int,
    phi_start: float,
    phi_step: float,
    geometry: Any,
    chi: float,
    omega: float,
    theta: float,
    temperature: float | None = None,
    translation: tuple[float, float] = (0.0, 0.0),
    status: str = "success",
) -> None:
    """Read ``scan_file:entry`` through its links and compare with the plan and devices."""
    detector_file = scan_file.parent / scan / f"{entry}.h5"
    with h5py.File(detector_file, "r") as raw:
        frames = raw[DATA_PATH][()]
        attributes = {k: raw[f"{NDATTRIBUTES_PATH}/{k}"][()] for k in ("MCS1", "MCS2", "phi")}
    assert frames.shape == (n, *geometry.shape)
    expected_phi = phi_start + phi_step * np.arange(n)
    np.testing.assert_allclose(attributes["phi"], expected_phi)

    # nexusformat, following the relative external link
    root = nxload(str(scan_file))
    data = root[f"{entry}/data"]
    assert data.nxsignal.nxname == "data"
    assert data.data.shape == (n, *geometry.shape)
    np.testing.assert_array_equal(data.data.nxdata[n - 1], frames[n - 1])
    assert float(root[f"{entry}/instrument/monochromator/wavelength"]) == pytest.approx(
        geometry.wavelength
    )

    with h5py.File(scan_file, "r") as f:
        fe = f[entry]
        link = fe["data"].get("data", getlink=True)
        assert isinstance(link, h5py.ExternalLink)
        assert link.filename == f"{scan}/{entry}.h5"  # relative to the scan file
        assert link.path == DATA_PATH
        np.testing.assert_array_equal(fe["data/data"][()], frames)
        assert fe["data/frame_number"][()].tolist() == list(range(n))
        assert fe["acquisition/num_frames"][()] == n
        assert text(fe["acquisition/status"][()]) == status
        # per-frame monitors: as long as the rotation, equal to the detector's NDAttributes
        for name in ("MCS1", "MCS2"):
            values = fe[f"monitor/{name}"][()]
            assert values.shape == (n,)
            np.testing.assert_allclose(values, attributes[name])
        assert (fe["monitor/MCS1"][()] > 0).all()
        # per-frame phi: phi_start + phi_step * i (the centre of frame i)
        gon = fe["instrument/goniometer"]
        np.testing.assert_allclose(gon["phi"][()], expected_phi)
        assert gon["phi"].attrs["step"] == pytest.approx(phi_step)
        assert gon["phi"].attrs["end"] == pytest.approx(phi_start + n * phi_step)
        for key, value in (("chi", chi), ("omega", omega), ("theta", theta)):
            assert gon[key][()] == pytest.approx(value), key
        det = fe["instrument/detector"]
        assert det["distance"][()] == pytest.approx(geometry.distance)
        assert det["pixel_size"][()] == pytest.approx(geometry.pixel_size)
        assert det["beam_center_x"][()] == pytest.approx(geometry.beam_center_x)
        assert det["beam_center_y"][()] == pytest.approx(geometry.beam_center_y)
        assert tuple(det["shape"][()]) == tuple(geometry.shape)
        assert (det["translation_x"][()], det["translation_y"][()]) == translation
        assert fe["instrument/monochromator/wavelength"][()] == pytest.approx(geometry.wavelength)
        assert fe["sample"] == f["entry/sample"]
        if temperature is None:
            assert "temperature" not in f["entry/sample"]
        else:
            assert f["entry/sample/temperature"][()] == pytest.approx(temperature)
            assert text(f["entry/sample/temperature"].attrs["units"]) == "K"
        if status == "success":
            assert f"{entry}/nxworkflow/nxlink" in f


# ---------------------------------------------------------------------- fly scans
SWMR_READER = """
import sys, h5py
with h5py.File(sys.argv[1], "r", swmr=True, libver="latest") as f:
    frames = f["f1/data/data"]  # through the scan file's relative link
    print(frames.shape[0], int(frames[0].sum()))
"""


def test_rotation_scan_file_and_swmr_read_through_link(RE, exp_dir):
    """A fly rotation; the scan file is readable through its link while frames arrive."""
    bl = small_beamline(exp_dir, frame_time=0.02)
    writer = subscribe_writer(RE)
    n = frame_count(-1.0, 19.0, 0.5)
    datums: list[int] = []
    live: dict[str, Any] = {}

    def read_while_writing(name, doc):
        if name != "stream_datum":
            return
        datums.append(doc["indices"]["stop"])
        if len(datums) != 2:
            return
        # the detector still has f1.h5 open for (SWMR) writing; the writer thread has
        # linked it (this callback is critical: it holds the RunEngine while it reads)
        assert writer.flush(60)
        with h5py.File(writer.last_scan_file, "r", swmr=True, libver="latest") as f:
            frames = f["f1/data/data"]
            live["frames"] = frames.shape[0]
            live["first"] = frames[0]
            live["status"] = text(f["f1/acquisition/status"][()])
        # and from another process, as a live viewer would
        out = subprocess.run(
            [sys.executable, "-c", SWMR_READER, str(writer.last_scan_file)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        live["subprocess"] = out

    RE.subscribe(read_while_writing, critical=True)
    RE(
        rotation_scan(
            bl, experiment_dir=exp_dir, **NAMES, scan="300K", phi_start=-1.0, phi_end=19.0,
            phi_step=0.5, omega=10.0, detector_translation=(1.5, -2.0), temperature=300.0,
        )
    )  # fmt: skip
    scan_file = exp_dir / "TiSe2" / "xtal1" / "TiSe2_300K.nxs"
    assert writer.last_scan_file == scan_file
    check_rotation(
        scan_file, "f1", scan="300K", n=n, phi_start=-1.0, phi_step=0.5,
        geometry=bl.detector.geometry, chi=-90.0, omega=10.0, theta=0.0, temperature=300.0,
        translation=(1.5, -2.0),
    )  # fmt: skip
    # read mid-rotation (the run had not ended), through the scan file's link
    assert live["status"] == "running" and 0 < live["frames"] <= n
    out = live["subprocess"]
    assert out.returncode == 0, out.stderr
    frames_seen, first_sum = (int(v) for v in out.stdout.split())
    assert live["frames"] <= frames_seen <= n
    with h5py.File(scan_file.parent / "300K" / "f1.h5", "r") as raw:
        np.testing.assert_array_equal(live["first"], raw[DATA_PATH][0])
        assert first_sum == int(raw[DATA_PATH][0].sum())


def test_multi_rotation_scan_with_configuration(RE, experiment, configuration):
    """Three rotations f1..f3 in one scan file made from a configuration template."""
    bl = make_sim_beamline(experiment.directory, detector="Pilatus 100k", frame_time=0.002)
    writer = subscribe_writer(RE)
    rotations = [
        {"omega": 0.0},
        {"omega": 15.0, "translation": (0.0, 5.0)},
        {"chi": -85.0, "theta": 1.0, "phi_end": 1.5},
    ]
    uids = RE(
        multi_rotation_scan(
            bl, experiment_dir=experiment.directory, **NAMES, scan="100K", rotations=rotations,
            phi_start=0.0, phi_end=2.0, phi_step=0.1, temperature=100.0,
            configuration=configuration,
        )
    )  # fmt: skip
    assert len(uids) == 3
    scan_file = experiment.scan_file("TiSe2", "xtal1", "100K")
    assert writer.last_scan_file == scan_file
    geometry = bl.detector.geometry
    expected = [
        ("f1", 20, -90.0, 0.0, 0.0, (0.0, 0.0)),
        ("f2", 20, -90.0, 15.0, 0.0, (0.0, 5.0)),
        ("f3", 15, -85.0, 0.0, 1.0, (0.0, 0.0)),
    ]
    for entry, n, chi, omega, theta, translation in expected:
        check_rotation(
            scan_file, entry, scan="100K", n=n, phi_start=0.0, phi_step=0.1, geometry=geometry,
            chi=chi, omega=omega, theta=theta, temperature=100.0, translation=translation,
        )  # fmt: skip
    with h5py.File(scan_file, "r") as f:
        assert sorted(k for k in f if k.startswith("f")) == ["f1", "f2", "f3"]
        # the template's rotation entries were overwritten with the run's values
        assert text(f["f1/instrument/detector/description"][()]) == "Pilatus 100k"
        assert [text(f[e]["acquisition/run_uid"][()]) for e in ("f1", "f2", "f3")] == list(uids)


def test_temperature_series_two_scan_files(RE, exp_dir):
    bl = small_beamline(exp_dir)
    writer = subscribe_writer(RE)
    uids = RE(
        temperature_series(
            bl, [300.0, 250.0], experiment_dir=exp_dir, **NAMES, phi_start=0.0, phi_end=10.0,
            phi_step=0.5,
        )
    )  # fmt: skip
    assert len(uids) == 2
    scan_files = sorted((exp_dir / "TiSe2" / "xtal1").glob("*.nxs"))
    assert [p.name for p in scan_files] == ["TiSe2_250K.nxs", "TiSe2_300K.nxs"]
    assert writer.last_scan_file == scan_files[0]
    for scan_file, scan, temperature in zip(
        scan_files, ("250K", "300K"), (250.0, 300.0), strict=True
    ):
        check_rotation(
            scan_file, "f1", scan=scan, n=20, phi_start=0.0, phi_step=0.5,
            geometry=bl.detector.geometry, chi=-90.0, omega=0.0, theta=0.0,
            temperature=temperature,
        )  # fmt: skip
        with h5py.File(scan_file, "r") as f:
            logged = f["f1/instrument/logs/temperature"][()]
            assert np.all(np.abs(logged - temperature) < 0.1)  # the set point was reached


# ---------------------------------------------------------------------- step scans
def test_ophyd_v1_step_scan_is_normalised_to_the_same_layout(RE, exp_dir):
    """Resource/Datum documents of an ophyd v1 detector give the fly-scan layout."""
    bl = make_sim_beamline(
        exp_dir, api="ophyd", detector="small", shape=SHAPE, frame_time=0.001, seed=7
    )
    writer = subscribe_writer(RE)
    docs = collector(RE)
    RE(
        step_rotation_scan(
            bl, experiment_dir=exp_dir, **NAMES, scan="300K", phi_start=1.0, phi_end=6.0,
            phi_step=0.5, omega=5.0,
        )
    )  # fmt: skip
    names = {name for name, _ in docs}
    assert {"resource", "datum"} <= names and "stream_resource" not in names
    check_rotation(
        writer.last_scan_file, "f1", scan="300K", n=10, phi_start=1.0, phi_step=0.5,
        geometry=bl.detector.geometry, chi=-90.0, omega=5.0, theta=0.0,
    )  # fmt: skip


def test_ophyd_async_step_scan_monitors_from_events(RE, exp_dir):
    bl = small_beamline(exp_dir)
    writer = subscribe_writer(RE)
    docs = collector(RE)
    RE(
        step_rotation_scan(
            bl, experiment_dir=exp_dir, **NAMES, scan="300K", entry="f2", phi_start=2.0,
            phi_end=5.0, phi_step=0.25, theta=2.0,
        )
    )  # fmt: skip
    n = 12
    descriptors = {d["uid"]: d["name"] for name, d in docs if name == "descriptor"}
    events = [d for name, d in docs if name == "event" if descriptors[d["descriptor"]] == "primary"]
    assert len(events) == n
    check_rotation(
        writer.last_scan_file, "f2", scan="300K", n=n, phi_start=2.0, phi_step=0.25,
        geometry=bl.detector.geometry, chi=-90.0, omega=0.0, theta=2.0,
    )  # fmt: skip
    with h5py.File(writer.last_scan_file, "r") as f:
        for name in ("MCS1", "MCS2"):
            ds = f[f"f2/monitor/{name}"]
            assert "source" not in ds.attrs  # written from the events, not copied from a link
            np.testing.assert_array_equal(ds[()], [e["data"][name] for e in events])
        np.testing.assert_allclose(
            f["f2/data/phi"][()], [e["data"]["goniometer-phi"] for e in events]
        )


# ---------------------------------------------------------------------- refusals, interruptions
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sample": "../x"}, "sample"),
        ({"label": ".hidden"}, "label"),
        ({"scan": "a/b"}, "scan"),
        ({"entry": "x1"}, "entry"),
    ],
)
def test_bad_metadata_rejected_before_the_scan(RE, exp_dir, change, message):
    bl = small_beamline(exp_dir)
    subscribe_writer(RE)
    docs = collector(RE)
    before = tree_files(exp_dir.parent)
    kwargs = {"experiment_dir": exp_dir, **NAMES, "scan": "300K", "phi_start": 0.0}
    kwargs.update({"phi_end": 2.0, "phi_step": 0.5, **change})
    with pytest.raises(MetadataError, match=message):
        RE(rotation_scan(bl, **kwargs))
    assert docs == []
    assert tree_files(exp_dir.parent) == before  # no scan file, no detector file, no dirs


def test_abort_mid_fly_leaves_valid_scan_file(RE, exp_dir):
    bl = small_beamline(exp_dir, frame_time=0.02)
    writer = subscribe_writer(RE)
    docs = collector(RE)
    n = 60

    requested: list[int] = []

    def pause_on_first_frames(name, doc):
        if name == "stream_datum" and not requested:
            requested.append(doc["indices"]["stop"])
            threading.Thread(target=RE.request_pause).start()

    RE.subscribe(pause_on_first_frames)
    with pytest.raises(RunEngineInterrupted):
        RE(
            rotation_scan(
                bl, experiment_dir=exp_dir, **NAMES, scan="300K", phi_start=0.0, phi_end=30.0,
                phi_step=0.5,
            )
        )  # fmt: skip
    RE.abort(reason="test abort")
    assert [d["exit_status"] for name, d in docs if name == "stop"] == ["abort"]
    scan_file = writer.last_scan_file
    root = nxload(str(scan_file))  # still a valid NeXus file
    assert text(root["f1/acquisition/status"].nxvalue) == "abort"
    with h5py.File(scan_file, "r") as f:
        fe = f["f1"]
        assert text(fe["acquisition/exit_status"][()]) == "abort"
        assert "nxworkflow" not in fe  # no "linked" record for an aborted run
        recorded = fe["data/frame_number"].shape[0]
        assert 0 < recorded < n
        frames = fe["data/data"]  # through the link: the frames written so far
        assert recorded <= frames.shape[0] < n
        assert frames[recorded - 1].any()
        assert fe["monitor/MCS1"].shape[0] >= recorded
    # the RunEngine and the writer go on with the next rotation
    RE(
        rotation_scan(
            bl, experiment_dir=exp_dir, **NAMES, scan="300K", entry="f2", phi_start=0.0,
            phi_end=2.0, phi_step=0.5,
        )
    )  # fmt: skip
    with h5py.File(scan_file, "r") as f:
        assert text(f["f2/acquisition/status"][()]) == "success"
        assert text(f["f1/acquisition/status"][()]) == "abort"


# ---------------------------------------------------------------------- out of process
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class _Drain(threading.Thread):
    """Read a subprocess's output so it never blocks; remember the lines."""

    def __init__(self, stream) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.lines: list[str] = []

    def run(self) -> None:
        for line in self.stream:
            self.lines.append(line)

    def wait_for(self, needle: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(needle in line for line in self.lines):
                return True
            time.sleep(0.05)
        return False


def _wait_for_status(scan_file: Path, entries: list[str], timeout: float) -> list[str | None]:
    deadline = time.monotonic() + timeout
    status: list[str | None] = [None] * len(entries)
    while time.monotonic() < deadline:
        if scan_file.exists():
            try:
                with h5py.File(scan_file, "r") as f:
                    status = [
                        text(f[f"{e}/acquisition/status"][()])
                        if f"{e}/acquisition/status" in f
                        else None
                        for e in entries
                    ]
            except OSError:  # the writer has it open right now
                pass
            if all(s == "success" for s in status):
                break
        time.sleep(0.1)
    return status


def test_writer_out_of_process_with_a_real_run_engine(RE, exp_dir):
    """RunEngine -> Publisher -> ``nxrefine-bs proxy`` -> ``nxrefine-bs writer`` (msgpack)."""
    from nxrefine_bs.callbacks.remote import Publisher

    port_in, port_out = _free_port(), _free_port()
    while port_out + 1 == port_in:
        port_out = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cli = [sys.executable, "-m", "nxrefine_bs.cli"]
    proxy = subprocess.Popen(
        [*cli, "proxy", "--in-port", str(port_in), "--out-port", str(port_out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    consumer = subprocess.Popen(
        [*cli, "writer", "--zmq", f"127.0.0.1:{port_out}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    log = _Drain(consumer.stderr)
    log.start()
    publisher = Publisher(f"127.0.0.1:{port_in}", connect_timeout=60)
    try:
        bl = small_beamline(exp_dir, frame_time=0.01)
        assert publisher.connected
        assert log.wait_for("listening on", 60), "".join(log.lines)

        RE.subscribe(publisher)
        uids = RE(
            multi_rotation_scan(
                bl, experiment_dir=exp_dir, **NAMES, scan="300K",
                rotations=[{"omega": 0.0}, {"omega": 20.0}], phi_start=0.0, phi_end=10.0,
                phi_step=0.5, temperature=300.0,
            )
        )  # fmt: skip
        assert len(uids) == 2
        scan_file = exp_dir / "TiSe2" / "xtal1" / "TiSe2_300K.nxs"
        status = _wait_for_status(scan_file, ["f1", "f2"], timeout=180)
        assert status == ["success", "success"], "".join(log.lines[-30:])
        assert consumer.poll() is None  # still serving
        for entry, omega in (("f1", 0.0), ("f2", 20.0)):
            check_rotation(
                scan_file, entry, scan="300K", n=20, phi_start=0.0, phi_step=0.5,
                geometry=bl.detector.geometry, chi=-90.0, omega=omega, theta=0.0,
                temperature=300.0,
            )  # fmt: skip
        with h5py.File(scan_file, "r") as f:
            assert [text(f[e]["acquisition/run_uid"][()]) for e in ("f1", "f2")] == list(uids)
        assert "stopped: success" in "".join(log.lines)  # one line per run
    finally:
        publisher.close()  # while the proxy still takes what it has queued
        for proc in (consumer, proxy):
            proc.terminate()
        for proc in (consumer, proxy):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.join(10)  # the pipe ends with the process
        consumer.stderr.close()
