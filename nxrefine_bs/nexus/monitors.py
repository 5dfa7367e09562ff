"""Monitors of a rotation entry, and axes that NXdata/NXmonitor groups claim.

Every reduction step finds the incident-beam monitor with :func:`find_monitor`, so a
setting ``monitor = X`` means the same thing everywhere.  ``X`` may name (in the order
tried):

1. a field of the entry's NXmonitor ``monitor`` (``MCS1``, QM2's ``flyc1``...);
2. a group of the entry (NXRefine's pre-2026 ``monitor1``/``monitor2`` NXmonitor
   groups, or any ``monitor = <group>`` setting): its signal field;
3. a path inside the entry (``monitor1/MCS1``);
4. a beamline log, ``instrument/logs/<X>``.

Without a match the signal of ``monitor`` is used, then that of ``monitor1`` and
``monitor2`` (NXRefine's layouts).  :func:`read_monitor` returns the values divided by
``norm`` and smoothed as NXRefine does (inventory §5.9).

:func:`add_missing_axes` gives every group that names axes (``@axes``) the axis fields
it names, e.g. ``frame_number`` of ``fN/monitor`` (nexusformat's ``nxconsolidate`` and
``NXdata.nxaxes`` fail without them).
"""

from __future__ import annotations

import logging

import h5py
import numpy as np
from numpy.typing import NDArray

from .h5tools import read_str

__all__ = ["LEGACY_MONITOR_GROUPS", "find_monitor", "read_monitor", "add_missing_axes"]

logger = logging.getLogger(__name__)

LEGACY_MONITOR_GROUPS: tuple[str, ...] = ("monitor", "monitor1", "monitor2")
"""Monitor groups of NXRefine layouts, tried in this order when nothing else matches."""


def _signal(group: h5py.Group) -> h5py.Dataset | None:
    """The signal field of an NXmonitor/NXdata group (``@signal``, else ``data``)."""
    name = group.attrs.get("signal")
    name = read_str(name) if name is not None else "data"
    item = group.get(name)
    return item if isinstance(item, h5py.Dataset) else None


def _usable(item: object, nframes: int) -> NDArray[np.float64] | None:
    if not isinstance(item, h5py.Dataset) or item.ndim != 1 or item.shape[0] != nframes:
        return None
    values = np.asarray(item[()], dtype=np.float64)
    return values if np.all(np.isfinite(values)) else None


def find_monitor(
    entry: h5py.Group, name: str | None, nframes: int
) -> tuple[str, NDArray[np.float64]] | None:
    """The per-frame monitor counts of ``entry`` and where they were found.

    Parameters
    ----------
    entry : h5py.Group
        A rotation entry (``/f1``...).
    name : str or None
        The ``monitor`` setting (channel, group or path); None tries the defaults only.
    nframes : int
        Number of frames; a candidate of another length is skipped.

    Returns
    -------
    (path, values) or None
        ``path`` relative to ``entry``; None if no usable monitor exists.
    """
    candidates: list[str] = []
    if name:
        name = name.strip().strip("/")
        candidates.append(f"monitor/{name}")
        group = entry.get(name)
        if isinstance(group, h5py.Group):
            signal = _signal(group)
            if signal is not None:
                candidates.append(f"{name}/{signal.name.rsplit('/', 1)[-1]}")
        else:
            candidates.append(name)
        candidates.append(f"instrument/logs/{name}")
    for legacy in LEGACY_MONITOR_GROUPS:
        group = entry.get(legacy)
        if isinstance(group, h5py.Group):
            signal = _signal(group)
            if signal is not None:
                candidates.append(f"{legacy}/{signal.name.rsplit('/', 1)[-1]}")
    for path in candidates:
        try:
            item = entry.get(path)
        except (KeyError, ValueError, OSError):
            continue
        values = _usable(item, nframes)
        if values is not None:
            if name and not path.endswith(f"/{name}") and path != name:
                logger.info(
                    "%s:%s: monitor %r not found; using %s",
                    entry.file.filename,
                    entry.name,
                    name,
                    path,
                )
            return path, values
    return None


def smoothing_window(nframes: int) -> int:
    """NXRefine's Savitzky-Golay window: 501 above 1000 frames, 101 above 200, else all."""
    if nframes > 1000:
        return 501
    if nframes > 200:
        return 101
    return nframes if nframes % 2 else nframes - 1


def read_monitor(
    entry: h5py.Group, name: str | None, norm: float, nframes: int
) -> NDArray[np.float64] | None:
    """Monitor counts of ``entry`` divided by ``norm`` and smoothed (inventory §5.9).

    The monitor is found by :func:`find_monitor`; its first and last values are replaced
    by their neighbours and it is smoothed with a Savitzky-Golay filter of order 2
    (:func:`smoothing_window`).  Returns None if there is no usable monitor (missing,
    wrong length, not finite, or not positive after smoothing).
    """
    from scipy.signal import savgol_filter  # heavy: scipy.signal (~1 s), only to smooth

    found = find_monitor(entry, name, nframes)
    if found is None or nframes < 3:
        return None
    values = found[1].copy()
    values[0], values[-1] = values[1], values[-2]
    values /= float(norm)
    window = smoothing_window(nframes)
    if window >= 3:
        values = savgol_filter(values, window, 2)
    if np.any(values <= 0):
        return None
    return values


def add_missing_axes(root: h5py.Group, *, create: bool = True) -> list[str]:
    """Create the axis fields that groups below ``root`` name in ``@axes`` but lack.

    An axis missing from a group is written as ``0 .. n-1`` (int32) along the matching
    dimension of the group's signal (``frame_number`` of ``fN/monitor``...).  Axes that
    cannot be sized (no signal, ``.`` placeholders) are left alone.

    Parameters
    ----------
    root : h5py.Group
        A file or group (opened for writing unless ``create`` is False).
    create : bool
        False only reports what is missing.

    Returns
    -------
    list of str
        The fields created (or missing, with ``create=False``), as HDF5 paths.
    """
    created: list[str] = []
    groups: list[h5py.Group] = []

    def visit(_name: str, item: object) -> None:
        if isinstance(item, h5py.Group) and "axes" in item.attrs:
            groups.append(item)

    if "axes" in root.attrs:
        groups.append(root)
    root.visititems(visit)
    for group in groups:
        axes = group.attrs["axes"]
        names = [read_str(a) for a in np.atleast_1d(axes)]
        if len(names) == 1 and ":" in names[0]:
            names = names[0].split(":")
        signal = _signal(group)
        if signal is None:
            continue
        for dim, axis in enumerate(names):
            axis = axis.strip()
            if not axis or axis == "." or axis in group or dim >= signal.ndim:
                continue
            if create:
                group.create_dataset(axis, data=np.arange(signal.shape[dim], dtype=np.int32))
            created.append(f"{group.name}/{axis}")
    if created and create:
        logger.info("added missing axis fields %s", ", ".join(created))
    return created
