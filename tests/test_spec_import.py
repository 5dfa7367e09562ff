"""SPEC parsing and the QM2 import from a simulated raw tree (real SPEC, CBF and TIFF files)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from nxrefine_bs.beamlines.qm2 import QM2Beamline, RawDataError
from nxrefine_bs.cli import main
from nxrefine_bs.errors import ExperimentError, FileExistsNXError, SpecFileError, TemplateError
from nxrefine_bs.experiment import Experiment
from nxrefine_bs.nexus.scanfile import check_data_link, read_geometry
from nxrefine_bs.nexus.template import Position, create_configuration
from nxrefine_bs.simulation.frames import DetectorModel
from nxrefine_bs.simulation.spec import make_qm2_raw_tree
from nxrefine_bs.specfile import SpecFile

DETECTOR = "Imxpad S10"  # 120 x 80 pixels: the smallest pyFAI area detector
SAMPLE, LABEL = "TiSe2", "xtal1"
N_FRAMES = 6


def gapped_detector() -> DetectorModel:
    """The Imxpad S10 shape with two gap rows and a dead column (frames hold -1 there)."""
    mask = np.zeros((120, 80), dtype=np.int8)
    mask[59:61, :] = 1
    mask[:, 40] = 1
    return DetectorModel(DETECTOR, (120, 80), 0.13, mask)


@pytest.fixture
def qm2(tmp_path: Path, server_settings: Path) -> Experiment:
    """A QM2 experiment with raw_home = <tmp>/raw and raw_path = raw6M."""
    return Experiment.create(
        tmp_path / "analysis", "run1", beamline="QM2", raw_home=tmp_path / "raw", raw_path="raw6M"
    )


@pytest.fixture
def s10(qm2: Experiment) -> Path:
    """Configuration ``s10``: two positions, as the simulated rotations."""
    return create_configuration(
        qm2.configuration_file("s10"),
        detector=DETECTOR,
        positions=[Position(chi=-90.0), Position(chi=-90.0, omega=15.0)],
    )


def make_tree(experiment: Experiment, **kwargs):
    beamline = QM2Beamline()
    options = {
        "spec_file": beamline.spec_file_candidates(experiment, SAMPLE)[0],
        "sample": SAMPLE,
        "label": LABEL,
        "scans": {"300K": 300.0, "300Kb": 300.0},
        "positions": [(-90.0, 0.0, 0.0), (-85.0, 15.0, 2.5)],
        "detector": gapped_detector(),
        "n_frames": N_FRAMES,
        "seed": 3,
    }
    options.update(kwargs)
    return make_qm2_raw_tree(beamline.raw_directory(experiment), **options)


@pytest.fixture
def tree(qm2: Experiment, s10: Path):
    return make_tree(qm2)


def snapshot(root: Path) -> dict[str, tuple[int, str | None]]:
    """Every path under ``root`` with its mtime and content hash."""
    out = {}
    for path in sorted(root.rglob("*")):
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        out[str(path.relative_to(root))] = (path.stat().st_mtime_ns, digest)
    return out


def analysis_files(experiment: Experiment) -> list[str]:
    sample_dir = experiment.directory / SAMPLE
    if not sample_dir.exists():
        return []
    return sorted(str(p.relative_to(sample_dir)) for p in sample_dir.rglob("*"))


# --------------------------------------------------------------------------- SPEC parser

GOOD_SPEC = """#F demo
#E 1700000000
#D Tue Oct 10 12:00:00 2023
#C header comment
#O0 phi  chi  th
#O1 Two Theta  samz

#S 7  flyangle phi 0 2 4 0.5
#D Tue Oct 10 12:01:00 2023
#T 0.5  (Seconds)
#P0 0 90 1.5
#P1 12.5 -3
#L phi  Two Theta  flyc1

0 1 100
#C a comment inside the data
0.5 1 101
@A 1 2 3
1 1 102
1.5 1 103

