"""The SPEC reader over the real SPEC files that spec2nexus ships, scan by scan against silx.

The corpus is every file in ``spec2nexus/data`` that holds a ``#S`` scan line at
the start of a line, the one control line every SPEC data file has (18 files from APS
and other beamlines; the others are HDF5 files, a README and a folder).  The test
checks that this set holds every file the folder's README lists as "SPEC scans" and
is exactly the set of files silx opens, so the selection does not rest on silx alone.

For every scan: the key (``"4.2"`` for a repeated number), the ``#S`` line, the
command, the labels, the data and the ``#O``/``#P`` positioners equal what silx
reads.  silx pairs all ``#O`` names with all ``#P`` values in one list, which
goes wrong in two files (a second header section in ``lmn40.spe``, single-space
names in ``user6idd.dat``); there the positioners are checked against spec2nexus
and against the file's own group lines.  Last, QM2 rotations appended to two real
files (6-ID-D's single-spaced names; 33-ID's double-spaced names and ``\\``
continuation lines) import as from the simulator's own files.
"""

from __future__ import annotations

import importlib.resources
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from silx.io.specfile import SfError
from silx.io.specfile import SpecFile as SilxSpecFile

from nxrefine_bs.beamlines.qm2 import QM2Beamline
from nxrefine_bs.errors import SpecFileError
from nxrefine_bs.experiment import Experiment
from nxrefine_bs.nexus.template import Position, create_configuration
from nxrefine_bs.simulation.spec import make_qm2_raw_tree
from nxrefine_bs.specfile import SpecFile

DATA = Path(str(importlib.resources.files("spec2nexus") / "data"))

SILX_MISPAIRED = {"lmn40.spe": 256, "user6idd.dat": 2}
"""Scans where silx's motor names and positions differ in number."""


def spec_files() -> list[str]:
    """Regular files of the folder with a ``#S`` line (at the start of a line)."""
    scan_line = re.compile(rb"(?:^|\n)#S[ \t]")
    return sorted(
        p.name for p in DATA.iterdir() if p.is_file() and scan_line.search(p.read_bytes())
    )


SPEC_FILES = spec_files()


def silx_opens(path: Path) -> bool:
    try:
        SilxSpecFile(str(path)).close()
    except SfError:
        return False
    return True


def test_corpus_is_the_spec_files_silx_opens():
    assert len(SPEC_FILES) == 18
    readme = (DATA / "README.txt").read_text(encoding="utf-8")
    listed = re.findall(r"^(\S+)\s+SPEC scans\s", readme, flags=re.MULTILINE)
    assert len(listed) == 17 and set(listed) <= set(SPEC_FILES)
    opened = sorted(p.name for p in DATA.iterdir() if p.is_file() and silx_opens(p))
    assert opened == SPEC_FILES


def test_files_silx_cannot_read_are_named():
    """The folder's HDF5 files, README and sub-folder: errors naming the file and why."""
    for name in ("Data_Q.h5", "README.txt"):
        with pytest.raises(SpecFileError, match=r"is not a SPEC file silx can read") as info:
            SpecFile(DATA / name)
        assert str(DATA / name) in str(info.value) and "it has 0" in str(info.value)
    with pytest.raises(SpecFileError, match=r"02_03_setup_fly is not a regular file"):
        SpecFile(DATA / "02_03_setup_fly")


def silx_positioners(scan) -> dict[str, float] | None:
    """silx's names paired with its positions (None where the counts differ)."""
    names = [name.strip() for name in scan.motor_names]  # silx keeps a CR of CRLF files
    values = list(scan.motor_positions)
    if len(names) != len(values):
        return None
    return {name: value for name, value in zip(names, values, strict=True) if name}


