"""A simulated beamline IOC (caproto, Channel Access) for the EPICS devices and their tests.

:class:`BeamlineIOC` holds the PVs (motor records, temperature controller, monitors,
areaDetector driver and NDFileHDF5 plugin); :func:`run_ioc` serves them
(``nxrefine-bs ioc --prefix SIM:``).
"""

from .beamline import BeamlineIOC, IOCConfig, run_ioc
from .motor import MotionProfile

__all__ = ["BeamlineIOC", "IOCConfig", "MotionProfile", "run_ioc"]