#S 8  ascan th 0 1 1 1
#L th  flyc1
0 5
1 6
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_specfile(tmp_path):
    with SpecFile(write(tmp_path / "demo", GOOD_SPEC)) as spec:
        assert spec.keys() == ["7.1", "8.1"] and len(spec) == 2
        assert 7 in spec and "7.1" in spec and "7.2" not in spec and 9 not in spec
        scan = spec.scan(7)
        assert spec.scan("7.1") is scan
        assert spec.scan(8).line == 22
        with pytest.raises(SpecFileError, match=r"demo has no scan 9 \(it has scans 7..8\)"):
            spec.scan(9)
        with pytest.raises(SpecFileError, match=r"'seven' is not a scan key"):
            spec.scan("seven")
    with SpecFile(tmp_path / "demo") as again:
        pass
    with pytest.raises(SpecFileError, match=r"demo, scan 8.1 \(line 22\): the file was closed"):
        again.scan(8)
    assert (scan.key, scan.number, scan.order, scan.line) == ("7.1", 7, 1, 8)
    assert scan.command == "flyangle phi 0 2 4 0.5"
    assert scan.labels == ["phi", "Two Theta", "flyc1"]
    assert scan.data.shape == (4, 3)
    assert scan.column("FLYC1").tolist() == [100, 101, 102, 103]
    assert scan.columns()["Two Theta"].tolist() == [1, 1, 1, 1]
    assert scan.positioners == {"phi": 0, "chi": 90, "th": 1.5, "Two Theta": 12.5, "samz": -3}
    assert scan.count_time == 0.5
    assert scan.start_time == "2023-10-10T12:01:00"
    assert scan.header["C"] == "a comment inside the data"  # silx's header lines
    scan.check_data()  # the @A line and the comment are not data rows
    eight = spec.scan(8)  # read after the file was closed: kept from before
    assert eight.start_time == "2023-10-10T12:00:00"  # falls back on the file date
    assert eight.positioners == {}  # no #P lines
    with pytest.raises(SpecFileError, match="no column 'sampleT'"):
        scan.column("sampleT")
    with pytest.raises(SpecFileError, match="no position for motor 'omega'"):
        scan.positioner("omega")


def test_specfile_repeated_scan_number(tmp_path):
    """SPEC restarts its numbering: both scans are kept and addressed as silx does."""
    text = GOOD_SPEC + "\n#S 8  ascan th 0 2 2 1\n#L th  flyc1\n0 7\n1 8\n2 9\n"
    path = write(tmp_path / "demo", text)
    with SpecFile(path) as spec:
        assert spec.keys() == ["7.1", "8.1", "8.2"]
        assert spec.numbers == [7, 8, 8]
        assert spec.scan("8.1").nrows == 2
        second = spec.scan("8.2")
        assert (second.number, second.order, second.line) == (8, 2, 27)
        assert second.column("flyc1").tolist() == [7, 8, 9]
        with pytest.raises(
            SpecFileError, match=r"has scan 8 2 times: '8.1' \(line 22\), '8.2' \(line 27\)"
        ):
            spec.scan(8)


def _check_data(spec, key):
    spec.scan(key).check_data()


@pytest.mark.parametrize(
    ("change", "action", "message"),
    [
        (("#S 7  flyangle", "#S seven  flyangle"), list, r"line 8: '#S' must be followed by a sc"),
        (("#S 8  ascan th 0 1 1 1", "#S"), list, r"line 22: '#S' must be followed by a scan"),
        (
            ("0.5 1 101", "0.5 1 101 7"),
            lambda spec: _check_data(spec, 7),
            r"line 17: data row of scan 7.1 has 4 values but '#L' names 3",
        ),
        (
            ("1 1 102", "1 x 102"),
            lambda spec: _check_data(spec, 7),
            r"line 19: data row of scan 7.1 holds 'x'",
        ),
        (
            ("#P1 12.5 -3", "#P1 12.5 -3 4"),
            lambda spec: spec.scan(7),
            r"line 12 \(scan 7.1\): '#P1' has 3 positions but '#O1' names 2",
        ),
        (
            ("#P1 12.5 -3", "#P2 1"),
            lambda spec: spec.scan(7),
            r"line 12 \(scan 7.1\): '#P2' has no matching '#O2'",
        ),
        (
            ("#P0 0 90 1.5", "#P0 0 ninety 1.5"),
            lambda spec: spec.scan(7),
            r"line 11 \(scan 7.1\): '#P0 0 ninety 1.5' holds a value that is not a number",
        ),
        (
            ("#L th  flyc1\n", ""),
            lambda spec: _check_data(spec, 8),
            r"line 23: data row of scan 8.1 comes before any '#L' column labels",
        ),
        (
            ("#T 0.5", "#T soon"),
            lambda spec: spec.scan(7).count_time,
            r"scan 7.1 \(line 8\): '#T' must start with a counting time",
        ),
    ],
)
def test_specfile_malformed(tmp_path, change, action, message):
    """What silx reads leniently (a bad row skipped, a bad number as 0) is an error here."""
    old, new = change
    assert old in GOOD_SPEC
    path = write(tmp_path / "bad", GOOD_SPEC.replace(old, new, 1))
    with SpecFile(path) as spec, pytest.raises(SpecFileError, match=message) as info:
        action(spec)
    assert str(path) in str(info.value)


