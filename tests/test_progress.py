"""The frame progress bar on real runs: one finished line per rotation, nothing before."""

from __future__ import annotations

import io

from nxrefine_bs.callbacks.progress import FrameProgress
from nxrefine_bs.devices import make_sim_beamline
from nxrefine_bs.plans.rotation import multi_rotation_scan


def _beamline(exp_dir):
    return make_sim_beamline(
        exp_dir, detector="small", shape=(48, 64), frame_time=0.005, seed=7,
        temperature_time_constant=0.01,
    )  # fmt: skip


def _scan(bl, exp_dir):
    return multi_rotation_scan(
        bl, experiment_dir=exp_dir, sample="TiSe2", label="xtal1", scan="300K",
        rotations=[{"omega": 0.0}, {"omega": 20.0}], phi_start=0.0, phi_end=10.0,
        phi_step=0.5, temperature=300.0,
    )  # fmt: skip


def _lines(text: str) -> list[str]:
    """The last state of every terminal line (carriage returns redraw a line)."""
    return [line.rsplit("\r", 1)[-1] for line in text.split("\n")]


def test_one_closed_bar_per_rotation(RE, experiment):
    out = io.StringIO()
    progress = FrameProgress(file=out)
    assert out.getvalue() == ""  # nothing drawn before a run starts
    RE.subscribe(progress)
    bl = _beamline(experiment.directory)
    RE(_scan(bl, experiment.directory))
    text = out.getvalue()
    first = next(state for state in text.split("\r") if state)
    assert first.startswith("TiSe2 300K f1:   0%") and "0/20" in first  # never "0frame"
    lines = _lines(text)
    assert lines[-1] == ""  # the last bar ended its line
    finished = [line for line in lines if line]
    assert len(finished) == 2
    assert finished[0].startswith("TiSe2 300K f1: 100%") and "20/20" in finished[0]
    assert finished[1].startswith("TiSe2 300K f2: 100%") and "20/20" in finished[1]
    progress.close()  # idempotent
    assert out.getvalue() == text


def test_fixed_total_counts_every_run(RE, experiment):
    out = io.StringIO()
    progress = FrameProgress(total=40, file=out)
    RE.subscribe(progress)
    bl = _beamline(experiment.directory)
    RE(_scan(bl, experiment.directory))
    finished = [line for line in _lines(out.getvalue()) if line]
    assert len(finished) == 1 and "40/40" in finished[0]
    assert out.getvalue().endswith("\n") and progress.bar is None
