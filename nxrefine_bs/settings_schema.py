"""The settings schema: every setting's section, key, type, default and meaning.

:data:`SCHEMA` drives parsing, defaults, validation and writing of the INI files read
and written by :mod:`nxrefine_bs.settings` (which re-exports everything here).  Adding a
setting is one line in :data:`SCHEMA`.

Examples
--------
>>> spec = get_spec("nxreduce", "mask_h1")
>>> spec.parse("51")
51
>>> format_value(True)
'True'
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .errors import SettingsError
from .geometry import GeometryError, orientation_matrix

__all__ = [
    "SCHEMA",
    "SECTIONS",
    "SERVER_SECTIONS",
    "EXPERIMENT_SECTIONS",
    "REDUCE_KEYS",
    "FILE_ONLY_PARAMETERS",
    "SettingSpec",
    "get_spec",
    "default_settings",
    "format_value",
    "NXREFINE_SERVER_TYPES",
    "parse_bool",
    "parse_float",
    "parse_int",
]

_TRUE = {"true", "yes", "y", "on", "1"}
_FALSE = {"false", "no", "n", "off", "0"}
_NONE = {"", "none"}


def _check_orientation(value: Any) -> None:
    try:
        orientation_matrix(value)
    except GeometryError as exc:
        raise ValueError(str(exc)) from None


def _check_positive(value: Any) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"must be positive, got {value!r}")


def _check_non_negative(value: Any) -> None:
    if value is not None and value < 0:
        raise ValueError(f"must not be negative, got {value!r}")


@dataclass(frozen=True)
class SettingSpec:
    """One setting: where it lives, its type, default and meaning.

    Parameters
    ----------
    section : str
        INI section (``server``, ``instrument``, ``nxrefine`` or ``nxreduce``).
    key : str
        Option name (case preserved).
    type : type
        ``str``, ``int``, ``float`` or ``bool``.
    default : Any
        Value used when no file sets it.
    doc : str
        One-line meaning, written as a comment into new settings files.
    optional : bool
        True if the value may be empty (read as None).
    check : callable or None
        Extra validation; raises ValueError with a short reason.
    """

    section: str
    key: str
    type: type
    default: Any
    doc: str
    optional: bool = False
    check: Callable[[Any], None] | None = None

    @property
    def type_name(self) -> str:
        """Human-readable expected type, e.g. ``'float'`` or ``'str or empty'``."""
        name = self.type.__name__
        return f"{name} or empty" if self.optional else name

    def parse(self, value: Any) -> Any:
        """Convert text (or a Python value) to this setting's type.

        Raises
        ------
        ValueError
            If the value cannot be converted or fails the extra check.
        """
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            if self.optional:
                return None
            if self.type is str and value is not None:
                return ""
            raise ValueError("a value is required")
        if isinstance(value, bytes):
            value = value.decode()
        if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy scalar
            value = value.item()
        out: Any
        if self.type is bool:
            out = parse_bool(value)
        elif self.type is int:
            out = parse_int(value)
        elif self.type is float:
            out = parse_float(value)
        else:
            if not isinstance(value, str):
                raise ValueError(f"expected text, got {value!r}")
            out = value.strip()
        if self.check is not None:
            self.check(out)
        return out


def _check_pv_prefix(value: Any) -> None:
    if not value or any(c.isspace() or c in "\"'$" for c in str(value)):
        raise ValueError("a PV prefix is one word without quotes or $, e.g. BL7:GON:PHI")


def _check_detector_driver(value: Any) -> None:
    if value not in ("sim", "pilatus"):
        raise ValueError("sim (ADSimDetector) or pilatus (ADPilatus)")


def parse_bool(value: Any) -> bool:
    """``true/yes/y/on/1`` or ``false/no/n/off/0`` (any case), a bool, or 0/1."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise ValueError(f"expected true/false, got {value!r}")


