"""Configuration templates and scan files: layout, links, parents, safety."""

from __future__ import annotations

import os
import threading

import h5py
import numpy as np
import pytest
from nexusformat.nexus import nxload

from nxrefine_bs.errors import (
    DataLinkError,
    ExperimentError,
    FileExistsNXError,
    InvalidNameError,
    ScanFileError,
    TemplateError,
)
from nxrefine_bs.geometry import HC_KEV_ANGSTROM
from nxrefine_bs.nexus.scanfile import (
    check_data_link,
    create_scan_file,
    find_parent,
    locked,
    rotation_entries,
    set_parent,
)
from nxrefine_bs.nexus.template import (
    Position,
    create_configuration,
    detector_info,
    frame_count,
    read_configuration,
)

# --------------------------------------------------------------------------- templates


def test_configuration_layout(configuration):
    with h5py.File(configuration, "r") as f:
        assert f.attrs["NX_class"] == "NXroot"
        assert f["entry"].attrs["NX_class"] == "NXentry"
        assert rotation_entries(f) == ["f1", "f2"]
        for name, omega in (("f1", 0.0), ("f2", 15.0)):
            fe = f[name]
            mono = fe["instrument/monochromator"]
            assert mono["wavelength"].dtype == np.float32
            assert mono["wavelength"][()] == pytest.approx(0.2)
            assert mono["energy"][()] == pytest.approx(HC_KEV_ANGSTROM / 0.2, rel=1e-6)
            det = fe["instrument/detector"]
            assert det.attrs["NX_class"] == "NXdetector"
            assert det["description"][()].decode() == "Pilatus 100k"
            assert det["detector_orientation"][()].decode() == "-y +z -x"
            assert det["pixel_size"][()] == pytest.approx(0.172)
            assert tuple(det["shape"][()]) == (195, 487)
            mask = det["pixel_mask"]
            assert mask.dtype == np.int8 and mask.shape == (195, 487)
            assert not mask[()].any()  # a single module: no gaps
            assert det["beam_center_x"][()] == 243.5 and det["beam_center_y"][()] == 97.5
            assert det["frame_time"][()] == pytest.approx(0.1)
            for key in ("yaw", "pitch", "roll", "translation_x", "translation_y", "distance"):
                assert key in det
            gon = fe["instrument/goniometer"]
            assert gon["phi"][()] == -5.0
            assert gon["phi"].attrs["step"] == pytest.approx(0.1)
            assert gon["phi"].attrs["end"] == 360.0
            assert gon["omega"][()] == omega and gon["chi"][()] == 0 and gon["theta"][()] == 0
            data = fe["data"]
            assert data.attrs["NX_class"] == "NXdata" and data.attrs["signal"] == "data"
            link = data.get("data", getlink=True)
            assert isinstance(link, h5py.ExternalLink)
            assert (link.filename, link.path) == (f"{name}.h5", "/entry/data/data")
            assert data["frame_number"].dtype == np.int32
            assert data["frame_number"].shape == (3650,)
            assert data["x_pixel"].shape == (487,) and data["y_pixel"].shape == (195,)
    info = read_configuration(configuration)
    assert info.entries == ("f1", "f2") and info.nframes == 3650
    assert info.positions == (Position(), Position(omega=15.0))
    assert info.wavelength == 0.2 and info.detector == "Pilatus 100k"
    root = nxload(str(configuration))
    assert root.f2.instrument.goniometer.omega.nxvalue == 15.0


def test_configuration_options(tmp_path):
    path = create_configuration(
        tmp_path / "c.nxs",
        detector="pilatus100k",
        wavelength=0.5,
        distance=300,
        detector_orientation="+y +z -x",
        phi_start=0,
        phi_step=0.5,
        phi_end=10,
        frame_rate=0,
        positions=[Position(chi=-90, omega=5, theta=1, x=2, y=3)],
        beam_center_x=100,
        beam_center_y=50,
    )
    info = read_configuration(path)
    assert (info.nframes, info.frame_time, info.distance) == (20, 0.1, 300.0)
    assert info.positions == (Position(-90, 5, 1, 2, 3),)
    assert (info.beam_center_x, info.beam_center_y) == (100.0, 50.0)
    assert info.detector_orientation == "+y +z -x"
    with pytest.raises(FileExistsNXError):
        create_configuration(path, detector="pilatus100k")
    create_configuration(path, detector="pilatus100k", overwrite=True)
    assert read_configuration(path).nframes == 3650


