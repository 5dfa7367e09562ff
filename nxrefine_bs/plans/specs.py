"""Rotation specifications and start-document metadata of the rotation plans.

:func:`prepare_rotation` validates everything about one rotation into a
:class:`RotationSpec` before anything moves; :func:`start_metadata` builds its start
document (see ``docs/documents.md``).  The devices are any
:class:`~nxrefine_bs.devices.protocols.RotationBeamline`: the geometry and detector
model come from the beamline bundle, never from probing the detector.

Examples
--------
>>> from nxrefine_bs.plans.specs import frame_count
>>> frame_count(-5.0, 360.0, 0.1)
3650
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from ..devices.protocols import FlyingAxis, FlyingDetector, RotationDetector
from ..documents import GeometryMetadata, NXRefineMetadata
from ..errors import InvalidNameError, MetadataError, PathSafetyError
from ..experiment import safe_join, validate_name
from ..geometry import RUN_GEOMETRY_KEYS, Geometry
from ..nexus.entries import ROTATION_ENTRY_PATTERN, is_rotation_entry_name

logger = logging.getLogger(__name__)

__all__ = [
    "ENTRY_PATTERN",
    "RESERVED_MD_KEYS",
    "ROTATION_KEYS",
    "RotationSpec",
    "frame_count",
    "plan_args",
    "prepare_rotation",
    "rotation_specs",
    "start_metadata",
]

ENTRY_PATTERN = ROTATION_ENTRY_PATTERN
"""Rotation entries are ``f1``, ``f2``... (the one rule: :mod:`nxrefine_bs.nexus.entries`)."""

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


def _geometry_of(devices: Any) -> Geometry:
    """The configured geometry of the beamline bundle (``devices.geometry``)."""
    geom = getattr(devices, "geometry", None)
    det = getattr(devices, "detector", None)
    if det is None:
        raise MetadataError(
            "devices has no detector; build them with make_sim_beamline() or make_epics_beamline()"
        )
    if not isinstance(geom, Geometry):
        raise MetadataError(
            f"devices {type(devices).__name__} has no configured geometry; the rotation plans "
            "need a RotationBeamline (make_sim_beamline(), make_epics_beamline())"
        )
    if not isinstance(det, (RotationDetector, FlyingDetector)):
        raise MetadataError(
            f"detector {getattr(det, 'name', det)!r} is not a rotation detector: it must be "
            "preparable and stageable, and flyable/collectable (fly) or triggerable/readable "
            "(step)"
        )
    return geom


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
    recollect: bool = False,
) -> RotationSpec:
    """Validate the arguments of one rotation; nothing is moved or written.

    ``chi``, ``omega`` and ``theta`` default to the detector's configured geometry.
    With ``recollect``, an entry whose detector file exists is collected again into a
    new file ``<entry>_<k>.h5`` (raw data are never overwritten).

    Raises
    ------
    MetadataError
        Unsafe names, an entry that is not ``fN``, a non-positive step, an empty phi
        range, a missing experiment directory or configuration, or an existing
        detector file.
    """
    geom = _geometry_of(devices)
    sample = _name(sample, "sample")
    label = _name(label, "label")
    scan = _name(scan, "scan")
    beamline = _name(beamline, "beamline")
    if not is_rotation_entry_name(entry):
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
    if detector_file.exists() and recollect:
        attempt = 2
        while (scan_dir / f"{entry}_{attempt}.h5").exists():
            attempt += 1
        detector_file = scan_dir / f"{entry}_{attempt}.h5"
    elif detector_file.exists():
        raise MetadataError(
            f"detector file {detector_file} exists; raw data are never overwritten - use a "
            "new scan name or entry, or recollect=True to collect this entry again into a "
            "new detector file"
        )
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
    det, phi = devices.detector, devices.goniometer.phi
    if mode == "fly" and not isinstance(det, FlyingDetector):
        raise MetadataError(
            f"detector {det.name!r} cannot fly (it is not preparable, flyable and "
            "collectable, e.g. an ophyd v1 device); use step_rotation_scan (mode='step')"
        )
    if mode == "fly" and not isinstance(phi, FlyingAxis):
        raise MetadataError(
            f"phi axis {phi.name!r} cannot fly (no prepare(FlyMotorInfo)/kickoff/complete); "
            "use step_rotation_scan (mode='step')"
        )
    if mode == "step" and not isinstance(det, RotationDetector):
        raise MetadataError(f"detector {det.name!r} cannot be triggered and read for step scans")


# ---------------------------------------------------------------------- metadata
def _geometry_dict(spec: RotationSpec) -> GeometryMetadata:
    g = spec.geometry
    out: dict[str, Any] = {}
    for key in RUN_GEOMETRY_KEYS:
        value = getattr(g, key)
        out[key] = [int(v) for v in value] if key == "shape" else value
    out["phi_end"] = spec.phi_end
    return cast(GeometryMetadata, out)  # keys checked by test_documents


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
    devices : RotationBeamline
        Detector, goniometer, monitors, geometry and detector model.
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
    monitors = [m.name for m in devices.monitors]
    nxrefine: NXRefineMetadata = {
        "experiment_dir": str(spec.experiment_dir),
        "beamline": spec.beamline,
        "configuration": spec.configuration,
        "temperature_units": "K",
        "detector": {
            "name": devices.detector_model.name,
            "data_key": det.name,
            "frame_time": float(frame_time),
        },
        "monitors": monitors,
        "geometry": _geometry_dict(spec),
        "translation": {"x": spec.translation[0], "y": spec.translation[1]},
        "n_frames": spec.n_frames,
        "rotation_index": int(rotation[0]),
        "rotations": int(rotation[1]),
    }
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
            "nxrefine": nxrefine,
        }
    )
    if spec.temperature is not None:
        out["temperature"] = spec.temperature
    return out


def plan_args(**kwargs: Any) -> dict[str, Any]:
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


def rotation_specs(
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
