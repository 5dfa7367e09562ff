"""Archiving runs in Tiled without ever losing one: a local journal and ``--resume``.

:class:`ResilientArchiver` is the session's Tiled callback.  It writes every document of
a run to a local JSON-lines journal (``<experiment>/tasks/archive/<uid>.jsonl``) and
forwards it to bluesky-tiled-plugins' ``TiledWriter``.  When the server is down at the
start or fails during the run, the run stays in its journal; when the whole run reached
Tiled, the journal is deleted.  ``nxrefine-bs archive EXPERIMENT --resume`` uploads the
journals left behind (replacing a partial copy on the server).

It runs behind :class:`~nxrefine_bs.callbacks.isolation.NonCritical` in a session, so
a Tiled outage (``TiledWriter`` blocks ~25 s on connection errors) never stalls a scan.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["ResilientArchiver", "journal_directory", "pending_runs", "resume_uploads"]


def journal_directory(experiment_dir: str | os.PathLike[str]) -> Path:
    """Where runs not (yet) archived in Tiled wait: ``<experiment>/tasks/archive``."""
    return Path(experiment_dir) / "tasks" / "archive"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


class ResilientArchiver:
    """Bluesky callback archiving each run in Tiled, journaled locally until it is safe.

    Parameters
    ----------
    connect : callable
        Returns a Tiled client (container) to write runs into; called at each run's
        start until it succeeds (so a server that comes back is used again).
    journal_dir : path-like
        Directory of the JSON-lines journals.
    """

    def __init__(self, connect: Callable[[], Any], journal_dir: str | os.PathLike[str]):
        self.connect = connect
        self.journal_dir = Path(journal_dir)
        self._client: Any = None
        self._writer: Any = None
        self._journal: Any = None
        self._path: Path | None = None
        self._ok = False
        self.pending: list[Path] = []
        """Journals of runs that did not reach Tiled."""

    def _primary(self) -> Any:
        # heavy: tiled, loaded on first use
        from bluesky_tiled_plugins import TiledWriter

        if self._client is None:
            self._client = self.connect()
        return TiledWriter(self._client)

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        if name == "start":
            self.journal_dir.mkdir(parents=True, exist_ok=True)
            self._path = self.journal_dir / f"{doc['uid']}.jsonl"
            self._journal = open(self._path, "a", encoding="utf-8")  # noqa: SIM115
            try:
                self._writer = self._primary()
                self._ok = True
            except Exception as exc:
                logger.warning(
                    "Tiled unavailable (%s); run %s kept in %s", exc, doc["uid"], self._path
                )
                self._client = None
                self._writer = None
                self._ok = False
        if self._journal is None:
            return
        self._journal.write(json.dumps({"name": name, "doc": doc}, default=_jsonable) + "\n")
        self._journal.flush()
        if self._ok:
            try:
                self._writer(name, doc)
            except Exception as exc:
                logger.warning(
                    "Tiled archiving of run %s failed on a %s document (%s); the run stays in %s",
                    doc.get("run_start", doc.get("uid")),
                    name,
                    exc,
                    self._path,
                )
                self._ok = False
                self._client = None
        if name == "stop":
            self._journal.close()
            self._journal = None
            if self._ok and self._path is not None:
                self._path.unlink(missing_ok=True)
            elif self._path is not None:
                self.pending.append(self._path)
                logger.warning(
                    "run %s is not in Tiled; upload it later with "
                    "'nxrefine-bs archive <experiment> --resume'",
                    doc.get("run_start"),
                )
            self._writer = None


def pending_runs(journal_dir: str | os.PathLike[str]) -> list[Path]:
    """Journals waiting for upload, oldest first."""
    directory = Path(journal_dir)
    if not directory.is_dir():
        return []
    return sorted(directory.glob("*.jsonl"), key=lambda p: p.stat().st_mtime)


def _documents(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("%s: skipping a truncated line (the writer was killed)", path)
                continue
            yield item["name"], item["doc"]


def resume_uploads(client: Any, journal_dir: str | os.PathLike[str]) -> list[str]:
    """Upload every journaled run to ``client``; return the uids uploaded.

    A run already complete on the server (it has a stop document) is not uploaded
    again; a partial copy (no stop) is deleted and replaced.  A journal is deleted once
    its run is uploaded.
    """
    # heavy: tiled, loaded on first use
    from bluesky_tiled_plugins import TiledWriter

    done = []
    for path in pending_runs(journal_dir):
        uid = path.stem
        if uid in client:
            if client[uid].metadata.get("stop"):
                path.unlink()
                continue
            client.delete_contents(uid, recursive=True, external_only=False)
        writer = TiledWriter(client)
        for name, doc in _documents(path):
            writer(name, doc)
        path.unlink()
        done.append(uid)
        logger.info("uploaded run %s from %s", uid, path)
    return done
