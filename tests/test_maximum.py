"""Tests of the ``max`` step (nxmax), the frame stream and the pyFAI geometry bridge."""

from __future__ import annotations

import warnings

import h5py
import numpy as np
import pytest

from nxrefine_bs.errors import DataLinkError, ReductionError
from nxrefine_bs.geometry import Geometry
from nxrefine_bs.nexus.provenance import read_process
from nxrefine_bs.pyfai_geometry import integrator, poni_parameters, two_theta_image
from nxrefine_bs.reduce import maximum
from nxrefine_bs.reduce.framestream import (
    DataSource,
    FrameStream,
    frame_range,
    open_frames,
)
from nxrefine_bs.reduce.steps import get_step
from nxrefine_bs.simulation.scan import make_simulated_scan, small_test_setup

N_FRAMES = 40


@pytest.fixture
def scan(tmp_path):
    return make_simulated_scan(tmp_path, n_frames=N_FRAMES, seed=2)


def _stack(scan, entry="f1"):
    with h5py.File(scan.scan_file, "r") as f:
        data = f[f"{entry}/data/data"][()]
        mask = f[f"{entry}/instrument/detector/pixel_mask"][()] != 0
    return data, mask


# --------------------------------------------------------------------------- pyFAI bridge


@pytest.mark.parametrize(
    "orientation", ["-y +z -x", "+y +z -x", "+z +y -x", "-y +z +x", "+y -z +x"]
)
@pytest.mark.parametrize("tilts", [(0.0, 0.0, 0.0), (2.0, -1.5, 3.0), (-4.0, 3.0, -10.0)])
def test_integrator_two_theta_matches_geometry(orientation, tilts):
    g = Geometry(
        shape=(120, 150),
        distance=150.0,
        wavelength=0.3,
        beam_center_x=40.3,  # off-centre
        beam_center_y=95.7,
        yaw=tilts[0],
        pitch=tilts[1],
        roll=tilts[2],
        detector_orientation=orientation,
    )
    ai = integrator(g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tth = np.degrees(ai.twoThetaArray())
    np.testing.assert_allclose(tth, two_theta_image(g), atol=1e-5)
    # pyFAI chi = 0 is horizontal: its polarization factor f equals the simulator's
    # p (1 - s_y^2) + (1 - p)(1 - s_z^2) with p = (1 + f) / 2.
    f = 0.98
    s = g.pixel_vectors(np.arange(150.0)[None, :], np.arange(120.0)[:, None])
    s /= np.linalg.norm(s, axis=-1, keepdims=True)
    p = (1 + f) / 2
    expected = p * (1 - s[..., 1] ** 2) + (1 - p) * (1 - s[..., 2] ** 2)
    np.testing.assert_allclose(ai.polarization(factor=f), expected, atol=1e-6)


def test_poni_parameters_simple_case():
    g = Geometry(
        shape=(100, 100),
        distance=200.0,
        pixel_size=0.1,
        beam_center_x=30.0,
        beam_center_y=60.0,
        wavelength=0.5,
    )
    par = poni_parameters(g)
    assert par["dist"] == pytest.approx(0.2)
    assert par["poni1"] == pytest.approx(60.5e-4)
    assert par["poni2"] == pytest.approx(30.5e-4)
    assert par["rot1"] == pytest.approx(0.0, abs=1e-12)
    assert par["wavelength"] == pytest.approx(0.5e-10)


# --------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("dtype", [np.int32, np.float32])
def test_trimmed_sum_matches_sorting(dtype):
    rng = np.random.default_rng(4)
    values = rng.poisson(3.0, 20001).astype(dtype)
    values[::50] = 10_000  # bright outliers (beyond the histogram for integers)
    values[::97] = -1  # gaps are ignored
    s, k, n = maximum.trimmed_sum(values)
    valid = np.sort(values[values >= 0].astype(np.float64))
    assert n == valid.size
    assert k == n - int(0.1 * n)
    assert s == pytest.approx(valid[:k].sum())


def test_trimmed_sum_many_large_values_uses_sort():
    values = np.arange(10_000, 20_000, dtype=np.int32)  # all above the histogram
    s, k, n = maximum.trimmed_sum(values)
    assert s == pytest.approx(np.sort(values)[:k].sum())


def test_int32_accumulator_is_exact_beyond_2_31(tmp_path):
    """Sums far beyond int32 stay exact (uint32 read-back, flushes into int64)."""
    path = tmp_path / "big.h5"
    rng = np.random.default_rng(1)
    frames = rng.integers(2**29, 2**31 - 1, size=(12, 8, 9), dtype=np.int32)
    frames[:, 0, 0] = -1
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=frames, chunks=(1, 8, 9))
    src = DataSource(path, "f1", path, "/data", False)
    masked = np.zeros((8, 9), bool)
    masked[3, 4] = True
    annulus = ~masked
    with FrameStream(src) as stream:
        sums = maximum.accumulate_frame_sums(stream, 0, 12, masked, annulus)
    w = np.where(~masked & (frames >= 0), frames, 0).astype(np.int64)
    np.testing.assert_array_equal(sums.summed_data, w.sum(axis=0).astype(np.float64))
    np.testing.assert_array_equal(sums.summed_frames, w.sum(axis=(1, 2)).astype(np.float64))
    assert sums.maximum == float(w.max())


