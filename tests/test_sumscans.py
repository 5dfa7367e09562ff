"""Summing repeated scans: imported QM2 scans and simulated scans (real files)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from nxrefine_bs.beamlines.qm2 import QM2Beamline
from nxrefine_bs.cli import main
from nxrefine_bs.errors import DataLinkError, FileExistsNXError, ScanFileError
from nxrefine_bs.experiment import Experiment
from nxrefine_bs.geometry import Geometry
from nxrefine_bs.nexus.provenance import read_process
from nxrefine_bs.nexus.scanfile import check_data_link, read_geometry
from nxrefine_bs.nexus.sumscans import sum_scans
from nxrefine_bs.nexus.template import Position, create_configuration
from nxrefine_bs.simulation.crystal import SimCrystal
from nxrefine_bs.simulation.frames import DetectorModel
from nxrefine_bs.simulation.scan import make_simulated_scan
from nxrefine_bs.simulation.spec import make_qm2_raw_tree

SAMPLE, LABEL = "TiSe2", "xtal1"


@pytest.fixture
def imported(tmp_path: Path, server_settings: Path) -> tuple[list[Path], object]:
    """Two QM2 scans (300K, 300Kb) of the same crystal, imported from a simulated raw tree."""
    exp = Experiment.create(
        tmp_path / "analysis", "run1", beamline="QM2", raw_home=tmp_path / "raw", raw_path="raw6M"
    )
    create_configuration(
        exp.configuration_file("s10"),
        detector="Imxpad S10",
        positions=[Position(chi=-90.0), Position(chi=-90.0, omega=15.0)],
    )
    mask = np.zeros((120, 80), dtype=np.int8)
    mask[59:61, :] = 1
    beamline = QM2Beamline()
    tree = make_qm2_raw_tree(
        beamline.raw_directory(exp),
        spec_file=beamline.spec_file_candidates(exp, SAMPLE)[0],
        sample=SAMPLE,
        label=LABEL,
        scans={"300K": 300.0, "300Kb": 300.0},
        positions=[(-90.0, 0.0, 0.0), (-90.0, 15.0, 0.0)],
        detector=DetectorModel("Imxpad S10", (120, 80), 0.13, mask),
        n_frames=5,
        seed=1,
    )
    return beamline.import_data(exp, "s10", SAMPLE, LABEL), tree


def small_scan(directory: Path, scan: str, *, seed: int, **kwargs) -> Path:
    """A tiny simulated scan (sim-beamline layout, monitor MCS1, gaps -1)."""
    detector = DetectorModel.synthetic((32, 36), pixel_size=0.6)
    options = {
        "n_frames": 6,
        "omegas": (0.0, 15.0),
        "geometry": Geometry(
            wavelength=0.3,
            distance=60.0,
            pixel_size=0.6,
            shape=(32, 36),
            beam_center_x=18.3,
            beam_center_y=15.6,
            chi=-90.0,
            phi_start=-5.0,
            phi_step=0.5,
        ),
    }
    options.update(kwargs)
    if options["geometry"].shape != detector.shape:
        detector = DetectorModel.synthetic(options["geometry"].shape, pixel_size=0.6)
    crystal = SimCrystal.random((5.43, 5.43, 5.43, 90.0, 90.0, 90.0), centring="F", seed=0)
    return make_simulated_scan(
        directory,
        sample="sim",
        label="xtal1",
        scan=scan,
        seed=seed,
        crystal=crystal,
        detector=detector,
        **options,
    ).scan_file


def leftovers(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.name.endswith((".tmp", ".lock"))]


def test_sum_imported_scans(imported):
    (a, b), tree = imported
    out = sum_scans([a, b], "300K_sum")
    assert out == a.parent / "TiSe2_300K_sum.nxs"
    assert not leftovers(a.parent)
    with h5py.File(out, "r") as f, h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        assert sorted(k for k in f if k.startswith("f")) == ["f1", "f2"]
        assert f["entry/sample/temperature"][()] == fa["entry/sample/temperature"][()]
        sources = read_process(f["entry"], "nxsum")["parameters"]["sources"]
        assert sources == ["TiSe2_300K.nxs", "TiSe2_300Kb.nxs"]
        for entry in ("f1", "f2"):
            link = f[entry]["data"].get("data", getlink=True)
            assert link.filename == f"300K_sum/{entry}.h5" and link.path == "/entry/data/data"
            frames_a = tree.scan("300K")[int(entry[1]) - 1].simulator.frames()
            frames_b = tree.scan("300Kb")[int(entry[1]) - 1].simulator.frames()
            total = f[entry]["data/data"][()]
            assert total.dtype == np.int32 and f[entry]["data/data"].chunks == (1, 120, 80)
            valid = (frames_a >= 0) & (frames_b >= 0)
            np.testing.assert_array_equal(total[valid], (frames_a + frames_b)[valid])
            assert (total[~valid] == -1).all()
            assert (total[:, 59:61, :] == -1).all() and (~valid).sum() == 5 * 2 * 80
            for channel in ("flyc1", "flyc2"):
                np.testing.assert_array_equal(
                    f[entry]["monitor"][channel][()],
                    fa[entry]["monitor"][channel][()] + fb[entry]["monitor"][channel][()],
                )
            assert f[entry]["monitor"].attrs["signal"] == "flyc1"
            assert "logs" not in f[entry]["instrument"]  # per-scan logs are not summed
            assert "nxlink" not in f[entry].get("nxworkflow", {})
            assert read_process(f[entry], "nxsum")["parameters"]["entry"] == entry
            assert f[entry]["sample"] == f["entry/sample"]
            g_out, g_a = read_geometry(f[entry]), read_geometry(fa[entry])
            assert g_out == g_a
            np.testing.assert_array_equal(f[entry]["data/frame_number"][()], np.arange(5))
    assert check_data_link(out, "f2") == a.parent / "300K_sum" / "f2.h5"

    from nexusformat.nexus import nxload

    assert nxload(str(out))["f1/data/data"].shape == (5, 120, 80)

    # never replaced without overwrite; replaced atomically with it
    stack = a.parent / "300K_sum" / "f1.h5"
    mtime = stack.stat().st_mtime_ns
    with pytest.raises(FileExistsNXError, match=r"TiSe2_300K_sum.nxs already exists"):
        sum_scans([a, b], "300K_sum")
    assert stack.stat().st_mtime_ns == mtime
    out.unlink()
    with pytest.raises(FileExistsNXError, match=r"300K_sum/f1.h5 already exists"):
        sum_scans([a, b], "300K_sum")
    assert sum_scans([b, a], "TiSe2_300K_sum.nxs", overwrite=True) == out
    assert not leftovers(a.parent)


def test_sum_simulated_scans_and_monitor_weight(tmp_path):
    a = small_scan(tmp_path, "100K", seed=1)
    b = small_scan(tmp_path, "100Kb", seed=2)
    c = small_scan(tmp_path, "100Kc", seed=3)
    weights = {}
    for path, scale in ((a, 1.0), (b, 2.0), (c, 3.0)):
        with h5py.File(path, "r+") as f:
            for entry in ("f1", "f2"):
                weights[path, entry] = scale * np.linspace(0.9, 1.1, 6)
                f[entry]["data"].create_dataset("monitor_weight", data=weights[path, entry])
    out = sum_scans([a, b, c], "100K_sum")
    with h5py.File(out, "r") as f:
        for entry in ("f1", "f2"):
            stacks = []
            monitors = []
            for path in (a, b, c):
                with h5py.File(path, "r") as src:
                    stacks.append(src[entry]["data/data"][()])
                    monitors.append(src[entry]["monitor/MCS1"][()])
            stacks = np.stack(stacks).astype(np.int64)
            expected = np.where((stacks < 0).any(axis=0), -1, stacks.sum(axis=0))
            np.testing.assert_array_equal(f[entry]["data/data"][()], expected)
            assert (f[entry]["data/data"][()] == -1).sum() == (stacks[0] < 0).sum()
            assert f[entry]["data/data"][()].min() == -1  # gaps are -1, never -3
            np.testing.assert_allclose(f[entry]["monitor/MCS1"][()], np.sum(monitors, axis=0))
            np.testing.assert_allclose(
                f[entry]["data/monitor_weight"][()],
                sum(weights[p, entry] for p in (a, b, c)),
            )


def test_sum_in_slabs(tmp_path, monkeypatch):
    import nxrefine_bs.nexus.sumscans as sumscans

    a = small_scan(tmp_path, "1", seed=1)
    b = small_scan(tmp_path, "2", seed=2)
    reference = sum_scans([a, b], "whole")
    monkeypatch.setattr(sumscans, "SLAB_BYTES", 1)  # one frame per slab
    sliced = sum_scans([a, b], "sliced")
    with h5py.File(reference, "r") as f, h5py.File(sliced, "r") as g:
        np.testing.assert_array_equal(f["f2/data/data"][()], g["f2/data/data"][()])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_frames": 7}, r"entry f1: frame counts differ \(6 vs 7\)"),
        (
            {
                "geometry": Geometry(
                    wavelength=0.3,
                    distance=60.0,
                    pixel_size=0.6,
                    shape=(30, 36),
                    beam_center_x=18.3,
                    beam_center_y=15.6,
                    chi=-90.0,
                    phi_start=-5.0,
                    phi_step=0.5,
                )
            },
            r"entry f1: frame stack shapes differ \(\(6, 32, 36\) vs \(6, 30, 36\)\)",
        ),
        ({"omegas": (0.0,)}, r"their entries differ \(f1, f2 vs f1\)"),
        ({"omegas": (0.0, 20.0)}, r"entry f2: omega differs \(15.0 vs 20.0\)"),
    ],
)
def test_sum_refuses_mismatches(tmp_path, kwargs, message):
    a = small_scan(tmp_path, "a", seed=1)
    b = small_scan(tmp_path, "b", seed=2, **kwargs)
    with pytest.raises(ScanFileError, match=message) as info:
        sum_scans([a, b], "sum")
    assert str(info.value).startswith("cannot sum sim_a.nxs and sim_b.nxs")
    assert not (a.parent / "sim_sum.nxs").exists() and not (a.parent / "sum").exists()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("instrument/goniometer/phi", -4.0, r"phi start differs \(-5.0 vs -4.0\)"),
        ("instrument/monochromator/wavelength", 0.31, r"wavelength differs \(0.3 vs 0.31\)"),
        ("instrument/detector/distance", 61.0, r"distance differs \(60.0 vs 61.0\)"),
    ],
)
def test_sum_refuses_other_conditions(tmp_path, path, value, message):
    a = small_scan(tmp_path, "a", seed=1)
    b = small_scan(tmp_path, "b", seed=2)
    with h5py.File(b, "r+") as f:
        old = f["f2"][path]
        attrs = dict(old.attrs)
        del f["f2"][path]
        new = f["f2"].create_dataset(path, data=value)
        new.attrs.update(attrs)
    with pytest.raises(ScanFileError, match=r"sim_a.nxs and sim_b.nxs, entry f2: " + message):
        sum_scans([a, b], "sum")


def test_sum_bad_input(tmp_path):
    a = small_scan(tmp_path, "a", seed=1)
    b = small_scan(tmp_path, "b", seed=2)
    with pytest.raises(ScanFileError, match="at least two scan files"):
        sum_scans([a], "sum")
    with pytest.raises(ScanFileError, match="listed twice"):
        sum_scans([a, a], "sum")
    with pytest.raises(ScanFileError, match="is one of the scans to sum"):
        sum_scans([a, b], "a")
    other = small_scan(tmp_path / "elsewhere", "c", seed=3)
    with pytest.raises(ScanFileError, match="one sample and label"):
        sum_scans([a, other], "sum2")
    with pytest.raises(ScanFileError, match="does not exist"):
        sum_scans([a, tmp_path / "sim" / "xtal1" / "sim_zz.nxs"], "sum2")
    (tmp_path / "sim" / "xtal1" / "b" / "f2.h5").unlink()
    with pytest.raises(DataLinkError, match=r"links to .*b/f2.h5, which does not exist"):
        sum_scans([a, b], "sum2")
    assert not (tmp_path / "sim" / "xtal1" / "sim_sum2.nxs").exists()
    assert not (tmp_path / "sim" / "xtal1" / "sum2").exists()


def test_sum_overflow_leaves_nothing(tmp_path):
    a = small_scan(tmp_path, "a", seed=1)
    b = small_scan(tmp_path, "b", seed=2)
    for path in (a, b):
        with h5py.File(path.parent / path.stem[4:] / "f2.h5", "r+") as f:
            f["entry/data/data"][3, 5, 7] = 2**30 + 5
    with pytest.raises(ScanFileError, match=r"entry f2 exceeds the int32 range at frame 3"):
        sum_scans([a, b], "sum")
    label_dir = a.parent
    assert not (label_dir / "sim_sum.nxs").exists() and not (label_dir / "sum").exists()
    assert not leftovers(label_dir)


def test_cli_sum_scans(tmp_path, capsys):
    a = small_scan(tmp_path, "a", seed=1)
    b = small_scan(tmp_path, "b", seed=2)
    assert main(["sum-scans", str(a), str(b), "--output-scan", "ab", "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == str(a.parent / "sim_ab.nxs")
    assert main(["sum-scans", str(a), str(b), "--output-scan", "ab"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nxrefine-bs: error: ") and "already exists" in err
    assert err.count("\n") == 1
    assert main(["sum-scans", str(a), str(b), "-o", "ab", "--overwrite", "--no-progress"]) == 0
    assert main(["sum-scans", "--help"]) == 0
    assert "--output-scan" in capsys.readouterr().out