@pytest.mark.parametrize("name", SPEC_FILES)
def test_file_equals_silx(name):
    path = DATA / name
    lines = path.read_bytes().splitlines()
    silx_file = SilxSpecFile(str(path))
    mispaired = 0
    try:
        with SpecFile(path) as spec:
            assert len(spec) == len(silx_file) > 0
            assert spec.keys() == list(silx_file.keys())
            for silx_scan, scan in zip(silx_file, spec, strict=True):
                assert scan.key == f"{silx_scan.number}.{silx_scan.order}"
                assert lines[scan.line - 1].split()[:2] == [b"#S", str(scan.number).encode()]
                assert scan.command == " ".join(silx_scan.scan_header_dict["S"].split()[1:])
                assert scan.labels == list(silx_scan.labels)
                expected = np.asarray(silx_scan.data, dtype=np.float64).T
                assert scan.data.shape == expected.shape
                np.testing.assert_array_equal(scan.data, expected)  # NaN equals NaN
                pairs = silx_positioners(silx_scan)
                if pairs is None:
                    mispaired += 1
                else:
                    assert scan.positioners == pairs, scan.key
    finally:
        silx_file.close()
    assert mispaired == SILX_MISPAIRED.get(name, 0)


def test_repeated_scan_numbers_are_kept():
    """20220311-161530.dat restarts its numbering (78 scans, 5 numbers below 6)."""
    with SpecFile(DATA / "20220311-161530.dat") as spec:
        assert len(spec) == 78
        assert spec.keys()[:5] == ["2.1", "3.1", "4.1", "1.1", "2.2"]
        second = spec.scan("4.2")
        assert (second.number, second.order) == (4, 2)
        assert second.line > spec.scan("4.1").line
        with pytest.raises(SpecFileError, match=r"has scan 4 \d+ times: '4.1' \(line \d+\)"):
            spec.scan(4)
    with SpecFile(DATA / "twoc.dat") as spec:
        assert spec.keys() == ["1.1", "2.1", "2.2"]


@pytest.mark.parametrize("key", ["7", "8", "100", "262"])
def test_second_header_section_as_spec2nexus(key):
    """lmn40.spe restarts its header at line 386; silx pairs scans 7.. with the wrong one."""
    from spec2nexus.spec import SpecDataFile

    theirs = SpecDataFile(str(DATA / "lmn40.spe")).getScan(key)
    theirs.interpret()
    with SpecFile(DATA / "lmn40.spe") as spec:
        scan = spec.scan(key)
    assert scan.positioners == pytest.approx(dict(theirs.positioner))
    if scan.line < 386:  # scan 7 is the last one of the first header
        assert len(scan.positioners) == 13 and "Kohzu_th" in scan.positioners
    else:
        assert len(scan.positioners) == 17 and "DCM Theta" in scan.positioners


def test_single_space_motor_names():
    """6-ID-D writes '#O0 Delta Eta Chi Phi ...': one name per value of '#P0'."""
    path = DATA / "user6idd.dat"
    silx_file = SilxSpecFile(str(path))
    try:
        with SpecFile(path) as spec:
            for silx_scan, scan in zip(silx_file, spec, strict=True):
                names = " ".join(silx_scan.motor_names).split()
                assert list(scan.positioners) == names
                assert list(scan.positioners.values()) == list(silx_scan.motor_positions)
                assert scan.positioner("chi") == 90.0 and scan.positioner("Phi") == -3.0
    finally:
        silx_file.close()


ROW_PROBLEMS = {
    ("05_02_test.dat", "1.6"): r"line 1042: data row of scan 1.6 holds 'None', which is not",
    ("05_02_test.dat", "1.7"): r"line 1072: data row of scan 1.7 holds 'None'",
    ("05_02_test.dat", "1.8"): r"line 1102: data row of scan 1.8 holds 'None'",
    ("05_02_test.dat", "1.9"): r"line 1132: data row of scan 1.9 holds 'None'",
    ("05_02_test.dat", "1.16"): r"line 1391: data row of scan 1.16 holds 'None'",
    # the scan abort the spec2nexus README describes ("lines 5918-9, in scan 92")
    ("CdSe", "92.1"): r"line 5918: data row of scan 92.1 has 29 values but '#L' names 55",
    # '#L' written with single spaces: silx sees one label for 25 values
    ("user6idd.dat", "2.1"): r"line 64: data row of scan 2.1 has 25 values but '#L' names 1 ",
}
"""The scans whose data rows an import refuses, and why (silx reads them leniently)."""


def test_data_row_check_over_corpus():
    """The import's row check passes every well-formed scan and names the bad ones."""
    found = {}
    for name in SPEC_FILES:
        with SpecFile(DATA / name) as spec:
            for scan in spec:
                try:
                    scan.check_data()  # MCA '@A' lines and their '\' continuations skipped
                except SpecFileError as exc:
                    found[(name, scan.key)] = str(exc)
    assert sorted(found) == sorted(ROW_PROBLEMS)
    for where, message in found.items():
        assert message.startswith(f"{DATA / where[0]}, line ")
        assert re.search(ROW_PROBLEMS[where], message), message


