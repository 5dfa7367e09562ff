"""Two-dimensional detector pixel masks.

A pixel mask is a 2-D ``int8`` array of the detector shape with ``1`` for masked
(ignored) pixels and ``0`` for good ones.  It is stored in every ``fN`` entry of a
configuration template or scan file as ``fN/instrument/detector/pixel_mask``.

Coordinates follow the image convention of the rest of nxrefine-bs: ``x`` is the column
(fast axis) and ``y`` the row (slow axis), both in pixels counted from 0.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..errors import CalibrationError, MaskError
from ..nexus.h5tools import write_field
from .convert import get_detector
from .images import load_image
from .nexus_io import atomic_h5_update, resolve_entries

if TYPE_CHECKING:  # pragma: no cover
    from pyFAI.detectors import Detector

__all__ = [
    "MaskError",
    "PixelMask",
    "read_pixel_mask",
    "write_pixel_mask",
    "save_mask_preview",
]

logger = logging.getLogger(__name__)


class PixelMask:
    """Editable 2-D pixel mask (``int8``, 1 = masked).

    Parameters
    ----------
    shape_or_array : tuple of int or array_like
        Detector shape ``(ny, nx)`` for an empty mask, or an existing mask (nonzero =
        masked), which is copied.

    Examples
    --------
    >>> m = PixelMask((4, 5))
    >>> m.add_rectangle(1, 0, 2, 1).count
    4
    """

    def __init__(self, shape_or_array: tuple[int, int] | ArrayLike) -> None:
        arr = np.asarray(shape_or_array)
        if arr.ndim == 1 and arr.size == 2 and np.issubdtype(arr.dtype, np.integer):
            self._mask = np.zeros(tuple(int(s) for s in arr), dtype=np.int8)
        elif arr.ndim == 2:
            self._mask = (arr != 0).astype(np.int8)
        else:
            raise MaskError(f"a pixel mask needs a shape (ny, nx) or a 2-D array, got {arr.shape}")

    @classmethod
    def for_detector(cls, detector: str | Detector) -> PixelMask:
        """Empty mask of a pyFAI detector's shape, with its module gaps masked."""
        det = get_detector(detector)
        return cls(tuple(det.shape)).combine_with_detector_gaps(det)

    # ---- views ------------------------------------------------------------------------
    @property
    def array(self) -> NDArray[np.int8]:
        """The mask array itself (``int8``, 1 = masked); edits change the mask."""
        return self._mask

    @property
    def shape(self) -> tuple[int, int]:
        """Mask shape ``(ny, nx)``."""
        return tuple(self._mask.shape)  # type: ignore[return-value]

    @property
    def count(self) -> int:
        """Number of masked pixels."""
        return int(np.count_nonzero(self._mask))

    def __array__(self, dtype: object = None, copy: object = None) -> NDArray:
        return self._mask if dtype is None else self._mask.astype(dtype)  # type: ignore[call-overload]  # numpy passes a dtype

    def __repr__(self) -> str:
        return f"PixelMask(shape={self.shape}, masked={self.count})"

    def copy(self) -> PixelMask:
        """Independent copy."""
        return PixelMask(self._mask.copy())

    # ---- edits ------------------------------------------------------------------------
    def clear(self) -> PixelMask:
        """Unmask every pixel."""
        self._mask[...] = 0
        return self

    def add_rectangle(self, x0: float, y0: float, x1: float, y1: float) -> PixelMask:
        """Mask pixels with ``x0 <= x <= x1`` and ``y0 <= y <= y1`` (corners in any order).

        The rectangle is clipped to the detector; bounds are inclusive pixel indices
        (fractional values are rounded to the nearest pixel).
        """
        ny, nx = self.shape
        xa, xb = sorted((round(x0), round(x1)))
        ya, yb = sorted((round(y0), round(y1)))
        xa, ya = max(xa, 0), max(ya, 0)
        xb, yb = min(xb, nx - 1), min(yb, ny - 1)
        if xa <= xb and ya <= yb:
            self._mask[ya : yb + 1, xa : xb + 1] = 1
        else:
            logger.warning("rectangle (%s, %s)-(%s, %s) is off the detector", x0, y0, x1, y1)
        return self

    def add_circle(self, xc: float, yc: float, r: float) -> PixelMask:
        """Mask pixels whose index ``(x, y)`` lies within ``r`` pixels of ``(xc, yc)``."""
        if r < 0:
            raise MaskError(f"circle radius must be positive, got {r}")
        ny, nx = self.shape
        y0, y1 = max(int(np.floor(yc - r)), 0), min(int(np.ceil(yc + r)), ny - 1)
        x0, x1 = max(int(np.floor(xc - r)), 0), min(int(np.ceil(xc + r)), nx - 1)
        if y0 > y1 or x0 > x1:
            logger.warning("circle at (%s, %s) r=%s is off the detector", xc, yc, r)
            return self
        yy, xx = np.ogrid[y0 : y1 + 1, x0 : x1 + 1]
        inside = (xx - xc) ** 2 + (yy - yc) ** 2 <= r * r
        self._mask[y0 : y1 + 1, x0 : x1 + 1][inside] = 1
        return self

    def add_array(self, mask: ArrayLike) -> PixelMask:
        """Mask every pixel that is nonzero in ``mask`` (same shape)."""
        arr = np.asarray(mask)
        if arr.shape != self.shape:
            raise MaskError(f"mask shape {arr.shape} does not match pixel mask shape {self.shape}")
        self._mask[arr != 0] = 1
        return self

    def add_negative_pixels(self, image: ArrayLike) -> PixelMask:
        """Mask pixels whose value in ``image`` is negative or not finite (gaps, dead pixels)."""
        img = np.asarray(image, dtype=np.float64)
        if img.shape != self.shape:
            raise MaskError(f"image shape {img.shape} does not match pixel mask shape {self.shape}")
        self._mask[~np.isfinite(img) | (img < 0)] = 1
        return self

    def import_mask_image(self, path: str | os.PathLike[str], *, replace: bool = True) -> PixelMask:
        """Load a mask from an image file; nonzero pixels are masked.

        Parameters
        ----------
        path : path
            Any file :func:`nxrefine_bs.calibration.powder.load_image` reads (fabio
            formats, HDF5 with optional ``#/dataset``).
        replace : bool
            Replace the current mask (default, as NXRefine's mask import) or add to it.

        Raises
        ------
        MaskError
            If the image cannot be read or its shape differs from the mask's.
        """
        try:
            data = load_image(path)
        except CalibrationError as exc:
            raise MaskError(f"cannot import mask: {exc}") from exc
        if data.shape != self.shape:
            raise MaskError(
                f"mask image {os.fspath(path)!r} has shape {data.shape} but the detector "
                f"mask has shape {self.shape}; use an image of the detector's size"
            )
        new = ((data != 0) & ~np.isnan(data)).astype(np.int8)
        if replace:
            self._mask[...] = new
        else:
            self._mask |= new
        return self

    def combine_with_detector_gaps(self, detector: str | Detector) -> PixelMask:
        """Also mask the pixels masked by a pyFAI detector definition (module gaps)."""
        det = get_detector(detector)
        if det.mask is None:
            return self
        gaps = np.asarray(det.mask)
        if gaps.shape != self.shape:
            raise MaskError(
                f"detector {det.name!r} has shape {gaps.shape} but the mask has shape {self.shape}"
            )
        self._mask[gaps != 0] = 1
        return self


