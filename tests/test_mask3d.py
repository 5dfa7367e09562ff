"""Tests of the 3-D mask around Bragg peaks (nxprepare_mask)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from nxrefine_bs.errors import FileExistsNXError
from nxrefine_bs.nexus.provenance import process_done, read_process, remove_process
from nxrefine_bs.reduce import mask3d, transform
from nxrefine_bs.reduce.mask3d import fill_gaps, gap_runs
from nxrefine_bs.simulation.scan import make_simulated_scan


@pytest.fixture(scope="module")
def masked(tmp_path_factory):
    sim = make_simulated_scan(tmp_path_factory.mktemp("m3"), write_truth_orientation=True)
    raw = sim.scan_dir / "f1.h5"
    raw_bytes = raw.read_bytes()
    res = mask3d.run(sim.scan_file, "f1", h2=21, first=0, last=360)  # every frame
    assert raw.read_bytes() == raw_bytes  # raw data untouched
    return sim, res


def test_gap_helpers():
    pm = np.zeros((8, 6), dtype=np.int8)
    pm[3:5] = 1
    pm[:, 2] = 1
    assert gap_runs(pm, 0) == [(3, 5)]
    assert gap_runs(pm, 1) == [(2, 3)]
    m = np.zeros((8, 6), dtype=bool)
    m[2, 4] = True
    m[5, 0] = True
    fill_gaps(m, [(3, 5)], [])
    assert m[3:5, 4].all() and m[3:5, 0].all() and not m[3:5, 1].any()


def test_mask_covers_strong_peaks_not_background(masked):
    sim, res = masked
    assert res["status"] == "done"
    with h5py.File(sim.scan_file, "r") as f:
        link = f["f1/data"].get("data_mask", getlink=True)
        assert isinstance(link, h5py.ExternalLink)
        assert (link.filename, link.path) == ("300K/f1_mask.nxs", "/entry/mask")
        m = f["f1/data/data_mask"][()]
        assert m.dtype == np.int8
        assert f["f1/data/data_mask"].chunks == (1, 195, 235)
        assert process_done(f["f1"], "nxprepare_mask")
        assert read_process(f["f1"], "nxprepare_mask")["parameters"]["h2"] == 21
    p = sim.truth("f1")
    zi = np.clip(np.round(p.z).astype(int), 0, m.shape[0] - 1)
    yi, xi = np.round(p.y).astype(int), np.round(p.x).astype(int)
    strong = p.peak_max > 500
    assert strong.sum() > 50
    assert m[zi[strong], yi[strong], xi[strong]].all()
    # every masked voxel lies near a real peak: within the two boxes plus the spot's
    # tail (a few pixels for the strongest peaks) and a few frames
    reach = 21 // 2 + 11 // 2 + 6
    near = np.zeros(m.shape, dtype=bool)
    for x, y, z in zip(xi, yi, zi, strict=True):
        near[
            max(0, z - 4) : z + 5,
            max(0, y - reach) : y + reach + 1,
            max(0, x - reach) : x + reach + 1,
        ] = True
    assert not (m.astype(bool) & ~near).any()
    # and most of the detector-time volume stays unmasked
    assert 0.005 < m.mean() < 0.3
    assert res["masked_fraction"] == pytest.approx(m.mean())


def test_first_last_and_overwrite(tmp_path):
    sim = make_simulated_scan(tmp_path, n_frames=30, write_truth_orientation=True)
    res = mask3d.run(sim.scan_file, "f1", first=5, last=24)  # frames 5 <= j < 24
    assert res["frames"] == [5, 24]
    assert mask3d.run(sim.scan_file, "f1")["status"] == "skipped"
    with h5py.File(sim.scan_file, "r") as f:
        m = f["f1/data/data_mask"][()]
    assert m[:5].all() and m[24:].all() and not m[5:24].all()
    with h5py.File(sim.scan_file, "r+") as f:
        remove_process(f["f1"], "nxprepare_mask")
    with pytest.raises(FileExistsNXError):
        mask3d.run(sim.scan_file, "f1")
    res = mask3d.run(sim.scan_file, "f1", overwrite=True)
    assert res["frames"] == [0, 20]  # NXRefine's default last frame: nframes - 10
    # the masked transform skips masked voxels entirely
    grid = {"qh": (-8, 0.1, 8), "qk": (-8, 0.1, 8), "ql": (-8, 0.1, 8)}
    plain = transform.run(sim.scan_file, "f1", **grid)
    mres = transform.run(sim.scan_file, "f1", mask=True, **grid)
    assert mres["file"].endswith("f1_masked_transform.nxs")
    with h5py.File(sim.scan_file, "r") as f:
        m = f["f1/data/data_mask"][()].astype(bool)
        assert "masked_transform" in f["f1"] and process_done(f["f1"], "nxmasked_transform")
    assert mres["pixels"] < plain["pixels"]
    assert plain["pixels"] - mres["pixels"] <= m.sum()


# --------------------------------------------------------------------------- fast kernel
def _pair(rng, shape, bad, npeaks=6):
    f0 = rng.poisson(4, shape).astype(np.int32)
    f1 = rng.poisson(4, shape).astype(np.int32)
    for _ in range(npeaks):
        y, x = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        f1[max(0, y - 3) : y + 3, max(0, x - 3) : x + 3] += rng.integers(20, 5000)
    f0[bad] = -1
    f1[bad] = -1
    return f0, f1


@pytest.mark.parametrize("h1,h2", [(11, 51), (11, 21), (4, 30), (1, 1), (15, 300)])
def test_fast_mask_equals_scipy_reference(h1, h2):
    """The numba running-sum kernel gives the scipy implementation's mask, pixel for pixel."""
    rng = np.random.default_rng(h1 * 100 + h2)
    shape = (195, 235)
    bad = np.zeros(shape, dtype=bool)
    bad[60:63] = True
    bad[:, 100:104] = True
    bad[150, 7] = True  # an isolated bad pixel
    kw = {"t1": 2.0, "h1": h1, "t2": 0.8, "h2": h2, "rows": gap_runs(bad, 0),
          "cols": gap_runs(bad, 1)}  # fmt: skip
    nonempty = 0
    for _ in range(8):
        f0, f1 = _pair(rng, shape, bad)
        fast = mask3d.frame_difference_mask(f0, f1, bad, **kw)
        ref = mask3d.frame_difference_mask_reference(f0, f1, bad, **kw)
        np.testing.assert_array_equal(fast, ref)
        nonempty += bool(ref.any())
    assert nonempty >= 6  # the comparison covers masks that are not empty


