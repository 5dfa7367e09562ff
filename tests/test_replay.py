"""Replay: archived runs re-drive the NeXus writer into the same scan file as live.

A fly multi-rotation scan is recorded with a real RunEngine by the NeXus writer and,
at the same time, archived in the experiment's embedded Tiled catalog.  The live scan
file is set aside and deleted; replaying the archived runs (through the API and through
``nxrefine-bs replay``) must regenerate it field by field: the same groups, datasets
(values, dtype, shape), attributes and links, apart from the fields listed in
:data:`EXCLUDED_FIELDS` and :data:`EXCLUDED_ATTRIBUTES`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from nxrefine_bs.callbacks.nexus_writer import NeXusScanWriter
from nxrefine_bs.cli import main
from nxrefine_bs.devices import make_sim_beamline
from nxrefine_bs.geometry import Geometry
from nxrefine_bs.plans import multi_rotation_scan
from nxrefine_bs.simulation.crystal import SimCrystal
from nxrefine_bs.simulation.frames import DetectorModel
from nxrefine_bs.tiled import archive_callback, close_catalog, open_catalog
from nxrefine_bs.tiled.replay import ReplayError, replay_runs, select_runs

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


@pytest.fixture
def recorded(RE, tmp_path):
    """Two fly rotations recorded live and archived; the catalog client stays open."""
    exp = tmp_path / "experiment"
    exp.mkdir()
    model = DetectorModel.synthetic(SHAPE, pixel_size=0.6)
    geometry = Geometry(
        wavelength=0.3, distance=100.0, pixel_size=0.6, shape=SHAPE, beam_center_x=40.3,
        beam_center_y=31.6, chi=-90.0, phi_start=0.0, phi_step=0.5,
    )  # fmt: skip
    crystal = SimCrystal.random((5.43, 5.43, 5.43, 90, 90, 90), centring="F", seed=3)
    devices = make_sim_beamline(
        exp, crystal=crystal, detector=model, geometry=geometry, frame_time=0.005, seed=7,
        temperature_time_constant=0.01,
    )  # fmt: skip
    client = open_catalog(exp)
    writer = NeXusScanWriter()
    RE.subscribe(writer)
    RE.subscribe(archive_callback(client, batch_size=1))
    uids = RE(
        multi_rotation_scan(
            devices,
            experiment_dir=exp,
            **NAMES,
            rotations=[{"omega": 0.0}, {"omega": 15.0, "translation": (0.0, 5.0)}],
            phi_start=0.0,
            phi_end=20.0,
            phi_step=0.5,
            temperature=300.0,
        )
    )
    scan_file = writer.last_scan_file
    live = scan_file.with_name("live_copy.h5")  # same directory: its links resolve
    shutil.copy(scan_file, live)
    yield exp, client, list(uids), scan_file, live
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
    with h5py.File(scan_file, "r") as f:
        np.testing.assert_array_equal(f["f2/data/data"][7], h5py.File(live)["f2/data/data"][7])
        assert f["f1/acquisition/run_uid"][()].decode() == uids[0]

    # by uid, replayed into another experiment directory: links stay valid
    other = exp.parent / "elsewhere"
    other.mkdir()
    replay_runs(select_runs(client, uids=[uids[1][:8]]), [NeXusScanWriter()], experiment_dir=other)
    moved = other / NAMES["sample"] / NAMES["label"] / scan_file.name
    with h5py.File(moved, "r") as f:
        assert set(f) == {"entry", "f2"}
        assert f["f2/data/data"].shape == (40, *SHAPE)

    with pytest.raises(ReplayError, match="no archived run matches"):
        select_runs(client, query={"sample": "nothing"})
    with pytest.raises(ReplayError, match="say which runs"):
        select_runs(client)


def test_replay_command(recorded, capsys):
    exp, client, uids, scan_file, live = recorded
    close_catalog(client)  # the command opens the catalog itself
    scan_file.unlink()
    code = main(["replay", str(exp), "--sample", NAMES["sample"], "--scan", NAMES["scan"]])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "replayed 2 run(s)" in out
    assert_same_file(live, scan_file)
    code = main(["replay", str(exp), "--sample", "nothing"])
    _, err = capsys.readouterr()
    assert code == 2
    assert err.strip().startswith("nxrefine-bs: error: no archived run matches")
