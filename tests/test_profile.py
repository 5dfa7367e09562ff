"""The IPython profile ``profiles/profile_sim`` gives a working beamline session.

``ipython --profile-dir=profiles/profile_sim -c CODE`` runs in a subprocess on a
temporary experiment: the startup files build the session (RunEngine, simulated
beamline, NeXus writer, post-scan reduction, embedded Tiled catalog) and CODE flies a
short rotation with the names the profile defines.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from nxrefine_bs.settings import ENV_VAR

PROFILE = Path(__file__).resolve().parents[1] / "profiles" / "profile_sim"

CODE = """
uid, = RE(rotation_scan(bl, **SCAN, sample="TiSe2", label="xtal1", scan="300K",
                        phi_start=0.0, phi_end=3.0, phi_step=0.1, frame_time=0.01))
import h5py
with h5py.File(writer.last_scan_file, "r") as f:
    print("SCAN", writer.last_scan_file, f["f1/data/data"].shape[0],
          f["f1/acquisition/status"][()].decode())
print("TILED", uid in tiled, tiled[uid].metadata["start"]["sample"])
print("REDUCED", sorted(reduction.steps), len(reduction.wait(60)), reduction.errors)
"""


def _ipython() -> str:
    exe = shutil.which("ipython", path=str(Path(sys.executable).parent)) or shutil.which("ipython")
    if exe is None:
        pytest.skip("IPython is not installed (pip install -e .[test])")
    return exe


def _values(stdout: str, key: str) -> list[str]:
    lines = [line for line in stdout.splitlines() if line.startswith(key + " ")]
    assert len(lines) == 1, stdout
    return lines[0].split()[1:]


def test_profile_runs_a_rotation(experiment, tmp_path):
    env = {
        **os.environ,
        ENV_VAR: os.environ[ENV_VAR],  # the test's own server settings (conftest)
        "NXREFINE_BS_EXPERIMENT": str(experiment.directory),
        "NXREFINE_BS_REDUCE": "max",
        "NXREFINE_BS_PROGRESS": "0",
        "IPYTHONDIR": str(tmp_path / "ipython"),
    }
    env.pop("NXREFINE_BS_DETECTOR", None)
    env.pop("NXREFINE_BS_CONFIGURATION", None)
    proc = subprocess.run(
        [_ipython(), f"--profile-dir={PROFILE}", "--HistoryManager.hist_file=:memory:",
         "--colors=nocolor", "-c", CODE],
        capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Traceback" not in output, output
    # the banner says where the data go
    assert f"experiment: {experiment.directory}" in proc.stdout

    path, frames, status = _values(proc.stdout, "SCAN")
    scan_file = Path(path)
    assert scan_file == experiment.scan_file("TiSe2", "xtal1", "300K")
    assert (int(frames), status) == (30, "success")
    assert _values(proc.stdout, "TILED") == ["True", "TiSe2"]
    assert _values(proc.stdout, "REDUCED") == ["['max']", "1", "[]"]

    configuration = experiment.configuration_file("sim-pilatus_100k")
    assert configuration.is_file()  # made by the profile for its default detector
    with h5py.File(scan_file, "r") as f:
        link = f["f1/data"].get("data", getlink=True)
        assert link.filename == "300K/f1.h5"
        assert f["f1/data/data"].shape == (30, 195, 487)
        assert f["f1/monitor/MCS1"].shape == (30,)
        assert f["f1/instrument/goniometer/phi"][29] == pytest.approx(2.9)
        assert "f1/nxworkflow/nxmax" in f  # the post-scan reduction ran
        assert f["entry/instrument/detector/description"][()].decode() == "Pilatus 100k"
    assert (experiment.directory / "tiled" / "catalog.db").is_file()


def test_temporary_experiment_removed_at_exit(tmp_path):
    """Without NXREFINE_BS_EXPERIMENT the profile's temporary experiment goes at exit."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {
        **os.environ,
        "TMPDIR": str(tmp),
        "NXREFINE_BS_TILED": "0",
        "NXREFINE_BS_PROGRESS": "0",
        "NXREFINE_BS_DETECTOR": "small",
        "IPYTHONDIR": str(tmp_path / "ipython"),
    }
    for name in ("NXREFINE_BS_EXPERIMENT", "NXREFINE_BS_CONFIGURATION", "NXREFINE_BS_KEEP"):
        env.pop(name, None)
    code = "print('EXP', EXPERIMENT_DIR, (EXPERIMENT_DIR / 'tasks').is_dir())"
    proc = subprocess.run(
        [_ipython(), f"--profile-dir={PROFILE}", "--HistoryManager.hist_file=:memory:",
         "--colors=nocolor", "-c", code],
        capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    path, existed = _values(proc.stdout, "EXP")
    assert existed == "True" and Path(path).parents[1].parent == tmp
    assert "removed at exit" in proc.stdout
    assert list(tmp.glob("nxrefine-bs-sim-*")) == []
