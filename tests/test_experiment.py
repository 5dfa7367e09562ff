"""Experiment layout: names, safe paths, scan directories, Experiment and ScanPaths."""

from __future__ import annotations

import os

import pytest

from nxrefine_bs.errors import (
    ExperimentError,
    InvalidNameError,
    NXRefineBSError,
    PathSafetyError,
    SettingsError,
)
from nxrefine_bs.experiment import (
    Experiment,
    ScanPaths,
    safe_join,
    scan_directory_name,
    validate_name,
)
from nxrefine_bs.settings import read_settings


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "empty"),
        ("../x", "separator"),
        ("..", "'..'"),
        ("a..b", "'..'"),
        ("a/b", "separator"),
        ("a\\b", "separator"),
        (".hidden", "starts with '.'"),
        ("tab\there", "control"),
        ("nul\x00", "control"),
        (" padded", "spaces"),
        ("x" * 129, "longer than"),
        (12, "must be text"),
    ],
)
def test_validate_name_rejects(name, reason):
    with pytest.raises(InvalidNameError, match="sample") as info:
        validate_name(name, "sample")
    assert reason in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, NXRefineBSError)


@pytest.mark.parametrize("name", ["TiSe2", "300K", "m12p5K", "xtal-1_a", "a.b", "Ni₃Al"])
def test_validate_name_accepts(name):
    assert validate_name(name, "label") == name


def test_safe_join(tmp_path):
    assert safe_join(tmp_path, "a", "b") == tmp_path / "a" / "b"
    assert safe_join(tmp_path, "a/../b") == tmp_path / "b"
    for parts in (("..",), ("a", "../../x"), ("/etc",)):
        with pytest.raises(PathSafetyError):
            safe_join(tmp_path, *parts)
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (tmp_path / "link").symlink_to(outside)
    with pytest.raises(PathSafetyError, match="resolves"):
        safe_join(tmp_path, "link", "file")


@pytest.mark.parametrize(
    ("value", "kwargs", "expected"),
    [
        (300, {}, "300K"),
        (300.0, {}, "300K"),
        (-12.5, {}, "m12p5K"),
        (12.25, {}, "12p25K"),
        (0.0001, {}, "0p0001K"),
        ("80", {}, "80K"),
        (-0.0, {}, "0K"),
        (5, {"units": "GPa", "prefix": "p"}, "p5GPa"),
        (1e20, {"units": ""}, "100000000000000000000"),
    ],
)
def test_scan_directory_name(value, kwargs, expected):
    assert scan_directory_name(value, **kwargs) == expected


@pytest.mark.parametrize("value", ["warm", float("nan"), float("inf"), None, True])
def test_scan_directory_name_rejects(value):
    with pytest.raises(InvalidNameError):
        scan_directory_name(value)
    with pytest.raises(InvalidNameError):
        scan_directory_name(1, units="K/s")


def test_create_experiment_layout(tmp_path, server_settings):
    exp = Experiment.create(
        tmp_path / "home", "exp1", beamline="QM2", raw_home=tmp_path / "raw", raw_path="raw6M"
    )
    assert exp.directory == tmp_path / "home" / "exp1" / "nxrefine"
    for d in (exp.tasks_dir, exp.calibrations_dir, exp.configurations_dir, exp.scripts_dir):
        assert d.is_dir()
    assert exp.settings_file == exp.tasks_dir / "settings.ini"
    values = read_settings(exp.settings_file, ("instrument", "nxrefine", "nxreduce"))
    assert values["instrument"]["instrument"] == "QM2"
    assert values["instrument"]["experiment"] == "exp1"
    assert values["instrument"]["raw_home"] == str(tmp_path / "raw")
    assert "[server]" not in exp.settings_file.read_text()
    assert exp.name == "exp1" and exp.beamline_name == "QM2"
    with pytest.raises(ExperimentError, match="already exists"):
        Experiment.create(tmp_path / "home", "exp1")
    assert Experiment.create(tmp_path / "home", "exp1", exist_ok=True) == exp
    assert Experiment.open(exp.directory) == exp


