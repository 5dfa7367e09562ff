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
  through :mod:`nxrefine_bs.specfile`, and the data rows of every imported scan are
  checked):
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import h5py
import numpy as np

from ..errors import (
    FileExistsNXError,
    InvalidNameError,
    PathSafetyError,
    RawDataError,
    SpecFileError,
)
from ..experiment import Experiment, ScanPaths, safe_join, validate_name
from ..nexus.entries import rotation_entries
from ..nexus.h5tools import read_field
from ..nexus.scanfile import create_scan_file, update_scan_file
from ..nexus.template import DATA_PATH, read_configuration
from ..specfile import SpecFile, SpecScan
from .base import BeamLine
from .images import IMAGE_SUFFIXES, RawRotation, RawScan, find_images, natural_key, stack_images
from .qm2_logs import (
    TEMPERATURE_COLUMN,
    ImportedRotation,
    RotationLogs,
    rotation_logs,
    write_rotation_logs,
)

__all__ = [
    "QM2Beamline",
    # re-exported from .images and .qm2_logs, where they live
    "RawDataError",
    "RotationLogs",
    "RawRotation",
    "RawScan",
    "rotation_logs",
    "stack_images",
    "IMAGE_SUFFIXES",
]

logger = logging.getLogger(__name__)


@dataclass
class _Job:
    raw: RawScan
    paths: ScanPaths
    rotations: list[ImportedRotation]
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
            for sub in sorted(directory.iterdir(), key=natural_key):
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
        config_path = self._configuration_path(experiment, configuration)
        info = read_configuration(config_path)
        experiment.sample_dir(sample, label)  # validates names
        raw_scans = self.find_raw_scans(experiment, sample, label, scans)
        spec_path = Path(spec_file) if spec_file is not None else self.spec_file(experiment, sample)
        label_raw = self.raw_label_directory(experiment, sample, label)
        links = _template_links(config_path, info.entries)
        with SpecFile(spec_path) as spec:
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
            rotations.append(ImportedRotation(entry, rot, logs, target, dataset))
        temperature = float(np.mean(np.concatenate(temperatures))) if temperatures else None
        if temperature is None:
            logger.warning(
                "%s: no '%s' column in the SPEC scans; no temperature recorded",
                raw.directory,
                TEMPERATURE_COLUMN,
            )
        return _Job(raw, paths, rotations, temperature, tuple(info.shape), spec.path)

    def _write(self, job: _Job, config_path: Path, *, overwrite: bool, progress: bool) -> Path:
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
                write_rotation_logs(f, job.rotations, job.spec_file)
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
        with SpecFile(spec_path) as spec:
            return spec.scan(str(key) if key else int(number))

    def read_logs(self, scan_paths: ScanPaths, entry: str) -> dict[str, Any]:
        """SPEC data columns of the rotation (``{}`` if the scan was not imported)."""
        scan = self._spec_scan(scan_paths, entry)
        if scan is None:
            return {}
        return scan.columns()

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


def _template_links(config_path: Path, entries: Iterable[str]) -> dict[str, tuple[str, str]]:
    """``{entry: (stack file name, dataset path)}`` as create_scan_file will link them."""
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