REAL_FILES = {
    # file: (line of its '#S 1', its last scan number, a motor name of its header)
    "user6idd.dat": (14, 2, "Delta"),  # 6-ID-D: names separated by single spaces
    "33id_spec.dat": (31, 106, "DCM theta"),  # double-space names, '\\' continuations
}


@pytest.mark.parametrize("name", sorted(REAL_FILES))
def test_qm2_import_from_real_spec_file(tmp_path, server_settings, name):
    """A real SPEC file, then QM2 rotations after a new header, as SPEC appends them.

    The file's own scan 1 is repeated by rotations numbered from 1, so the image
    directories cannot be matched (an error naming both); numbered after the file's
    last scan the import works and reads its positions from the second header section.
    """
    first_line, last_scan, motor = REAL_FILES[name]
    text = (DATA / name).read_bytes()
    assert text.splitlines()[first_line - 1].startswith(b"#S 1 ")
    assert motor.encode() in text
    if " " in motor:  # the real-format features this file brings
        assert re.search(rb"^#O\d+ .*\S  +" + motor.encode(), text, flags=re.MULTILINE)
        assert text.count(b"\\\n") > 1000
    exp = Experiment.create(
        tmp_path / "analysis", "run6", beamline="QM2", raw_home=tmp_path / "raw"
    )
    create_configuration(
        exp.configuration_file("one"), detector="Imxpad S10", positions=[Position(chi=-90.0)]
    )
    beamline = QM2Beamline()
    raw = beamline.raw_directory(exp)
    spec_path = raw / "sim" / "sim"
    spec_path.parent.mkdir(parents=True)
    shutil.copyfile(DATA / name, spec_path)
    options = {
        "spec_file": spec_path,
        "positions": [(-90.0, 0.0, 2.0)],
        "n_frames": 3,
        "append": True,
        "header": True,
        "mca_channels": 40,
    }
    from nxrefine_bs.simulation.frames import DetectorModel

    options["detector"] = DetectorModel("Imxpad S10", (120, 80), 0.13, np.zeros((120, 80), "i1"))
    make_qm2_raw_tree(raw, scans={"10K": 10.0}, first_scan_number=1, **options)
    with pytest.raises(
        SpecFileError, match=rf"has scan 1 2 times: '1.1' \(line {first_line}\), '1.2'"
    ):
        beamline.import_data(exp, "one", "sim", "xtal1")
    shutil.rmtree(raw / "sim" / "xtal1")
    number = last_scan + 1
    tree = make_qm2_raw_tree(raw, scans={"20K": 20.0}, first_scan_number=number, **options)
    written = beamline.import_data(exp, "one", "sim", "xtal1", scans=["20K"])
    rot = tree.scan("20K")[0]
    with h5py.File(written[0], "r") as f:
        assert f["f1/scan_number"][()] == number
        assert f["f1/instrument/logs/spec_scan"][()].decode() == f"{number}.1"
        np.testing.assert_array_equal(f["f1/data/data"][()], rot.simulator.frames())
        np.testing.assert_array_equal(f["f1/monitor/flyc1"][()], rot.flyc1)
        assert f["f1/instrument/goniometer/chi"][()] == pytest.approx(-90.0)
        assert f["f1/instrument/goniometer/theta"][()] == pytest.approx(2.0)
        assert f["entry/sample/temperature"][()] == pytest.approx(rot.temperature.mean())
        positions = f["f1/instrument/logs/positioners"]
        assert positions["Two_Theta"].attrs["spec_name"] == "Two Theta"
        assert positions["sample_y"][()] == -1.5
        assert motor.replace(" ", "_") not in positions  # the real header does not apply
    paths = exp.scan_paths("sim", "xtal1", "20K")
    assert beamline.start_time(paths, "f1") == rot.date.isoformat()
    with SpecFile(spec_path) as spec:  # the file's own scans read as before the rotations
        assert spec.numbers[-3:] == [last_scan, 1, number]
        assert motor in spec.scan("1.1").positioners
