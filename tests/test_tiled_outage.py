"""Tiled outages never cost a scan or a run: a real ``tiled serve`` on 127.0.0.1.

A beamline session (:func:`nxrefine_bs.session.start_session` with ``tiled=URI``:
the NeXus writer, critical, and :class:`~nxrefine_bs.tiled.archive.ResilientArchiver`
behind :class:`~nxrefine_bs.callbacks.isolation.NonCritical`) flies rotations while a
stock ``tiled serve catalog`` subprocess (see ``tiled_server.py``) is killed between
and during scans.  Every scan must succeed with a complete scan file, every run must
be journaled in ``<experiment>/tasks/archive/`` and, once the server is back,
``nxrefine-bs archive EXP --resume --tiled URI --api-key K`` must upload it so Tiled
holds the run with its stop document.  A failing NeXus writer must not keep the stop
document from Tiled.

The Tiled client's retry budget (``TILED_RETRY_ATTEMPTS``/``TILED_RETRY_TIMEOUT``, 10
attempts over up to 45 s by default) is cut to 2 attempts so that the archiver thread
gives up on a dead server in about a second; the scans do not depend on it (the
archiver is isolated), only the time the test waits for the journal does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import pytest
from bluesky import preprocessors as bpp
from tiled_server import TiledServer, wait_until

from nxrefine_bs.cli import main
from nxrefine_bs.errors import NXRefineBSError
from nxrefine_bs.nexus.safewrite import locked
from nxrefine_bs.plans import rotation_scan
from nxrefine_bs.session import start_session
from nxrefine_bs.simulation.frames import DetectorModel
from nxrefine_bs.tiled.archive import journal_directory, pending_runs
from nxrefine_bs.tiled.catalog import TiledError, close_catalog, open_catalog
from nxrefine_bs.tiled.replay import SERVER_CONFIG_HINT

pytest.importorskip("tiled.server")

NAMES = {"sample": "TiSe2", "label": "xtal1"}
NFRAMES = 20


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A stock ``tiled serve catalog`` whose catalog survives a kill and a restart."""
    base = tmp_path_factory.getbasetemp()
    srv = TiledServer(tmp_path_factory.mktemp("tiled-server"), [base], exporter=False)
    try:
        yield srv.start()
    finally:
        srv.kill()


@pytest.fixture
def session(RE, experiment, server, monkeypatch):
    """A beamline session archiving into ``server`` (key from ``TILED_API_KEY``)."""
    import tiled.client.utils

    monkeypatch.setattr(tiled.client.utils, "TILED_RETRY_ATTEMPTS", 2)
    monkeypatch.setattr(tiled.client.utils, "TILED_RETRY_TIMEOUT", 2.0)
    monkeypatch.setenv("TILED_API_KEY", server.api_key)
    if server.proc is None:
        server.start()
    s = start_session(
        experiment.directory, detector=DetectorModel.synthetic((48, 64), pixel_size=0.6),
        tiled=server.uri, reduce_steps=(), progress=False, RE=RE, seed=3,
    )  # fmt: skip
    yield s
    s.close()


def scan(session: Any, scan: str, frame_time: float = 0.01) -> Any:
    """A fly rotation of NFRAMES frames (phi 0..10, 0.5 degree steps)."""
    return rotation_scan(
        session.devices, experiment_dir=session.experiment_dir, **NAMES, scan=scan,
        phi_start=0.0, phi_end=NFRAMES * 0.5, phi_step=0.5, frame_time=frame_time,
    )  # fmt: skip


def check_scan_file(session: Any, scan: str, status: str = "success") -> Path:
    """The scan file of ``scan`` says ``status`` with every frame linked and numbered."""
    path = session.experiment_dir / NAMES["sample"] / NAMES["label"] / f"TiSe2_{scan}.nxs"
    with h5py.File(path, "r") as f:
        fe = f["f1"]
        assert fe["acquisition/status"][()].decode() == status
        assert int(fe["acquisition/frames_collected"][()]) == NFRAMES
        assert fe["data/data"].shape[0] == NFRAMES  # through the link to the frame file
        assert fe["data/frame_number"].shape == (NFRAMES,)
        assert fe["monitor/MCS1"].shape == (NFRAMES,)
    return path


def journal(session: Any) -> Path:
    return journal_directory(session.experiment_dir)


def in_tiled(server: TiledServer, uid: str) -> dict[str, Any] | None:
    """The stop document Tiled holds for run ``uid`` (None: no run or no stop)."""
    client = server.client()
    try:
        return client[uid].metadata.get("stop") if uid in client else None
    finally:
        close_catalog(client)


