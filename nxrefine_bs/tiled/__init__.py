"""Tiled: the experiment's catalog of runs and its index of processed scan files.

* :func:`~.catalog.open_catalog` -- embedded (``<experiment>/tiled/``) or server catalog.
* :func:`~.catalog.archive_callback` -- a ``TiledWriter`` for the RunEngine.
* :func:`~.processed.register_processed`, :func:`~.processed.find_processed`,
  :func:`~.processed.find_runs` -- the searchable ``processed`` index and queries.

Tiled itself is imported only when these functions are called.
"""

from .catalog import TiledError, archive_callback, close_catalog, open_catalog
from .processed import (
    find_processed,
    find_runs,
    processed_key,
    register_experiment,
    register_processed,
    scan_metadata,
)

__all__ = [
    "TiledError",
    "archive_callback",
    "close_catalog",
    "open_catalog",
    "find_processed",
    "find_runs",
    "processed_key",
    "register_experiment",
    "register_processed",
    "scan_metadata",
]
