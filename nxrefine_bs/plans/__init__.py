"""Bluesky plans of nxrefine-bs: rotations, multi-rotation scans, temperature series.

The reduction plans live in :mod:`nxrefine_bs.plans.reduction`.
"""

from .rotation import (
    RotationSpec,
    frame_count,
    multi_rotation_scan,
    prepare_rotation,
    rotation_scan,
    start_metadata,
    step_rotation_scan,
    temperature_series,
)

__all__ = [
    "RotationSpec",
    "frame_count",
    "multi_rotation_scan",
    "prepare_rotation",
    "rotation_scan",
    "start_metadata",
    "step_rotation_scan",
    "temperature_series",
]
