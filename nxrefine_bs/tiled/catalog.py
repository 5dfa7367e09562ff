"""Open the Tiled catalog of an experiment: embedded (SQLite, in-process) or a server.

The embedded catalog lives in ``<experiment>/tiled/``: ``catalog.db`` (SQLite: metadata
and the node tree), ``data/`` (arrays written through Tiled) and ``tables.duckdb``
(event tables written by :class:`~bluesky_tiled_plugins.TiledWriter`).  It is served
in-process through ``Context.from_app`` -- no network port is opened -- with the
``application/json-seq`` exporter registered so that ``client[uid].documents()``
replays archived runs.  The root holds two containers: ``runs`` (the
``CatalogOfBlueskyRuns`` that :func:`open_catalog` returns, so iterating over it yields
runs only, and it understands ``Key("sample") == ...``, ``ScanID`` and ``PartialUID``
queries) and ``processed`` (the processed scan files, :mod:`.processed`).  Catalogs made
by earlier versions, with the runs at the root, are opened as they are.
Detector files written next to the scan files (and under ``[instrument] raw_home``)
are readable through Tiled: they are registered, never copied.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import SettingsError, TiledError
from ..settings import load_experiment_settings, load_server_settings
from .processed import PROCESSED

logger = logging.getLogger(__name__)

__all__ = [
    "CATALOG_DIRNAME",
    "catalog_paths",
    "open_catalog",
    "close_catalog",
    "archive_callback",
    "TiledError",
]

CATALOG_DIRNAME = "tiled"
RUNS_SPEC = {"name": "CatalogOfBlueskyRuns", "version": "3.0"}
RUNS = "runs"
"""Key of the container of Bluesky runs in an embedded catalog."""


def catalog_paths(experiment_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Files of the embedded catalog of an experiment.

    Returns
    -------
    dict
        ``root`` (``<experiment>/tiled``), ``catalog`` (SQLite file), ``data``
        (directory of written arrays) and ``tables`` (DuckDB file).
    """
    root = Path(experiment_dir).absolute() / CATALOG_DIRNAME
    return {
        "root": root,
        "catalog": root / "catalog.db",
        "data": root / "data",
        "tables": root / "tables.duckdb",
    }


