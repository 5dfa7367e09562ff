"""Tests of the ``find`` step (nxfind) and its streaming 3-D labeller."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from scipy import ndimage

from nxrefine_bs.errors import DataLinkError, ReductionError
from nxrefine_bs.nexus import h5tools
from nxrefine_bs.nexus.provenance import read_process
from nxrefine_bs.reduce import peaks
from nxrefine_bs.reduce.steps import get_step
from nxrefine_bs.simulation.scan import make_simulated_scan

N_FRAMES = 120
THRESHOLD = 50.0


@pytest.fixture
def scan(tmp_path):
    return make_simulated_scan(tmp_path, n_frames=N_FRAMES, seed=3)


def scipy_reference(stack, masked, threshold, first=0):
    """Thresholded 6-connected components and their intensity-weighted moments."""
    hot = (stack > threshold) & ~masked[None]
    labels, n = ndimage.label(hot)
    z, y, x = np.nonzero(labels)
    lab = labels[z, y, x]
    w = stack[z, y, x].astype(np.float64)
    sw = np.bincount(lab, w, n + 1)[1:]
    out = {
        "x": np.bincount(lab, w * x, n + 1)[1:] / sw,
        "y": np.bincount(lab, w * y, n + 1)[1:] / sw,
        "z": np.bincount(lab, w * (z + first), n + 1)[1:] / sw,
        "intensity": sw,
        "npixels": np.bincount(lab, None, n + 1)[1:].astype(float),
    }
    order = np.lexsort((out["x"], out["y"], out["z"]))
    return {k: v[order] for k, v in out.items()}


def run_labeller(stack, masked, threshold, min_voxels=1, first=0, min_spread=0.0):
    """Labeller over a stack; the zinger test is off unless ``min_spread`` is given."""
    lab = peaks.PeakLabeller(stack.shape[1:], threshold, masked, min_voxels, min_spread=min_spread)
    for j, frame in enumerate(stack):
        lab.add_frame(frame, first + j)
    return peaks.peak_table_from_moments(lab.finish())


# --------------------------------------------------------------------------- labeller


@pytest.mark.parametrize("seed", range(4))
def test_labeller_equals_scipy_label_on_random_blobs(seed):
    """Random, touching, branching 3-D shapes: same components and moments as scipy."""
    rng = np.random.default_rng(seed)
    stack = rng.integers(0, 100, size=(30, 40, 53)).astype(np.int32)
    stack = ndimage.uniform_filter(stack.astype(float), 2).astype(np.int32)
    stack[:, 7, :] = -1  # a gap row
    masked = rng.random((40, 53)) < 0.05
    thr = float(np.percentile(stack, 70))
    ours = run_labeller(stack, masked, thr, first=5)
    ref = scipy_reference(stack, masked, thr, first=5)
    assert len(ours["x"]) == len(ref["x"]) > 10
    for key in ("x", "y", "z", "intensity", "npixels"):
        np.testing.assert_allclose(ours[key], ref[key], rtol=1e-12, atol=1e-9)


def test_labeller_merges_branches_joined_in_a_later_frame():
    """Two separate features in frame 0 that a U-shaped feature joins in frame 1."""
    stack = np.zeros((3, 5, 7), np.int32)
    stack[0, 1, 1] = stack[0, 1, 5] = 100  # two blobs
    stack[1, 1, 1:6] = 100  # a bar touching both
    stack[2, 4, 3] = 100  # separate, isolated
    ours = run_labeller(stack, None, 50)
    assert ours["npixels"].tolist() == [7.0, 1.0]
    assert ours["z"][0] == pytest.approx(5 / 7)


def test_labeller_min_voxels_and_threshold_semantics():
    stack = np.zeros((2, 4, 4), np.int32)
    stack[0, 0, 0] = 51  # single voxel
    stack[:, 2:4, 2:4] = 50  # not strictly above 50: not hot
    stack[1, 2, 2] = 60
    assert len(run_labeller(stack, None, 50, min_voxels=1)["x"]) == 2
    assert len(run_labeller(stack, None, 50.5, min_voxels=2)["x"]) == 0
    assert len(run_labeller(stack, None, 49, min_voxels=2)["x"]) == 1


# --------------------------------------------------------------------------- the step


def test_registry_points_at_run():
    assert get_step("find").load() is peaks.run


def test_finds_injected_peaks_with_subpixel_centroids(scan):
    out = peaks.run(scan.scan_file, "f1", threshold=THRESHOLD, first=0)
    assert out["npeaks"] > 20
    truth = scan.truth("f1")
    with h5py.File(scan.scan_file, "r") as f:
        g = f["f1/peaks"]
        found = {k: g[k][()] for k in peaks.FIELDS}
        masked = f["f1/instrument/detector/pixel_mask"][()] != 0
    ny, nx = masked.shape
    near = ndimage.binary_dilation(masked, iterations=5)
    near[:5] = near[-5:] = True
    near[:, :5] = near[:, -5:] = True
    xi = np.clip(np.round(truth.x).astype(int), 0, nx - 1)
    yi = np.clip(np.round(truth.y).astype(int), 0, ny - 1)
    # Injected peaks whose expected maximum is clearly above threshold (1.5x, so that
    # Poisson noise cannot push the whole peak below it), >= 5 px from gaps and
    # edges and >= 3 frames inside the range.
    sel = (
        (truth.peak_max > 1.5 * THRESHOLD)
        & ~near[yi, xi]
        & (truth.z >= 3)
        & (truth.z <= N_FRAMES - 4)
    )
    assert sel.sum() >= 30
    pos = np.c_[found["x"], found["y"], found["z"]]
    hits = 0
    errors = []
    for x, y, z in zip(truth.x[sel], truth.y[sel], truth.z[sel], strict=True):
        d = np.abs(pos - [x, y, z])
        j = np.argmin((d**2).sum(axis=1))
        if np.all(d[j] < 2):
            hits += 1
            errors.append(d[j, :2])
    assert hits / sel.sum() >= 0.98
    assert np.max(errors) < 0.3  # x and y, pixels
    # The fields are consistent with the geometry.
    geometry = scan.geometries["f1"]
    np.testing.assert_allclose(found["polar_angle"], geometry.two_theta(found["x"], found["y"]))
    np.testing.assert_allclose(found["azimuthal_angle"], geometry.azimuth(found["x"], found["y"]))
    assert np.all(found["intensity"] > THRESHOLD)
    big = found["npixels"] >= 10
    assert big.any() and 0.5 < np.median(found["sigx"][big]) < 1.2  # injected sigma 1 px
    assert np.all(found["sigx"] >= 0) and np.all(found["sigz"] >= 0)


def test_step_equals_scipy_and_writes_nxreflections(scan):
    out = peaks.run(scan.scan_file, "f1", threshold=THRESHOLD, first=4, last=100, min_spread=0.0)
    with h5py.File(scan.scan_file, "r") as f:
        stack = f["f1/data/data"][4:100]
        masked = f["f1/instrument/detector/pixel_mask"][()] != 0
        g = f["f1/peaks"]
        assert g.attrs["NX_class"] == "NXreflections"
        assert (g.attrs["first"], g.attrs["last"], g.attrs["threshold"]) == (4, 100, THRESHOLD)
        for name in peaks.FIELDS:
            assert g[name].dtype == np.float64 and g[name].ndim == 1
            assert g[name].shape == (out["npeaks"],)
        found = {k: g[k][()] for k in ("x", "y", "z", "intensity", "npixels")}
        record = read_process(f["f1"], "nxfind")
    ref = scipy_reference(stack, masked, THRESHOLD, first=4)
    for key in found:
        np.testing.assert_allclose(found[key], ref[key], rtol=1e-12)
    assert record["summary"]["npeaks"] == out["npeaks"]
    assert record["parameters"]["threshold"] == THRESHOLD


def test_min_voxels_rejects_small_features(scan):
    all_ = peaks.run(scan.scan_file, "f1", threshold=THRESHOLD, first=0, min_voxels=1)
    big = peaks.run(
        scan.scan_file, "f1", threshold=THRESHOLD, first=0, min_voxels=20, overwrite=True
    )
    assert big["npeaks"] < all_["npeaks"]
    with h5py.File(scan.scan_file, "r") as f:
        assert f["f1/peaks/npixels"][()].min() >= 20


def test_threshold_above_data_records_zero_peaks(scan):
    out = peaks.run(scan.scan_file, "f1", threshold=1e9, first=0)
    assert out["npeaks"] == 0
    with h5py.File(scan.scan_file, "r") as f:
        assert f["f1/peaks/x"].shape == (0,)
        assert read_process(f["f1"], "nxfind")["summary"]["npeaks"] == 0


def test_rerun_skips_and_overwrite_replaces(scan):
    a = peaks.run(scan.scan_file, "f1", threshold=THRESHOLD, first=0)
    b = peaks.run(scan.scan_file, "f1", threshold=5000.0, first=0)
    assert b["skipped"] is True and b["npeaks"] == a["npeaks"]
    c = peaks.run(scan.scan_file, "f1", threshold=5000.0, first=0, overwrite=True)
    assert c["skipped"] is False and c["npeaks"] < a["npeaks"]
    with h5py.File(scan.scan_file, "r") as f:
        assert f["f1/peaks"].attrs["threshold"] == 5000.0
        assert f["f1/peaks/x"].shape == (c["npeaks"],)


def test_interrupted_write_leaves_no_peaks_group(scan, monkeypatch):
    calls = {"n": 0}
    real = h5tools.write_field

    def failing(group, name, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(group, name, *args, **kwargs)

    monkeypatch.setattr(peaks, "write_field", failing)
    with pytest.raises(KeyboardInterrupt):
        peaks.run(scan.scan_file, "f1", threshold=THRESHOLD, first=0)
    with h5py.File(scan.scan_file, "r") as f:
        assert "peaks" not in f["f1"]
        assert read_process(f["f1"], "nxfind") is None
    monkeypatch.setattr(peaks, "write_field", real)
    out = peaks.run(scan.scan_file, "f1", threshold=THRESHOLD, first=0)
    with h5py.File(scan.scan_file, "r") as f:
        assert f["f1/peaks/x"].shape == (out["npeaks"],)
        assert [k for k in f["f1"] if "partial" in k] == []


def test_default_threshold_from_settings(scan):
    out = peaks.run(scan.scan_file, "f1", first=0)
    assert out["threshold"] == 50000.0 and out["min_voxels"] == 1
    assert out["min_pixels"] == 10  # NXRefine's separation: recorded, not used


def test_broken_link_raises_data_link_error(scan):
    (scan.scan_dir / "f1.h5").unlink()
    with pytest.raises(DataLinkError, match="f1.h5"):
        peaks.run(scan.scan_file, "f1", threshold=THRESHOLD)


def test_empty_stack_is_an_error(scan):
    with h5py.File(scan.scan_dir / "f1.h5", "r+") as f:
        ny, nx = f["/entry/data/data"].shape[1:]
        del f["/entry/data/data"]
        f.create_dataset("/entry/data/data", shape=(0, ny, nx), dtype=np.int32)
    with pytest.raises(ReductionError, match="0 frames"):
        peaks.run(scan.scan_file, "f1", threshold=THRESHOLD)


def test_all_masked_detector_is_an_error(scan):
    with h5py.File(scan.scan_file, "r+") as f:
        f["f1/instrument/detector/pixel_mask"][...] = 1
    with pytest.raises(ReductionError, match="masks every pixel"):
        peaks.run(scan.scan_file, "f1", threshold=THRESHOLD, first=0)


def test_negative_threshold_is_an_error(scan):
    with pytest.raises(ReductionError, match="threshold"):
        peaks.run(scan.scan_file, "f1", threshold=-1.0, first=0)


def test_threshold_from_scan_file_settings_and_nxload(scan):
    from nexusformat.nexus import nxload

    from nxrefine_bs.nexus.nxreduce import write_parameters

    write_parameters(scan.scan_file, {"threshold": 500.0, "min_voxels": 2, "first_frame": 0})
    out = peaks.run(scan.scan_file, "f1")
    assert (out["threshold"], out["min_voxels"], out["first"]) == (500.0, 2, 0)
    root = nxload(str(scan.scan_file))
    assert root["f1/peaks"].nxclass == "NXreflections"
    assert root["f1/peaks/x"].shape == (out["npeaks"],)


def test_nxrefine_min_pixels_is_a_separation_and_drops_no_peak(scan):
    """An NXRefine settings value ``min_pixels = 10`` must not act as a 10-voxel cut."""
    from nxrefine_bs.nexus.nxreduce import write_parameters

    plain = peaks.run(scan.scan_file, "f1", threshold=THRESHOLD, first=0)
    with h5py.File(scan.scan_file, "r") as f:
        n_small = int((f["f1/peaks/npixels"][()] < 10).sum())
    assert n_small > 0  # the data have peaks below 10 voxels
    write_parameters(scan.scan_file, {"min_pixels": 10})
    shared = peaks.run(scan.scan_file, "f1", threshold=THRESHOLD, first=0, overwrite=True)
    assert shared["min_pixels"] == 10 and shared["npeaks"] == plain["npeaks"]
    with h5py.File(scan.scan_file, "r") as f:
        assert int((f["f1/peaks/npixels"][()] < 10).sum()) == n_small
        assert f["f1/peaks"].attrs["min_pixels"] == 10
        assert read_process(f["f1"], "nxfind")["parameters"]["min_pixels"] == 10