def test_frame_range_clips():
    # NXRefine's convention: frames first <= z < last; no last means nframes - 10
    assert frame_range(None, None, 50) == (0, 40)
    assert frame_range(10, 3640, 50) == (10, 50)
    assert frame_range(-5, 50, 50) == (45, 50)
    assert frame_range(60, 70, 50) == (50, 50)


def test_frame_stream_blocks_reuse_buffer(scan):
    data, _ = _stack(scan)
    seen = []
    with open_frames(scan.scan_file, "f1", max_block_bytes=1) as stream:
        assert stream.nframes == N_FRAMES
        assert stream.block_frames == 1
        for start, block in stream.blocks(3, 9):
            np.testing.assert_array_equal(block[0], data[start])
            seen.append(start)
    assert seen == list(range(3, 9))


# --------------------------------------------------------------------------- the step


def test_registry_points_at_run():
    assert get_step("max").load() is maximum.run


def test_run_results_layout_and_values(scan):
    out = maximum.run(scan.scan_file, "f1", first=2, last=35)
    assert out["skipped"] is False
    assert (out["first"], out["last"], out["nframes"]) == (2, 35, 33)
    data, mask = _stack(scan)
    valid = ~mask[None] & (data >= 0)
    w = np.where(valid, data, 0).astype(np.int64)
    geometry = scan.geometries["f1"]
    with h5py.File(scan.scan_file, "r") as f:
        e = f["f1"]
        fs = e["frame_sums"]
        assert fs.attrs["NX_class"] == "NXcollection"
        for name in ("summed_data", "summed_frames", "radial_sum", "transmission"):
            assert fs[name].attrs["NX_class"] == "NXdata"
        np.testing.assert_array_equal(fs["summed_data/summed_data"][()], w[2:35].sum(axis=0))
        summed_frames = fs["summed_frames/summed_frames"][()]
        assert summed_frames.shape == (N_FRAMES,)
        np.testing.assert_array_equal(summed_frames[2:35], w[2:35].sum(axis=(1, 2)))
        assert not summed_frames[:2].any() and not summed_frames[35:].any()
        partial = fs["summed_frames/partial_frames"][()]
        assert np.all(partial[2:35] > 0)
        # maximum: largest unmasked count inside the annulus
        q = maximum.pixel_q(geometry)
        ann = maximum.annulus_pixels(q, mask, out["qmin"], out["qmax"])
        assert out["maximum"] == float(w[2:35][:, ann].max())
        assert e["data"].attrs["maximum"] == out["maximum"]
        assert (e["data"].attrs["first"], e["data"].attrs["last"]) == (2, 35)
        pol = e["instrument/detector/polarization"][()]
        assert pol.shape == geometry.shape and 0.5 < pol.min() <= pol.max() <= 1.0
        # radial sum: 2-theta axis spans the unmasked detector
        polar = fs["radial_sum/polar_angle"][()]
        assert polar.size == maximum.RADIAL_BINS
        tth = two_theta_image(geometry)[~mask]
        assert polar.min() >= tth.min() - 0.05 and polar.max() <= tth.max() + 0.05
        assert polar.max() - polar.min() > 0.95 * (tth.max() - tth.min())
        qr = fs["radial_sum/Q"][()]
        np.testing.assert_allclose(
            qr, 4 * np.pi * np.sin(np.radians(polar) / 2) / geometry.wavelength
        )
        tr = fs["transmission/transmission"]
        assert tr.attrs["median"] > 0
        assert np.median(tr[2:35]) == pytest.approx(1.0)
        assert np.all(np.abs(tr[()] - 1) < 0.2)  # monitor drift divided out
    record = read_process(h5py.File(scan.scan_file, "r")["f1"], "nxmax")
    assert record["program"] == "nxmax"
    assert record["parameters"]["first_frame"] == 2
    assert record["parameters"]["polarization"] == pytest.approx(0.99)
    assert record["summary"]["maximum"] == out["maximum"]


