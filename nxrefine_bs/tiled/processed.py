"""A flat, searchable Tiled index of processed scan files, and query helpers.

Tiled indexes only the root attributes of a registered HDF5 file and searches only the
direct children of a node, so scan files are registered one by one in a single
``processed`` container with metadata pulled from inside the NeXus file (and from the
workflow database): sample, label, scan, temperature, lattice parameters, space
group, entries, per-step workflow status and paths.  Queries such as
``Key("temperature") < 100`` or ``Key("sample") == "CsV3Sb5"`` then work on that
container, and the data stays in the file, read lazily through Tiled (external links
to the detector files included).  Re-registering a file updates its metadata.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py

from ..nexus.h5tools import read_field
from ..nexus.provenance import process_done
from ..nexus.scanfile import open_scan_file
from ..reduce.steps import STEPS
from ..workflow.queue import find_scan_files
from ..workflow.schema import SCAN_ENTRY, Status, aggregate_status
from ..workflow.sync import rotation_entries

logger = logging.getLogger(__name__)

__all__ = [
    "PROCESSED",
    "processed_container",
    "processed_key",
    "scan_metadata",
    "register_processed",
    "register_experiment",
    "find_runs",
    "find_processed",
    "build_query",
]

PROCESSED = "processed"
"""Key of the container holding processed scan files."""

_OPERATORS = {
    "eq": "==",
    "ne": "!=",
    "lt": "<",
    "le": "<=",
    "gt": ">",
    "ge": ">=",
    "in": "in",
    "notin": "notin",
    "contains": "contains",
}


def _child(node: Any, key: str) -> Any:
    """``node[key]`` by plain key, bypassing ``CatalogOfBlueskyRuns``' uid lookup."""
    # heavy: tiled, loaded on first use
    from tiled.client.container import Container

    return Container.__getitem__(node, key)


def _root(client: Any) -> Any:
    """The root node of ``client``'s catalog (the runs live in a sibling ``runs``)."""
    # heavy: tiled, loaded on first use
    from tiled.client import from_context

    path = [part for part in getattr(client, "path_parts", None) or [] if part]
    return from_context(client.context) if path else client


def processed_container(client: Any, *, create: bool = True) -> Any:
    """The ``processed`` container of a catalog (created if missing and ``create``).

    ``client`` is what :func:`~nxrefine_bs.tiled.catalog.open_catalog` returns (the
    runs); processed scans live next to the runs, in ``<root>/processed``, so that
    iterating over the runs only ever yields runs.
    """
    root = _root(client)
    try:
        return _child(root, PROCESSED)
    except KeyError:
        pass
    if not create:
        raise KeyError(f"the Tiled catalog has no {PROCESSED!r} container")
    logger.info("creating the %r container", PROCESSED)
    return root.create_container(
        PROCESSED, metadata={"description": "processed nxrefine-bs scan files"}
    )


def _names(scan_file: Path) -> tuple[str, str, str]:
    label_dir = scan_file.parent
    sample, label = label_dir.parent.name, label_dir.name
    stem = scan_file.stem
    scan = stem[len(sample) + 1 :] if stem.startswith(sample + "_") else stem
    return sample, label, scan


def processed_key(scan_file: str | os.PathLike[str]) -> str:
    """Key of a scan file in ``processed``: ``<sample>_<label>_<scan>``."""
    sample, label, scan = _names(Path(scan_file).absolute())
    return f"{sample}_{label}_{scan}"


