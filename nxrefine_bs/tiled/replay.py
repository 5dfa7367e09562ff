"""Replay archived runs from Tiled through the same callbacks as a live scan.

``client[uid].documents()`` yields the run's documents (StreamResource/StreamDatum
consolidated, legacy Resource/Datum converted); feeding them to
:class:`~nxrefine_bs.callbacks.nexus_writer.NeXusScanWriter` regenerates the scan file
entry of that rotation, and a :class:`~nxrefine_bs.callbacks.reduction.PostScanReduction`
may be added to redo the reduction.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from ..errors import NXRefineBSError

logger = logging.getLogger(__name__)

__all__ = ["select_runs", "replay_runs", "ReplayError"]


class ReplayError(NXRefineBSError, LookupError):
    """Archived runs cannot be found or replayed."""


def select_runs(
    client: Any,
    *,
    uids: Sequence[str] = (),
    scan_ids: Sequence[int] = (),
    query: dict[str, Any] | None = None,
) -> list[Any]:
    """Archived runs by uid (or a unique uid prefix), scan id, or metadata query.

    ``query`` uses :func:`nxrefine_bs.tiled.processed.find_runs` keywords, e.g.
    ``{"sample": "demo", "temperature__lt": 200}``.  Runs come back in time order.
    """
    runs: list[Any] = []
    for uid in uids:
        try:
            runs.append(client[uid])
        except KeyError:
            raise ReplayError(f"no archived run with uid {uid!r} in {client.uri}") from None
    if scan_ids:
        from bluesky_tiled_plugins.queries import ScanID

        for sid in scan_ids:
            found = client.search(ScanID(int(sid)))
            if len(found) == 0:
                raise ReplayError(f"no archived run with scan id {sid} in {client.uri}")
            runs.extend(found.values())
    if query:
        from .processed import find_runs

        found = find_runs(client, **query)
        if len(found) == 0:
            raise ReplayError(f"no archived run matches {query}")
        runs.extend(found.values())
    if not (uids or scan_ids or query):
        raise ReplayError("say which runs to replay: uids, scan ids or a query")
    seen: set[str] = set()
    unique = []
    for run in runs:
        uid = run.start["uid"]
        if uid not in seen:
            seen.add(uid)
            unique.append(run)
    unique.sort(key=lambda r: r.start.get("time", 0))
    return unique


def replay_runs(
    runs: Iterable[Any],
    callbacks: Sequence[Callable[[str, dict[str, Any]], Any]],
    *,
    experiment_dir: str | os.PathLike[str] | None = None,
) -> list[str]:
    """Feed each run's documents to ``callbacks``; return the replayed uids.

    Parameters
    ----------
    runs : iterable
        Tiled BlueskyRun nodes (see :func:`select_runs`).
    callbacks : sequence of callable
        ``cb(name, doc)`` callbacks, e.g. a ``NeXusScanWriter``.
    experiment_dir : path-like, optional
        Write into this experiment instead of the one recorded in the run (the
        detector files stay where they are; links are made relative to the new place).
    """
    uids = []
    for run in runs:
        uid = run.start["uid"]
        logger.info("replaying run %s", uid)
        for name, archived in run.documents():
            # Tiled hands out read-only Document objects; the callbacks (the writer's
            # RunNormalizer) add keys such as ``filled``, so give them plain dicts.
            doc = archived.to_dict() if hasattr(archived, "to_dict") else dict(archived)
            if name == "start" and experiment_dir is not None and "nxrefine" in doc:
                doc = dict(doc)
                doc["nxrefine"] = {
                    **doc["nxrefine"],
                    "experiment_dir": str(Path(experiment_dir).absolute()),
                }
            for cb in callbacks:
                cb(name, doc)
        uids.append(uid)
    return uids
