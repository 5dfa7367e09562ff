"""Rotation entries of a scan file: the one rule for listing them and for naming new ones.

* **Listing** (:func:`rotation_entries`) follows NXRefine, which recognises a rotation
  entry by its name ending in a digit (``entry[-1].isdigit()``): every *group* of the
  file whose name ends in a digit, sorted by stem and number (``f1, f2, f10``).  Files
  written by NXRefine are read as they are.
* **Naming** (:func:`validate_rotation_entry`): an entry that nxrefine-bs creates or is
  asked to write (plans, the run writer, the CLI) must be ``f1``, ``f2``... — ``f``
  followed by a positive number without leading zeros (not ``f0``, not ``f01``), so
  every name has one spelling and the detector file ``<scan>/fN.h5`` is unambiguous.

Examples
--------
>>> validate_rotation_entry("f12")
'f12'
>>> is_rotation_entry_name("f01"), is_rotation_entry_name("f0"), is_rotation_entry_name("entry")
(False, False, False)
>>> sorted(["f10", "f2", "f1"], key=entry_sort_key)
['f1', 'f2', 'f10']
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import h5py

from ..errors import InvalidNameError, ScanFileError

__all__ = [
    "ROTATION_ENTRY_PATTERN",
    "entry_sort_key",
    "is_rotation_entry_name",
    "rotation_entries",
    "validate_rotation_entry",
]

logger = logging.getLogger(__name__)

ROTATION_ENTRY_PATTERN = re.compile(r"f[1-9][0-9]*")
"""Names of the rotation entries nxrefine-bs writes: ``f1``, ``f2``..."""


def entry_sort_key(name: str) -> tuple[str, int]:
    """Sort key of an entry name: its stem, then its trailing number (``f2`` < ``f10``)."""
    stem = name.rstrip("0123456789")
    digits = name[len(stem) :]
    return stem, int(digits) if digits else -1


def is_rotation_entry_name(name: object) -> bool:
    """Whether ``name`` is a valid new rotation entry name (``f1``, ``f2``...)."""
    return isinstance(name, str) and ROTATION_ENTRY_PATTERN.fullmatch(name) is not None


def validate_rotation_entry(name: object, where: str = "") -> str:
    """Return ``name`` if it is a rotation entry name ``f1``, ``f2``...; raise otherwise.

    Parameters
    ----------
    name : object
        The entry name to check.
    where : str
        Context for the message (run uid, file...).

    Raises
    ------
    InvalidNameError
        If ``name`` is not ``f`` followed by a positive number without leading zeros.
    """
    if not is_rotation_entry_name(name):
        prefix = f"{where}: " if where else ""
        raise InvalidNameError(
            f"{prefix}entry {name!r} is not a rotation entry name; use f1, f2, ... "
            "(f and a positive number without leading zeros)"
        )
    assert isinstance(name, str)
    return name


def _is_group(parent: h5py.Group, name: str) -> bool:
    try:
        return isinstance(parent[name], h5py.Group)
    except (KeyError, OSError, RuntimeError):  # a dangling link is not an entry
        return False


def rotation_entries(h5file: str | os.PathLike[str] | h5py.Group) -> list[str]:
    """Names of the rotation entries of a scan file or configuration, in numeric order.

    A rotation entry is a group whose name ends in a digit (NXRefine's rule).

    Parameters
    ----------
    h5file : path-like or h5py.Group
        A scan file, configuration or open h5py file.

    Returns
    -------
    list of str
        E.g. ``['f1', 'f2', 'f10']``.

    Raises
    ------
    ScanFileError
        If the file cannot be read.
    """
    if isinstance(h5file, h5py.Group):
        names = [k for k in h5file if k[-1:].isdigit() and _is_group(h5file, k)]
        return sorted(names, key=entry_sort_key)
    path = Path(h5file)
    try:
        with h5py.File(path, "r") as f:
            return rotation_entries(f)
    except OSError as exc:
        raise ScanFileError(f"cannot read {path}: {exc}") from exc
