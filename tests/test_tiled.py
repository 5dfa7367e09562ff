"""Tests of the Tiled catalog: real in-process Tiled, real RunEngine, real scan files."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from nxrefine_bs.nexus.h5tools import write_field
from nxrefine_bs.nexus.provenance import record_process
from nxrefine_bs.simulation.scan import make_simulated_scan
from nxrefine_bs.tiled import (
    TiledError,
    archive_callback,
    close_catalog,
    find_processed,
    find_runs,
    open_catalog,
    processed_key,
    register_processed,
)
from nxrefine_bs.workflow import WorkflowDB

pytest.importorskip("tiled.server")


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    return tmp_path_factory.mktemp("experiment")


@pytest.fixture(scope="module")
def client(experiment):
    client = open_catalog(experiment)
    yield client
    close_catalog(client)


@pytest.fixture(scope="module")
def runs(client):
    from bluesky import RunEngine
    from bluesky.plans import count, scan
    from ophyd.sim import det, motor

    RE = RunEngine({})
    RE.subscribe(archive_callback(client, batch_size=1))
    (uid_lab6,) = RE(count([det], num=3, md={"sample": "LaB6", "temperature": 80.0}))
    (uid_si,) = RE(scan([det], motor, -1, 1, 4, md={"sample": "Si", "temperature": 300.0}))
    return {"LaB6": uid_lab6, "Si": uid_si}


def test_embedded_catalog_layout(experiment, client):
    assert (experiment / "tiled" / "catalog.db").is_file()
    assert "processed" not in list(client)  # the runs node holds runs only
    assert type(client).__name__ == "CatalogOfBlueskyRuns"
    assert [part for part in client.path_parts if part] == ["runs"]


def test_runs_archived_found_and_replayed(client, runs):
    from tiled.queries import Key

    assert list(find_runs(client, sample="LaB6")) == [runs["LaB6"]]
    assert list(client.search(Key("sample") == "Si")) == [runs["Si"]]
    assert list(find_runs(client, temperature__lt=100)) == [runs["LaB6"]]
    assert set(find_runs(client, **{"stop.exit_status": "success"})) == set(runs.values())
    assert list(find_processed(client, sample="LaB6")) == []  # runs are not processed scans

    for uid, run in client.items():  # every child is a run
        assert run.start["uid"] == uid
    run = client[runs["Si"]]
    assert run.start["sample"] == "Si" and run.stop["exit_status"] == "success"
    np.testing.assert_allclose(run["primary"]["motor"].read(), np.linspace(-1, 1, 4))
    names = [name for name, _ in run.documents()]
    assert names[0] == "start" and names[-1] == "stop"
    assert names.count("event") == 4 and "descriptor" in names


def test_processed_scans_registered_and_queried(experiment, client):
    top = experiment
    cold = make_simulated_scan(top, sample="CsV3Sb5", scan="80K", temperature=80.0, n_frames=4)
    warm = make_simulated_scan(top, sample="CsV3Sb5", scan="300K", temperature=300.0, n_frames=4)
    other = make_simulated_scan(top, sample="LaB6", scan="20K", temperature=20.0, n_frames=4)
    with h5py.File(cold.scan_file, "r+") as f:
        write_field(f["entry/sample"], "space_group", "P 6/m m m")
        record_process(f["f1"], "nxmax")
    db = WorkflowDB(top)
    db.register_scan(warm.scan_file, ["f1"])
    db.fail(warm.scan_file, "f1", "find", "too few peaks")
    for scan in (cold, warm, other):
        register_processed(client, scan.scan_file, db=db)

    from tiled.queries import Key

    assert sorted(find_processed(client, Key("temperature") < 100)) == sorted(
        [processed_key(cold.scan_file), processed_key(other.scan_file)]
    )
    assert list(find_processed(client, Key("sample") == "LaB6")) == ["LaB6_xtal1_20K"]
    hits = find_processed(client, sample="CsV3Sb5", space_group="P 6/m m m")
    assert list(hits) == ["CsV3Sb5_xtal1_80K"]
    assert list(find_processed(client, workflow__find="failed")) == ["CsV3Sb5_xtal1_300K"]
    assert list(find_processed(client, complete__contains="max")) == ["CsV3Sb5_xtal1_80K"]

    node = find_processed(client)["CsV3Sb5_xtal1_80K"]
    meta = node.metadata
    assert meta["a"] == pytest.approx(cold.crystal.cell[0]) and meta["entries"] == ["f1"]
    assert meta["path"] == str(cold.scan_file) and meta["temperature_units"] == "K"
    # data readable through Tiled, following the external link to the detector file
    frames = node["f1/data/data"]
    assert frames.shape == (4, *cold.geometries["f1"].shape)
    np.testing.assert_array_equal(frames[1], cold.simulators["f1"].frame(1))

    # re-registration updates the metadata (no duplicate node)
    with h5py.File(other.scan_file, "r+") as f:
        f["entry/sample/temperature"][()] = 150.0
    register_processed(client, other.scan_file)
    assert "LaB6_xtal1_20K" not in find_processed(client, temperature__lt=100)
    assert len(find_processed(client, sample="LaB6")) == 1


def test_open_catalog_needs_a_target(tmp_path, monkeypatch):
    monkeypatch.setenv("NXREFINE_BS_SETTINGS", str(tmp_path / "missing.ini"))
    with pytest.raises(TiledError, match="no Tiled catalog given"):
        open_catalog()
    with pytest.raises(TiledError, match="does not exist"):
        open_catalog(tmp_path / "nowhere")


def test_server_uri_from_settings(tmp_path, monkeypatch):
    from tiled.server import SimpleTiledServer

    from nxrefine_bs.settings import init_server_settings

    sim = make_simulated_scan(tmp_path, sample="Si", n_frames=3)
    with SimpleTiledServer(directory=tmp_path / "server", readable_storage=[tmp_path]) as server:
        settings = init_server_settings(
            tmp_path / "settings.ini", values={"server": {"tiled_uri": server.uri}}
        )
        monkeypatch.setenv("NXREFINE_BS_SETTINGS", str(settings))
        client = open_catalog()
        try:
            register_processed(client, sim.scan_file)
            assert list(find_processed(client, sample="Si")) == ["Si_xtal1_300K"]
            assert find_processed(client)["Si_xtal1_300K"]["f1/data/data"].shape[0] == 3
        finally:
            close_catalog(client)


def test_databroker_v1_imports():
    """databroker's v1 API needs humanize, a declared dependency."""
    import importlib

    v1 = importlib.import_module("databroker.v1")
    assert hasattr(v1, "Broker")