def test_specfile_not_spec(tmp_path):
    with pytest.raises(SpecFileError, match="does not exist"):
        SpecFile(tmp_path / "missing")
    with pytest.raises(SpecFileError, match="is not a regular file"):
        SpecFile(tmp_path)
    with pytest.raises(SpecFileError, match=r"numbers is not a SPEC file silx can read .* has 0"):
        SpecFile(write(tmp_path / "numbers", "1 2 3\n"))
    with pytest.raises(SpecFileError, match="is not a SPEC file"):
        SpecFile(write(tmp_path / "empty", "\n\n"))
    with SpecFile(write(tmp_path / "header", "#F header\n#D Tue Oct 10 12:00:00 2023\n")) as spec:
        assert spec.keys() == [] and 1 not in spec


# --------------------------------------------------------------------------- import


def test_import_matches_simulator(qm2, s10, tree):
    raw_before = snapshot(qm2.directory.parents[2] / "raw")
    beamline = QM2Beamline()
    written = beamline.import_data(qm2, "s10", SAMPLE, LABEL)
    label_dir = qm2.sample_dir(SAMPLE, LABEL)
    assert written == [label_dir / "TiSe2_300K.nxs", label_dir / "TiSe2_300Kb.nxs"]
    assert snapshot(qm2.directory.parents[2] / "raw") == raw_before  # raw tree untouched
    assert not list(label_dir.rglob("*.tmp")) and not list(label_dir.rglob("*.lock"))

    for scan_file, scan in zip(written, ("300K", "300Kb"), strict=True):
        rotations = tree.scan(scan)
        temperatures = np.concatenate([r.temperature for r in rotations])
        with h5py.File(scan_file, "r") as f:
            assert sorted(k for k in f if k.startswith("f")) == ["f1", "f2"]
            sample = f["entry/sample"]
            assert sample["temperature"][()] == pytest.approx(temperatures.mean(), abs=1e-12)
            assert sample["temperature"].attrs["units"] == "K"
            assert f["entry/start_time"][()].decode() == rotations[0].date.isoformat()
            for rot in rotations:
                fe = f[rot.entry]
                sim = rot.simulator
                assert fe["scan_number"][()] == rot.scan_number
                assert fe["start_time"][()].decode() == rot.date.isoformat()
                link = fe["data"].get("data", getlink=True)
                assert isinstance(link, h5py.ExternalLink)
                assert link.filename == f"{scan}/{rot.entry}.h5"  # relative
                assert link.path == "/entry/data/data"
                stack = fe["data/data"]
                assert stack.dtype == np.int32 and stack.chunks == (1, 120, 80)
                np.testing.assert_array_equal(stack[()], sim.frames())
                assert (stack[:, 59:61, :] == -1).all()
                mon = fe["monitor"]
                assert mon.attrs["signal"] == "flyc1"
                np.testing.assert_array_equal(mon["flyc1"][()], rot.flyc1)
                np.testing.assert_array_equal(mon["flyc2"][()], rot.flyc2)
                gon = fe["instrument/goniometer"]
                np.testing.assert_allclose(gon["phi"][()], sim.phi, atol=1e-12)
                assert gon["phi"].attrs["step"] == pytest.approx(0.5)
                assert gon["phi"].attrs["end"] == pytest.approx(rot.phi_end)
                assert gon["chi"][()] == pytest.approx(sim.geometry.chi)  # 90 - SPEC chi
                assert gon["chi"][()] == pytest.approx(90.0 - rot.spec_chi)
                assert gon["theta"][()] == pytest.approx(rot.spec_th)
                assert fe["data/frame_number"][()].tolist() == list(range(N_FRAMES))
                assert fe["instrument/detector/frame_time"][()] == pytest.approx(0.1)
                np.testing.assert_array_equal(fe["instrument/logs/sampleT"][()], rot.temperature)
                assert "nxlink" in fe["nxworkflow"]
                geometry = read_geometry(fe)
                assert geometry.phi_start == pytest.approx(sim.geometry.phi_start)
                assert geometry.phi_step == pytest.approx(sim.geometry.phi_step)
                assert geometry.chi == pytest.approx(sim.geometry.chi)
                assert geometry.omega == pytest.approx(sim.geometry.omega)
                assert fe["sample"] == f["entry/sample"]  # hard link
            for rot in rotations:
                assert check_data_link(scan_file, rot.entry) == label_dir / scan / f"{rot.entry}.h5"

    from nexusformat.nexus import nxload

    root = nxload(str(written[0]))
    assert root["f2/data/data"].shape == (N_FRAMES, 120, 80)


