"""One rotation as a run: pre-position, point the detector at its file, acquire (fly or step).

These plan pieces drive devices through the protocols of
:mod:`nxrefine_bs.devices.protocols` only: the detector's file is chosen through the
beamline's path provider (which also says how many directories the detector may
create), a simulated detector that renders the rotation itself
(:class:`~nxrefine_bs.devices.protocols.RotationRenderer`) is told the rotation, and
phi flies with an ophyd-async ``FlyMotorInfo``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
from bluesky.protocols import Preparable
from bluesky.utils import MsgGenerator
from ophyd_async.core import Device as AsyncDevice
from ophyd_async.core import FlyMotorInfo, TriggerInfo
from ophyd_async.plan_stubs import ensure_connected

from ..devices.epics_v1 import all_connected, channel_access_devices, connect_v1_devices
from ..devices.protocols import RotationRenderer, VelocityControlled
from ..errors import MetadataError
from .specs import RotationSpec, _number, start_metadata

logger = logging.getLogger(__name__)

__all__ = ["connect_devices", "one_rotation", "resolve_frame_time", "run_rotations"]


# ---------------------------------------------------------------------- plan pieces
def connect_devices(devices: Any) -> MsgGenerator[None]:
    """Connect the ophyd-async devices of ``devices`` and wait for the PVs of ophyd v1
    EPICS devices (a no-op for connected ones).

    Raises
    ------
    DeviceConnectionError
        Naming the v1 PVs that did not connect within ``devices.connect_timeout`` s
        (default 10).
    """
    timeout = float(getattr(devices, "connect_timeout", 10.0))
    every = _all_devices(devices)
    async_devices = [d for d in every if isinstance(d, AsyncDevice)]
    if async_devices:
        yield from ensure_connected(*async_devices)
    v1 = channel_access_devices([d for d in every if not isinstance(d, AsyncDevice)])
    if v1 and not all_connected(v1):
        # on a worker thread: the RunEngine's loop keeps running while the PVs connect
        futures = yield from bps.wait_for(
            [lambda: asyncio.to_thread(connect_v1_devices, v1, timeout)]
        )
        error = futures[0].exception()
        if error is not None:
            raise error


def _all_devices(devices: Any) -> list[Any]:
    if hasattr(devices, "all_devices"):
        return list(devices.all_devices())
    return [
        d
        for d in (
            devices.goniometer,
            devices.detector,
            *getattr(devices, "monitors", []),
            getattr(devices, "temperature", None),
            getattr(devices, "detector_stage", None),
        )
        if d is not None
    ]


def _baseline_devices(devices: Any) -> list[Any]:
    if hasattr(devices, "baseline"):
        return list(devices.baseline)
    return [
        d
        for d in (
            devices.goniometer,
            getattr(devices, "detector_stage", None),
            getattr(devices, "temperature", None),
        )
        if d is not None
    ]


def resolve_frame_time(devices: Any, frame_time: float | None) -> MsgGenerator[float]:
    """The frame period: ``frame_time``, else the simulated detector's ``frame_time``."""
    if frame_time is None:
        det = devices.detector
        if not isinstance(det, RotationRenderer):
            raise MetadataError(
                f"give frame_time (s): detector {det.name!r} has no default frame time"
            )
        value = yield from bps.rd(det.frame_time)
        frame_time = float(value)
    value = _number(frame_time, "frame_time")
    if value <= 0:
        raise MetadataError(f"frame_time must be positive, got {frame_time!r}")
    return value


def _pre_position(devices: Any, spec: RotationSpec, frame_time: float) -> MsgGenerator[None]:
    """Move the goniometer and detector stage, point the detector at its file.

    phi goes to the start of the first frame; moving it with a ``set`` also makes the
    RunEngine stop it if the plan fails or is aborted while phi flies.
    """
    gonio = devices.goniometer
    moves: list[Any] = [
        gonio.phi,
        spec.phi_start - 0.5 * spec.phi_step,
        gonio.chi,
        spec.chi,
        gonio.omega,
        spec.omega,
    ]
    theta = getattr(gonio, "theta", None)  # optional axis (two-circle goniometers lack it)
    if theta is not None:
        moves += [theta, spec.theta]
    stage = getattr(devices, "detector_stage", None)
    if stage is not None:
        moves += [stage.x, spec.translation[0], stage.y, spec.translation[1]]
    yield from bps.mv(*moves)
    # The provider names the file and lets the detector create the directories below
    # the experiment directory.
    devices.path_provider.set_file(spec.detector_file, root=spec.experiment_dir)
    det = devices.detector
    if isinstance(det, RotationRenderer):
        yield from bps.mv(
            det.phi_start,
            spec.phi_start,
            det.phi_step,
            spec.phi_step,
            det.n_frames,
            spec.n_frames,
            det.frame_time,
            frame_time,
        )


