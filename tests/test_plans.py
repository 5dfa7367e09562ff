"""Rotation plans with a real RunEngine: documents, start metadata, files, validation, aborts."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import h5py
import numpy as np
import pytest
from bluesky.run_engine import call_in_bluesky_event_loop
from bluesky.utils import RunEngineInterrupted

from nxrefine_bs.devices import (
    DATA_PATH,
    NDATTRIBUTES_PATH,
    make_sim_beamline,
)
from nxrefine_bs.devices.frames import mcs2_counts
from nxrefine_bs.errors import MetadataError
from nxrefine_bs.geometry import Geometry
from nxrefine_bs.plans import (
    frame_count,
    multi_rotation_scan,
    rotation_scan,
    step_rotation_scan,
    temperature_series,
)
from nxrefine_bs.simulation.crystal import SimCrystal
from nxrefine_bs.simulation.frames import DetectorModel, RotationSimulator

SHAPE = (64, 80)
NAMES = {"sample": "TiSe2", "label": "xtal1", "scan": "300K"}
GEOMETRY_KEYS = {
    "wavelength", "distance", "pixel_size", "shape", "beam_center_x", "beam_center_y", "yaw",
    "pitch", "roll", "detector_orientation", "chi", "omega", "theta", "phi_start", "phi_step",
    "phi_end",
}  # fmt: skip


@pytest.fixture
def setup():
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


@pytest.fixture
def beamline(RE, setup):
    def make(exp: Path, frame_time: float = 0.005, **kw):
        geom, crystal, model = setup
        return make_sim_beamline(
            exp,
            crystal=crystal,
            detector=model,
            geometry=geom,
            frame_time=frame_time,
            seed=7,
            temperature_time_constant=0.01,
            **kw,
        )

    return make


@pytest.fixture
def exp(tmp_path):
    d = tmp_path / "experiment"
    d.mkdir()
    return d


def collector(RE):
    docs: list[tuple[str, dict]] = []
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    return docs


def count(docs, name):
    return sum(1 for n, _ in docs if n == name)


def by_stream(docs):
    """Events per stream name."""
    streams = {d["uid"]: d["name"] for n, d in docs if n == "descriptor"}
    out: dict[str, list[dict]] = {}
    for n, d in docs:
        if n == "event":
            out.setdefault(streams[d["descriptor"]], []).append(d)
    return out


def simulator(setup, n, *, seed, chi=-90.0, omega=0.0, theta=0.0, phi_start=0.0, phi_step=0.5):
    geom, crystal, model = setup
    g = geom.replace(chi=chi, omega=omega, theta=theta, phi_start=phi_start, phi_step=phi_step)
    return RotationSimulator(g, crystal, model, n, seed=seed)


def value(signal):
    return call_in_bluesky_event_loop(signal.get_value())


# ---------------------------------------------------------------------- fly
def test_rotation_scan_documents_start_and_frames(RE, exp, beamline, setup):
    bl = beamline(exp)
    docs = collector(RE)
    (uid,) = RE(
        rotation_scan(
            bl, experiment_dir=exp, **NAMES, phi_start=0.0, phi_end=15.0, phi_step=0.5,
            chi=-90.0, omega=10.0, theta=0.0, detector_translation=(1.5, -2.0),
            temperature=300.0, md={"operator": "test"},
        )
    )  # fmt: skip
    n = 30
    assert count(docs, "start") == 1 and count(docs, "stop") == 1
    assert count(docs, "descriptor") == 2  # primary + baseline
    assert count(docs, "stream_resource") == 4
    assert count(docs, "stream_datum") % 4 == 0 and count(docs, "stream_datum") >= 4
    events = by_stream(docs)
    assert "primary" not in events and len(events["baseline"]) == 2
    stop = next(d for name, d in docs if name == "stop")
    assert stop["exit_status"] == "success" and stop["run_start"] == uid

    start = next(d for name, d in docs if name == "start")
    assert start["plan_name"] == "rotation_scan"
    assert (start["sample"], start["label"], start["scan"], start["entry"]) == (
        "TiSe2", "xtal1", "300K", "f1",
    )  # fmt: skip
    assert start["temperature"] == 300.0 and start["operator"] == "test"
    assert start["plan_args"]["phi_end"] == 15.0
    nx = start["nxrefine"]
    assert set(nx) == {
        "experiment_dir", "beamline", "configuration", "temperature_units", "detector",
        "monitors", "geometry", "translation", "n_frames", "rotation_index", "rotations",
    }  # fmt: skip
    assert (nx["rotation_index"], nx["rotations"]) == (1, 1)
    assert nx["experiment_dir"] == str(exp) and nx["beamline"] == "sim"
    assert nx["configuration"] is None and nx["temperature_units"] == "K"
    assert nx["detector"] == {
        "name": "synthetic 64x80",
        "data_key": "detector",
        "frame_time": 0.005,
    }
    assert nx["monitors"] == ["MCS1", "MCS2"]
    assert nx["translation"] == {"x": 1.5, "y": -2.0}
    assert nx["n_frames"] == n
    g = nx["geometry"]
    assert set(g) == GEOMETRY_KEYS
    assert g["shape"] == list(SHAPE) and g["wavelength"] == 0.3 and g["distance"] == 100.0
    assert (g["chi"], g["omega"], g["theta"]) == (-90.0, 10.0, 0.0)
    assert (g["phi_start"], g["phi_step"], g["phi_end"]) == (0.0, 0.5, 15.0)
    json.dumps(start)  # serialisable for Tiled / 0MQ

    path = exp / "TiSe2" / "xtal1" / "300K" / "f1.h5"
    resources = {d["data_key"]: d for name, d in docs if name == "stream_resource"}
    assert set(resources) == {"detector", "detector-MCS1", "detector-MCS2", "detector-phi"}
    assert resources["detector"]["uri"] == "file://localhost" + path.as_posix()
    assert resources["detector"]["parameters"]["dataset"] == DATA_PATH
    assert resources["detector-phi"]["parameters"]["dataset"] == f"{NDATTRIBUTES_PATH}/phi"
    assert all(r["mimetype"] == "application/x-hdf5" for r in resources.values())
    datums = [d for name, d in docs if name == "stream_datum"]
    assert {d["stream_resource"] for d in datums} == {r["uid"] for r in resources.values()}
    assert max(d["indices"]["stop"] for d in datums) == n

    baseline = by_stream(docs)["baseline"][0]["data"]
    assert baseline["goniometer-omega"] == 10.0 and baseline["detector_stage-x"] == 1.5

    sim = simulator(setup, n, seed=701, omega=10.0)
    with h5py.File(path, "r") as f:
        data = f[DATA_PATH]
        assert data.shape == (n, *SHAPE) and data.dtype == np.int32
        for i in range(n):
            np.testing.assert_array_equal(data[i], sim.frame(i))
        for name, expected in (("MCS1", sim.monitor), ("MCS2", mcs2_counts(sim)), ("phi", sim.phi)):
            values = f[f"{NDATTRIBUTES_PATH}/{name}"][()]
            assert values.shape == (n,)
            np.testing.assert_allclose(values, expected)
    assert value(bl.goniometer.phi.velocity) == 0.0  # restored after the fly


READER = """
import sys, h5py
with h5py.File(sys.argv[1], "r", swmr=True) as f:
    d = f["/entry/data/data"]
    print(d.shape[0], f["/entry/instrument/NDAttributes/phi"].shape[0], int(d[0].sum()))
