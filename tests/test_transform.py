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
from nxrefine_bs.plots import plot_slice
from nxrefine_bs.reduce import transform
from nxrefine_bs.reduce.grid import (
    GridAxis,
    QGrid,
    axis_from_range,
    data_grid,
    default_axis,
    grid_budget,
    make_grid,
    nice_step,
    nice_step_up,
    q_resolution,
    reached_hkl,
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
        w1 = transform.frame_weights(fe, 360, first=0, last=360)
        w = transform.frame_weights(fe, 360, norm=50000.0, first=10, last=350)
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
    first = transform.run(sim.scan_file, "f1", first=0, last=8, **COARSE)
    out = first["file"]
    mtime = os.path.getmtime(out)
    again = transform.run(sim.scan_file, "f1", first=0, last=8, **COARSE)
    assert again["status"] == "skipped"
    assert os.path.getmtime(out) == mtime
    with h5py.File(sim.scan_file, "r+") as f:
        remove_process(f["f1"], "nxtransform")
    with pytest.raises(FileExistsNXError, match="overwrite=True"):
        transform.run(sim.scan_file, "f1", first=0, last=8, **COARSE)
    redo = transform.run(sim.scan_file, "f1", overwrite=True, first=2, last=5, **COARSE)
    assert redo["status"] == "done" and redo["frames"] == [2, 5]
    with h5py.File(sim.scan_file, "r") as f:
        proc = read_process(f["f1"], "nxtransform")
        assert proc["parameters"]["first"] == 2
        assert read_ub(f["f1"]) is not None and read_geometry(f["f1"]).shape == (195, 235)


def test_plot_slice(tmp_path):
    sim = make_simulated_scan(tmp_path, n_frames=40, write_truth_orientation=True)
    res = transform.run(sim.scan_file, "f1", **COARSE)
    png = plot_slice(res["file"], "l", 0.0, tmp_path / "hk0.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ReductionError):
        plot_slice(res["file"], "l", 99.0, tmp_path / "x.png")


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


# ----------------------------------------------------------------------------- sizes, threads
def test_data_grid_covers_the_reach_at_the_data_resolution(sim):
    g = sim.geometries["f1"]
    ub = sim.crystal.UB
    grid = data_grid(g, ub, sim.crystal.cell, (0, 360))
    lo, hi = reached_hkl(g, ub, (0, 360))
    rec = 1.0 / np.array(sim.crystal.cell[:3])  # cubic: a* = 1/a (no 2 pi)
    for i, ax in enumerate(grid.axes):
        assert ax.start <= lo[i] and ax.stop >= hi[i]  # everything reached is inside
        assert ax.stop - ax.start <= hi[i] - lo[i] + 4 * ax.step  # and little else
        assert ax.step >= q_resolution(g) / rec[i] * (1 - 1e-9)  # not finer than the data
        assert ax.step == nice_step_up(ax.step) and ax.n <= 1001
    # every pixel of a few frames lands inside the grid
    yy, xx = np.mgrid[0:195:7, 0:235:7]
    for z in (0, 180, 359):
        hkl = g.pixel_to_hkl(xx, yy, np.full(xx.shape, z), ub).reshape(-1, 3)
        assert (grid.flat_index(hkl) >= 0).all()
    capped = data_grid(g, ub, sim.crystal.cell, (0, 360), max_points=101)
    assert max(ax.n for ax in capped.axes) <= 101
    # the step makes transform.run's default grid: make_grid with ub and frames
    assert make_grid(g, sim.crystal.cell, ub=ub, frames=(0, 360)) == grid


def test_grid_budget_states_sizes_and_refuses_what_does_not_fit(tmp_path):
    grid = make_grid(Geometry(), (6, 6, 6, 90, 90, 90), qh=(-10, 0.02, 10),
                     qk=(-10, 0.02, 10), ql=(-10, 0.02, 10))  # fmt: skip
    ok = grid_budget(grid, tmp_path, frame_shape=(1679, 1475), memory=64e9, disk=64e9)
    assert ok.grid_bytes == 8 * 1001**3
    assert ok.grid_bytes < ok.memory_bytes < ok.grid_bytes + 2e9
    assert "1,003,003,001 voxels" in ok.describe() and "8.02 GB" in ok.describe()
    with pytest.raises(ReductionError, match=r"needs \d+\.\d+ GB of memory but 4\.00 GB") as e:
        grid_budget(grid, tmp_path, frame_shape=(1679, 1475), memory=4e9, disk=64e9)
    assert "--qh/--qk/--ql" in str(e.value) and "coarser step" in str(e.value)
    with pytest.raises(ReductionError, match=r"writes 8\.\d+ GB .* only 1\.00 GB is free"):
        grid_budget(grid, tmp_path, frame_shape=(1679, 1475), memory=64e9, disk=1e9)
    # with compression the disk figure is an upper bound: a warning, not a refusal
    grid_budget(grid, tmp_path, frame_shape=(1679, 1475), memory=64e9, disk=1e9, compressed=True)


def test_transform_refuses_a_grid_larger_than_memory_before_allocating(tmp_path):
    """A grid-refusal test: 10^12 voxels are refused up front with the numbers."""
    import tracemalloc

    sim = make_simulated_scan(tmp_path, n_frames=4, write_truth_orientation=True)
    huge = {"qh": (-5, 0.001, 5), "qk": (-5, 0.001, 5), "ql": (-5, 0.001, 5)}
    tracemalloc.start()
    try:
        refused = r"1,000,300,030,001 voxels\) needs \d+\.\d+ GB of memory"
        with pytest.raises(ReductionError, match=refused):
            transform.run(sim.scan_file, "f1", first=0, last=4, **huge)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 200e6  # nothing grid-sized was allocated
    assert not (sim.scan_dir / "f1_transform.nxs").exists()
    with h5py.File(sim.scan_file, "r") as f:
        assert not process_done(f["f1"], "nxtransform")


@pytest.mark.parametrize("nthreads", [2, 3])
def test_threads_give_the_one_thread_sums(sim, nthreads):
    """The banded multi-thread accumulator adds exactly what one thread adds."""
    g = sim.geometries["f1"]
    ub = sim.crystal.UB
    grid = make_grid(g, sim.crystal.cell, qh=(-4, 0.05, 4), qk=(-4, 0.05, 4), ql=(-4, 0.05, 4))
    frames = sim.simulators["f1"].frames(40, 72)
    fw = np.ones(32)
    pw = transform.polarization_factor(g) * (sim.simulators["f1"].detector.mask == 0)
    out = {}
    for nt in (1, nthreads):
        with transform.Accumulator(grid, g, ub, pw, nthreads=nt) as acc:
            for b in range(0, 32, 16):
                acc.add(frames[b : b + 16], 40 + b, fw[b : b + 16])
            out[nt] = (acc.v.astype(np.float64), acc.n.astype(np.float64), acc.added, acc.total)
            assert acc.nthreads == nt
    v1, n1, a1, t1 = out[1]
    vt, nt_, at, tt = out[nthreads]
    assert at == a1 and tt == t1  # same pixels, same exact (float64) count total
    assert vt.sum() == v1.sum()  # integer counts: float32 voxel sums are exact
    np.testing.assert_array_equal(vt, v1)
    np.testing.assert_allclose(nt_, n1, rtol=1e-6)


def test_run_defaults_to_one_thread_per_core_compresses_and_sizes_chunks(tmp_path):
    sim = make_simulated_scan(tmp_path, n_frames=12, write_truth_orientation=True)
    grid = {"qh": (-3, 0.05, 3), "qk": (-3, 0.05, 3), "ql": (-2, 0.05, 2)}
    plain = transform.run(sim.scan_file, "f1", nthreads=1, **grid)
    packed = transform.run(
        sim.scan_file, "f1", overwrite=True, compression="gzip", nthreads=None, **grid
    )
    assert packed["threads"] == transform.transform_threads(None) >= 1
    assert plain["counts"] == packed["counts"] and plain["pixels"] == packed["pixels"]
    assert packed["output_gb"] == pytest.approx(8 * 121 * 121 * 81 / 1e9, abs=1e-3)
    with h5py.File(packed["file"], "r") as f:
        v = f["entry/data/v"]
        assert v.compression == "gzip" and v.chunks == (41, 61, 61)
        assert v[()].sum() == pytest.approx(packed["counts"], rel=1e-6)
    assert transform.grid_chunks((1001, 1001, 1001)) == (63, 63, 63)


def test_transform_states_grid_memory_and_output_before_it_runs(tmp_path, capfd):
    sim = make_simulated_scan(tmp_path, n_frames=6, write_truth_orientation=True)
    res = transform.run(sim.scan_file, "f1", first=0, last=6, progress=True, **COARSE)
    err = capfd.readouterr().err
    plan = next(line for line in err.splitlines() if "transforming frames 0..5" in line)
    assert "h -8:8:0.1 (161)" in plan and "4,173,281 voxels" in plan
    assert "memory" in plan and "available" in plan and "output 0.03 GB" in plan
    assert err.index("transforming frames") < err.index("f1 transform")  # before the bar
    assert res["voxels"] == 161**3


def test_threads_through_the_step_registry_default_to_the_cores(tmp_path):
    """CLI, plans and workflow call run_step: threads come from the setting (0 = per core)."""
    from nxrefine_bs.reduce.framestream import available_cores
    from nxrefine_bs.reduce.steps import run_step

    sim = make_simulated_scan(tmp_path, n_frames=6, write_truth_orientation=True)
    auto = run_step("transform", sim.scan_file, "f1", first=0, last=6, **COARSE)
    assert auto["threads"] == min(8, available_cores())
    one = run_step("transform", sim.scan_file, "f1", overwrite=True, first=0, last=6,
                   nthreads=1, **COARSE)  # fmt: skip
    assert one["threads"] == 1 and one["counts"] == auto["counts"]
    with h5py.File(sim.scan_file, "r") as f:
        assert read_process(f["f1"], "nxtransform")["parameters"]["nthreads"] == 1