def _fly_frames(devices: Any, spec: RotationSpec, frame_time: float) -> MsgGenerator[None]:
    det = devices.detector
    phi = devices.goniometer.phi
    n = spec.n_frames
    yield from bps.prepare(det, TriggerInfo(number_of_events=n, livetime=frame_time), wait=True)
    fly = FlyMotorInfo(
        start_position=spec.phi_start - 0.5 * spec.phi_step,
        end_position=spec.phi_start + (n - 0.5) * spec.phi_step,
        time_for_move=n * frame_time,
    )
    yield from bps.prepare(phi, fly, wait=True)
    yield from bps.declare_stream(det, name="primary", collect=True)
    yield from bps.kickoff(phi, wait=True)
    yield from bps.kickoff(det, wait=True)
    yield from bps.collect_while_completing(
        [det, phi], [det], flush_period=0.5, stream_name="primary"
    )


def _step_frames(devices: Any, spec: RotationSpec, frame_time: float) -> MsgGenerator[None]:
    det = devices.detector
    phi = devices.goniometer.phi
    readables = [det, *devices.monitors, phi]
    if isinstance(det, Preparable):
        yield from bps.prepare(det, TriggerInfo(number_of_events=1, livetime=frame_time), wait=True)
    for i in range(spec.n_frames):
        yield from bps.mv(phi, spec.phi_start + i * spec.phi_step)
        yield from bps.trigger_and_read(readables)


def one_rotation(
    devices: Any,
    spec: RotationSpec,
    *,
    mode: str,
    plan_name: str,
    plan_args: Mapping[str, Any],
    frame_time: float,
    baseline: bool,
    md: Mapping[str, Any] | None,
    rotation: tuple[int, int] = (1, 1),
) -> MsgGenerator[str]:
    """Pre-position, then stage, open the run, acquire, close, unstage."""
    det = devices.detector
    phi = devices.goniometer.phi
    _md = start_metadata(
        devices,
        spec,
        plan_name=plan_name,
        plan_args=plan_args,
        frame_time=frame_time,
        md=md,
        rotation=rotation,
    )
    yield from _pre_position(devices, spec, frame_time)
    frames = _fly_frames if mode == "fly" else _step_frames
    plan = bpp.run_wrapper(frames(devices, spec, frame_time), md=_md)
    if baseline:
        plan = bpp.baseline_wrapper(plan, _baseline_devices(devices))
    plan = bpp.stage_wrapper(plan, [det])
    if mode == "fly" and isinstance(phi, VelocityControlled):
        velocity = yield from bps.rd(phi.velocity)

        def restore() -> MsgGenerator[None]:
            yield from bps.mv(phi.velocity, velocity)

        plan = bpp.finalize_wrapper(plan, restore())
    uid = yield from plan
    logger.info("%s: %s %s written to %s", plan_name, spec.sample, spec.entry, spec.detector_file)
    return uid


def run_rotations(
    devices: Any,
    specs: Sequence[RotationSpec],
    *,
    mode: str,
    plan_name: str,
    plan_args: Mapping[str, Any],
    frame_time: float,
    baseline: bool,
    md: Mapping[str, Any],
) -> MsgGenerator[list[str]]:
    uids = []
    for k, spec in enumerate(specs):
        uid = yield from one_rotation(
            devices,
            spec,
            mode=mode,
            plan_name=plan_name,
            plan_args={**plan_args, "rotation_index": k},
            frame_time=frame_time,
            baseline=baseline,
            md=md,
            rotation=(k + 1, len(specs)),
        )
        uids.append(uid)
    return uids
