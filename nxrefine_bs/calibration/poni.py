"""pyFAI ``.poni`` files: import into and export from a :class:`.CalibrationResult`."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ..errors import CalibrationError
from .result import CalibrationResult, _shape2

__all__ = ["read_poni", "write_poni"]


def read_poni(path: str | os.PathLike[str]) -> CalibrationResult:
    """Read a pyFAI ``.poni`` file into a :class:`CalibrationResult`.

    Raises
    ------
    CalibrationError
        If the file is missing or is not a valid PONI file.
    """
    from pyFAI.io.ponifile import PoniFile  # heavy: pyFAI, loaded on first use

    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"PONI file {os.fspath(path)!r} does not exist")
    try:
        poni = PoniFile(str(p))
        det = poni.detector
        if det is None or det.pixel1 is None:
            raise ValueError("no detector or pixel size")
        geo = poni
        result = CalibrationResult(
            detector=str(det.name),
            pixel1=float(det.pixel1),
            pixel2=float(det.pixel2),
            shape=_shape2(det.shape or det.max_shape or (0, 0)),
            wavelength=float(geo.wavelength) if geo.wavelength else float("nan"),
            dist=float(geo.dist),
            poni1=float(geo.poni1),
            poni2=float(geo.poni2),
            rot1=float(geo.rot1),
            rot2=float(geo.rot2),
            rot3=float(geo.rot3),
            pyfai_detector=det,
        )
    except Exception as exc:
        raise CalibrationError(
            f"cannot read PONI file {os.fspath(path)!r} ({type(exc).__name__}: {exc})"
        ) from exc
    return result


def write_poni(result: CalibrationResult, path: str | os.PathLike[str]) -> Path:
    """Write ``result`` as a pyFAI ``.poni`` file (replacing any existing file)."""
    from pyFAI.io.ponifile import PoniFile  # heavy: pyFAI, loaded on first use

    p = Path(path)
    ai = result.integrator()
    poni = PoniFile(ai)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as fd:
            poni.write(fd)
        os.replace(tmp, p)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise CalibrationError(f"cannot write PONI file {os.fspath(p)!r}: {exc}") from exc
    return p
