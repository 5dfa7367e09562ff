"""ophyd-async EPICS devices over Channel Access against the simulated beamline IOC.

The ``ioc`` fixture starts ``nxrefine-bs ioc`` as a subprocess serving Channel Access on
127.0.0.1 at a free port (``EPICS_CA_SERVER_PORT``; the client looks only there), waits
until a PV answers, and stops it at the end of the session.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from nxrefine_bs.callbacks.nexus_writer import NeXusScanWriter
from nxrefine_bs.callbacks.reduction import PostScanReduction
from nxrefine_bs.devices import make_sim_beamline
from nxrefine_bs.devices.beamline import default_geometry, detector_model
from nxrefine_bs.devices.epics import connect_epics_beamline, make_epics_beamline
from nxrefine_bs.devices.protocols import (
    FlyingAxis,
    FlyingDetector,
    RotationBeamline,
    RotationStage,
    TemperatureController,
)
from nxrefine_bs.errors import DeviceConnectionError
from nxrefine_bs.ioc.motor import MotionProfile
from nxrefine_bs.plans import temperature_series

SHAPE = (96, 128)
NAMES = {"sample": "Si", "label": "xtal1"}
PHI = {"phi_start": 0.0, "phi_end": 40.0, "phi_step": 1.0}  # 40 frames per rotation
FRAME_TIME = 0.02
TEMPERATURES = (300.0, 290.0, 280.0)
PARAMS = {"threshold": 50.0, "min_pixels": 2, "first": 0}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def ioc(tmp_path_factory):
    """The simulated IOC on 127.0.0.1:<free port>; yields its prefix."""
    port = _free_port()
    env = {
        "EPICS_CA_SERVER_PORT": str(port),
        "EPICS_CA_REPEATER_PORT": str(_free_port()),
        "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
        "EPICS_CA_ADDR_LIST": "127.0.0.1",
        "EPICS_CA_AUTO_ADDR_LIST": "NO",
        "EPICS_CAS_BEACON_ADDR_LIST": "127.0.0.1",
        "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
    }
    os.environ.update(env)  # the CA client of this process reads them once
    prefix = "NXTEST:"
    log_path = tmp_path_factory.mktemp("ioc") / "ioc.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nxrefine_bs.cli",
            "ioc",
            "--prefix",
            prefix,
            "--shape",
            "96,128",
            "--watch-pid",
            str(os.getpid()),
        ],
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    from caproto.sync.client import read

    deadline = time.monotonic() + 120
    try:
        while True:  # wait until the detector state PV answers
            if proc.poll() is not None:
                raise RuntimeError(f"IOC exited: {log_path.read_text(errors='replace')}")
            try:
                read(f"{prefix}DET:cam1:DetectorState_RBV", timeout=0.5, repeater=False)
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise
        yield prefix
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def ca(RE, ioc):
    """The IOC's prefix; afterwards this process's CA channels are closed while the
    RunEngine's event loop (which their callbacks use) still runs."""
    yield ioc
    import aioca

    aioca.purge_channel_caches()


def epics_beamline(exp: Path, prefix: str):
    model = detector_model("small", SHAPE)
    return make_epics_beamline(
        exp, prefix=prefix, geometry=default_geometry(model), detector_model=model
    )


def run_series(RE, devices, exp: Path) -> tuple[list[str], PostScanReduction]:
    RE.subscribe(NeXusScanWriter())
    reduction = PostScanReduction(("max", "find"), params=PARAMS)
    RE.subscribe(reduction)
    uids = RE(
        temperature_series(
            devices, TEMPERATURES, experiment_dir=exp, **NAMES, frame_time=FRAME_TIME, **PHI
        )
    )
    results = reduction.wait(timeout=120)
    reduction.close()
    assert [r.ok for r in results] == [True] * len(TEMPERATURES), reduction.errors
    return uids, reduction


def peaks(scan_file: Path, raw: Path | None = None) -> np.ndarray:
    """Peaks ``(x, y, phi)``: the frame index ``z`` turned into the rotation angle with the
    per-frame ``phi`` the detector recorded (``raw``), or ``z x step`` (in-process)."""
    with h5py.File(scan_file, "r") as f:
        x, y, z = (f[f"f1/peaks/{k}"][()] for k in ("x", "y", "z"))
    if raw is None:
        phi = PHI["phi_start"] + z * PHI["phi_step"]
    else:
        with h5py.File(raw, "r") as f:
            frame_phi = f["/entry/instrument/NDAttributes/phi"][()]
        phi = np.interp(z, np.arange(len(frame_phi)), frame_phi)
    return np.stack([x, y, phi], axis=1)


