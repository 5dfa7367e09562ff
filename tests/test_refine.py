"""Tests of nxrefine_bs.reduce.refine: least squares on simulated peaks and the refine step."""

from __future__ import annotations

import hashlib
import shutil

import h5py
import numpy as np
import pytest

from nxrefine_bs.errors import IndexingError, RefinementError
from nxrefine_bs.geometry import random_rotation
from nxrefine_bs.nexus.geometry_io import read_geometry, read_orientation, write_geometry
from nxrefine_bs.nexus.h5tools import nx_group, write_field
from nxrefine_bs.nexus.provenance import read_process
from nxrefine_bs.reduce.lattice import Lattice, read_lattice
from nxrefine_bs.reduce.orient import auto_index, misorientation, peak_vectors
from nxrefine_bs.reduce.refine import PeakList, refine_peaks, run
from nxrefine_bs.reduce.steps import get_step
from nxrefine_bs.simulation.crystal import SimCrystal
from nxrefine_bs.simulation.peaks import (
    PILATUS_2M_ROTATION,
    TEST_SYSTEMS,
    garbage_peaks,
    predicted_peaks,
)
from nxrefine_bs.simulation.scan import make_simulated_scan

# The shared Pilatus-2M-like set-up and crystals (nxrefine_bs.simulation.peaks).
GEOM = PILATUS_2M_ROTATION
SYSTEMS = TEST_SYSTEMS
PERTURBATION = {"distance": 2.0, "beam_center_x": 1.5, "yaw": 0.2}


def simulated(system, seed, garbage=0.1):
    cell, centring, sg = SYSTEMS[system]
    rng = np.random.default_rng(seed)
    crystal = SimCrystal(cell, random_rotation(rng), centring)
    x, y, z, h = predicted_peaks(crystal, rng)
    n_bad = int(garbage * len(x) / (1 - garbage))
    gx, gy, gz = garbage_peaks(n_bad, rng)
    peaks = PeakList(np.r_[x, gx], np.r_[y, gy], np.r_[z, gz])
    return crystal, Lattice(*cell, space_group=sg), peaks, len(x), h


def check_indexing(res, n_true, h_true, lattice):
    """>95 % of the true peaks indexed within 0.05 (1/A and r.l.u.) on an equivalent hkl."""
    hkl = res.hkl[:n_true]
    assert np.mean(res.diff[:n_true] <= 0.05) > 0.95
    assert np.mean(np.all(np.abs(hkl - np.rint(hkl)) < 0.05, axis=1)) > 0.95
    # the assigned indices are a symmetry-equivalent relabelling of the true ones
    b = lattice.B
    q_true = h_true @ b.T
    q_fit = np.rint(hkl) @ b.T
    np.testing.assert_allclose(
        np.linalg.norm(q_fit, axis=1), np.linalg.norm(q_true, axis=1), rtol=1e-9
    )


@pytest.mark.parametrize("system", list(SYSTEMS))
def test_index_and_refine(system):
    crystal, lat, peaks, n_true, h_true = simulated(system, seed=21)
    idx = auto_index(peak_vectors(GEOM, peaks.x, peaks.y, peaks.z), lat)
    start = lat.with_cell(np.array(lat.cell) * np.r_[1.004, 1.004, 1.004, 1, 1, 1])
    res = refine_peaks(peaks, GEOM, start, idx.U)
    assert res.success
    np.testing.assert_allclose(res.lattice.cell, crystal.cell, rtol=1e-3)
    assert np.max(np.abs(np.array(res.lattice.cell[:3]) / crystal.cell[:3] - 1)) < 2e-4
    assert misorientation(res.U, crystal.U, lat) < 0.01
    assert res.indexed_fraction > 0.85  # 10 % garbage
    check_indexing(res, n_true, h_true, lat)
    assert res.degenerate == ("theta",)  # chi = -90, omega = 0: theta only turns U
    assert set(res.parameters) >= {"u_x", "u_y", "u_z", "distance", "yaw", "chi", "omega"}
    assert all(np.isfinite(list(res.errors.values())))
    assert "[[Variables]]" in res.report()


@pytest.mark.parametrize("system", ["cubic", "monoclinic"])
def test_perturbed_geometry_is_recovered(system):
    crystal, lat, peaks, n_true, h_true = simulated(system, seed=7)
    start = GEOM.replace(**{k: getattr(GEOM, k) + v for k, v in PERTURBATION.items()})
    idx = auto_index(peak_vectors(start, peaks.x, peaks.y, peaks.z), lat)
    res = refine_peaks(peaks, start, lat, idx.U)
    g = res.geometry
    assert abs(g.distance - GEOM.distance) < 0.1
    assert abs(g.beam_center_x - GEOM.beam_center_x) < 0.1
    assert abs(g.beam_center_y - GEOM.beam_center_y) < 0.1
    assert abs(g.yaw - GEOM.yaw) < 0.02
    assert abs(g.pitch - GEOM.pitch) < 0.02
    # the uncertainties are honest: errors within 5 sigma
    for name in ("distance", "beam_center_x", "yaw"):
        assert abs(getattr(g, name) - getattr(GEOM, name)) < 5 * res.errors[name] + 1e-9
    np.testing.assert_allclose(res.lattice.cell, crystal.cell, rtol=1e-3)
    assert misorientation(res.U, crystal.U, lat) < 0.01
    check_indexing(res, n_true, h_true, lat)


