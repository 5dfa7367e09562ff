"""nxrefine-bs simulated beamline profile, part 2: RunEngine, devices and callbacks.

:func:`nxrefine_bs.session.start_session` builds the RunEngine ``RE``, the simulated
beamline ``bl`` and subscribes the NeXus scan-file ``writer``, the optional post-scan
``reduction``, the embedded Tiled catalog (client ``tiled``) and a frame progress bar.
Everything is closed (queued reductions waited for) when IPython exits.

Environment variables read here
-------------------------------
NXREFINE_BS_REDUCE
    Comma-separated post-scan reduction steps (``max,find``, ``max,find,refine``...);
    unset, empty or ``none``: no post-scan reduction.
NXREFINE_BS_TILED
    ``1`` (default): archive runs in the experiment's embedded catalog; ``0``: none;
    ``http://...``: that Tiled server.
NXREFINE_BS_PROGRESS
    ``1`` (default) shows a frame progress bar, ``0`` hides it.
NXREFINE_BS_THERMAL
    ``1`` (default): the simulated crystal changes with the temperature controller's
    value (:data:`nxrefine_bs.demo.DEMO_THERMAL`: Debye-Waller, TDS, CDW below 200 K);
    ``0``: the temperature is recorded only.
NXREFINE_BS_KEEP
    ``1`` keeps the temporary experiment at exit; by default it is removed (an
    experiment named by ``NXREFINE_BS_EXPERIMENT`` is always kept).
"""

import atexit
import os
import shutil
import tempfile
import threading
from pathlib import Path

from nxrefine_bs.demo import DEMO_THERMAL
from nxrefine_bs.session import env_flag, session_options_from_env, start_session


def _remove_temporary_experiment(experiment_dir: Path) -> None:
    """Delete the temporary ``nxrefine-bs-sim-*`` directory this profile made.

    Parameters
    ----------
    experiment_dir : Path
        ``<tmp>/nxrefine-bs-sim-XXXX/demo/nxrefine``; only a directory of that form is
        removed.
    """
    home = experiment_dir.parents[1]
    if home.name.startswith("nxrefine-bs-sim-") and home.parent == Path(tempfile.gettempdir()):
        shutil.rmtree(home, ignore_errors=True)


THERMAL = DEMO_THERMAL if env_flag(os.environ.get("NXREFINE_BS_THERMAL"), True) else None
KEEP_EXPERIMENT = not EXPERIMENT_IS_TEMPORARY or env_flag(  # noqa: F821  (00-base.py)
    os.environ.get("NXREFINE_BS_KEEP"), False
)
# Exit handlers registered later run earlier: the session (registered by start_session)
# is closed first, then the temporary experiment removed.  threading's exit hook runs
# before Python waits for the session's worker threads (see start_session).
if not KEEP_EXPERIMENT:
    getattr(threading, "_register_atexit", atexit.register)(
        _remove_temporary_experiment,
        EXPERIMENT_DIR,  # noqa: F821
    )
session = start_session(
    EXPERIMENT_DIR,  # noqa: F821  (00-base.py)
    detector=DETECTOR_MODEL,  # noqa: F821
    geometry=GEOMETRY,  # noqa: F821
    simulator_kwargs={"thermal": THERMAL},
    close_at_exit=True,
    **session_options_from_env(),
)

RE = session.RE
bl = session.devices
writer = session.writer
reduction = session.reduction
tiled = session.tiled
goniometer, detector = bl.goniometer, bl.detector
