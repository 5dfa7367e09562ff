"""The experiment tree: safe names and paths, samples, labels and scans.

Layout (NXRefine's)::

    <analysis_home>/<experiment>[/<analysis_path>]/     experiment directory
        tasks/settings.ini
        calibrations/  configurations/<name>.nxs  scripts/
        <sample>/<label>/<sample>_<scan>.nxs          scan file
        <sample>/<label>/<scan>/                      scan directory (f1.h5, ...)

Every name that becomes a path component goes through :func:`validate_name`, and
every path built from user input through :func:`safe_join`, so nothing can leave
the experiment tree.

Examples
--------
>>> scan_directory_name(-12.5)
'm12p5K'
>>> validate_name("TiSe2", "sample")
'TiSe2'
"""

from __future__ import annotations

import logging
import math
import os
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from .errors import ExperimentError, InvalidNameError, PathSafetyError, SettingsError
from .settings import (
    copy_to_experiment,
    experiment_settings_path,
    load_experiment_settings,
    read_settings,
    server_settings_path,
)

__all__ = [
    "MAX_NAME_LENGTH",
    "EXPERIMENT_SUBDIRS",
    "validate_name",
    "safe_join",
    "scan_directory_name",
    "ScanPaths",
    "Experiment",
]

logger = logging.getLogger(__name__)

MAX_NAME_LENGTH = 128
"""Longest accepted sample, label, scan or experiment name."""

EXPERIMENT_SUBDIRS: tuple[str, ...] = ("tasks", "calibrations", "configurations", "scripts")
"""Directories every experiment directory holds (reserved: not sample names)."""


def validate_name(name: Any, what: str = "name") -> str:
    """Check that ``name`` is a safe single path component and return it.

    Parameters
    ----------
    name : str
        The candidate (sample, label, scan, experiment...).
    what : str
        What the name is for, used in the error message.

    Returns
    -------
    str
        ``name`` unchanged.

    Raises
    ------
    InvalidNameError
        If the name is empty, too long, has leading/trailing spaces, contains a path
        separator, ``..`` or a control character, or starts with ``.``.

    Examples
    --------
    >>> validate_name("300K", "scan")
    '300K'
    """
    if not isinstance(name, str):
        raise InvalidNameError(f"{what} name must be text, got {type(name).__name__} {name!r}")
    if not name:
        raise InvalidNameError(f"{what} name is empty")
    reason = None
    if len(name) > MAX_NAME_LENGTH:
        reason = f"is longer than {MAX_NAME_LENGTH} characters"
    elif name != name.strip():
        reason = "has leading or trailing spaces"
    elif "/" in name or "\\" in name:
        reason = "contains a path separator ('/' or '\\')"
    elif ".." in name:
        reason = "contains '..'"
    elif name.startswith("."):
        reason = "starts with '.'"
    elif any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in name):
        reason = "contains a control character"
    if reason:
        raise InvalidNameError(f"{what} name {name!r} {reason}; use a plain name such as 'TiSe2'")
    return name


def safe_join(root: str | os.PathLike[str], *parts: str | os.PathLike[str]) -> Path:
    """Join ``parts`` to ``root``, refusing any result outside ``root``.

    Both the lexical path and the path with symbolic links resolved must stay
    inside ``root``.

    Returns
    -------
    Path
        The absolute joined path (symbolic links not resolved).

    Raises
    ------
    PathSafetyError
        If a part is absolute or the result escapes ``root``.

    Examples
    --------
    >>> safe_join("/data/exp", "TiSe2", "xtal1").as_posix()
    '/data/exp/TiSe2/xtal1'
    """
    base = Path(os.path.abspath(root))
    for part in parts:
        if Path(part).is_absolute() or Path(part).drive:
            raise PathSafetyError(f"path component {str(part)!r} is absolute; it must be relative")
    joined = base.joinpath(*parts)
    normal = Path(os.path.normpath(joined))
    if not normal.is_relative_to(base):
        raise PathSafetyError(f"path {joined} leaves {base}")
    real_base = base.resolve()
    real = normal.resolve()
    if not real.is_relative_to(real_base):
        raise PathSafetyError(f"path {joined} resolves to {real}, outside {real_base}")
    return normal