def parse_float(value: Any) -> float:
    """A finite float from a number, numpy scalar or text (not a bool)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        value = value.item()
    try:
        out = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"expected a finite number, got {value!r}")
    return out


def parse_int(value: Any) -> int:
    """A whole number (``2``, ``2.0``, ``"2"``) as an int."""
    out = parse_float(value)
    if not out.is_integer():
        raise ValueError(f"expected a whole number, got {value!r}")
    return int(out)


def _s(section: str, key: str, type_: type, default: Any, doc: str, **kw: Any) -> SettingSpec:
    return SettingSpec(section, key, type_, default, doc, **kw)


SCHEMA: tuple[SettingSpec, ...] = (
    # server: how reduction work is executed (server file only)
    _s("server", "type", str, "local", "executor: 'local' (threads) or 'dask'"),
    _s("server", "cores", int, 2, "simultaneous reduction jobs", check=_check_positive),
    _s("server", "dask_scheduler", str, "", "Dask scheduler address (type = dask)"),
    _s(
        "server",
        "database",
        str,
        "",
        "workflow database URL shared by every experiment, e.g. "
        "postgresql://nxrefine@dbhost/nxrefine (empty: <experiment>/tasks/workflow.db)",
    ),
    _s(
        "server",
        "lease",
        float,
        300.0,
        "seconds a running reduction task stays owned without a heartbeat",
        check=_check_positive,
    ),
    _s("server", "tiled_uri", str, "", "Tiled server URI for registering results"),
    # instrument: where data live
    _s("instrument", "source", str, None, "facility, e.g. CHESS", optional=True),
    _s("instrument", "instrument", str, None, "beamline name, e.g. QM2 or sim", optional=True),
    _s("instrument", "raw_home", str, None, "root of the raw-data tree", optional=True),
    _s("instrument", "raw_path", str, None, "raw sub-path inside an experiment", optional=True),
    _s("instrument", "analysis_home", str, None, "root of the analysis tree", optional=True),
    _s("instrument", "analysis_path", str, None, "analysis sub-path, e.g. nxrefine", optional=True),
    _s("instrument", "experiment", str, None, "experiment name", optional=True),
    # instrument: EPICS PV prefixes of the devices (profile_epics); empty: pv_prefix + default
    _s("instrument", "pv_prefix", str, None, "beamline PV prefix (empty: SIM:)", optional=True,
       check=_check_pv_prefix),  # fmt: skip
    *(
        _s("instrument", f"pv_{device}", str, None, f"PV prefix of {what}", optional=True,
           check=_check_pv_prefix)  # fmt: skip
        for device, what in (
            ("phi", "the phi motor record"),
            ("chi", "the chi motor record"),
            ("omega", "the omega motor record"),
            ("temperature", "the temperature controller (SP, T, TOL)"),
            ("detector", "the areaDetector (cam1:, HDF1:)"),
            ("mcs1", "monitor MCS1 (Counts)"),
            ("mcs2", "monitor MCS2 (Counts)"),
        )
    ),
    _s("instrument", "detector_driver", str, None, "areaDetector driver: sim (empty) or pilatus",
       optional=True, check=_check_detector_driver),  # fmt: skip
    # nxrefine: defaults for new configurations
    _s("nxrefine", "wavelength", float, 0.2, "wavelength (Angstrom)", check=_check_positive),
    _s("nxrefine", "distance", float, 500.0, "sample to detector (mm)", check=_check_positive),
    _s(
        "nxrefine",
        "detector_orientation",
        str,
        "-y +z -x",
        "lab axes of detector x, y and normal",
        check=_check_orientation,
    ),
    _s("nxrefine", "phi", float, -5.0, "phi start (deg)"),
    _s("nxrefine", "phi_end", float, 360.0, "phi end (deg)"),
    _s("nxrefine", "phi_step", float, 0.1, "phi step per frame (deg)", check=_check_positive),
    _s("nxrefine", "chi", float, 0.0, "chi (deg)"),
    _s("nxrefine", "omega", float, 0.0, "omega (deg)"),
    _s("nxrefine", "theta", float, 0.0, "theta (deg)"),
    _s("nxrefine", "x", float, 0.0, "detector x translation (mm)"),
    _s("nxrefine", "y", float, 0.0, "detector y translation (mm)"),
    _s("nxrefine", "nsteps", int, 3, "number of detector positions", check=_check_positive),
    _s("nxrefine", "frame_rate", float, 10.0, "frames per second", check=_check_positive),
    # nxreduce: defaults for reduction
    _s("nxreduce", "threshold", float, 50000.0, "peak-search threshold (counts)", optional=True),
    _s(
        "nxreduce",
        "min_pixels",
        int,
        10,
        "NXRefine: min peak separation (pixels); recorded, never drops peaks here",
        check=_check_positive,
    ),
    _s(
        "nxreduce",
        "min_voxels",
        int,
        1,
        "fewest voxels above threshold in a peak",
        check=_check_positive,
    ),
    _s("nxreduce", "first_frame", int, 10, "first frame used", check=_check_non_negative),
    _s("nxreduce", "last_frame", int, 3640, "last frame used", optional=True),
    _s(
        "nxreduce",
        "polar_max",
        float,
        None,
        "max polar angle in refinement (deg); empty: every peak",
        optional=True,
    ),
    _s("nxreduce", "hkl_tolerance", float, 0.05, "max |dQ| of an indexed peak (1/Angstrom)"),
    _s("nxreduce", "monitor", str, "MCS1", "monitor channel"),
    _s("nxreduce", "norm", float, 50000.0, "monitor normalisation", check=_check_positive),
    _s("nxreduce", "sample_transmission", bool, True, "weight frames by sample transmission"),
    _s("nxreduce", "polarization", float, 0.99, "beam polarization factor"),
    _s("nxreduce", "radius", float, 0.2, "punch radius (1/Angstrom)"),
    _s("nxreduce", "mask_t1", float, 2.0, "3-D mask: first threshold"),
    _s("nxreduce", "mask_h1", int, 11, "3-D mask: first box size", check=_check_positive),
    _s("nxreduce", "mask_t2", float, 0.8, "3-D mask: second threshold"),
    _s("nxreduce", "mask_h2", int, 51, "3-D mask: second box size", check=_check_positive),
    _s("nxreduce", "threads", int, 0, "transform threads (0: one per core)",
       check=_check_non_negative),  # fmt: skip
    _s("nxreduce", "scan_path", str, "/entry/sample/temperature", "scan variable in scan files"),
    _s("nxreduce", "scan_units", str, "K", "units of the scan variable"),
)
"""Every setting, in file order."""

SECTIONS: tuple[str, ...] = ("server", "instrument", "nxrefine", "nxreduce")
SERVER_SECTIONS = SECTIONS
EXPERIMENT_SECTIONS: tuple[str, ...] = ("instrument", "nxrefine", "nxreduce")

_BY_KEY: dict[tuple[str, str], SettingSpec] = {(s.section, s.key): s for s in SCHEMA}

REDUCE_KEYS: tuple[str, ...] = tuple(s.key for s in SCHEMA if s.section == "nxreduce")
"""Keys of ``[nxreduce]``: the reduction parameters resolved by :func:`resolve_parameters`."""

FILE_ONLY_PARAMETERS: dict[str, SettingSpec] = {
    key: SettingSpec("nxreduce", key, float, None, doc, optional=True)
    for key, doc in (("qmin", "min Q of the radial sum"), ("qmax", "max Q of the transform"))
}
"""Reduction parameters stored in scan files only (never in INI files)."""


def get_spec(section: str, key: str) -> SettingSpec:
    """Return the schema entry for ``section.key``.

    Raises
    ------
    SettingsError
        If the section or key is unknown (the message lists the valid ones).
    """
    if section not in SECTIONS:
        raise SettingsError(f"unknown settings section [{section}]; valid: {', '.join(SECTIONS)}")
    try:
        return _BY_KEY[(section, key)]
    except KeyError:
        keys = ", ".join(s.key for s in SCHEMA if s.section == section)
        raise SettingsError(f"unknown key {key!r} in [{section}]; valid: {keys}") from None


def default_settings(sections: Iterable[str] = SECTIONS) -> dict[str, dict[str, Any]]:
    """Return the schema defaults as ``{section: {key: value}}``."""
    sections = tuple(sections)
    out: dict[str, dict[str, Any]] = {s: {} for s in sections}
    for spec in SCHEMA:
        if spec.section in out:
            out[spec.section][spec.key] = spec.default
    return out


def format_value(value: Any) -> str:
    """Format a Python value for an INI file (None -> empty)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, float):
        return repr(value)
    return str(value)


NXREFINE_SERVER_TYPES: dict[str, str] = {
    "direct": "local",
    "multicore": "local",
    "multinode": "local",
}
"""NXRefine's ``[server] type`` values and the executor each means here (threads)."""
