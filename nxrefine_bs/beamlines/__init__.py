"""Beamline descriptions: the :class:`BeamLine` base class and its registry.

Built-in beamlines are ``sim`` (:class:`~nxrefine_bs.beamlines.sim.SimBeamline`) and
``QM2`` (:class:`~nxrefine_bs.beamlines.qm2.QM2Beamline`); others come from entry
points in the group ``nxrefine_bs.beamlines``.
"""

from __future__ import annotations

from .base import BeamLine
from .registry import ENTRY_POINT_GROUP, available_beamlines, get_beamline

__all__ = ["BeamLine", "ENTRY_POINT_GROUP", "available_beamlines", "get_beamline"]
