"""Simulated beamline devices: ophyd-async detector, goniometer, monitors, temperature, v1."""

from __future__ import annotations

import threading
import time
from pathlib import Path, PurePath

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import bluesky.preprocessors as bpp
import h5py
import numpy as np
import pytest
from bluesky.run_engine import call_in_bluesky_event_loop
from bluesky.utils import FailedStatus
from ophyd_async.core import (
    StaticFilenameProvider,
    StaticPathProvider,
    TriggerInfo,
)

from nxrefine_bs.devices import (
    DATA_PATH,
    NDATTRIBUTES_PATH,
    FrameFile,
    RotationPathProvider,
    SimIonChamber,
    SimRotationDetector,
    SimTemperatureController,
    make_sim_beamline,
)
from nxrefine_bs.devices.frames import file_seed, file_uri, mcs2_counts
from nxrefine_bs.errors import FileExistsNXError
from nxrefine_bs.geometry import Geometry
from nxrefine_bs.simulation.crystal import SimCrystal
from nxrefine_bs.simulation.frames import DetectorModel, RotationSimulator

SHAPE = (64, 80)


@pytest.fixture
def setup():
    """Geometry, crystal and detector model of the tests (many peaks on 64 x 80 pixels)."""
    model = DetectorModel.synthetic(SHAPE, pixel_size=0.6)
    geom = Geometry(
        wavelength=0.3,
        distance=100.0,
        pixel_size=0.6,
        shape=SHAPE,
        beam_center_x=40.3,
        beam_center_y=31.6,
        chi=-90.0,
        phi_start=0.0,
        phi_step=0.5,
    )
    crystal = SimCrystal.random((5.43, 5.43, 5.43, 90, 90, 90), centring="F", seed=3)
    return geom, crystal, model


def collector(RE):
    docs: list[tuple[str, dict]] = []
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    return docs


def names(docs):
    return [n for n, _ in docs]


def fly(det, n):
    """Minimal fly plan for the detector alone."""

    @bpp.stage_decorator([det])
    @bpp.run_decorator(md={})
    def inner():
        yield from bps.prepare(det, TriggerInfo(number_of_events=n), wait=True)
        yield from bps.declare_stream(det, name="primary", collect=True)
        yield from bps.kickoff(det, wait=True)
        yield from bps.collect_while_completing(
            [det], [det], flush_period=0.2, stream_name="primary"
        )

    return (yield from inner())


# ---------------------------------------------------------------------- frame file
def test_frame_file_swmr_progress_and_no_overwrite(tmp_path):
    path = tmp_path / "f1.h5"
    ff = FrameFile(path, (4, 5))
    try:
        for i in range(3):
            ff.append(np.full((4, 5), i, np.int32), {"MCS1": 10.0 + i, "MCS2": 2.0, "phi": 0.1 * i})
            with h5py.File(path, "r", swmr=True) as r:  # a reader sees every flushed frame
                assert r[DATA_PATH].shape == (i + 1, 4, 5)
                assert r[DATA_PATH].chunks == (1, 4, 5)
                assert r[DATA_PATH].dtype == np.int32
                assert r[f"{NDATTRIBUTES_PATH}/MCS1"][i] == 10.0 + i
        with pytest.raises(FileExistsNXError):
            FrameFile(path, (4, 5))
    finally:
        ff.close()
    with h5py.File(path) as f:
        assert f["entry"].attrs["NX_class"] == "NXentry"
        assert f["entry/data"].attrs["signal"] == "data"
        np.testing.assert_allclose(f[f"{NDATTRIBUTES_PATH}/phi"][()], [0.0, 0.1, 0.2])


def test_file_helpers(tmp_path):
    assert file_seed(0, "f1") == 1 and file_seed(2, "f13.h5") == 213 and file_seed(1, "x") == 100
    assert file_uri(tmp_path / "f1.h5") == "file://localhost" + (tmp_path / "f1.h5").as_posix()
    p = RotationPathProvider(tmp_path, "f1")
    p.set_file(tmp_path / "a" / "f3.h5")
    info = p()
    assert Path(str(info.directory_path)) == tmp_path / "a" and info.filename == "f3"


