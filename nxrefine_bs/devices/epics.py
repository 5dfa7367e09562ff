"""ophyd-async EPICS devices of a beamline (Channel Access), bundled for the rotation plans.

:func:`make_epics_beamline` builds, from PV prefixes, the stock ophyd-async devices
the plans drive through :mod:`nxrefine_bs.devices.protocols`:

* goniometer: ``epics.motor.Motor`` for ``phi``, ``chi``, ``omega`` (motor records);
* detector: ``epics.adsimdetector.SimDetector`` (``pilatus``: ``epics.adpilatus``) with
  an ``ADHDFWriter`` (``ADWriterFactory.hdf``) whose path provider is a
  :class:`~nxrefine_bs.devices.detector.RotationPathProvider`;
* :class:`EpicsTemperatureController`: set point ``SP``, readback ``T``, tolerance ``TOL``;
* :class:`EpicsMonitor`: ``<prefix>Counts``.

With ``api="ophyd"`` the same beamline is built from ophyd v1 devices through the thin
adapter of :mod:`nxrefine_bs.devices.epics_v1` (``EpicsMotor``, a stock v1
areaDetector with an HDF5 plugin, ``EpicsSignal`` temperature and monitors).

Connecting raises :class:`~nxrefine_bs.errors.DeviceConnectionError` naming the PVs
that did not connect and the prefix to check.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ophyd_async.core import (
    AsyncStatus,
    NotConnectedError,
    StandardDetector,
    StandardReadable,
    StandardReadableFormat,
    wait_for_value,
)
from ophyd_async.epics.adcore import ADWriterFactory
from ophyd_async.epics.adpilatus import PilatusDetector
from ophyd_async.epics.adsimdetector import SimDetector
from ophyd_async.epics.core import epics_signal_r, epics_signal_rw
from ophyd_async.epics.motor import Motor

from ..errors import DeviceConnectionError, NXRefineBSError
from ..geometry import Geometry
from ..simulation.frames import DetectorModel
from .beamline import DEVICE_APIS
from .detector import RotationPathProvider
from .epics_v1 import connect_v1_devices, make_v1_devices

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_PREFIXES",
    "EpicsBeamlineDevices",
    "EpicsMonitor",
    "EpicsTemperatureController",
    "connect_epics_beamline",
    "instrument_prefixes",
    "make_epics_beamline",
]

DEFAULT_PREFIXES: dict[str, str] = {
    "phi": "phi",
    "chi": "chi",
    "omega": "omega",
    "temperature": "TC:",
    "detector": "DET:",
    "MCS1": "MCS1:",
    "MCS2": "MCS2:",
}
"""Device prefixes relative to a beamline prefix (the simulated IOC's layout)."""


class EpicsTemperatureController(StandardReadable):
    """A temperature controller: ``SP`` set point, ``T`` readback, ``TOL`` tolerance (K).

    ``set(T)`` writes the set point and finishes when the readback is within the
    tolerance of it (timeout: ``settle_timeout`` s).
    """

    def __init__(self, prefix: str, *, settle_timeout: float = 600.0, name: str = "") -> None:
        with self.add_children_as_readables(StandardReadableFormat.HINTED_SIGNAL):
            self.readback = epics_signal_r(float, prefix + "T")
        with self.add_children_as_readables(StandardReadableFormat.CONFIG_SIGNAL):
            self.setpoint = epics_signal_rw(float, prefix + "SP")
            self.tolerance = epics_signal_rw(float, prefix + "TOL")
        self.settle_timeout = float(settle_timeout)
        super().__init__(name=name)

    @AsyncStatus.wrap
    async def set(self, value: float) -> None:
        """Go to ``value`` K and wait until the readback is within the tolerance."""
        target = float(value)
        tolerance = await self.tolerance.get_value()
        await self.setpoint.set(target)
        await wait_for_value(
            self.readback, lambda t: abs(t - target) <= tolerance, timeout=self.settle_timeout
        )


class EpicsMonitor(StandardReadable):
    """A beam monitor channel: ``<prefix>Counts`` (the reading is named after the device)."""

    def __init__(self, prefix: str, name: str = "") -> None:
        with self.add_children_as_readables(StandardReadableFormat.HINTED_SIGNAL):
            self.counts = epics_signal_r(float, prefix + "Counts")
        super().__init__(name=name)


@dataclass
class EpicsBeamlineDevices:
    """The EPICS devices a rotation plan drives (a :class:`RotationBeamline`)."""

    goniometer: Any
    detector: Any
    monitors: list[Any]
    temperature: Any | None
    path_provider: RotationPathProvider
    geometry: Geometry
    detector_model: DetectorModel
    detector_stage: Any | None = None
    prefixes: dict[str, str] = field(default_factory=dict)
    api: str = "ophyd-async"
    connect_timeout: float = 10.0
    """Seconds the plans wait for unconnected ophyd v1 PVs before failing."""

    @property
    def baseline(self) -> list[Any]:
        """Devices recorded in the ``baseline`` stream."""
        return [d for d in (self.goniometer, self.temperature) if d is not None]

    def all_devices(self) -> list[Any]:
        """Every device (to connect)."""
        return [
            d
            for d in (self.goniometer, self.detector, *self.monitors, self.temperature)
            if d is not None
        ]

    @property
    def monitor_names(self) -> list[str]:
        """Names of the monitor channels."""
        return [m.name for m in self.monitors]


class EpicsGoniometer(StandardReadable):
    """``phi``, ``chi``, ``omega`` motor records (readable together for the baseline)."""

    def __init__(self, prefixes: Mapping[str, str], name: str = "") -> None:
        with self.add_children_as_readables():
            self.phi = Motor(prefixes["phi"])
            self.chi = Motor(prefixes["chi"])
            self.omega = Motor(prefixes["omega"])
        super().__init__(name=name)


def resolve_prefixes(prefix: str, prefixes: Mapping[str, str] | None = None) -> dict[str, str]:
    """Full PV prefixes: ``prefixes`` (absolute) over ``prefix`` + :data:`DEFAULT_PREFIXES`.

    Examples
    --------
    >>> resolve_prefixes("SIM:", {"phi": "BL:GON:PHI"})["phi"], resolve_prefixes("SIM:")["chi"]
    ('BL:GON:PHI', 'SIM:chi')
    """
    out = {key: prefix + value for key, value in DEFAULT_PREFIXES.items()}
    for key, value in (prefixes or {}).items():
        if key not in DEFAULT_PREFIXES:
            raise NXRefineBSError(
                f"unknown EPICS device {key!r} in [instrument]; known: {sorted(DEFAULT_PREFIXES)}"
            )
        if not isinstance(value, str) or not value or any(c.isspace() for c in value):
            raise NXRefineBSError(f"PV prefix of {key!r} must be a non-empty word, got {value!r}")
        out[key] = value
    return out


def instrument_prefixes(instrument: Mapping[str, Any]) -> tuple[str, dict[str, str], str]:
    """``(prefix, prefixes, detector_driver)`` from an ``[instrument]`` settings section.

    Keys: ``pv_prefix`` (beamline prefix), ``pv_phi``, ``pv_chi``, ``pv_omega``,
    ``pv_temperature``, ``pv_detector``, ``pv_mcs1``, ``pv_mcs2`` (absolute prefixes
    overriding ``pv_prefix`` + :data:`DEFAULT_PREFIXES`) and ``detector_driver``.

    Examples
    --------
    >>> instrument_prefixes({"pv_prefix": "BL7:", "pv_phi": "BL7:GON:PHI"})
    ('BL7:', {'phi': 'BL7:GON:PHI'}, 'sim')
    """
    prefix = str(instrument.get("pv_prefix") or "SIM:")
    prefixes = {}
    for device in DEFAULT_PREFIXES:
        value = instrument.get(f"pv_{device.lower()}")
        if value:
            prefixes[device] = str(value)
    return prefix, prefixes, str(instrument.get("detector_driver") or "sim")


def make_epics_beamline(
    directory: str | os.PathLike[str],
    *,
    prefix: str = "SIM:",
    prefixes: Mapping[str, str] | None = None,
    geometry: Geometry,
    detector_model: DetectorModel,
    detector_class: str = "sim",
    monitors: tuple[str, ...] = ("MCS1", "MCS2"),
    detector_name: str = "detector",
    api: str = "ophyd-async",
) -> EpicsBeamlineDevices:
    """EPICS devices of a beamline, ophyd-async or ophyd v1 (not connected yet).

    Parameters
    ----------
    directory : path-like
        Default directory of the detector files (the plans name each rotation's file).
    prefix : str
        Beamline prefix; device prefixes default to ``prefix`` + :data:`DEFAULT_PREFIXES`.
    prefixes : mapping, optional
        Absolute PV prefixes per device (``phi``, ``chi``, ``omega``, ``temperature``,
        ``detector``, ``MCS1``, ``MCS2``), e.g. from the ``[instrument]`` settings.
    geometry, detector_model
        Configured geometry and detector model (pyFAI name in the start document).
    detector_class : str
        ``"sim"`` (ADSimDetector) or ``"pilatus"`` (ADPilatus).
    monitors : tuple of str
        Monitor channels (each needs a prefix).
    api : {"ophyd-async", "ophyd"}
        Device library.  ``"ophyd"``: ophyd v1 ``EpicsMotor`` axes (phi flies through
        :class:`~nxrefine_bs.devices.epics_v1.FlyingEpicsMotor`), a stock v1
        areaDetector with an HDF5 plugin behind
        :class:`~nxrefine_bs.devices.epics_v1.AreaDetectorV1Adapter`, and v1 signals
        for the temperature and the monitors; fly and step rotations both work.

    Raises
    ------
    NXRefineBSError
        For an unknown ``api``, detector class or device prefix.
    """
    if api not in DEVICE_APIS:
        raise NXRefineBSError(f"api must be one of {', '.join(DEVICE_APIS)}, got {api!r}")
    full = resolve_prefixes(prefix, prefixes)
    provider = RotationPathProvider(directory, "f1")
    if api == "ophyd":
        v1 = make_v1_devices(
            full,
            provider,
            detector_class=detector_class,
            monitors=monitors,
            detector_name=detector_name,
        )
        return EpicsBeamlineDevices(
            **v1,
            path_provider=provider,
            geometry=geometry,
            detector_model=detector_model,
            prefixes=full,
            api=api,
        )
    writer = ADWriterFactory.hdf(provider)
    det: StandardDetector
    if detector_class == "sim":
        det = SimDetector(full["detector"], writer, name=detector_name)
    elif detector_class == "pilatus":
        det = PilatusDetector(full["detector"], writer, name=detector_name)
    else:
        raise NXRefineBSError(f"detector class must be 'sim' or 'pilatus', got {detector_class!r}")
    return EpicsBeamlineDevices(
        goniometer=EpicsGoniometer(full, name="goniometer"),
        detector=det,
        monitors=[EpicsMonitor(full[m], name=m) for m in monitors],
        temperature=EpicsTemperatureController(full["temperature"], name="temperature"),
        path_provider=provider,
        geometry=geometry,
        detector_model=detector_model,
        prefixes=full,
    )


async def connect_epics_beamline(devices: EpicsBeamlineDevices, timeout: float = 5.0) -> None:
    """Connect every device; a failure names the PVs that did not connect.

    ophyd v1 devices (``api="ophyd"``) are waited for on a worker thread
    (:func:`~nxrefine_bs.devices.epics_v1.connect_v1_devices`).

    Raises
    ------
    DeviceConnectionError
        Naming the unconnected PVs and the prefixes to check.
    """
    if devices.api == "ophyd":
        await asyncio.to_thread(connect_v1_devices, devices.all_devices(), timeout)
        return
    results = await asyncio.gather(
        *(d.connect(timeout=timeout) for d in devices.all_devices()), return_exceptions=True
    )
    failures = []
    for device, result in zip(devices.all_devices(), results, strict=True):
        if isinstance(result, NotConnectedError):
            failures.append(f"{device.name}: {_pv_names(result)}")
        elif isinstance(result, BaseException):
            failures.append(f"{device.name}: {type(result).__name__}: {result}")
    if failures:
        raise DeviceConnectionError.from_failures(failures, timeout)


def _pv_names(error: NotConnectedError, limit: int = 6) -> str:
    """The PV names mentioned in an ophyd-async connection error (first ``limit``)."""
    names = sorted(set(re.findall(r"ca://([^\s'\",]+)", str(error))))
    if not names:
        return str(error).strip().splitlines()[0] if str(error).strip() else "not connected"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
