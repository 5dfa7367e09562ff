"""The :class:`BeamLine` base class: a beamline *layout*, where a beamline keeps its data
and metadata (not its devices: see :mod:`nxrefine_bs.devices`).

A beamline subclass says where the detector stacks ``fN.h5`` of a scan live, where
its raw tree is, and how to read beamline logs (monitor counts, goniometer angles,
sample environment, start time).  Subclasses are registered under the entry-point
group ``nxrefine_bs.beamlines`` (see :mod:`nxrefine_bs.beamlines.registry`).

Every hook has a working default: the read hooks return None or an empty dict, so a
beamline only overrides what it knows.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..errors import NXRefineBSError
from ..experiment import Experiment, ScanPaths, safe_join, validate_name

__all__ = ["BeamLine"]

logger = logging.getLogger(__name__)


class BeamLine:
    """Base class of beamline layouts (data locations and log readers).

    Instances hold no state of their own: every hook receives the experiment or the
    scan it is about.  Class attributes describe the beamline.

    Attributes
    ----------
    name : str
        Registry name (``[instrument] instrument`` in settings), e.g. ``'QM2'``.
    source_name : str
        Facility, written to ``instrument/source/name``.
    source_type : str
        NeXus source type.
    import_data_enabled : bool
        True if :meth:`import_data` builds scan files from a raw tree.
    """

    name: ClassVar[str] = ""
    source_name: ClassVar[str] = ""
    source_type: ClassVar[str] = "Synchrotron X-ray Source"
    import_data_enabled: ClassVar[bool] = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

    # ------------------------------------------------------------------ paths

    def raw_directory(self, experiment: Experiment) -> Path | None:
        """Raw tree of an experiment: ``raw_home/<experiment>[/<raw_path>]``.

        Returns None if ``[instrument] raw_home`` is not set.
        """
        instrument = experiment.instrument_settings()
        raw_home = instrument.get("raw_home")
        if not raw_home:
            return None
        parts = [validate_name(instrument.get("experiment") or experiment.name, "experiment")]
        raw_path = instrument.get("raw_path")
        if raw_path:
            parts.extend(p for p in Path(raw_path).parts if p not in ("", "."))
        return safe_join(Path(raw_home).expanduser(), *parts)

    def raw_scan_directory(self, experiment: Experiment, scan_paths: ScanPaths) -> Path | None:
        """Raw directory of one scan: ``<raw directory>/<sample>/<label>/<scan>``."""
        root = self.raw_directory(experiment)
        if root is None:
            return None
        return safe_join(root, scan_paths.sample, scan_paths.label, scan_paths.scan)

    def scan_data_directory(self, scan_paths: ScanPaths) -> Path:
        """Directory holding the detector stacks ``fN.h5`` (default: the scan directory)."""
        return scan_paths.scan_dir

    def data_file(self, scan_paths: ScanPaths, entry: str) -> Path:
        """Detector stack of rotation ``entry`` (default ``<scan data dir>/<entry>.h5``)."""
        validate_name(entry, "entry")
        return self.scan_data_directory(scan_paths) / f"{entry}.h5"

    # ------------------------------------------------------------------ import

    def import_data(
        self,
        experiment: Experiment,
        configuration: Path,
        sample: str,
        label: str,
        *,
        overwrite: bool = False,
    ) -> list[Path]:
        """Create scan files (and detector stacks) from the beamline's raw tree.

        Returns
        -------
        list of Path
            The scan files created.

        Raises
        ------
        NXRefineBSError
            Always, unless a subclass with ``import_data_enabled`` overrides it.
        """
        raise NXRefineBSError(
            f"beamline {self.name!r} does not import data; its scans are written "
            "directly into the analysis tree"
        )

    # ------------------------------------------------------------------ metadata hooks

    def read_logs(self, scan_paths: ScanPaths, entry: str) -> dict[str, Any]:
        """Beamline logs of a rotation as ``{name: value or array}`` (default empty)."""
        return {}

    def read_monitor(self, scan_paths: ScanPaths, entry: str, monitor: str) -> np.ndarray | None:
        """Per-frame counts of monitor channel ``monitor`` (default None: unknown)."""
        return None

    def read_goniometer(self, scan_paths: ScanPaths, entry: str) -> dict[str, Any]:
        """Goniometer values (``phi``, ``chi``, ``omega``, ``theta``...) from logs."""
        return {}

    def read_sample(self, scan_paths: ScanPaths) -> dict[str, Any]:
        """Sample values from logs (e.g. ``{'temperature': 300.0}``) (default empty)."""
        return {}

    def start_time(self, scan_paths: ScanPaths, entry: str) -> str | None:
        """ISO 8601 start time of a rotation, or None if unknown."""
        return None

    def source(self) -> Mapping[str, Any]:
        """Fields of ``instrument/source``: name and type."""
        return {"name": self.source_name, "type": self.source_type, "probe": "x-ray"}
