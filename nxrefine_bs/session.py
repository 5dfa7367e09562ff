"""Set up a complete beamline session: RunEngine, devices, writer, reduction, Tiled.

Used by the IPython profile (``profiles/profile_sim``) and by ``nxrefine-bs demo``, so
both wire the callbacks the same way:

* :class:`~nxrefine_bs.callbacks.nexus_writer.NeXusScanWriter` (critical: its failures
  fail the run);
* :class:`~nxrefine_bs.callbacks.reduction.PostScanReduction` (non-critical, optional;
  it reduces a rotation once the writer has recorded it complete);
* Tiled archiving through :class:`~nxrefine_bs.tiled.archive.ResilientArchiver` into the
  experiment's embedded catalog (or the server named in settings), journaled locally
  so an outage loses nothing, optional;
* a frame progress bar, optional.

Every non-critical callback runs isolated on its own thread
(:class:`~nxrefine_bs.callbacks.isolation.NonCritical`): it can neither fail nor stall
a scan.  A new RunEngine is a :class:`~nxrefine_bs.callbacks.isolation.BeamlineRunEngine`,
which isolates whatever the user subscribes later, too.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bluesky import RunEngine

from .callbacks.isolation import BeamlineRunEngine, NonCritical
from .callbacks.nexus_writer import NeXusScanWriter
from .callbacks.progress import FrameProgress
from .callbacks.reduction import DEFAULT_STEPS, PostScanReduction
from .devices import make_sim_beamline
from .geometry import Geometry
from .simulation.crystal import SimCrystal
from .simulation.frames import DetectorModel
from .tiled.archive import ResilientArchiver, journal_directory
from .tiled.catalog import close_catalog, open_catalog

logger = logging.getLogger(__name__)

__all__ = [
    "BeamlineSession",
    "start_session",
    "env_flag",
    "session_options_from_env",
    "console_logging",
]


@dataclass
class BeamlineSession:
    """Everything a simulated-beamline session holds."""

    experiment_dir: Path
    RE: RunEngine
    devices: Any
    writer: NeXusScanWriter
    reduction: PostScanReduction | None = None
    tiled: Any | None = None
    progress: FrameProgress | None = None
    tokens: list[int] = field(default_factory=list)
    closed: bool = False

    def close(self) -> None:
        """Wait for queued reduction, unsubscribe callbacks and close the catalog (once)."""
        if self.closed:
            return
        self.closed = True
        self.writer.flush(600)
        for token in self.tokens:
            self.RE.unsubscribe(token)
        self.tokens.clear()
        if self.reduction is not None:
            self.reduction.close()
        if self.progress is not None:
            self.progress.close()
        if self.tiled is not None:
            close_catalog(self.tiled)
            self.tiled = None


def start_session(
    experiment_dir: str | Path,
    *,
    detector: str | DetectorModel = "small",
    geometry: Geometry | None = None,
    crystal: SimCrystal | None = None,
    seed: int = 0,
    reduce_steps: Sequence[str] = DEFAULT_STEPS,
    reduce_params: dict[str, Any] | None = None,
    tiled: bool | str = True,
    progress: bool = True,
    simulator_kwargs: dict[str, Any] | None = None,
    compression: str | None = None,
    RE: RunEngine | None = None,
    devices: Any | None = None,
    close_at_exit: bool = False,
) -> BeamlineSession:
    """Create a RunEngine with the simulated beamline and every nxrefine-bs callback.

    Parameters
    ----------
    experiment_dir : path-like
        An existing experiment directory (``nxrefine-bs experiment new``).
    detector, geometry, crystal, seed
        Passed to :func:`nxrefine_bs.devices.make_sim_beamline`.
    reduce_steps : sequence of str
        Post-scan reduction steps (empty: no post-scan reduction).
    reduce_params : dict, optional
        Explicit parameters for the post-scan steps.
    tiled : bool or str
        True: archive runs in the experiment's embedded Tiled catalog; a string: a
        Tiled URI; False: no archive.
    progress : bool
        Show a frame progress bar.
    simulator_kwargs : dict, optional
        Extra :class:`~nxrefine_bs.simulation.frames.RotationSimulator` options
        (``thermal``: the crystal's temperature dependence; the temperature itself comes
        from the temperature controller).
    compression : str, optional
        h5py compression of the detector files.
    RE : RunEngine, optional
        Use an existing RunEngine (e.g. the one an IPython profile made).
    devices : RotationBeamline, optional
        The beamline's devices (e.g. :func:`nxrefine_bs.devices.epics.make_epics_beamline`,
        connected by the caller); default: a new simulated beamline from ``detector``,
        ``geometry``, ``crystal``, ``seed``.
    close_at_exit : bool
        Close the session when the interpreter exits (IPython profiles), *before* Python
        waits for non-daemon threads such as the embedded catalog's: a plain
        :mod:`atexit` handler would only run after that wait, which never ends.
        Exit handlers registered later run earlier.
    """
    experiment_dir = Path(experiment_dir).absolute()
    RE = RE if RE is not None else BeamlineRunEngine({})

    def subscribe(callback: Any, critical: bool = False) -> None:
        if isinstance(RE, BeamlineRunEngine):
            session.tokens.append(RE.subscribe(callback, critical=critical))
        else:
            session.tokens.append(RE.subscribe(callback if critical else NonCritical(callback)))

    writer = NeXusScanWriter()
    session = BeamlineSession(experiment_dir, RE, None, writer)
    if tiled:
        target = tiled if isinstance(tiled, str) else experiment_dir
        try:
            session.tiled = open_catalog(target)
        except Exception as exc:  # an outage must not stop the beamline: journal only
            logger.warning("Tiled catalog %s unavailable (%s); runs are journaled", target, exc)

        def connect() -> Any:
            return session.tiled if session.tiled is not None else open_catalog(target)

        subscribe(ResilientArchiver(connect, journal_directory(experiment_dir)))
    if progress:
        session.progress = FrameProgress()
        subscribe(session.progress)
    if reduce_steps:
        session.reduction = PostScanReduction(reduce_steps, params=reduce_params, writer=writer)
        # never raises and only starts a thread at a stop document: not wrapped, so
        # session.reduction.wait() sees every rotation at once
        subscribe(session.reduction, critical=True)
    subscribe(writer, critical=True)  # last: its failure cannot starve the others
    session.devices = devices if devices is not None else make_sim_beamline(
        experiment_dir,
        detector=detector,
        geometry=geometry,
        crystal=crystal,
        seed=seed,
        simulator_kwargs=simulator_kwargs,
        compression=compression,
    )
    if close_at_exit:
        getattr(threading, "_register_atexit", atexit.register)(session.close)
    logger.info("beamline session ready in %s", experiment_dir)
    return session


def env_flag(value: str | None, default: bool) -> bool:
    """True/False from an environment value (``1``, ``yes``, ``true``, ``on`` are true).

    >>> env_flag("Yes", False), env_flag("0", True), env_flag("", True), env_flag(None, False)
    (True, False, True, False)
    """
    if value is None or not value.strip():
        return default
    return value.strip().lower() in ("1", "yes", "true", "on")


def session_options_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """:func:`start_session` options from the profiles' environment variables.

    ``NXREFINE_BS_REDUCE``: comma- or space-separated post-scan steps (unset, empty or
    ``none``: none); ``NXREFINE_BS_TILED``: ``1`` (default, the embedded catalog), ``0``
    or a ``http(s)://`` server; ``NXREFINE_BS_PROGRESS``: ``1`` (default) or ``0``.

    >>> opts = session_options_from_env(
    ...     {"NXREFINE_BS_REDUCE": "max, find", "NXREFINE_BS_TILED": "http://h:8000"}
    ... )
    >>> opts["reduce_steps"], opts["tiled"], opts["progress"]
    (('max', 'find'), 'http://h:8000', True)
    >>> session_options_from_env({"NXREFINE_BS_REDUCE": "none", "NXREFINE_BS_TILED": "0"})
    {'reduce_steps': (), 'tiled': False, 'progress': True}
    """
    env = os.environ if environ is None else environ
    steps = env.get("NXREFINE_BS_REDUCE", "").replace(",", " ").split()
    tiled_value = env.get("NXREFINE_BS_TILED")
    tiled: bool | str
    if tiled_value and tiled_value.strip().startswith(("http://", "https://")):
        tiled = tiled_value.strip()
    else:
        tiled = env_flag(tiled_value, True)
    return {
        "reduce_steps": () if steps in ([], ["none"]) else tuple(steps),
        "tiled": tiled,
        "progress": env_flag(env.get("NXREFINE_BS_PROGRESS"), True),
    }


def console_logging(level_name: str | None) -> None:
    """Send ``nxrefine_bs`` log records of ``level_name`` and above to stderr.

    None or empty leaves logging alone (warnings only).  The records do not propagate
    to the root logger, whose IPython handler would print them again.

    Raises
    ------
    ValueError
        For a name that is not a :mod:`logging` level.
    """
    if not level_name:
        return
    level = logging.getLevelName(level_name.strip().upper())
    if not isinstance(level, int):
        raise ValueError(f"NXREFINE_BS_LOG={level_name!r} is not a logging level (INFO, DEBUG...)")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log = logging.getLogger("nxrefine_bs")
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
