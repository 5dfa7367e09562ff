"""Pictures of reduction results (PNG files through matplotlib's Agg backend).

:func:`plot_slice` draws one plane (e.g. HK0) of a per-rotation or combined transform.
matplotlib is imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .errors import ReductionError
from .reduce.transform_io import read_transform

logger = logging.getLogger(__name__)

__all__ = ["plot_slice"]


def _slice_title(transform_file: Path) -> str:
    """``<sample> <label> <scan>, T = <T> K`` from the scan file that owns a transform."""
    scan_dir = transform_file.absolute().parent
    for scan_file in sorted(scan_dir.parent.glob(f"*_{scan_dir.name}.nxs")):
        try:
            with h5py.File(scan_file, "r") as f:
                sample = f.get("entry/sample")
                if sample is None:
                    continue
                name = sample["name"][()] if "name" in sample else scan_file.stem
                name = name.decode() if isinstance(name, bytes) else str(name)
                text = f"{name} {scan_dir.parent.name} {scan_dir.name}"
                if "temperature" in sample:
                    text += f", T = {float(np.ravel(sample['temperature'][()])[0]):g} K"
                return f"{text} ({transform_file.name})"
        except (OSError, KeyError, ValueError, IndexError):
            continue
    return transform_file.name


def plot_slice(
    transform_file: str | os.PathLike[str],
    axis: str = "l",
    value: float = 0.0,
    png: str | os.PathLike[str] = "slice.png",
    *,
    vmin: float | None = None,
    vmax: float | None = None,
    title: str | None = None,
) -> Path:
    """Save a PNG of one slice (e.g. HK0) of a transform with a log colour scale.

    Parameters
    ----------
    transform_file : path-like
        A per-entry or combined transform file.  Plots ``/entry/data/data`` if present
        (combined), else ``v / n``.
    axis : {"h", "k", "l"}
        Axis held fixed.
    value : float
        Its value in r.l.u. (the nearest grid plane is used).
    png : path-like
        Output file.
    vmin, vmax : float, optional
        Colour limits (default: positive 1st and 99.9th percentiles).
    title : str, optional
        Plot title (default: sample, label, scan and temperature from the scan file
        next to the transform's directory, if found); the slice is appended.

    Returns
    -------
    pathlib.Path
        The PNG written.
    """
    import matplotlib  # heavy: matplotlib, only when a picture is drawn

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    axis = axis.lower()
    order = {"l": 0, "k": 1, "h": 2}
    if axis not in order:
        raise ReductionError(f"plot axis must be one of h, k, l, got {axis!r}")
    grid, f = read_transform(transform_file)
    with f:
        data = f["entry/data"]
        ax_obj = {"h": grid.h, "k": grid.k, "l": grid.l}[axis]
        i = int(ax_obj.index(value))
        if not 0 <= i < ax_obj.n:
            raise ReductionError(
                f"{axis} = {value} is outside the grid {ax_obj.start:g}..{ax_obj.stop:g}"
            )
        sel: list[Any] = [slice(None)] * 3
        sel[order[axis]] = i
        if "data" in data:
            img = np.asarray(data["data"][tuple(sel)], dtype=np.float64)
        else:
            v = np.asarray(data["v"][tuple(sel)], dtype=np.float64)
            n = np.asarray(data["n"][tuple(sel)], dtype=np.float64)
            img = np.divide(v, n, out=np.zeros_like(v), where=n > 0)
    others = [a for a in ("h", "k", "l") if a != axis]  # x = first (fastest), y = second
    ax_x = {"h": grid.h, "k": grid.k, "l": grid.l}[others[0]]
    ax_y = {"h": grid.h, "k": grid.k, "l": grid.l}[others[1]]
    # img is (slow, fast) = (y, x) in storage order [l, k, h] minus the fixed axis.
    pos = img[img > 0]
    lo_c = vmin if vmin is not None else (float(np.percentile(pos, 1)) if pos.size else 1e-3)
    hi_c = vmax if vmax is not None else (float(np.percentile(pos, 99.9)) if pos.size else 1.0)
    hi_c = max(hi_c, lo_c * 10)
    fig, axp = plt.subplots(figsize=(6.4, 5.6), dpi=100)
    masked = np.ma.masked_less_equal(img, 0)
    im = axp.imshow(
        masked,
        origin="lower",
        extent=(ax_x.start, ax_x.stop, ax_y.start, ax_y.stop),
        norm=LogNorm(vmin=lo_c, vmax=hi_c),
        cmap="viridis",
        aspect="auto",
        interpolation="nearest",
    )
    axp.set_xlabel(f"{others[0].upper()} (r.l.u.)")
    axp.set_ylabel(f"{others[1].upper()} (r.l.u.)")
    fixed = round(float(ax_obj.values[i]), 6) + 0.0  # + 0.0: never "-0"
    where = f"{axis.upper()} = {fixed:g}"
    axp.set_title(f"{title or _slice_title(Path(transform_file))}\n{where}", fontsize=10)
    bar = fig.colorbar(im, ax=axp)
    bar.set_label("intensity v/n (counts per pixel, polarization-corrected)")
    png = Path(png)
    fig.savefig(png)
    plt.close(fig)
    return png