def _number(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def scan_metadata(scan_file: str | os.PathLike[str], db: Any = None) -> dict[str, Any]:
    """Searchable metadata of a scan file.

    Parameters
    ----------
    scan_file : path-like
        ``<experiment>/<sample>/<label>/<sample>_<scan>.nxs``.
    db : WorkflowDB, optional
        If given (and the scan is registered there), per-step statuses come from the
        database (``queued``, ``failed``...); otherwise from the NXprocess records
        (``done`` / ``not_started``).

    Returns
    -------
    dict
        Keys: ``sample``, ``label``, ``scan``, ``temperature`` (and
        ``temperature_units``), ``a``, ``b``, ``c``, ``alpha``, ``beta``, ``gamma``,
        ``space_group``, ``centring``, ``entries``, ``workflow`` (``{step: status}``),
        ``complete`` (steps done), ``path``, ``relative_path``, ``experiment_dir``,
        ``parent``, ``registered``.  Missing values are None.
    """
    path = Path(scan_file).absolute()
    sample, label, scan = _names(path)
    meta: dict[str, Any] = {"sample": sample, "label": label, "scan": scan}

    with open_scan_file(path) as f:
        entries = rotation_entries(f)
        sample_grp = f.get("entry/sample")
        if isinstance(sample_grp, h5py.Group):
            meta["sample"] = read_field(sample_grp, "name") or sample
            meta["label"] = read_field(sample_grp, "label") or label
            temp = sample_grp.get("temperature")
            meta["temperature"] = _number(read_field(sample_grp, "temperature"))
            if isinstance(temp, h5py.Dataset):
                units = temp.attrs.get("units")
                meta["temperature_units"] = units.decode() if isinstance(units, bytes) else units
            for key, field in (
                ("a", "unitcell_a"),
                ("b", "unitcell_b"),
                ("c", "unitcell_c"),
                ("alpha", "unitcell_alpha"),
                ("beta", "unitcell_beta"),
                ("gamma", "unitcell_gamma"),
            ):
                meta[key] = _number(read_field(sample_grp, field))
            meta["space_group"] = read_field(sample_grp, "space_group")
            meta["centring"] = read_field(sample_grp, "lattice_centring")
            meta["laue_group"] = read_field(sample_grp, "laue_group")
        parent = read_field(f, "entry/nxscans/parent")
        file_status: dict[str, str] = {}
        for step in STEPS.values():
            targets = entries if step.per_entry else [SCAN_ENTRY]
            done = [
                isinstance(f.get(t), h5py.Group) and process_done(f[t], step.process)
                for t in targets
            ]
            agg = aggregate_status(Status.DONE if d else Status.NOT_STARTED for d in done)
            file_status[step.name] = agg.name.lower()
    workflow = dict(file_status)
    if db is not None:
        try:
            workflow.update({k: v.name.lower() for k, v in db.scan_status(path).items()})
        except Exception as exc:  # not registered, database unreachable
            logger.debug("no database status for %s: %s", path, exc)
    meta.update(
        entries=entries,
        workflow=workflow,
        complete=[s for s, v in workflow.items() if v == "done"],
        parent=parent or None,
        path=str(path),
        relative_path=f"{sample}/{label}/{path.name}",
        experiment_dir=str(path.parent.parent.parent),
        registered=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    return meta


def register_processed(
    client: Any,
    scan_file: str | os.PathLike[str],
    *,
    db: Any = None,
    key: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Any:
    """Register (or update) a scan file in the ``processed`` container.

    The file is registered as an external HDF5 node (data are not copied; the server
    must be allowed to read the experiment directory) and its metadata replaced by
    :func:`scan_metadata` plus ``metadata``.

    Parameters
    ----------
    client : tiled client
        The catalog root (:func:`~nxrefine_bs.tiled.catalog.open_catalog`).
    scan_file : path-like
        The scan file.
    db : WorkflowDB, optional
        Source of per-step workflow statuses.
    key : str, optional
        Node key (default :func:`processed_key`).
    metadata : mapping, optional
        Extra metadata.

    Returns
    -------
    tiled client node
        The registered node.
    """
    # heavy: tiled, loaded on first use
    from tiled.structures.core import Spec, StructureFamily
    from tiled.structures.data_source import Asset, DataSource, Management
    from tiled.utils import ensure_uri

    path = Path(scan_file).absolute()
    key = key or processed_key(path)
    meta = {**scan_metadata(path, db), **(metadata or {})}
    container = processed_container(client)
    try:
        node = _child(container, key)
    except KeyError:
        node = None
    if node is not None:
        if node.metadata.get("path") == str(path):
            node.replace_metadata(metadata=meta)
            logger.info("updated %s in %s", key, PROCESSED)
            return _child(container, key)
        logger.info("replacing %s (was %s)", key, node.metadata.get("path"))
        container.delete_contents(key, external_only=True)
    source = DataSource(
        structure_family=StructureFamily.container,
        mimetype="application/x-hdf5",
        structure=None,
        parameters={},
        management=Management.external,
        assets=[
            Asset(
                data_uri=ensure_uri(str(path)),
                is_directory=False,
                parameter="data_uris",
                num=0,
            )
        ],
    )
    node = container.new(
        structure_family=StructureFamily.container,
        data_sources=[source],
        key=key,
        metadata=meta,
        specs=[Spec("NXscan", version="1.0")],
    )
    logger.info("registered %s as %s/%s", path, PROCESSED, key)
    return node


def register_experiment(
    client: Any, experiment_dir: str | os.PathLike[str], *, db: Any = None
) -> list[str]:
    """Register every scan file of an experiment; return the keys."""
    keys = []
    for path in find_scan_files([experiment_dir]):
        if path.parent.parent.parent != Path(experiment_dir).absolute():
            continue  # calibration or configuration files deeper/elsewhere
        register_processed(client, path, db=db)
        keys.append(processed_key(path))
    return keys


# --------------------------------------------------------------------------- queries


def build_query(key: str, value: Any, prefix: str = "") -> Any:
    """A Tiled query from ``key[__op]=value`` (Django-like suffixes).

    ``temperature__lt=100`` -> ``Key("temperature") < 100``; operators ``eq`` (default),
    ``ne``, ``lt``, ``le``, ``gt``, ``ge``, ``in``, ``notin``, ``contains``.  Double
    underscores elsewhere become dots (``workflow__refine="done"`` ->
    ``Key("workflow.refine") == "done"``).
    """
    # heavy: tiled, loaded on first use
    from tiled.queries import Contains, In, Key, NotIn

    parts = key.split("__")
    op = "eq"
    if len(parts) > 1 and parts[-1] in _OPERATORS:
        op = parts.pop()
    name = ".".join(parts)
    if prefix and not name.startswith(("start.", "stop.")):
        name = prefix + name
    k = Key(name)
    if op == "eq":
        return k == value
    if op == "ne":
        return k != value
    if op == "lt":
        return k < value
    if op == "le":
        return k <= value
    if op == "gt":
        return k > value
    if op == "ge":
        return k >= value
    if op == "in":
        return In(name, list(value))
    if op == "notin":
        return NotIn(name, list(value))
    return Contains(name, value)


def _search(node: Any, queries: Iterable[Any], kwargs: Mapping[str, Any], prefix: str) -> Any:
    for query in queries:
        node = node.search(query)
    for key, value in kwargs.items():
        node = node.search(build_query(key, value, prefix))
    return node


def find_runs(client: Any, *queries: Any, **kwargs: Any) -> Any:
    """Bluesky runs matching every query.

    Keyword arguments are start-document keys (``sample="LaB6"``,
    ``temperature__lt=100``; ``stop.exit_status="success"`` style keys are kept as
    they are).  Positional arguments are Tiled queries used as given.

    Returns
    -------
    tiled client node
        The filtered catalog (``.keys()``, ``.values()``, ``[uid]``).
    """
    return _search(client, queries, kwargs, "start.")


def find_processed(client: Any, *queries: Any, **kwargs: Any) -> Any:
    """Processed scan files matching every query (see :func:`build_query`).

    Examples
    --------
    >>> from tiled.queries import Key  # doctest: +SKIP
    >>> find_processed(client, Key("temperature") < 100, sample="CsV3Sb5")  # doctest: +SKIP
    """
    return _search(processed_container(client), queries, kwargs, "")
