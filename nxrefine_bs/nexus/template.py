"""Configuration templates ``configurations/<name>.nxs`` built from pyFAI detectors.

A template describes the instrument of an experiment: wavelength, detector (shape,
pixel size, gap mask), its distance and orientation, and one rotation entry
``f1...fN`` per detector/goniometer position.  New scan files copy it
(:func:`nxrefine_bs.nexus.scanfile.create_scan_file`).

Layout::

    /entry  (NXentry)
        instrument (NXinstrument): name, source, monochromator, goniometer, detector
    /f1 ... /fN  (NXentry)
        instrument (NXinstrument)
            monochromator: wavelength (float32, Angstrom), energy (keV)
            detector: description, distance, detector_orientation, pixel_size,
                      pixel_mask (int8, 1 = masked), pixel_mask_applied, shape, yaw,
                      pitch, roll, beam_center_x, beam_center_y, translation_x,
                      translation_y, frame_time
            goniometer: phi (start; attributes step, end), chi, omega, theta
        data (NXdata): data -> ExternalLink("fN.h5", "/entry/data/data"), x_pixel,
                       y_pixel, frame_number
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .. import __version__
from ..errors import FileExistsNXError, TemplateError
from ..geometry import HC_KEV_ANGSTROM, GeometryError, orientation_matrix
from ..settings import get_spec
from .entries import rotation_entries
from .geometry_io import read_geometry, write_pyfai_parameters

__all__ = [
    "DEFAULT_DETECTOR",
    "DATA_PATH",
    "Position",
    "DetectorInfo",
    "ConfigurationInfo",
    "detector_info",
    "frame_count",
    "create_configuration",
    "read_configuration",
]

logger = logging.getLogger(__name__)

DEFAULT_DETECTOR = "Pilatus CdTe 2M"
DATA_PATH = "/entry/data/data"
"""Path of the frame stack inside each ``fN.h5``."""


@dataclass(frozen=True)
class Position:
    """One goniometer/detector position (one rotation entry ``fN``).

    Parameters
    ----------
    chi, omega, theta : float
        Goniometer angles (deg).
    x, y : float
        Detector translations (mm; bookkeeping only).
    """

    chi: float = 0.0
    omega: float = 0.0
    theta: float = 0.0
    x: float = 0.0
    y: float = 0.0


@dataclass(frozen=True)
class DetectorInfo:
    """What a configuration needs from a pyFAI detector.

    Parameters
    ----------
    name : str
        pyFAI's name of the detector.
    shape : tuple of int
        ``(ny, nx)``.
    pixel_size : float
        Vertical pixel size (mm).
    x_pixel_size, y_pixel_size : float
        Horizontal and vertical pixel sizes (mm).
    mask : numpy.ndarray
        int8 ``(ny, nx)``, 1 = masked (module gaps).
    """

    name: str
    shape: tuple[int, int]
    pixel_size: float
    x_pixel_size: float
    y_pixel_size: float
    mask: np.ndarray


@dataclass(frozen=True)
class ConfigurationInfo:
    """Summary of a configuration file, as read by :func:`read_configuration`."""

    path: Path
    entries: tuple[str, ...]
    detector: str
    shape: tuple[int, int]
    pixel_size: float
    wavelength: float
    distance: float
    detector_orientation: str
    phi_start: float
    phi_step: float
    phi_end: float
    frame_time: float
    nframes: int
    beam_center_x: float
    beam_center_y: float
    positions: tuple[Position, ...]


def _known_detector_names() -> dict[str, str]:
    """Map of pyFAI registry keys and aliases (lower case) to a display name."""
    from pyFAI.detectors import ALL_DETECTORS  # heavy: pyFAI, only to look a detector up

    names: dict[str, str] = {}
    for key, cls in ALL_DETECTORS.items():
        aliases = [a for a in getattr(cls, "aliases", ()) if a] or [key]
        display = aliases[0]
        names[key.lower()] = display
        for alias in aliases:
            names[alias.lower()] = display
    return names


def detector_info(name: str) -> DetectorInfo:
    """Look up a detector by any pyFAI name (``'Pilatus CdTe 2M'``, ``'pilatus100k'``...).

    Raises
    ------
    TemplateError
        If pyFAI does not know the detector (the message lists close matches) or it
        has no fixed shape or pixel size.

    Examples
    --------
    >>> info = detector_info("Pilatus 100k")
    >>> info.shape, round(info.pixel_size, 3)
    ((195, 487), 0.172)
    """
    from pyFAI.detectors import ALL_DETECTORS, detector_factory  # heavy: pyFAI

    text = str(name).strip()
    if not text or os.sep in text or text.endswith((".h5", ".nxs", ".json")):
        raise TemplateError(f"detector {name!r} must be a pyFAI detector name, not a file")
    query = text.lower()
    if query not in ALL_DETECTORS and query.replace(" ", "_") not in ALL_DETECTORS:
        known = _known_detector_names()
        keys = difflib.get_close_matches(query, list(known), n=8, cutoff=0.6)
        suggestions: list[str] = []
        for key in keys:
            if known[key] not in suggestions:
                suggestions.append(known[key])
        hint = (
            f"; close matches: {', '.join(suggestions)}"
            if suggestions
            else "; see pyFAI.detectors.ALL_DETECTORS for the names"
        )
        raise TemplateError(f"unknown detector {name!r}{hint}")
    try:
        det = detector_factory(text)
    except Exception as exc:  # pyFAI raises RuntimeError and others
        raise TemplateError(f"pyFAI cannot create detector {name!r}: {exc}") from exc
    shape = det.shape or getattr(det, "max_shape", None)
    if shape is None or det.pixel1 is None or det.pixel2 is None:
        raise TemplateError(f"detector {name!r} has no fixed shape and pixel size")
    ny, nx = (int(n) for n in shape)
    mask = det.mask
    mask = np.zeros((ny, nx), dtype=np.int8) if mask is None else (np.asarray(mask) != 0)
    return DetectorInfo(
        name=det.name,
        shape=(ny, nx),
        pixel_size=float(det.pixel1) * 1000.0,
        x_pixel_size=float(det.pixel2) * 1000.0,
        y_pixel_size=float(det.pixel1) * 1000.0,
        mask=mask.astype(np.int8),
    )


def frame_count(phi_start: float, phi_end: float, phi_step: float) -> int:
    """Number of frames of a rotation, ``round((phi_end - phi_start) / phi_step)``.

    Examples
    --------
    >>> frame_count(-5.0, 360.0, 0.1)
    3650
    """
    if not phi_step > 0:
        raise TemplateError(f"phi step must be positive, got {phi_step!r}")
    n = round((phi_end - phi_start) / phi_step)
    if n < 1:
        raise TemplateError(
            f"phi range {phi_start} -> {phi_end} step {phi_step} holds no frame; "
            "phi end must exceed phi start"
        )
    return int(n)


def _default(key: str) -> Any:
    return get_spec("nxrefine", key).default


def _set_class(group: h5py.Group, nx_class: str) -> h5py.Group:
    group.attrs["NX_class"] = nx_class
    return group


def _field(
    group: h5py.Group, name: str, value: Any, units: str | None = None, **kw: Any
) -> h5py.Dataset:
    dset = group.create_dataset(name, data=value, **kw)
    if units is not None:
        dset.attrs["units"] = units
    return dset


def _write_instrument(
    parent: h5py.Group,
    *,
    info: DetectorInfo,
    wavelength: float,
    distance: float,
    orientation: str,
    beam_center_x: float,
    beam_center_y: float,
    instrument_name: str,
    facility: str,
) -> h5py.Group:
    inst = _set_class(parent.create_group("instrument"), "NXinstrument")
    inst.create_dataset("name", data=instrument_name)
    source = _set_class(inst.create_group("source"), "NXsource")
    source.create_dataset("name", data=facility)
    source.create_dataset("type", data="Synchrotron X-ray Source")
    source.create_dataset("probe", data="x-ray")
    mono = _set_class(inst.create_group("monochromator"), "NXmonochromator")
    _field(mono, "wavelength", np.float32(wavelength), "Angstrom")
    _field(mono, "energy", np.float32(HC_KEV_ANGSTROM / wavelength), "keV")
    _set_class(inst.create_group("goniometer"), "NXgoniometer")
    det = _set_class(inst.create_group("detector"), "NXdetector")
    det.create_dataset("description", data=info.name)
    _field(det, "distance", np.float64(distance), "mm")
    det.create_dataset("detector_orientation", data=orientation)
    _field(det, "pixel_size", np.float64(info.pixel_size), "mm")
    _field(det, "x_pixel_size", np.float64(info.x_pixel_size), "mm")
    _field(det, "y_pixel_size", np.float64(info.y_pixel_size), "mm")
    det.create_dataset(
        "pixel_mask", data=info.mask, compression="gzip", compression_opts=4, chunks=True
    )
    det.create_dataset("pixel_mask_applied", data=False)
    det.create_dataset("shape", data=np.asarray(info.shape, dtype=np.int32))
    for angle in ("yaw", "pitch", "roll"):
        _field(det, angle, np.float64(0.0), "degree")
    _field(det, "beam_center_x", np.float64(beam_center_x), "pixel")
    _field(det, "beam_center_y", np.float64(beam_center_y), "pixel")
    return inst


def create_configuration(
    path: str | os.PathLike[str],
    *,
    detector: str = DEFAULT_DETECTOR,
    wavelength: float | None = None,
    distance: float | None = None,
    detector_orientation: str | None = None,
    phi_start: float | None = None,
    phi_step: float | None = None,
    phi_end: float | None = None,
    frame_rate: float | None = None,
    positions: Sequence[Position] | None = None,
    beam_center_x: float | None = None,
    beam_center_y: float | None = None,
    overwrite: bool = False,
    instrument_name: str = "",
    facility: str = "",
    data_filename: str = "{entry}.h5",
    data_path: str = DATA_PATH,
) -> Path:
    """Write a configuration template.

    Values left as None take the ``[nxrefine]`` schema defaults (wavelength 0.2 A,
    distance 500 mm, orientation ``-y +z -x``, phi -5 -> 360 step 0.1, 10 Hz).

    Parameters
    ----------
    path : path-like
        The ``.nxs`` file to write.
    detector : str
        Any pyFAI detector name.
    wavelength : float, optional
        Angstrom.
    distance : float, optional
        Sample-detector distance (mm).
    detector_orientation : str, optional
        Signed lab axes of detector x, y and normal.
    phi_start, phi_step, phi_end : float, optional
        Rotation range (deg).
    frame_rate : float, optional
        Frames per second; ``frame_time = 1 / frame_rate`` (0.1 s if 0).
    positions : sequence of Position, optional
        One per rotation entry ``f1...fN`` (default: one at zero angles).
    beam_center_x, beam_center_y : float, optional
        Beam centre (pixels); default the detector centre.
    overwrite : bool
        Replace an existing file.
    instrument_name, facility : str
        Recorded in ``instrument/name`` and ``instrument/source/name``.
    data_filename, data_path : str
        External-link target of each ``fN/data/data``; ``{entry}`` and ``{n}`` are
        replaced by the entry name and its number.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    TemplateError
        On an unknown detector or an invalid value.
    FileExistsNXError
        If ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsNXError(
            f"configuration {path} already exists; choose another name or overwrite it"
        )
    info = detector_info(detector)
    ny, nx = info.shape
    wavelength = float(_default("wavelength") if wavelength is None else wavelength)
    distance = float(_default("distance") if distance is None else distance)
    orientation = str(
        _default("detector_orientation") if detector_orientation is None else detector_orientation
    )
    phi_start = float(_default("phi") if phi_start is None else phi_start)
    phi_step = float(_default("phi_step") if phi_step is None else phi_step)
    phi_end = float(_default("phi_end") if phi_end is None else phi_end)
    frame_rate = float(_default("frame_rate") if frame_rate is None else frame_rate)
    if not wavelength > 0:
        raise TemplateError(f"wavelength must be positive, got {wavelength}")
    if not distance > 0:
        raise TemplateError(f"distance must be positive, got {distance}")
    if frame_rate < 0:
        raise TemplateError(f"frame rate must not be negative, got {frame_rate}")
    try:
        orientation_matrix(orientation)
    except GeometryError as exc:
        raise TemplateError(str(exc)) from None
    nframes = frame_count(phi_start, phi_end, phi_step)
    frame_time = 1.0 / frame_rate if frame_rate > 0 else 0.1
    positions = tuple(positions) if positions is not None else (Position(),)
    if not positions:
        raise TemplateError("a configuration needs at least one position")
    xc = float(nx / 2 if beam_center_x is None else beam_center_x)
    yc = float(ny / 2 if beam_center_y is None else beam_center_y)

    common: dict[str, Any] = {
        "info": info,
        "wavelength": wavelength,
        "distance": distance,
        "orientation": orientation,
        "beam_center_x": xc,
        "beam_center_y": yc,
        "instrument_name": instrument_name,
        "facility": facility,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            _root_attrs(f, path.name)
            entry = _set_class(f.create_group("entry"), "NXentry")
            _write_instrument(entry, **common)
            for n, pos in enumerate(positions, start=1):
                name = f"f{n}"
                fe = _set_class(f.create_group(name), "NXentry")
                inst = _write_instrument(fe, **common)
                det = inst["detector"]
                _field(det, "translation_x", np.float64(pos.x), "mm")
                _field(det, "translation_y", np.float64(pos.y), "mm")
                _field(det, "frame_time", np.float64(frame_time), "s")
                gon = inst["goniometer"]
                phi = _field(gon, "phi", np.float64(phi_start), "degree")
                phi.attrs["step"] = np.float64(phi_step)
                phi.attrs["end"] = np.float64(phi_end)
                _field(gon, "chi", np.float64(pos.chi), "degree")
                _field(gon, "omega", np.float64(pos.omega), "degree")
                _field(gon, "theta", np.float64(pos.theta), "degree")
                data = _set_class(fe.create_group("data"), "NXdata")
                data.attrs["signal"] = "data"
                data.attrs["axes"] = np.array(
                    ["frame_number", "y_pixel", "x_pixel"], dtype=h5py.string_dtype()
                )
                target = data_filename.format(entry=name, n=n)
                data["data"] = h5py.ExternalLink(target, data_path)
                _field(data, "x_pixel", np.arange(nx, dtype=np.float64), "pixel")
                _field(data, "y_pixel", np.arange(ny, dtype=np.float64), "pixel")
                data.create_dataset("frame_number", data=np.arange(nframes, dtype=np.int32))
                # NXRefine's radial sum needs pyFAI parameters; until a powder
                # calibration replaces them they follow the configured geometry
                write_pyfai_parameters(fe, read_geometry(fe), detector=info.name)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.info("wrote configuration %s (%s, %d positions)", path, info.name, len(positions))
    return path


def _root_attrs(f: h5py.File, name: str) -> None:
    f.attrs["NX_class"] = "NXroot"
    f.attrs["file_name"] = name
    f.attrs["file_time"] = datetime.now().astimezone().isoformat()
    f.attrs["creator"] = f"nxrefine-bs {__version__}"
    f.attrs["HDF5_Version"] = h5py.version.hdf5_version
    f.attrs["h5py_version"] = h5py.version.version
    f.attrs["default"] = "entry"


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return " ".join(_text(v) for v in value.ravel())
    return str(value)


def read_configuration(path: str | os.PathLike[str]) -> ConfigurationInfo:
    """Read and validate a configuration template.

    Returns
    -------
    ConfigurationInfo
        Detector, wavelength, distance, rotation range and positions (from ``f1``
        for the shared values).

    Raises
    ------
    TemplateError
        If the file is missing, unreadable or not a configuration (the message names
        the file and the missing item).
    """
    path = Path(path)
    if not path.is_file():
        raise TemplateError(f"configuration file {path} does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise TemplateError(f"configuration file {path} is not a readable HDF5/NeXus file") from exc
    try:
        with f:
            return _read_configuration(f, path)
    except TemplateError:
        raise
    except (KeyError, ValueError, TypeError, IndexError, OSError, RuntimeError) as exc:
        raise TemplateError(f"{path}: malformed configuration ({exc})") from exc


def _read_configuration(f: h5py.File, path: Path) -> ConfigurationInfo:
    entries = rotation_entries(f)
    if "entry" not in f or not entries:
        raise TemplateError(
            f"{path} is not a configuration: it needs /entry and rotation entries /f1..."
        )
    positions = []
    for name in entries:
        for item in (
            "instrument/detector/distance",
            "instrument/detector/pixel_mask",
            "instrument/monochromator/wavelength",
            "instrument/goniometer/phi",
            "data/frame_number",
        ):
            if f"{name}/{item}" not in f:
                raise TemplateError(f"{path}: /{name}/{item} is missing")
        if f[f"{name}/data"].get("data", getlink=True) is None:
            raise TemplateError(f"{path}: /{name}/data/data is missing")
        gon = f[f"{name}/instrument/goniometer"]
        det = f[f"{name}/instrument/detector"]
        positions.append(
            Position(
                chi=_float(gon, "chi"),
                omega=_float(gon, "omega"),
                theta=_float(gon, "theta"),
                x=_float(det, "translation_x"),
                y=_float(det, "translation_y"),
            )
        )
    first = f[entries[0]]
    det = first["instrument/detector"]
    phi = first["instrument/goniometer/phi"]
    mask_shape = tuple(det["pixel_mask"].shape)
    shape = tuple(int(n) for n in det["shape"][()]) if "shape" in det else mask_shape
    if len(shape) != 2 or shape != mask_shape:
        raise TemplateError(
            f"{path}: pixel_mask shape {mask_shape} differs from detector shape {shape}"
        )
    phi_values = np.atleast_1d(phi[()]).astype(float)
    phi_start = float(phi_values[0])
    if phi_values.size > 1:
        phi_step = float(phi_values[1] - phi_values[0])
        phi_end = float(phi_values[-1] + phi_step)
    else:
        phi_step = float(phi.attrs.get("step", _default("phi_step")))
        phi_end = float(phi.attrs.get("end", _default("phi_end")))
    info = ConfigurationInfo(
        path=path,
        entries=tuple(entries),
        detector=_text(det["description"][()]) if "description" in det else "",
        shape=(int(shape[0]), int(shape[1])),
        pixel_size=_float(det, "pixel_size", float("nan")),
        wavelength=float(str(first["instrument/monochromator/wavelength"][()])),
        distance=float(det["distance"][()]),
        detector_orientation=(
            _text(det["detector_orientation"][()])
            if "detector_orientation" in det
            else _default("detector_orientation")
        ),
        phi_start=phi_start,
        phi_step=phi_step,
        phi_end=phi_end,
        frame_time=_float(det, "frame_time", 0.1),
        nframes=int(first["data/frame_number"].shape[0]),
        beam_center_x=_float(det, "beam_center_x"),
        beam_center_y=_float(det, "beam_center_y"),
        positions=tuple(positions),
    )
    return info


def _float(group: h5py.Group, name: str, default: float = 0.0) -> float:
    return float(group[name][()]) if name in group else default