def test_fixed_lattice_and_explicit_parameters():
    crystal, lat, peaks, _, _ = simulated("orthorhombic", seed=3)
    idx = auto_index(peak_vectors(GEOM, peaks.x, peaks.y, peaks.z), lat)
    res = refine_peaks(peaks, GEOM, lat, idx.U, refine_lattice=False, refine_geometry=False)
    assert res.lattice == lat
    assert set(res.parameters) == {"u_x", "u_y", "u_z", "chi", "omega"}
    res = refine_peaks(
        peaks, GEOM, lat, idx.U, parameters=["orientation", "detector", "goniometer"]
    )
    # roll (detector rotation about the beam) duplicates a tilt of the phi axis
    assert len(res.degenerate) == 2 and "theta" in res.degenerate
    with pytest.raises(RefinementError, match="cannot refine gamma"):
        refine_peaks(peaks, GEOM, lat, idx.U, parameters=["gamma"])


def test_refine_too_few_peaks():
    crystal, lat, peaks, _, _ = simulated("cubic", seed=1)
    few = PeakList(peaks.x[:6], peaks.y[:6], peaks.z[:6])
    with pytest.raises(IndexingError, match="at least 10"):
        refine_peaks(few, GEOM, lat, crystal.U)


# ---------------------------------------------------------------------- the step
def write_peaks(scan_file, entry, x, y, z):
    with h5py.File(scan_file, "a") as f:
        fe = f[entry]
        if "peaks" in fe:
            del fe["peaks"]
        grp = nx_group(fe, "peaks", "NXreflections")
        g = read_geometry(fe)
        for name, val in (
            ("x", x),
            ("y", y),
            ("z", z),
            ("sigx", np.ones_like(x)),
            ("sigy", np.ones_like(x)),
            ("sigz", np.ones_like(x)),
            ("intensity", np.full_like(x, 1000.0)),
            ("polar_angle", g.two_theta(x, y)),
            ("azimuthal_angle", g.azimuth(x, y)),
        ):
            write_field(grp, name, np.asarray(val, dtype=np.float64))


@pytest.fixture(scope="module")
def base_scan(tmp_path_factory):
    """A simulated Si scan (small detector, 0.5 deg frames) with a peaks group in f1."""
    scan = make_simulated_scan(tmp_path_factory.mktemp("sim"))
    truth = scan.truth("f1")
    keep = (truth.peak_max > 0) & (truth.z >= 0) & (truth.z <= 359)
    rng = np.random.default_rng(5)
    x = truth.x[keep] + rng.normal(0, 0.1, keep.sum())
    y = truth.y[keep] + rng.normal(0, 0.1, keep.sum())
    z = truth.z[keep] + rng.normal(0, 0.05, keep.sum())
    write_peaks(scan.scan_file, "f1", x, y, z)
    return scan, (x, y, z)


@pytest.fixture
def scan_copy(base_scan, tmp_path):
    scan, peaks = base_scan
    dest = tmp_path / scan.scan_file.name
    shutil.copy(scan.scan_file, dest)
    return dest, scan, peaks


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_run_end_to_end(scan_copy):
    path, scan, _ = scan_copy
    true_geom = scan.geometries["f1"]
    with h5py.File(path, "a") as f:
        start = true_geom.replace(**{k: getattr(true_geom, k) + v for k, v in PERTURBATION.items()})
        write_geometry(f["f1"], start, phi_end=175.0)
    assert get_step("refine").load() is run
    out = run(path, "f1")
    assert out["status"] == "done"
    assert out["orientation_source"] == "auto-indexing"
    assert out["indexed_fraction"] > 0.95
    lat_true = Lattice.from_space_group("Fm-3m", a=5.43)
    with h5py.File(path, "r") as f:
        fe = f["f1"]
        u = read_orientation(fe)
        g = read_geometry(fe)
        lat = read_lattice(f["entry/sample"])
        assert fe["instrument/goniometer/phi"].attrs["end"] == 175.0
        results = fe["nxworkflow/nxrefine/results"]
        assert "uncertainty" in results["distance"].attrs
        assert results["indexed_fraction"][()] == pytest.approx(out["indexed_fraction"])
    # Coarse set-up (0.6 mm pixels at 150 mm, 0.5 deg frames): looser than the Pilatus tests.
    assert misorientation(u, scan.crystal.U, lat_true) < 0.03
    np.testing.assert_allclose(lat.cell, scan.crystal.cell, rtol=1e-3)
    assert lat.space_group == "F 2 2 2"  # only the centring was recorded
    assert abs(g.distance - true_geom.distance) < 0.3
    assert abs(g.beam_center_x - true_geom.beam_center_x) < 0.1
    assert abs(g.beam_center_y - true_geom.beam_center_y) < 0.1
    assert abs(g.yaw - true_geom.yaw) < 0.05
    with h5py.File(path, "r") as f:
        proc = read_process(f["f1"], "nxrefine")
    assert proc["summary"]["n_indexed"] == out["n_indexed"]
    assert proc["parameters"]["orientation_source"] == "auto-indexing"
    # done -> skipped; overwrite starts from the stored orientation
    before = digest(path)
    assert run(path, "f1")["status"] == "skipped"
    assert digest(path) == before
    again = run(path, "f1", overwrite=True)
    assert again["orientation_source"] == "entry"
    assert again["orientation_change"] < 0.01


