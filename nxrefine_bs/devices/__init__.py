"""Simulated beamline devices (ophyd-async, and ophyd v1 for step scans).

* :class:`SimGoniometer` (``phi``, ``chi``, ``omega``, ``theta``), :class:`SimDetectorStage`
* :class:`SimIonChamber` monitors, :class:`SimTemperatureController`
* :class:`SimRotationDetector`: flyable/triggerable detector writing SWMR HDF5 stacks
* ophyd v1: :class:`SimRotationDetectorV1` (Resource/Datum), :class:`SimGoniometerV1`...
* :func:`make_sim_beamline` (``api="ophyd-async"`` or ``"ophyd"``) -> the device bundle
  :class:`SimBeamlineDevices`
"""

from .beamline import (
    SimBeamlineDevices,
    default_crystal,
    default_geometry,
    detector_model,
    make_sim_beamline,
)
from .detector import RotationPathProvider, SimRotationDetector
from .frames import DATA_PATH, NDATTRIBUTES, NDATTRIBUTES_PATH, FrameFile, FrameSource
from .goniometer import SimDetectorStage, SimGoniometer
from .monitors import SimIonChamber, SimTemperatureController
from .v1 import SimDetectorStageV1, SimGoniometerV1, SimMonitorV1, SimRotationDetectorV1

__all__ = [
    "DATA_PATH",
    "NDATTRIBUTES",
    "NDATTRIBUTES_PATH",
    "FrameFile",
    "FrameSource",
    "RotationPathProvider",
    "SimBeamlineDevices",
    "SimDetectorStage",
    "SimDetectorStageV1",
    "SimGoniometer",
    "SimGoniometerV1",
    "SimIonChamber",
    "SimMonitorV1",
    "SimRotationDetector",
    "SimRotationDetectorV1",
    "SimTemperatureController",
    "default_crystal",
    "default_geometry",
    "detector_model",
    "make_sim_beamline",
]
