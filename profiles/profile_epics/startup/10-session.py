"""nxrefine-bs EPICS beamline profile, part 2: RunEngine, EPICS devices and callbacks.

The ophyd-async EPICS devices (:func:`nxrefine_bs.devices.epics.make_epics_beamline`,
prefixes from ``[instrument]``) are connected on the RunEngine's event loop - a
missing IOC stops the profile with a :class:`~nxrefine_bs.errors.DeviceConnectionError`
naming the PVs - and handed to :func:`nxrefine_bs.session.start_session`, which
subscribes the same NeXus writer, post-scan reduction and Tiled archive as
``profile_sim``.

Environment variables read here
-------------------------------
NXREFINE_BS_REDUCE, NXREFINE_BS_TILED, NXREFINE_BS_PROGRESS
    As in ``profile_sim``.
NXREFINE_BS_CONNECT_TIMEOUT
    Seconds to wait for the PVs (default 5).
NXREFINE_BS_DEVICE_API
    ``ophyd-async`` (default) or ``ophyd``: ophyd v1 devices (``EpicsMotor``, a stock v1
    areaDetector with an HDF5 plugin) through :mod:`nxrefine_bs.devices.epics_v1`.
"""

import atexit
import os
import threading

from bluesky.run_engine import call_in_bluesky_event_loop

from nxrefine_bs.callbacks.isolation import BeamlineRunEngine
from nxrefine_bs.devices.epics import connect_epics_beamline, make_epics_beamline
from nxrefine_bs.session import start_session


def _flag(value: str | None, default: bool) -> bool:
    """True/False from an environment value (``1``, ``yes``, ``true``, ``on`` are true)."""
    if value is None or not value.strip():
        return default
    return value.strip().lower() in ("1", "yes", "true", "on")


def _reduce_steps(value: str | None) -> tuple[str, ...]:
    """Post-scan reduction steps from ``NXREFINE_BS_REDUCE`` (empty or ``none``: none)."""
    text = (value or "").replace(",", " ").split()
    return () if text in ([], ["none"]) else tuple(text)


def _tiled_target(value: str | None) -> bool | str:
    """``start_session(tiled=...)`` from ``NXREFINE_BS_TILED`` (a flag or a server URL)."""
    if value and value.strip().startswith(("http://", "https://")):
        return value.strip()
    return _flag(value, True)


RE = BeamlineRunEngine({})
bl = make_epics_beamline(
    EXPERIMENT_DIR,  # noqa: F821  (00-base.py)
    prefix=PV_PREFIX,  # noqa: F821
    prefixes=PV_PREFIXES,  # noqa: F821
    geometry=GEOMETRY,  # noqa: F821
    detector_model=DETECTOR_MODEL,  # noqa: F821
    detector_class=DETECTOR_DRIVER,  # noqa: F821
    api=os.environ.get("NXREFINE_BS_DEVICE_API", "").strip() or "ophyd-async",
)
call_in_bluesky_event_loop(
    connect_epics_beamline(bl, timeout=float(os.environ.get("NXREFINE_BS_CONNECT_TIMEOUT", "5")))
)
session = start_session(
    EXPERIMENT_DIR,  # noqa: F821
    devices=bl,
    RE=RE,
    reduce_steps=_reduce_steps(os.environ.get("NXREFINE_BS_REDUCE")),
    tiled=_tiled_target(os.environ.get("NXREFINE_BS_TILED")),
    progress=_flag(os.environ.get("NXREFINE_BS_PROGRESS"), True),
)
# Close the session before Python waits for its worker threads (the embedded Tiled
# catalog's threads are not daemons: a plain atexit handler would run only after that
# wait, which never ends).
getattr(threading, "_register_atexit", atexit.register)(session.close)
writer = session.writer
reduction = session.reduction
tiled = session.tiled
goniometer, detector = bl.goniometer, bl.detector
