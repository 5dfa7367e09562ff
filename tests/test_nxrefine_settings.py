"""NXRefine experiments open as they are.

The settings files below are written by hand in NXRefine's own formats (inventory §3):
``ConfigParser(allow_no_value=True)`` output with bare keys for empty values and
``%g`` numbers, as NXRefine 0.1.1 (``first``/``last``/``qmin``/``qmax`` in
``[nxreduce]``, ``monitor = monitor2``, ``[nxrefine] geometry``) and NXRefine main
(``[server]`` keys ``concurrent``/``run_command``/``template``/``cctw``, ``[nodes]``,
``first_frame``/``last_frame``) write them.  They are read, kept on rewrite, and drive
real reduction steps on a simulated scan.
"""

from __future__ import annotations

import configparser
import logging
import shutil

import h5py
import numpy as np
import pytest

from nxrefine_bs import settings as st
from nxrefine_bs.experiment import Experiment
from nxrefine_bs.nexus import nxreduce as nr
from nxrefine_bs.nexus.monitors import find_monitor
from nxrefine_bs.nexus.provenance import process_done, read_process
from nxrefine_bs.reduce import maximum, transform
from nxrefine_bs.reduce.steps import run_step
from nxrefine_bs.simulation.scan import make_simulated_scan

NXREFINE_MAIN_SERVER = """\
[server]
type = multicore
cores = 4
concurrent = True
run_command
template
cctw = cctw

[nodes]
node1
node2

[instrument]
source = APS
instrument = sim
raw_home
raw_path
analysis_home
analysis_path = nxrefine
experiment

[nxrefine]
wavelength = 0.141
distance = 650
detector_orientation = -y +z -x
phi = -5
phi_end = 360
phi_step = 0.1
chi = -90
omega = 0
theta = 0
x = 0
y = 0
nsteps = 3
frame_rate = 10

[nxreduce]
threshold = 50000
min_pixels = 10
first_frame = 10
last_frame = 3640
polar_max = 10
hkl_tolerance = 0.05
monitor = MCS1
norm = 30000
sample_transmission = True
polarization = 0.99
radius = 0.2
mask_t1 = 2
mask_h1 = 11
mask_t2 = 0.8
mask_h2 = 51
scan_path = /entry/sample/temperature
scan_units = K
"""

NXREFINE_011 = """\
[server]
type = multicore
cores = 4
concurrent = True
run_command
template
cctw = cctw

[instrument]
source = APS
instrument = sim

[nxrefine]
wavelength = 0.141
distance = 650
geometry = default
phi = -5
phi_end = 360
phi_step = 0.1
chi = -90
omega = 0
theta = 0
x = 0
y = 0
nsteps = 3
frame_rate = 10

[nxreduce]
threshold = 50000
min_pixels = 10
first = 3
last = 27
polar_max = 10
hkl_tolerance = 0.05
monitor = monitor2
norm = 30000
polarization = 0.99
qmin = 6
qmax = 16
radius = 0.2
"""


def _ini(path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, allow_no_value=True)
    parser.optionxform = str
    parser.read(path)
    return parser


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_nxrefine_main_server_file(tmp_path, _isolated_settings, caplog):
    path = _isolated_settings
    path.write_text(NXREFINE_MAIN_SERVER)
    with caplog.at_level(logging.WARNING, logger="nxrefine_bs.settings"):
        values = st.load_server_settings()
        st.load_server_settings()  # a second read warns no more
    assert values["server"]["cores"] == 4 and values["server"]["type"] == "multicore"
    assert values["instrument"]["source"] == "APS" and values["instrument"]["raw_home"] is None
    assert values["nxrefine"]["chi"] == -90.0 and values["nxrefine"]["wavelength"] == 0.141
    assert values["nxreduce"]["norm"] == 30000.0 and values["nxreduce"]["last_frame"] == 3640
    warned = _warnings(caplog)
    for key in ("concurrent", "run_command", "template", "cctw", "[nodes]"):
        assert sum(key in w for w in warned) == 1, (key, warned)
    # editing the file keeps NXRefine's entries, bare keys still bare
    st.update_settings(path, {"nxreduce.threshold": 20000})
    parser = _ini(path)
    assert parser["nxreduce"]["threshold"] == "20000.0"
    assert parser["server"]["cctw"] == "cctw" and parser["server"]["concurrent"] == "True"
    assert parser.has_option("server", "run_command")
    assert parser["server"]["run_command"] is None
    assert parser.options("nodes") == ["node1", "node2"]
    # an experiment made from it leaves out the server-only sections, as NXRefine does
    exp = Experiment.create(tmp_path / "analysis", "exp", beamline="sim", settings_source=path)
    parser = _ini(st.experiment_settings_path(exp.directory))
    assert {"server", "nodes"}.isdisjoint(parser.sections())
    assert st.load_experiment_settings(exp.directory)["nxreduce"]["threshold"] == 20000


