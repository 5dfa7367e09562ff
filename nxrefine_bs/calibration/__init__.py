"""Powder calibration of the detector geometry with pyFAI, and 2-D pixel masks.

* :mod:`.refine` -- :func:`calibrate_powder`: zero-click calibration (starting geometry
  found in the image by :mod:`.search`, control points picked by :mod:`.rings`, least
  squares with pyFAI's forward model, fits checked before they are returned);
* :mod:`.convert`, :mod:`.result` -- pyFAI objects, PONI <-> nxrefine-bs geometry,
  :class:`CalibrationResult`;
* :mod:`.images`, :mod:`.poni`, :mod:`.nexus_io`, :mod:`.plots` -- powder images, ``.poni``
  files, ``fN/instrument/calibration`` and the detector geometry in NeXus files, plots;
* :mod:`.masks` -- :class:`PixelMask` editing and ``fN/instrument/detector/pixel_mask`` I/O;
* :mod:`.simulate` -- synthetic calibrant images from a known geometry (tests, benchmarks);
* :mod:`.powder` -- the former single module, re-exporting the names above.

Importing this package imports neither pyFAI nor matplotlib; they are loaded on first use.
"""

from __future__ import annotations

from .convert import calibrant_names, nxrefine_to_poni, poni_to_nxrefine
from .images import load_image
from .masks import MaskError, PixelMask, read_pixel_mask, save_mask_preview, write_pixel_mask
from .nexus_io import POLARIZATION_FACTOR, write_calibration
from .plots import save_plots
from .poni import read_poni, write_poni
from .refine import calibrate_powder
from .result import CalibrationResult
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
