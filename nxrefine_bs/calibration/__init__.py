"""Powder calibration of the detector geometry with pyFAI, and 2-D pixel masks.

* :mod:`.powder` -- automatic ring picking and pyFAI geometry refinement, PONI import and
  export, writing ``fN/instrument/calibration`` and the detector geometry, plots.
* :mod:`.masks` -- :class:`PixelMask` editing and ``fN/instrument/detector/pixel_mask`` I/O.
* :mod:`.simulate` -- synthetic calibrant images from a known geometry (tests, benchmarks).

Importing this package imports neither pyFAI nor matplotlib; they are loaded on first use.
"""

from __future__ import annotations

from .masks import MaskError, PixelMask, read_pixel_mask, save_mask_preview, write_pixel_mask
from .powder import (
    POLARIZATION_FACTOR,
    CalibrationResult,
    calibrant_names,
    calibrate_powder,
    load_image,
    nxrefine_to_poni,
    poni_to_nxrefine,
    read_poni,
    save_plots,
    write_calibration,
    write_poni,
)
from .simulate import simulate_powder_image

__all__ = [
    "POLARIZATION_FACTOR",
    "CalibrationResult",
    "MaskError",
    "PixelMask",
    "calibrant_names",
    "calibrate_powder",
    "load_image",
    "nxrefine_to_poni",
    "poni_to_nxrefine",
    "read_pixel_mask",
    "read_poni",
    "save_mask_preview",
    "save_plots",
    "simulate_powder_image",
    "write_calibration",
    "write_pixel_mask",
    "write_poni",
]
