"""nxrefine-bs: single-crystal diffuse scattering reduction inside the Bluesky ecosystem."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
