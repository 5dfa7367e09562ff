"""Beamline *layouts*: the :class:`BeamLine` base class and its registry.

A layout says where a beamline keeps its data and logs (detector stacks, raw tree, SPEC
files); it is chosen by name (``[instrument] instrument``).  It is not the devices a
plan drives (the *device bundles* of :mod:`nxrefine_bs.devices`) nor a running set-up
(a *session*, :mod:`nxrefine_bs.session`).

Built-in layouts are ``sim`` (:class:`~nxrefine_bs.beamlines.sim.SimBeamline`) and
``QM2`` (:class:`~nxrefine_bs.beamlines.qm2.QM2Beamline`); others come from entry
points in the group ``nxrefine_bs.beamlines``.
"""

from __future__ import annotations

from .base import BeamLine
from .registry import ENTRY_POINT_GROUP, available_beamlines, get_beamline

__all__ = ["BeamLine", "ENTRY_POINT_GROUP", "available_beamlines", "get_beamline"]