def scan_directory_name(value: Any, units: str = "K", prefix: str = "") -> str:
    """Scan directory name for a scan-variable value (e.g. a temperature).

    Negative values get an ``m`` prefix, the decimal point becomes ``p`` and whole
    numbers lose their decimals; ``units`` and ``prefix`` are added.

    Raises
    ------
    InvalidNameError
        If ``value`` is not a finite number or the result is not a safe name.

    Examples
    --------
    >>> scan_directory_name(300), scan_directory_name(300.0), scan_directory_name(-12.5)
    ('300K', '300K', 'm12p5K')
    >>> scan_directory_name(4.25, units="GPa", prefix="p_")
    'p_4p25GPa'
    """
    if isinstance(value, bool):
        raise InvalidNameError(f"scan value must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidNameError(f"scan value must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise InvalidNameError(f"scan value must be finite, got {value!r}")
    text = format(Decimal(repr(abs(number))).normalize(), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    text = text.replace(".", "p")
    if number < 0 and text != "0":
        text = "m" + text
    return validate_name(f"{prefix}{text}{units or ''}", "scan directory")


@dataclass(frozen=True)
class ScanPaths:
    """Paths and names of one scan.

    Parameters
    ----------
    experiment_dir : Path
        The experiment directory.
    sample, label, scan : str
        Sample, label (crystal) and scan names.
    scan_file : Path
        ``<experiment>/<sample>/<label>/<sample>_<scan>.nxs``.
    scan_dir : Path
        ``<experiment>/<sample>/<label>/<scan>``.
    """

    experiment_dir: Path
    sample: str
    label: str
    scan: str
    scan_file: Path
    scan_dir: Path

    @property
    def label_dir(self) -> Path:
        """``<experiment>/<sample>/<label>``, the directory holding the scan file."""
        return self.scan_file.parent

    @classmethod
    def from_names(
        cls, experiment_dir: str | os.PathLike[str], sample: str, label: str, scan: str
    ) -> ScanPaths:
        """Build the paths of a scan from its names (validated)."""
        validate_name(sample, "sample")
        validate_name(label, "label")
        validate_name(scan, "scan")
        root = Path(os.path.abspath(experiment_dir))
        label_dir = safe_join(root, sample, label)
        return cls(
            experiment_dir=root,
            sample=sample,
            label=label,
            scan=scan,
            scan_file=label_dir / f"{sample}_{scan}.nxs",
            scan_dir=label_dir / scan,
        )

    @classmethod
    def from_scan_file(cls, path: str | os.PathLike[str]) -> ScanPaths:
        """Derive names from a scan-file path ``.../<sample>/<label>/<sample>_<scan>.nxs``.

        Raises
        ------
        ExperimentError
            If the file name does not start with ``<sample>_`` (the grand-parent
            directory name) or does not end with ``.nxs``.
        """
        path = Path(os.path.abspath(path))
        label = path.parent.name
        sample = path.parent.parent.name
        if path.suffix != ".nxs" or not sample or not label:
            raise ExperimentError(
                f"{path} is not a scan file path <experiment>/<sample>/<label>/<sample>_<scan>.nxs"
            )
        stem = path.stem
        if not stem.startswith(f"{sample}_") or len(stem) == len(sample) + 1:
            raise ExperimentError(
                f"scan file {path.name!r} must be named '{sample}_<scan>.nxs' because it is "
                f"in sample directory {sample!r}"
            )
        scan = stem[len(sample) + 1 :]
        return cls(
            experiment_dir=path.parent.parent.parent,
            sample=sample,
            label=label,
            scan=scan,
            scan_file=path,
            scan_dir=path.parent / scan,
        )


class Experiment:
    """An experiment directory.

    Use :meth:`create` for a new experiment and :meth:`open` for an existing one.

    Parameters
    ----------
    directory : path-like
        The experiment directory (not checked; prefer :meth:`open`).
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(os.path.abspath(directory))

    def __repr__(self) -> str:
        return f"Experiment({str(self.directory)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Experiment) and other.directory == self.directory

    def __hash__(self) -> int:
        return hash(self.directory)

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(
        cls,
        analysis_home: str | os.PathLike[str],
        name: str,
        *,
        analysis_path: str | None = "nxrefine",
        settings_source: str | os.PathLike[str] | None = None,
        beamline: str | None = None,
        source: str | None = None,
        raw_home: str | os.PathLike[str] | None = None,
        raw_path: str | None = None,
        exist_ok: bool = False,
    ) -> Experiment:
        """Create ``<analysis_home>/<name>[/<analysis_path>]`` with its sub-directories.

        ``tasks/settings.ini`` is a copy of the server settings without ``[server]``,
        with ``[instrument]`` updated from the arguments.

        Parameters
        ----------
        analysis_home : path-like
            Root of the analysis tree (created if missing).
        name : str
            Experiment name.
        analysis_path : str or None
            Optional sub-directory inside the experiment (``''`` or None for none).
        settings_source : path-like, optional
            Server settings file to copy (default: the server file if it exists,
            else the built-in defaults).
        beamline : str, optional
            Beamline name recorded as ``[instrument] instrument`` (not checked here;
            see :func:`nxrefine_bs.beamlines.get_beamline`).
        source, raw_home, raw_path : optional
            Recorded in ``[instrument]``; keep the server values when None.
        exist_ok : bool
            Re-use an existing experiment directory (settings are left alone).

        Raises
        ------
        ExperimentError
            If the experiment exists and ``exist_ok`` is False.
        InvalidNameError
            On an unsafe name.
        """
        validate_name(name, "experiment")
        parts = [name]
        if analysis_path:
            validate_name(analysis_path, "analysis path")
            parts.append(analysis_path)
        home = Path(os.path.abspath(Path(analysis_home).expanduser()))
        directory = safe_join(home, *parts)
        settings_file = experiment_settings_path(directory)
        if settings_file.exists():
            if not exist_ok:
                raise ExperimentError(
                    f"experiment {directory} already exists; open it instead of creating it"
                )
            for sub in EXPERIMENT_SUBDIRS:
                (directory / sub).mkdir(parents=True, exist_ok=True)
            return cls.open(directory)
        source_file = (
            Path(settings_source) if settings_source is not None else server_settings_path()
        )
        if settings_source is not None or source_file.is_file():
            read_settings(source_file)  # fail before creating anything
        for sub in EXPERIMENT_SUBDIRS:
            (directory / sub).mkdir(parents=True, exist_ok=True)
        instrument: dict[str, Any] = {
            "analysis_home": str(home),
            "analysis_path": analysis_path or None,
            "experiment": name,
        }
        for key, value in (
            ("instrument", beamline),
            ("source", source),
            ("raw_home", raw_home),
            ("raw_path", raw_path),
        ):
            if value is not None:
                instrument[key] = str(value)
        copy_to_experiment(directory, source=settings_source, overrides={"instrument": instrument})
        logger.info("created experiment %s", directory)
        return cls(directory)

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> Experiment:
        """Open an existing experiment directory.

        Raises
        ------
        ExperimentError
            If ``directory`` is missing or lacks ``tasks/settings.ini``.
        """
        path = Path(os.path.abspath(Path(directory).expanduser()))
        if not path.is_dir():
            raise ExperimentError(f"experiment directory {path} does not exist")
        if not experiment_settings_path(path).is_file():
            raise ExperimentError(
                f"{path} is not an experiment directory (no tasks/settings.ini); "
                "create one with 'nxrefine-bs experiment new'"
            )
        return cls(path)

    @classmethod
    def from_scan_file(cls, scan_file: str | os.PathLike[str]) -> Experiment:
        """Open the experiment holding ``scan_file``."""
        return cls.open(ScanPaths.from_scan_file(scan_file).experiment_dir)

    # ------------------------------------------------------------------ layout

    @property
    def name(self) -> str:
        """Experiment name (from settings, else the directory name)."""
        try:
            name = self.settings()["instrument"].get("experiment")
        except SettingsError:  # settings are optional for the name
            name = None
        return name or self.directory.name

    @property
    def tasks_dir(self) -> Path:
        """``<experiment>/tasks``."""
        return self.directory / "tasks"

    @property
    def calibrations_dir(self) -> Path:
        """``<experiment>/calibrations``."""
        return self.directory / "calibrations"

    @property
    def configurations_dir(self) -> Path:
        """``<experiment>/configurations``."""
        return self.directory / "configurations"

    @property
    def scripts_dir(self) -> Path:
        """``<experiment>/scripts``."""
        return self.directory / "scripts"

    @property
    def settings_file(self) -> Path:
        """``<experiment>/tasks/settings.ini``."""
        return experiment_settings_path(self.directory)

    def settings(self) -> dict[str, dict[str, Any]]:
        """Read and validate the experiment settings."""
        return load_experiment_settings(self.directory)

    @property
    def beamline_name(self) -> str | None:
        """``[instrument] instrument`` of the experiment settings."""
        return self.settings()["instrument"].get("instrument")

    def configuration_file(self, name: str) -> Path:
        """Path of configuration ``name`` (``configurations/<name>.nxs``)."""
        stem = name[:-4] if name.endswith(".nxs") else name
        validate_name(stem, "configuration")
        return self.configurations_dir / f"{stem}.nxs"

    def list_configurations(self) -> list[str]:
        """Names of the configuration files, sorted."""
        if not self.configurations_dir.is_dir():
            return []
        return sorted(p.stem for p in self.configurations_dir.glob("*.nxs") if p.is_file())

    # ------------------------------------------------------------------ samples and scans

    def sample_dir(self, sample: str, label: str) -> Path:
        """``<experiment>/<sample>/<label>`` (validated, not created)."""
        validate_name(sample, "sample")
        validate_name(label, "label")
        if sample in EXPERIMENT_SUBDIRS:
            raise InvalidNameError(
                f"sample name {sample!r} is reserved for the experiment's {sample}/ directory"
            )
        return safe_join(self.directory, sample, label)

    def new_sample(self, sample: str, label: str) -> Path:
        """Create ``<experiment>/<sample>/<label>`` (no error if it exists) and return it."""
        path = self.sample_dir(sample, label)
        path.mkdir(parents=True, exist_ok=True)
        logger.info("sample directory %s", path)
        return path

    def scan_paths(self, sample: str, label: str, scan: str) -> ScanPaths:
        """All paths of one scan."""
        self.sample_dir(sample, label)
        return ScanPaths.from_names(self.directory, sample, label, scan)

    def scan_file(self, sample: str, label: str, scan: str) -> Path:
        """``<experiment>/<sample>/<label>/<sample>_<scan>.nxs``."""
        return self.scan_paths(sample, label, scan).scan_file

    def scan_dir(self, sample: str, label: str, scan: str) -> Path:
        """``<experiment>/<sample>/<label>/<scan>``."""
        return self.scan_paths(sample, label, scan).scan_dir

    def list_samples(self) -> list[tuple[str, str]]:
        """``(sample, label)`` pairs that have a directory, sorted."""
        out = []
        for sample in sorted(self.directory.iterdir()):
            if (
                not sample.is_dir()
                or sample.name in EXPERIMENT_SUBDIRS
                or sample.name.startswith(".")
            ):
                continue
            for label in sorted(sample.iterdir()):
                if label.is_dir() and not label.name.startswith("."):
                    out.append((sample.name, label.name))
        return out

    def list_scans(self, sample: str, label: str) -> list[str]:
        """Scan names with a scan file in ``<sample>/<label>``, sorted."""
        directory = self.sample_dir(sample, label)
        if not directory.is_dir():
            return []
        prefix = f"{sample}_"
        return sorted(
            p.stem[len(prefix) :]
            for p in directory.glob(f"{sample}_*.nxs")
            if p.is_file() and len(p.stem) > len(prefix)
        )

    def instrument_settings(self) -> Mapping[str, Any]:
        """The ``[instrument]`` section of the experiment settings."""
        return self.settings()["instrument"]
