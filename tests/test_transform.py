"""Tests of the reciprocal-space transform (nxtransform) and its grid."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

from nxrefine_bs.errors import FileExistsNXError, ReductionError
from nxrefine_bs.geometry import Geometry
from nxrefine_bs.nexus.geometry_io import read_geometry, read_ub
from nxrefine_bs.nexus.provenance import process_done, read_process, remove_process
from nxrefine_bs.reduce import transform
from nxrefine_bs.reduce.grid import (
    GridAxis,
    QGrid,
    axis_from_range,
    default_axis,
    make_grid,
    nice_step,
)
from nxrefine_bs.simulation.scan import make_simulated_scan

COARSE = {"qh": (-8, 0.1, 8), "qk": (-8, 0.1, 8), "ql": (-8, 0.1, 8)}


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return make_simulated_scan(
        tmp_path_factory.mktemp("tr"), write_truth_orientation=True, omegas=(0, 15, -15)
    )


# ----------------------------------------------------------------------------- grid
def test_nice_step_and_default_axis():
    assert nice_step(0.016) == 0.02
    assert nice_step(0.034) == 0.02 and nice_step(0.04) == 0.05
    assert nice_step(0.08) == 0.1
    ax = default_axis("h", 2.0, 0.16)  # 0.8 * 12.5 = 10 -> even 10
    assert (ax.start, ax.step, ax.n) == (-10.0, 0.02, 1001)
    ax = default_axis("k", 2.0, 0.18)  # 8.9 -> 10
    assert ax.start == -10.0 and ax.n == 1001
    assert default_axis("l", 1.0, 0.2).start == -4.0  # 4.0 stays 4
    with pytest.raises(ReductionError):
        default_axis("h", 0.0, 0.1)


def test_make_grid_override(sim):
    g = sim.geometries["f1"]
    grid = make_grid(g, sim.crystal.cell, qk=(-1, 0.05, 1))
    # default: Q_max = 1.80 1/A, a* = 0.184 -> 0.8 * 9.8 = 7.8 -> 8, step 0.016 -> 0.02
    assert grid.h == GridAxis("h", -8.0, 0.02, 801)
    assert grid.k == axis_from_range("k", (-1, 0.05, 1)) and grid.k.n == 41
    assert grid.shape == (801, 41, 801)
    with pytest.raises(ReductionError):
        axis_from_range("h", (1, 0, 2))


def test_nearest_voxel_index():
    grid = QGrid(GridAxis("h", -1, 0.5, 5), GridAxis("k", 0, 1, 3), GridAxis("l", 0, 1, 2))
    flat = grid.flat_index(np.array([[-1.24, 0.4, 0.6], [1.26, 0, 0], [0.0, 2.6, 0.0]]))
    assert flat[0] == (1 * 3 + 0) * 5 + 0
    assert flat[1] == -1  # 1.26 rounds to index 5 -> outside
    assert flat[2] == -1


# ----------------------------------------------------------------------------- mapping
@pytest.mark.parametrize("offset", [(0.0, 0.0, 0.0), (0.05, -0.03, 0.02)])
def test_pixel_mapping_matches_geometry(sim, offset):
    g = sim.geometries["f2"].replace(
        xs=offset[0], ys=offset[1], zs=offset[2], yaw=0.3, pitch=-0.4, roll=0.2, theta=1.0
    )
    ub = sim.crystal.UB
    rng = np.random.default_rng(1)
    x = rng.uniform(0, g.shape[1] - 1, 500)
    y = rng.uniform(0, g.shape[0] - 1, 500)
    z = rng.uniform(0, 360, 500)
    np.testing.assert_allclose(
        transform.pixel_hkl(g, ub, x, y, z), g.pixel_to_hkl(x, y, z, ub), atol=1e-10
    )


def test_round_trip_predict(sim):
    """HKL -> Ewald prediction (pixel, frame) -> the transform's mapping -> HKL."""
    g = sim.geometries["f3"].replace(yaw=0.5, pitch=0.3, theta=0.7)
    ub = sim.crystal.UB
    r = np.arange(-4, 5)
    hkl = np.stack(np.meshgrid(r, r, r, indexing="ij"), axis=-1).reshape(-1, 3)
    hkl = hkl[np.abs(hkl).sum(axis=1) > 0]
    pred = g.predict(hkl, ub)
    on = pred["on_detector"]
    assert on.sum() > 20
    back = transform.pixel_hkl(g, ub, pred["x"][on], pred["y"][on], pred["frame"][on])
    np.testing.assert_allclose(back, pred["hkl"][on], atol=1e-8)


