"""Beamline base class, registry (entry points) and the built-in beamlines."""

from __future__ import annotations

import importlib.metadata
import logging

import pytest

from nxrefine_bs.beamlines import BeamLine, available_beamlines, get_beamline, registry
from nxrefine_bs.beamlines.qm2 import QM2Beamline
from nxrefine_bs.beamlines.sim import SimBeamline
from nxrefine_bs.errors import BeamlineNotFoundError, NXRefineBSError, PathSafetyError
from nxrefine_bs.experiment import Experiment


class PluginBeamline(BeamLine):
    """A beamline provided by a (fake) plugin."""

    name = "7-ID"
    source_name = "Somewhere"


class NotABeamline:
    name = "nope"


def _fake_entry_points(monkeypatch, *eps: importlib.metadata.EntryPoint) -> None:
    real = importlib.metadata.entry_points

    def entry_points(**kw):
        if kw.get("group") == registry.ENTRY_POINT_GROUP:
            return importlib.metadata.EntryPoints(
                list(real(group=registry.ENTRY_POINT_GROUP)) + list(eps)
            )
        return real(**kw)

    monkeypatch.setattr(registry.importlib.metadata, "entry_points", entry_points)


def _ep(name: str, value: str) -> importlib.metadata.EntryPoint:
    return importlib.metadata.EntryPoint(name=name, value=value, group=registry.ENTRY_POINT_GROUP)


def test_installed_entry_points_declare_builtins():
    eps = {
        ep.name: ep.value for ep in importlib.metadata.entry_points(group="nxrefine_bs.beamlines")
    }
    assert eps.get("sim") == "nxrefine_bs.beamlines.sim:SimBeamline"
    assert eps.get("qm2") == "nxrefine_bs.beamlines.qm2:QM2Beamline"


def test_registry_lookup():
    names = available_beamlines()
    assert names["sim"] is SimBeamline and names["QM2"] is QM2Beamline
    assert get_beamline("sim") is SimBeamline
    assert get_beamline("qm2") is QM2Beamline and get_beamline(" QM2 ") is QM2Beamline
    with pytest.raises(BeamlineNotFoundError) as info:
        get_beamline("6-ID-D")
    message = str(info.value)
    assert "'6-ID-D'" in message and "QM2" in message and "sim" in message
    assert isinstance(info.value, KeyError) and isinstance(info.value, NXRefineBSError)


def test_plugins_and_broken_plugins(monkeypatch, caplog):
    _fake_entry_points(
        monkeypatch,
        _ep("seven", f"{__name__}:PluginBeamline"),
        _ep("broken", "nxrefine_bs_no_such_module:Thing"),
        _ep("wrong", f"{__name__}:NotABeamline"),
    )
    with caplog.at_level(logging.WARNING, logger="nxrefine_bs.beamlines.registry"):
        names = available_beamlines()
    assert names["7-ID"] is PluginBeamline and "sim" in names
    assert "nope" not in names
    assert get_beamline("seven") is PluginBeamline  # entry-point name works too
    assert get_beamline("7-id") is PluginBeamline
    text = caplog.text
    assert "broken" in text and "wrong" in text


def test_sim_paths(experiment: Experiment):
    beamline = get_beamline(experiment.beamline_name)()
    assert isinstance(beamline, SimBeamline)
    paths = experiment.scan_paths("TiSe2", "xtal1", "300K")
    assert beamline.scan_data_directory(paths) == paths.scan_dir
    assert beamline.data_file(paths, "f2") == paths.scan_dir / "f2.h5"
    assert beamline.raw_directory(experiment) is None
    # hooks have harmless defaults
    assert beamline.read_logs(paths, "f1") == {}
    assert beamline.read_monitor(paths, "f1", "MCS1") is None
    assert beamline.read_goniometer(paths, "f1") == {}
    assert beamline.read_sample(paths) == {}
    assert beamline.start_time(paths, "f1") is None
    assert beamline.source()["name"] == SimBeamline.source_name
    with pytest.raises(NXRefineBSError, match="does not import data"):
        beamline.import_data(experiment, experiment.configuration_file("c"), "s", "l")


def test_qm2_raw_tree(tmp_path, server_settings):
    exp = Experiment.create(
        tmp_path / "analysis",
        "run2026",
        beamline="QM2",
        raw_home=tmp_path / "raw",
        raw_path="raw6M",
    )
    beamline = get_beamline("QM2")()
    assert beamline.import_data_enabled
    assert beamline.raw_directory(exp) == tmp_path / "raw" / "run2026" / "raw6M"
    paths = exp.scan_paths("TiSe2", "xtal1", "300K")
    assert beamline.raw_scan_directory(exp, paths) == (
        tmp_path / "raw" / "run2026" / "raw6M" / "TiSe2" / "xtal1" / "300K"
    )
    assert beamline.scan_data_directory(paths) == exp.directory / "TiSe2" / "xtal1" / "300K"
    with pytest.raises(NXRefineBSError, match="does not exist"):
        beamline.import_data(exp, exp.configuration_file("c"), "TiSe2", "xtal1")


def test_raw_path_cannot_escape(tmp_path, server_settings):
    exp = Experiment.create(
        tmp_path / "a", "e", beamline="QM2", raw_home=tmp_path / "raw", raw_path="../../etc"
    )
    with pytest.raises(PathSafetyError):
        QM2Beamline().raw_directory(exp)
