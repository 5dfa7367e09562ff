"""The one rule for rotation entries (nxrefine_bs.nexus.entries) and its users."""

from __future__ import annotations

import h5py
import pytest

from nxrefine_bs.errors import InvalidNameError, ScanFileError
from nxrefine_bs.nexus import scanfile
from nxrefine_bs.nexus.entries import (
    is_rotation_entry_name,
    rotation_entries,
    validate_rotation_entry,
)


@pytest.mark.parametrize("name", ["f1", "f2", "f10", "f123"])
def test_valid_names(name):
    assert validate_rotation_entry(name) == name
    assert is_rotation_entry_name(name)


@pytest.mark.parametrize("name", ["f0", "f01", "F1", "f", "f1 ", "entry", "g1", "f-1", 1, None])
def test_invalid_names_are_refused_with_the_fix(name):
    assert not is_rotation_entry_name(name)
    with pytest.raises(InvalidNameError, match=r"run abc: entry .* use f1, f2"):
        validate_rotation_entry(name, "run abc")


def test_listing_follows_nxrefine(tmp_path):
    """Groups ending in a digit, in numeric order; datasets and dangling links are not."""
    path = tmp_path / "scan.nxs"
    with h5py.File(path, "w") as f:
        for name in ("entry", "f10", "f2", "f1", "s3"):
            f.create_group(name)
        f["f4"] = 1.0  # a dataset, not an entry
        f["f5"] = h5py.ExternalLink("missing.h5", "/entry")
        assert rotation_entries(f) == ["f1", "f2", "f10", "s3"]
    assert rotation_entries(path) == ["f1", "f2", "f10", "s3"]
    assert scanfile.rotation_entries is rotation_entries  # one implementation
    with pytest.raises(ScanFileError, match="cannot read"):
        rotation_entries(tmp_path / "missing.nxs")


def test_every_former_copy_is_the_one_implementation():
    from nxrefine_bs.calibration import nexus_io
    from nxrefine_bs.nexus import geometry_io
    from nxrefine_bs.workflow import sync

    assert sync.rotation_entries is rotation_entries
    assert nexus_io.entry_names is rotation_entries
    assert scanfile.read_geometry is geometry_io.read_geometry


def test_one_rule_for_the_entries_a_step_works_on():
    from nxrefine_bs.reduce.steps import get_step, step_targets
    from nxrefine_bs.workflow import sync

    assert sync.scan_targets is step_targets
    per_entry = [n for n in ("find", "refine", "transform") if get_step(n).per_entry]
    assert per_entry  # the rotation steps run on each entry ...
    assert step_targets(get_step(per_entry[0]), ["f1", "f2"]) == ["f1", "f2"]
    per_scan = get_step("combine")
    assert not per_scan.per_entry  # ... a per-scan step on 'entry'
    assert step_targets(per_scan, ["f1", "f2"]) == ["entry"]
