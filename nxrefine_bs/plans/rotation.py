"""Rotation plans: continuous (fly) and step rotations, several rotations, temperature series.

Every run these plans open is one rotation, i.e. one ``fN`` entry of the scan file
``<sample>/<label>/<sample>_<scan>.nxs``, and follows ``docs/documents.md``: the start
document carries ``sample``, ``label``, ``scan``, ``entry``, ``temperature`` (if any) and
the ``nxrefine`` dictionary the NeXus writer needs; the detector writes
``<experiment_dir>/<sample>/<label>/<scan>/<entry>.h5`` (its path provider names the
file and lets the detector create the directories below the experiment directory).

The devices are any :class:`~nxrefine_bs.devices.protocols.RotationBeamline`: the
simulated beamline (:func:`~nxrefine_bs.devices.make_sim_beamline`), ophyd-async EPICS
devices (:func:`~nxrefine_bs.devices.epics.make_epics_beamline`), ophyd v1 EPICS devices
(``make_epics_beamline(..., api="ophyd")``: fly and step) or the simulated ophyd v1
devices (step).

All arguments of all runs of a plan are validated before the first message is
yielded, so a bad name, an empty phi range or an existing detector file raises
:class:`~nxrefine_bs.errors.MetadataError` before anything moves or any file is made.

Stream layout
-------------
* fly (:func:`rotation_scan`): no events; ``primary`` holds the detector's
  StreamResources (frames, monitors and phi per frame) and StreamDatum pages.
* step (:func:`step_rotation_scan`): one ``primary`` event per frame with the phi
  readback and the monitor channels, plus the same StreamResource/StreamDatum (ophyd-async)
  or Resource/Datum (ophyd v1) for the frames.
* ``baseline``: goniometer, detector stage and temperature at start and end.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import bluesky.plan_stubs as bps
from bluesky.utils import MsgGenerator

from ..devices.protocols import TemperatureController
from ..errors import InvalidNameError, MetadataError
from ..experiment import scan_directory_name
from .acquire import connect_devices, one_rotation, resolve_frame_time, run_rotations
from .specs import (
    RESERVED_MD_KEYS,
    ROTATION_KEYS,
    RotationSpec,
    _check_md,
    _check_mode,
    _number,
    frame_count,
    plan_args,
    prepare_rotation,
    rotation_specs,
    start_metadata,
)

logger = logging.getLogger(__name__)

__all__ = [
    "RotationSpec",
    "frame_count",
    "prepare_rotation",
    "start_metadata",
    "rotation_scan",
    "step_rotation_scan",
    "multi_rotation_scan",
    "temperature_series",
    "ROTATION_KEYS",
    "RESERVED_MD_KEYS",
]


# ---------------------------------------------------------------------- public plans
def rotation_scan(
    devices: Any,
    *,
    experiment_dir: str | os.PathLike[str],
    sample: str,
    label: str,
    scan: str,
    entry: str = "f1",
    phi_start: float = -5.0,
    phi_end: float = 360.0,
    phi_step: float = 0.1,
    chi: float | None = None,
    omega: float | None = None,
    theta: float | None = None,
    detector_translation: Sequence[float] = (0.0, 0.0),
    temperature: float | None = None,
    beamline: str = "sim",
    configuration: str | os.PathLike[str] | None = None,
    frame_time: float | None = None,
    baseline: bool = True,
    recollect: bool = False,
    md: Mapping[str, Any] | None = None,
) -> MsgGenerator[str]:
    """One continuous (fly) rotation: one run, no events, frames as StreamResource/Datum.

    Parameters
    ----------
    devices : RotationBeamline
        From :func:`~nxrefine_bs.devices.make_sim_beamline` or
        :func:`~nxrefine_bs.devices.epics.make_epics_beamline` (ophyd-async, or ophyd v1
        with ``api="ophyd"``).
    experiment_dir : path-like
        Existing experiment directory.
    sample, label, scan : str
        Names; the detector file is ``<experiment_dir>/<sample>/<label>/<scan>/<entry>.h5``.
    entry : str
        Rotation entry ``fN``.
    phi_start, phi_end, phi_step : float
        Rotation range and step (degrees); ``round((end - start) / step)`` frames.
    chi, omega, theta : float, optional
        Goniometer angles; default: the detector's configured geometry.
    detector_translation : (float, float)
        Detector ``(x, y)`` translation (mm, recorded).
    temperature : float, optional
        Set point of the series (K), recorded only (see :func:`temperature_series`).
    beamline : str
        Registered beamline name.
    configuration : path-like, optional
        Configuration template of the scan file.
    frame_time : float, optional
        Frame period (s); default: a simulated detector's ``frame_time`` (required for
        real detectors).
    baseline : bool
        Record goniometer, detector stage and temperature in a ``baseline`` stream
        (turn off if the RunEngine's ``SupplementalData`` already does).
    recollect : bool
        Collect ``entry`` again (after an interrupted rotation): the frames go to a new
        detector file ``<entry>_2.h5``, ``<entry>_3.h5``... (raw data are never
        overwritten) and the writer re-points the entry at it, counting the attempts in
        ``fN/acquisition/attempts``.
    md : mapping, optional
        Extra start-document metadata.

    Returns
    -------
    str
        The run uid.

    Raises
    ------
    MetadataError
        Before anything moves, for invalid arguments or an existing detector file.
    """
    return (yield from _single_rotation("fly", "rotation_scan", dict(locals())))


def step_rotation_scan(
    devices: Any,
    *,
    experiment_dir: str | os.PathLike[str],
    sample: str,
    label: str,
    scan: str,
    entry: str = "f1",
    phi_start: float = -5.0,
    phi_end: float = 360.0,
    phi_step: float = 0.1,
    chi: float | None = None,
    omega: float | None = None,
    theta: float | None = None,
    detector_translation: Sequence[float] = (0.0, 0.0),
    temperature: float | None = None,
    beamline: str = "sim",
    configuration: str | os.PathLike[str] | None = None,
    frame_time: float | None = None,
    baseline: bool = True,
    recollect: bool = False,
    md: Mapping[str, Any] | None = None,
) -> MsgGenerator[str]:
    """One step rotation: move phi, trigger and read, one ``primary`` event per frame.

    Works with ophyd-async detectors (frames as StreamResource/StreamDatum) and ophyd v1
    detectors (Resource/Datum), simulated or over EPICS.  Parameters as for
    :func:`rotation_scan`.
    """
    return (yield from _single_rotation("step", "step_rotation_scan", dict(locals())))


def _single_rotation(mode: str, plan_name: str, params: dict[str, Any]) -> MsgGenerator[str]:
    """Validate one rotation's arguments (before anything moves), then run it."""
    devices = params.pop("devices")
    md = params.pop("md")
    args = plan_args(**params)
    frame_time = params.pop("frame_time")
    baseline = params.pop("baseline")
    spec = prepare_rotation(devices, **params)
    _check_mode(devices, mode)
    user_md = _check_md(md)
    yield from connect_devices(devices)
    dt = yield from resolve_frame_time(devices, frame_time)
    return (
        yield from one_rotation(
            devices,
            spec,
            mode=mode,
            plan_name=plan_name,
            plan_args=args,
            frame_time=dt,
            baseline=baseline,
            md=user_md,
        )
    )


def multi_rotation_scan(
    devices: Any,
    *,
    experiment_dir: str | os.PathLike[str],
    sample: str,
    label: str,
    scan: str,
    rotations: Sequence[Mapping[str, Any]] | None = None,
    first_entry: int = 1,
    phi_start: float = -5.0,
    phi_end: float = 360.0,
    phi_step: float = 0.1,
    temperature: float | None = None,
    beamline: str = "sim",
    configuration: str | os.PathLike[str] | None = None,
    frame_time: float | None = None,
    mode: str = "fly",
    baseline: bool = True,
    md: Mapping[str, Any] | None = None,
) -> MsgGenerator[list[str]]:
    """Several rotations ``f1..fN`` of one scan, each a separate run.

    Parameters
    ----------
    rotations : sequence of dict
        One dictionary per rotation with any of ``chi``, ``omega``, ``theta``,
        ``translation`` (detector ``(x, y)`` mm), ``phi_start``, ``phi_end``,
        ``phi_step`` and ``entry``; missing keys take the plan's values (angles: the
        detector's configured geometry).  Default: one rotation.
    first_entry : int
        Number of the first entry (``f<first_entry>``).
    mode : str
        ``"fly"`` (:func:`rotation_scan`) or ``"step"`` (:func:`step_rotation_scan`).

    Other parameters as for :func:`rotation_scan`.  Every rotation is validated before
    the first one starts.

    Returns
    -------
    list of str
        Run uids.
    """
    args = plan_args(**{k: v for k, v in locals().items() if k not in ("devices", "md")})
    common = {
        "experiment_dir": experiment_dir,
        "sample": sample,
        "label": label,
        "scan": scan,
        "phi_start": phi_start,
        "phi_end": phi_end,
        "phi_step": phi_step,
        "temperature": temperature,
        "beamline": beamline,
        "configuration": configuration,
    }
    specs = rotation_specs(devices, rotations, first_entry=first_entry, common=common)
    _check_mode(devices, mode)
    user_md = _check_md(md)
    yield from connect_devices(devices)
    dt = yield from resolve_frame_time(devices, frame_time)
    return (
        yield from run_rotations(
            devices,
            specs,
            mode=mode,
            plan_name="multi_rotation_scan",
            plan_args=args,
            frame_time=dt,
            baseline=baseline,
            md=user_md,
        )
    )


def temperature_series(
    devices: Any,
    temperatures: Sequence[float],
    *,
    experiment_dir: str | os.PathLike[str],
    sample: str,
    label: str,
    rotations: Sequence[Mapping[str, Any]] | None = None,
    scan_prefix: str = "",
    settle_time: float = 0.0,
    phi_start: float = -5.0,
    phi_end: float = 360.0,
    phi_step: float = 0.1,
    beamline: str = "sim",
    configuration: str | os.PathLike[str] | None = None,
    frame_time: float | None = None,
    mode: str = "fly",
    baseline: bool = True,
    md: Mapping[str, Any] | None = None,
) -> MsgGenerator[list[str]]:
    """For each temperature: set it and wait, then :func:`multi_rotation_scan`.

    The scan of temperature ``T`` is ``scan_directory_name(T, prefix=scan_prefix)``
    (``300`` -> ``300K``, ``-12.5`` -> ``m12p5K``); its runs carry ``temperature = T``.

    Parameters
    ----------
    temperatures : sequence of float
        Set points (K), in order.
    settle_time : float
        Extra wait (s) after the controller reports the set point reached.

    Other parameters as for :func:`multi_rotation_scan`.  Every rotation of every
    temperature is validated before the first set point is changed.

    Returns
    -------
    list of str
        Run uids, temperature by temperature.
    """
    args = plan_args(**{k: v for k, v in locals().items() if k not in ("devices", "md")})
    if not isinstance(getattr(devices, "temperature", None), TemperatureController):
        raise MetadataError(
            "devices has no temperature controller (movable and readable) for a temperature series"
        )
    temps = [_number(t, "temperature") for t in temperatures]
    if not temps:
        raise MetadataError("temperatures is empty")
    settle = _number(settle_time, "settle_time")
    if settle < 0:
        raise MetadataError(f"settle_time must be >= 0, got {settle_time!r}")
    series: list[tuple[float, list[RotationSpec]]] = []
    scans: set[str] = set()
    for t in temps:
        try:
            scan = scan_directory_name(t, prefix=scan_prefix)
        except InvalidNameError as exc:
            raise MetadataError(str(exc)) from exc
        if scan in scans:
            raise MetadataError(f"temperature {t} K repeats scan {scan!r}")
        scans.add(scan)
        common = {
            "experiment_dir": experiment_dir,
            "sample": sample,
            "label": label,
            "scan": scan,
            "phi_start": phi_start,
            "phi_end": phi_end,
            "phi_step": phi_step,
            "temperature": t,
            "beamline": beamline,
            "configuration": configuration,
        }
        series.append((t, rotation_specs(devices, rotations, first_entry=1, common=common)))
    _check_mode(devices, mode)
    user_md = _check_md(md)
    yield from connect_devices(devices)
    dt = yield from resolve_frame_time(devices, frame_time)
    uids: list[str] = []
    for t, specs in series:
        logger.info("temperature series: setting %s K", t)
        yield from bps.mv(devices.temperature, t)
        if settle > 0:
            yield from bps.sleep(settle)
        uids += yield from run_rotations(
            devices,
            specs,
            mode=mode,
            plan_name="temperature_series",
            plan_args={**args, "temperature": t},
            frame_time=dt,
            baseline=baseline,
            md=user_md,
        )
    return uids