def test_failed_indexing_leaves_good_results(scan_copy):
    path, scan, (x, y, z) = scan_copy
    run(path, "f1")
    with h5py.File(path, "r") as f:
        u_good = read_orientation(f["f1"])
    g = scan.geometries["f1"]
    rng = np.random.default_rng(1)
    # (1) a garbage peak list (e.g. after a phase transition) replacing the good one
    gx, gy, gz = garbage_peaks(300, rng, geometry=g, n_frames=360)
    write_peaks(path, "f1", gx, gy, gz)
    before = digest(path)
    with pytest.raises(IndexingError, match="f1"):
        run(path, "f1", overwrite=True)
    assert digest(path) == before
    # (2) too few peaks
    write_peaks(path, "f1", x[:5], y[:5], z[:5])
    before = digest(path)
    with pytest.raises(IndexingError, match="only 5 peaks"):
        run(path, "f1", overwrite=True)
    assert digest(path) == before
    # (3) a twinned crystal: two equal domains with unrelated orientations
    twin = SimCrystal(scan.crystal.cell, random_rotation(np.random.default_rng(9)), "F")
    tx, ty, tz, _ = predicted_peaks(
        twin, rng, geometry=g, n_frames=360, noise_xy=0.1, noise_z=0.05, max_peaks=len(x)
    )
    write_peaks(path, "f1", np.r_[x, tx], np.r_[y, ty], np.r_[z, tz])
    before = digest(path)
    with pytest.raises(IndexingError, match="twinned"):
        run(path, "f1", overwrite=True)
    assert digest(path) == before
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(read_orientation(f["f1"]), u_good)


def test_wrong_space_group_is_rejected(scan_copy):
    path, _, _ = scan_copy
    with h5py.File(path, "a") as f:
        s = f["entry/sample"]
        write_field(s, "space_group", "P 6/m m m")
        write_field(s, "unitcell_gamma", 120.0)
    before = digest(path)
    with pytest.raises(IndexingError, match="no cell matching"):
        run(path, "f1")
    assert digest(path) == before
    # and a Lattice passed explicitly overrides the sample
    out = run(path, "f1", lattice=Lattice.from_space_group("Fm-3m", a=5.43), refine_geometry=False)
    assert out["space_group"] == "F m -3 m"


def test_orientation_from_parent(scan_copy, tmp_path):
    path, _, _ = scan_copy
    parent = tmp_path / "parent_scans.nxs"
    shutil.copy(path, parent)
    run(parent, "f1")  # the parent now holds a refined U for f1
    with h5py.File(parent, "r") as f:
        u_parent = read_orientation(f["f1"])
    with h5py.File(path, "a") as f:
        grp = nx_group(f["entry"], "nxscans", "NXprocess")
        write_field(grp, "parent", parent.name)
    out = run(path, "f1", refine_geometry=False)
    assert out["orientation_source"].startswith("parent")
    assert out["orientation_change"] < 0.05
    with h5py.File(path, "r") as f:
        assert misorientation(read_orientation(f["f1"]), u_parent) < 0.05


def test_default_polar_max_uses_every_peak(scan_copy):
    """Through the registry (settings layers), the default uses every indexed peak."""
    from nxrefine_bs.reduce.steps import run_step

    path, _, (x, _, _) = scan_copy
    out = run_step("refine", path, "f1")
    assert out["n_used"] == out["n_peaks"] == len(x)
    assert out["n_indexed"] > 0.95 * len(x)
    with h5py.File(path, "r") as f:
        g = read_geometry(f["f1"])
    assert out["polar_max"] >= float(np.max(g.two_theta(*read_xy(path))))


def read_xy(path):
    with h5py.File(path, "r") as f:
        return f["f1/peaks/x"][()], f["f1/peaks/y"][()]
