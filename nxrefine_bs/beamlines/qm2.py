"""QM2 at CHESS: raw images and SPEC logs in a tree parallel to the analysis tree.

Raw layout (``[instrument] raw_home`` and ``raw_path`` in the experiment settings)::

    <raw_home>/<experiment>/<sample>                      SPEC file of the sample
    <raw_home>/<experiment>/<raw_path>/<sample>/<label>/<scan>/<sample>_NNN/
                                                          images of SPEC scan NNN
                                                          (*.cbf, *.tif, *.tiff)

Each ``<sample>_NNN/`` directory holds the frames of one rotation; the rotations of
an analysis scan ``<scan>`` (e.g. ``300K``) are its image directories in order of
their SPEC scan number, and become the entries ``f1, f2...`` of the configuration.
If ``raw_path`` is empty the SPEC file cannot sit beside the ``<sample>/`` image
directory, so the SPEC file is also looked for as ``<raw directory>/<sample>/<sample>``
(see :meth:`QM2Beamline.spec_file_candidates`); ``spec_file=`` names it explicitly.

:meth:`QM2Beamline.import_data` writes, for every raw scan directory,

* ``<experiment>/<sample>/<label>/<sample>_<scan>.nxs`` from the configuration
  (:func:`~nxrefine_bs.nexus.scanfile.create_scan_file`);
* ``<experiment>/<sample>/<label>/<scan>/fN.h5``: the images stacked into
  ``/entry/data/data`` ``(frames, ny, nx)`` (int32 for integer detectors, one frame
  per chunk), linked relatively from ``fN/data/data``;
* the SPEC logs of each rotation (the SPEC file is read with :mod:`silx.io.specfile`
  through :mod:`.spec`, and the data rows of every imported scan are checked):
  ``fN/scan_number`` and ``instrument/logs/spec_scan`` (the scan key, ``"4.1"``),
  the per-frame monitors ``flyc1``/``flyc2`` in ``fN/monitor`` (NXmonitor, signal
  ``flyc1``), the phi array
  (start, step and end from the scan command) in ``instrument/goniometer/phi``,
  ``chi = 90 - SPEC chi``, ``theta = SPEC th``, every data column in
  ``instrument/logs``, the ``#D`` date as ``start_time``; the mean of the
  ``sampleT`` column of all rotations becomes ``/entry/sample/temperature``.

An image directory ``<sample>_NNN`` names only a scan number; if the SPEC file has
scan NNN more than once (``"NNN.1"``, ``"NNN.2"``...), the import stops with an error
listing them rather than guess.

The raw tree is only read.  Nothing existing is replaced unless ``overwrite`` is
True, and each scan is written all-or-nothing: stacks go to temporary names and are
renamed once every image has been read and the scan file is complete.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import h5py
import numpy as np
from numpy.typing import NDArray
from tqdm import tqdm

from ..errors import ExperimentError, FileExistsNXError, InvalidNameError, PathSafetyError
from ..experiment import Experiment, ScanPaths, safe_join, validate_name
from .base import BeamLine
from .spec import SpecFile, SpecFileError, SpecScan, read_spec

__all__ = [
    "QM2Beamline",
    "RawDataError",
    "RotationLogs",
    "RawRotation",
    "RawScan",
    "rotation_logs",
    "stack_images",
    "IMAGE_SUFFIXES",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES: tuple[str, ...] = (".cbf", ".tif", ".tiff")
"""File name endings of the detector images that are stacked (case-insensitive)."""

ROTATION_MOTOR = "phi"
CHI_MOTOR = "chi"
THETA_MOTOR = "th"
MONITOR_COLUMNS: tuple[str, ...] = ("flyc1", "flyc2")
MONITOR_SIGNAL = "flyc1"
TEMPERATURE_COLUMN = "sampleT"
INT32_MAX = int(np.iinfo(np.int32).max)


class RawDataError(ExperimentError):
    """The raw tree of an import is missing, malformed or unreadable."""


# --------------------------------------------------------------------------- SPEC logs


@dataclass(frozen=True)
class RotationLogs:
    """What the SPEC file says about one rotation (one SPEC scan).

    Attributes
    ----------
    scan_number : int
        SPEC scan number.
    scan_key : str
        The scan as silx addresses it, ``"<number>.<order>"`` (``"4.2"`` is the second
        ``#S 4`` of the file).
    phi : numpy.ndarray
        Rotation angle of every frame (deg): ``phi_start + phi_step * i``.
    phi_step, phi_end : float
        Step per frame and end of the rotation (deg).
    chi, theta : float or None
        Goniometer angles in nxrefine-bs convention (``90 - SPEC chi``, ``SPEC th``).
    monitors : dict
        Per-frame monitor counts, e.g. ``{'flyc1': ..., 'flyc2': ...}``.
    columns : dict
        Every SPEC data column (per frame).
    temperature : numpy.ndarray or None
        The ``sampleT`` column.
    start_time : str or None
        ISO 8601 date of the scan (SPEC's local time).
    count_time : float or None
        Seconds per frame (``#T``).
    command : str
        The SPEC scan command.
    positioners : dict
        Motor positions at the start of the scan.
    """

    scan_number: int
    phi: NDArray[np.float64]
    phi_step: float
    phi_end: float
    chi: float | None
    theta: float | None
    monitors: dict[str, NDArray[np.float64]]
    columns: dict[str, NDArray[np.float64]]
    temperature: NDArray[np.float64] | None
    start_time: str | None
    count_time: float | None
    command: str
    positioners: dict[str, float] = field(default_factory=dict)
    scan_key: str = ""

    @property
    def nframes(self) -> int:
        """Number of frames."""
        return int(self.phi.size)


def _phi_from_command(scan: SpecScan) -> tuple[float, float, int] | None:
    """``(start, end, npoints)`` from ``... phi START END N ...`` in the command."""
    tokens = scan.command.split()
    for i, token in enumerate(tokens):
        if token.lower() != ROTATION_MOTOR:
            continue
        try:
            start, end, count = (float(t) for t in tokens[i + 1 : i + 4])
        except ValueError:
            continue
        if count != int(count) or count < 1:
            raise SpecFileError(
                f"{scan.where}: command {scan.command!r} gives {tokens[i + 3]!r} "
                "points for phi; expected a positive whole number"
            )
        return start, end, int(count)
    return None


def rotation_logs(scan: SpecScan, nframes: int | None = None) -> RotationLogs:
    """Extract the logs of one rotation from its SPEC scan.

    The phi range comes from the command (``<macro> phi START END N ...``: N frames of
    ``(END - START) / N`` degrees); without one, from a ``phi`` data column.

    Parameters
    ----------
    scan : SpecScan
        The SPEC scan.
    nframes : int, optional
        Number of frames (images) expected; every per-frame quantity must match it.

    Raises
    ------
    SpecFileError
        If a data row is malformed (:meth:`SpecScan.check_data`), the phi range cannot
        be found, the number of frames or data rows differs from ``nframes``, or a
        monitor column is missing.
    """
    scan.check_data()
    parsed = _phi_from_command(scan)
    if parsed is not None:
        start, end, count = parsed
        step = (end - start) / count
        if nframes is not None and count != nframes:
            raise SpecFileError(
                f"{scan.where}: command {scan.command!r} records {count} phi points, but "
                f"the image directory holds {nframes} frames"
            )
        phi = start + step * np.arange(count, dtype=np.float64)
    elif scan.has_column(ROTATION_MOTOR) and scan.nrows >= 2:
        phi = scan.column(ROTATION_MOTOR)
        step = float(np.median(np.diff(phi)))
        end = float(phi[-1] + step)
    else:
        raise SpecFileError(
            f"{scan.where}: cannot find the phi range; the command {scan.command!r} has no "
            f"'{ROTATION_MOTOR} START END N' and there is no '{ROTATION_MOTOR}' data column"
        )
    if not step > 0 and not step < 0:
        raise SpecFileError(f"{scan.where}: the phi step is zero")
    n = int(phi.size)
    if nframes is not None and n != nframes:
        raise SpecFileError(
            f"{scan.where}: the SPEC scan has {n} phi values but the image directory "
            f"holds {nframes} frames"
        )
    if scan.nrows != n:
        raise SpecFileError(
            f"{scan.where}: the SPEC scan has {scan.nrows} data rows for {n} frames; "
            "was the scan aborted?"
        )
    columns = scan.columns()
    monitors = {}
    for name in MONITOR_COLUMNS:
        if scan.has_column(name):
            monitors[name] = scan.column(name)
    if MONITOR_SIGNAL not in monitors:
        raise SpecFileError(
            f"{scan.where}: no '{MONITOR_SIGNAL}' monitor column; columns: "
            f"{', '.join(scan.labels) or 'none'}"
        )
    chi = theta = None
    try:
        chi = 90.0 - scan.positioner(CHI_MOTOR)
    except SpecFileError:
        logger.warning("%s: no '%s' position; keeping the configuration's chi", scan.where, "chi")
    try:
        theta = scan.positioner(THETA_MOTOR)
    except SpecFileError:
        logger.warning("%s: no '%s' position; keeping the configuration's theta", scan.where, "th")
    temperature = scan.column(TEMPERATURE_COLUMN) if scan.has_column(TEMPERATURE_COLUMN) else None
    return RotationLogs(
        scan_number=scan.number,
        phi=phi,
        phi_step=float(step),
        phi_end=float(end),
        chi=chi,
        theta=theta,
        monitors=monitors,
        columns=columns,
        temperature=temperature,
        start_time=scan.start_time,
        count_time=scan.count_time,
        command=scan.command,
        positioners=dict(scan.positioners),
        scan_key=scan.key,
    )


# --------------------------------------------------------------------------- raw tree


def _natural_key(path: Path) -> tuple[Any, ...]:
    parts = re.split(r"(\d+)", path.name)
    return tuple(int(p) if p.isdigit() else p for p in parts)


@dataclass(frozen=True)
class RawRotation:
    """One rotation in the raw tree: a ``<sample>_NNN/`` image directory."""

    scan_number: int
    directory: Path
    images: tuple[Path, ...]


@dataclass(frozen=True)
class RawScan:
    """One raw scan directory ``<sample>/<label>/<scan>/`` and its rotations."""

    scan: str
    directory: Path
    rotations: tuple[RawRotation, ...]


def find_images(directory: Path) -> tuple[Path, ...]:
    """Image files of a rotation directory, in natural order (``_2`` before ``_10``)."""
    return tuple(
        sorted(
            (
                p
                for p in directory.iterdir()
                if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES)
            ),
            key=_natural_key,
        )
    )


def _read_image(path: Path) -> NDArray[Any]:
    import fabio

    try:
        image = fabio.open(str(path))
        data = np.asarray(image.data)
    except Exception as exc:  # fabio raises many kinds of errors on bad files
        raise RawDataError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc
    if data.ndim != 2:
        raise RawDataError(f"image {path} has {data.ndim} dimensions; expected a 2-D frame")
    return data


def stack_images(
    images: Iterable[Path],
    target: str | os.PathLike[str],
    *,
    shape: tuple[int, int] | None = None,
    dataset: str = "/entry/data/data",
    progress: bool = False,
) -> tuple[int, np.dtype]:
    """Stack detector images into a new HDF5 file (one frame per chunk).

    Integer images are stored as int32 (unsigned values above the int32 range, such
    as the all-ones flag of masked pixels, become -1, i.e. invalid); floating-point
    images as float32.  The caller writes to a temporary name and renames it.

    Parameters
    ----------
    images : iterable of Path
        The frames, in order (CBF or TIFF, read with fabio).
    target : path-like
        New HDF5 file (must not exist).
    shape : tuple of int, optional
        Expected ``(ny, nx)`` of every image.
    dataset : str
        Path of the stack in ``target``.
    progress : bool
        Show a progress bar.

    Returns
    -------
    tuple
        ``(number of frames, dtype)``.

    Raises
    ------
    RawDataError
        If an image is unreadable or its shape differs from ``shape`` or the first one.
    """
    images = list(images)
    if not images:
        raise RawDataError(f"no images to stack into {target}")
    target = Path(target)
    first = _read_image(images[0])
    ny, nx = first.shape
    if shape is not None and (ny, nx) != tuple(shape):
        raise RawDataError(
            f"image {images[0]} is {ny}x{nx} pixels but the configuration's detector is "
            f"{shape[0]}x{shape[1]}; choose the configuration of this detector"
        )
    integer = first.dtype.kind in "iub"
    dtype = np.dtype(np.int32) if integer else np.dtype(np.float32)
    clipped = 0
    with h5py.File(target, "x", libver="latest") as f:
        ds = f.create_dataset(dataset, shape=(len(images), ny, nx), dtype=dtype, chunks=(1, ny, nx))
        group = ds.parent
        if group.name != "/":
            group.attrs["NX_class"] = "NXdata"
            group.attrs["signal"] = ds.name.rsplit("/", 1)[-1]
            if group.parent.name != "/":
                group.parent.attrs["NX_class"] = "NXentry"
        for i, path in enumerate(
            tqdm(images, disable=not progress, desc=target.name, unit="frame")
        ):
            data = first if i == 0 else _read_image(path)
            if data.shape != (ny, nx):
                raise RawDataError(
                    f"image {path} is {data.shape[0]}x{data.shape[1]} pixels but the "
                    f"first image {images[0].name} is {ny}x{nx}"
                )
            if integer:
                if data.dtype.kind == "f":
                    raise RawDataError(
                        f"image {path} holds floating-point values but {images[0].name} "
                        "holds integers"
                    )
                if data.dtype.kind == "u" and data.dtype.itemsize >= 4:
                    big = data > INT32_MAX
                    if big.any():
                        clipped += int(big.sum())
                        data = np.where(big, -1, data)
                ds[i] = data.astype(np.int32)
            else:
                ds[i] = data.astype(np.float32)
    if clipped:
        logger.warning(
            "%s: %d pixel values above the int32 range were stored as -1 (invalid)",
            target,
            clipped,
        )
    return len(images), dtype


# --------------------------------------------------------------------------- beamline


@dataclass
class _Rotation:
    entry: str
    raw: RawRotation
    logs: RotationLogs
    target: Path
    dataset: str


@dataclass
class _Job:
    raw: RawScan
    paths: ScanPaths
    rotations: list[_Rotation]
    temperature: float | None
    shape: tuple[int, int]
    spec_file: Path


class QM2Beamline(BeamLine):
    """The QM2 beamline of the Cornell High Energy Synchrotron Source.

    Examples
    --------
    >>> QM2Beamline.name, QM2Beamline.import_data_enabled
    ('QM2', True)
    """

    name: ClassVar[str] = "QM2"
    source_name: ClassVar[str] = "Cornell High Energy Synchrotron Source"
    source_type: ClassVar[str] = "Synchrotron X-ray Source"
    import_data_enabled: ClassVar[bool] = True

    # ------------------------------------------------------------------ raw paths

    def raw_experiment_directory(self, experiment: Experiment) -> Path | None:
        """``raw_home/<experiment>`` (without ``raw_path``), or None if unset."""
        instrument = experiment.instrument_settings()
        raw_home = instrument.get("raw_home")
        if not raw_home:
            return None
        name = validate_name(instrument.get("experiment") or experiment.name, "experiment")
        return safe_join(Path(raw_home).expanduser(), name)

    def _require_raw_directory(self, experiment: Experiment) -> Path:
        raw = self.raw_directory(experiment)
        if raw is None:
            raise RawDataError(
                f"{experiment.settings_file}: [instrument] raw_home is not set; set it with "
                "'nxrefine-bs settings edit -x EXPERIMENT instrument.raw_home=DIR'"
            )
        return raw

    def spec_file_candidates(self, experiment: Experiment, sample: str) -> list[Path]:
        """Where the SPEC file of ``sample`` is looked for, in order.

        1. ``raw_home/<experiment>/<sample>`` (beside the ``raw_path`` image tree);
        2. ``<raw directory>/<sample>/<sample>`` (inside the sample's image directory,
           for trees without ``raw_path``).
        """
        validate_name(sample, "sample")
        out: list[Path] = []
        top = self.raw_experiment_directory(experiment)
        if top is not None:
            out.append(safe_join(top, sample))
        raw = self.raw_directory(experiment)
        if raw is not None:
            out.append(safe_join(raw, sample, sample))
        return list(dict.fromkeys(out))

    def spec_file(self, experiment: Experiment, sample: str) -> Path:
        """The SPEC file of ``sample`` (first existing candidate).

        Raises
        ------
        RawDataError
            If none of :meth:`spec_file_candidates` is a file.
        """
        candidates = self.spec_file_candidates(experiment, sample)
        for path in candidates:
            if path.is_file():
                return path
        if not candidates:
            self._require_raw_directory(experiment)
        raise RawDataError(
            f"no SPEC file for sample {sample!r}: looked for "
            + " and ".join(str(p) for p in candidates)
            + "; pass spec_file= (--spec-file) if it is elsewhere"
        )

    def raw_label_directory(self, experiment: Experiment, sample: str, label: str) -> Path:
        """``<raw directory>/<sample>/<label>`` (validated, not checked)."""
        validate_name(sample, "sample")
        validate_name(label, "label")
        return safe_join(self._require_raw_directory(experiment), sample, label)

    def find_raw_scans(
        self,
        experiment: Experiment,
        sample: str,
        label: str,
        scans: Iterable[str] | None = None,
    ) -> list[RawScan]:
        """The raw scans of ``sample``/``label``: scan directories with image directories.

        A scan directory ``<scan>/`` holds one ``<sample>_NNN/`` directory per rotation;
        other entries are ignored (logged).

        Parameters
        ----------
        scans : iterable of str, optional
            Only these scan directories (each must exist).

        Raises
        ------
        RawDataError
            If the label directory is missing, a requested scan is missing, a scan
            directory has no image directories, or an image directory has no images.
        """
        label_dir = self.raw_label_directory(experiment, sample, label)
        if not label_dir.is_dir():
            raise RawDataError(f"raw directory {label_dir} of {sample}/{label} does not exist")
        if scans is not None:
            names = [validate_name(s, "scan") for s in scans]
            for name in names:
                if not (label_dir / name).is_dir():
                    raise RawDataError(f"raw scan directory {label_dir / name} does not exist")
            strict = True
        else:
            names = sorted(
                p.name for p in label_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
            )
            strict = False
        pattern = re.compile(rf"^{re.escape(sample)}_(\d+)$")
        out: list[RawScan] = []
        for name in names:
            try:
                validate_name(name, "scan")
            except InvalidNameError as exc:
                if strict:
                    raise
                logger.warning("%s: skipping raw directory %r (%s)", label_dir, name, exc)
                continue
            directory = label_dir / name
            rotations = []
            for sub in sorted(directory.iterdir(), key=_natural_key):
                match = pattern.match(sub.name)
                if not sub.is_dir() or match is None:
                    logger.debug("%s: ignoring %s", directory, sub.name)
                    continue
                images = find_images(sub)
                if not images:
                    raise RawDataError(
                        f"image directory {sub} holds no "
                        + "/".join(s.lstrip(".") for s in IMAGE_SUFFIXES)
                        + " images"
                    )
                rotations.append(RawRotation(int(match.group(1)), sub, images))
            if not rotations:
                if strict:
                    raise RawDataError(
                        f"raw scan directory {directory} holds no image directories "
                        f"'{sample}_NNN/' (NNN = SPEC scan number)"
                    )
                logger.info("%s holds no image directories; skipped", directory)
                continue
            rotations.sort(key=lambda r: r.scan_number)
            out.append(RawScan(name, directory, tuple(rotations)))
        if not out:
            raise RawDataError(
                f"no raw scans in {label_dir}: expected <scan>/{sample}_NNN/ image directories"
            )
        return out

    # ------------------------------------------------------------------ import

    def import_data(
        self,
        experiment: Experiment,
        configuration: str | os.PathLike[str],
        sample: str,
        label: str,
        *,
        scans: Iterable[str] | None = None,
        spec_file: str | os.PathLike[str] | None = None,
        overwrite: bool = False,
        progress: bool = False,
    ) -> list[Path]:
        """Create scan files and detector stacks from the raw tree of ``sample``/``label``.

        Parameters
        ----------
        experiment : Experiment
            The experiment (its settings give ``raw_home`` and ``raw_path``).
        configuration : str or path-like
            Configuration file, or the name of one in ``configurations/``.  It needs
            one rotation entry per image directory of each scan.
        sample, label : str
            Names of the sample and crystal.
        scans : iterable of str, optional
            Import only these raw scan directories (default: all).
        spec_file : path-like, optional
            The SPEC file (default: :meth:`spec_file`).
        overwrite : bool
            Replace existing scan files and stacks (the raw tree is never changed).
        progress : bool
            Show progress bars.

        Returns
        -------
        list of Path
            The scan files written.

        Raises
        ------
        RawDataError
            On a missing or malformed raw tree or an unreadable image.
        SpecFileError
            On a malformed SPEC file or logs that do not match the images.
        FileExistsNXError
            If a scan file or stack exists and ``overwrite`` is False (checked for
            every scan before anything is written).
        TemplateError
            If the configuration is missing or unreadable.
        """
        from ..nexus.template import read_configuration

        config_path = self._configuration_path(experiment, configuration)
        info = read_configuration(config_path)
        experiment.sample_dir(sample, label)  # validates names
        raw_scans = self.find_raw_scans(experiment, sample, label, scans)
        spec_path = Path(spec_file) if spec_file is not None else self.spec_file(experiment, sample)
        label_raw = self.raw_label_directory(experiment, sample, label)
        links = _template_links(config_path, info.entries)
        with read_spec(spec_path) as spec:
            jobs = [
                self._plan(experiment, info, links, spec, raw, sample, label, label_raw, overwrite)
                for raw in raw_scans
            ]
        written = []
        for job in jobs:
            written.append(self._write(job, config_path, overwrite=overwrite, progress=progress))
        return written

    @staticmethod
    def _configuration_path(experiment: Experiment, configuration: str | os.PathLike[str]) -> Path:
        if isinstance(configuration, str) and len(Path(configuration).parts) == 1:
            return experiment.configuration_file(configuration)
        return Path(configuration)

    def _plan(
        self,
        experiment: Experiment,
        info: Any,
        links: Mapping[str, tuple[str, str]],
        spec: SpecFile,
        raw: RawScan,
        sample: str,
        label: str,
        label_raw: Path,
        overwrite: bool,
    ) -> _Job:
        """Check one scan completely before anything is written."""
        paths = experiment.scan_paths(sample, label, raw.scan)
        entries = info.entries
        if len(raw.rotations) != len(entries):
            numbers = ", ".join(str(r.scan_number) for r in raw.rotations)
            raise RawDataError(
                f"raw scan {raw.directory} has {len(raw.rotations)} rotations (SPEC scans "
                f"{numbers}) but configuration {info.path.name} has {len(entries)} "
                f"({', '.join(entries)}); use a configuration with one position per rotation"
            )
        data_dir = self.scan_data_directory(paths)
        raw_real = label_raw.resolve()
        for path in (paths.scan_file, data_dir):
            if path.resolve().is_relative_to(raw_real):
                raise PathSafetyError(
                    f"import would write {path} inside the raw tree {label_raw}; "
                    "point the experiment's analysis and raw directories apart"
                )
        if paths.scan_file.exists() and not overwrite:
            raise FileExistsNXError(
                f"scan file {paths.scan_file} already exists; pass overwrite=True "
                "(--overwrite) to import it again"
            )
        rotations = []
        temperatures = []
        for entry, rot in zip(entries, raw.rotations, strict=True):
            filename, dataset = links[entry]
            target = data_dir / filename
            if target.exists() and not overwrite:
                raise FileExistsNXError(
                    f"detector stack {target} already exists; pass overwrite=True "
                    "(--overwrite) to stack the images again"
                )
            try:
                logs = rotation_logs(spec.scan(rot.scan_number), len(rot.images))
            except SpecFileError as exc:
                hint = ""
                if spec.numbers.count(rot.scan_number) > 1:
                    hint = (
                        f"; the image directory names only the number, so pass spec_file= "
                        f"(--spec-file) naming a SPEC file with one scan {rot.scan_number}"
                    )
                raise SpecFileError(f"{exc} (images in {rot.directory}){hint}") from None
            if logs.temperature is not None:
                temperatures.append(logs.temperature)
            rotations.append(_Rotation(entry, rot, logs, target, dataset))
        temperature = float(np.mean(np.concatenate(temperatures))) if temperatures else None
        if temperature is None:
            logger.warning(
                "%s: no '%s' column in the SPEC scans; no temperature recorded",
                raw.directory,
                TEMPERATURE_COLUMN,
            )
        return _Job(raw, paths, rotations, temperature, tuple(info.shape), spec.path)

    def _write(self, job: _Job, config_path: Path, *, overwrite: bool, progress: bool) -> Path:
        from ..nexus.scanfile import create_scan_file, update_scan_file

        paths = job.paths
        data_dir = self.scan_data_directory(paths)
        made_dirs = [
            d for d in (paths.label_dir.parent, paths.label_dir, data_dir) if not d.exists()
        ]
        temps: dict[Path, Path] = {}
        scan_file: Path | None = None
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            for rot in job.rotations:
                tmp = rot.target.with_name(f".{rot.target.name}.{os.getpid()}.tmp")
                tmp.unlink(missing_ok=True)
                temps[tmp] = rot.target
                stack_images(
                    rot.raw.images,
                    tmp,
                    shape=job.shape,
                    dataset=rot.dataset,
                    progress=progress,
                )
                logger.info(
                    "stacked %d images of %s into %s",
                    len(rot.raw.images),
                    rot.raw.directory,
                    rot.target,
                )
            scan_file = create_scan_file(
                config_path,
                paths.experiment_dir,
                paths.sample,
                paths.label,
                paths.scan,
                temperature=job.temperature,
                overwrite=overwrite,
                data_directory=data_dir,
            )
            with update_scan_file(scan_file) as f:
                _write_logs(f, job)
            for tmp, target in temps.items():
                if target.exists() and not overwrite:
                    raise FileExistsNXError(
                        f"detector stack {target} appeared during the import; not replacing it"
                    )
                os.replace(tmp, target)
            temps.clear()
        except BaseException:
            for tmp in temps:
                tmp.unlink(missing_ok=True)
            if scan_file is not None:
                scan_file.unlink(missing_ok=True)
            for directory in reversed(made_dirs):
                with contextlib.suppress(OSError):
                    directory.rmdir()  # only if still empty
            raise
        logger.info("imported %s (%d rotations)", scan_file, len(job.rotations))
        return scan_file

    # ------------------------------------------------------------------ metadata hooks

    def _spec_scan(self, scan_paths: ScanPaths, entry: str) -> SpecScan | None:
        """The SPEC scan recorded in ``fN/scan_number`` of an imported scan file."""
        from ..nexus.h5tools import read_field

        if not scan_paths.scan_file.is_file():
            return None
        try:
            with h5py.File(scan_paths.scan_file, "r") as f:
                number = read_field(f, f"{entry}/scan_number")
                key = read_field(f, f"{entry}/instrument/logs/spec_scan")
                recorded = read_field(f, f"{entry}/instrument/logs/spec_file")
        except OSError:
            return None
        if number is None:
            return None
        if recorded and Path(recorded).is_file():
            spec_path = Path(recorded)
        else:
            experiment = Experiment.open(scan_paths.experiment_dir)
            spec_path = self.spec_file(experiment, scan_paths.sample)
        with read_spec(spec_path) as spec:
            return spec.scan(str(key) if key else int(number))

    def read_logs(self, scan_paths: ScanPaths, entry: str) -> dict[str, Any]:
        """SPEC data columns of the rotation (``{}`` if the scan was not imported)."""
        scan = self._spec_scan(scan_paths, entry)
        if scan is None:
            return {}
        return {label: scan.data[:, i].copy() for i, label in enumerate(scan.labels)}

    def read_monitor(self, scan_paths: ScanPaths, entry: str, monitor: str) -> np.ndarray | None:
        """Per-frame counts of SPEC column ``monitor`` (e.g. ``flyc1``), or None."""
        scan = self._spec_scan(scan_paths, entry)
        if scan is None or not scan.has_column(monitor):
            return None
        return scan.column(monitor)

    def read_goniometer(self, scan_paths: ScanPaths, entry: str) -> dict[str, Any]:
        """``phi`` (array), ``phi_step``, ``phi_end``, ``chi`` and ``theta`` from SPEC."""
        scan = self._spec_scan(scan_paths, entry)
        if scan is None:
            return {}
        logs = rotation_logs(scan)
        out: dict[str, Any] = {"phi": logs.phi, "phi_step": logs.phi_step, "phi_end": logs.phi_end}
        if logs.chi is not None:
            out["chi"] = logs.chi
        if logs.theta is not None:
            out["theta"] = logs.theta
        return out

    def read_sample(self, scan_paths: ScanPaths) -> dict[str, Any]:
        """``{'temperature': mean sampleT}`` of the scan's rotations (``{}`` if unknown)."""
        values = []
        entries = []
        if scan_paths.scan_file.is_file():
            from ..nexus.scanfile import rotation_entries

            entries = rotation_entries(scan_paths.scan_file)
        for entry in entries:
            scan = self._spec_scan(scan_paths, entry)
            if scan is not None and scan.has_column(TEMPERATURE_COLUMN):
                values.append(scan.column(TEMPERATURE_COLUMN))
        if not values:
            return {}
        return {"temperature": float(np.mean(np.concatenate(values)))}

    def start_time(self, scan_paths: ScanPaths, entry: str) -> str | None:
        """The SPEC ``#D`` date of the rotation as ISO 8601, or None."""
        scan = self._spec_scan(scan_paths, entry)
        return None if scan is None else scan.start_time


# --------------------------------------------------------------------------- writing helpers


def _template_links(config_path: Path, entries: Iterable[str]) -> dict[str, tuple[str, str]]:
    """``{entry: (stack file name, dataset path)}`` as create_scan_file will link them."""
    from ..nexus.template import DATA_PATH

    out = {}
    with h5py.File(config_path, "r") as f:
        for entry in entries:
            filename, dataset = f"{entry}.h5", DATA_PATH
            link = f[entry]["data"].get("data", getlink=True)
            if isinstance(link, h5py.ExternalLink):
                filename = Path(link.filename).name or filename
                dataset = link.path or dataset
            validate_name(filename, "detector file")
            out[entry] = (filename, dataset)
    return out


def _safe_key(name: str) -> str:
    key = re.sub(r"[^0-9A-Za-z_]+", "_", name).strip("_")
    return key or "column"


def _write_logs(f: h5py.File, job: _Job) -> None:
    from ..nexus.h5tools import nx_group, write_field
    from ..nexus.provenance import record_process

    starts = [r.logs.start_time for r in job.rotations if r.logs.start_time]
    if starts:
        write_field(f["entry"], "start_time", min(starts))
    for rot in job.rotations:
        logs = rot.logs
        fe = f[rot.entry]
        n = logs.nframes
        write_field(fe, "scan_number", np.int64(logs.scan_number))
        if logs.start_time:
            write_field(fe, "start_time", logs.start_time)
        inst = nx_group(fe, "instrument", "NXinstrument")
        gon = nx_group(inst, "goniometer", "NXgoniometer")
        write_field(
            gon,
            "phi",
            logs.phi,
            units="degree",
            attrs={"step": np.float64(logs.phi_step), "end": np.float64(logs.phi_end)},
        )
        if logs.chi is not None:
            write_field(gon, "chi", np.float64(logs.chi), units="degree")
        if logs.theta is not None:
            write_field(gon, "theta", np.float64(logs.theta), units="degree")
        det = nx_group(inst, "detector", "NXdetector")
        if logs.count_time is not None:
            write_field(det, "frame_time", np.float64(logs.count_time), units="s")
        frame_time = float(logs.count_time) if logs.count_time is not None else None
        data = nx_group(fe, "data", "NXdata")
        write_field(data, "frame_number", np.arange(n, dtype=np.int32))
        if frame_time is not None:
            write_field(
                data,
                "frame_time",
                frame_time * np.arange(n, dtype=np.float64),
                units="s",
                attrs={"start": logs.start_time or ""},
            )
        mon = nx_group(fe, "monitor", "NXmonitor")
        for name, values in logs.monitors.items():
            write_field(mon, name, np.asarray(values, dtype=np.float64))
        write_field(mon, "frame_number", np.arange(n, dtype=np.int32))
        mon.attrs["signal"] = MONITOR_SIGNAL
        mon.attrs["axes"] = "frame_number"
        collection = nx_group(inst, "logs", "NXcollection")
        for name, values in logs.columns.items():
            write_field(collection, _safe_key(name), values, attrs={"spec_label": name})
        write_field(collection, "spec_command", logs.command)
        write_field(collection, "spec_scan", logs.scan_key)
        write_field(collection, "spec_file", str(job.spec_file))
        positions = nx_group(collection, "positioners", "NXcollection")
        for name, value in logs.positioners.items():
            write_field(positions, _safe_key(name), np.float64(value), attrs={"spec_name": name})
        record_process(
            fe,
            "nxlink",
            parameters={
                "spec_scan_number": logs.scan_number,
                "spec_scan": logs.scan_key,
                "images": str(rot.raw.directory),
                "frames": n,
            },
            summary={
                "frames": n,
                "monitors": sorted(logs.monitors),
                "stack": rot.target.name,
            },
        )