def test_polarization_factor_matches_pyfai_form():
    g = Geometry(shape=(40, 50), pixel_size=2.0, distance=100.0, beam_center_x=25, beam_center_y=20)
    p = transform.polarization_factor(g, 0.99)
    tth = np.radians(g.two_theta(*np.meshgrid(np.arange(50), np.arange(40))))
    s = g.pixel_vectors(*np.meshgrid(np.arange(50), np.arange(40)))
    chi = np.arctan2(s[..., 2], s[..., 1])  # azimuth from the horizontal +Y axis
    ref = 0.5 * (1 + np.cos(tth) ** 2 - 0.99 * np.cos(2 * chi) * np.sin(tth) ** 2)
    np.testing.assert_allclose(p, ref, rtol=1e-6)
    assert p[20, 25] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- kernel
def _reference(g, ub, grid, frames, start, fw, pw):
    """Plain numpy (bincount) transform of a block of frames."""
    nb, ny, nx = frames.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    v = np.zeros(grid.size)
    n = np.zeros(grid.size)
    count = 0
    for f in range(nb):
        hkl = g.pixel_to_hkl(xx, yy, start + f, ub)
        flat = grid.flat_index(hkl).ravel()
        c = frames[f].ravel().astype(np.float64)
        ok = (flat >= 0) & (c >= 0) & (pw.ravel() > 0) & (fw[f] > 0)
        v += np.bincount(flat[ok], weights=c[ok], minlength=grid.size)
        n += np.bincount(flat[ok], weights=(fw[f] * pw.ravel())[ok], minlength=grid.size)
        count += int(ok.sum())
    return v.reshape(grid.shape), n.reshape(grid.shape), count


@pytest.mark.parametrize("nthreads", [1, 2])
def test_kernel_matches_numpy_reference(sim, nthreads):
    g = sim.geometries["f1"]
    ub = sim.crystal.UB
    grid = make_grid(g, sim.crystal.cell, qh=(-4, 0.1, 4), qk=(-4, 0.1, 4), ql=(-4, 0.1, 4))
    frames = sim.simulators["f1"].frames(100, 124)
    fw = np.linspace(0.9, 1.1, 24)
    fw[3] = 0.0
    pw = transform.polarization_factor(g) * (sim.simulators["f1"].detector.mask == 0)
    pw[10:12, 20:40] = 0
    with transform.Accumulator(grid, g, ub, pw, nthreads=nthreads) as acc:
        acc.add(frames[:16], 100, fw[:16])
        acc.add(frames[16:], 116, fw[16:])
        v, n = acc.v.astype(np.float64), acc.n.astype(np.float64)
        added, total = acc.added, acc.total
    vr, nr, count = _reference(g, ub, grid, frames, 100, fw, pw)
    assert abs(added - count) <= 2
    assert total == pytest.approx(vr.sum(), rel=1e-12)
    assert v.sum() == pytest.approx(vr.sum(), rel=1e-6)
    assert n.sum() == pytest.approx(nr.sum(), rel=1e-5)
    # voxel by voxel (a pixel exactly on a voxel boundary may fall either side)
    bad = ~np.isclose(v, vr, rtol=1e-5, atol=1e-3)
    assert bad.sum() <= 2
    np.testing.assert_allclose(n[~bad], nr[~bad], rtol=1e-5, atol=1e-5)


def test_frame_weights(sim, tmp_path):
    with h5py.File(sim.scan_file, "r") as f:
        fe = f["f1"]
        mon = fe["monitor/MCS1"][()]
        w1 = transform.frame_weights(fe, 360)
        w = transform.frame_weights(fe, 360, norm=50000.0, first=10, last=349)
    assert np.all(w1 == 1.0)
    assert np.all(w[:10] == 0) and np.all(w[350:] == 0)
    # smoothed monitor / norm follows the drift of the raw monitor
    assert np.corrcoef(w[20:340], mon[20:340])[0, 1] > 0.9
    assert abs(np.mean(w[10:350]) - np.mean(mon) / 50000.0) < 0.01


