"""The typed start document (nxrefine_bs.documents) agrees with the plans, the writer and
docs/documents.md."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest

from nxrefine_bs.documents import (
    DetectorMetadata,
    GeometryMetadata,
    NXRefineMetadata,
    RotationStart,
    TranslationMetadata,
)
from nxrefine_bs.geometry import RUN_GEOMETRY_KEYS

DOCS = Path(__file__).resolve().parents[1] / "docs" / "documents.md"


def _documented_nxrefine_keys() -> set[str]:
    text = DOCS.read_text()
    table = text.split("`nxrefine` dictionary", 1)[1].split("\n## ", 1)[0]
    keys: set[str] = set()
    for line in table.splitlines():
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            keys.update(re.findall(r"`([a-z_]+)`", first_cell))
    return keys


def test_typed_dict_is_the_documented_table():
    assert _documented_nxrefine_keys() == set(NXRefineMetadata.__required_keys__)
    assert set(GeometryMetadata.__required_keys__) == {*RUN_GEOMETRY_KEYS, "phi_end"}
    hints = typing.get_type_hints(NXRefineMetadata)
    assert hints["detector"] is DetectorMetadata
    assert hints["geometry"] is GeometryMetadata
    assert hints["translation"] is TranslationMetadata
    assert RotationStart.__optional_keys__ == {"temperature"}


@pytest.mark.parametrize("temperature", [None, 120.0])
def test_start_metadata_builds_exactly_the_typed_dictionary(experiment, temperature):
    from nxrefine_bs.devices import make_sim_beamline
    from nxrefine_bs.plans.specs import prepare_rotation, start_metadata

    devices = make_sim_beamline(experiment.directory, api="ophyd", frame_time=0.01)
    spec = prepare_rotation(
        devices,
        experiment_dir=experiment.directory,
        sample="s1",
        label="x1",
        scan="300K",
        entry="f2",
        phi_start=0.0,
        phi_end=1.0,
        phi_step=0.5,
        temperature=temperature,
    )
    start = start_metadata(
        devices,
        spec,
        plan_name="rotation_scan",
        plan_args={},
        frame_time=0.01,
        rotation=(2, 3),
    )
    expected_top = set(RotationStart.__required_keys__)
    if temperature is not None:
        expected_top.add("temperature")
    assert expected_top <= set(start)
    assert ("temperature" in start) == (temperature is not None)
    md = start["nxrefine"]
    assert set(md) == set(NXRefineMetadata.__required_keys__)
    assert set(md["detector"]) == set(DetectorMetadata.__required_keys__)
    assert set(md["geometry"]) == set(GeometryMetadata.__required_keys__)
    assert set(md["translation"]) == set(TranslationMetadata.__required_keys__)
    assert (md["n_frames"], md["rotation_index"], md["rotations"]) == (2, 2, 3)
    assert isinstance(md["geometry"]["shape"], list)


def test_writer_reads_it_and_refuses_entries_the_plans_refuse():
    from nxrefine_bs.callbacks.run_writer import nxrefine_md, scan_file_for_start
    from nxrefine_bs.errors import MetadataError

    start = {
        "uid": "u1",
        "sample": "s1",
        "label": "x1",
        "scan": "300K",
        "entry": "f01",
        "nxrefine": {"experiment_dir": "/tmp/exp"},
    }
    assert nxrefine_md(start) == {"experiment_dir": "/tmp/exp"}
    for bad in ("f01", "f0", "entry"):
        with pytest.raises(MetadataError, match="run u1: entry"):
            scan_file_for_start({**start, "entry": bad})
    exp, scan_file, entry = scan_file_for_start({**start, "entry": "f3"})
    assert entry == "f3" and scan_file == Path("/tmp/exp/s1/x1/s1_300K.nxs")