"""


def test_file_readable_with_swmr_while_flying(RE, exp, beamline, setup):
    bl = beamline(exp, frame_time=0.02)
    path = exp / "TiSe2" / "xtal1" / "300K" / "f1.h5"
    seen: dict[str, object] = {}

    def on_datum(name, doc):
        if name != "stream_datum" or "subprocess" in seen:
            return
        seen["indices"] = doc["indices"]["stop"]
        with h5py.File(path, "r", swmr=True) as f:  # this process, file open for writing
            seen["inprocess"] = f[DATA_PATH].shape[0]
        out = subprocess.run(
            [sys.executable, "-c", READER, str(path)], capture_output=True, text=True, check=True
        )
        seen["subprocess"] = [int(v) for v in out.stdout.split()]

    RE.subscribe(on_datum, critical=True)  # reads on the RunEngine thread, mid-flight
    n = 40
    RE(rotation_scan(bl, experiment_dir=exp, **NAMES, phi_start=0, phi_end=20, phi_step=0.5))
    frames, phis, first_sum = seen["subprocess"]
    assert 0 < seen["indices"] <= seen["inprocess"] <= frames < n
    assert phis >= frames
    assert first_sum == int(simulator(setup, n, seed=701).frame(0).sum())
    with h5py.File(path, "r") as f:
        assert f[DATA_PATH].shape[0] == n


# ---------------------------------------------------------------------- step
def test_step_rotation_scan_events(RE, exp, beamline, setup):
    bl = beamline(exp)
    docs = collector(RE)
    n = 8
    RE(
        step_rotation_scan(
            bl, experiment_dir=exp, **NAMES, entry="f3", phi_start=1.0, phi_end=5.0,
            phi_step=0.5, theta=2.0,
        )
    )  # fmt: skip
    events = by_stream(docs)
    assert len(events["primary"]) == n and len(events["baseline"]) == 2
    assert count(docs, "stream_resource") == 4 and count(docs, "stream_datum") == 4 * n
    start = next(d for name, d in docs if name == "start")
    assert start["plan_name"] == "step_rotation_scan" and "temperature" not in start
    assert start["nxrefine"]["geometry"]["theta"] == 2.0
    primary = [e["data"] for e in events["primary"]]
    assert set(primary[0]) == {"goniometer-phi", "MCS1", "MCS2"}
    np.testing.assert_allclose([p["goniometer-phi"] for p in primary], 1.0 + 0.5 * np.arange(n))
    sim = simulator(setup, n, seed=703, theta=2.0, phi_start=1.0)
    np.testing.assert_array_equal([p["MCS1"] for p in primary], sim.monitor)
    np.testing.assert_array_equal([p["MCS2"] for p in primary], mcs2_counts(sim))
    with h5py.File(exp / "TiSe2/xtal1/300K/f3.h5", "r") as f:
        assert f[DATA_PATH].shape == (n, *SHAPE)
        for i in range(n):
            np.testing.assert_array_equal(f[DATA_PATH][i], sim.frame(i))
        np.testing.assert_allclose(f[f"{NDATTRIBUTES_PATH}/phi"][()], sim.phi)


def test_step_rotation_scan_ophyd_v1(RE, exp, setup):
    geom, crystal, model = setup
    bl = make_sim_beamline(
        exp, api="ophyd", crystal=crystal, detector=model, geometry=geom, seed=7, frame_time=0.001
    )
    docs = collector(RE)
    n = 4
    RE(step_rotation_scan(bl, experiment_dir=exp, **NAMES, phi_start=0, phi_end=2, phi_step=0.5))
    assert count(docs, "resource") == 1 and count(docs, "datum") == n
    assert count(docs, "stream_resource") == 0
    resource = next(d for name, d in docs if name == "resource")
    path = exp / "TiSe2/xtal1/300K/f1.h5"
    assert resource["spec"] == "AD_HDF5" and resource["resource_kwargs"] == {"frame_per_point": 1}
    assert Path(resource["root"], resource["resource_path"]) == path
    primary = [e["data"] for e in by_stream(docs)["primary"]]
    datums = [d for name, d in docs if name == "datum"]
    assert [p["detector"] for p in primary] == [d["datum_id"] for d in datums]
    assert [d["datum_kwargs"]["point_number"] for d in datums] == list(range(n))
    np.testing.assert_allclose([p["goniometer_phi"] for p in primary], 0.5 * np.arange(n))
    start = next(d for name, d in docs if name == "start")
    assert start["nxrefine"]["detector"]["data_key"] == "detector"
    sim = simulator(setup, n, seed=701)
    np.testing.assert_array_equal([p["MCS1"] for p in primary], sim.monitor)
    with h5py.File(path, "r") as f:
        for i in range(n):
            np.testing.assert_array_equal(f[DATA_PATH][i], sim.frame(i))


def test_v1_cannot_fly(RE, exp, setup):
    geom, crystal, model = setup
    bl = make_sim_beamline(exp, api="ophyd", crystal=crystal, detector=model, geometry=geom)
    with pytest.raises(MetadataError, match="cannot fly"):
        RE(rotation_scan(bl, experiment_dir=exp, **NAMES, phi_end=0.0))


# ---------------------------------------------------------------------- several rotations
def test_multi_rotation_scan(RE, exp, beamline, setup):
    bl = beamline(exp)
    docs = collector(RE)
    rotations = [
        {"omega": 0.0},
        {"omega": -20.0, "translation": (0.0, 5.0)},
        {"chi": -85.0, "theta": 1.0, "phi_end": 3.0},
    ]
    uids = RE(
        multi_rotation_scan(
            bl, experiment_dir=exp, **NAMES, rotations=rotations, phi_start=0, phi_end=2,
            phi_step=0.5,
        )
    )  # fmt: skip
    assert len(uids) == 3 and count(docs, "start") == 3 and count(docs, "stop") == 3
    starts = [d for name, d in docs if name == "start"]
    assert [s["entry"] for s in starts] == ["f1", "f2", "f3"]
    assert all(s["plan_name"] == "multi_rotation_scan" for s in starts)
    assert [s["nxrefine"]["geometry"]["omega"] for s in starts] == [0.0, -20.0, 0.0]
    assert starts[1]["nxrefine"]["translation"] == {"x": 0.0, "y": 5.0}
    assert starts[2]["nxrefine"]["geometry"]["chi"] == -85.0
    assert [s["nxrefine"]["n_frames"] for s in starts] == [4, 4, 6]
    scan_dir = exp / "TiSe2/xtal1/300K"
    sim2 = simulator(setup, 4, seed=702, omega=-20.0)
    with h5py.File(scan_dir / "f2.h5", "r") as f:
        np.testing.assert_array_equal(f[DATA_PATH][()], sim2.frames())
    with h5py.File(scan_dir / "f3.h5", "r") as f:
        assert f[DATA_PATH].shape == (6, *SHAPE)


def test_temperature_series(RE, exp, beamline):
    bl = beamline(exp)
    docs = collector(RE)
    uids = RE(
        temperature_series(
            bl, [250.0, 12.5], experiment_dir=exp, sample="TiSe2", label="xtal1",
            rotations=[{}, {"omega": 15.0}], phi_start=0, phi_end=1.5, phi_step=0.5,
            mode="step",
        )
    )  # fmt: skip
    assert len(uids) == 4
    starts = [d for name, d in docs if name == "start"]
    assert [(s["scan"], s["entry"], s["temperature"]) for s in starts] == [
        ("250K", "f1", 250.0), ("250K", "f2", 250.0), ("12p5K", "f1", 12.5), ("12p5K", "f2", 12.5),
    ]  # fmt: skip
    for scan in ("250K", "12p5K"):
        for entry in ("f1", "f2"):
            assert (exp / "TiSe2/xtal1" / scan / f"{entry}.h5").is_file()
    assert abs(value(bl.temperature.readback) - 12.5) <= 0.05
    baseline = [e["data"]["temperature"] for e in by_stream(docs)["baseline"]]
    assert all(abs(t - 12.5) < 0.1 for t in baseline[-4:])


# ---------------------------------------------------------------------- validation
BAD = [
    ({"sample": "a/b"}, "path separator"),
    ({"sample": "a\\b"}, "path separator"),
    ({"label": ".."}, "'..'"),
    ({"label": ".hidden"}, "starts with"),
    ({"scan": ""}, "empty"),
    ({"scan": "a\x07b"}, "control"),
    ({"entry": "g1"}, "entry"),
    ({"entry": "f"}, "entry"),
    ({"phi_step": 0.0}, "positive"),
    ({"phi_step": -0.5}, "positive"),
    ({"phi_end": 0.0}, "no frame"),
    ({"phi_end": float("nan")}, "finite"),
    ({"experiment_dir": "missing"}, "does not exist"),
    ({"md": {"sample": "other"}}, "md may not set"),
    ({"configuration": "missing.nxs"}, "configuration"),
    ({"detector_translation": (1.0,)}, "translation"),
]


@pytest.mark.parametrize(("change", "message"), BAD)
def test_bad_metadata_rejected_before_anything_moves(RE, exp, beamline, change, message):
    bl = beamline(exp)
    docs = collector(RE)
    kwargs = {"experiment_dir": exp, **NAMES, "phi_start": 0.0, "phi_end": 2.0, "phi_step": 0.5}
    kwargs["chi"] = 33.0  # would move chi
    if change.get("experiment_dir") == "missing":
        change = {"experiment_dir": exp / "missing"}
    kwargs.update(change)
    chi_before = value(bl.goniometer.chi.user_readback)
    with pytest.raises(MetadataError, match=message):
        RE(rotation_scan(bl, **kwargs))
    assert docs == []
    assert list(exp.iterdir()) == []
    assert value(bl.goniometer.chi.user_readback) == chi_before


def test_existing_detector_file_refused(RE, exp, beamline):
    bl = beamline(exp)
    scan_dir = exp / "TiSe2/xtal1/300K"
    scan_dir.mkdir(parents=True)
    (scan_dir / "f2.h5").write_bytes(b"raw")
    docs = collector(RE)
    with pytest.raises(MetadataError, match="never overwritten"):
        RE(
            multi_rotation_scan(
                bl, experiment_dir=exp, **NAMES, rotations=[{"omega": 5.0}, {"omega": 10.0}],
                phi_start=0, phi_end=1, phi_step=0.5,
            )
        )  # fmt: skip
    assert docs == [] and sorted(p.name for p in scan_dir.iterdir()) == ["f2.h5"]
    assert (scan_dir / "f2.h5").read_bytes() == b"raw"
    assert value(bl.goniometer.omega.user_readback) == 0.0


def test_temperature_series_validates_every_rotation_first(RE, exp, beamline):
    bl = beamline(exp)
    with pytest.raises(MetadataError, match="unknown keys"):
        RE(
            temperature_series(
                bl, [200.0, 250.0], experiment_dir=exp, sample="s", label="l",
                rotations=[{"omega": 1.0, "kappa": 3.0}], phi_end=1, phi_step=0.5,
            )
        )  # fmt: skip
    with pytest.raises(MetadataError, match="repeats"):
        RE(temperature_series(bl, [200, 200.0], experiment_dir=exp, sample="s", label="l"))
    assert value(bl.temperature.readback) == 300.0 and list(exp.iterdir()) == []


def test_frame_count():
    assert frame_count(-5.0, 360.0, 0.1) == 3650
    assert frame_count(0, 1, 0.3) == 3
    with pytest.raises(MetadataError):
        frame_count(1.0, 1.1, 0.5)


# ---------------------------------------------------------------------- interruptions
def test_abort_mid_step_scan_leaves_readable_partial_file(RE, exp, beamline):
    bl = beamline(exp, frame_time=0.01)
    docs = collector(RE)
    n = 40

    def pause_after_five(name, doc):
        if name == "event" and doc["seq_num"] == 5 and "x" not in doc["data"]:
            threading.Thread(target=RE.request_pause).start()

    RE.subscribe(pause_after_five)
    with pytest.raises(RunEngineInterrupted):
        RE(
            step_rotation_scan(
                bl, experiment_dir=exp, **NAMES, phi_start=0, phi_end=20, phi_step=0.5,
                baseline=False,
            )
        )  # fmt: skip
    RE.abort()
    stop = next(d for name, d in docs if name == "stop")
    assert stop["exit_status"] == "abort"
    with h5py.File(exp / "TiSe2/xtal1/300K/f1.h5", "r") as f:
        written = f[DATA_PATH].shape[0]
        assert 5 <= written < n
        assert f[f"{NDATTRIBUTES_PATH}/phi"].shape[0] >= written
        assert (f[DATA_PATH][written - 1] != 0).any()


class BoomError(RuntimeError):
    pass


def test_plan_failing_mid_fly_leaves_readable_partial_file(RE, exp, beamline):
    bl = beamline(exp, frame_time=0.02)
    docs = collector(RE)
    n = 40

    def explode_after_first_collect(msg):
        if msg.command == "collect":

            def boom():
                yield from bps.null()
                raise BoomError("interrupted on purpose")

            return None, boom()
        return None, None

    plan = rotation_scan(bl, experiment_dir=exp, **NAMES, phi_start=0, phi_end=20, phi_step=0.5)
    with pytest.raises(BoomError):
        RE(bpp.plan_mutator(plan, explode_after_first_collect))
    stop = next(d for name, d in docs if name == "stop")
    assert stop["exit_status"] == "fail"
    with h5py.File(exp / "TiSe2/xtal1/300K/f1.h5", "r") as f:
        assert 0 < f[DATA_PATH].shape[0] < n
    # the detector is unstaged and ready for the next rotation
    RE(
        rotation_scan(
            bl, experiment_dir=exp, **NAMES, entry="f2", phi_start=0, phi_end=1, phi_step=0.5
        )
    )
    assert (exp / "TiSe2/xtal1/300K/f2.h5").is_file()
