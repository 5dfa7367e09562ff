"""The reduction command line (``nxrefine-bs lattice/max/find/refine/...``) and plans.

Everything runs on a real simulated scan (two rotations of a small detector) written by
:func:`~nxrefine_bs.simulation.scan.make_simulated_scan` inside a real experiment, so
the settings layers (experiment ``tasks/settings.ini``) apply as on a beamline.
"""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest

from nxrefine_bs.cli import main
from nxrefine_bs.nexus.geometry_io import read_orientation
from nxrefine_bs.nexus.provenance import process_done, read_process
from nxrefine_bs.plans.reduction import find_peaks, reduce_scan
from nxrefine_bs.reduce.lattice import Lattice, read_lattice
from nxrefine_bs.reduce.orient import misorientation
from nxrefine_bs.settings import update_settings
from nxrefine_bs.simulation.scan import make_simulated_scan
from nxrefine_bs.testing import closing_run_engine

N_FRAMES = 200  # 100 degrees at 0.5 deg/frame: ~100 peaks per rotation
THRESHOLD = 50.0
GRID = "-3,0.1,3"
SI = Lattice.from_space_group("Fm-3m", 5.43)
REDUCE_COMMANDS = (
    "lattice",
    "reduce",
    "max",
    "find",
    "refine",
    "prepare",
    "transform",
    "combine",
    "plot-slice",
)


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run ``nxrefine-bs argv`` in process; return (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    """The single ``nxrefine-bs: error: ...`` line of ``err`` (asserting there is one)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("nxrefine-bs: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def scan(experiment):
    """Two rotations (omega 0 and 15) of a silicon crystal in the test experiment."""
    return make_simulated_scan(experiment.directory, omegas=(0, 15), n_frames=N_FRAMES)


@pytest.fixture
def RE():
    """A RunEngine returning plan results (overrides the conftest fixture)."""
    with closing_run_engine(call_returns_result=True) as engine:
        yield engine


# ------------------------------------------------------------------------ help
@pytest.mark.parametrize("command", REDUCE_COMMANDS)
def test_help(capsys, command):
    code, out, err = cli(capsys, command, "--help")
    assert code == 0 and err == ""
    assert out.startswith("usage: nxrefine-bs " + command)


# ------------------------------------------------------------------------ lattice
def test_lattice_command(capsys, scan, tmp_path):
    code, out, err = cli(
        capsys, "lattice", scan.scan_file, "--space-group", "Fm-3m", "--cell", "5.43"
    )
    assert code == 0, err
    assert "F m -3 m" in out
    with h5py.File(scan.scan_file, "r") as f:
        sample = f["entry/sample"]
        assert read_lattice(sample) == SI
        assert sample["laue_group"][()].decode() == "m-3m"
        assert sample["unit_cell_group"][()].decode() == "cubic"
        assert f["f1/sample"] == sample  # the rotation entries share entry/sample

    # all six parameters, a hexagonal group given by number, and a CIF file
    code, _, err = cli(
        capsys, "lattice", scan.scan_file, "-g", "191", "-c", "3.2,3.2,5.2,90,90,120"
    )
    assert code == 0, err
    with h5py.File(scan.scan_file, "r") as f:
        assert read_lattice(f["entry"]).cell == (3.2, 3.2, 5.2, 90.0, 90.0, 120.0)
    code, _, err = cli(capsys, "lattice", scan.scan_file, "-g", "P6/mmm", "-c", "3.3,5.3")
    assert code == 0, err
    with h5py.File(scan.scan_file, "r") as f:
        assert read_lattice(f["entry"]).cell[:3] == (3.3, 3.3, 5.3)
    cif = tmp_path / "si.cif"
    cif.write_text(
        "data_si\n_cell_length_a 5.431\n_cell_length_b 5.431\n_cell_length_c 5.431\n"
        "_cell_angle_alpha 90\n_cell_angle_beta 90\n_cell_angle_gamma 90\n"
        "_symmetry_space_group_name_H-M 'F d -3 m'\n"
    )
    code, _, err = cli(capsys, "lattice", scan.scan_file, "--cif", cif)
    assert code == 0, err
    with h5py.File(scan.scan_file, "r") as f:
        lat = read_lattice(f["entry/sample"])
    assert lat.space_group.startswith("F d -3 m") and lat.a == 5.431


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["-g", "Fm-3m", "-c", "5.43,5.5,5.43,90,90,90"], "inconsistent with cubic"),
        (["-g", "Xq-9", "-c", "5.43"], "unknown space group 'Xq-9'"),
        (["-g", "P4/mmm", "-c", "4.0"], "needs a,c"),
        (["-g", "Fm-3m", "-c", "5.43,x"], "comma-separated numbers"),
        (["-g", "Fm-3m"], "give --space-group and --cell, or --cif"),
        (["-g", "Fm-3m", "-c", "5.43", "--cif", "x.cif"], "not both"),
        (["--cif", "missing.cif"], "missing.cif does not exist"),
    ],
)
def test_lattice_errors(capsys, scan, options, message):
    before = scan.scan_file.read_bytes()
    code, out, err = cli(capsys, "lattice", scan.scan_file, *options)
    assert code == 2 and out == ""
    assert message in one_line_error(err)
    assert scan.scan_file.read_bytes() == before  # nothing written


# ------------------------------------------------------------------------ step commands
def test_step_commands_end_to_end(capsys, scan):
    path = scan.scan_file
    assert cli(capsys, "lattice", path, "-g", "Fm-3m", "-c", "5.43")[0] == 0

    code, out, err = cli(capsys, "max", path, "--no-progress")
    assert code == 0, err
    rows = [line.split() for line in out.splitlines() if path.name in line]
    assert [row[:5] for row in rows] == [[path.name, "│", e, "│", "max"] for e in ("f1", "f2")]
    assert all("maximum=" in " ".join(row) for row in rows)  # a short table, not a dump

    code, out, err = cli(capsys, "find", path, "-t", THRESHOLD, "--no-progress")
    assert code == 0, err
    with h5py.File(path, "r") as f:
        for entry in ("f1", "f2"):
            assert process_done(f[entry], "nxmax") and process_done(f[entry], "nxfind")
            assert f[f"{entry}/peaks/x"].size > 20
            assert read_process(f[entry], "nxfind")["parameters"]["threshold"] == THRESHOLD

    code, out, err = cli(capsys, "refine", path, "--polar-max", "30", "--no-progress")
    assert code == 0, err
    with h5py.File(path, "r") as f:
        for entry in ("f1", "f2"):
            u = read_orientation(f[entry])
            # the cubic symmetry makes 24 matrices equivalent; compare modulo it
            assert misorientation(u, scan.crystal.U, SI) < 0.05
            assert read_process(f[entry], "nxrefine")["parameters"]["polar_max"] == 30.0
        np.testing.assert_allclose(read_lattice(f["entry/sample"]).a, 5.43, rtol=1e-3)

    code, out, err = cli(
        capsys, "transform", path, f"--qh={GRID}", f"--qk={GRID}", f"--ql={GRID}", "--no-progress"
    )
    assert code == 0, err
    for entry in ("f1", "f2"):
        assert (scan.scan_dir / f"{entry}_transform.nxs").stat().st_size > 0

    code, out, err = cli(capsys, "combine", path, "--no-progress")
    assert code == 0, err
    transform = scan.scan_dir / "transform.nxs"
    with h5py.File(path, "r") as f:
        assert process_done(f["entry"], "nxcombine")
        assert f["entry/transform/data"].shape == (61, 61, 61)
        assert np.nanmax(f["entry/transform/data"][()]) > 0

    png = scan.scan_dir / "hk0.png"
    code, out, err = cli(capsys, "plot-slice", transform, "--axis", "l", "--png", png)
    assert code == 0, err
    assert png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # done steps are skipped; --overwrite redoes them
    code, out, _ = cli(capsys, "max", path, "-e", "f2", "--no-progress")
    assert code == 0 and "already done (--overwrite to redo)" in out
    code, out, _ = cli(capsys, "max", path, "-e", "f2", "--no-progress", "--json")
    assert code == 0 and [r["skipped"] for r in json.loads(out)] == [True]
    code, out, _ = cli(capsys, "max", path, "-e", "f2", "--overwrite", "--no-progress", "--json")
    (result,) = json.loads(out)  # complete, never cut
    assert code == 0 and result["skipped"] is False and result["entry"] == "f2"
    assert result["scan_file"] == str(path) and "transmission_median" in result


def test_reduce_command_with_set(capsys, scan):
    code, out, err = cli(
        capsys, "reduce", scan.scan_file, "--steps", "max,find", "--set", "threshold=80",
        "--set", "min_pixels=4", "--no-progress", "--json",
    )  # fmt: skip
    assert code == 0, err
    steps = [(r["step"], r["entry"]) for r in json.loads(out)]
    assert steps == [("max", "f1"), ("max", "f2"), ("find", "f1"), ("find", "f2")]
    with h5py.File(scan.scan_file, "r") as f:
        for entry in ("f1", "f2"):
            params = read_process(f[entry], "nxfind")["parameters"]
            assert (params["threshold"], params["min_pixels"]) == (80.0, 4)
            assert f[f"{entry}/peaks/x"].size > 0
            assert not process_done(f[entry], "nxrefine")


# ------------------------------------------------------------------------ errors
def test_missing_scan_file(capsys, tmp_path):
    missing = tmp_path / "nope_300K.nxs"
    for argv in (["max"], ["reduce"], ["combine"], ["lattice", "-g", "225", "-c", "5.4"]):
        code, out, err = cli(capsys, argv[0], missing, *argv[1:])
        assert code == 2 and out == ""
        assert f"scan file {missing} does not exist" in one_line_error(err)


def test_unknown_step_and_bad_set(capsys, scan):
    code, _, err = cli(capsys, "reduce", scan.scan_file, "--steps", "max,fnd")
    assert code == 2
    assert "unknown reduction step 'fnd'" in one_line_error(err)
    code, _, err = cli(capsys, "reduce", scan.scan_file, "--steps", "max", "--set", "oops")
    assert code == 2
    assert "--set expects NAME=VALUE" in one_line_error(err)
    with h5py.File(scan.scan_file, "r") as f:
        assert not process_done(f["f1"], "nxmax")  # validated before any work
    code, _, err = cli(capsys, "max", scan.scan_file, "-e", "f7")
    assert code == 2
    assert "no rotation entries f7" in one_line_error(err)


def test_broken_data_link_names_the_missing_file(capsys, scan, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(scan.scan_file.parents[1], copy / "sim")
    scan_file = copy / "sim" / "xtal1" / scan.scan_file.name
    missing = scan_file.parent / "300K" / "f2.h5"
    missing.unlink()
    for argv in (["max", scan_file], ["find", scan_file, "-t", "50", "-e", "f2"]):
        code, _, err = cli(capsys, *argv, "--no-progress")
        assert code == 2
        line = one_line_error(err)
        assert str(missing) in line and "f2" in line
    assert scan.scan_dir.joinpath("f2.h5").is_file()  # the original is untouched


# ------------------------------------------------------------------------ plans
def test_reduction_plans(RE, scan, capsys):
    result = RE(reduce_scan(scan.scan_file, steps=["max", "find"], threshold=THRESHOLD))
    summaries = result.plan_result  # the plan returns its results (call_returns_result)
    assert result.exit_status == "success"
    bars = capsys.readouterr().err  # and shows each step's progress
    assert bars.count("100%") >= 4 and "f1" in bars and "f2" in bars
    assert set(summaries) == {"max:f1", "max:f2", "find:f1", "find:f2"}
    assert summaries["find:f1"]["npeaks"] > 20
    with h5py.File(scan.scan_file, "r") as f:
        assert f["f1/peaks/x"].size == summaries["find:f1"]["npeaks"]
        assert process_done(f["f2"], "nxmax") and process_done(f["f2"], "nxfind")
    # a step already done is skipped; the single-step plan takes entries
    again = RE(find_peaks(scan.scan_file, ["f2"], threshold=THRESHOLD)).plan_result
    assert list(again) == ["find:f2"] and again["find:f2"]["skipped"] is True


def test_settings_precedence(RE, experiment, scan):
    """Experiment ``tasks/settings.ini`` under explicit values, over the server defaults."""
    update_settings(experiment.settings_file, {"nxreduce.threshold": 120})
    RE(reduce_scan(scan.scan_file, steps=["find"], entries=["f1"]))
    with h5py.File(scan.scan_file, "r") as f:
        assert read_process(f["f1"], "nxfind")["parameters"]["threshold"] == 120.0
    RE(reduce_scan(scan.scan_file, steps=["find"], entries=["f1"], overwrite=True, threshold=70))
    with h5py.File(scan.scan_file, "r") as f:
        assert read_process(f["f1"], "nxfind")["parameters"]["threshold"] == 70.0
        n_explicit = f["f1/peaks/x"].size
    # the value used is recorded in the scan file's /entry/nxreduce, where NXRefine reads
    # it, so it now outranks the experiment file; the CLI follows the same rules
    assert main(["find", str(scan.scan_file), "-e", "f2", "--no-progress"]) == 0
    with h5py.File(scan.scan_file, "r") as f:
        assert read_process(f["f2"], "nxfind")["parameters"]["threshold"] == 70.0
    assert main(["find", str(scan.scan_file), "-e", "f1", "-t", "120", "-o", "--no-progress"]) == 0
    with h5py.File(scan.scan_file, "r") as f:
        assert read_process(f["f1"], "nxfind")["parameters"]["threshold"] == 120.0
        assert f["f1/peaks/x"].size < n_explicit  # a higher threshold finds fewer
