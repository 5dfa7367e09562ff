"""Simulated goniometer and detector stage (ophyd-async).

The four goniometer circles of NXRefine's convention
``G(phi) = Ry(theta) . Rz(omega) . Rx(chi) . Rz(phi)`` are
:class:`ophyd_async.sim.SimMotor` instances in degrees.  ``phi`` moves instantly for
step scans but can fly: ``prepare(FlyMotorInfo(...))`` gives it the constant velocity of
a continuous rotation.
"""

from __future__ import annotations

import logging

from ophyd_async.core import DEFAULT_TIMEOUT, DeviceMock, StandardReadable
from ophyd_async.sim import SimMotor

logger = logging.getLogger(__name__)

__all__ = ["SimGoniometer", "SimDetectorStage"]


class _ShortRunUpMixin:
    """Set the motors' acceleration time once, right after the first connect."""

    _acceleration_time: float
    _acceleration_applied: bool = False

    def _motors(self) -> list[SimMotor]:
        raise NotImplementedError

    async def connect(
        self,
        mock: bool | DeviceMock = False,
        timeout: float = DEFAULT_TIMEOUT,
        force_reconnect: bool = False,
    ) -> None:
        await super().connect(mock=mock, timeout=timeout, force_reconnect=force_reconnect)  # type: ignore[misc]
        if not self._acceleration_applied:
            for motor in self._motors():
                await motor.acceleration_time.set(self._acceleration_time)
            self._acceleration_applied = True


class SimGoniometer(_ShortRunUpMixin, StandardReadable):
    """Four-circle goniometer with simulated motors ``phi``, ``chi``, ``omega``, ``theta``.

    Parameters
    ----------
    name : str
        Device name; the motor readbacks read as ``<name>-phi``, ``<name>-chi``...
    phi, chi, omega, theta : float
        Initial angles (degrees).
    acceleration_time : float
        Run-up time (s) of a fly move (``SimMotor`` defaults to 0.5 s).

    Examples
    --------
    >>> g = SimGoniometer(name="goniometer")
    >>> g.phi.name, g.chi.name
    ('goniometer-phi', 'goniometer-chi')
    """

    def __init__(
        self,
        name: str = "",
        *,
        phi: float = 0.0,
        chi: float = 0.0,
        omega: float = 0.0,
        theta: float = 0.0,
        acceleration_time: float = 0.05,
    ) -> None:
        self._acceleration_time = float(acceleration_time)
        with self.add_children_as_readables():
            self.phi = SimMotor(instant=True, initial_value=phi, units="deg")
            self.chi = SimMotor(instant=True, initial_value=chi, units="deg")
            self.omega = SimMotor(instant=True, initial_value=omega, units="deg")
            self.theta = SimMotor(instant=True, initial_value=theta, units="deg")
        super().__init__(name=name)

    def _motors(self) -> list[SimMotor]:
        return [self.phi, self.chi, self.omega, self.theta]


class SimDetectorStage(_ShortRunUpMixin, StandardReadable):
    """Detector translation stage: motors ``x`` and ``y`` in mm (bookkeeping only).

    The translation of each rotation is recorded (``nxrefine.translation`` of the start
    document and the baseline stream); the simulated frames do not depend on it.
    """

    def __init__(self, name: str = "", *, x: float = 0.0, y: float = 0.0) -> None:
        self._acceleration_time = 0.05
        with self.add_children_as_readables():
            self.x = SimMotor(instant=True, initial_value=x, units="mm")
            self.y = SimMotor(instant=True, initial_value=y, units="mm")
        super().__init__(name=name)

    def _motors(self) -> list[SimMotor]:
        return [self.x, self.y]