# ---------------------------------------------------------------------- ophyd-async detector
def test_fly_detector_writes_simulated_frames(RE, tmp_path, setup):
    geom, crystal, model = setup
    bl = make_sim_beamline(
        StaticPathProvider(StaticFilenameProvider("f2"), PurePath(tmp_path)),
        crystal=crystal,
        detector=model,
        geometry=geom,
        frame_time=0.005,
        seed=4,
    )
    det = bl.detector
    assert det.name == "detector" and bl.goniometer.chi.name == "goniometer-chi"
    RE(bps.mv(bl.goniometer.omega, 12.0, det.phi_start, 1.0, det.phi_step, 0.25))
    docs = collector(RE)
    n = 24
    RE(fly(det, n))
    assert names(docs).count("event") == 0
    assert names(docs).count("stream_resource") == 4
    resources = {d["data_key"]: d for name, d in docs if name == "stream_resource"}
    assert set(resources) == {"detector", "detector-MCS1", "detector-MCS2", "detector-phi"}
    path = tmp_path / "f2.h5"
    for key, res in resources.items():
        assert res["mimetype"] == "application/x-hdf5"
        assert res["uri"] == "file://localhost" + path.as_posix()
        expected = DATA_PATH if key == "detector" else f"{NDATTRIBUTES_PATH}/{key[9:]}"
        assert res["parameters"]["dataset"] == expected
    stops = [d["indices"]["stop"] for name, d in docs if name == "stream_datum"]
    assert max(stops) == n
    descriptor = next(d for name, d in docs if name == "descriptor")
    assert descriptor["data_keys"]["detector"]["shape"] == [1, *SHAPE]
    assert descriptor["data_keys"]["detector"]["dtype_numpy"] == "<i4"
    assert descriptor["data_keys"]["detector"]["external"] == "STREAM:"

    sim = RotationSimulator(
        geom.replace(omega=12.0, phi_start=1.0, phi_step=0.25), crystal, model, n, seed=402
    )
    assert len(sim.peaks) > 0
    with h5py.File(path, "r") as f:
        data = f[DATA_PATH]
        assert data.shape == (n, *SHAPE) and data.chunks == (1, *SHAPE)
        for i in range(n):
            np.testing.assert_array_equal(data[i], sim.frame(i))
        np.testing.assert_array_equal(f[f"{NDATTRIBUTES_PATH}/MCS1"][()], sim.monitor)
        np.testing.assert_array_equal(f[f"{NDATTRIBUTES_PATH}/MCS2"][()], mcs2_counts(sim))
        np.testing.assert_allclose(f[f"{NDATTRIBUTES_PATH}/phi"][()], sim.phi)
    # the monitor channels hold the counts of the last frame
    assert bl.monitor_names == ["MCS1", "MCS2"]
    assert value(bl.monitors[0].counts) == sim.monitor[-1]
    assert value(bl.monitors[1].counts) == mcs2_counts(sim)[-1]


def test_detector_renders_off_the_event_loop(RE, tmp_path, setup, monkeypatch):
    geom, crystal, model = setup
    bl = make_sim_beamline(
        tmp_path, crystal=crystal, detector=model, geometry=geom, frame_time=0.001
    )
    threads: set[str] = set()
    original = RotationSimulator.frame

    def frame(self, index):
        threads.add(threading.current_thread().name)
        return original(self, index)

    monkeypatch.setattr(RotationSimulator, "frame", frame)
    RE(fly(bl.detector, 3))
    assert threads and all(t.startswith("nxrefine-frames") for t in threads)
    assert (tmp_path / "f1.h5").is_file()


def test_triggered_detector_step_scan(RE, tmp_path, setup):
    geom, crystal, model = setup
    bl = make_sim_beamline(tmp_path, crystal=crystal, detector=model, geometry=geom, frame_time=0.0)
    det = bl.detector
    RE(bps.mv(det.n_frames, 5, det.frame_time, 0.001))
    docs = collector(RE)
    RE(bp.count([det, *bl.monitors], num=5))
    events = [d for name, d in docs if name == "event"]
    assert len(events) == 5 and names(docs).count("stream_resource") == 4
    sim = RotationSimulator(geom, crystal, model, 5, seed=1)
    np.testing.assert_array_equal([e["data"]["MCS1"] for e in events], sim.monitor)
    with h5py.File(tmp_path / "f1.h5", "r") as f:
        assert f[DATA_PATH].shape == (5, *SHAPE)
        np.testing.assert_array_equal(f[DATA_PATH][4], sim.frame(4))


def test_detector_refuses_to_overwrite(RE, tmp_path, setup):
    geom, crystal, model = setup
    bl = make_sim_beamline(tmp_path, crystal=crystal, detector=model, geometry=geom)
    (tmp_path / "f1.h5").write_bytes(b"raw data")
    with pytest.raises(FailedStatus) as info:
        RE(fly(bl.detector, 2))
    assert isinstance(info.value.__cause__, FileExistsNXError)
    assert (tmp_path / "f1.h5").read_bytes() == b"raw data"


def test_detector_rejects_mismatched_geometry(tmp_path, setup):
    geom, crystal, model = setup
    with pytest.raises(Exception, match="does not match"):
        SimRotationDetector(
            tmp_path, crystal=crystal, detector=model, geometry=geom.replace(shape=(10, 10))
        )


# ---------------------------------------------------------------------- other devices
def test_temperature_controller_settles(RE):
    temp = SimTemperatureController(name="temperature", initial=300.0, time_constant=0.02)
    RE(_connect(temp))
    RE(bps.mv(temp, 250.0))  # returns once settled (the readback is checked below)
    docs = collector(RE)
    RE(bp.count([temp]))
    data = next(d for name, d in docs if name == "event")["data"]
    assert abs(data["temperature"] - 250.0) <= 0.05
    assert data["temperature-setpoint"] == 250.0


