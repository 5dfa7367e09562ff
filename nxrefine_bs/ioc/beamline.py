"""The simulated beamline IOC: goniometer motors, temperature controller, monitors, detector.

PVs (``<P>`` is the prefix, e.g. ``SIM:``):

=========================  ===================================================
``<P>phi``, ``<P>chi``,    motor records (``.VAL .RBV .DMOV .VELO .ACCL .EGU .STOP
``<P>omega``               .MRES .VMAX .LLM .HLM ...``), moving at finite speed
``<P>TC:SP``, ``TC:T``     temperature set point and readback (first-order lag,
``TC:TAU``, ``TC:TOL``     time constant ``TAU`` s, "at set point" within ``TOL``)
``<P>MCS1:Counts``...      beam monitors, updated per detector frame
``<P>DET:cam1:...``        areaDetector driver (see :mod:`.areadetector`)
``<P>DET:HDF1:...``        NDFileHDF5 plugin
=========================  ===================================================

Run it with ``nxrefine-bs ioc --prefix SIM:`` (Channel Access on the interfaces of
``EPICS_CAS_INTF_ADDR_LIST``, default 127.0.0.1, port ``EPICS_CA_SERVER_PORT``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from caproto.asyncio.server import Context

from ..devices.beamline import default_crystal, default_geometry, detector_model
from ..errors import NXRefineBSError
from .areadetector import AreaDetectorSim, RotationContext
from .motor import MotorRecord
from .pvs import PV, PVDict

logger = logging.getLogger(__name__)

__all__ = ["BeamlineIOC", "IOCConfig", "run_ioc"]

PREFIX_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789:_-.")


@dataclass(frozen=True)
class IOCConfig:
    """What the IOC simulates.

    Attributes
    ----------
    prefix : str
        PV prefix (``SIM:``).
    detector : str
        ``"small"`` (synthetic, ``shape``) or a pyFAI detector name.
    shape : tuple of int
        Shape of the ``"small"`` detector.
    seed : int
        Crystal orientation and noise seed (the same as ``make_sim_beamline(seed=...)``).
    temperature : float
        Initial temperature (K).
    temperature_time_constant : float
        First-order lag of the readback (s).
    monitors : tuple of str
        Monitor channel names.
    """

    prefix: str = "SIM:"
    detector: str = "small"
    shape: tuple[int, int] = (48, 64)
    seed: int = 0
    temperature: float = 300.0
    temperature_time_constant: float = 0.5
    monitors: tuple[str, ...] = ("MCS1", "MCS2")


class TemperatureSim:
    """Set point, readback with a first-order lag, tolerance and units."""

    def __init__(self, pvs: PVDict, initial: float, time_constant: float) -> None:
        self.sp = pvs.double("SP", initial, units="K", precision=3)
        self.readback = pvs.double("T", initial, units="K", precision=3)
        self.tau = pvs.double("TAU", time_constant, units="s")
        self.tolerance = pvs.double("TOL", 0.5, units="K")
        self.at_setpoint = pvs.boolean("ATSP", True)
        self.egu = pvs.string40("EGU", "K")

    async def run(self) -> None:
        """Relax the readback towards the set point forever."""
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.05)
            now = time.monotonic()
            tau = max(float(self.tau.value), 1e-6)
            t, sp = float(self.readback.value), float(self.sp.value)
            t = sp + (t - sp) * math.exp(-(now - last) / tau)
            if abs(t - sp) < 1e-6:
                t = sp
            last = now
            if t != self.readback.value:
                await self.readback.put(t)
            at = abs(t - sp) <= float(self.tolerance.value)
            if (self.at_setpoint.value == "Yes") != at:
                await self.at_setpoint.put("Yes" if at else "No")


class BeamlineIOC:
    """All PVs of the simulated beamline and the tasks that animate them.

    Parameters
    ----------
    config : IOCConfig
        What to simulate.
    """

    def __init__(self, config: IOCConfig = IOCConfig()) -> None:
        prefix = config.prefix
        if not prefix or set(prefix) - PREFIX_CHARS:
            raise NXRefineBSError(
                f"IOC prefix {prefix!r} is not a valid PV prefix; use letters, digits and :_-."
            )
        self.config = config
        pvs = PVDict(prefix)
        self.pvs = pvs
        model = detector_model(config.detector, config.shape)
        geometry = default_geometry(model)
        self.motors = {
            "phi": MotorRecord(pvs.sub("phi"), position=0.0, velocity=10.0, description="phi"),
            "chi": MotorRecord(pvs.sub("chi"), position=geometry.chi, velocity=30.0),
            "omega": MotorRecord(pvs.sub("omega"), position=geometry.omega, velocity=30.0),
        }
        self.temperature = TemperatureSim(
            pvs.sub("TC:"), config.temperature, config.temperature_time_constant
        )
        self.monitors: dict[str, PV] = {
            name: pvs.sub(f"{name}:").double("Counts", 0.0, precision=0) for name in config.monitors
        }
        sources = {name: f"{prefix}{name}:Counts" for name in config.monitors}
        sources["phi"] = f"{prefix}phi.RBV"
        context = RotationContext(
            phi=self.motors["phi"].position,
            chi=self.motors["chi"].position,
            omega=self.motors["omega"].position,
            temperature=lambda: float(self.temperature.readback.value),
            monitors=self._publish_monitors,
        )
        self.detector = AreaDetectorSim(
            pvs.sub("DET:"),
            context,
            crystal=default_crystal(config.seed),
            model=model,
            geometry=geometry,
            seed=config.seed,
            attribute_sources=sources,
        )
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def pvdb(self) -> dict[str, Any]:
        """The caproto ``pvdb`` (PV name -> channel)."""
        return self.pvs.pvdb

    def _publish_monitors(self, values: dict[str, float]) -> None:
        for name, pv in self.monitors.items():
            if name in values:
                task = asyncio.ensure_future(pv.put(values[name]))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def startup(self) -> None:
        """Start the temperature loop and publish start-up values."""
        await self.detector.startup()
        task = asyncio.ensure_future(self.temperature.run())
        self._tasks.add(task)

    async def serve(self, interfaces: Sequence[str]) -> None:
        """Serve Channel Access on ``interfaces`` until cancelled."""
        ctx = Context(self.pvdb, interfaces=list(interfaces))
        await self.startup()
        logger.info(
            "serving %d PVs with prefix %s on %s port %s",
            len(self.pvdb),
            self.config.prefix,
            ",".join(interfaces),
            os.environ.get("EPICS_CA_SERVER_PORT", "5064"),
        )
        try:
            await ctx.run(log_pv_names=False)
        finally:
            for task in list(self._tasks):
                task.cancel()
            self.detector.close()


async def _watch(pid: int, task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` once process ``pid`` is gone (no orphaned IOC after a killed test)."""
    while True:
        await asyncio.sleep(1.0)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            logger.info("process %d is gone; stopping the IOC", pid)
            task.cancel()
            return
        except PermissionError:
            pass


