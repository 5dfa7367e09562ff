"""Settings: schema, file location, validation, layering and scan-file parameters."""

from __future__ import annotations

import configparser
from pathlib import Path

import h5py
import pytest

from nxrefine_bs import settings as st
from nxrefine_bs.errors import SettingsError
from nxrefine_bs.nexus import nxreduce as nr


def _ini(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str
    parser.read(path)
    return parser


def test_schema_defaults_match_nxrefine():
    d = st.default_settings()
    server = {"type": "local", "cores": 2, "dask_scheduler": "", "tiled_uri": ""}
    assert server.items() <= d["server"].items()
    assert all(v is None for v in d["instrument"].values())
    assert set(d["instrument"]) >= {  # NXRefine's keys; nxrefine-bs adds PV prefixes
        "source",
        "instrument",
        "raw_home",
        "raw_path",
        "analysis_home",
        "analysis_path",
        "experiment",
    }
    assert d["nxrefine"]["detector_orientation"] == "-y +z -x"
    assert (d["nxrefine"]["phi"], d["nxrefine"]["phi_end"], d["nxrefine"]["phi_step"]) == (
        -5.0,
        360.0,
        0.1,
    )
    assert d["nxrefine"]["nsteps"] == 3 and d["nxrefine"]["frame_rate"] == 10
    r = d["nxreduce"]
    assert r["threshold"] == 50000 and r["last_frame"] == 3640 and r["monitor"] == "MCS1"
    assert r["sample_transmission"] is True and r["polarization"] == 0.99
    assert (r["mask_t1"], r["mask_h1"], r["mask_t2"], r["mask_h2"]) == (2, 11, 0.8, 51)
    assert r["scan_path"] == "/entry/sample/temperature" and r["scan_units"] == "K"


def test_server_path_from_env_file_or_directory(tmp_path, monkeypatch):
    monkeypatch.setenv(st.ENV_VAR, str(tmp_path))
    assert st.server_settings_path() == tmp_path / "settings.ini"
    monkeypatch.setenv(st.ENV_VAR, str(tmp_path / "my.ini"))
    assert st.server_settings_path() == tmp_path / "my.ini"
    monkeypatch.delenv(st.ENV_VAR)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert st.server_settings_path() == tmp_path / "home/.config/nxrefine-bs/settings.ini"


def test_init_round_trip_and_refuses_overwrite(server_settings):
    assert server_settings.is_file()
    assert st.load_server_settings() == st.default_settings()
    with pytest.raises(SettingsError, match="already exists"):
        st.init_server_settings(server_settings)
    st.init_server_settings(server_settings, values={"server": {"cores": 8}}, overwrite=True)
    assert st.load_server_settings()["server"]["cores"] == 8


def test_missing_server_file_says_how_to_create_it(_isolated_settings):
    with pytest.raises(SettingsError, match="nxrefine-bs settings init") as info:
        st.load_server_settings()
    assert str(_isolated_settings) in str(info.value)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[nxreduce]\nthreshold = lots\n", ["[nxreduce]", "threshold", "float"]),
        ("[server]\ncores = 2.5\n", ["[server]", "cores", "int"]),
        ("[nxreduce]\nsample_transmission = maybe\n", ["sample_transmission", "bool"]),
        ("[nxrefine]\ndetector_orientation = +q +z -x\n", ["detector_orientation"]),
        ("no section header\n", ["not a valid INI"]),
    ],
)
def test_invalid_files_name_file_section_and_key(tmp_path, text, words):
    path = tmp_path / "settings.ini"
    path.write_text(text)
    with pytest.raises(SettingsError) as info:
        st.read_settings(path)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message


def test_value_parsing():
    assert st.get_spec("nxreduce", "sample_transmission").parse("no") is False
    assert st.get_spec("nxreduce", "last_frame").parse("None") is None
    assert st.get_spec("nxreduce", "min_pixels").parse("1e1") == 10
    assert st.get_spec("instrument", "raw_home").parse("") is None
    with pytest.raises(ValueError, match="required"):
        st.get_spec("nxreduce", "min_pixels").parse("")
    with pytest.raises(ValueError, match="positive"):
        st.get_spec("server", "cores").parse("0")
    with pytest.raises(ValueError, match="finite"):
        st.get_spec("nxreduce", "norm").parse("nan")


