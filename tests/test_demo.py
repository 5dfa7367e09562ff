"""``nxrefine-bs demo`` end to end: acquisition, post-scan reduction, Tiled, plots.

One short but complete demo runs once for the module (a Pilatus 300K, two temperatures
either side of the simulated CDW transition at 200 K, one rotation of 90 frames of 1
degree each): scan files, workflow database, refined lattice, merged transforms and their
PNGs, the processed scans in Tiled, the summary table and the physics of the series
(superlattice reflections only below Tc, thermal contraction).  The smaller Pilatus 100k
sees too few Bragg peaks of silicon in 90 degrees (8-9 per rotation at 200 mm) to
index, so the demo's default detector is used.
"""

from __future__ import annotations

import json

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
    "temperatures": (300.0, 100.0),
    "omegas": (0.0,),
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


def test_scan_files_and_runs(demo):
    home, result = demo
    assert result.experiment_dir == home / "demo" / "nxrefine"
    assert (result.experiment_dir / MARKER).is_file()
    label_dir = result.experiment_dir / "demo" / "xtal1"
    assert result.scan_files == [label_dir / "demo_300K.nxs", label_dir / "demo_100K.nxs"]
    assert len(result.run_uids) == 2
    for k, scan_file in enumerate(result.scan_files):
        with h5py.File(scan_file, "r") as f:
            assert f["f1/data/data"].shape == (90, 619, 487)
            assert f["f1/acquisition/exit_status"][()].decode() == "success"
            assert f["f1/acquisition/run_uid"][()].decode() == result.run_uids[k]


def test_reduction_done_and_lattice_refined(demo):
    _, result = demo
    assert all(r.ok for r in result.reduction), [r.summary() for r in result.reduction]
    db = WorkflowDB(result.experiment_dir)
    for scan_file in result.scan_files:
        for step in STEPS:
            assert db.task_status(scan_file, "f1", step) is Status.DONE, (scan_file, step)
        assert db.task_status(scan_file, "entry", "combine") is Status.DONE
        with h5py.File(scan_file, "r") as f:
            lattice = read_lattice(f["entry/sample"])
            assert lattice.space_group == "F m -3 m"
            assert lattice.a == pytest.approx(5.43, rel=3e-3)  # refined; contracts on cooling
            refined = read_process(f["f1"], "nxrefine")["summary"]
            assert refined["cell"][0] == pytest.approx(5.43, rel=3e-3)
            assert process_done(f["entry"], "nxcombine")
    assert [p.name for p in result.plots] == ["transform_hk0.png"] * 2
    for png, scan in zip(result.plots, ("300K", "100K"), strict=True):
        assert png.parent == result.scan_files[0].parent / scan
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_series_shows_the_cdw_physics(demo):
    """The demo's reduced data: superlattice reflections appear below Tc = 200 K only."""
    _, result = demo
    hot, cold = result.summary
    assert (hot.temperature, cold.temperature) == (300.0, 100.0)
    assert hot.order_parameter == 0.0 < cold.order_parameter
    assert hot.superlattice is not None and cold.superlattice is not None
    assert cold.superlattice > 0.0005  # measured in the merged transform
    assert abs(hot.superlattice) < 0.2 * cold.superlattice  # absent above Tc
    # every peak indexes above Tc; below it the superlattice peaks cannot (half-integers)
    assert hot.indexed_fraction > 0.95 and cold.indexed_fraction < hot.indexed_fraction
    assert cold.peaks > hot.peaks
    # thermal contraction (1e-5 / K over 200 K) in the refined cells
    assert cold.a < hot.a - 5 * max(hot.a_error, cold.a_error)
    assert hot.a == pytest.approx(5.43, rel=1e-3)


def test_summary_table_and_json(demo, capsys):
    from nxrefine_bs.cli.acquire import _print_demo_summary

    _, result = demo
    _print_demo_summary(result)
    out = capsys.readouterr().out
    assert "superlattice / Bragg" in out and "Repr" not in out and "StepOutcome" not in out
    rows = [line for line in out.splitlines() if line.lstrip().startswith(("300", "100"))]
    assert len(rows) == 2 and "transform_hk0.png" in rows[1] and "±" in rows[0]
    data = json.loads(json.dumps(result.as_dict()))
    assert [t["temperature"] for t in data["temperatures"]] == [300.0, 100.0]
    assert data["steps_failed"] == [] and len(data["plots"]) == 2


def test_processed_scan_in_tiled(demo):
    _, result = demo
    assert sorted(result.processed) == ["demo_xtal1_100K", "demo_xtal1_300K"]
    client = open_catalog(result.experiment_dir)
    try:
        hits = find_processed(client, sample="demo", temperature__lt=200)
        assert list(hits) == ["demo_xtal1_100K"]
        meta = hits["demo_xtal1_100K"].metadata
        assert meta["temperature"] == 100.0 and meta["space_group"] == "F m -3 m"
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


def test_slice_titles_name_sample_temperature_and_plane(demo, monkeypatch):
    """PNG titles: sample, label, scan and temperature from the scan file; no "-0"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.figure

    from nxrefine_bs.plots import _slice_title, plot_slice

    _, result = demo
    transform = result.scan_files[1].parent / "100K" / "transform.nxs"
    assert _slice_title(transform) == "demo xtal1 100K, T = 100 K (transform.nxs)"
    titles = []
    savefig = matplotlib.figure.Figure.savefig

    def spy(fig, *args, **kwargs):  # the real savefig runs; the labels are kept
        ax, bar = fig.axes
        titles.append((ax.get_title(), bar.get_ylabel()))
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    png = plot_slice(transform, axis="l", value=-0.0, png=transform.with_name("minus0.png"))
    assert png.stat().st_size > 1000
    ((title, label),) = titles
    assert title.endswith("\nL = 0") and "T = 100 K" in title
    assert "counts" in label