def test_ion_chamber_reads_under_its_name(RE):
    mcs = SimIonChamber(name="MCS1")
    RE(_connect(mcs))
    mcs.update(123.0)
    docs = collector(RE)
    RE(bp.count([mcs]))
    assert next(d for name, d in docs if name == "event")["data"] == {"MCS1": 123.0}


def test_goniometer_flies_phi(RE, tmp_path):
    from ophyd_async.core import FlyMotorInfo

    bl = make_sim_beamline(tmp_path, shape=(8, 10))
    phi = bl.goniometer.phi
    info = FlyMotorInfo(start_position=0.0, end_position=2.0, time_for_move=0.2)
    RE(bps.prepare(phi, info, wait=True))
    t0 = time.monotonic()

    async def fly_phi():
        await phi.kickoff()
        await phi.complete()

    call_in_bluesky_event_loop(fly_phi())
    assert time.monotonic() - t0 >= 0.2
    assert value(phi.user_readback) > 2.0  # past the end, after the run-down


def value(signal):
    """Current value of an ophyd-async signal, read on the RunEngine's loop."""
    return call_in_bluesky_event_loop(signal.get_value())


def _connect(*devices):
    from ophyd_async.plan_stubs import ensure_connected

    yield from ensure_connected(*devices)


# ---------------------------------------------------------------------- ophyd v1
def test_v1_detector_emits_resource_and_datum(RE, tmp_path, setup):
    geom, crystal, model = setup
    bl = make_sim_beamline(
        tmp_path, api="ophyd", crystal=crystal, detector=model, geometry=geom, frame_time=0.001
    )
    det = bl.detector
    det.n_frames.put(3)
    docs = collector(RE)
    RE(bp.count([det, *bl.monitors], num=3))
    assert names(docs) == [
        "start", "descriptor", "resource", "datum", "event", "datum", "event", "datum", "event",
        "stop",
    ]  # fmt: skip
    resource = next(d for name, d in docs if name == "resource")
    assert resource["spec"] == "AD_HDF5"
    assert resource["resource_kwargs"] == {"frame_per_point": 1}
    assert Path(resource["root"], resource["resource_path"]) == tmp_path / "detector.h5"
    datums = [d for name, d in docs if name == "datum"]
    assert [d["datum_kwargs"] for d in datums] == [{"point_number": i} for i in range(3)]
    events = [d for name, d in docs if name == "event"]
    assert [e["data"]["detector"] for e in events] == [d["datum_id"] for d in datums]
    descriptor = next(d for name, d in docs if name == "descriptor")
    assert descriptor["data_keys"]["detector"]["external"] == "FILESTORE:"
    sim = RotationSimulator(geom, crystal, model, 3, seed=0)
    np.testing.assert_array_equal([e["data"]["MCS1"] for e in events], sim.monitor)
    with h5py.File(tmp_path / "detector.h5", "r") as f:
        for i in range(3):
            np.testing.assert_array_equal(f[DATA_PATH][i], sim.frame(i))


@pytest.mark.slow
def test_pilatus_2m_frames(RE, tmp_path):
    pytest.importorskip("pyFAI")
    bl = make_sim_beamline(tmp_path, detector="Pilatus CdTe 2M", frame_time=0.001)
    det = bl.detector
    assert det.detector_model.shape == (1679, 1475)
    RE(bps.mv(det.n_frames, 3600))  # a full rotation's simulator, two frames written
    RE(fly(det, 2))
    with h5py.File(tmp_path / "f1.h5", "r") as f:
        data = f[DATA_PATH]
        assert data.shape == (2, 1679, 1475) and data.chunks == (1, 1679, 1475)
        assert (data[0][model_mask(det)] == -1).all()
        assert data[1].max() > 0


def model_mask(det):
    return det.detector_model.mask > 0


def test_one_factory_for_both_device_libraries(tmp_path):
    """make_sim_beamline builds the device bundle with ophyd-async or ophyd v1 (api=)."""
    from ophyd import Device as V1Device
    from ophyd_async.core import Device as AsyncDevice

    from nxrefine_bs.errors import NXRefineBSError

    v1 = make_sim_beamline(tmp_path, api="ophyd")
    assert isinstance(v1.goniometer, V1Device) and isinstance(v1.detector, V1Device)
    new = make_sim_beamline(tmp_path, connect=False)
    assert isinstance(new.goniometer, AsyncDevice) and isinstance(new.detector, AsyncDevice)
    with pytest.raises(NXRefineBSError, match="api must be one of ophyd-async, ophyd"):
        make_sim_beamline(tmp_path, api="tango")
    with pytest.raises(NXRefineBSError, match="needs a directory"):
        make_sim_beamline(new.path_provider, api="ophyd")