def test_simulated_spec_file_as_silx_reads_it(qm2, s10):
    """The simulator writes real-format SPEC: silx reads it, names and MCA lines included."""
    from silx.io.specfile import SpecFile as SilxSpecFile

    tree = make_tree(qm2, mca_channels=40, n_frames=4)
    text = tree.spec_file.read_text()
    assert "#O0    phi  chi  th  Two Theta\n" in text
    assert "#O1    sample x  sample y  sample z\n" in text
    continued = [line for line in text.splitlines() if line.endswith("\\")]
    assert len(continued) == 2 * 4 * 4  # 40 channels: 2 continued lines per frame
    silx_file = SilxSpecFile(str(tree.spec_file))
    try:
        assert list(silx_file.keys()) == ["1.1", "2.1", "3.1", "4.1"]
        for rot, silx_scan in zip(tree.rotations, silx_file, strict=True):
            assert silx_scan.labels == ["phi", "Epoch", "Seconds", "flyc1", "flyc2", "sampleT"]
            np.testing.assert_array_equal(silx_scan.data_column_by_name("flyc1"), rot.flyc1)
            np.testing.assert_array_equal(silx_scan.data_column_by_name("sampleT"), rot.temperature)
            assert silx_scan.motor_names[3:5] == ["Two Theta", "sample x"]
            assert silx_scan.motor_position_by_name("chi") == pytest.approx(rot.spec_chi)
            assert len(silx_scan.mca) == 4 and len(silx_scan.mca[0]) == 40
    finally:
        silx_file.close()


def test_import_real_format_spec(qm2, s10):
    """Motor names with single spaces inside and MCA lines with '\\' continuations."""
    tree = make_tree(qm2, mca_channels=40, n_frames=4)
    written = QM2Beamline().import_data(qm2, "s10", SAMPLE, LABEL, scans=["300Kb"])
    with h5py.File(written[0], "r") as f:
        for rot in tree.scan("300Kb"):
            fe = f[rot.entry]
            assert fe["scan_number"][()] == rot.scan_number
            assert fe["instrument/logs/spec_scan"][()].decode() == f"{rot.scan_number}.1"
            np.testing.assert_array_equal(fe["data/data"][()], rot.simulator.frames())
            np.testing.assert_array_equal(fe["monitor/flyc1"][()], rot.flyc1)
            np.testing.assert_array_equal(fe["instrument/logs/sampleT"][()], rot.temperature)
            assert fe["instrument/goniometer/chi"][()] == pytest.approx(90.0 - rot.spec_chi)
            assert fe["instrument/goniometer/theta"][()] == pytest.approx(rot.spec_th)
            positions = fe["instrument/logs/positioners"]
            assert positions["Two_Theta"].attrs["spec_name"] == "Two Theta"
            assert positions["sample_y"][()] == -1.5
    paths = qm2.scan_paths(SAMPLE, LABEL, "300Kb")
    assert QM2Beamline().read_monitor(paths, "f2", "flyc2").tolist() == list(
        tree.scan("300Kb")[1].flyc2
    )


