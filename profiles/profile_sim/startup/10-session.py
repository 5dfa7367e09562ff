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
from nxrefine_bs.session import start_session


def _reduce_steps(value: str | None) -> tuple[str, ...]:
    """Post-scan reduction steps from ``NXREFINE_BS_REDUCE``.

    Parameters
    ----------
    value : str or None
        Comma- or space-separated step names; None, empty or ``none`` for no steps.

    Returns
    -------
    tuple of str
        Step names (validated by :class:`~nxrefine_bs.callbacks.reduction.PostScanReduction`).
    """
    text = (value or "").replace(",", " ").split()
    return () if text in ([], ["none"]) else tuple(text)


def _flag(value: str | None, default: bool) -> bool:
    """True/False from an environment value (``1``, ``yes``, ``true``, ``on`` are true).

    Parameters
    ----------
    value : str or None
        The variable's value; None or empty gives ``default``.
    default : bool
        Value when unset.
    """
    if value is None or not value.strip():
        return default
    return value.strip().lower() in ("1", "yes", "true", "on")


def _tiled_target(value: str | None) -> bool | str:
    """``start_session(tiled=...)`` from ``NXREFINE_BS_TILED`` (a flag or a server URL).

    Parameters
    ----------
    value : str or None
        ``1``/``0`` or an ``http(s)://`` URL; None: embedded catalog.
    """
    if value and value.strip().startswith(("http://", "https://")):
        return value.strip()
    return _flag(value, True)


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


THERMAL = DEMO_THERMAL if _flag(os.environ.get("NXREFINE_BS_THERMAL"), True) else None
session = start_session(
    EXPERIMENT_DIR,  # noqa: F821  (00-base.py)
    detector=DETECTOR_MODEL,  # noqa: F821
    geometry=GEOMETRY,  # noqa: F821
    reduce_steps=_reduce_steps(os.environ.get("NXREFINE_BS_REDUCE")),
    tiled=_tiled_target(os.environ.get("NXREFINE_BS_TILED")),
    progress=_flag(os.environ.get("NXREFINE_BS_PROGRESS"), True),
    simulator_kwargs={"thermal": THERMAL},
)
KEEP_EXPERIMENT = not EXPERIMENT_IS_TEMPORARY or _flag(  # noqa: F821  (00-base.py)
    os.environ.get("NXREFINE_BS_KEEP"), False
)
# Close the session before Python waits for the session's worker threads (a plain
# atexit handler would run only after that wait, which never ends); last-registered
# runs first: close, then remove the temporary experiment.
_at_exit = getattr(threading, "_register_atexit", atexit.register)
if not KEEP_EXPERIMENT:
    _at_exit(_remove_temporary_experiment, EXPERIMENT_DIR)  # noqa: F821
_at_exit(session.close)

RE = session.RE
bl = session.devices
writer = session.writer
reduction = session.reduction
tiled = session.tiled
goniometer, detector = bl.goniometer, bl.detector
