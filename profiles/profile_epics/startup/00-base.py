"""nxrefine-bs EPICS beamline profile, part 1: logging, the experiment, PV prefixes.

Startup files of this IPython profile run in lexical order in the user namespace::

    NXREFINE_BS_EXPERIMENT=/data/exp/nxrefine ipython --profile-dir=profiles/profile_epics

Environment variables read here
-------------------------------
NXREFINE_BS_EXPERIMENT
    An existing experiment directory (``nxrefine-bs experiment new``); its
    ``tasks/settings.ini`` ``[instrument]`` section names the PV prefixes
    (``pv_prefix``, ``pv_phi``...).  Unset: a temporary demo experiment (the
    simulated IOC's ``SIM:`` prefixes).
NXREFINE_BS_DETECTOR, NXREFINE_BS_DETECTOR_SHAPE
    ``small`` (synthetic, shape ``NY,NX``, default ``48,64`` as ``nxrefine-bs ioc``) or a
    pyFAI detector name: the detector model of the start documents.
NXREFINE_BS_CONFIGURATION
    Configuration template (name in ``configurations/`` or a path): its ``f1`` geometry is
    the instrument geometry; unset: the detector model's default geometry.
NXREFINE_BS_LOG
    Log level of the ``nxrefine_bs`` loggers (``INFO``, ``DEBUG``...).

Defines ``EXPERIMENT``, ``EXPERIMENT_DIR``, ``DETECTOR_MODEL``, ``GEOMETRY``,
``CONFIGURATION``, ``INSTRUMENT`` (the ``[instrument]`` settings) and ``PV_PREFIX``,
``PV_PREFIXES``, ``DETECTOR_DRIVER``.
"""

import logging
import os
import tempfile
import time
from pathlib import Path

_PROFILE_T0 = time.perf_counter()
logging.getLogger("silx.opencl.common").setLevel(logging.ERROR)

import h5py  # noqa: E402

from nxrefine_bs.devices import default_geometry, detector_model  # noqa: E402
from nxrefine_bs.devices.epics import instrument_prefixes  # noqa: E402
from nxrefine_bs.experiment import Experiment  # noqa: E402
from nxrefine_bs.nexus.geometry_io import read_geometry  # noqa: E402
from nxrefine_bs.session import console_logging  # noqa: E402
from nxrefine_bs.settings import load_experiment_settings  # noqa: E402


def _shape(text: str) -> tuple[int, int]:
    """``"48,64"`` -> ``(48, 64)``."""
    try:
        ny, nx = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"NXREFINE_BS_DETECTOR_SHAPE must be NY,NX, got {text!r}") from None
    return ny, nx


def _configuration(experiment, name: str | None) -> Path | None:
    """The configuration template named by ``NXREFINE_BS_CONFIGURATION`` (or None)."""
    if not name:
        return None
    path = Path(name).expanduser()
    if path.suffix != ".nxs" and not path.is_file():
        path = experiment.configuration_file(name)
    if not path.is_file():
        raise FileNotFoundError(f"NXREFINE_BS_CONFIGURATION: {path} does not exist")
    return path.absolute()


console_logging(os.environ.get("NXREFINE_BS_LOG"))
_exp = os.environ.get("NXREFINE_BS_EXPERIMENT")
EXPERIMENT_IS_TEMPORARY = not _exp
EXPERIMENT = (
    Experiment.open(Path(_exp).expanduser())
    if _exp
    else Experiment.create(
        Path(tempfile.mkdtemp(prefix="nxrefine-bs-epics-")), "demo", beamline="sim"
    )
)
EXPERIMENT_DIR = EXPERIMENT.directory
INSTRUMENT = load_experiment_settings(EXPERIMENT_DIR)["instrument"]
PV_PREFIX, PV_PREFIXES, DETECTOR_DRIVER = instrument_prefixes(INSTRUMENT)
DETECTOR = os.environ.get("NXREFINE_BS_DETECTOR", "").strip() or "small"
DETECTOR_MODEL = detector_model(
    DETECTOR, _shape(os.environ.get("NXREFINE_BS_DETECTOR_SHAPE", "48,64"))
)
CONFIGURATION = _configuration(EXPERIMENT, os.environ.get("NXREFINE_BS_CONFIGURATION"))
if CONFIGURATION is not None:
    with h5py.File(CONFIGURATION, "r") as _f:
        GEOMETRY = read_geometry(_f["f1"])
else:
    GEOMETRY = default_geometry(DETECTOR_MODEL)
