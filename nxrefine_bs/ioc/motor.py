"""Motor-record subset of the simulated IOC, moving on a trapezoidal velocity profile.

A :class:`MotionProfile` is the exact position of an axis as a function of time
(accelerate in ``ACCL`` seconds to ``VELO``, cruise, decelerate); the motor record
updates ``RBV`` from it at :data:`TICK` intervals, and the detector of the same IOC
evaluates it at the exposure times of its frames.  A put to ``VAL`` completes when the
move ends (``DMOV`` = 1), as the real record's put-callback does; ``STOP`` = 1 ends a
move where the axis is.

Examples
--------
>>> p = MotionProfile.move(0.0, 10.0, velocity=5.0, accel_time=0.0, t0=0.0)
>>> p.duration, p.position(1.0), p.position(5.0)
(2.0, 5.0, 10.0)
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass

from .pvs import PVDict

logger = logging.getLogger(__name__)

__all__ = ["MotionProfile", "MotorRecord", "TICK"]

TICK = 0.02
"""Seconds between ``RBV`` updates while moving."""


@dataclass(frozen=True)
class MotionProfile:
    """Position versus (monotonic) time of one move; a still axis is a zero-length move."""

    start: float
    end: float
    t0: float
    velocity: float
    accel_time: float
    t_accel: float
    t_cruise: float

    @classmethod
    def still(cls, position: float, t0: float | None = None) -> MotionProfile:
        """An axis at rest at ``position``."""
        return cls(position, position, time.monotonic() if t0 is None else t0, 0.0, 0.0, 0.0, 0.0)

    @classmethod
    def move(
        cls,
        start: float,
        end: float,
        *,
        velocity: float,
        accel_time: float,
        t0: float | None = None,
    ) -> MotionProfile:
        """A move from ``start`` to ``end`` at ``velocity`` (> 0) with ramps of ``accel_time``."""
        t0 = time.monotonic() if t0 is None else t0
        distance = abs(end - start)
        v = abs(velocity)
        if distance == 0.0 or v == 0.0:
            return cls.still(end if v else start, t0)
        ta = max(0.0, accel_time)
        if ta == 0.0:
            return cls(start, end, t0, v, 0.0, 0.0, distance / v)
        if distance >= v * ta:  # reaches full speed
            return cls(start, end, t0, v, ta, ta, (distance - v * ta) / v)
        t_acc = math.sqrt(distance * ta / v)  # triangular profile, peak speed v * t_acc / ta
        return cls(start, end, t0, v, ta, t_acc, 0.0)

    @property
    def duration(self) -> float:
        """Seconds from start to end of the move."""
        return 2 * self.t_accel + self.t_cruise

    def _travel(self, dt: float) -> float:
        """Distance travelled ``dt`` seconds after the start (not signed)."""
        if self.velocity == 0.0:
            return 0.0
        a = self.velocity / self.accel_time if self.accel_time else math.inf
        ta, tc = self.t_accel, self.t_cruise
        dt = min(max(dt, 0.0), self.duration)
        if dt <= ta:
            return 0.5 * a * dt * dt if ta else 0.0
        peak = a * ta if ta else self.velocity
        first = 0.5 * peak * ta
        if dt <= ta + tc:
            return first + peak * (dt - ta)
        rest = dt - ta - tc
        return first + peak * tc + peak * rest - 0.5 * (peak / ta if ta else 0.0) * rest * rest

    def position(self, t: float) -> float:
        """Position at monotonic time ``t`` (``end`` once the move is over)."""
        if t >= self.t0 + self.duration:
            return self.end
        sign = 1.0 if self.end >= self.start else -1.0
        return self.start + sign * self._travel(t - self.t0)

    def done(self, t: float) -> bool:
        """True once the move is over at time ``t``."""
        return t >= self.t0 + self.duration


class MotorRecord:
    """The motor-record fields ophyd-async's ``epics.motor.Motor`` and ophyd v1's
    ``EpicsMotor`` connect to (homing and direction fields are inert).

    Parameters
    ----------
    pvs : PVDict
        Dictionary whose prefix is the record name (``"SIM:phi"``); fields are ``.VAL``...
    position : float
        Initial position.
    velocity, max_velocity : float
        ``VELO`` and ``VMAX`` (EGU/s).
    accel_time : float
        ``ACCL`` (s).
    egu : str
        Engineering units.
    limits : tuple of float
        User (and dial) soft limits.
    """

    def __init__(
        self,
        pvs: PVDict,
        *,
        position: float = 0.0,
        velocity: float = 10.0,
        max_velocity: float = 100.0,
        accel_time: float = 0.05,
        egu: str = "deg",
        limits: tuple[float, float] = (-3600.0, 3600.0),
        description: str = "",
    ) -> None:
        self.name = pvs.prefix
        self.profile = MotionProfile.still(position)
        self._generation = 0
        self.val = pvs.double(".VAL", position, units=egu)
        self.rbv = pvs.double(".RBV", position, units=egu)
        self.drbv = pvs.double(".DRBV", position, units=egu)
        self.dmov = pvs.integer(".DMOV", 1)
        self.movn = pvs.integer(".MOVN", 0)
        self.velo = pvs.double(".VELO", velocity, units=f"{egu}/s")
        self.vmax = pvs.double(".VMAX", max_velocity, units=f"{egu}/s")
        self.accl = pvs.double(".ACCL", accel_time, units="s")
        self.egu = pvs.string40(".EGU", egu)
        self.desc = pvs.string40(".DESC", description or self.name)
        self.mres = pvs.double(".MRES", 1e-4, precision=6)
        self.srev = pvs.integer(".SREV", 200)
        self.urev = pvs.double(".UREV", 1.0)
        self.eres = pvs.double(".ERES", 0.0)
        self.off = pvs.double(".OFF", 0.0)
        self.prec = pvs.integer(".PREC", 4)
        self.rdbd = pvs.double(".RDBD", 1e-4, precision=6)
        for suffix, value in ((".LLM", limits[0]), (".HLM", limits[1])):
            pvs.double(suffix, value)
            pvs.double(".D" + suffix[1:], value)
        pvs.enum(".FOFF", ("Variable", "Frozen"))
        pvs.enum(".DIR", ("Pos", "Neg"))  # also read by ophyd v1's EpicsMotor
        pvs.integer(".TDIR", 1)
        pvs.integer(".HOMF", 0)
        pvs.integer(".HOMR", 0)
        pvs.enum(".SET", ("Use", "Set"))
        pvs.integer(".HLS", 0)
        pvs.integer(".LLS", 0)
        pvs.string40(".OUT", "")
        self.stop_pv = pvs.integer(".STOP", 0)
        self.val.on_write(self._on_val)
        self.stop_pv.on_write(self._on_stop)

    # ------------------------------------------------------------------ model
    def position(self, t: float | None = None) -> float:
        """Exact position at monotonic time ``t`` (now by default)."""
        return self.profile.position(time.monotonic() if t is None else t)

    def velocity(self, t: float | None = None, dt: float = 1e-3) -> float:
        """Signed velocity at time ``t`` (finite difference of the profile)."""
        t = time.monotonic() if t is None else t
        return (self.profile.position(t + dt) - self.profile.position(t - dt)) / (2 * dt)

    # ------------------------------------------------------------------ hooks
    async def _on_val(self, value: float) -> float:
        target = float(value)
        velocity = float(self.velo.value)
        if velocity <= 0:
            raise ValueError(f"{self.name}.VELO is {velocity}; set a positive speed first")
        now = time.monotonic()
        self.profile = MotionProfile.move(
            self.position(now), target, velocity=velocity, accel_time=float(self.accl.value), t0=now
        )
        self._generation += 1
        generation = self._generation
        logger.debug("%s: move to %s (%.3f s)", self.name, target, self.profile.duration)
        await self.dmov.put(0)
        await self.movn.put(1)
        await self.val.put(target)
        while True:
            now = time.monotonic()
            if generation != self._generation:
                return target  # superseded by a new move or a stop
            pos = self.profile.position(now)
            await self.rbv.put(pos)
            await self.drbv.put(pos)
            if self.profile.done(now):
                break
            await asyncio.sleep(min(TICK, self.profile.t0 + self.profile.duration - now + 1e-4))
        await self.movn.put(0)
        await self.dmov.put(1)
        return target

    async def _on_stop(self, value: int) -> int:
        if int(value):
            now = time.monotonic()
            here = self.position(now)
            self.profile = MotionProfile.still(here, now)
            self._generation += 1
            logger.info("%s: stopped at %s", self.name, here)
            await self.val.put(here)
            await self.rbv.put(here)
            await self.drbv.put(here)
            await self.movn.put(0)
            await self.dmov.put(1)
        return 0
