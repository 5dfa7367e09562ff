"""The ``[server]`` settings every workflow path uses (CLI, post-scan callback, workers).

``[server] database`` names one workflow database for the facility (empty: each
experiment's own ``tasks/workflow.db``); ``[server] lease`` is the lease of running
tasks; ``type``, ``cores`` and ``dask_scheduler`` choose the executor.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import SettingsError
from ..settings import default_settings, load_server_settings
from .database import WorkflowDB

logger = logging.getLogger(__name__)

__all__ = ["open_experiment_db", "server_settings"]


def server_settings() -> dict[str, dict[str, Any]]:
    """The server settings file if it exists, else the built-in defaults."""
    try:
        return load_server_settings()
    except SettingsError as exc:
        logger.debug("using default server settings: %s", exc)
        return default_settings()


def open_experiment_db(
    experiment_dir: str | os.PathLike[str],
    *,
    url: str | None = None,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
) -> WorkflowDB:
    """The workflow database of an experiment, as the ``[server]`` settings say.

    Parameters
    ----------
    experiment_dir : path-like
        The experiment directory (the key of its rows and the root of file names).
    url : str, optional
        A database URL or file overriding ``[server] database`` (``--db``).
    settings : mapping, optional
        Settings ``{section: {key: value}}`` (default :func:`server_settings`).
    """
    server = dict((settings if settings is not None else server_settings()).get("server", {}))
    root = Path(experiment_dir).expanduser().absolute()
    target = url or server.get("database") or root
    lease = float(server.get("lease") or 300.0)
    return WorkflowDB(target, experiment_dir=root, lease=lease)