def test_radial_sum_of_a_ring_peaks_at_its_two_theta(tmp_path):
    """A ring at a known 2-theta on a tilted, off-centre detector integrates to a peak there."""
    geom, crystal, det, _ = small_test_setup()
    geom = geom.replace(yaw=3.0, pitch=-2.0, roll=5.0, beam_center_x=80.3, beam_center_y=70.6)
    s = make_simulated_scan(tmp_path, geometry=geom, detector=det, crystal=crystal, n_frames=3)
    tth = two_theta_image(geom)
    ring = (1000 * np.exp(-0.5 * ((tth - 20.0) / 0.15) ** 2)).astype(np.int32)
    ring[det.mask > 0] = -1
    with h5py.File(s.scan_dir / "f1.h5", "r+") as f:
        f["/entry/data/data"][...] = np.stack([ring] * 3)
    maximum.run(s.scan_file, "f1", first=0, qmin=0.5, qmax=6.0)
    with h5py.File(s.scan_file, "r") as f:
        polar = f["f1/frame_sums/radial_sum/polar_angle"][()]
        radial = f["f1/frame_sums/radial_sum/radial_sum"][()]
    assert polar[np.argmax(radial)] == pytest.approx(20.0, abs=0.1)


def test_rerun_skips_and_overwrite_replaces(scan):
    first = maximum.run(scan.scan_file, "f1", first=0, last=20)
    again = maximum.run(scan.scan_file, "f1", first=5, last=30)
    assert again["skipped"] is True and again["last"] == 20
    redo = maximum.run(scan.scan_file, "f1", first=5, last=30, overwrite=True)
    assert redo["skipped"] is False and (redo["first"], redo["last"]) == (5, 30)
    with h5py.File(scan.scan_file, "r") as f:
        assert f["f1/data"].attrs["last"] == 30
        assert [k for k in f["f1"] if "partial" in k] == []
        sf = f["f1/frame_sums/summed_frames/summed_frames"][()]
        assert sf[0] == 0 and sf[5] > 0
    assert first["maximum"] > 0


def test_default_first_frame_from_settings(scan):
    out = maximum.run(scan.scan_file, "f1")
    assert out["first"] == 10  # settings default first_frame, last clipped to the stack
    assert out["last"] == N_FRAMES


def test_broken_link_raises_data_link_error(scan):
    (scan.scan_dir / "f1.h5").rename(scan.scan_dir / "moved.h5")
    with pytest.raises(DataLinkError, match="f1.h5"):
        maximum.run(scan.scan_file, "f1", first=0)


def test_empty_frame_range_is_an_error(scan):
    with pytest.raises(ReductionError, match="no frames"):
        maximum.run(scan.scan_file, "f1", first=30, last=30)
    with h5py.File(scan.scan_file, "r") as f:
        assert "frame_sums" not in f["f1"] and "nxworkflow" not in f["f1"]


def test_all_masked_detector_is_an_error(scan):
    with h5py.File(scan.scan_file, "r+") as f:
        f["f1/instrument/detector/pixel_mask"][...] = 1
    with pytest.raises(ReductionError, match="masks every pixel"):
        maximum.run(scan.scan_file, "f1", first=0)


def test_empty_annulus_is_an_error(scan):
    with pytest.raises(ReductionError, match="qmin/qmax"):
        maximum.run(scan.scan_file, "f1", first=0, qmin=100.0, qmax=200.0)