def test_motion_profile_is_continuous():
    p = MotionProfile.move(0.0, 10.0, velocity=5.0, accel_time=0.5, t0=0.0)
    t = np.linspace(0, p.duration, 500)
    x = np.array([p.position(v) for v in t])
    assert np.all(np.diff(x) >= 0) and x[-1] == 10.0
    assert p.position(1.0) == pytest.approx(0.5 * 10.0 * 0.5**2 + 5.0 * 0.5)  # ramp + cruise
    short = MotionProfile.move(0.0, -0.1, velocity=5.0, accel_time=0.5, t0=0.0)
    assert short.position(short.duration) == -0.1 and short.duration < 1.0


def test_series_over_channel_access_matches_in_process(RE, experiment, ca, tmp_path):
    exp = experiment.directory
    devices = epics_beamline(exp, ca)
    from bluesky.run_engine import call_in_bluesky_event_loop

    call_in_bluesky_event_loop(connect_epics_beamline(devices, timeout=10.0))
    assert isinstance(devices, RotationBeamline)
    assert isinstance(devices.detector, FlyingDetector)
    assert isinstance(devices.goniometer, RotationStage)
    assert isinstance(devices.goniometer.phi, FlyingAxis)
    assert isinstance(devices.temperature, TemperatureController)
    uids, _ = run_series(RE, devices, exp)
    assert len(uids) == 3
    sample_dir = exp / NAMES["sample"] / NAMES["label"]
    for t in TEMPERATURES:
        scan = f"{int(t)}K"
        scan_file = sample_dir / f"{NAMES['sample']}_{scan}.nxs"
        raw = sample_dir / scan / "f1.h5"
        with h5py.File(raw, "r") as f:  # written by the IOC
            assert f["/entry/data/data"].shape == (40, *SHAPE)
            phi = f["/entry/instrument/NDAttributes/phi"][()]
            # The motor flew at one frame per step; the frames start when the software
            # trigger (Acquire over CA) arrives, after phi passed its start: the latency
            # shows in phi[0] (at most a few frames) and is recorded, not hidden.
            inside = phi[1:] <= PHI["phi_end"]  # past it phi decelerates (ramp-down)
            np.testing.assert_allclose(np.diff(phi)[inside], PHI["phi_step"], atol=0.05)
            assert 0.0 <= phi[0] < 5 * PHI["phi_step"], phi[0]
            assert np.all(f["/entry/instrument/NDAttributes/MCS1"][()] > 1000)
        with h5py.File(scan_file, "r") as f:
            link = f["f1/data"].get("data", getlink=True)
            assert isinstance(link, h5py.ExternalLink)
            assert not os.path.isabs(link.filename) and link.filename.endswith("f1.h5")
            assert f["f1/data/data"].shape == (40, *SHAPE)
            logs = f["f1/instrument/logs"]
            key = next(k for k in logs if k.startswith("temperature"))
            assert abs(float(logs[key][-1]) - t) < 1.0, (key, logs[key][()])
    over_ca = peaks(sample_dir / "Si_300K.nxs", sample_dir / "300K" / "f1.h5")
    assert len(over_ca) >= 3

    # The same series with the in-process simulated devices finds the same peaks.
    from nxrefine_bs.experiment import Experiment

    sim_exp = Experiment.create(tmp_path / "analysis-sim", "exp", beamline="sim").directory
    sim = make_sim_beamline(
        sim_exp, detector="small", shape=SHAPE, frame_time=FRAME_TIME, seed=0,
        temperature_time_constant=0.01,
    )  # fmt: skip
    run_series(RE, sim, sim_exp)
    in_process = peaks(sim_exp / NAMES["sample"] / NAMES["label"] / "Si_300K.nxs")
    # Compare the peaks both rotations covered (the CA one starts a little later).
    lo, hi = over_ca[:, 2].min() - 1.0, in_process[:, 2].max() + 1.0
    common = in_process[(in_process[:, 2] > lo + 2.0) & (in_process[:, 2] < hi - 2.0)]
    assert len(common) >= 3, (in_process, over_ca)
    matched = 0
    for x, y, phi in common:
        d = np.abs(over_ca - (x, y, phi))
        matched += bool(np.any((d[:, 0] < 1.5) & (d[:, 1] < 1.5) & (d[:, 2] < 1.5)))
    assert matched >= 0.8 * len(common), (common, over_ca)