def run_ioc(
    config: IOCConfig, interfaces: Sequence[str] | None = None, watch_pid: int | None = None
) -> None:
    """Run the IOC in this process until interrupted (SIGINT/SIGTERM).

    Parameters
    ----------
    config : IOCConfig
        What to simulate.
    interfaces : sequence of str, optional
        Addresses to serve on; default ``EPICS_CAS_INTF_ADDR_LIST`` or 127.0.0.1.
    watch_pid : int, optional
        Stop when this process (e.g. the test runner that started the IOC) exits.
    """
    if interfaces is None:
        env = os.environ.get("EPICS_CAS_INTF_ADDR_LIST", "").split()
        interfaces = env or ["127.0.0.1"]
    ioc = BeamlineIOC(config)
    logging.getLogger("caproto.ctx").addFilter(_BeaconFilter())

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(ioc.serve(interfaces))
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        watcher = asyncio.ensure_future(_watch(watch_pid, task)) if watch_pid else None
        try:
            await task
        except asyncio.CancelledError:
            logger.info("IOC %s stopped", config.prefix)
        finally:
            if watcher is not None:
                watcher.cancel()

    asyncio.run(main())


class _BeaconFilter(logging.Filter):
    """Drop caproto's traceback for every beacon nobody listens to (no CA repeater)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to send beacon")
