"""Types of the run documents nxrefine-bs writes and reads (``docs/documents.md``).

The rotation plans (:func:`nxrefine_bs.plans.specs.start_metadata`) build a start
document whose ``nxrefine`` dictionary carries everything the NeXus writer
(:mod:`nxrefine_bs.callbacks.run_writer`) needs; :class:`NXRefineMetadata` is that
dictionary's type, shared by both ends.  Types only: no bluesky import, no side effects.

Examples
--------
>>> sorted(DetectorMetadata.__required_keys__)
['data_key', 'frame_time', 'name']
>>> "phi_end" in GeometryMetadata.__required_keys__
True
"""

# No ``from __future__ import annotations``: TypedDict must see NotRequired at runtime.
from typing import NotRequired, TypedDict

__all__ = [
    "DetectorMetadata",
    "GeometryMetadata",
    "NXRefineMetadata",
    "RotationStart",
    "TranslationMetadata",
]


class DetectorMetadata(TypedDict):
    """``nxrefine.detector``: the detector model and where its frames are."""

    name: str
    """pyFAI detector name (``Pilatus2M``...)."""
    data_key: str
    """Descriptor key of the frames."""
    frame_time: float
    """Frame period in seconds."""


class GeometryMetadata(TypedDict):
    """``nxrefine.geometry``: the planned geometry of the rotation.

    :data:`nxrefine_bs.geometry.RUN_GEOMETRY_KEYS` plus ``phi_end``; angles in degrees,
    lengths in mm (detector) or Angstrom (wavelength).
    """

    wavelength: float
    distance: float
    pixel_size: float
    shape: list[int]
    beam_center_x: float
    beam_center_y: float
    yaw: float
    pitch: float
    roll: float
    detector_orientation: str
    chi: float
    omega: float
    theta: float
    phi_start: float
    phi_step: float
    phi_end: float


class TranslationMetadata(TypedDict):
    """``nxrefine.translation``: detector translation of this rotation (mm)."""

    x: float
    y: float


class NXRefineMetadata(TypedDict):
    """The start document's ``nxrefine`` dictionary (one rotation = one ``fN`` entry)."""

    experiment_dir: str
    """Absolute experiment directory."""
    beamline: str
    """Registered beamline layout name (``sim``, ``QM2``...)."""
    configuration: str | None
    """Absolute path of the configuration template, or None."""
    temperature_units: str
    """Units of the start document's ``temperature`` (``K``)."""
    detector: DetectorMetadata
    monitors: list[str]
    """Monitor names, e.g. ``["MCS1", "MCS2"]``."""
    geometry: GeometryMetadata
    translation: TranslationMetadata
    n_frames: int
    """Planned number of frames."""
    rotation_index: int
    """This rotation's 1-based position in its scan."""
    rotations: int
    """Number of rotations planned for the scan."""


class RotationStart(TypedDict):
    """The nxrefine-bs keys of a rotation's start document (besides bluesky's own).

    Bluesky adds ``uid``, ``time``, ``scan_id``...; the plans also record
    ``plan_args``, ``detectors``, ``motors``, ``num_points`` and ``hints``.
    """

    plan_name: str
    sample: str
    label: str
    scan: str
    entry: str
    nxrefine: NXRefineMetadata
    temperature: NotRequired[float]
    """Set point of a temperature series (K)."""
