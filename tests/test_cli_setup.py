"""The ``nxrefine-bs`` command: set-up sub-commands, exit codes and one-line errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from nxrefine_bs.cli import COMMAND_MODULES, main
from nxrefine_bs.settings import load_experiment_settings, load_server_settings


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("nxrefine-bs: error: ")
    assert "Traceback" not in err
    return lines[0]


def test_command_modules_list():
    assert COMMAND_MODULES[0] == "nxrefine_bs.cli.setup"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["settings"],
        ["settings", "edit"],
        ["configuration", "new", "c", "--position", "a,b"],
        ["nonsense"],
    ],
)
def test_usage_errors_exit_2(capsys, argv):
    code, _, err = _run(capsys, *argv)
    assert code == 2
    assert "usage:" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["settings", "--help"],
        ["settings", "edit", "--help"],
        ["experiment", "new", "--help"],
        ["configuration", "new", "--help"],
        ["sample", "new", "--help"],
        ["scan", "new", "--help"],
    ],
)
def test_help(capsys, argv):
    code, out, _ = _run(capsys, *argv)
    assert code == 0 and "usage: nxrefine-bs" in out


def test_settings_commands(capsys, _isolated_settings):
    code, _, err = _run(capsys, "settings", "show")
    assert code == 2
    assert "nxrefine-bs settings init" in _one_line_error(err)

    code, out, _ = _run(capsys, "settings", "init", "--set", "server.cores=6")
    assert code == 0 and out.strip() == str(_isolated_settings)
    assert load_server_settings()["server"]["cores"] == 6
    code, _, err = _run(capsys, "settings", "init")
    assert code == 2 and "already exists" in _one_line_error(err)

    code, _, _ = _run(capsys, "settings", "edit", "--set", "nxreduce.threshold=2e4")
    assert code == 0 and load_server_settings()["nxreduce"]["threshold"] == 20000
    code, out, _ = _run(capsys, "settings", "show")
    assert "threshold = 20000.0" in out and "[server]" in out

    before = _isolated_settings.read_text()
    for bad, words in (
        ("nxreduce.threshold=lots", ["threshold", "float"]),
        ("nxreduce.nope=1", ["unknown key", "nope"]),
        ("bogus.key=1", ["unknown settings section", "bogus"]),
    ):
        code, _, err = _run(capsys, "settings", "edit", "--set", bad)
        line = _one_line_error(err)
        assert code == 2 and all(w in line for w in words), line
    assert _isolated_settings.read_text() == before

    code, out, _ = _run(capsys, "settings", "path")
    assert out.strip() == str(_isolated_settings)


def test_setup_workflow(capsys, tmp_path, server_settings):
    home = tmp_path / "analysis"
    code, out, err = _run(
        capsys, "experiment", "new", "exp", "--analysis-home", str(home), "--beamline", "qm2"
    )
    assert code == 0, err
    exp = Path(out.strip())
    assert exp == home / "exp" / "nxrefine"
    values = load_experiment_settings(exp)
    assert values["instrument"]["instrument"] == "QM2"

    code, _, err = _run(
        capsys, "settings", "edit", "-x", str(exp), "--set", "nxrefine.distance=300"
    )
    assert code == 0, err
    code, _, err = _run(capsys, "settings", "edit", "-x", str(exp), "--set", "server.cores=3")
    assert code == 2 and "[server]" in _one_line_error(err)

    code, out, err = _run(
        capsys,
        "configuration",
        "new",
        "pil",
        "-x",
        str(exp),
        "--detector",
        "Pilatus 100k",
        "--phi-start",
        "0",
        "--phi-end",
        "10",
        "--position",
        "0,0,0,0,0",
        "--position",
        "0,15",
    )
    assert code == 0, err
    config = Path(out.strip())
    assert config == exp / "configurations" / "pil.nxs"
    with h5py.File(config) as f:
        assert f["f1/instrument/detector/distance"][()] == 300.0  # experiment default
        assert f["f2/instrument/goniometer/omega"][()] == 15.0
        assert f["f1/data/frame_number"].shape == (100,)
    code, out, _ = _run(capsys, "configuration", "show", "pil", "-x", str(exp))
    assert code == 0 and "f2: chi=0 omega=15" in out and "100 frames" in out

    code, out, err = _run(capsys, "sample", "new", "TiSe2", "xtal1", "-x", str(exp))
    assert code == 0 and Path(out.strip()).is_dir()
    code, out, err = _run(
        capsys,
        "scan",
        "new",
        "TiSe2",
        "xtal1",
        "-x",
        str(exp),
        "-c",
        "pil",
        "--temperature",
        "-12.5",
    )
    assert code == 0, err
    scan = Path(out.strip())
    assert scan == exp / "TiSe2" / "xtal1" / "TiSe2_m12p5K.nxs"
    assert (scan.parent / "m12p5K").is_dir()

    code, _, err = _run(
        capsys,
        "scan",
        "new",
        "TiSe2",
        "xtal1",
        "-x",
        str(exp),
        "-c",
        "pil",
        "--temperature",
        "-12.5",
    )
    assert code == 2 and "already exists" in _one_line_error(err)
    code, _, err = _run(
        capsys,
        "scan",
        "new",
        "TiSe2",
        "xtal1",
        "m12p5K",
        "-x",
        str(exp),
        "-c",
        str(config),
        "--overwrite",
        "--parent",
        str(scan),
    )
    assert code == 0, err


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["sample", "new", "../x", "l"], ["sample name", "'../x'"]),
        (["sample", "new", ".hidden", "l"], ["starts with '.'"]),
        (["scan", "new", "s", "l", "a/b", "-c", "small"], ["scan name"]),
        (["scan", "new", "s", "l", "-c", "small"], ["--temperature"]),
        (["scan", "new", "s", "l", "1", "-c", "missing"], ["missing.nxs", "does not exist"]),
        (["configuration", "new", "x", "--detector", "Pilatsu 2M"], ["unknown detector"]),
        (["configuration", "new", "small"], ["already exists"]),
    ],
)
def test_user_errors_are_one_line(capsys, experiment, configuration, argv, words):
    code, _, err = _run(capsys, *argv, "-x", str(experiment.directory))
    line = _one_line_error(err)
    assert code == 2
    for word in words:
        assert word in line, line


def test_other_user_errors(capsys, tmp_path, server_settings):
    code, _, err = _run(capsys, "sample", "new", "s", "l", "-x", str(tmp_path))
    assert code == 2 and "not an experiment directory" in _one_line_error(err)
    code, _, err = _run(
        capsys, "experiment", "new", "e", "--analysis-home", str(tmp_path), "--beamline", "nowhere"
    )
    line = _one_line_error(err)
    assert code == 2 and "registered beamlines" in line and "QM2" in line
    code, _, err = _run(capsys, "experiment", "new", "e")
    assert code == 2 and "--analysis-home" in _one_line_error(err)


def test_debug_shows_traceback(capsys, tmp_path):
    code, _, err = _run(capsys, "--debug", "sample", "new", "s", "l", "-x", str(tmp_path))
    assert code == 2
    assert "Traceback" in err and err.strip().endswith("'nxrefine-bs experiment new'")


def test_internal_error_exit_1(capsys, monkeypatch, tmp_path, experiment):
    import nxrefine_bs.experiment as experiment_module

    def boom(self, sample, label):
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(experiment_module.Experiment, "new_sample", boom)
    code, _, err = _run(capsys, "sample", "new", "s", "l", "-x", str(experiment.directory))
    assert code == 1
    assert "internal error: ZeroDivisionError: bug" in err and "Traceback" not in err


def test_installed_script_help(tmp_path):
    script = shutil.which("nxrefine-bs", path=str(Path(sys.executable).parent)) or shutil.which(
        "nxrefine-bs"
    )
    assert script, "nxrefine-bs is not installed; run pip install -e ."
    env = dict(os.environ, NXREFINE_BS_SETTINGS=str(tmp_path))
    result = subprocess.run(
        [script, "--help"], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    for command in ("settings", "experiment", "configuration", "sample", "scan"):
        assert command in result.stdout
    result = subprocess.run(
        [script, "settings", "show"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("nxrefine-bs: error: server settings file")


def test_settings_inside_an_experiment(capsys, monkeypatch, experiment, server_settings):
    """Inside an experiment, settings show/edit act on its file unless --server."""
    monkeypatch.chdir(experiment.directory)
    code, out, err = _run(capsys, "settings", "edit", "--set", "nxreduce.threshold=20000")
    assert code == 0, err
    assert out.strip() == str(experiment.settings_file) and "--server" in err
    assert load_experiment_settings(experiment.directory)["nxreduce"]["threshold"] == 20000
    assert load_server_settings()["nxreduce"]["threshold"] != 20000
    sample_dir = experiment.new_sample("TiSe2", "xtal1")  # from below the experiment too
    monkeypatch.chdir(sample_dir)
    code, out, _ = _run(capsys, "settings", "show")
    assert code == 0 and f"# {experiment.settings_file}" in out and "threshold = 20000" in out
    assert "[server]" not in out
    code, out, _ = _run(capsys, "settings", "edit", "--server", "--set", "nxreduce.threshold=9")
    assert code == 0 and out.strip() == str(server_settings)
    assert load_server_settings()["nxreduce"]["threshold"] == 9
    # [server] keys exist only in the server file
    code, out, _ = _run(capsys, "settings", "edit", "--set", "server.cores=3")
    assert code == 0 and out.strip() == str(server_settings)
    assert load_server_settings()["server"]["cores"] == 3
    code, out, _ = _run(capsys, "settings", "show", "--server")
    assert "[server]" in out and f"# {server_settings}" in out


def test_negative_values_and_parent_relative_to_cwd(capsys, monkeypatch, experiment):
    monkeypatch.chdir(experiment.directory)
    code, _, err = _run(
        capsys, "configuration", "new", "neg", "--detector", "Pilatus 100k",
        "--position", "-90,0", "--position", "-90,-15.5", "--phi-start", "-5",
    )  # fmt: skip
    assert code == 0, err
    with h5py.File(experiment.configuration_file("neg"), "r") as f:
        assert [float(f[e]["instrument/goniometer/omega"][()]) for e in ("f1", "f2")] == [
            0.0,
            -15.5,
        ]
        assert float(f["f1/instrument/goniometer/chi"][()]) == -90.0
    for temperature in ("300", "100"):
        argv = ["scan", "new", "TiSe2", "xtal1", "-c", "neg", "--temperature", temperature]
        if temperature == "100":
            argv += ["--parent", "TiSe2/xtal1/TiSe2_300K.nxs"]  # relative to the cwd
        code, _, err = _run(capsys, *argv)
        assert code == 0, err
    with h5py.File(experiment.directory / "TiSe2/xtal1/TiSe2_100K.nxs", "r") as f:
        parent = f["entry/nxscans/parent"][()]
    assert (parent.decode() if isinstance(parent, bytes) else str(parent)) == "TiSe2_300K.nxs"
    code, _, err = _run(
        capsys, "scan", "new", "TiSe2", "xtal1", "-c", "neg", "--temperature", "50",
        "--parent", "TiSe2_300K.nxs",
    )  # fmt: skip
    assert code == 2 and "TiSe2_300K.nxs does not exist" in _one_line_error(err)