def test_import_refuses_to_replace(qm2, s10, tree):
    beamline = QM2Beamline()
    written = beamline.import_data(qm2, "s10", SAMPLE, LABEL)
    label_dir = written[0].parent
    stack = label_dir / "300K" / "f1.h5"
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (written[0], stack)}
    with pytest.raises(FileExistsNXError, match=r"TiSe2_300K.nxs already exists.*--overwrite"):
        beamline.import_data(qm2, "s10", SAMPLE, LABEL)
    written[0].unlink()  # a stack alone also blocks the import
    with pytest.raises(FileExistsNXError, match=r"detector stack .*300K/f1.h5 already exists"):
        beamline.import_data(qm2, "s10", SAMPLE, LABEL, scans=["300K"])
    assert not written[0].exists()
    assert (stack.stat().st_mtime_ns, stack.read_bytes()) == before[stack]
    again = beamline.import_data(qm2, "s10", SAMPLE, LABEL, overwrite=True)
    assert again == written
    with h5py.File(again[0], "r") as f:
        np.testing.assert_array_equal(
            f["f1/data/data"][()], tree.scan("300K")[0].simulator.frames()
        )


def test_import_tiff_without_raw_path(tmp_path, server_settings):
    exp = Experiment.create(
        tmp_path / "analysis", "run2", beamline="QM2", raw_home=tmp_path / "raw"
    )
    create_configuration(
        exp.configuration_file("one"), detector=DETECTOR, positions=[Position(chi=-90.0)]
    )
    beamline = QM2Beamline()
    raw = beamline.raw_directory(exp)
    assert raw == tmp_path / "raw" / "run2"
    tree = make_qm2_raw_tree(
        raw,
        sample=SAMPLE,
        label=LABEL,
        scans={"20K": 20.0, "30K": 30.0},
        positions=[(-90.0, 0.0, 0.0)],
        detector=gapped_detector(),
        n_frames=4,
        image_format="tif",
        first_scan_number=41,
    )
    assert tree.spec_file == raw / SAMPLE / SAMPLE  # no raw_path: SPEC file beside the labels
    assert beamline.spec_file(exp, SAMPLE) == tree.spec_file
    written = beamline.import_data(exp, exp.configuration_file("one"), SAMPLE, LABEL, scans=["30K"])
    assert [p.name for p in written] == ["TiSe2_30K.nxs"]
    rot = tree.scan("30K")[0]
    with h5py.File(written[0], "r") as f:
        assert f["f1/scan_number"][()] == 42
        np.testing.assert_array_equal(f["f1/data/data"][()], rot.simulator.frames())
        assert f["entry/sample/temperature"][()] == pytest.approx(rot.temperature.mean())
    paths = exp.scan_paths(SAMPLE, LABEL, "30K")
    np.testing.assert_array_equal(beamline.read_monitor(paths, "f1", "flyc1"), rot.flyc1)
    assert beamline.read_monitor(paths, "f1", "MCS1") is None
    assert beamline.start_time(paths, "f1") == rot.date.isoformat()
    assert beamline.read_sample(paths)["temperature"] == pytest.approx(rot.temperature.mean())
    gon = beamline.read_goniometer(paths, "f1")
    assert gon["chi"] == pytest.approx(-90.0) and gon["phi_step"] == pytest.approx(0.5)
    assert set(beamline.read_logs(paths, "f1")) >= {"phi", "flyc1", "flyc2", "sampleT"}
    assert beamline.read_logs(exp.scan_paths(SAMPLE, LABEL, "20K"), "f1") == {}


def test_bad_spec_file_leaves_nothing(qm2, s10, tree):
    text = tree.spec_file.read_text()
    lines = text.splitlines()
    bad = next(i for i, line in enumerate(lines) if line.startswith("#S 2"))
    lines[bad + 9] = lines[bad + 9] + " 12"  # a data row of scan 2 gets an extra value
    tree.spec_file.write_text("\n".join(lines) + "\n")
    with pytest.raises(SpecFileError) as info:
        QM2Beamline().import_data(qm2, "s10", SAMPLE, LABEL)
    message = str(info.value)
    assert str(tree.spec_file) in message and f"line {bad + 10}:" in message
    assert "7 values but '#L' names 6 columns" in message
    assert analysis_files(qm2) == []