def test_down_ioc_is_a_clean_error_naming_the_pvs(RE, experiment, ca):
    from bluesky.run_engine import call_in_bluesky_event_loop

    devices = epics_beamline(experiment.directory, "NOSUCHIOC:")
    named = r"NOSUCHIOC:chi\.ACCL.*NOSUCHIOC:TC:SP"
    with pytest.raises(DeviceConnectionError, match=named) as info:
        call_in_bluesky_event_loop(connect_epics_beamline(devices, timeout=0.5))
    assert "IOC running" in str(info.value)


PROFILE_CODE = """
uids = RE(temperature_series(bl, [300.0, 295.0], **SCAN, sample="Si", label="xtal1",
                             phi_start=0.0, phi_end=30.0, phi_step=1.0))
import h5py
with h5py.File(writer.last_scan_file, "r") as f:
    print("SCAN", writer.last_scan_file.name, f["f1/data/data"].shape[0])
print("TILED", all(uid in tiled for uid in uids), len(uids))
print("REDUCED", len(reduction.wait(60)), reduction.errors)
"""


@pytest.mark.parametrize(
    "api", ["ophyd-async", pytest.param("ophyd", marks=pytest.mark.slow)]
)  # v1 itself: test_v1_adapter_flies_a_rotation_over_channel_access
def test_profile_epics_runs_a_series(experiment, ioc, tmp_path, api):
    """``profiles/profile_epics`` connects to the prefix of ``[instrument]`` and scans."""
    import shutil

    from nxrefine_bs.settings import experiment_settings_path, update_settings

    ipython = shutil.which("ipython", path=str(Path(sys.executable).parent))
    if ipython is None:
        pytest.skip("IPython is not installed (pip install -e .[test])")
    update_settings(experiment_settings_path(experiment.directory), {"instrument.pv_prefix": ioc})
    profile = Path(__file__).resolve().parents[1] / "profiles" / "profile_epics"
    env = {
        **os.environ,
        "NXREFINE_BS_EXPERIMENT": str(experiment.directory),
        "NXREFINE_BS_DETECTOR_SHAPE": "96,128",
        "NXREFINE_BS_FRAME_TIME": str(FRAME_TIME),
        "NXREFINE_BS_REDUCE": "max",
        "NXREFINE_BS_PROGRESS": "0",
        "NXREFINE_BS_DEVICE_API": api,
        "IPYTHONDIR": str(tmp_path / "ipython"),
    }
    proc = subprocess.run(
        [ipython, f"--profile-dir={profile}", "--no-banner", "-c", PROFILE_CODE],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines() if line}
    assert lines["SCAN"] == ["Si_295K.nxs", "30"], proc.stdout
    assert lines["TILED"] == ["True", "2"], proc.stdout
    assert lines["REDUCED"][:2] == ["2", "[]"], proc.stdout
    assert f"phi={ioc}phi" in proc.stdout  # the banner names the PVs
    assert f"({api} over Channel Access)" in proc.stdout


