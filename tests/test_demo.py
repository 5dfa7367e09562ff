"""``nxrefine-bs demo`` end to end: acquisition, post-scan reduction, Tiled, plots.

One short but complete demo runs once for the module (a Pilatus 300K, one temperature,
two rotations of 90 frames of 1 degree): scan file, workflow database, refined lattice,
merged transform and its PNG, the processed scan in Tiled.  The smaller Pilatus 100k
sees too few Bragg peaks of silicon in 90 degrees (8-9 per rotation at 200 mm) to
index, so the demo's default detector is used.
"""

from __future__ import annotations

import h5py
import pytest

from nxrefine_bs.cli import main
from nxrefine_bs.demo import MARKER, run_demo
from nxrefine_bs.errors import ExperimentError
from nxrefine_bs.nexus.provenance import process_done, read_process
from nxrefine_bs.reduce.lattice import read_lattice
from nxrefine_bs.tiled import close_catalog, find_processed, open_catalog
from nxrefine_bs.workflow import Status, WorkflowDB

pytest.importorskip("tiled.server")

DETECTOR = "Pilatus 300K"
OPTIONS = {
    "detector": DETECTOR,
    "temperatures": (300.0,),
    "omegas": (0.0, 15.0),
    "phi_start": 0.0,
    "phi_end": 90.0,
    "phi_step": 1.0,
    "grid_step": 0.1,
    "progress": False,
}
STEPS = ("max", "find", "refine", "transform")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo run once in a fresh directory (settings isolated by the environment)."""
    home = tmp_path_factory.mktemp("demo-home")
    mp = pytest.MonkeyPatch()
    mp.setenv("NXREFINE_BS_SETTINGS", str(tmp_path_factory.mktemp("settings") / "s.ini"))
    try:
        result = run_demo(home, **OPTIONS)
    finally:
        mp.undo()
    return home, result


def test_scan_file_and_runs(demo):
    home, result = demo
    assert result.experiment_dir == home / "demo" / "nxrefine"
    assert (result.experiment_dir / MARKER).is_file()
    (scan_file,) = result.scan_files
    assert scan_file == result.experiment_dir / "demo" / "xtal1" / "demo_300K.nxs"
    assert len(result.run_uids) == 2
    with h5py.File(scan_file, "r") as f:
        assert {"f1", "f2"} <= set(f)
        for k, entry in enumerate(("f1", "f2")):
            assert f[f"{entry}/data/data"].shape == (90, 619, 487)
            assert f[f"{entry}/acquisition/exit_status"][()].decode() == "success"
            assert f[f"{entry}/acquisition/run_uid"][()].decode() == result.run_uids[k]
    assert result.seconds < 60


def test_reduction_done_and_lattice_refined(demo):
    _, result = demo
    (scan_file,) = result.scan_files
    assert all(r.ok for r in result.reduction), [r.summary() for r in result.reduction]
    db = WorkflowDB(result.experiment_dir)
    for entry in ("f1", "f2"):
        for step in STEPS:
            assert db.task_status(scan_file, entry, step) is Status.DONE, (step, entry)
    assert db.task_status(scan_file, "entry", "combine") is Status.DONE
    with h5py.File(scan_file, "r") as f:
        lattice = read_lattice(f["entry/sample"])
        assert lattice.space_group == "F m -3 m"
        assert lattice.a == pytest.approx(5.43, rel=1e-3)
        for entry in ("f1", "f2"):
            refined = read_process(f[entry], "nxrefine")["summary"]
            assert refined["cell"][0] == pytest.approx(5.43, rel=1e-3)
            assert refined["indexed_fraction"] > 0.9
        assert process_done(f["entry"], "nxcombine")
    (png,) = result.plots
    assert png.name == "transform_hk0.png" and png.parent == scan_file.parent / "300K"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_processed_scan_in_tiled(demo):
    _, result = demo
    assert result.processed == ["demo_xtal1_300K"]
    client = open_catalog(result.experiment_dir)
    try:
        hits = find_processed(client, sample="demo")
        assert list(hits) == ["demo_xtal1_300K"]
        meta = hits["demo_xtal1_300K"].metadata
        assert meta["temperature"] == 300.0 and meta["space_group"] == "F m -3 m"
        assert set(result.run_uids) <= set(client)  # the raw runs are archived too
    finally:
        close_catalog(client)


def test_rerun_needs_overwrite(demo, capsys):
    home, result = demo
    with pytest.raises(ExperimentError, match="already exists.*--overwrite"):
        run_demo(home, **OPTIONS)
    code = main(["demo", str(home), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("nxrefine-bs: error: ") and "--overwrite" in err
    assert result.scan_files[0].is_file()  # nothing was touched


def test_refuses_to_delete_a_foreign_directory(tmp_path):
    precious = tmp_path / "demo" / "nxrefine" / "data.txt"
    precious.parent.mkdir(parents=True)
    precious.write_text("not made by the demo")
    with pytest.raises(ExperimentError, match="not made by 'nxrefine-bs demo'; refusing"):
        run_demo(tmp_path, overwrite=True, **OPTIONS)
    assert precious.read_text() == "not made by the demo"


def test_overwrite_replaces_a_previous_demo(tmp_path, capsys):
    argv = [
        "demo", str(tmp_path), "--detector", DETECTOR, "--temperatures", "300",
        "--omegas", "0", "--phi", "0,5,1", "--no-reduce", "--no-tiled", "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    leftover = tmp_path / "demo" / "nxrefine" / "leftover.txt"
    leftover.write_text("from the first demo")
    assert main(argv) == 2  # exists: refused without --overwrite
    assert leftover.exists()
    assert main([*argv, "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "scan file:" in out and "demo_300K.nxs" in out
    assert not leftover.exists()
    with h5py.File(tmp_path / "demo" / "nxrefine" / "demo" / "xtal1" / "demo_300K.nxs") as f:
        assert f["f1/data/data"].shape == (5, 619, 487)