def test_nxrefine_experiment_file_with_server_section(tmp_path, server_settings, caplog):
    exp = tmp_path / "exp"
    (exp / "tasks").mkdir(parents=True)
    text = NXREFINE_MAIN_SERVER.replace("threshold = 50000", "threshold = 1234")
    st.experiment_settings_path(exp).write_text(text)
    with caplog.at_level(logging.WARNING, logger="nxrefine_bs.settings"):
        values = st.load_experiment_settings(exp)
    assert values["nxreduce"]["threshold"] == 1234
    assert any("[server]" in w and "kept" in w for w in _warnings(caplog))
    got = nr.resolve_parameters(["threshold", "norm"], experiment_dir=exp)
    assert got == {"threshold": 1234.0, "norm": 30000.0}


def test_nxrefine_011_names_map_to_ours(tmp_path, server_settings, caplog):
    path = tmp_path / "settings.ini"
    path.write_text(NXREFINE_011)
    with caplog.at_level(logging.WARNING, logger="nxrefine_bs.settings"):
        values = st.read_settings(path)
    reduce_ = values["nxreduce"]
    assert (reduce_["first_frame"], reduce_["last_frame"]) == (3, 27)  # first/last
    assert reduce_["monitor"] == "monitor2" and reduce_["norm"] == 30000
    warned = " ".join(_warnings(caplog))
    for key in ("qmin", "qmax", "geometry", "concurrent"):
        assert key in warned
    assert "first " not in warned  # a known NXRefine name, not an unknown key
    # bare keys are empty values: text settings empty, numbers keep their defaults
    path.write_text(
        NXREFINE_011.replace("monitor = monitor2", "monitor").replace("norm = 30000", "norm")
    )
    values = st.read_settings(path)["nxreduce"]
    assert values["monitor"] == "" and values["norm"] == st.get_spec("nxreduce", "norm").default
    # a canonical key in the same file wins over the 0.1.1 name
    path.write_text(NXREFINE_011.replace("first = 3", "first = 3\nfirst_frame = 5"))
    assert st.read_settings(path)["nxreduce"]["first_frame"] == 5


@pytest.fixture
def nxrefine_scan(tmp_path, server_settings):
    """A simulated scan inside an experiment whose settings file is NXRefine 0.1.1's."""
    sim = make_simulated_scan(tmp_path / "exp", n_frames=30)
    exp_dir = sim.scan_file.parent.parent.parent
    (exp_dir / "tasks").mkdir(exist_ok=True)
    st.experiment_settings_path(exp_dir).write_text(NXREFINE_011)
    return sim


def test_steps_run_with_an_nxrefine_011_experiment(nxrefine_scan):
    scan_file = nxrefine_scan.scan_file
    out = run_step("max", scan_file, "f1")
    assert (out["first"], out["last"]) == (3, 27)  # 0.1.1's first/last, [first, last)
    with h5py.File(scan_file, "r") as f:
        record = read_process(f["f1"], "nxmax")
        assert record["parameters"]["monitor"] == "monitor2"
        # no monitor2 group in this scan: the entry's NXmonitor is used, and weights
        # the transmission (it would be flat without a monitor)
        assert find_monitor(f["f1"], "monitor2", 30)[0] == "monitor/MCS1"
    # the parameters used are where NXRefine reads them
    stored = nr.read_parameters(scan_file)
    assert (stored["first_frame"], stored["last_frame"]) == (3, 27)
    assert stored["monitor"] == "monitor2" and stored["norm"] == 30000


def test_monitor_found_the_same_way_by_every_step(nxrefine_scan):
    """NXRefine's pre-2026 ``monitor1``/``monitor2`` groups, named by the setting."""
    scan_file = nxrefine_scan.scan_file
    with h5py.File(scan_file, "r+") as f:
        fe = f["f1"]
        mcs1 = fe["monitor/MCS1"][()]
        del fe["monitor"]
        for name, values in (("monitor1", mcs1 * 0.5), ("monitor2", mcs1)):
            g = fe.create_group(name)
            g.attrs["NX_class"] = "NXmonitor"
            g.attrs["signal"] = "data"
            g.attrs["axes"] = "frame_number"
            g.create_dataset("data", data=values)
            g.create_dataset("frame_number", data=np.arange(30, dtype=np.int32))
    with h5py.File(scan_file, "r") as f:
        fe = f["f1"]
        assert find_monitor(fe, "monitor2", 30)[0] == "monitor2/data"
        assert find_monitor(fe, "monitor1", 30)[0] == "monitor1/data"
        w_max = maximum.read_monitor(fe, "monitor2", 30000.0, 30)
        w_tr = transform.frame_weights(fe, 30, norm=30000.0, first=0, last=30, monitor="monitor2")
        w_1 = transform.frame_weights(fe, 30, norm=30000.0, first=0, last=30, monitor="monitor1")
    assert w_max is not None
    np.testing.assert_allclose(w_tr, w_max)  # the same lookup and smoothing in both steps
    np.testing.assert_allclose(w_1, 0.5 * w_max, rtol=1e-9)  # ... and the group named wins