def test_frame_count_and_detector_lookup():
    assert frame_count(-5, 360, 0.1) == 3650
    assert frame_count(0, 1, 0.3) == 3
    with pytest.raises(TemplateError, match="no frame"):
        frame_count(10, 0, 0.1)
    info = detector_info("Pilatus CdTe 2M")
    assert info.shape == (1679, 1475) and info.mask.dtype == np.int8
    # module gaps are masked (1), sensitive pixels are not (0)
    assert set(np.unique(info.mask)) == {0, 1}
    assert 0.05 < info.mask.mean() < 0.15
    with pytest.raises(TemplateError, match="Pilatus 2M") as exc:
        detector_info("Pilatsu 2M")
    assert "unknown detector 'Pilatsu 2M'" in str(exc.value)
    assert len(str(exc.value)) < 300


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"wavelength": -1}, "wavelength"),
        ({"distance": 0}, "distance"),
        ({"detector_orientation": "x y"}, "three signed axes"),
        ({"phi_step": 0}, "phi step"),
        ({"positions": []}, "at least one position"),
        ({"detector": "/tmp/det.h5"}, "not a file"),
    ],
)
def test_configuration_bad_values(tmp_path, kwargs, match):
    kwargs.setdefault("detector", "pilatus100k")
    with pytest.raises(TemplateError, match=match):
        create_configuration(tmp_path / "c.nxs", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_read_configuration_rejects_bad_files(tmp_path, configuration):
    with pytest.raises(TemplateError, match="does not exist"):
        read_configuration(tmp_path / "missing.nxs")
    corrupt = tmp_path / "corrupt.nxs"
    corrupt.write_bytes(b"\x89HDF\r\n\x1a\n" + b"garbage" * 20)
    with pytest.raises(TemplateError, match="corrupt.nxs"):
        read_configuration(corrupt)
    truncated = tmp_path / "truncated.nxs"
    truncated.write_bytes(configuration.read_bytes()[:4000])
    with pytest.raises(TemplateError, match="truncated.nxs"):
        read_configuration(truncated)
    empty = tmp_path / "empty.nxs"
    h5py.File(empty, "w").close()
    with pytest.raises(TemplateError, match="is not a configuration"):
        read_configuration(empty)
    partial = tmp_path / "partial.nxs"
    partial.write_bytes(configuration.read_bytes())
    with h5py.File(partial, "r+") as f:
        del f["f2/instrument/detector/distance"]
    with pytest.raises(TemplateError, match="/f2/instrument/detector/distance is missing"):
        read_configuration(partial)
    unreadable = tmp_path / "unreadable.nxs"
    unreadable.write_bytes(configuration.read_bytes())
    unreadable.chmod(0)
    try:
        if not os.access(unreadable, os.R_OK):  # root can read anything
            with pytest.raises(TemplateError, match="unreadable.nxs"):
                read_configuration(unreadable)
    finally:
        unreadable.chmod(0o644)


# --------------------------------------------------------------------------- scan files


def test_create_scan_file_layout(experiment, configuration, tmp_path, monkeypatch):
    path = create_scan_file(
        configuration, experiment.directory, "TiSe2", "xtal1", "300K", temperature=300
    )
    assert path == experiment.directory / "TiSe2" / "xtal1" / "TiSe2_300K.nxs"
    scan_dir = path.parent / "300K"
    assert scan_dir.is_dir()
    assert not path.with_name(path.name + ".lock").exists()
    with h5py.File(path, "r") as f:
        assert rotation_entries(f) == ["f1", "f2"]
        sample = f["entry/sample"]
        assert sample.attrs["NX_class"] == "NXsample"
        assert sample["name"][()].decode() == "TiSe2"
        assert sample["label"][()].decode() == "xtal1"
        assert sample["temperature"][()] == 300.0
        assert sample["temperature"].attrs["units"] == "K"
        assert "instrument" in f["entry"]
        for name in ("f1", "f2"):
            assert f[name]["sample"] == f["entry/sample"]  # same object: hard link
            assert f[name].get("sample", getlink=True).__class__ is h5py.HardLink
            link = f[name]["data"].get("data", getlink=True)
            assert isinstance(link, h5py.ExternalLink)
            assert link.filename == f"300K/{name}.h5"  # relative
            assert link.path == "/entry/data/data"
        assert f["f2/instrument/goniometer/omega"][()] == 15.0
        assert "nxscans" not in f["entry"]

    # the link is dangling until the detector stack exists
    with pytest.raises(DataLinkError, match=r"300K/f1\.h5"):
        check_data_link(path, "f1")
    frames = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    with h5py.File(scan_dir / "f1.h5", "w") as f:
        f.create_dataset("entry/data/data", data=frames)
    assert check_data_link(path, "f1") == scan_dir / "f1.h5"
    # resolves relative to the scan file, whatever the working directory
    monkeypatch.chdir(tmp_path)
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["f1/data/data"][()], frames)
    root = nxload(str(path))
    np.testing.assert_array_equal(root.f1.data.data.nxdata, frames)
    assert root.f1.sample.nxclass == "NXsample"
    # same layout as a nexusformat NXlink (attribute access through links is a
    # nexusformat quirk; item access resolves them)
    assert root["f1/sample/temperature"].nxvalue == 300.0
    assert str(root.entry.sample.name.nxvalue) == "TiSe2"
    with pytest.raises(ScanFileError, match="no entry 'f9'"):
        check_data_link(path, "f9")


