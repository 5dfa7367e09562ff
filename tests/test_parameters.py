"""One parameter model per step: API, registry, plans and CLI reject a misspelled name.

The checks run real steps on a small simulated scan (real HDF5 files, real RunEngine,
the real ``nxrefine-bs`` entry point in process), and compare the model with the step
functions' actual signatures so the two cannot drift apart.
"""

from __future__ import annotations

import inspect

import h5py
import pytest

from nxrefine_bs.cli import main
from nxrefine_bs.nexus.nxreduce import read_parameters
from nxrefine_bs.nexus.provenance import process_done
from nxrefine_bs.plans.reduction import find_peaks, reduce_scan
from nxrefine_bs.reduce import peaks
from nxrefine_bs.reduce.parameters import (
    CONTROL,
    STEP_PARAMETERS,
    ParameterError,
    parameter_names,
    resolve_frame_range,
    split_parameters,
    validate_parameters,
)
from nxrefine_bs.reduce.steps import STEPS, run_step, step_parameters
from nxrefine_bs.simulation.scan import make_simulated_scan


@pytest.fixture
def scan(tmp_path):
    return make_simulated_scan(tmp_path / "exp", n_frames=30)


def _found(scan_file) -> bool:
    with h5py.File(scan_file, "r") as f:
        return process_done(f["f1"], "nxfind")


@pytest.mark.parametrize("name", list(STEPS))
def test_model_matches_step_signature(name):
    """Every step function takes exactly the model's parameters (plus overwrite/progress)."""
    sig = inspect.signature(STEPS[name].load())
    kinds = {p.kind for p in sig.parameters.values()}
    assert inspect.Parameter.VAR_KEYWORD not in kinds, f"{name} still swallows **kwargs"
    keywords = [p for p, v in sig.parameters.items() if v.kind is inspect.Parameter.KEYWORD_ONLY]
    assert sorted(keywords) == sorted((*parameter_names(name), *CONTROL))


def test_api_typo_is_a_type_error(scan):
    with pytest.raises(TypeError, match="threshhold"):
        peaks.run(scan.scan_file, "f1", threshhold=1e9)
    assert not _found(scan.scan_file)


def test_registry_typo_names_the_valid_parameters(scan):
    with pytest.raises(ParameterError) as info:
        run_step("find", scan.scan_file, "f1", threshhold=1e9)
    message = str(info.value)
    assert "'threshhold'" in message and "threshold" in message.split("valid:")[1]
    assert not _found(scan.scan_file)
    with pytest.raises(ParameterError, match="expected float"):
        step_parameters("find", scan.scan_file, {"threshold": "lots"})


def test_plan_typo_fails_before_any_work(scan, RE):
    with pytest.raises(ParameterError, match="threshhold"):
        RE(find_peaks(scan.scan_file, threshhold=1e9))
    with pytest.raises(ParameterError, match="threshhold"):
        RE(reduce_scan(scan.scan_file, ["max", "find"], threshhold=1e9))
    with h5py.File(scan.scan_file, "r") as f:
        assert not process_done(f["f1"], "nxmax") and not process_done(f["f1"], "nxfind")
    # a parameter of another step than the ones run is also refused
    with pytest.raises(ParameterError, match="t1"):
        RE(reduce_scan(scan.scan_file, ["find"], t1=3.0))


def test_plan_passes_each_step_its_own_parameters(scan, RE):
    RE(reduce_scan(scan.scan_file, ["max", "find"], first=2, last=28, threshold=40.0))
    with h5py.File(scan.scan_file, "r") as f:
        assert (f["f1/data"].attrs["first"], f["f1/data"].attrs["last"]) == (2, 28)
        peaks_group = f["f1/peaks"]
        assert peaks_group.attrs["threshold"] == 40.0 and peaks_group.attrs["last"] == 28
    # the parameters used are recorded where NXRefine reads them
    stored = read_parameters(scan.scan_file)
    assert stored["threshold"] == 40.0
    assert (stored["first_frame"], stored["last_frame"]) == (2, 28)


def test_cli_typo_is_one_line_error(scan, capsys):
    code = main(["reduce", str(scan.scan_file), "-s", "find", "--set", "threshhold=1e9"])
    err = capsys.readouterr().err
    assert code != 0 and "threshhold" in err and "valid:" in err and "threshold" in err
    assert "Traceback" not in err
    assert not _found(scan.scan_file)
    code = main(["find", str(scan.scan_file), "--threshhold", "5"])  # argparse refuses it
    assert code != 0 and "threshhold" in capsys.readouterr().err
    assert not _found(scan.scan_file)
    code = main(["workflow", "queue", str(scan.scan_file), "-s", "find", "-p", "treshold=5"])
    err = capsys.readouterr().err
    assert code != 0 and "treshold" in err and "Traceback" not in err


def test_cli_step_options_come_from_the_model(scan, capsys):
    for name, params in STEP_PARAMETERS.items():
        main([name, "--help"])
        text = capsys.readouterr().out
        for p in params:
            if p.cli:
                assert p.option in text, (name, p.option)
        if name == "refine":  # NXRefine's spellings work too
            assert "--polar_max" in text and "--hkl_tolerance" in text
    code = main(["find", str(scan.scan_file), "-t", "40", "-f", "2", "-l", "28", "--no-progress"])
    assert code == 0
    stored = read_parameters(scan.scan_file)
    assert stored["threshold"] == 40.0 and stored["last_frame"] == 28


def test_split_and_validate():
    assert validate_parameters("transform", {"qh": "-2,0.5,2", "mask": "yes"}) == {
        "qh": (-2.0, 0.5, 2.0),
        "mask": True,
    }
    out = split_parameters(["max", "find"], {"first": "3", "find": {"threshold": 7}})
    assert out == {"max": {"first": 3}, "find": {"first": 3, "threshold": 7.0}}
    with pytest.raises(ParameterError, match="not run"):
        split_parameters(["max"], {"find": {"threshold": 7}})
    with pytest.raises(ParameterError, match="MIN,STEP,MAX"):
        validate_parameters("transform", {"qh": "1,2"})


def test_one_frame_range_convention():
    # frames first <= z < last; NXRefine's default last is nframes - 10
    assert resolve_frame_range(10, 3640, 3650) == (10, 3640)
    assert resolve_frame_range(10, None, 3650) == (10, 3640)
    assert resolve_frame_range(0, 20, 30) == (0, 20)
    assert resolve_frame_range(-5, None, 30) == (25, 25)
