"""Simulated incident-flux monitors and temperature controller (ophyd-async)."""

from __future__ import annotations

import asyncio
import logging
import math
import time

from bluesky.protocols import Movable, Stoppable
from ophyd_async.core import (
    AsyncStatus,
    StandardReadable,
    soft_signal_r_and_setter,
    soft_signal_rw,
)
from ophyd_async.core import StandardReadableFormat as Format

logger = logging.getLogger(__name__)

__all__ = ["SimIonChamber", "SimTemperatureController"]


class SimIonChamber(StandardReadable):
    """An ion chamber / scaler channel whose counts follow the simulated beam.

    The simulated detector pushes the per-frame counts of its
    :class:`~nxrefine_bs.simulation.frames.RotationSimulator` (``monitor``, drifting with
    counting noise) into the channel after each frame, so reading the chamber right
    after a detector trigger gives the counts of that frame.

    Parameters
    ----------
    name : str
        Device name; the counts read under this name (e.g. ``MCS1``).
    channel : str, optional
        Which simulated channel feeds it, ``"MCS1"`` (upstream) or ``"MCS2"``
        (downstream); defaults to ``name``.
    units : str
        Units of the counts.
    """

    def __init__(self, name: str = "", *, channel: str | None = None, units: str = "counts"):
        self.channel = channel or name
        with self.add_children_as_readables(Format.HINTED_SIGNAL):
            self.counts, self._set_counts = soft_signal_r_and_setter(float, 0.0, units=units)
        super().__init__(name=name)

    def set_name(self, name: str, *, child_name_separator: str | None = None) -> None:
        """Name the device; its counts read under the device name itself."""
        super().set_name(name, child_name_separator=child_name_separator)
        self.counts.set_name(name)
        if not self.channel:
            self.channel = name

    def update(self, value: float) -> None:
        """Set the counts of the current frame (called by the detector)."""
        self._set_counts(float(value))


class SimTemperatureController(StandardReadable, Movable[float], Stoppable):
    """A temperature controller whose readback relaxes exponentially to the set point.

    ``set(T)`` writes the set point and completes once ``|readback - T| <= tolerance``.

    Parameters
    ----------
    name : str
        Device name; the readback reads under this name.
    initial : float
        Initial temperature (K).
    time_constant : float
        Exponential relaxation time (s); ``0`` jumps to the set point at once.
    tolerance : float
        Settling tolerance (K).
    update_period : float
        Simulation time step (s).
    """

    def __init__(
        self,
        name: str = "",
        *,
        initial: float = 300.0,
        time_constant: float = 0.5,
        tolerance: float = 0.05,
        update_period: float = 0.02,
    ) -> None:
        with self.add_children_as_readables(Format.HINTED_SIGNAL):
            self.readback, self._set_readback = soft_signal_r_and_setter(
                float, float(initial), units="K", precision=3
            )
        with self.add_children_as_readables():
            self.setpoint = soft_signal_rw(float, float(initial), units="K", precision=3)
        with self.add_children_as_readables(Format.CONFIG_SIGNAL):
            self.time_constant = soft_signal_rw(float, float(time_constant), units="s")
            self.tolerance = soft_signal_rw(float, float(tolerance), units="K")
        self._update_period = float(update_period)
        self._stop_requested = False
        super().__init__(name=name)

    def set_name(self, name: str, *, child_name_separator: str | None = None) -> None:
        """Name the device; the readback reads under the device name itself."""
        super().set_name(name, child_name_separator=child_name_separator)
        self.readback.set_name(name)

    @AsyncStatus.wrap
    async def set(self, value: float) -> None:
        """Change the set point to ``value`` (K) and wait until the readback settles."""
        target = float(value)
        if not math.isfinite(target) or target < 0:
            raise ValueError(f"{self.name}: temperature set point must be >= 0 K, got {value}")
        self._stop_requested = False
        await self.setpoint.set(target)
        tau, tol, current = await asyncio.gather(
            self.time_constant.get_value(), self.tolerance.get_value(), self.readback.get_value()
        )
        if tau <= 0:
            self._set_readback(target)
            return
        tol = max(float(tol), 1e-6)
        last = time.monotonic()
        while abs(current - target) > tol:
            await asyncio.sleep(self._update_period)
            if self._stop_requested:
                logger.info(
                    "%s: stopped at %.3f K on the way to %.3f K", self.name, current, target
                )
                return
            now = time.monotonic()
            current = target + (current - target) * math.exp(-(now - last) / tau)
            last = now
            self._set_readback(current)
        logger.debug("%s: settled at %.3f K (set point %.3f K)", self.name, current, target)

    async def stop(self, success: bool = True) -> None:
        """Stop ramping: the readback stays where it is."""
        self._stop_requested = True