# --------------------------------------------------------------------------------------
# NeXus I/O
# --------------------------------------------------------------------------------------
def read_pixel_mask(filename: str | os.PathLike[str], entry: str = "f1") -> PixelMask | None:
    """Read ``<entry>/instrument/detector/pixel_mask``; ``None`` if the entry has none.

    Raises
    ------
    MaskError
        If the file or entry does not exist.
    """
    path = os.fspath(filename)
    if not os.path.isfile(path):
        raise MaskError(f"NeXus file {path!r} does not exist")
    try:
        with h5py.File(path, "r") as f:
            if entry not in f:
                raise MaskError(f"NeXus file {path!r} has no entry {entry!r}")
            ds = f[entry].get("instrument/detector/pixel_mask")
            if not isinstance(ds, h5py.Dataset):
                return None
            return PixelMask(np.asarray(ds[()]))
    except OSError as exc:
        raise MaskError(f"cannot read pixel mask from {path!r}: {exc}") from exc


def write_pixel_mask(
    filename: str | os.PathLike[str],
    mask: PixelMask | ArrayLike,
    entries: Sequence[str] | str | None = None,
) -> list[str]:
    """Write ``fN/instrument/detector/pixel_mask`` (``int8``) into a template or scan file.

    Parameters
    ----------
    filename : path
        Configuration template or scan file.
    mask : PixelMask or array_like
        The mask (nonzero = masked).
    entries : str or sequence of str, optional
        Entries to update; ``None`` means every ``fN`` entry.

    Returns
    -------
    list of str
        The entries written.

    Raises
    ------
    MaskError
        If the file or an entry is missing or the mask shape differs from an entry's
        ``detector/shape``.  The file is left untouched on any error.
    """
    arr = np.asarray(mask.array if isinstance(mask, PixelMask) else mask)
    if arr.ndim != 2:
        raise MaskError(f"pixel mask must be 2-D, got shape {arr.shape}")
    arr = (arr != 0).astype(np.int8)
    path = os.fspath(filename)
    try:
        wanted = resolve_entries(path, entries)
    except MaskError:
        raise
    except CalibrationError as exc:
        raise MaskError(str(exc)) from exc
    with h5py.File(path, "r") as f:
        for e in wanted:
            shape = f[e].get("instrument/detector/shape")
            if isinstance(shape, h5py.Dataset):
                s = tuple(int(v) for v in np.ravel(shape[()]))
                if len(s) == 2 and s != arr.shape:
                    raise MaskError(
                        f"entry {e!r} of {path!r} has detector shape {s} but the mask has "
                        f"shape {arr.shape}"
                    )
    with atomic_h5_update(path) as f:
        for e in wanted:
            det = f[e]["instrument/detector"]
            write_field(det, "pixel_mask", arr, dtype=np.int8, compression="gzip")
    logger.info("wrote pixel mask (%d pixels) to %s entries %s", int(arr.sum()), path, wanted)
    return wanted