def test_spec_scan_missing_for_images(qm2, s10, tree):
    rot = tree.scan("300Kb")[1]
    rot.image_dir.rename(rot.image_dir.with_name(f"{SAMPLE}_099"))
    with pytest.raises(SpecFileError, match=r"has no scan 99 .*\(images in .*TiSe2_099\)"):
        QM2Beamline().import_data(qm2, "s10", SAMPLE, LABEL)
    assert analysis_files(qm2) == []  # every scan is checked before anything is written


def test_missing_image_directory(qm2, s10, tree):
    beamline = QM2Beamline()
    for image in tree.scan("300K")[1].images:
        image.unlink()
    with pytest.raises(RawDataError, match=r"image directory .*TiSe2_002 holds no cbf/tif/tiff"):
        beamline.import_data(qm2, "s10", SAMPLE, LABEL)
    tree.scan("300K")[1].image_dir.rmdir()
    with pytest.raises(RawDataError, match=r"300K has 1 rotations \(SPEC scans 1\) but config"):
        beamline.import_data(qm2, "s10", SAMPLE, LABEL)
    with pytest.raises(RawDataError, match=r"raw scan directory .*/4K does not exist"):
        beamline.import_data(qm2, "s10", SAMPLE, LABEL, scans=["4K"])
    with pytest.raises(RawDataError, match=r"raw directory .*raw6M/TiSe2/xtal9 .* does not exist"):
        beamline.import_data(qm2, "s10", SAMPLE, "xtal9")
    assert analysis_files(qm2) == []
    assert isinstance(RawDataError("x"), ExperimentError)


def test_frame_count_mismatch(qm2, s10, tree):
    tree.scan("300K")[0].images[-1].unlink()
    with pytest.raises(SpecFileError, match=r"records 6 phi points, but the image directory holds"):
        QM2Beamline().import_data(qm2, "s10", SAMPLE, LABEL)
    assert analysis_files(qm2) == []


def test_unreadable_image_leaves_nothing(qm2, s10, tree):
    bad = tree.scan("300K")[1].images[3]
    bad.write_bytes(b"this is not a CBF file")
    raw_before = snapshot(qm2.directory.parents[2] / "raw")
    with pytest.raises(RawDataError, match=rf"cannot read image {bad}"):
        QM2Beamline().import_data(qm2, "s10", SAMPLE, LABEL)
    assert analysis_files(qm2) == []  # no scan file, stack or temporary file
    assert snapshot(qm2.directory.parents[2] / "raw") == raw_before


def test_wrong_configuration(qm2, tree):
    create_configuration(
        qm2.configuration_file("p100k"),
        detector="Pilatus 100k",
        positions=[Position(chi=-90.0), Position(chi=-90.0, omega=15.0)],
    )
    with pytest.raises(RawDataError, match=r"is 120x80 pixels but the configuration's detector"):
        QM2Beamline().import_data(qm2, "p100k", SAMPLE, LABEL)
    assert analysis_files(qm2) == []
    with pytest.raises(TemplateError, match="does not exist"):
        QM2Beamline().import_data(qm2, "nothing", SAMPLE, LABEL)


def test_no_spec_file(qm2, s10, tree):
    tree.spec_file.unlink()
    with pytest.raises(RawDataError, match=r"no SPEC file for sample 'TiSe2': looked for"):
        QM2Beamline().import_data(qm2, "s10", SAMPLE, LABEL)


# --------------------------------------------------------------------------- CLI


def test_cli_import_scans(qm2, s10, tree, capsys):
    args = ["import-scans", "-x", str(qm2.directory), "--sample", SAMPLE, "--label", LABEL]
    args += ["--configuration", "s10", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out.split()
    assert [Path(p).name for p in out] == ["TiSe2_300K.nxs", "TiSe2_300Kb.nxs"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("nxrefine-bs: error: scan file ") and "already exists" in err
    assert err.count("\n") == 1
    assert main([*args, "--overwrite", "--scan", "300Kb"]) == 0
    assert capsys.readouterr().out.strip().endswith("TiSe2_300Kb.nxs")
    assert main(["import-scans", "--help"]) == 0
    assert "--configuration" in capsys.readouterr().out


def test_cli_import_needs_import_beamline(experiment, capsys):
    args = ["import-scans", "-x", str(experiment.directory), "--sample", "s", "--label", "l"]
    assert main([*args, "-c", "small"]) == 2
    assert "beamline 'sim'" in capsys.readouterr().err
