"""Small h5py helpers for writing NeXus structures.

Everything in nxrefine-bs writes NeXus through these helpers so that NX_class
attributes, string encoding and relative external links are handled one way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "nx_group",
    "write_field",
    "read_field",
    "read_str",
    "relative_link",
    "write_external_link",
    "copy_tree",
]


def nx_group(parent: h5py.Group, name: str, nx_class: str) -> h5py.Group:
    """Return group ``name`` under ``parent``, creating it with ``NX_class`` if needed."""
    grp = parent.get(name)
    if grp is None:
        grp = parent.create_group(name)
    elif not isinstance(grp, h5py.Group):
        del parent[name]
        grp = parent.create_group(name)
    grp.attrs["NX_class"] = nx_class
    return grp


def write_field(
    group: h5py.Group,
    name: str,
    value: Any,
    *,
    units: str | None = None,
    attrs: Mapping[str, Any] | None = None,
    dtype: Any = None,
    **create_kwargs: Any,
) -> h5py.Dataset:
    """Create or replace dataset ``name`` in ``group``.

    Strings are stored as variable-length UTF-8; ``units`` and ``attrs`` become
    attributes.  Extra keyword arguments go to :meth:`h5py.Group.create_dataset`.
    """
    if name in group:
        del group[name]
    if isinstance(value, str):
        ds = group.create_dataset(name, data=value, dtype=h5py.string_dtype())
    elif isinstance(value, list | tuple) and value and all(isinstance(v, str) for v in value):
        ds = group.create_dataset(name, data=list(value), dtype=h5py.string_dtype())
    else:
        arr = np.asarray(value, dtype=dtype) if dtype is not None else np.asarray(value)
        ds = group.create_dataset(name, data=arr, **create_kwargs)
    if units is not None:
        ds.attrs["units"] = units
    for key, val in (attrs or {}).items():
        ds.attrs[key] = val
    return ds


def read_str(value: Any) -> str:
    """Decode an HDF5 string value (bytes, numpy bytes or str) into ``str``."""
    if isinstance(value, h5py.Dataset):
        value = value[()]
    if isinstance(value, bytes | np.bytes_):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.shape == ():
        return read_str(value.item())
    return str(value)


def read_field(group: h5py.Group, path: str, default: Any = None) -> Any:
    """Value of dataset ``path`` in ``group`` (strings decoded), or ``default`` if absent."""
    try:
        obj = group.get(path)
    except (KeyError, OSError):  # broken external link, missing parent group
        return default
    if not isinstance(obj, h5py.Dataset):
        return default
    value = obj[()]
    if isinstance(value, bytes | np.bytes_) or obj.dtype.kind in ("S", "O"):
        return read_str(value) if np.ndim(value) == 0 else [read_str(v) for v in value]
    if isinstance(value, np.ndarray) and value.shape == ():
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def relative_link(holder_file: str | os.PathLike[str], target_file: str | os.PathLike[str]) -> str:
    """Path of ``target_file`` relative to the directory of ``holder_file`` (POSIX separators)."""
    holder_dir = Path(os.path.abspath(holder_file)).parent
    rel = os.path.relpath(os.path.abspath(target_file), holder_dir)
    return Path(rel).as_posix()


def write_external_link(
    group: h5py.Group,
    name: str,
    target_file: str | os.PathLike[str],
    target_path: str = "/entry/data/data",
) -> str:
    """Create a relative ExternalLink ``group[name]`` -> ``target_file#target_path``.

    The target need not exist yet.  Returns the relative file name stored in the link.
    """
    rel = relative_link(group.file.filename, target_file)
    if name in group:
        del group[name]
    group[name] = h5py.ExternalLink(rel, target_path)
    return rel


def copy_tree(source: h5py.Group, dest: h5py.Group, *, skip: tuple[str, ...] = ()) -> None:
    """Copy members of ``source`` into ``dest`` preserving external links and attributes."""
    for key, val in source.attrs.items():
        dest.attrs[key] = val
    for name in source:
        if name in skip:
            continue
        link = source.get(name, getlink=True)
        if name in dest:
            del dest[name]
        if isinstance(link, h5py.ExternalLink):
            dest[name] = h5py.ExternalLink(link.filename, link.path)
        elif isinstance(link, h5py.SoftLink):
            dest[name] = h5py.SoftLink(link.path)
        else:
            source.copy(name, dest, name=name)
