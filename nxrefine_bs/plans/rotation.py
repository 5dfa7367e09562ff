"""Rotation plans: continuous (fly) and step rotations, several rotations, temperature series.

Every run these plans open is one rotation, i.e. one ``fN`` entry of the scan file
``<sample>/<label>/<sample>_<scan>.nxs``, and follows ``docs/documents.md``: the start
document carries ``sample``, ``label``, ``scan``, ``entry``, ``temperature`` (if any) and
the ``nxrefine`` dictionary the NeXus writer needs; the detector writes
``<experiment_dir>/<sample>/<label>/<scan>/<entry>.h5``.

All arguments of all runs of a plan are validated before the first message is
yielded, so a bad name, an empty phi range or an existing detector file raises
:class:`~nxrefine_bs.errors.MetadataError` before anything moves or any file is made.

Stream layout
-------------
* fly (:func:`rotation_scan`): no events; ``primary`` holds the detector's
  StreamResources (``<det>``, ``<det>-MCS1``, ``<det>-MCS2``, ``<det>-phi``) and
  StreamDatum pages.
* step (:func:`step_rotation_scan`): one ``primary`` event per frame with the phi
  readback and the monitor channels, plus the same StreamResource/StreamDatum (ophyd-async)
  or Resource/Datum (ophyd v1) for the frames.
* ``baseline``: goniometer, detector stage and temperature at start and end.

Examples
--------
>>> from nxrefine_bs.plans.rotation import frame_count
>>> frame_count(-5.0, 360.0, 0.1)
3650
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
from bluesky.utils import MsgGenerator
from ophyd_async.core import Device as AsyncDevice
from ophyd_async.core import FlyMotorInfo, TriggerInfo
from ophyd_async.plan_stubs import ensure_connected

from ..errors import InvalidNameError, MetadataError, PathSafetyError
from ..experiment import safe_join, scan_directory_name, validate_name
from ..geometry import RUN_GEOMETRY_KEYS, Geometry

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

ENTRY_PATTERN = re.compile(r"f[1-9][0-9]*")
"""Rotation entries are ``f1``, ``f2``..."""

ROTATION_KEYS = frozenset(
    {"chi", "omega", "theta", "translation", "phi_start", "phi_end", "phi_step", "entry"}
)
"""Keys accepted in each dictionary of ``rotations``."""

RESERVED_MD_KEYS = frozenset(
    {"plan_name", "plan_args", "sample", "label", "scan", "entry", "temperature", "nxrefine"}
)
"""Start-document keys the plans own; ``md`` may not set them."""


@dataclass(frozen=True)
class RotationSpec:
    """Everything about one rotation, validated.

    Attributes
    ----------
    experiment_dir : Path
        Absolute experiment directory.
    sample, label, scan, entry : str
        Safe names; ``entry`` is ``fN``.
    scan_dir : Path
        ``<experiment_dir>/<sample>/<label>/<scan>``.
    detector_file : Path
        ``<scan_dir>/<entry>.h5`` (does not exist yet).
    phi_start, phi_end, phi_step : float
        Rotation range and step (degrees).
    n_frames : int
        ``round((phi_end - phi_start) / phi_step)``.
    chi, omega, theta : float
        Goniometer angles of the rotation (degrees).
    translation : tuple of float
        Detector translation ``(x, y)`` (mm).
    temperature : float or None
        Set point of the series (K).
    geometry : Geometry
        The detector's configured geometry with this rotation's angles.
    beamline : str
        Registered beamline name.
    configuration : str or None
        Absolute path of the configuration template.
    """

    experiment_dir: Path
    sample: str
    label: str
    scan: str
    entry: str
    scan_dir: Path
    detector_file: Path
    phi_start: float
    phi_end: float
    phi_step: float
    n_frames: int
    chi: float
    omega: float
    theta: float
    translation: tuple[float, float]
    temperature: float | None
    geometry: Geometry
    beamline: str
    configuration: str | None


# ---------------------------------------------------------------------- validation
def _name(value: Any, what: str) -> str:
    try:
        return validate_name(value, what)
    except InvalidNameError as exc:
        raise MetadataError(str(exc)) from exc


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool):
        raise MetadataError(f"{what} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise MetadataError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise MetadataError(f"{what} must be finite, got {value!r}")
    return number


def frame_count(phi_start: float, phi_end: float, phi_step: float) -> int:
    """Frames of a rotation: ``round((phi_end - phi_start) / phi_step)``, at least 1.

    Raises
    ------
    MetadataError
        If the step is not positive or the range holds no frame.
    """
    start = _number(phi_start, "phi_start")
    end = _number(phi_end, "phi_end")
    step = _number(phi_step, "phi_step")
    if step <= 0:
        raise MetadataError(f"phi_step must be positive, got {phi_step!r}")
    n = round((end - start) / step)
    if n < 1:
        raise MetadataError(
            f"phi range {start} -> {end} with step {step} holds no frame; "
            "phi_end must exceed phi_start by at least one step"
        )
    return int(n)


def _detector_of(devices: Any) -> Any:
    det = getattr(devices, "detector", None)
    if det is None:
        raise MetadataError("devices has no detector; build them with make_sim_beamline()")
    for attr in ("geometry", "detector_model", "file_path", "file_name", "n_frames"):
        if not hasattr(det, attr):
            raise MetadataError(
                f"detector {getattr(det, 'name', det)!r} has no {attr!r}; the rotation plans "
                "need a rotation detector (SimRotationDetector or SimRotationDetectorV1)"
            )
    return det


def _is_async(device: Any) -> bool:
    return isinstance(device, AsyncDevice)


def prepare_rotation(
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
) -> RotationSpec:
    """Validate the arguments of one rotation; nothing is moved or written.

    ``chi``, ``omega`` and ``theta`` default to the detector's configured geometry.

    Raises
    ------
    MetadataError
        Unsafe names, an entry that is not ``fN``, a non-positive step, an empty phi
        range, a missing experiment directory or configuration, or an existing
        detector file.
    """
    det = _detector_of(devices)
    sample = _name(sample, "sample")
    label = _name(label, "label")
    scan = _name(scan, "scan")
    beamline = _name(beamline, "beamline")
    if not isinstance(entry, str) or not ENTRY_PATTERN.fullmatch(entry):
        raise MetadataError(f"entry must be f1, f2, ... (f<digits>), got {entry!r}")
    n_frames = frame_count(phi_start, phi_end, phi_step)
    exp = Path(os.path.abspath(os.fspath(experiment_dir)))
    if not exp.is_dir():
        raise MetadataError(
            f"experiment directory {exp} does not exist; create it (nxrefine-bs experiment "
            "create) first"
        )
    try:
        scan_dir = safe_join(exp, sample, label, scan)
    except PathSafetyError as exc:
        raise MetadataError(str(exc)) from exc
    detector_file = scan_dir / f"{entry}.h5"
    if detector_file.exists():
        raise MetadataError(
            f"detector file {detector_file} exists; raw data are never overwritten - use a "
            "new scan name or entry"
        )
    geom: Geometry = det.geometry
    angles = {
        key: _number(geom_value if value is None else value, key)
        for key, value, geom_value in (
            ("chi", chi, geom.chi),
            ("omega", omega, geom.omega),
            ("theta", theta, geom.theta),
        )
    }
    try:
        tx, ty = (float(v) for v in detector_translation)
    except (TypeError, ValueError):
        raise MetadataError(
            f"detector_translation must be (x, y) in mm, got {detector_translation!r}"
        ) from None
    tx, ty = _number(tx, "detector translation x"), _number(ty, "detector translation y")
    temp = None if temperature is None else _number(temperature, "temperature")
    if temp is not None and temp < 0:
        raise MetadataError(f"temperature must be >= 0 K, got {temperature!r}")
    config: str | None = None
    if configuration is not None:
        cpath = Path(os.path.abspath(os.fspath(configuration)))
        if not cpath.is_file():
            raise MetadataError(f"configuration file {cpath} does not exist")
        config = str(cpath)
    start, step = float(phi_start), float(phi_step)
    return RotationSpec(
        experiment_dir=exp,
        sample=sample,
        label=label,
        scan=scan,
        entry=entry,
        scan_dir=scan_dir,
        detector_file=detector_file,
        phi_start=start,
        phi_end=float(phi_end),
        phi_step=step,
        n_frames=n_frames,
        chi=angles["chi"],
        omega=angles["omega"],
        theta=angles["theta"],
        translation=(tx, ty),
        temperature=temp,
        geometry=geom.replace(phi_start=start, phi_step=step, **angles),
        beamline=beamline,
        configuration=config,
    )


def _check_unique(specs: Iterable[RotationSpec]) -> None:
    seen: set[Path] = set()
    for spec in specs:
        if spec.detector_file in seen:
            raise MetadataError(f"detector file {spec.detector_file} would be written twice")
        seen.add(spec.detector_file)


def _check_md(md: Mapping[str, Any] | None) -> dict[str, Any]:
    md = dict(md or {})
    clash = sorted(RESERVED_MD_KEYS & md.keys())
    if clash:
        raise MetadataError(
            f"md may not set {clash}: the plan owns these start-document keys; pass them as "
            "plan arguments"
        )
    return md


def _check_mode(devices: Any, mode: str) -> None:
    if mode not in ("fly", "step"):
        raise MetadataError(f"mode must be 'fly' or 'step', got {mode!r}")
    if mode == "fly" and not _is_async(devices.detector):
        raise MetadataError(
            f"detector {devices.detector.name!r} is an ophyd v1 device and cannot fly; "
            "use step_rotation_scan (mode='step')"
        )


# ---------------------------------------------------------------------- metadata
def _geometry_dict(spec: RotationSpec) -> dict[str, Any]:
    g = spec.geometry
    out: dict[str, Any] = {}
    for key in RUN_GEOMETRY_KEYS:
        value = getattr(g, key)
        out[key] = [int(v) for v in value] if key == "shape" else value
    out["phi_end"] = spec.phi_end
    return out


def start_metadata(
    devices: Any,
    spec: RotationSpec,
    *,
    plan_name: str,
    plan_args: Mapping[str, Any],
    frame_time: float,
    md: Mapping[str, Any] | None = None,
    rotation: tuple[int, int] = (1, 1),
) -> dict[str, Any]:
    """The start document of one rotation (see ``docs/documents.md``).

    Parameters
    ----------
    devices : SimBeamlineDevices
        Detector, goniometer and monitors.
    spec : RotationSpec
        The validated rotation.
    plan_name : str
        ``rotation_scan``, ``step_rotation_scan``, ``multi_rotation_scan`` or
        ``temperature_series``.
    plan_args : mapping
        The plan's arguments (JSON-friendly).
    frame_time : float
        Frame period (s).
    md : mapping, optional
        Extra user metadata (may not set the plan's own keys).
    rotation : tuple of int
        ``(index, total)``: this rotation's position (1-based) in its scan, so
        post-scan callbacks know when the last rotation of a scan has finished.
    """
    det = devices.detector
    phi = devices.goniometer.phi
    monitors = [m.name for m in getattr(devices, "monitors", [])]
    out: dict[str, Any] = dict(md or {})
    out.update(
        {
            "plan_name": plan_name,
            "plan_args": dict(plan_args),
            "detectors": [det.name],
            "motors": [phi.name],
            "num_points": spec.n_frames,
            "num_intervals": spec.n_frames - 1,
            "hints": {"dimensions": [([phi.name], "primary")]},
            "sample": spec.sample,
            "label": spec.label,
            "scan": spec.scan,
            "entry": spec.entry,
            "nxrefine": {
                "experiment_dir": str(spec.experiment_dir),
                "beamline": spec.beamline,
                "configuration": spec.configuration,
                "temperature_units": "K",
                "detector": {
                    "name": det.detector_model.name,
                    "data_key": det.name,
                    "frame_time": float(frame_time),
                },
                "monitors": monitors,
                "geometry": _geometry_dict(spec),
                "translation": {"x": spec.translation[0], "y": spec.translation[1]},
                "n_frames": spec.n_frames,
                "rotation_index": int(rotation[0]),
                "rotations": int(rotation[1]),
            },
        }
    )
    if spec.temperature is not None:
        out["temperature"] = spec.temperature
    return out


# ---------------------------------------------------------------------- plan pieces
def _connect(devices: Any) -> MsgGenerator[None]:
    async_devices = [d for d in _all_devices(devices) if _is_async(d)]
    if async_devices:
        yield from ensure_connected(*async_devices)


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


def _frame_time(devices: Any, frame_time: float | None) -> MsgGenerator[float]:
    if frame_time is None:
        value = yield from bps.rd(devices.detector.frame_time)
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
        gonio.theta,
        spec.theta,
    ]
    stage = getattr(devices, "detector_stage", None)
    if stage is not None:
        moves += [stage.x, spec.translation[0], stage.y, spec.translation[1]]
    yield from bps.mv(*moves)
    spec.scan_dir.mkdir(parents=True, exist_ok=True)
    det = devices.detector
    yield from bps.mv(
        det.file_path,
        str(spec.scan_dir),
        det.file_name,
        spec.entry,
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
    readables = [det, *getattr(devices, "monitors", []), phi]
    if _is_async(det):
        yield from bps.prepare(det, TriggerInfo(number_of_events=1, livetime=frame_time), wait=True)
    for i in range(spec.n_frames):
        yield from bps.mv(phi, spec.phi_start + i * spec.phi_step)
        yield from bps.trigger_and_read(readables)


def _one_rotation(
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
    if mode == "fly" and hasattr(phi, "velocity"):
        velocity = yield from bps.rd(phi.velocity)

        def restore() -> MsgGenerator[None]:
            yield from bps.mv(phi.velocity, velocity)

        plan = bpp.finalize_wrapper(plan, restore())
    uid = yield from plan
    logger.info("%s: %s %s written to %s", plan_name, spec.sample, spec.entry, spec.detector_file)
    return uid


def _plan_args(**kwargs: Any) -> dict[str, Any]:
    def clean(value: Any) -> Any:
        if isinstance(value, (str, int, float, bool)) or value is None:
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, Mapping):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return repr(value)

    return {k: clean(v) for k, v in kwargs.items()}


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
    md: Mapping[str, Any] | None = None,
) -> MsgGenerator[str]:
    """One continuous (fly) rotation: one run, no events, frames as StreamResource/Datum.

    Parameters
    ----------
    devices : SimBeamlineDevices
        From :func:`~nxrefine_bs.devices.make_sim_beamline` (ophyd-async).
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
        Frame period (s); default: the detector's ``frame_time``.
    baseline : bool
        Record goniometer, detector stage and temperature in a ``baseline`` stream
        (turn off if the RunEngine's ``SupplementalData`` already does).
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
    md: Mapping[str, Any] | None = None,
) -> MsgGenerator[str]:
    """One step rotation: move phi, trigger and read, one ``primary`` event per frame.

    Works with the ophyd-async detector (frames as StreamResource/StreamDatum) and the
    ophyd v1 detector (Resource/Datum).  Parameters as for :func:`rotation_scan`.
    """
    return (yield from _single_rotation("step", "step_rotation_scan", dict(locals())))


def _single_rotation(mode: str, plan_name: str, params: dict[str, Any]) -> MsgGenerator[str]:
    """Validate one rotation's arguments (before anything moves), then run it."""
    devices = params.pop("devices")
    md = params.pop("md")
    args = _plan_args(**params)
    frame_time = params.pop("frame_time")
    baseline = params.pop("baseline")
    spec = prepare_rotation(devices, **params)
    _check_mode(devices, mode)
    user_md = _check_md(md)
    yield from _connect(devices)
    dt = yield from _frame_time(devices, frame_time)
    return (
        yield from _one_rotation(
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


def _rotation_specs(
    devices: Any,
    rotations: Sequence[Mapping[str, Any]] | None,
    *,
    first_entry: int,
    common: Mapping[str, Any],
) -> list[RotationSpec]:
    rotations = list(rotations) if rotations is not None else [{}]
    if not rotations:
        raise MetadataError("rotations is empty; give at least one rotation ({} for defaults)")
    if isinstance(first_entry, bool) or not isinstance(first_entry, int) or first_entry < 1:
        raise MetadataError(f"first_entry must be an integer >= 1, got {first_entry!r}")
    specs = []
    for k, rotation in enumerate(rotations):
        if not isinstance(rotation, Mapping):
            raise MetadataError(f"rotation {k} must be a dictionary, got {rotation!r}")
        unknown = sorted(set(rotation) - ROTATION_KEYS)
        if unknown:
            raise MetadataError(
                f"rotation {k} has unknown keys {unknown}; use {sorted(ROTATION_KEYS)}"
            )
        kwargs = dict(common)
        kwargs.update({key: v for key, v in rotation.items() if key != "translation"})
        if "translation" in rotation:
            kwargs["detector_translation"] = rotation["translation"]
        kwargs.setdefault("entry", f"f{first_entry + k}")
        specs.append(prepare_rotation(devices, **kwargs))
    _check_unique(specs)
    return specs


def _run_rotations(
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
        uid = yield from _one_rotation(
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
    args = _plan_args(**{k: v for k, v in locals().items() if k not in ("devices", "md")})
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
    specs = _rotation_specs(devices, rotations, first_entry=first_entry, common=common)
    _check_mode(devices, mode)
    user_md = _check_md(md)
    yield from _connect(devices)
    dt = yield from _frame_time(devices, frame_time)
    return (
        yield from _run_rotations(
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
    args = _plan_args(**{k: v for k, v in locals().items() if k not in ("devices", "md")})
    if getattr(devices, "temperature", None) is None:
        raise MetadataError("devices has no temperature controller for a temperature series")
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
        series.append((t, _rotation_specs(devices, rotations, first_entry=1, common=common)))
    _check_mode(devices, mode)
    user_md = _check_md(md)
    yield from _connect(devices)
    dt = yield from _frame_time(devices, frame_time)
    uids: list[str] = []
    for t, specs in series:
        logger.info("temperature series: setting %s K", t)
        yield from bps.mv(devices.temperature, t)
        if settle > 0:
            yield from bps.sleep(settle)
        uids += yield from _run_rotations(
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
