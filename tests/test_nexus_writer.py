"""The NeXus writer callback fed with composed document streams (no RunEngine needed).

RunEngine-driven runs of the writer are in ``test_acquisition.py``.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from event_model import compose_run, compose_stream_resource
from nexusformat.nexus import nxload

from nxrefine_bs.callbacks.nexus_writer import NeXusScanWriter
from nxrefine_bs.errors import MetadataError
from nxrefine_bs.experiment import Experiment
from nxrefine_bs.geometry import Geometry

NY, NX, NF = 24, 30, 12


def _geometry_md(g: Geometry) -> dict:
    keys = (
        "wavelength distance pixel_size shape beam_center_x beam_center_y yaw pitch roll "
        "detector_orientation chi omega theta phi_start phi_step"
    ).split()
    md = {k: getattr(g, k) for k in keys}
    md["shape"] = list(g.shape)
    md["phi_end"] = g.phi_start + g.phi_step * NF
    return md


def _start_md(experiment: Path, entry: str = "f1", **extra) -> dict:
    g = Geometry(shape=(NY, NX), beam_center_x=15, beam_center_y=12, phi_start=0, phi_step=1)
    md = {
        "plan_name": "rotation_scan",
        "sample": "CsV3Sb5",
        "label": "xtal1",
        "scan": "80K",
        "temperature": 80.0,
        "entry": entry,
        "nxrefine": {
            "experiment_dir": str(experiment),
            "beamline": "sim",
            "configuration": None,
            "temperature_units": "K",
            "detector": {"name": "synthetic", "data_key": "det", "frame_time": 0.1},
            "monitors": ["MCS1", "MCS2"],
            "geometry": _geometry_md(g),
            "translation": {"x": 1.5, "y": -2.0},
            "n_frames": NF,
        },
    }
    md.update(extra)
    return md


def _detector_file(path: Path, n: int, *, keep_open: bool = False) -> h5py.File | None:
    path.parent.mkdir(parents=True, exist_ok=True)
    f = h5py.File(path, "w", libver="latest")
    ds = f.create_dataset("/entry/data/data", shape=(n, NY, NX), dtype="i4", chunks=(1, NY, NX))
    rng = np.random.default_rng(0)
    frames = rng.poisson(3.0, size=(n, NY, NX)).astype("i4")
    frames[:, 10, :] = -1  # a gap row
    ds[...] = frames
    attrs = f.create_group("/entry/instrument/NDAttributes")
    attrs["MCS1"] = 1000.0 + np.arange(n)
    attrs["MCS2"] = 2000.0 + np.arange(n)
    attrs["phi"] = np.arange(n, dtype=float)
    if keep_open:
        f.swmr_mode = True
        return f
    f.close()
    return None


def _fly_run(writer, experiment: Path, entry: str = "f1", *, finish: bool = True, n=NF):
    scan_dir = experiment / "CsV3Sb5" / "xtal1" / "80K"
    det_file = scan_dir / f"{entry}.h5"
    _detector_file(det_file, n)
    bundle = compose_run(metadata=_start_md(experiment, entry))
    writer("start", bundle.start_doc)
    keys = {
        "det": {"dtype": "array", "shape": [1, NY, NX], "source": "sim", "external": "STREAM:"},
        "det-MCS1": {"dtype": "number", "shape": [], "source": "sim", "external": "STREAM:"},
        "det-MCS2": {"dtype": "number", "shape": [], "source": "sim", "external": "STREAM:"},
        "det-phi": {"dtype": "number", "shape": [], "source": "sim", "external": "STREAM:"},
    }
    desc = bundle.compose_descriptor(data_keys=keys, name="primary")
    writer("descriptor", desc.descriptor_doc)
    resources = {}
    for key, dataset in (
        ("det", "/entry/data/data"),
        ("det-MCS1", "/entry/instrument/NDAttributes/MCS1"),
        ("det-MCS2", "/entry/instrument/NDAttributes/MCS2"),
        ("det-phi", "/entry/instrument/NDAttributes/phi"),
    ):
        res = compose_stream_resource(
            mimetype="application/x-hdf5",
            uri=f"file://localhost{det_file}",
            data_key=key,
            parameters={"dataset": dataset},
        )
        resources[key] = res
        writer("stream_resource", res.stream_resource_doc)
    for lo in range(0, n, 5):
        hi = min(n, lo + 5)
        for res in resources.values():
            writer(
                "stream_datum",
                res.compose_stream_datum(
                    indices={"start": lo, "stop": hi}, descriptor=desc.descriptor_doc
                ),
            )
    if finish:
        writer("stop", bundle.compose_stop(exit_status="success"))
    if hasattr(writer, "flush"):
        assert writer.flush(60)
    return writer.last_scan_file


@pytest.fixture
def experiment(tmp_path: Path, server_settings: Path) -> Path:
    return Experiment.create(tmp_path / "analysis", "exp", beamline="sim").directory


def test_fly_run_writes_links_and_metadata(experiment: Path) -> None:
    writer = NeXusScanWriter()
    scan_file = _fly_run(writer, experiment)
    assert scan_file == experiment / "CsV3Sb5" / "xtal1" / "CsV3Sb5_80K.nxs"
    with h5py.File(scan_file, "r") as f:
        link = f["f1/data"].get("data", getlink=True)
        assert isinstance(link, h5py.ExternalLink)
        assert link.filename == "80K/f1.h5"  # relative to the scan file
        assert link.path == "/entry/data/data"
        assert f["f1/data/data"].shape == (NF, NY, NX)
        assert f["f1/data/frame_number"][()].tolist() == list(range(NF))
        np.testing.assert_allclose(f["f1/data/frame_time"][()], 0.1 * np.arange(NF))
        # monitors were linked during the run and copied in at stop
        assert not isinstance(f["f1/monitor"].get("MCS1", getlink=True), h5py.ExternalLink)
        np.testing.assert_array_equal(f["f1/monitor/MCS1"][()], 1000.0 + np.arange(NF))
        np.testing.assert_array_equal(f["f1/instrument/goniometer/phi"][()], np.arange(NF))
        assert f["f1/instrument/detector/translation_x"][()] == 1.5
        assert f["f1/instrument/detector/pixel_mask"][10].all()  # gap row from frame 0
        assert f["f1/instrument/detector/pixel_mask"][()].sum() == NX
        assert f["f1/acquisition/status"][()].decode() == "success"
        assert f["entry/sample/temperature"][()] == 80.0
        assert f["f1/sample"] == f["entry/sample"]
        assert "f1/nxworkflow/nxlink" in f
    root = nxload(str(scan_file))
    assert root["f1/data/data"].shape == (NF, NY, NX)
    assert float(root["f1/instrument/monochromator/wavelength"]) == pytest.approx(0.2)


def test_second_rotation_adds_entry(experiment: Path) -> None:
    writer = NeXusScanWriter()
    _fly_run(writer, experiment, "f1")
    scan_file = _fly_run(writer, experiment, "f2")
    with h5py.File(scan_file, "r") as f:
        assert {"entry", "f1", "f2"} <= set(f)
        assert f["f2/data"].get("data", getlink=True).filename == "80K/f2.h5"
        assert f["f1/acquisition/status"][()].decode() == "success"


def test_crash_mid_run_leaves_valid_file(experiment: Path) -> None:
    writer = NeXusScanWriter()
    scan_file = _fly_run(writer, experiment, finish=False)
    # The process "dies" here: no stop document. The file must still be valid.
    with h5py.File(scan_file, "r") as f:
        assert f["f1/acquisition/status"][()].decode() == "running"
        assert "end_time" not in f["f1"]
        assert f["f1/data/frame_number"].shape == (NF,)
    assert nxload(str(scan_file))["f1/data/data"].shape[0] == NF


def test_link_is_written_while_detector_file_is_open(experiment: Path) -> None:
    scan_dir = experiment / "CsV3Sb5" / "xtal1" / "80K"
    live = _detector_file(scan_dir / "f1.h5", NF, keep_open=True)
    try:
        writer = NeXusScanWriter()
        bundle = compose_run(metadata=_start_md(experiment))
        writer("start", bundle.start_doc)
        desc = bundle.compose_descriptor(
            data_keys={
                "det": {
                    "dtype": "array",
                    "shape": [1, NY, NX],
                    "source": "s",
                    "external": "STREAM:",
                }
            },
            name="primary",
        )
        writer("descriptor", desc.descriptor_doc)
        res = compose_stream_resource(
            mimetype="application/x-hdf5",
            uri=f"file://localhost{scan_dir / 'f1.h5'}",
            data_key="det",
            parameters={"dataset": "/entry/data/data"},
        )
        writer("stream_resource", res.stream_resource_doc)
        writer(
            "stream_datum",
            res.compose_stream_datum(
                indices={"start": 0, "stop": 4}, descriptor=desc.descriptor_doc
            ),
        )
        assert writer.flush(60)  # the link is made while the detector still writes
        # A SWMR reader sees the frames through the scan file's link while it is open.
        with h5py.File(writer.last_scan_file, "r", swmr=True, libver="latest") as f:
            assert f["f1/data/data"].shape == (NF, NY, NX)
            assert f["f1/data/data"][3, 0, 0] >= 0
        writer("stop", bundle.compose_stop(exit_status="abort", reason="user abort"))
        assert writer.flush(60)
    finally:
        live.close()
    with h5py.File(writer.last_scan_file, "r") as f:
        assert f["f1/acquisition/status"][()].decode() == "abort"
        assert "nxlink" not in f["f1"].get("nxworkflow", {})


@pytest.mark.parametrize(
    "change, message",
    [
        ({"sample": "../evil"}, "sample"),
        ({"label": ".hidden"}, "label"),
        ({"scan": "a/b"}, "scan"),
        ({"entry": "entry"}, "f1, f2"),
    ],
)
def test_bad_metadata_is_rejected_before_writing(experiment: Path, change, message) -> None:
    writer = NeXusScanWriter()
    bundle = compose_run(metadata=_start_md(experiment, **change))
    with pytest.raises(MetadataError, match=message):
        writer("start", bundle.start_doc)
    assert not list(experiment.rglob("*.nxs"))


def test_missing_experiment_dir_is_rejected(tmp_path: Path) -> None:
    writer = NeXusScanWriter()
    bundle = compose_run(metadata=_start_md(tmp_path / "nope"))
    with pytest.raises(MetadataError, match="experiment_dir"):
        writer("start", bundle.start_doc)


def test_runs_without_nxrefine_metadata_are_ignored(experiment: Path) -> None:
    writer = NeXusScanWriter()
    bundle = compose_run(metadata={"plan_name": "count"})
    writer("start", bundle.start_doc)
    writer("stop", bundle.compose_stop())
    assert writer.last_scan_file is None
    assert not list(experiment.rglob("*.nxs"))
