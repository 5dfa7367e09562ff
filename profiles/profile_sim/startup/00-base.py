"""nxrefine-bs simulated beamline profile, part 1: logging and the experiment.

Startup files of this IPython profile run in lexical order in the user namespace::

    ipython --profile-dir=profiles/profile_sim

Environment variables read here
-------------------------------
NXREFINE_BS_EXPERIMENT
    An existing experiment directory (``nxrefine-bs experiment new``).  Unset: a
    demonstration experiment is created in a new temporary directory.
NXREFINE_BS_DETECTOR
    ``small`` (a synthetic 195 x 235 detector) or a pyFAI detector name; default
    ``Pilatus 100k`` (195 x 487 pixels, quick to simulate).
NXREFINE_BS_CONFIGURATION
    Configuration template: a name in ``<experiment>/configurations`` or a path.  Unset:
    ``configurations/sim-<detector>.nxs``, created from the simulated detector if
    missing (none for the synthetic ``small`` detector).
NXREFINE_BS_LOG
    Log level of the ``nxrefine_bs`` loggers on the console (``INFO``, ``DEBUG``...);
    unset: warnings only.

Defines ``EXPERIMENT`` (an :class:`~nxrefine_bs.experiment.Experiment`),
``EXPERIMENT_DIR``, ``DETECTOR``, ``DETECTOR_MODEL``, ``GEOMETRY`` and ``CONFIGURATION``.
"""

import logging
import os
import tempfile
import time
from pathlib import Path

_PROFILE_T0 = time.perf_counter()
# pyFAI's optional OpenCL back end is not needed by the simulated beamline: no warning
logging.getLogger("silx.opencl.common").setLevel(logging.ERROR)

from nxrefine_bs.devices import default_geometry, detector_model  # noqa: E402
from nxrefine_bs.experiment import Experiment  # noqa: E402
from nxrefine_bs.nexus.template import Position, create_configuration  # noqa: E402
from nxrefine_bs.session import console_logging  # noqa: E402


def _open_experiment(directory: str | None):
    """The experiment named by ``NXREFINE_BS_EXPERIMENT``, or a new temporary demo one.

    Parameters
    ----------
    directory : str or None
        Existing experiment directory, or None/empty for a temporary demo experiment.

    Returns
    -------
    tuple of (Experiment, bool)
        The experiment and whether it was created here (temporary).

    Raises
    ------
    ExperimentError
        If ``directory`` is not an experiment directory.
    """
    if directory:
        return Experiment.open(Path(directory).expanduser()), False
    home = Path(tempfile.mkdtemp(prefix="nxrefine-bs-sim-"))
    return Experiment.create(home, "demo", beamline="sim"), True


def _configuration(experiment, detector: str, geometry, name: str | None) -> Path | None:
    """The configuration template of the session's scans.

    Parameters
    ----------
    experiment : Experiment
        The session's experiment.
    detector : str
        ``small`` or a pyFAI detector name.
    geometry : Geometry
        The simulated detector's geometry (written into a new template).
    name : str or None
        ``NXREFINE_BS_CONFIGURATION``: a configuration name or path.

    Returns
    -------
    Path or None
        The template, or None for the synthetic detector (scan files are then made
        without a template).
    """
    if name:
        path = Path(name).expanduser()
        if path.suffix != ".nxs" and not path.is_file():
            path = experiment.configuration_file(name)
        if not path.is_file():
            raise FileNotFoundError(f"NXREFINE_BS_CONFIGURATION: {path} does not exist")
        return path.absolute()
    if detector == "small":
        return None
    slug = "".join(c if c.isalnum() else "_" for c in detector.lower())
    path = experiment.configuration_file(f"sim-{slug}")
    if not path.exists():
        create_configuration(
            path,
            detector=detector,
            wavelength=geometry.wavelength,
            distance=geometry.distance,
            phi_start=geometry.phi_start,
            phi_step=geometry.phi_step,
            phi_end=geometry.phi_start + 100 * geometry.phi_step,
            beam_center_x=geometry.beam_center_x,
            beam_center_y=geometry.beam_center_y,
            positions=[Position(chi=geometry.chi, omega=geometry.omega, theta=geometry.theta)],
            instrument_name="simulated",
            facility="nxrefine-bs",
        )
    return path


console_logging(os.environ.get("NXREFINE_BS_LOG"))

EXPERIMENT, EXPERIMENT_IS_TEMPORARY = _open_experiment(os.environ.get("NXREFINE_BS_EXPERIMENT"))
EXPERIMENT_DIR = EXPERIMENT.directory
DETECTOR = os.environ.get("NXREFINE_BS_DETECTOR", "").strip() or "Pilatus 100k"
DETECTOR_MODEL = detector_model(DETECTOR)
GEOMETRY = default_geometry(DETECTOR_MODEL)
CONFIGURATION = _configuration(
    EXPERIMENT, DETECTOR, GEOMETRY, os.environ.get("NXREFINE_BS_CONFIGURATION")
)
