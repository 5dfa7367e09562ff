"""Replay: archived runs re-drive the NeXus writer into the same scan file as live.

Rotations -- ophyd-async fly, ophyd-async step and ophyd v1 step -- are recorded with a
real RunEngine by the NeXus writer and, at the same time, archived in the experiment's
embedded Tiled catalog (or a real ``tiled serve`` on 127.0.0.1).  The live scan file is
set aside and deleted; replaying the archived runs (through the API and through
``nxrefine-bs replay``) must regenerate it field by field: the same groups, datasets
(values, dtype, shape), attributes and links, apart from the fields listed in
:data:`EXCLUDED_FIELDS` and :data:`EXCLUDED_ATTRIBUTES` (time stamps, uids, pids).
Replaying again gives the same file; a tree with reduction results is refused unless
``--overwrite``, which keeps the results.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from nxrefine_bs.callbacks.nexus_writer import NeXusScanWriter
from nxrefine_bs.cli import main
from nxrefine_bs.devices import make_sim_beamline
from nxrefine_bs.experiment import Experiment
from nxrefine_bs.geometry import Geometry
from nxrefine_bs.nexus.geometry_io import write_geometry
from nxrefine_bs.nexus.provenance import record_process
from nxrefine_bs.nexus.scanfile import read_geometry, update_scan_file
from nxrefine_bs.plans import multi_rotation_scan, step_rotation_scan
from nxrefine_bs.simulation.crystal import SimCrystal
from nxrefine_bs.simulation.frames import DetectorModel
from nxrefine_bs.tiled import archive_callback, close_catalog, open_catalog
from nxrefine_bs.tiled.replay import (
    ReplayError,
    reduction_results,
    replay_runs,
    select_runs,
)

pytest.importorskip("tiled.server")

SHAPE = (64, 80)
NAMES = {"sample": "TiSe2", "label": "xtal1", "scan": "300K"}

EXCLUDED_FIELDS = frozenset(
    {"start_time", "end_time", "date", "run_uid", "start_document", "pid", "file_time"}
)
"""Datasets that hold a time stamp, a uid or a process id: not compared."""

EXCLUDED_ATTRIBUTES = frozenset({("frame_time", "start"), ("", "file_time")})
"""``(object name, attribute)`` pairs not compared (``""``: any object)."""


def describe(path: Path) -> dict[str, Any]:
    """Every link, group, dataset and attribute of an HDF5 file, by path.

    Links are described by kind and target (a hard link to an object already seen is
    reported as ``("hard", first path)``, so ``f1/sample -> entry/sample`` counts);
    datasets by dtype, shape and value; attributes as ``"<path>@<name>"`` entries.
    Excluded fields and attributes are left out.
    """
    out: dict[str, Any] = {}
    seen: dict[int, str] = {}

    def attrs(obj: h5py.HLObject, where: str) -> None:
        name = where.rsplit("/", 1)[-1]
        for key in sorted(obj.attrs):
            if (name, key) in EXCLUDED_ATTRIBUTES or ("", key) in EXCLUDED_ATTRIBUTES:
                continue
            out[f"{where}@{key}"] = ("attr", obj.attrs[key])

    def visit(group: h5py.Group, prefix: str) -> None:
        for name in sorted(group):
            where = f"{prefix}/{name}"
            link = group.get(name, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                out[where] = ("external", link.filename, link.path)
                continue
            if isinstance(link, h5py.SoftLink):
                out[where] = ("soft", link.path)
                continue
            obj = group[name]
            addr = h5py.h5o.get_info(obj.id).addr
            if addr in seen:
                out[where] = ("hard", seen[addr])
                continue
            seen[addr] = where
            if name in EXCLUDED_FIELDS and isinstance(obj, h5py.Dataset):
                continue
            attrs(obj, where)
            if isinstance(obj, h5py.Group):
                out[where] = ("group",)
                visit(obj, where)
            else:
                out[where] = ("dataset", obj.dtype.kind, obj.shape, obj[()])

    with h5py.File(path, "r") as f:
        attrs(f, "")
        visit(f, "")
    return out


def same(a: Any, b: Any) -> bool:
    """Equality of described items (numpy-aware, NaN equal to NaN)."""
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False
    if a.dtype.kind in "fc" and b.dtype.kind in "fc":
        return bool(np.array_equal(a, b, equal_nan=True))
    return bool(np.array_equal(a, b))


def assert_same_file(live: Path, replayed: Path) -> int:
    """Assert two scan files hold the same tree; return the number of items compared."""
    want, have = describe(live), describe(replayed)
    assert sorted(set(want) - set(have)) == [], "missing in the replayed file"
    assert sorted(set(have) - set(want)) == [], "extra in the replayed file"
    different = [key for key in want if not same(want[key], have[key])]
    assert different == [], {k: (want[k], have[k]) for k in different[:5]}
    return len(want)


def record(RE, exp: Path, mode: str, client: Any) -> tuple[list[str], Path, Path]:
    """Record a ``mode`` rotation scan live with the writer, archived into ``client``.

    Returns the run uids, the scan file and a copy of it (``live_copy.h5``, in the same
    directory so that its relative links resolve).
    """
    model = DetectorModel.synthetic(SHAPE, pixel_size=0.6)
    geometry = Geometry(
        wavelength=0.3, distance=100.0, pixel_size=0.6, shape=SHAPE, beam_center_x=40.3,
        beam_center_y=31.6, chi=-90.0, phi_start=0.0, phi_step=0.5,
    )  # fmt: skip
    crystal = SimCrystal.random((5.43, 5.43, 5.43, 90, 90, 90), centring="F", seed=3)
    writer = NeXusScanWriter()
    RE.subscribe(writer)
    RE.subscribe(archive_callback(client, batch_size=1))
    if mode == "v1":
        devices = make_sim_beamline(
            exp,
            api="ophyd",
            crystal=crystal,
            detector=model,
            geometry=geometry,
            frame_time=0.001,
            seed=7,
        )
    else:
        devices = make_sim_beamline(
            exp, crystal=crystal, detector=model, geometry=geometry, frame_time=0.005, seed=7,
            temperature_time_constant=0.01,
        )  # fmt: skip
    if mode == "fly":
        plan = multi_rotation_scan(
            devices, experiment_dir=exp, **NAMES,
            rotations=[{"omega": 0.0}, {"omega": 15.0, "translation": (0.0, 5.0)}],
            phi_start=0.0, phi_end=20.0, phi_step=0.5, temperature=300.0,
        )  # fmt: skip
    else:
        plan = step_rotation_scan(
            devices, experiment_dir=exp, **NAMES, entry="f1", phi_start=1.0, phi_end=6.0,
            phi_step=0.5, omega=5.0,
        )  # fmt: skip
    uids = RE(plan)
    uids = [uids] if isinstance(uids, str) else list(uids)
    RE.flush(120)  # the archive callback runs isolated, on its own thread
    scan_file = writer.last_scan_file
    assert scan_file is not None
    live = scan_file.with_name("live_copy.h5")
    shutil.copy(scan_file, live)
    return uids, scan_file, live


@pytest.fixture
def recorded(RE, experiment):
    """Two fly rotations recorded live and archived; the catalog client stays open."""
    exp = experiment.directory
    client = open_catalog(exp)
    uids, scan_file, live = record(RE, exp, "fly", client)
    yield exp, client, uids, scan_file, live
    close_catalog(client)


def test_replay_regenerates_the_scan_file(recorded):
    exp, client, uids, scan_file, live = recorded
    raw = sorted(p.name for p in (scan_file.parent / NAMES["scan"]).glob("*.h5"))
    assert raw == ["f1.h5", "f2.h5"]
    with h5py.File(live, "r") as f:
        assert set(f) == {"entry", "f1", "f2"}
        assert f["f1/data/data"].shape == (40, *SHAPE)  # through the relative link
        assert f["f2/monitor/MCS1"].shape == (40,)

    scan_file.unlink()
    runs = select_runs(client, query={"sample": NAMES["sample"]})
    assert [run.start["uid"] for run in runs] == uids
    assert replay_runs(runs, [NeXusScanWriter()]) == uids
    n = assert_same_file(live, scan_file)
    assert n > 100
    with h5py.File(scan_file, "r") as f, h5py.File(live, "r") as g:
        np.testing.assert_array_equal(f["f2/data/data"][7], g["f2/data/data"][7])
        assert f["f1/acquisition/run_uid"][()].decode() == uids[0]

    # replayed again into the same file: nothing is appended (logs, phi, monitors)
    assert replay_runs(runs, [NeXusScanWriter()]) == uids
    assert_same_file(live, scan_file)
    with h5py.File(scan_file, "r") as f:
        assert f["f1/instrument/logs/temperature"].shape == (2,)  # baseline: start, end
        assert f["f1/acquisition/status"][()].decode() == "success"

    # by uid, replayed into another experiment whose raw tree holds the detector files
    other = Experiment.create(exp.parent.parent / "elsewhere", "exp", raw_home=exp).directory
    replay_runs(select_runs(client, uids=[uids[1][:8]]), [NeXusScanWriter()], experiment_dir=other)
    moved = other / NAMES["sample"] / NAMES["label"] / scan_file.name
    with h5py.File(moved, "r") as f:
        assert set(f) == {"entry", "f2"}
        assert f["f2/data/data"].shape == (40, *SHAPE)

    with pytest.raises(ReplayError, match="no archived run matches"):
        select_runs(client, query={"sample": "nothing"})
    with pytest.raises(ReplayError, match="say which runs"):
        select_runs(client)


def test_replay_command_twice_into_a_new_tree(recorded, capsys):
    """``replay --into NEW`` twice: identical files, equal to live (links aside)."""
    exp, client, uids, scan_file, live = recorded
    close_catalog(client)  # the command opens the catalog itself
    new = Experiment.create(exp.parent.parent / "new", "exp", raw_home=exp).directory
    copies = []
    for attempt in range(2):
        code = main(["replay", str(exp), "--sample", NAMES["sample"], "--into", str(new)])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert "replayed 2 run(s)" in out
        replayed = new / NAMES["sample"] / NAMES["label"] / scan_file.name
        copies.append(replayed.with_name(f"replay{attempt}.h5"))
        shutil.copy(replayed, copies[-1])
    assert assert_same_file(copies[0], copies[1]) > 100
    want, have = describe(live), describe(copies[1])
    links = {k for k, v in want.items() if v[0] == "external"}
    assert links and all(have[k][0] == "external" for k in links)  # relative to NEW
    assert {k: v for k, v in want.items() if k not in links}.keys() == {
        k for k in have if k not in links
    }


@pytest.mark.parametrize("mode", ["step", "v1"])
def test_step_scans_replay_equal_to_live(RE, experiment, mode):
    """ophyd-async and ophyd v1 step rotations: replay equals live in every dataset."""
    exp = experiment.directory
    client = open_catalog(exp)
    try:
        uids, scan_file, live = record(RE, exp, mode, client)
        with h5py.File(live, "r") as f:
            assert f["f1/data/phi"].attrs["units"] == "degree"
            assert f["f1/monitor/MCS1"].shape == (10,)
        scan_file.unlink()
        for _ in range(2):  # twice: the second replay rewrites, it does not append
            assert replay_runs(select_runs(client, uids=uids), [NeXusScanWriter()]) == uids
            assert assert_same_file(live, scan_file) > 60
    finally:
        close_catalog(client)


def _reduce(scan_file: Path) -> dict[str, Any]:
    """Reduction results in f1, written as the steps write them; the file described.

    (The steps themselves are not run: their numba compilation alone takes longer than
    this test.)  ``max``: its record and radial sum; ``refine``: a refined geometry
    through :func:`write_geometry` and its record; ``transform``: ``monitor_weight``.
    """
    with update_scan_file(scan_file) as f:
        fe = f["f1"]
        record_process(fe, "nxmax", parameters={"first": 0, "last": 40})
        fe.create_group("radial_sum").create_dataset("data", data=np.arange(32.0))
        refined = dataclasses.replace(read_geometry(fe), distance=101.25, beam_center_x=40.9)
        write_geometry(fe, refined)
        record_process(fe, "nxrefine", parameters={"refine_geometry": True})
        fe["data"].create_dataset("monitor_weight", data=np.linspace(0.9, 1.1, 40))
    return describe(scan_file)


def test_replay_over_reduction_results_needs_overwrite(recorded, capsys):
    exp, client, uids, scan_file, live = recorded
    before = _reduce(scan_file)
    found = sorted(reduction_results(scan_file, "f1"))
    assert found == ["f1/nxworkflow/nxmax", "f1/nxworkflow/nxrefine"]
    assert reduction_results(scan_file, "f2") == []
    runs = select_runs(client, uids=uids)
    with pytest.raises(ReplayError, match="f1/nxworkflow/nxmax") as info:
        replay_runs(runs, [NeXusScanWriter()])
    assert "--overwrite" in str(info.value) and "nothing was written" in str(info.value)
    unchanged = describe(scan_file)
    assert unchanged.keys() == before.keys()
    assert all(same(unchanged[k], v) for k, v in before.items())

    close_catalog(client)
    code = main(["replay", str(exp), "--uid", uids[0]])
    _, err = capsys.readouterr()
    assert code == 2 and "reduction results" in err

    # damage what the writer owns, then replay with --overwrite: regenerated, results kept
    with update_scan_file(scan_file) as f:
        f["f1/acquisition/status"][()] = b"crash"
        del f["f1/monitor/MCS2"]
        del f["f1/data/data"]
    code = main(["replay", str(exp), "--uid", uids[0], "--overwrite"])
    _, err = capsys.readouterr()
    assert code == 0, err
    after = describe(scan_file)
    assert after.keys() == before.keys()
    different = [k for k, v in before.items() if not same(v, after[k])]
    assert different == []
    with h5py.File(scan_file, "r") as f:
        assert f["f1/instrument/detector/distance"][()] == 101.25  # refined, kept
        assert f["f1/data/monitor_weight"].shape == (40,)
        assert f["f1/radial_sum/data"].shape == (32,)
        assert "nxmax" in f["f1/nxworkflow"] and "nxrefine" in f["f1/nxworkflow"]
        assert f["f1/acquisition/status"][()].decode() == "success"
        assert f["f1/data/data"].shape == (40, *SHAPE)
    assert not list(scan_file.parent.glob(".*before-replay"))


# --------------------------------------------------------------------- a real tiled serve
@pytest.fixture
def served(RE, experiment, tmp_path):
    """``tiled serve config`` with :data:`SERVER_CONFIG_HINT`, holding two fly rotations."""
    from tiled_server import TiledServer

    exp = experiment.directory
    server = TiledServer(tmp_path / "tiled-server", [exp], exporter=True)
    try:
        server.start()
        client = open_catalog(server.uri, api_key=server.api_key)
        uids, scan_file, live = record(RE, exp, "fly", client)
        close_catalog(client)
        yield server, exp, uids, scan_file, live
    finally:
        server.kill()


def test_replay_from_a_tiled_server_with_api_key(served, capsys, monkeypatch):
    server, exp, uids, scan_file, live = served
    monkeypatch.delenv("TILED_API_KEY", raising=False)
    scan_file.unlink()
    code = main(["replay", server.uri, "--scan-id", "1", "--scan-id", "2",
                 "--api-key", server.api_key])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "replayed 2 run(s)" in out
    assert_same_file(live, scan_file)
    code = main(["replay", server.uri, "--uid", uids[0]])  # no key: refused by the server
    _, err = capsys.readouterr()
    assert code == 2 and server.uri in err
