"""Temperature in the simulation: Debye-Waller, TDS, thermal expansion and a CDW superlattice.

The physics test reduces simulated frames (the demo's crystal model, :data:`DEMO_THERMAL`)
with the real transform step and measures the superlattice reflections in the result:
absent above Tc, growing on cooling as the square of the order parameter.  The device
test checks that the temperature a plan sets is the one the detector renders.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from nxrefine_bs.demo import DEMO_THERMAL, superlattice_signal
from nxrefine_bs.devices import make_sim_beamline
from nxrefine_bs.errors import NXRefineBSError
from nxrefine_bs.plans.rotation import temperature_series
from nxrefine_bs.reduce.steps import run_step
from nxrefine_bs.simulation.frames import RotationSimulator
from nxrefine_bs.simulation.scan import make_simulated_scan, small_test_setup
from nxrefine_bs.simulation.thermal import ThermalModel

GRID = (-3.0, 0.1, 3.0)


def test_order_parameter_debye_waller_and_expansion():
    m = ThermalModel(cdw_tc=200.0, cdw_beta=0.5, expansion=1e-5)
    assert m.order_parameter(250.0) == 0.0 and m.order_parameter(200.0) == 0.0
    assert m.order_parameter(150.0) == pytest.approx(0.5)  # (1 - 150/200)^0.5
    etas = [m.order_parameter(t) for t in (190.0, 150.0, 100.0, 10.0)]
    assert etas == sorted(etas) and 0 < etas[0] < etas[-1] < 1
    # <u^2> ∝ coth(theta/2T): linear in T when hot, zero-point motion when cold
    b = [m.b_iso(0.5, t) for t in (5.0, 50.0, 150.0, 300.0, 600.0)]
    assert b == sorted(b) and b[3] == pytest.approx(0.5)
    assert b[0] == pytest.approx(m.b_iso(0.5, 1.0), rel=1e-6) and b[0] > 0.1  # zero point
    assert b[4] / b[3] == pytest.approx(2.0, rel=0.1)
    assert m.cell((5.43, 5.43, 5.43, 90, 90, 90), 100.0)[0] == pytest.approx(5.43 * (1 - 2e-3))
    with pytest.raises(NXRefineBSError, match="incommensurate"):
        ThermalModel(cdw_vectors=((1.0, 0.0, 0.0),))
    with pytest.raises(NXRefineBSError, match="> 0 K"):
        m.order_parameter(-5.0)


def test_frames_change_with_temperature_and_bragg_peaks_follow_debye_waller():
    geometry, crystal, detector, n = small_test_setup(n_frames=40)
    sims = {
        t: RotationSimulator(geometry, crystal, detector, n, temperature=t, thermal=DEMO_THERMAL)
        for t in (300.0, 100.0)
    }
    plain = RotationSimulator(geometry, crystal, detector, n, temperature=100.0)
    hot, cold = sims[300.0], sims[100.0]
    assert not np.array_equal(hot.frame(10), cold.frame(10))
    no_model = RotationSimulator(geometry, crystal, detector, n)
    assert np.array_equal(plain.frame(10), no_model.frame(10))  # recorded only
    bragg_hot = hot.peaks.select(np.all(hot.peaks.hkl == np.rint(hot.peaks.hkl), axis=1))
    assert len(bragg_hot) == len(hot.peaks)  # above Tc: no satellites
    satellite = np.any(cold.peaks.hkl != np.rint(cold.peaks.hkl), axis=1)
    assert satellite.any()
    frac = np.abs(cold.peaks.hkl[satellite] - np.floor(cold.peaks.hkl[satellite]))
    assert np.all(np.isclose(frac, 0.5) | np.isclose(frac, 0.0))
    assert np.all(np.isclose(frac, 0.5).sum(axis=1) == 2)  # (1/2, 0, 1/2)-type
    # Debye-Waller: cooling strengthens high-angle Bragg peaks more than low-angle ones
    common = {tuple(h): i for i, h in enumerate(hot.peaks.hkl)}
    pairs = [(common[tuple(h)], j) for j, h in enumerate(cold.peaks.hkl) if tuple(h) in common]
    i, j = np.array(pairs).T
    gain = cold.peaks.intensity[j] / hot.peaks.intensity[i]
    q = np.linalg.norm(hot.peaks.hkl[i] @ crystal.B.T, axis=1)
    assert np.all(gain > 1.0)
    assert np.corrcoef(q, np.log(gain))[0, 1] > 0.9


def test_superlattice_intensity_follows_the_order_parameter(tmp_path, server_settings):
    """Simulated frames -> transform step -> superlattice / Bragg vs T (the demo's model)."""
    geometry, crystal, detector, n = small_test_setup(n_frames=360)
    ratios = {}
    for t in (250.0, 150.0, 50.0):
        scan = make_simulated_scan(
            tmp_path, scan=f"{t:g}K", temperature=t, geometry=geometry, crystal=crystal,
            detector=detector, n_frames=n, write_truth_orientation=True,
            thermal=DEMO_THERMAL,
        )  # fmt: skip
        result = run_step(
            "transform", scan.scan_file, "f1", qh=GRID, qk=GRID, ql=GRID, first=0, last=n
        )
        superlattice, bragg = superlattice_signal(result["file"])
        assert bragg > 0
        ratios[t] = superlattice / bragg
    eta2 = {t: DEMO_THERMAL.order_parameter(t) ** 2 for t in ratios}
    assert eta2[250.0] == 0.0
    assert abs(ratios[250.0]) < 0.05 * ratios[150.0]  # absent above Tc (noise only)
    assert 0 < ratios[150.0] < ratios[50.0]  # appear and grow on cooling
    # first-order satellites: intensity ∝ eta^2
    assert ratios[50.0] / ratios[150.0] == pytest.approx(eta2[50.0] / eta2[150.0], rel=0.2)


def test_temperature_reaches_the_simulator_through_the_devices(RE, experiment):
    """A temperature series sets the controller; the detector renders that temperature."""
    exp_dir = experiment.directory
    bl = make_sim_beamline(
        exp_dir, detector="small", shape=(48, 64), frame_time=0.005, seed=7,
        temperature_time_constant=0.01, simulator_kwargs={"thermal": DEMO_THERMAL},
    )  # fmt: skip
    rendered = []
    original = bl.detector.make_simulator

    async def record(file_name):
        sim = await original(file_name)
        rendered.append(sim)
        return sim

    bl.detector.make_simulator = record
    RE(
        temperature_series(
            bl, [250.0, 100.0], experiment_dir=exp_dir, sample="TiSe2", label="xtal1",
            phi_start=0.0, phi_end=4.0, phi_step=1.0,
        )
    )  # fmt: skip
    assert [round(s.temperature) for s in rendered] == [250, 100]
    assert rendered[0].order_parameter == 0.0 < rendered[1].order_parameter
    frames = {}
    for scan in ("250K", "100K"):
        with h5py.File(exp_dir / "TiSe2" / "xtal1" / scan / "f1.h5", "r") as f:
            frames[scan] = f["entry/data/data"][()]
    assert frames["250K"].shape == frames["100K"].shape == (4, 48, 64)
    assert not np.array_equal(frames["250K"], frames["100K"])
