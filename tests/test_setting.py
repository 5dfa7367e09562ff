"""One setting across rotations and scans (issue 14 item 3): reduce/setting.py, refine, combine.

A trigonal ``P -3 m 1`` crystal has a hexagonal lattice (metric symmetry ``6/mmm``, 12
proper rotations) but only the 6 proper rotations of ``-3m1`` as Laue symmetry.  Peak
positions cannot tell the two cosets apart, so an independent indexing may return the
twin-related setting ``h' = h + k, k' = -k, l' = -l``.  The tests construct exactly that
situation (the reference orientation is made twin-related to what automatic indexing of
the other entry returns) and check that the refine step still puts every rotation and a
child scan in one setting, and that ``combine`` refuses entries in different settings.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import h5py
import numpy as np
import pytest

from nxrefine_bs.errors import ReductionError
from nxrefine_bs.geometry import all_hkl, random_rotation, rotation_x, rotation_z
from nxrefine_bs.nexus.geometry_io import read_orientation, write_orientation
from nxrefine_bs.nexus.h5tools import nx_group, write_field
from nxrefine_bs.reduce import combine, refine, transform
from nxrefine_bs.reduce.lattice import Lattice
from nxrefine_bs.reduce.orient import auto_index, peak_vectors, rotation_angle
from nxrefine_bs.reduce.setting import (
    cartesian_rotation,
    closest_setting,
    lattice_rotations,
    laue_rotations,
    setting_relation,
)
from nxrefine_bs.simulation.crystal import SimCrystal
from nxrefine_bs.simulation.scan import make_simulated_scan, small_test_setup

HEX = (3.2, 3.2, 5.2, 90.0, 90.0, 120.0)
SG = "P -3 m 1"
LAT = Lattice(*HEX, space_group=SG)
TWIN = np.array([[1, 1, 0], [0, -1, 0], [0, 0, -1]])  # h' = M h, not in -3m1
THREEFOLD = np.array([[-1, -1, 0], [1, 0, 0], [0, 0, 1]])  # in -3m1
N_VIRTUAL_FRAMES = 360  # peaks are predicted over 180 degrees (0.5 deg frames)


def relabel(u, m):
    """The orientation whose indices are ``m h`` for the peaks indexed ``h`` by ``u``."""
    return u @ cartesian_rotation(LAT, np.asarray(m).T)


# ---------------------------------------------------------------------- setting.py
def test_hexagonal_holohedry_and_laue_group():
    assert len(lattice_rotations(LAT)) == 12 and len(laue_rotations(LAT)) == 6
    cubic = Lattice.from_space_group("Fm-3m", a=5.43)
    assert len(lattice_rotations(cubic)) == 24 == len(laue_rotations(cubic))
    mono = Lattice(5.5, 6.2, 7.1, 90, 103.5, 90, space_group="P 1 2/m 1")
    assert len(lattice_rotations(mono)) == 2
    # The twin operation preserves peak positions (|q| and angles) but is no Laue symmetry.
    u = random_rotation(np.random.default_rng(0))
    hkl = np.array([[1, 0, 0], [1, 2, 3], [-2, 1, 1]])
    q = hkl @ (u @ LAT.B).T
    q_twin = (TWIN @ hkl.T).T @ (relabel(u, TWIN) @ LAT.B).T
    np.testing.assert_allclose(q_twin, q, atol=1e-12)
    rel = setting_relation(u, relabel(u, TWIN), LAT)
    assert rel.operation.tolist() == TWIN.tolist() and not rel.in_laue_group
    assert rel.angle < 1e-6
    rel3 = setting_relation(u, relabel(u, THREEFOLD), LAT)
    assert rel3.operation.tolist() == THREEFOLD.tolist() and rel3.in_laue_group


def test_closest_setting_returns_the_reference_setting():
    rng = np.random.default_rng(3)
    u_ref = random_rotation(rng)
    small = rotation_x(0.3) @ rotation_z(-0.2)
    for m in (TWIN, THREEFOLD, np.eye(3, dtype=int)):
        u_new, rel = closest_setting(small @ relabel(u_ref, m), u_ref, LAT)
        assert rel.operation.tolist() == np.asarray(m).tolist()
        assert rotation_angle(u_ref.T @ u_new) == pytest.approx(rotation_angle(small), abs=1e-9)


# ---------------------------------------------------------------------- refine
def write_peaks(scan_file, entry, geometry, crystal_ub, rng):
    """Peaks of a crystal with ``UB = crystal_ub`` predicted over 180 degrees, with noise."""
    hkl = all_hkl(1.0 / (geometry.q_max() * 1.001), LAT.B)
    p = geometry.predict(hkl, crystal_ub)
    on = p["on_detector"] & (p["frame"] >= 0) & (p["frame"] <= N_VIRTUAL_FRAMES - 1)
    x = p["x"][on] + rng.normal(0, 0.1, on.sum())
    y = p["y"][on] + rng.normal(0, 0.1, on.sum())
    z = p["frame"][on] + rng.normal(0, 0.05, on.sum())
    with h5py.File(scan_file, "a") as f:
        grp = nx_group(f[entry], "peaks", "NXreflections")
        for name, val in (("x", x), ("y", y), ("z", z), ("intensity", np.full_like(x, 1e3))):
            write_field(grp, name, val)
    return x, y, z


def hex_scan(directory, name, u_true, omegas=(0.0, 20.0), seed=0):
    geom, _, det, _ = small_test_setup()
    crystal = SimCrystal(HEX, u_true, "P")
    sim = make_simulated_scan(
        directory, scan=name, geometry=geom, crystal=crystal, detector=det, n_frames=2,
        omegas=omegas, seed=seed,
    )  # fmt: skip
    with h5py.File(sim.scan_file, "a") as f:
        write_field(f["entry/sample"], "space_group", SG)
    rng = np.random.default_rng(seed)
    q = {}
    for e, g in sim.geometries.items():
        x, y, z = write_peaks(sim.scan_file, e, g, crystal.UB, rng)
        q[e] = peak_vectors(g, x, y, z)
    return sim, q


def orientation(scan_file, entry):
    with h5py.File(scan_file, "r") as f:
        return read_orientation(f[entry])


def test_rotations_come_out_in_f1_setting_even_where_indexing_picks_the_twin(tmp_path):
    sim, q = hex_scan(tmp_path, "300K", random_rotation(np.random.default_rng(11)))
    u2_indep = auto_index(q["f2"], LAT).U  # what f2 gets when indexed on its own
    # Construction: f1 starts in the setting that is twin-related to that choice.
    with h5py.File(sim.scan_file, "a") as f:
        write_orientation(f["f1"], relabel(u2_indep, np.linalg.inv(TWIN).round()))
    out1 = refine.run(sim.scan_file, "f1")
    assert out1["orientation_source"] == "entry"
    u1 = orientation(sim.scan_file, "f1")
    pre = setting_relation(u1, u2_indep, LAT)
    assert pre.operation.tolist() == TWIN.tolist() and not pre.in_laue_group  # the trap
    out2 = refine.run(sim.scan_file, "f2")
    assert out2["orientation_source"] == "f1"
    u2 = orientation(sim.scan_file, "f2")
    np.testing.assert_allclose(u2, u1, atol=2e-3)  # one setting: equal U within ~0.1 deg
    assert rotation_angle(u1.T @ u2) < 0.1
    # f2 previously indexed on its own (twin setting) is realigned when refined again.
    with h5py.File(sim.scan_file, "a") as f:
        write_orientation(f["f2"], u2_indep)
    again = refine.run(sim.scan_file, "f2", overwrite=True)
    assert again["orientation_source"] == "entry"
    assert again["setting"]["operation"] == "[[1, 1, 0], [0, -1, 0], [0, 0, -1]]"
    assert again["setting"]["reference"] == "f1" and not again["setting"]["in_laue_group"]
    np.testing.assert_allclose(orientation(sim.scan_file, "f2"), u1, atol=2e-3)


def test_rotations_refined_concurrently_end_in_one_setting(tmp_path):
    """Two rotations refined at the same time: the later writer joins the earlier setting."""
    sim, q = hex_scan(tmp_path, "300K", random_rotation(np.random.default_rng(11)))
    pre = setting_relation(auto_index(q["f1"], LAT).U, auto_index(q["f2"], LAT).U, LAT)
    assert not pre.same_setting and not pre.in_laue_group  # indexed alone: twin-related
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda e: refine.run(sim.scan_file, e), ["f1", "f2"]))
    assert all(o["status"] == "done" for o in outs)
    u1, u2 = orientation(sim.scan_file, "f1"), orientation(sim.scan_file, "f2")
    np.testing.assert_allclose(u2, u1, atol=2e-3)


def test_child_scan_auto_indexed_in_the_parent_setting(tmp_path):
    u_true = random_rotation(np.random.default_rng(5))
    parent, _ = hex_scan(tmp_path, "300K", u_true, omegas=(0.0,), seed=1)
    moved = rotation_z(6.0) @ rotation_x(4.0)  # remounted: parent U no longer indexes
    child, q = hex_scan(tmp_path, "100K", moved @ u_true, omegas=(0.0,), seed=2)
    u_indep = auto_index(q["f1"], LAT).U
    # Construction: the parent's refined U is the twin of the child's independent choice.
    u_parent = moved.T @ relabel(u_indep, np.linalg.inv(TWIN).round())
    with h5py.File(parent.scan_file, "a") as f:
        write_orientation(f["f1"], u_parent)
    with h5py.File(child.scan_file, "a") as f:
        write_field(nx_group(f["entry"], "nxscans", "NXprocess"), "parent", parent.scan_file.name)
    out = refine.run(child.scan_file, "f1")
    assert out["orientation_source"] == "auto-indexing"  # the parent's U did not index
    assert out["setting"]["reference"].startswith("parent")
    assert out["setting"]["operation"] == "[[1, 1, 0], [0, -1, 0], [0, 0, -1]]"
    u_child = orientation(child.scan_file, "f1")
    rel = setting_relation(u_parent, u_child, LAT)
    assert rel.same_setting
    # the child differs from the parent only by the remount rotation
    np.testing.assert_allclose(u_child, moved @ u_parent, atol=2e-3)


# ---------------------------------------------------------------------- combine
GRID = {"qh": (-3, 0.2, 3), "qk": (-3, 0.2, 3), "ql": (-3, 0.2, 3)}


def test_combine_refuses_entries_in_different_settings(tmp_path):
    crystal = SimCrystal(HEX, random_rotation(np.random.default_rng(2)), "P")
    sim = make_simulated_scan(
        tmp_path, crystal=crystal, n_frames=16, omegas=(0, 15), write_truth_orientation=True
    )
    with h5py.File(sim.scan_file, "a") as f:
        write_field(f["entry/sample"], "space_group", SG)
    for e in ("f1", "f2"):
        transform.run(sim.scan_file, e, first=0, last=16, **GRID)
    u1 = orientation(sim.scan_file, "f1")
    with h5py.File(sim.scan_file, "a") as f:
        write_orientation(f["f2"], relabel(u1, TWIN))
    with pytest.raises(ReductionError, match=re.escape("[[1, 1, 0], [0, -1, 0], [0, 0, -1]]")) as e:
        combine.run(sim.scan_file)
    assert "twin-related" in str(e.value) and "f2" in str(e.value)
    assert not (sim.scan_dir / "transform.nxs").exists()
    with h5py.File(sim.scan_file, "a") as f:
        write_orientation(f["f2"], relabel(u1, THREEFOLD) @ rotation_x(0.01))
    with pytest.raises(ReductionError, match=r"another setting.*\[\[-1, -1, 0\], \[1, 0, 0\]"):
        combine.run(sim.scan_file)
    with h5py.File(sim.scan_file, "a") as f:
        write_orientation(f["f2"], rotation_x(0.01) @ u1)
    assert combine.run(sim.scan_file)["status"] == "done"
