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
    res = mask3d.run(sim.scan_file, "f1", h2=21)
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
    res = mask3d.run(sim.scan_file, "f1", first=5, last=24)
    assert mask3d.run(sim.scan_file, "f1")["status"] == "skipped"
    with h5py.File(sim.scan_file, "r") as f:
        m = f["f1/data/data_mask"][()]
    assert m[:5].all() and m[25:].all() and not m[5:25].all()
    with h5py.File(sim.scan_file, "r+") as f:
        remove_process(f["f1"], "nxprepare_mask")
    with pytest.raises(FileExistsNXError):
        mask3d.run(sim.scan_file, "f1")
    res = mask3d.run(sim.scan_file, "f1", overwrite=True)
    assert res["frames"] == [0, 29]
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
