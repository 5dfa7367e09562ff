"""Reading powder images (fabio formats and HDF5/NeXus) and checking them against a detector."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fabio
import h5py
import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..errors import CalibrationError
from ..nexus.codecs import ensure_plugins
from .convert import get_detector

if TYPE_CHECKING:  # pragma: no cover
    from pyFAI.detectors import Detector

__all__ = ["load_image", "prepare_image"]

_HDF5_SUFFIXES = {".h5", ".hdf5", ".hdf", ".nxs", ".nx5", ".nx"}


def _first_image_dataset(h5file: Any) -> str | None:
    found: list[str] = []

    def visit(name: str, obj: Any) -> Any:
        if isinstance(obj, h5py.Dataset) and obj.dtype.kind in "iuf":
            shape = tuple(s for s in obj.shape)
            if len(shape) == 2 or (len(shape) == 3 and shape[0] == 1):
                found.append(name)
                return True
        return None

    h5file.visititems(visit)
    return found[0] if found else None


def load_image(path: str | os.PathLike[str]) -> NDArray[np.float64]:
    """Read a 2-D detector image.

    Parameters
    ----------
    path : str or path-like
        A file fabio can read (TIFF, CBF, EDF, ...), or an HDF5/NeXus file: either
        ``file.h5#/path/to/dataset`` or ``file.h5`` (the first 2-D numeric dataset, or a
        3-D one holding a single frame, is used).  A 3-D dataset named explicitly is
        summed over its first axis.

    Returns
    -------
    numpy.ndarray
        The image as ``float64``.

    Raises
    ------
    CalibrationError
        If the file is missing or cannot be read as an image; the message names it.
    """
    text = os.fspath(path)
    filename, _, dataset = text.partition("#")
    p = Path(filename)
    if not p.is_file():
        raise CalibrationError(f"powder image {filename!r} does not exist")
    try:
        is_hdf5 = h5py.is_hdf5(p)
    except OSError:
        is_hdf5 = False
    try:
        if is_hdf5 or p.suffix.lower() in _HDF5_SUFFIXES:
            ensure_plugins()  # compressed images (bitshuffle-LZ4, ...)
            with h5py.File(p, "r") as f:
                name = dataset or _first_image_dataset(f)
                if not name:
                    raise CalibrationError(
                        f"powder image {filename!r} holds no 2-D dataset; name one as "
                        f"'{filename}#/path/to/dataset'"
                    )
                obj = f.get(name)
                if not isinstance(obj, h5py.Dataset):
                    raise CalibrationError(f"powder image {filename!r} has no dataset {name!r}")
                data = np.asarray(obj[()], dtype=np.float64)
            if data.ndim == 3:
                data = data.sum(axis=0)
        else:
            with fabio.open(str(p)) as img:
                data = np.asarray(img.data, dtype=np.float64)
    except CalibrationError:
        raise
    except Exception as exc:
        raise CalibrationError(
            f"cannot read powder image {filename!r} ({type(exc).__name__}: {exc}); "
            "use a TIFF, CBF, EDF or HDF5 file"
        ) from exc
    if data.ndim != 2:
        raise CalibrationError(
            f"powder image {text!r} has shape {data.shape}; a 2-D image is needed"
        )
    return data


def prepare_image(
    image: NDArray | str | os.PathLike[str],
    detector: str | Detector,
    mask: ArrayLike | None,
) -> tuple[NDArray[np.float64], Detector, NDArray[np.bool_], str]:
    source = "<array>"
    if isinstance(image, str | os.PathLike):
        source = os.fspath(image)
        image = load_image(image)
    img = np.asarray(image, dtype=np.float64)
    det = get_detector(detector)
    shape = tuple(det.shape or det.max_shape or img.shape)
    if img.ndim != 2:
        raise CalibrationError(f"powder image {source} has shape {img.shape}; 2-D needed")
    if img.shape != shape:
        raise CalibrationError(
            f"powder image {source} has shape {img.shape} but detector {det.name!r} has "
            f"shape {shape}; choose the matching detector"
        )
    valid = np.isfinite(img) & (img >= 0)
    if det.mask is not None:
        valid &= ~np.asarray(det.mask, dtype=bool)
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != img.shape:
            raise CalibrationError(
                f"pixel mask shape {m.shape} does not match image shape {img.shape}"
            )
        valid &= m == 0
    return img, det, valid, source
