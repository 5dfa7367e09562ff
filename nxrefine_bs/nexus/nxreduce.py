"""Reduction parameters stored in scan files, where NXRefine reads and writes them.

NXRefine keeps the parameters a step used (``write_parameters``) in the parent file's
``/entry/nxscans/settings`` (NXparameters) when the scan has a parent, else in the scan
file's ``/entry/nxreduce`` (inventory §3.3).  Here:

* :func:`read_parameters` reads either group of a file (``nxreduce`` first);
* :func:`write_parameters` writes the scan file's ``/entry/nxreduce`` (the parent is
  never written by automatic reduction, as in NXRefine since #205);
* :func:`resolve_parameters` adds these layers (scan file, then its parent) on top of
  the INI layers of :func:`nxrefine_bs.settings.resolve_parameters`.

This module sits in the nexus layer so that :mod:`nxrefine_bs.settings` (core) needs no
HDF5 access and imports nothing above it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import h5py

from ..errors import ScanFileError, SettingsError
from ..settings import NXREFINE_ALIASES, parameter_spec
from ..settings import resolve_parameters as _resolve_layers
from .scanfile import find_parent, open_scan_file, update_scan_file

__all__ = [
    "PARAMETER_GROUPS",
    "read_parameters",
    "store_parameters",
    "write_parameters",
    "resolve_parameters",
]

logger = logging.getLogger(__name__)

PARAMETER_GROUPS: tuple[str, ...] = ("entry/nxreduce", "entry/nxscans/settings")
"""Groups of a scan or parent file holding reduction parameters, in the order read."""

_ALIASES = {alias: key for (section, alias), key in NXREFINE_ALIASES.items()}


def read_parameters(scan_file: str | os.PathLike[str]) -> dict[str, Any]:
    """The reduction parameters stored in ``scan_file`` (see :data:`PARAMETER_GROUPS`).

    Values of the first group win; NXRefine 0.1.1 names (``first``, ``last``) are read
    as ``first_frame``/``last_frame``; unknown keys are ignored (logged at debug level);
    a file without either group gives an empty dict.

    Raises
    ------
    SettingsError
        If the file cannot be read or a stored value has the wrong type.
    """
    scan_file = Path(scan_file)
    out: dict[str, Any] = {}
    try:
        with open_scan_file(scan_file) as f:
            for path in PARAMETER_GROUPS:
                group = f.get(path)
                if not isinstance(group, h5py.Group):
                    continue
                for name, item in group.items():
                    if not isinstance(item, h5py.Dataset):
                        continue
                    key = _ALIASES.get(name, name)
                    if key in out:
                        continue
                    try:
                        spec = parameter_spec(key)
                    except SettingsError:
                        logger.debug("%s: ignoring /%s/%s", scan_file, path, name)
                        continue
                    try:
                        out[key] = spec.parse(item[()])
                    except ValueError as exc:
                        raise SettingsError(
                            f"{scan_file}: /{path}/{name} is invalid ({exc}); "
                            f"expected {spec.type_name}"
                        ) from None
    except OSError as exc:
        raise SettingsError(f"cannot read parameters from {scan_file}: {exc}") from exc
    return {k: v for k, v in out.items() if v is not None}


def store_parameters(
    root: h5py.File, params: Mapping[str, Any], *, known_only: bool = False
) -> dict[str, Any]:
    """Write reduction parameters into ``/entry/nxreduce`` of a file open for writing.

    Used by the reduction steps inside their own update of the scan file, so the
    parameters a step used are where NXRefine reads them.  None values remove the key;
    with ``known_only`` keys that are not reduction settings are skipped (a step's
    NXprocess parameters can be passed as they are).

    Returns
    -------
    dict
        The values written, converted to their types.

    Raises
    ------
    SettingsError
        On an unknown key or a value of the wrong type (nothing is written then).
    """
    parsed: dict[str, Any] = {}
    for key, value in params.items():
        try:
            spec = parameter_spec(key)
        except SettingsError:
            if known_only:
                continue
            raise
        try:
            parsed[key] = spec.parse(value)
        except ValueError as exc:
            raise SettingsError(
                f"parameter {key} = {value!r} is invalid ({exc}); expected {spec.type_name}"
            ) from None
    entry = root.require_group("entry")
    entry.attrs.setdefault("NX_class", "NXentry")
    group = entry.require_group("nxreduce")
    group.attrs["NX_class"] = "NXparameters"
    for key, value in parsed.items():
        if key in group:
            del group[key]
        if value is not None:
            group.create_dataset(key, data=value)
    return parsed


def write_parameters(scan_file: str | os.PathLike[str], params: Mapping[str, Any]) -> None:
    """Write reduction parameters to ``scan_file``'s ``/entry/nxreduce`` (NXparameters).

    Existing values of the same keys are replaced; None values remove the key.  The
    file is updated under its lock (:func:`~nxrefine_bs.nexus.scanfile.update_scan_file`).

    Raises
    ------
    SettingsError
        On an unknown key or a value of the wrong type (nothing is written then).
    """
    scan_file = Path(scan_file)
    for key, value in params.items():  # validate before opening the file
        spec = parameter_spec(key)
        try:
            spec.parse(value)
        except ValueError as exc:
            raise SettingsError(
                f"parameter {key} = {value!r} is invalid ({exc}); expected {spec.type_name}"
            ) from None
    try:
        with update_scan_file(scan_file) as f:
            store_parameters(f, params)
    except OSError as exc:
        raise SettingsError(f"cannot write parameters to {scan_file}: {exc}") from exc


def resolve_parameters(
    keys: Iterable[str] | None = None,
    *,
    explicit: Mapping[str, Any] | None = None,
    scan_file: str | os.PathLike[str] | None = None,
    experiment_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Resolve reduction parameters through every layer, scan files included.

    Precedence, highest first: ``explicit`` (not None); the scan file's stored
    parameters; its parent's (``/entry/nxscans/parent``); the experiment's
    ``tasks/settings.ini``; the server file; the schema default.

    Parameters
    ----------
    keys : iterable of str, optional
        Parameters wanted (default: every ``[nxreduce]`` key).
    explicit : mapping, optional
        Values given by the caller.
    scan_file : path-like, optional
        The scan file.
    experiment_dir : path-like, optional
        The experiment directory (default: three levels above ``scan_file``).

    Raises
    ------
    SettingsError
        On an unknown key, an invalid value or an unreadable file or missing parent.

    Examples
    --------
    >>> resolve_parameters(["threshold"], explicit={"threshold": "1000"})
    {'threshold': 1000.0}
    """
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if scan_file is not None:
        scan_file = Path(scan_file)
        layers.append((str(scan_file), read_parameters(scan_file)))
        try:
            parent = find_parent(scan_file)
        except ScanFileError as exc:
            raise SettingsError(str(exc)) from None
        if parent is not None and parent.resolve() != scan_file.resolve():
            layers.append((str(parent), read_parameters(parent)))
        if experiment_dir is None:
            experiment_dir = scan_file.absolute().parent.parent.parent
    return _resolve_layers(
        keys, explicit=explicit, file_layers=layers, experiment_dir=experiment_dir
    )
