"""Detector images of a raw tree: image directories and stacking into HDF5.

Used by beamline plugins that import frames written as one file per frame (CBF or TIFF,
read with fabio), e.g. :class:`~nxrefine_bs.beamlines.qm2.QM2Beamline`.  The raw files
are only read.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from numpy.typing import NDArray
from tqdm import tqdm

from ..errors import RawDataError

__all__ = [
    "IMAGE_SUFFIXES",
    "RawDataError",
    "RawRotation",
    "RawScan",
    "find_images",
    "natural_key",
    "stack_images",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES: tuple[str, ...] = (".cbf", ".tif", ".tiff")
"""File name endings of the detector images that are stacked (case-insensitive)."""

INT32_MAX = int(np.iinfo(np.int32).max)


def natural_key(path: Path) -> tuple[Any, ...]:
    """Sort key putting ``x_2`` before ``x_10`` (numbers in the name compared as numbers)."""
    parts = re.split(r"(\d+)", path.name)
    return tuple(int(p) if p.isdigit() else p for p in parts)


@dataclass(frozen=True)
class RawRotation:
    """One rotation in the raw tree: a ``<sample>_NNN/`` image directory."""

    scan_number: int
    directory: Path
    images: tuple[Path, ...]


@dataclass(frozen=True)
class RawScan:
    """One raw scan directory ``<sample>/<label>/<scan>/`` and its rotations."""

    scan: str
    directory: Path
    rotations: tuple[RawRotation, ...]


def find_images(directory: Path) -> tuple[Path, ...]:
    """Image files of a rotation directory, in natural order (``_2`` before ``_10``)."""
    return tuple(
        sorted(
            (
                p
                for p in directory.iterdir()
                if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES)
            ),
            key=natural_key,
        )
    )


def _read_image(path: Path) -> NDArray[Any]:
    import fabio

    try:
        image = fabio.open(str(path))
        data = np.asarray(image.data)
    except Exception as exc:  # fabio raises many kinds of errors on bad files
        raise RawDataError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc
    if data.ndim != 2:
        raise RawDataError(f"image {path} has {data.ndim} dimensions; expected a 2-D frame")
    return data


def stack_images(
    images: Iterable[Path],
    target: str | os.PathLike[str],
    *,
    shape: tuple[int, int] | None = None,
    dataset: str = "/entry/data/data",
    progress: bool = False,
) -> tuple[int, np.dtype]:
    """Stack detector images into a new HDF5 file (one frame per chunk).

    Integer images are stored as int32 (unsigned values above the int32 range, such
    as the all-ones flag of masked pixels, become -1, i.e. invalid); floating-point
    images as float32.  The caller writes to a temporary name and renames it.

    Parameters
    ----------
    images : iterable of Path
        The frames, in order (CBF or TIFF, read with fabio).
    target : path-like
        New HDF5 file (must not exist).
    shape : tuple of int, optional
        Expected ``(ny, nx)`` of every image.
    dataset : str
        Path of the stack in ``target``.
    progress : bool
        Show a progress bar.

    Returns
    -------
    tuple
        ``(number of frames, dtype)``.

    Raises
    ------
    RawDataError
        If an image is unreadable or its shape differs from ``shape`` or the first one.
    """
    images = list(images)
    if not images:
        raise RawDataError(f"no images to stack into {target}")
    target = Path(target)
    first = _read_image(images[0])
    ny, nx = first.shape
    if shape is not None and (ny, nx) != tuple(shape):
        raise RawDataError(
            f"image {images[0]} is {ny}x{nx} pixels but the configuration's detector is "
            f"{shape[0]}x{shape[1]}; choose the configuration of this detector"
        )
    integer = first.dtype.kind in "iub"
    dtype = np.dtype(np.int32) if integer else np.dtype(np.float32)
    clipped = 0
    with h5py.File(target, "x", libver="latest") as f:
        ds = f.create_dataset(dataset, shape=(len(images), ny, nx), dtype=dtype, chunks=(1, ny, nx))
        group = ds.parent
        if group.name != "/":
            group.attrs["NX_class"] = "NXdata"
            group.attrs["signal"] = ds.name.rsplit("/", 1)[-1]
            if group.parent.name != "/":
                group.parent.attrs["NX_class"] = "NXentry"
        for i, path in enumerate(
            tqdm(images, disable=not progress, desc=target.name, unit="frame")
        ):
            data = first if i == 0 else _read_image(path)
            if data.shape != (ny, nx):
                raise RawDataError(
                    f"image {path} is {data.shape[0]}x{data.shape[1]} pixels but the "
                    f"first image {images[0].name} is {ny}x{nx}"
                )
            if integer:
                if data.dtype.kind == "f":
                    raise RawDataError(
                        f"image {path} holds floating-point values but {images[0].name} "
                        "holds integers"
                    )
                if data.dtype.kind == "u" and data.dtype.itemsize >= 4:
                    big = data > INT32_MAX
                    if big.any():
                        clipped += int(big.sum())
                        data = np.where(big, -1, data)
                ds[i] = data.astype(np.int32)
            else:
                ds[i] = data.astype(np.float32)
    if clipped:
        logger.warning(
            "%s: %d pixel values above the int32 range were stored as -1 (invalid)",
            target,
            clipped,
        )
    return len(images), dtype


# --------------------------------------------------------------------------- beamline
