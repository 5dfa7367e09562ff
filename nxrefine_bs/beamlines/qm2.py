"""QM2 at CHESS: raw images in a tree parallel to the analysis tree.

Raw data of a scan live in ``raw_home/<experiment>/<raw_path>/<sample>/<label>/<scan>/``
(set ``[instrument] raw_home`` and ``raw_path``), with SPEC logs describing each
rotation.  Scan files and stacked ``fN.h5`` files are written into the analysis tree,
so :meth:`QM2Beamline.scan_data_directory` is the analysis scan directory.

The import from SPEC files and image stacks is not implemented yet:
:meth:`QM2Beamline.import_data` raises a clear error.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import ClassVar

from ..errors import NXRefineBSError
from ..experiment import Experiment
from .base import BeamLine

__all__ = ["QM2Beamline"]

logger = logging.getLogger(__name__)


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

    def import_data(
        self,
        experiment: Experiment,
        configuration: Path,
        sample: str,
        label: str,
        *,
        overwrite: bool = False,
    ) -> list[Path]:
        """Create scan files from the raw tree of ``sample``/``label`` (not implemented yet).

        The planned import walks ``<raw directory>/<sample>/<label>/<scan>/``, reads
        the SPEC log of each rotation (monitors, phi range, chi, theta, temperature,
        start time), stacks the images of each rotation into ``<scan>/fN.h5`` and
        writes ``<sample>_<scan>.nxs`` from ``configuration``.

        Raises
        ------
        NXRefineBSError
            Always, for now.
        """
        raw = self.raw_directory(experiment)
        where = f" from {raw / sample / label}" if raw is not None else ""
        raise NXRefineBSError(
            f"importing QM2 data{where} is not implemented yet in nxrefine-bs; "
            "create scan files with 'nxrefine-bs scan new' and stack images into fN.h5 "
            "yourself meanwhile"
        )
