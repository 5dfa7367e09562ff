"""Powder calibration of the detector geometry with pyFAI (compatibility facade).

The calibration is split into modules with one job each; this module re-exports their
public names, so ``from nxrefine_bs.calibration.powder import ...`` keeps working:

* :mod:`.convert` -- pyFAI detectors and calibrants, PONI <-> nxrefine-bs geometry;
* :mod:`.result` -- :class:`CalibrationResult`;
* :mod:`.images` -- reading powder images;
* :mod:`.search` -- starting geometries from the image alone (no hint);
* :mod:`.rings` -- control-point picking on the rings;
* :mod:`.refine` -- :func:`calibrate_powder` (search, picking, least squares, quality checks);
* :mod:`.poni` -- ``.poni`` files;
* :mod:`.nexus_io` -- writing the calibration into templates and scan files;
* :mod:`.plots` -- cake and ring-overlay plots.
"""

from __future__ import annotations

from .convert import (
    DEFAULT_ORIENTATION,
    calibrant_names,
    get_calibrant,
    get_detector,
    nxrefine_to_poni,
    poni_to_nxrefine,
)
from .images import load_image
from .nexus_io import (
    POLARIZATION_FACTOR,
    atomic_h5_update,
    entry_names,
    resolve_entries,
    write_calibration,
)
from .plots import save_plots
from .poni import read_poni, write_poni
from .refine import calibrate_powder
from .result import CalibrationResult

__all__ = [
    "CalibrationResult",
    "DEFAULT_ORIENTATION",
    "POLARIZATION_FACTOR",
    "atomic_h5_update",
    "calibrant_names",
    "calibrate_powder",
    "entry_names",
    "get_calibrant",
    "get_detector",
    "load_image",
    "nxrefine_to_poni",
    "poni_to_nxrefine",
    "read_poni",
    "resolve_entries",
    "save_plots",
    "write_calibration",
    "write_poni",
]
