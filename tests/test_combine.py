"""Tests of merging the per-rotation transforms (nxcombine)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from nxrefine_bs.errors import ReductionError
from nxrefine_bs.nexus.provenance import process_done
from nxrefine_bs.reduce import combine, transform
from nxrefine_bs.simulation.scan import make_simulated_scan

GRID = {"qh": (-6, 0.1, 6), "qk": (-6, 0.1, 6), "ql": (-6, 0.1, 6)}


def test_combine_sums_rotations(tmp_path):
    sim = make_simulated_scan(
        tmp_path, n_frames=60, write_truth_orientation=True, omegas=(0, 15, -15)
    )
    with pytest.raises(ReductionError, match="not transformed"):
        combine.run(sim.scan_file)
    for e in ("f1", "f2"):
        transform.run(sim.scan_file, e, **GRID)
    with pytest.raises(ReductionError, match="f3 not transformed"):
        combine.run(sim.scan_file)
    transform.run(sim.scan_file, "f3", **GRID)
    res = combine.run(sim.scan_file, "entry")
    assert res["status"] == "done" and res["entries"] == ["f1", "f2", "f3"]
    v = n = 0
    for e in ("f1", "f2", "f3"):
        with h5py.File(sim.scan_dir / f"{e}_transform.nxs", "r") as f:
            v = v + f["entry/data/v"][()].astype(np.float64)
            n = n + f["entry/data/n"][()].astype(np.float64)
    with h5py.File(sim.scan_file, "r") as f:
        tr = f["entry/transform"]
        assert process_done(f["entry"], "nxcombine")
        link = tr.get("data", getlink=True)
        assert (link.filename, link.path) == ("300K/transform.nxs", "/entry/data/data")
        # data is already v/n: no weights beside it (a reader would divide again)
        assert "weights" not in tr
        link = f["f1/transform"].get("weights", getlink=True)  # a rotation's: v with n
        assert (
            link.path == "/entry/data/n"
            and f["f1/transform"].get("data", getlink=True).path == "/entry/data/v"
        )
        assert list(tr.attrs["axes"]) == ["Ql", "Qk", "Qh"]
        assert tr["Qk"].attrs["scaling_factor"] == pytest.approx(2 * np.pi / 5.43)
        data = tr["data"][()]
    with h5py.File(sim.scan_dir / "transform.nxs", "r") as f:
        np.testing.assert_allclose(f["entry/data/v"][()], v, rtol=1e-6)
        np.testing.assert_allclose(f["entry/data/n"][()], n, rtol=1e-6)
    expect = np.divide(v, n, out=np.zeros_like(v), where=n > 0)
    np.testing.assert_allclose(data, expect, rtol=1e-5, atol=1e-6)
    assert res["voxels_filled"] == int((n > 0).sum())
    assert combine.run(sim.scan_file)["status"] == "skipped"
    assert combine.run(sim.scan_file, overwrite=True)["status"] == "done"
    with pytest.raises(ReductionError, match="not transformed"):
        combine.run(sim.scan_file, mask=True)


def test_combine_rejects_different_grids(tmp_path):
    sim = make_simulated_scan(tmp_path, n_frames=6, write_truth_orientation=True, omegas=(0, 15))
    transform.run(sim.scan_file, "f1", first=0, last=6, **GRID)
    transform.run(
        sim.scan_file, "f2", first=0, last=6, qh=(-6, 0.2, 6), qk=GRID["qk"], ql=GRID["ql"]
    )
    with pytest.raises(ReductionError, match="same grid"):
        combine.run(sim.scan_file)