def test_step_recognises_nxrefine_results(nxrefine_scan):
    """A rotation already reduced by NXRefine (bare NXprocess in the entry) is done."""
    scan_file = nxrefine_scan.scan_file
    with h5py.File(scan_file, "r+") as f:
        proc = f["f1"].create_group("nxmax")
        proc.attrs["NX_class"] = "NXprocess"
        proc.create_dataset("program", data="nxmax")
        proc.create_dataset("version", data="nxrefine v0.1.1")
    out = run_step("max", scan_file, "f1")
    assert out["skipped"] is True
    with h5py.File(scan_file, "r") as f:
        assert process_done(f["f1"], "nxmax") and "frame_sums" not in f["f1"]


def test_parent_nxscans_settings_are_read(tmp_path, server_settings):
    """NXRefine main keeps shared parameters in the parent's /entry/nxscans/settings."""
    sim = make_simulated_scan(tmp_path / "exp", n_frames=30)
    parent = sim.scan_file.with_name("sim_scans.nxs")
    shutil.copy(sim.scan_file, parent)
    with h5py.File(parent, "r+") as f:
        settings = f["entry"].require_group("nxscans").require_group("settings")
        settings.attrs["NX_class"] = "NXparameters"
        settings.create_dataset("threshold", data=777.0)
        settings.create_dataset("first_frame", data=4)
    with h5py.File(sim.scan_file, "r+") as f:
        f["entry"].require_group("nxscans").create_dataset("parent", data=parent.name)
    got = nr.resolve_parameters(["threshold", "first_frame"], scan_file=sim.scan_file)
    assert got == {"threshold": 777.0, "first_frame": 4}


def test_every_group_that_claims_axes_has_them(tmp_path, server_settings):
    """Scan files from the simulator, from sum-scans and the reduction outputs."""
    from nexusformat.nexus import nxload

    from nxrefine_bs.nexus.monitors import add_missing_axes
    from nxrefine_bs.nexus.sumscans import sum_scans

    a = make_simulated_scan(tmp_path / "exp", n_frames=20, scan="300K", seed=0)
    b = make_simulated_scan(tmp_path / "exp", n_frames=20, scan="300Kb", seed=1)
    summed = sum_scans([a.scan_file, b.scan_file], "300K_sum")
    run_step("max", a.scan_file, "f1", first=0, last=20)
    for path in (a.scan_file, summed, a.scan_dir / "f1.h5"):
        with h5py.File(path, "r") as f:
            assert add_missing_axes(f, create=False) == [], path
    # an older file whose monitor names an axis it lacks is repaired in place
    with h5py.File(a.scan_file, "r+") as f:
        del f["f1/monitor/frame_number"]
        assert add_missing_axes(f, create=False) == ["/f1/monitor/frame_number"]
        assert add_missing_axes(f) == ["/f1/monitor/frame_number"]
        np.testing.assert_array_equal(f["f1/monitor/frame_number"][()], np.arange(20))
    root = nxload(str(a.scan_file))
    assert [ax.nxname for ax in root["f1/monitor"].nxaxes] == ["frame_number"]


def test_simulated_and_configured_scans_carry_pyfai_parameters(tmp_path, configuration):
    """``instrument/calibration/refinement/parameters`` reproduce each entry's 2-theta."""
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    from nxrefine_bs.nexus.geometry_io import PYFAI_PARAMETER_KEYS, read_geometry
    from nxrefine_bs.pyfai_geometry import two_theta_image

    sim = make_simulated_scan(tmp_path / "exp", n_frames=4, omegas=(0.0, 15.0))
    for path, entries in ((sim.scan_file, ("f1", "f2")), (configuration, ("f1", "f2"))):
        with h5py.File(path, "r") as f:
            for name in entries:
                proc = f[f"{name}/instrument/calibration/refinement"]
                assert proc["program"][()].decode() == "pyFAI"
                pars = {k: proc[f"parameters/{k}"][()] for k in PYFAI_PARAMETER_KEYS}
                geometry = read_geometry(f[name])
                ai = AzimuthalIntegrator(
                    dist=pars["Distance"],
                    poni1=pars["Poni1"],
                    poni2=pars["Poni2"],
                    rot1=pars["Rot1"],
                    rot2=pars["Rot2"],
                    rot3=pars["Rot3"],
                    pixel1=pars["PixelSize1"],
                    pixel2=pars["PixelSize2"],
                    wavelength=pars["Wavelength"],
                )
                tth = ai.twoThetaArray(shape=tuple(geometry.shape))
                np.testing.assert_allclose(np.degrees(tth), two_theta_image(geometry), atol=1e-4)
                assert pars["Wavelength"] == pytest.approx(geometry.wavelength * 1e-10)


def test_nxrefine_server_types_run_locally(_isolated_settings):
    from nxrefine_bs.workflow.executor import LocalExecutor, make_executor

    _isolated_settings.write_text(NXREFINE_MAIN_SERVER)  # type = multicore, cores = 4
    executor = make_executor()
    try:
        assert isinstance(executor, LocalExecutor)
    finally:
        executor.shutdown()