@pytest.mark.slow  # the clean error itself: test_down_ioc_is_a_clean_error_naming_the_pvs
def test_profile_epics_without_ioc_names_the_pvs(experiment, ioc, tmp_path):
    import shutil

    from nxrefine_bs.settings import experiment_settings_path, update_settings

    ipython = shutil.which("ipython", path=str(Path(sys.executable).parent))
    if ipython is None:
        pytest.skip("IPython is not installed (pip install -e .[test])")
    update_settings(
        experiment_settings_path(experiment.directory),
        {"instrument.pv_prefix": "DOWN:", "instrument.pv_phi": "DOWN:GON:PHI"},
    )
    profile = Path(__file__).resolve().parents[1] / "profiles" / "profile_epics"
    env = {
        **os.environ,
        "NXREFINE_BS_EXPERIMENT": str(experiment.directory),
        "NXREFINE_BS_CONNECT_TIMEOUT": "0.5",
        "IPYTHONDIR": str(tmp_path / "ipython"),
    }
    proc = subprocess.run(
        [ipython, f"--profile-dir={profile}", "--no-banner", "-c", "print('READY', session)"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert not any(line.startswith("READY ") for line in proc.stdout.splitlines())
    assert "DeviceConnectionError" in out and "DOWN:GON:PHI." in out, out[-3000:]


# ---------------------------------------------------------------------- ophyd v1, step scans
V1_PHI = {"phi_start": 0.0, "phi_end": 12.0, "phi_step": 1.0}  # 12 frames


def v1_beamline(exp: Path, prefix: str):
    model = detector_model("small", SHAPE)
    return make_epics_beamline(
        exp, prefix=prefix, geometry=default_geometry(model), detector_model=model, api="ophyd"
    )


def _destroy_v1(devices) -> None:
    """Drop the v1 devices' CA channels (ophyd keeps searching for unanswered PVs)."""
    for device in devices.all_devices():
        getattr(device, "device", device).destroy()


def _text(dataset) -> str:
    value = dataset[()]
    return value.decode() if isinstance(value, bytes) else str(value)


def check_scan_file(exp: Path, scan: str, n: int) -> None:
    """The IOC wrote ``f1.h5``; the scan file links it relatively and reports success."""
    sample_dir = exp / NAMES["sample"] / NAMES["label"]
    raw = sample_dir / scan / "f1.h5"
    with h5py.File(raw, "r") as f:  # written by the IOC
        assert f["/entry/data/data"].shape == (n, *SHAPE)
        assert np.all(f["/entry/instrument/NDAttributes/MCS1"][()] > 1000)
    with h5py.File(sample_dir / f"{NAMES['sample']}_{scan}.nxs", "r") as f:
        link = f["f1/data"].get("data", getlink=True)
        assert isinstance(link, h5py.ExternalLink)
        assert link.filename == f"{scan}/f1.h5"  # relative to the scan file
        assert f["f1/data/data"].shape == (n, *SHAPE)
        acq = f["f1/acquisition"]
        assert _text(acq["status"]) == "success", _text(acq["reason"]) if "reason" in acq else ""
        assert int(acq["num_frames"][()]) == n
        assert np.all(f["f1/monitor/MCS1"][()] > 1000) and f["f1/monitor/MCS1"].shape == (n,)
        phi = f["f1/instrument/goniometer/phi"][()]
        assert phi.shape == (n,)


def test_v1_adapter_flies_a_rotation_over_channel_access(RE, experiment, ca):
    """ophyd v1 devices (EpicsMotor, a stock v1 areaDetector + HDF5 plugin, EpicsSignals)
    behind the thin adapter fly a rotation against the IOC."""
    from bluesky.run_engine import call_in_bluesky_event_loop

    from nxrefine_bs.devices.epics_v1 import AreaDetectorV1Adapter, FlyingEpicsMotor
    from nxrefine_bs.devices.protocols import RotationDetector
    from nxrefine_bs.plans import rotation_scan

    exp = experiment.directory
    devices = v1_beamline(exp, ca)
    try:
        call_in_bluesky_event_loop(connect_epics_beamline(devices, timeout=10.0))
        assert isinstance(devices.detector, AreaDetectorV1Adapter)
        assert isinstance(devices.goniometer.phi, FlyingEpicsMotor)
        assert isinstance(devices.detector, FlyingDetector)
        assert isinstance(devices.detector, RotationDetector)
        assert isinstance(devices.goniometer.phi, FlyingAxis)
        assert isinstance(devices.temperature, TemperatureController)
        writer = NeXusScanWriter()
        RE.subscribe(writer)
        velocity = devices.goniometer.phi.velocity.get()
        (uid,) = RE(
            rotation_scan(
                devices, experiment_dir=exp, **NAMES, scan="fly", frame_time=FRAME_TIME, **V1_PHI
            )
        )
        assert writer.wait_run(uid, timeout=60) == "success"
        check_scan_file(exp, "fly", 12)
        with h5py.File(exp / NAMES["sample"] / NAMES["label"] / "fly" / "f1.h5", "r") as f:
            phi = f["/entry/instrument/NDAttributes/phi"][()]
        # phi flew at one step per frame while it cruised (up to the end of the range the
        # plan asked for; the software trigger lags the motor a little, so the last frames
        # may fall into the ramp-down); kickoff waited until phi was at speed at the start
        cruising = phi[1:] <= V1_PHI["phi_end"] - 0.5 * V1_PHI["phi_step"]
        assert cruising.sum() >= 4, phi
        np.testing.assert_allclose(np.diff(phi)[cruising], 1.0, atol=0.05)
        assert -0.01 <= phi[0] < 5 * V1_PHI["phi_step"], phi
        assert devices.goniometer.phi.velocity.get() == pytest.approx(velocity)  # restored
        # the v1 temperature controller: set() finishes once T is within TOL of the set point
        import bluesky.plan_stubs as bps

        RE(bps.mv(devices.temperature, 297.0))
        tolerance = devices.temperature.tolerance.get()
        assert abs(devices.temperature.readback.get() - 297.0) <= tolerance
        assert devices.temperature.setpoint.get() == pytest.approx(297.0)
    finally:
        _destroy_v1(devices)


@pytest.mark.parametrize("api", ["ophyd", "ophyd-async"])
def test_step_rotation_over_channel_access(RE, experiment, ca, api):
    """step_rotation_scan moves phi, triggers and reads frame by frame over CA."""
    from bluesky.run_engine import call_in_bluesky_event_loop

    from nxrefine_bs.plans import step_rotation_scan

    exp = experiment.directory
    model = detector_model("small", SHAPE)
    devices = make_epics_beamline(
        exp, prefix=ca, geometry=default_geometry(model), detector_model=model, api=api
    )
    try:
        call_in_bluesky_event_loop(connect_epics_beamline(devices, timeout=10.0))
        writer = NeXusScanWriter()
        RE.subscribe(writer)
        docs: list[tuple[str, dict]] = []
        RE.subscribe(lambda name, doc: docs.append((name, doc)))
        phi = {"phi_start": 2.0, "phi_end": 6.0, "phi_step": 1.0}  # 4 frames
        (uid,) = RE(
            step_rotation_scan(
                devices, experiment_dir=exp, **NAMES, scan="step", frame_time=FRAME_TIME, **phi
            )
        )
        assert writer.wait_run(uid, timeout=60) == "success"
        check_scan_file(exp, "step", 4)
        primary = {d["uid"] for n, d in docs if n == "descriptor" and d["name"] == "primary"}
        events = [d for n, d in docs if n == "event" and d["descriptor"] in primary]
        assert len(events) == 4
        key = next(k for k in events[0]["data"] if k.endswith("phi") and k != "phi")
        np.testing.assert_allclose([e["data"][key] for e in events], [2, 3, 4, 5], atol=1e-3)
        with h5py.File(exp / NAMES["sample"] / NAMES["label"] / "step" / "f1.h5", "r") as f:
            # each frame was exposed with phi at rest at its step
            np.testing.assert_allclose(
                f["/entry/instrument/NDAttributes/phi"][()], [2, 3, 4, 5], atol=1e-3
            )
    finally:
        if api == "ophyd":
            _destroy_v1(devices)


def test_v1_down_ioc_is_a_clean_error_naming_the_pvs(RE, experiment, ca):
    from bluesky.run_engine import call_in_bluesky_event_loop

    devices = v1_beamline(experiment.directory, "NOSUCHV1:")
    try:
        with pytest.raises(DeviceConnectionError) as info:
            call_in_bluesky_event_loop(connect_epics_beamline(devices, timeout=0.5))
        message = str(info.value)
        for pv in ("NOSUCHV1:phi.VAL", "NOSUCHV1:TC:SP", "NOSUCHV1:DET:cam1:Acquire"):
            assert pv in message, message
        assert "ophyd v1" in message and "IOC running" in message
        # a plan started with devices that never connected fails the same way, before
        # anything moves or any run opens
        from nxrefine_bs.plans import step_rotation_scan

        devices.connect_timeout = 0.5
        docs: list[str] = []
        RE.subscribe(lambda name, doc: docs.append(name))
        with pytest.raises(DeviceConnectionError, match=r"NOSUCHV1:phi\.VAL"):
            RE(
                step_rotation_scan(
                    devices, experiment_dir=experiment.directory, **NAMES, scan="down",
                    frame_time=FRAME_TIME, **V1_PHI,
                )
            )  # fmt: skip
        assert docs == []
    finally:
        _destroy_v1(devices)
