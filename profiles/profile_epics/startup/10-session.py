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

import os

from bluesky.run_engine import call_in_bluesky_event_loop

from nxrefine_bs.callbacks.isolation import BeamlineRunEngine
from nxrefine_bs.devices.epics import connect_epics_beamline, make_epics_beamline
from nxrefine_bs.session import session_options_from_env, start_session

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
    close_at_exit=True,
    **session_options_from_env(),
)
writer = session.writer
reduction = session.reduction
tiled = session.tiled
goniometer, detector = bl.goniometer, bl.detector
