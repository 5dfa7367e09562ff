"""Bluesky callbacks of nxrefine-bs: the NeXus scan-file writer and what runs beside it.

The names below are imported on first use (:pep:`562`), so ``import
nxrefine_bs.callbacks`` itself loads nothing heavy (no bluesky, h5py or event-model).

* :class:`NeXusScanWriter` -- writes each run into its ``fN`` entry (critical).
* :class:`PostScanReduction` -- queues the reduction steps after a scan (non-critical).
* :class:`FrameProgress` -- a frame progress bar.
* :class:`NonCritical` -- runs a callback so that its failures cannot stop a scan.
* :class:`BeamlineRunEngine` -- a RunEngine that isolates non-critical callbacks.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .isolation import BeamlineRunEngine, NonCritical
    from .nexus_writer import NeXusScanWriter
    from .progress import FrameProgress
    from .reduction import PostScanReduction

__all__ = [
    "BeamlineRunEngine",
    "FrameProgress",
    "NeXusScanWriter",
    "NonCritical",
    "PostScanReduction",
]

_WHERE = {
    "BeamlineRunEngine": ".isolation",
    "NonCritical": ".isolation",
    "NeXusScanWriter": ".nexus_writer",
    "FrameProgress": ".progress",
    "PostScanReduction": ".reduction",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