def test_create_without_analysis_path_or_server_file(tmp_path):
    # no server settings file: built-in defaults are used
    exp = Experiment.create(tmp_path, "plain", analysis_path="")
    assert exp.directory == tmp_path / "plain"
    assert exp.settings()["nxreduce"]["threshold"] == 50000


def test_create_rejects_bad_names_and_settings(tmp_path):
    with pytest.raises(InvalidNameError, match="experiment"):
        Experiment.create(tmp_path, "../up")
    with pytest.raises(InvalidNameError, match="analysis path"):
        Experiment.create(tmp_path, "ok", analysis_path="a/b")
    with pytest.raises(SettingsError, match="does not exist"):
        Experiment.create(tmp_path, "ok", settings_source=tmp_path / "missing.ini")
    bad = tmp_path / "bad.ini"
    bad.write_text("[nxreduce]\nthreshold = x\n")
    with pytest.raises(SettingsError, match="threshold"):
        Experiment.create(tmp_path, "ok", settings_source=bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.ini"]


def test_open_validates(tmp_path):
    with pytest.raises(ExperimentError, match="does not exist"):
        Experiment.open(tmp_path / "nothing")
    with pytest.raises(ExperimentError, match="not an experiment directory"):
        Experiment.open(tmp_path)


def test_samples_and_scans(experiment):
    label_dir = experiment.new_sample("TiSe2", "xtal1")
    assert label_dir == experiment.directory / "TiSe2" / "xtal1" and label_dir.is_dir()
    experiment.new_sample("TiSe2", "xtal1")  # idempotent
    experiment.new_sample("CsV3Sb5", "a")
    assert experiment.list_samples() == [("CsV3Sb5", "a"), ("TiSe2", "xtal1")]
    assert experiment.scan_file("TiSe2", "xtal1", "300K") == label_dir / "TiSe2_300K.nxs"
    assert experiment.scan_dir("TiSe2", "xtal1", "300K") == label_dir / "300K"
    (label_dir / "TiSe2_300K.nxs").touch()
    (label_dir / "TiSe2_m12p5K.nxs").touch()
    assert experiment.list_scans("TiSe2", "xtal1") == ["300K", "m12p5K"]
    with pytest.raises(InvalidNameError, match="reserved"):
        experiment.new_sample("tasks", "x")
    for bad in ("../x", ".hidden", "a/b", ""):
        with pytest.raises(InvalidNameError):
            experiment.new_sample(bad, "l")
        with pytest.raises(InvalidNameError):
            experiment.scan_file("s", "l", bad)
    assert experiment.configuration_file("pil.nxs") == experiment.configurations_dir / "pil.nxs"


def test_scan_paths_from_scan_file(tmp_path):
    path = tmp_path / "exp" / "Tb_Ti2O7" / "xtal1" / "Tb_Ti2O7_m12p5K.nxs"
    paths = ScanPaths.from_scan_file(path)
    assert (paths.sample, paths.label, paths.scan) == ("Tb_Ti2O7", "xtal1", "m12p5K")
    assert paths.experiment_dir == tmp_path / "exp"
    assert paths.scan_dir == path.parent / "m12p5K"
    assert paths == ScanPaths.from_names(tmp_path / "exp", "Tb_Ti2O7", "xtal1", "m12p5K")
    rel = os.path.relpath(path)
    assert ScanPaths.from_scan_file(rel).scan_file == path
    for bad in ("Other_300K.nxs", "Tb_Ti2O7_.nxs", "Tb_Ti2O7_300K.h5"):
        with pytest.raises(ExperimentError):
            ScanPaths.from_scan_file(path.with_name(bad))


def test_invalid_server_file_stops_creation(tmp_path, server_settings):
    # (an unknown key is kept and warned about, as NXRefine files have them; a bad value
    # of a known key stops)
    server_settings.write_text("[nxreduce]\nnorm = lots\n")
    with pytest.raises(SettingsError, match="norm"):
        Experiment.create(tmp_path / "home", "exp")
    assert not (tmp_path / "home").exists()