def test_scan_file_refuses_overwrite_and_keeps_scan_directory(experiment, configuration):
    path = create_scan_file(configuration, experiment.directory, "s", "l", "10K")
    raw = path.parent / "10K" / "f1.h5"
    raw.write_bytes(b"raw data")
    marker = path.parent / "10K" / "notes.txt"
    marker.write_text("keep me")
    before = path.read_bytes()
    with pytest.raises(FileExistsNXError, match="already exists"):
        create_scan_file(configuration, experiment.directory, "s", "l", "10K")
    assert path.read_bytes() == before
    create_scan_file(
        configuration, experiment.directory, "s", "l", "10K", temperature=11, overwrite=True
    )
    with h5py.File(path, "r") as f:
        assert f["entry/sample/temperature"][()] == 11
    assert raw.read_bytes() == b"raw data" and marker.read_text() == "keep me"
    assert sorted(p.name for p in path.parent.iterdir()) == ["10K", "s_10K.nxs"]


@pytest.mark.parametrize(
    ("sample", "label", "scan"),
    [("../x", "l", "1"), ("s", ".hidden", "1"), ("s", "l", "a/b"), ("", "l", "1")],
)
def test_scan_file_bad_names(experiment, configuration, sample, label, scan):
    with pytest.raises(InvalidNameError):
        create_scan_file(configuration, experiment.directory, sample, label, scan)
    assert experiment.list_samples() == []


def test_scan_file_bad_inputs(experiment, configuration, tmp_path):
    with pytest.raises(ExperimentError, match="does not exist"):
        create_scan_file(configuration, tmp_path / "nowhere", "s", "l", "1")
    with pytest.raises(TemplateError):
        create_scan_file(tmp_path / "none.nxs", experiment.directory, "s", "l", "1")
    with pytest.raises(ScanFileError, match="parent"):
        create_scan_file(configuration, experiment.directory, "s", "l", "1", parent="s_0.nxs")
    with pytest.raises(InvalidNameError, match="reserved"):
        create_scan_file(configuration, experiment.directory, "tasks", "l", "1")


def test_parents(experiment, configuration):
    parent = create_scan_file(configuration, experiment.directory, "s", "l", "parent")
    child = create_scan_file(configuration, experiment.directory, "s", "l", "100K", parent=parent)
    other = create_scan_file(configuration, experiment.directory, "s", "l", "200K")
    assert find_parent(child) == parent
    assert find_parent(other) is None and find_parent(parent) is None
    with h5py.File(child, "r") as f:
        assert f["entry/nxscans"].attrs["NX_class"] == "NXprocess"
        assert f["entry/nxscans/parent"][()].decode() == "s_parent.nxs"
    set_parent([parent, other], parent)
    assert find_parent(other) == parent and find_parent(parent) is None
    set_parent([other], None)
    assert find_parent(other) is None
    parent.unlink()
    with pytest.raises(ScanFileError, match="s_parent.nxs"):
        find_parent(child)
    with pytest.raises(ScanFileError, match="does not exist"):
        set_parent([other], parent)


def test_rotation_entries_numeric_order(tmp_path):
    path = tmp_path / "x.nxs"
    with h5py.File(path, "w") as f:
        for name in ("entry", "f10", "f2", "f1", "notes"):
            f.create_group(name)
    assert rotation_entries(path) == ["f1", "f2", "f10"]
    with pytest.raises(ScanFileError):
        rotation_entries(tmp_path / "missing.nxs")


def test_locked_excludes_other_threads(tmp_path):
    target = tmp_path / "s.nxs"
    order: list[str] = []
    trying, got_it = threading.Event(), threading.Event()

    def other() -> None:
        trying.set()
        with locked(target):
            got_it.set()
            order.append("other")

    with locked(target):
        thread = threading.Thread(target=other)
        thread.start()
        assert trying.wait(30)
        # the other thread is at the lock: it must not get it while we hold it (this
        # can only fail if the lock does not exclude, however slow the machine)
        assert not got_it.wait(0.2)
        order.append("first")
    thread.join(30)
    assert order == ["first", "other"] and got_it.is_set()
    assert not (tmp_path / "s.nxs.lock").exists()
    with locked(target), pytest.raises(ScanFileError, match="timed out"):  # noqa: SIM117
        with locked(target, timeout=0.1):
            pass