def test_fast_mask_dilation_threshold_above_one_equals_reference():
    rng = np.random.default_rng(7)
    shape = (120, 90)
    bad = np.zeros(shape, dtype=bool)
    for t2 in (3.0, 10.0, 200.0):
        f0, f1 = _pair(rng, shape, bad, npeaks=10)
        kw = {"t1": 2.0, "h1": 9, "t2": t2, "h2": 25}
        np.testing.assert_array_equal(
            mask3d.frame_difference_mask(f0, f1, bad, **kw),
            mask3d.frame_difference_mask_reference(f0, f1, bad, **kw),
        )


def test_fast_mask_at_an_exact_threshold_tie_is_set():
    """Documented difference: |box mean| == t1 exactly is masked (">= t1") by the exact sums.

    scipy's running mean is rounded in float32, so at an exact tie it can fall on either
    side of t1; the integer box sums here cannot.
    """
    shape = (40, 40)
    f0 = np.zeros(shape, dtype=np.int32)
    f1 = np.zeros(shape, dtype=np.int32)
    f1[20, 20] = 18  # 3 x 3 box mean = 2.0 exactly around (20, 20)
    bad = np.zeros(shape, dtype=bool)
    m = mask3d.frame_difference_mask(f0, f1, bad, t1=2.0, h1=3, t2=0.8, h2=1)
    assert m[19:22, 19:22].all() and m.sum() == 9
    f1[20, 20] = 17
    assert not mask3d.frame_difference_mask(f0, f1, bad, t1=2.0, h1=3, t2=0.8, h2=1).any()


def test_run_writes_the_reference_mask(masked):
    """The step's 3-D mask is the OR of the reference change masks into and out of each frame."""
    sim, _res = masked
    with h5py.File(sim.scan_file, "r") as f:
        m = f["f1/data/data_mask"][()].astype(bool)
        data = f["f1/data/data"][()]
        bad = f["f1/instrument/detector/pixel_mask"][()] != 0
    rows, cols = gap_runs(bad, 0), gap_runs(bad, 1)
    kw = {"t1": 2.0, "h1": 11, "t2": 0.8, "h2": 21, "rows": rows, "cols": cols}
    for j in (3, 10, 17):
        into = mask3d.frame_difference_mask_reference(data[j - 1], data[j], bad, **kw)
        out = mask3d.frame_difference_mask_reference(data[j], data[j + 1], bad, **kw)
        np.testing.assert_array_equal(m[j], into | out)
