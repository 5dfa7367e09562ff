"""Shared fixtures: isolated settings, an experiment, a small configuration.

Every test runs with ``NXREFINE_BS_SETTINGS`` pointing into its own temporary
directory, so the real ``~/.config/nxrefine-bs`` is never read or written.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nxrefine_bs.experiment import Experiment
from nxrefine_bs.settings import ENV_VAR, init_server_settings
from nxrefine_bs.testing import closing_run_engine

SMALL_DETECTOR = "Pilatus 100k"
"""A small pyFAI detector (195 x 487 pixels) for fast tests."""


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path_factory: pytest.TempPathFactory, monkeypatch) -> Path:
    """Point ``NXREFINE_BS_SETTINGS`` at a fresh, empty directory (no file yet)."""
    directory = tmp_path_factory.mktemp("server-settings")
    monkeypatch.setenv(ENV_VAR, str(directory))
    return directory / "settings.ini"


@pytest.fixture
def server_settings(_isolated_settings: Path) -> Path:
    """A server settings file with the defaults; ``NXREFINE_BS_SETTINGS`` points at it."""
    return init_server_settings(_isolated_settings)


@pytest.fixture
def experiment(tmp_path: Path, server_settings: Path) -> Experiment:
    """A new experiment ``<tmp>/analysis/exp/nxrefine`` on the ``sim`` beamline."""
    return Experiment.create(tmp_path / "analysis", "exp", beamline="sim")


@pytest.fixture
def configuration(experiment: Experiment) -> Path:
    """``configurations/small.nxs``: a Pilatus 100k with two positions (omega 0 and 15)."""
    from nxrefine_bs.nexus.template import Position, create_configuration

    return create_configuration(
        experiment.configuration_file("small"),
        detector=SMALL_DETECTOR,
        positions=[Position(), Position(omega=15.0)],
    )


@pytest.fixture
def RE():
    """A RunEngine on its own event loop, halted and closed afterwards."""
    with closing_run_engine() as engine:
        yield engine
