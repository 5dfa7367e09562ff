"""The factory of a simulated beamline's *device bundle* (ophyd-async, or ophyd v1 by argument).

Examples
--------
In a profile (after the RunEngine exists, so the devices connect at once)::

    from nxrefine_bs.devices import make_sim_beamline
    from nxrefine_bs.plans import rotation_scan

    bl = make_sim_beamline("/data/exp", detector="Pilatus CdTe 2M")
    RE(rotation_scan(bl, experiment_dir="/data/exp", sample="TiSe2", label="xtal1",
                     scan="300K", chi=-90.0))
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bluesky.run_engine import call_in_bluesky_event_loop
from bluesky.utils import MsgGenerator
from ophyd.sim import SynAxis
from ophyd_async.core import Device as AsyncDevice
from ophyd_async.core import PathProvider, wait_for_connection
from ophyd_async.plan_stubs import ensure_connected

from ..errors import NXRefineBSError
from ..geometry import Geometry
from ..simulation.crystal import SimCrystal
from ..simulation.frames import DetectorModel
from .detector import RotationPathProvider, SimRotationDetector
from .goniometer import SimDetectorStage, SimGoniometer
from .monitors import SimIonChamber, SimTemperatureController
from .v1 import SimDetectorStageV1, SimGoniometerV1, SimMonitorV1, SimRotationDetectorV1

logger = logging.getLogger(__name__)

__all__ = [
    "SimBeamlineDevices",
    "DEVICE_APIS",
    "make_sim_beamline",
    "default_crystal",
    "default_geometry",
    "detector_model",
]

DEVICE_APIS: tuple[str, ...] = ("ophyd-async", "ophyd")
"""The device libraries :func:`make_sim_beamline` builds with (``api=``)."""

SMALL_SHAPE = (195, 235)
"""Default shape of the ``"small"`` synthetic detector."""


@dataclass
class SimBeamlineDevices:
    """The devices a rotation plan drives.

    Attributes
    ----------
    goniometer
        ``phi``, ``chi``, ``omega``, ``theta`` motors.
    detector
        Rotation detector (``SimRotationDetector`` or ``SimRotationDetectorV1``).
    monitors
        Monitor channels (``MCS1``, ``MCS2``).
    temperature
        Temperature controller, or None.
    detector_stage
        Detector translation stage (``x``, ``y``), or None.
    path_provider
        The detector's :class:`~nxrefine_bs.devices.detector.RotationPathProvider`
        (the plans point it at each rotation's file).
    geometry
        Configured geometry of the instrument.
    detector_model
        Detector model (its ``name`` is the pyFAI name of the start document).
    """

    goniometer: Any
    detector: Any
    monitors: list[Any] = field(default_factory=list)
    temperature: Any | None = None
    detector_stage: Any | None = None
    path_provider: Any | None = None
    geometry: Geometry | None = None
    detector_model: DetectorModel | None = None

    @property
    def monitor_names(self) -> list[str]:
        """Names of the monitor channels (``["MCS1", "MCS2"]``)."""
        return [m.name for m in self.monitors]

    @property
    def baseline(self) -> list[Any]:
        """Devices recorded in the ``baseline`` stream."""
        return [
            d for d in (self.goniometer, self.detector_stage, self.temperature) if d is not None
        ]

    def all_devices(self) -> list[Any]:
        """Every device (for connecting or a device registry)."""
        return [
            d
            for d in (
                self.goniometer,
                self.detector,
                *self.monitors,
                self.temperature,
                self.detector_stage,
            )
            if d is not None
        ]

    @property
    def is_ophyd_async(self) -> bool:
        """True for ophyd-async devices, False for ophyd v1."""
        return isinstance(self.detector, AsyncDevice)

    def connect_plan(self) -> MsgGenerator[None]:
        """Plan that connects the ophyd-async devices: ``RE(devices.connect_plan())``."""
        if self.is_ophyd_async:
            yield from ensure_connected(*self.all_devices())

    async def connect(self, mock: bool = False, timeout: float = 10.0) -> None:
        """Connect the ophyd-async devices (a no-op for ophyd v1)."""
        if not self.is_ophyd_async:
            return
        await wait_for_connection(
            **{d.name: d.connect(mock=mock, timeout=timeout) for d in self.all_devices()}
        )


def detector_model(
    detector: str | DetectorModel, shape: tuple[int, int] | None = None
) -> DetectorModel:
    """Detector model from ``"small"``, a pyFAI name or a :class:`DetectorModel`.

    ``"small"`` is a synthetic 2 x 2-module detector of ``shape`` (default 195 x 235)
    with 0.6 mm pixels (the reduction tests' set-up).
    """
    if isinstance(detector, DetectorModel):
        return detector
    if detector == "small":
        return DetectorModel.synthetic(tuple(shape or SMALL_SHAPE), pixel_size=0.6)  # type: ignore[arg-type]
    return DetectorModel.from_pyfai(detector)


def default_geometry(model: DetectorModel) -> Geometry:
    """A sensible geometry for ``model``: beam near the centre, whole detector in use.

    Small synthetic detectors get the set-up of
    :func:`~nxrefine_bs.simulation.scan.small_test_setup` (0.3 Angstrom, 150 mm for
    0.6 mm pixels, 0.5 deg frames); real detectors 0.3 Angstrom at 350 mm with
    0.1 deg frames.  Both have chi = -90 deg.
    """
    ny, nx = model.shape
    if model.name.startswith("synthetic"):
        return Geometry(
            wavelength=0.3,
            distance=150.0 * model.pixel_size / 0.6,
            pixel_size=model.pixel_size,
            shape=model.shape,
            beam_center_x=nx / 2 + 0.3,
            beam_center_y=ny / 2 - 0.4,
            chi=-90.0,
            phi_start=-5.0,
            phi_step=0.5,
        )
    return Geometry(
        wavelength=0.3,
        distance=350.0,
        pixel_size=model.pixel_size,
        shape=model.shape,
        beam_center_x=nx / 2 + 0.3,
        beam_center_y=ny / 2 - 0.4,
        chi=-90.0,
        phi_start=-5.0,
        phi_step=0.1,
    )


def default_crystal(seed: int = 0) -> SimCrystal:
    """F-centred silicon-like cubic crystal (a = 5.43 Angstrom) in a seeded orientation."""
    return SimCrystal.random((5.43, 5.43, 5.43, 90.0, 90.0, 90.0), centring="F", seed=seed)


def _connect_now(devices: SimBeamlineDevices) -> bool:
    try:
        call_in_bluesky_event_loop(devices.connect())
    except RuntimeError as exc:
        if "event loop not running" not in str(exc):
            raise
        logger.debug("no running bluesky event loop: devices connect in the plans")
        return False
    return True


def make_sim_beamline(
    directory_or_path_provider: PathProvider | str | os.PathLike[str],
    *,
    api: str = "ophyd-async",
    crystal: SimCrystal | None = None,
    detector: str | DetectorModel = "small",
    shape: tuple[int, int] | None = None,
    geometry: Geometry | None = None,
    frame_time: float = 0.1,
    n_frames: int = 0,
    seed: int = 0,
    monitors: tuple[str, ...] = ("MCS1", "MCS2"),
    temperature: float | None = 300.0,
    temperature_time_constant: float = 0.5,
    simulator_kwargs: Mapping[str, Any] | None = None,
    compression: str | None = None,
    detector_name: str = "detector",
    connect: bool = True,
) -> SimBeamlineDevices:
    """The device bundle of a simulated beamline: goniometer, detector, monitors, temperature.

    Parameters
    ----------
    directory_or_path_provider : PathProvider or path-like
        Default location of detector files (the plans set ``<scan dir>/fN.h5``); a
        directory for ``api="ophyd"``.
    api : {"ophyd-async", "ophyd"}
        Device library.  ``"ophyd"`` (v1) makes instant :class:`ophyd.sim.SynAxis`
        axes and a detector that emits Resource/Datum (step scans only, see
        :mod:`nxrefine_bs.devices.v1`); ``temperature_time_constant`` and ``connect``
        do not apply to it.
    crystal : SimCrystal, optional
        The sample (default :func:`default_crystal` with ``seed``).
    detector : str or DetectorModel
        ``"small"`` (synthetic, ``shape``), a pyFAI name such as ``"Pilatus CdTe 2M"``,
        or a model.
    shape : tuple of int, optional
        Shape of the ``"small"`` detector.
    geometry : Geometry, optional
        Configured geometry (default :func:`default_geometry`).
    frame_time : float
        Frame period (s); also the fly speed: ``phi_step / frame_time``.
    n_frames : int
        Initial ``n_frames`` of the detector (the plans set it per rotation; 0: the
        number of frames the detector is prepared for).
    seed : int
        Noise seed of the detector (file ``fN`` uses ``seed * 100 + N``).
    monitors : tuple of str
        Monitor channel names.
    temperature : float or None
        Initial temperature of the controller (K); None: no controller.
    temperature_time_constant : float
        Relaxation time of the simulated temperature (s).
    simulator_kwargs : mapping, optional
        Further :class:`~nxrefine_bs.simulation.frames.RotationSimulator` arguments.
    compression : str, optional
        h5py compression of the frames.
    detector_name : str
        Name of the detector device (the data key of the frames).
    connect : bool
        Connect the devices now if a RunEngine's event loop is running (as in a
        profile); otherwise the nxrefine-bs plans connect them on first use.

    Returns
    -------
    SimBeamlineDevices

    Raises
    ------
    NXRefineBSError
        For an unknown ``api``, a path provider given to ``api="ophyd"``, or a
        geometry whose shape is not the detector's.
    """
    if api not in DEVICE_APIS:
        raise NXRefineBSError(f"api must be one of {', '.join(DEVICE_APIS)}, got {api!r}")
    if api == "ophyd":
        if not isinstance(directory_or_path_provider, (str, os.PathLike)):
            raise NXRefineBSError(
                "api='ophyd' needs a directory for the detector files, not a path provider"
            )
        return _make_sim_beamline_v1(
            directory_or_path_provider,
            crystal=crystal,
            detector=detector,
            shape=shape,
            geometry=geometry,
            frame_time=frame_time,
            n_frames=n_frames,
            seed=seed,
            monitors=monitors,
            temperature=temperature,
            simulator_kwargs=simulator_kwargs,
            compression=compression,
            detector_name=detector_name,
        )
    model = detector_model(detector, shape)
    geom = geometry or default_geometry(model)
    if tuple(geom.shape) != tuple(model.shape):
        raise NXRefineBSError(
            f"geometry shape {geom.shape} does not match detector {model.name!r} {model.shape}"
        )
    goniometer = SimGoniometer(name="goniometer", chi=geom.chi, omega=geom.omega, theta=geom.theta)
    chambers = [SimIonChamber(name=m) for m in monitors]
    temp = (
        SimTemperatureController(
            name="temperature", initial=temperature, time_constant=temperature_time_constant
        )
        if temperature is not None
        else None
    )
    provider = (
        RotationPathProvider(directory_or_path_provider)
        if isinstance(directory_or_path_provider, (str, os.PathLike))
        else directory_or_path_provider
    )
    det = SimRotationDetector(
        provider,
        crystal=crystal or default_crystal(seed),
        detector=model,
        geometry=geom,
        goniometer=goniometer,
        temperature=temp,
        monitors=chambers,
        seed=seed,
        frame_time=frame_time,
        n_frames=n_frames,
        simulator_kwargs=simulator_kwargs,
        compression=compression,
        name=detector_name,
    )
    devices = SimBeamlineDevices(
        goniometer=goniometer,
        detector=det,
        monitors=chambers,
        temperature=temp,
        detector_stage=SimDetectorStage(name="detector_stage"),
        path_provider=provider,
        geometry=geom,
        detector_model=model,
    )
    if connect:
        _connect_now(devices)
    return devices


def _make_sim_beamline_v1(
    directory: str | os.PathLike[str],
    *,
    crystal: SimCrystal | None = None,
    detector: str | DetectorModel = "small",
    shape: tuple[int, int] | None = None,
    geometry: Geometry | None = None,
    frame_time: float = 0.1,
    n_frames: int = 0,
    seed: int = 0,
    monitors: tuple[str, ...] = ("MCS1", "MCS2"),
    temperature: float | None = 300.0,
    simulator_kwargs: Mapping[str, Any] | None = None,
    compression: str | None = None,
    detector_name: str = "detector",
) -> SimBeamlineDevices:
    """:func:`make_sim_beamline` with ``api="ophyd"``."""
    model = detector_model(detector, shape)
    geom = geometry or default_geometry(model)
    goniometer = SimGoniometerV1(name="goniometer")
    goniometer.chi.set(geom.chi).wait()
    goniometer.omega.set(geom.omega).wait()
    goniometer.theta.set(geom.theta).wait()
    chans = [SimMonitorV1(name=m) for m in monitors]
    provider = RotationPathProvider(directory, detector_name)
    det = SimRotationDetectorV1(
        provider,
        crystal=crystal or default_crystal(seed),
        detector=model,
        geometry=geom,
        goniometer=goniometer,
        monitors=chans,
        seed=seed,
        frame_time=frame_time,
        simulator_kwargs=simulator_kwargs,
        compression=compression,
        name=detector_name,
    )
    det.n_frames.put(int(n_frames))
    temp = SynAxis(name="temperature", value=temperature) if temperature is not None else None
    return SimBeamlineDevices(
        goniometer=goniometer,
        detector=det,
        monitors=chans,
        temperature=temp,
        detector_stage=SimDetectorStageV1(name="detector_stage"),
        path_provider=provider,
        geometry=geom,
        detector_model=model,
    )