# ----------------------------------------------------------------------------- step
def test_transform_run_bragg_peaks_on_integer_hkl(sim):
    res = transform.run(
        sim.scan_file, "f1", qh=(-3, 0.02, 3), qk=(-3, 0.02, 3), ql=(-3, 0.02, 3), norm=50000.0
    )
    assert res["status"] == "done"
    with h5py.File(sim.scan_file, "r") as f:
        fe = f["f1"]
        assert process_done(fe, "nxtransform")
        tr = fe["transform"]
        assert tr.attrs["signal"] == "data"
        assert list(tr.attrs["axes"]) == ["Ql", "Qk", "Qh"]
        link = tr.get("data", getlink=True)
        assert isinstance(link, h5py.ExternalLink) and link.filename == "300K/f1_transform.nxs"
        assert link.path == "/entry/data/v"
        assert tr.get("weights", getlink=True).path == "/entry/data/n"
        a_star = 2 * np.pi / sim.crystal.cell[0]
        assert tr["Qh"].attrs["scaling_factor"] == pytest.approx(a_star)
        assert tr["Ql"].attrs["long_name"] == "L (r.l.u.)"
        np.testing.assert_allclose(tr.attrs["angles"], [90, 90, 90])
        v = tr["data"][()]
        n = tr["weights"][()]
        assert fe["data/monitor_weight"].shape == (360,)
    assert v.sum() == pytest.approx(res["counts"], rel=1e-5)
    ax = np.linspace(-3, 3, 301)
    truth = sim.truth("f1")
    gaps = sim.simulators["f1"].detector.mask > 0
    yy, xx = np.nonzero(gaps)
    # peaks cut by a detector gap or the scan ends have biased centroids: skip them
    clear = np.array(
        [np.min(np.hypot(xx - x, yy - y)) > 4 for x, y in zip(truth.x, truth.y, strict=True)]
    )
    inside = (
        np.all(np.abs(truth.hkl) <= 2.6, axis=1)
        & (truth.peak_max > 300)
        & clear
        & (truth.z > 4)
        & (truth.z < 355)
    )
    assert inside.sum() >= 10
    r = 10  # +-0.2 r.l.u., about 3 sigma of a spot
    for hkl in truth.hkl[inside]:
        i = [int(round((c + 3) / 0.02)) for c in hkl]  # (h, k, l) indices
        sl = tuple(slice(i[a] - r, i[a] + r + 1) for a in (2, 1, 0))
        vb, nb = v[sl].astype(np.float64), n[sl].astype(np.float64)
        good = nb > 0
        rate = np.median(vb[good] / nb[good])  # background of v/n
        w = np.clip(vb - rate * nb, 0, None)  # counts above background
        ll, kk, hh = np.meshgrid(ax[sl[0]], ax[sl[1]], ax[sl[2]], indexing="ij")
        cen = np.array([(hh * w).sum(), (kk * w).sum(), (ll * w).sum()]) / w.sum()
        assert np.all(np.abs(cen - hkl) < 0.01), (hkl, cen)


def test_missing_orientation_and_mask(tmp_path):
    sim = make_simulated_scan(tmp_path, n_frames=4, write_truth_orientation=False)
    with pytest.raises(ReductionError, match="orientation matrix"):
        transform.run(sim.scan_file, "f1", **COARSE)
    with pytest.raises(ReductionError, match="no entry"):
        transform.run(sim.scan_file, "f9", **COARSE)
    sim2 = make_simulated_scan(tmp_path / "b", n_frames=4, write_truth_orientation=True)
    with pytest.raises(ReductionError, match="3-D mask"):
        transform.run(sim2.scan_file, "f1", mask=True, **COARSE)


def test_overwrite_semantics(tmp_path):
    sim = make_simulated_scan(tmp_path, n_frames=8, write_truth_orientation=True)
    first = transform.run(sim.scan_file, "f1", **COARSE)
    out = first["file"]
    mtime = os.path.getmtime(out)
    again = transform.run(sim.scan_file, "f1", **COARSE)
    assert again["status"] == "skipped"
    assert os.path.getmtime(out) == mtime
    with h5py.File(sim.scan_file, "r+") as f:
        remove_process(f["f1"], "nxtransform")
    with pytest.raises(FileExistsNXError, match="overwrite=True"):
        transform.run(sim.scan_file, "f1", **COARSE)
    redo = transform.run(sim.scan_file, "f1", overwrite=True, first=2, last=5, **COARSE)
    assert redo["status"] == "done" and redo["frames"] == [2, 5]
    with h5py.File(sim.scan_file, "r") as f:
        proc = read_process(f["f1"], "nxtransform")
        assert proc["parameters"]["first"] == 2
        assert read_ub(f["f1"]) is not None and read_geometry(f["f1"]).shape == (195, 235)


def test_plot_slice(tmp_path):
    sim = make_simulated_scan(tmp_path, n_frames=40, write_truth_orientation=True)
    res = transform.run(sim.scan_file, "f1", **COARSE)
    png = transform.plot_slice(res["file"], "l", 0.0, tmp_path / "hk0.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ReductionError):
        transform.plot_slice(res["file"], "l", 99.0, tmp_path / "x.png")


def test_transform_memory_is_the_grid_plus_a_few_frames(tmp_path):
    """Frames are streamed: peak allocation stays far below grid + the whole stack."""
    import tracemalloc

    scan = make_simulated_scan(tmp_path, write_truth_orientation=True, n_frames=360)
    grid = {"qh": (-6, 0.05, 6), "qk": (-6, 0.05, 6), "ql": (-6, 0.05, 6)}
    n = round(12 / 0.05) + 1
    grid_bytes = 2 * 4 * n**3  # float32 v and n
    with h5py.File(scan.scan_dir / "f1.h5", "r") as f:
        stack_bytes = f["entry/data/data"].size * 4
    transform.run(scan.scan_file, "f1", first=0, last=2, **grid)  # warm-up: numba compile
    tracemalloc.start()
    try:
        transform.run(scan.scan_file, "f1", first=0, last=None, overwrite=True, **grid)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stack_bytes > 60e6  # the whole stack would be noticed
    assert peak < grid_bytes + 0.5 * stack_bytes, (peak, grid_bytes, stack_bytes)