def test_open_catalog_with_a_server_uri(server, monkeypatch):
    monkeypatch.delenv("TILED_API_KEY", raising=False)
    client = open_catalog(server.uri, api_key=server.api_key)
    try:
        assert client.uri.startswith(server.uri)
        list(client)  # authenticated: listing works
    finally:
        close_catalog(client)
    with pytest.raises(TiledError, match="cannot connect to the Tiled server"):
        open_catalog(server.uri, api_key="wrongkey0123")


def test_tiled_killed_between_and_during_scans(session, server, capsys):
    RE = session.RE
    started: list[str] = []
    RE.subscribe(lambda name, doc: started.append(doc["uid"]), "start", critical=True)

    # 1. server up: archived, no journal left behind
    (uid1,) = RE(scan(session, "100K"))
    RE.flush(60)
    check_scan_file(session, "100K")
    assert in_tiled(server, uid1)["exit_status"] == "success"
    assert pending_runs(journal(session)) == []

    # 2. server killed between scans: the scan succeeds, the run is journaled
    server.kill()
    (uid2,) = RE(scan(session, "200K"))
    check_scan_file(session, "200K")
    assert session.writer.wait_run(uid2, 60) == "success"
    RE.flush(60)  # the archiver has handled the whole run (and given up on Tiled)
    assert [p.stem for p in pending_runs(journal(session))] == [uid2]

    # 3. server up again at the start, killed during the scan (after Tiled got the start)
    server.start()

    def kill_at_kickoff(msg: Any) -> tuple[Any, None]:
        if msg.command == "kickoff" and server.proc is not None:
            wait_until(lambda: _has_run(server, started[-1]), 60, "the run in Tiled")
            server.kill()
        return None, None

    (uid3,) = RE(bpp.plan_mutator(scan(session, "300K"), kill_at_kickoff))
    check_scan_file(session, "300K")
    RE.flush(60)
    assert sorted(p.stem for p in pending_runs(journal(session))) == sorted([uid2, uid3])

    # 4. back up: 'archive --resume' uploads both (replacing the partial copy of uid3)
    server.start()
    code = main(["archive", str(session.experiment_dir)])
    out, _ = capsys.readouterr()
    assert code == 0 and "2 run(s) waiting" in out
    code = main(["archive", str(session.experiment_dir), "--resume", "--tiled", server.uri,
                 "--api-key", server.api_key])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "uploaded 2 run(s)" in out
    assert pending_runs(journal(session)) == []
    client = server.client()
    try:
        for uid in (uid1, uid2, uid3):
            run = client[uid]
            assert run.metadata["stop"]["exit_status"] == "success"
            assert run.metadata["start"]["uid"] == uid
            assert len(list(run)) >= 1  # its streams
    finally:
        close_catalog(client)

    # 5. a stock server cannot replay: a clear error naming the config to add
    path = check_scan_file(session, "200K")
    before = path.read_bytes()
    code = main(["replay", server.uri, "--uid", uid2, "--api-key", server.api_key])
    _, err = capsys.readouterr()
    assert code == 2
    assert "406" in err and SERVER_CONFIG_HINT.splitlines()[-1].strip() in err
    assert path.read_bytes() == before


def _has_run(server: TiledServer, uid: str) -> bool:
    client = server.client()
    try:
        return uid in client
    finally:
        close_catalog(client)


def test_writer_failure_does_not_starve_tiled(session, server):
    """The writer fails mid-run (its scan file's lock is held): Tiled still gets stop.

    The writer thread times out on the lock at the run's start; the failure is raised
    on the RunEngine thread at the run's next document, so the RunEngine fails the run
    (frames keep coming for ~2 s) -- and the archiver still gets the stop document.
    """
    RE = session.RE
    session.writer.lock_timeout = 0.2
    started: list[str] = []
    RE.subscribe(lambda name, doc: started.append(doc["uid"]), "start", critical=True)
    path = session.experiment_dir / NAMES["sample"] / NAMES["label"] / "TiSe2_400K.nxs"
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path), pytest.raises(NXRefineBSError, match="NeXus writer failed"):
        RE(scan(session, "400K", frame_time=0.1))
    RE.flush(60)
    (uid,) = started
    stop = wait_until(lambda: in_tiled(server, uid), 60, "the stop document in Tiled")
    assert stop["run_start"] == uid
    assert stop["exit_status"] == "fail" and "NeXus writer failed" in stop["reason"]
    assert pending_runs(journal(session)) == []
    assert session.writer.wait_run(uid, 10) == "fail"