def _is_uri(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def _raw_dirs(experiment_dir: Path) -> list[Path]:
    """``[instrument] raw_home`` of the experiment settings, if set and present."""
    try:
        instrument = load_experiment_settings(experiment_dir).get("instrument", {})
    except (SettingsError, OSError):
        return []
    raw = instrument.get("raw_home")
    if raw and Path(raw).expanduser().is_dir():
        return [Path(raw).expanduser().absolute()]
    return []


def _server_uri() -> str:
    try:
        return str(load_server_settings().get("server", {}).get("tiled_uri") or "")
    except SettingsError:
        return ""


def open_catalog(
    uri_or_dir: str | os.PathLike[str] | None = None,
    *,
    readable_storage: Iterable[str | os.PathLike[str]] = (),
    api_key: str | None = None,
) -> Any:
    """Open a Tiled catalog and return its client.

    Parameters
    ----------
    uri_or_dir : str or path-like, optional
        A Tiled server URL (``http://host:8000``), or an experiment directory whose
        embedded catalog ``<experiment>/tiled/`` is opened (created if missing), or the
        ``tiled`` directory itself.  Default: ``[server] tiled_uri`` from the server
        settings.
    readable_storage : iterable of path-like
        More directories whose files may be registered (embedded catalog only); the
        experiment directory and ``[instrument] raw_home`` are always included.
    api_key : str, optional
        API key for a server.

    Returns
    -------
    tiled.client.container.Container
        The root client (a ``CatalogOfBlueskyRuns`` for the embedded catalog).  Close
        it with :func:`close_catalog`.

    Raises
    ------
    TiledError
        If nothing says which catalog to open, or it cannot be opened.
    """
    import tiled.client  # heavy: tiled, loaded on first use

    if uri_or_dir is None:
        uri_or_dir = _server_uri()
        if not uri_or_dir:
            raise TiledError(
                "no Tiled catalog given: pass an experiment directory or a server URL, "
                "or set [server] tiled_uri in the server settings"
            )
    target = os.fspath(uri_or_dir)
    if _is_uri(target):
        from tiled.client.context import Context  # heavy: tiled, loaded on first use

        context = None
        try:  # tiled.client.from_uri, but the connection is closed when it fails
            context, node_path_parts = Context.from_any_uri(target, api_key=api_key)
            return tiled.client.from_context(context, node_path_parts=node_path_parts)
        except Exception as exc:  # httpx errors, auth errors
            if context is not None:
                context.close()
            raise TiledError(f"cannot connect to the Tiled server {target}: {exc}") from exc
    path = Path(target).expanduser().absolute()
    experiment_dir = path.parent if path.name == CATALOG_DIRNAME else path
    if not experiment_dir.is_dir():
        raise TiledError(f"experiment directory {experiment_dir} does not exist")
    return _open_embedded(experiment_dir, readable_storage)


def _open_embedded(experiment_dir: Path, readable_storage: Iterable[str | os.PathLike[str]]) -> Any:
    # heavy: tiled, loaded on first use
    import tiled.catalog
    import tiled.client
    from bluesky_tiled_plugins.exporters import json_seq_exporter
    from tiled.media_type_registration import default_serialization_registry
    from tiled.server.app import build_app

    paths = catalog_paths(experiment_dir)
    paths["data"].mkdir(parents=True, exist_ok=True)
    readable = [experiment_dir, *_raw_dirs(experiment_dir)]
    readable += [Path(p).expanduser().absolute() for p in readable_storage]
    try:
        catalog = tiled.catalog.from_uri(
            f"sqlite:///{paths['catalog']}",
            writable_storage={
                "filesystem": str(paths["data"]),
                "sql": f"duckdb:///{paths['tables']}",
            },
            readable_storage=[str(p) for p in dict.fromkeys(readable)],
            init_if_not_exists=True,
        )
        registry = copy.deepcopy(default_serialization_registry)
        registry.register("BlueskyRun", "application/json-seq", json_seq_exporter)
        app = build_app(catalog, serialization_registry=registry)
        with _quiet_startup():
            context = tiled.client.Context.from_app(app)
        root = tiled.client.from_context(context)
        client = _runs_node(root)
    except Exception as exc:
        raise TiledError(f"cannot open the Tiled catalog in {paths['root']}: {exc}") from exc
    logger.info("opened embedded Tiled catalog %s", paths["catalog"])
    return client


@contextlib.contextmanager
def _quiet_startup() -> Iterator[None]:
    """Start the in-process app without its "Tiled version" line and httpx warning.

    The app logs its version at INFO through a handler of its own, and Tiled's
    in-process client imports ``starlette.testclient``, which warns that it prefers
    ``httpx2``; neither concerns a user of the embedded catalog.
    """
    app_logger = logging.getLogger("tiled.server.app")
    level = app_logger.level
    app_logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*starlette.testclient.*")
            warnings.filterwarnings("ignore", message=".*httpx.*deprecated.*")
            yield
    finally:
        app_logger.setLevel(level)


def _runs_node(root: Any) -> Any:
    """The ``runs`` container (created on a new catalog); the root of an old catalog."""
    # heavy: tiled, loaded on first use
    from tiled.client.container import Container
    from tiled.structures.core import Spec

    keys = list(Container.keys(root))
    if RUNS in keys:
        return Container.__getitem__(root, RUNS)
    if any(key != PROCESSED for key in keys):
        logger.info("catalog of an earlier version: runs at the root")
        return root
    return root.create_container(
        RUNS,
        metadata={"description": "Bluesky runs archived by nxrefine-bs"},
        specs=[Spec(RUNS_SPEC["name"], version=RUNS_SPEC["version"])],
    )


def close_catalog(client: Any) -> None:
    """Close the client's connection (and stop an in-process app)."""
    try:
        client.context.close()
    except Exception as exc:  # closing twice, server gone
        logger.debug("closing the Tiled client: %s", exc)


def archive_callback(client: Any, *, batch_size: int = 10000) -> Any:
    """A :class:`~bluesky_tiled_plugins.TiledWriter` archiving every run into ``client``.

    Subscribe it to the RunEngine: ``RE.subscribe(archive_callback(client))``.

    Parameters
    ----------
    client : tiled client
        From :func:`open_catalog`.
    batch_size : int
        Events buffered before a table write (use 1 to see rows while a run goes on).
    """
    # heavy: tiled, loaded on first use
    from bluesky_tiled_plugins import TiledWriter

    return TiledWriter(client, batch_size=batch_size)