def save_mask_preview(
    mask: PixelMask | ArrayLike,
    image: ArrayLike | None,
    png: str | os.PathLike[str],
) -> Path:
    """Save a PNG of the image (log scale) with masked pixels overlaid in red.

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend change).
    """
    # heavy: matplotlib, only for the preview
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    arr = np.asarray(mask.array if isinstance(mask, PixelMask) else mask) != 0
    out = Path(png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(8, 8 * arr.shape[0] / max(arr.shape[1], 1) + 0.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if image is not None:
        img = np.asarray(image, dtype=np.float64)
        if img.shape != arr.shape:
            raise MaskError(f"image shape {img.shape} does not match mask shape {arr.shape}")
        disp = np.full(img.shape, np.nan)
        ok = np.isfinite(img) & (img > 0)
        disp[ok] = np.log10(img[ok])
        ax.imshow(disp, origin="lower", cmap="gray_r", interpolation="nearest")
    overlay = np.ma.masked_where(~arr, arr.astype(float))
    ax.imshow(
        overlay, origin="lower", cmap=ListedColormap(["red"]), alpha=0.5,
        interpolation="nearest", vmin=0, vmax=1,
    )  # fmt: skip
    ax.set_title(f"pixel mask: {int(arr.sum())} masked pixels")
    ax.set_xlabel("x (pixel)")
    ax.set_ylabel("y (pixel)")
    fig.savefig(out)
    return out
