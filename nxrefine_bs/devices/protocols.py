"""What the rotation plans need from devices, as protocols (in the style of ``bluesky.protocols``).

The plans of :mod:`nxrefine_bs.plans` drive any devices meeting these protocols:
the package's simulated devices, ophyd-async's stock EPICS devices
(``epics.adsimdetector.SimDetector``/``epics.adpilatus.PilatusDetector`` with an
``ADHDFWriter`` (``ADWriterFactory.hdf``), ``epics.motor.Motor``), stock ophyd v1
EPICS devices through the thin adapter of :mod:`nxrefine_bs.devices.epics_v1` (fly and
step) and the simulated ophyd v1 devices (step).  Nothing else about a device is probed.

* :class:`RotationDetector` - stage, prepare with a ``TriggerInfo``, kick off and
  collect (fly), or trigger and read (step).  Its files go where its
  :class:`RotationFileProvider` says: the plans call ``set_file(<scan dir>/fN.h5)``
  before every rotation; directory creation is the provider's (``create_dir_depth``)
  and the detector's (or IOC's) business, never the plan's.
* :class:`RotationAxis` - phi: ``set`` to a position, and for fly scans ``prepare`` with a
  ``FlyMotorInfo``, ``kickoff``, ``complete``, ``stop``.
* :class:`RotationStage` - the goniometer: ``phi``, ``chi``, ``omega`` (``theta``
  optional).
* :class:`TemperatureController` - ``set`` a set point; the status finishes when the
  sample is there; ``read`` reports the readback.
* :class:`RotationRenderer` - optional: a simulated detector that renders the rotation
  itself needs ``phi_start``/``phi_step``/``n_frames``/``frame_time`` (a real
  detector sees the sample rotate instead).
* :class:`RotationBeamline` - the bundle the plans take: the devices, the detector's
  file provider and the configured geometry.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from bluesky.protocols import (
    Collectable,
    Flyable,
    Movable,
    Preparable,
    Readable,
    Stageable,
    Stoppable,
    Triggerable,
)

__all__ = [
    "FlyingDetector",
    "RotationAxis",
    "RotationBeamline",
    "RotationDetector",
    "RotationFileProvider",
    "RotationRenderer",
    "RotationStage",
    "TemperatureController",
    "VelocityControlled",
]


@runtime_checkable
class RotationFileProvider(Protocol):
    """An ophyd-async ``PathProvider`` whose next file can be chosen.

    ``set_file(path)`` points it at ``<dir>/<name>.h5``; calling it returns the
    ``PathInfo`` (directory, file name, ``create_dir_depth``) a detector writes to.
    """

    def set_file(self, path: Any) -> None: ...

    def __call__(self, datakey_name: str | None = None) -> Any: ...


@runtime_checkable
class RotationDetector(Readable, Triggerable, Stageable, Protocol):
    """A detector the step plans can drive: stage, trigger and read (and ``prepare`` with a
    ``TriggerInfo`` when it is preparable, as ophyd-async detectors are)."""


@runtime_checkable
class FlyingDetector(Stageable, Preparable, Flyable, Collectable, Protocol):
    """A detector the fly plans can drive: prepare(TriggerInfo), kickoff, complete, collect.

    ophyd-async's ``StandardDetector`` (every ``epics.adcore`` detector) meets it.
    """

    def collect_asset_docs(self, index: int | None = None) -> Any: ...

    def get_index(self) -> Any: ...


@runtime_checkable
class RotationAxis(Movable, Readable, Protocol):
    """The rotation axis (phi): movable and readable; fly scans also need
    :class:`FlyingAxis` behaviour (``prepare(FlyMotorInfo)``, ``kickoff``, ``complete``)."""


@runtime_checkable
class FlyingAxis(RotationAxis, Preparable, Flyable, Stoppable, Protocol):
    """A rotation axis that flies (ophyd-async ``epics.motor.Motor``)."""


@runtime_checkable
class VelocityControlled(Protocol):
    """An axis with a ``velocity`` signal (restored after a fly scan)."""

    velocity: Any


@runtime_checkable
class RotationStage(Protocol):
    """The goniometer: ``phi`` rotates, ``chi`` and ``omega`` set the rotation axis."""

    phi: Any
    chi: Any
    omega: Any


@runtime_checkable
class TemperatureController(Movable, Readable, Protocol):
    """``set(T)`` finishes when the sample is at ``T``; ``read()`` reports it."""


@runtime_checkable
class RotationRenderer(Protocol):
    """A simulated detector that renders the rotation itself (not needed by real ones)."""

    phi_start: Any
    phi_step: Any
    n_frames: Any
    frame_time: Any


@runtime_checkable
class RotationBeamline(Protocol):
    """What a rotation plan takes: devices, the detector's file provider, the geometry.

    ``geometry`` is the configured :class:`~nxrefine_bs.geometry.Geometry` (the
    rotation's angles replace its own) and ``detector_model`` the
    :class:`~nxrefine_bs.simulation.frames.DetectorModel` whose ``name`` (pyFAI) goes
    into the start document.
    """

    goniometer: Any
    detector: Any
    monitors: Sequence[Any]
    temperature: Any
    detector_stage: Any
    path_provider: Any
    geometry: Any
    detector_model: Any

    @property
    def baseline(self) -> list[Any]: ...

    def all_devices(self) -> list[Any]: ...