def test_experiment_copy_has_no_server_section(tmp_path, server_settings):
    st.update_settings(server_settings, {"nxreduce.threshold": "1234", "server.cores": 4})
    path = st.copy_to_experiment(tmp_path / "exp", overrides={"instrument": {"experiment": "e"}})
    assert path == tmp_path / "exp" / "tasks" / "settings.ini"
    parser = _ini(path)
    assert parser.sections() == ["instrument", "nxrefine", "nxreduce"]
    values = st.load_experiment_settings(tmp_path / "exp")
    assert values["nxreduce"]["threshold"] == 1234
    assert values["instrument"]["experiment"] == "e"
    # [server] in an experiment file (NXRefine users have them) is kept but not used
    path.write_text(path.read_text() + "\n[server]\ncores = 3\n")
    assert st.load_experiment_settings(tmp_path / "exp") == values
    st.update_settings(path, {"nxreduce.threshold": 99})
    assert _ini(path)["server"]["cores"] == "3"


def test_update_settings_validates_before_writing(server_settings):
    before = server_settings.read_text()
    with pytest.raises(SettingsError, match="expected int"):
        st.update_settings(server_settings, {"nxreduce.min_pixels": "many"})
    with pytest.raises(SettingsError, match="section.key"):
        st.update_settings(server_settings, {"threshold": "1"})
    with pytest.raises(SettingsError, match="unknown key"):
        st.update_settings(server_settings, {"nxreduce.nope": "1"})  # typo on the way in
    assert server_settings.read_text() == before
    st.update_settings(server_settings, {"nxreduce.monitor": "MCS2"})
    assert _ini(server_settings)["nxreduce"]["monitor"] == "MCS2"


def _scan_file(path: Path, parent: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        entry = f.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        if parent is not None:
            entry.create_group("nxscans").create_dataset("parent", data=parent)
    return path


def test_resolve_parameters_precedence(tmp_path, server_settings):
    exp = tmp_path / "exp"
    label_dir = exp / "TiSe2" / "xtal1"
    parent = _scan_file(label_dir / "TiSe2_parent.nxs")
    scan = _scan_file(label_dir / "TiSe2_300K.nxs", parent="TiSe2_parent.nxs")
    keys = ["threshold", "first_frame", "last_frame", "polar_max", "monitor", "norm"]

    assert nr.resolve_parameters(keys, scan_file=scan) == {
        "threshold": 50000,
        "first_frame": 10,
        "last_frame": 3640,
        "polar_max": None,  # every peak (issue 14; NXRefine's default is 10)
        "monitor": "MCS1",
        "norm": 50000,
    }
    st.update_settings(
        server_settings,
        {"nxreduce.threshold": 1, "nxreduce.first_frame": 1, "nxreduce.last_frame": 1},
        st.SECTIONS,
    )
    st.copy_to_experiment(exp, overrides={"nxreduce": {"threshold": 2, "first_frame": 2}})
    # experiment file now holds every key; it outranks the server file
    st.update_settings(server_settings, {"nxreduce.polar_max": 99})
    nr.write_parameters(parent, {"threshold": 3, "monitor": "MCS2"})
    nr.write_parameters(scan, {"threshold": 4})
    got = nr.resolve_parameters(keys, scan_file=scan, explicit={"norm": 5, "monitor": None})
    assert got == {
        "threshold": 4.0,  # scan file
        "first_frame": 2,  # experiment
        "last_frame": 1,  # server value copied into the experiment file
        "polar_max": 99.0,  # empty (every peak) in the experiment file: the server shows
        "monitor": "MCS2",  # parent (explicit None ignored)
        "norm": 5.0,  # explicit
    }
    # without the experiment file the server layer shows through
    (exp / "tasks" / "settings.ini").unlink()
    assert nr.resolve_parameters(["polar_max"], scan_file=scan) == {"polar_max": 99.0}


def test_resolve_parameters_errors(tmp_path):
    with pytest.raises(SettingsError, match="unknown reduction parameter 'nope'"):
        st.resolve_parameters(["nope"])
    with pytest.raises(SettingsError, match="threshold"):
        st.resolve_parameters(explicit={"threshold": "high"})
    scan = _scan_file(tmp_path / "exp" / "s" / "l" / "s_1.nxs", parent="s_missing.nxs")
    with pytest.raises(SettingsError, match="s_missing.nxs"):
        nr.resolve_parameters(scan_file=scan)


def test_write_parameters_nxparameters(tmp_path):
    scan = _scan_file(tmp_path / "s_1.nxs")
    nr.write_parameters(scan, {"threshold": "20000", "sample_transmission": "no", "qmin": 0.5})
    with h5py.File(scan) as f:
        group = f["entry/nxreduce"]
        assert group.attrs["NX_class"] == "NXparameters"
        assert group["threshold"][()] == 20000
    assert nr.read_parameters(scan) == {
        "threshold": 20000.0,
        "sample_transmission": False,
        "qmin": 0.5,
    }
    nr.write_parameters(scan, {"qmin": None})
    assert "qmin" not in nr.read_parameters(scan)
    with pytest.raises(SettingsError, match="unknown reduction parameter"):
        nr.write_parameters(scan, {"bogus": 1})
