"""The simulated beamline: detector stacks inside the analysis scan directory.

Like APS Sector 6, ``fN.h5`` files are written straight into
``<experiment>/<sample>/<label>/<scan>/`` and there is no separate raw tree.
"""

from __future__ import annotations

import logging
from typing import ClassVar

from .base import BeamLine

__all__ = ["SimBeamline"]

logger = logging.getLogger(__name__)


class SimBeamline(BeamLine):
    """Simulated beamline used by the demo, tests and simulated devices.

    Examples
    --------
    >>> SimBeamline.name
    'sim'
    """

    name: ClassVar[str] = "sim"
    source_name: ClassVar[str] = "nxrefine-bs simulator"
    source_type: ClassVar[str] = "Synchrotron X-ray Source"
    import_data_enabled: ClassVar[bool] = False
