"""Replay archived runs from Tiled through the same callbacks as a live scan.

``client[uid].documents()`` yields the run's documents (StreamResource/StreamDatum
consolidated, legacy Resource/Datum converted); feeding them to
:class:`~nxrefine_bs.callbacks.nexus_writer.NeXusScanWriter` regenerates the scan file
entry of that rotation, and a :class:`~nxrefine_bs.callbacks.reduction.PostScanReduction`
may be added to redo the reduction.

Replay can be rerun: the writer rewrites every column it owns from the run's documents
(nothing is appended), so replaying a run twice gives the same file.  Replay never
silently touches reduction results: if a target entry holds any (an
``fN/nxworkflow/<process>`` record other than ``nxlink``, which covers refined
geometry, ``monitor_weight``, peaks and transforms), :func:`replay_runs` refuses before
writing anything unless ``overwrite=True``.  With ``overwrite``, the writer rewrites the
entry and then everything in the entry that the writer does not own
(:data:`WRITER_OWNED`) is put back as it was -- refined geometry, ``monitor_weight``,
masks, peaks, ``nxworkflow`` records, links to transforms -- so only the acquisition
part is regenerated.  The previous file is kept as ``.<name>.before-replay`` next to
the scan file until that restore is done (a crash in between leaves it there).

Against a Tiled server, ``documents()`` needs the server to register
bluesky-tiled-plugins' ``application/json-seq`` exporter (:data:`SERVER_CONFIG_HINT`);
:func:`check_documents` tests that up front and says how to fix it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Generator, Iterable, Sequence
from pathlib import Path
from typing import Any

import h5py

from ..callbacks.run_writer import scan_file_for_start
from ..errors import ReplayError
from ..nexus.provenance import WORKFLOW_GROUP
from ..nexus.safewrite import locked
from ..nexus.scanfile import open_scan_file, update_scan_file
from .processed import find_runs

logger = logging.getLogger(__name__)

__all__ = [
    "select_runs",
    "replay_runs",
    "ReplayError",
    "check_documents",
    "reduction_results",
    "SERVER_CONFIG_HINT",
    "WRITER_OWNED",
]


SERVER_CONFIG_HINT = """\
media_types:
  BlueskyRun:
    application/json-seq: bluesky_tiled_plugins.exporters:json_seq_exporter"""
"""What a Tiled server's config file needs for replay (``tiled serve config FILE``)."""

WRITER_OWNED = frozenset(
    {
        "data/data",
        "data/frame_number",
        "data/frame_time",
        "data/phi",
        "data/x_pixel",
        "data/y_pixel",
        "monitor",
        "instrument/logs",
        "acquisition",
        "start_time",
        "end_time",
        "nxworkflow/nxlink",
    }
)
"""Paths in an ``fN`` entry that replay regenerates; with ``overwrite`` the rest is kept."""

WRITER_PROCESSES = frozenset({"nxlink"})
"""``nxworkflow`` records written by the NeXus writer itself (not reduction results)."""


def _scan_id_query(client: Any, scan_id: int) -> Any:
    """``ScanID`` where the node understands it, else ``Key("start.scan_id")``.

    A stock ``tiled serve`` root is a plain Container, which refuses ``ScanID``.
    """
    specs = {getattr(s, "name", s) for s in getattr(client, "specs", ()) or ()}
    if "CatalogOfBlueskyRuns" in specs:
        # heavy: tiled, loaded on first use
        from bluesky_tiled_plugins.queries import ScanID

        return ScanID(scan_id)
    # heavy: tiled, loaded on first use
    from tiled.queries import Key

    return Key("start.scan_id") == scan_id


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
        for sid in scan_ids:
            found = client.search(_scan_id_query(client, int(sid)))
            if len(found) == 0:
                raise ReplayError(f"no archived run with scan id {sid} in {client.uri}")
            runs.extend(found.values())
    if query:
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


def _is_missing_exporter(exc: BaseException) -> bool:
    text = str(exc)
    return "406" in text and "json-seq" in text


def _documents(run: Any) -> Generator[tuple[str, dict[str, Any]], None, None]:
    """The run's documents as plain dicts (406 from the server -> :class:`ReplayError`)."""
    try:
        for name, archived in run.documents():
            # Tiled hands out read-only Document objects; the callbacks (the writer's
            # RunNormalizer) add keys such as ``filled``, so give them plain dicts.
            doc = archived.to_dict() if hasattr(archived, "to_dict") else dict(archived)
            yield name, doc
    except Exception as exc:
        if _is_missing_exporter(exc):
            raise ReplayError(_exporter_message(run)) from exc
        raise


def _exporter_message(run: Any) -> str:
    where = getattr(getattr(run, "context", None), "api_uri", None) or "the Tiled server"
    return (
        f"{where} cannot export runs as documents (HTTP 406 for application/json-seq): "
        "register bluesky-tiled-plugins' exporter in the server's config file and serve "
        "it with 'tiled serve config FILE' (a plain 'tiled serve catalog' lacks it):\n"
        + SERVER_CONFIG_HINT
    )


def check_documents(run: Any) -> None:
    """Check that ``run.documents()`` works (the server has the json-seq exporter).

    Raises
    ------
    ReplayError
        With the server config to add, if the server answers 406.
    """
    docs = _documents(run)
    try:
        next(docs, None)
    finally:
        docs.close()


def _target(start: dict[str, Any], experiment_dir: str | os.PathLike[str] | None) -> dict[str, Any]:
    if experiment_dir is not None and "nxrefine" in start:
        start = dict(start)
        start["nxrefine"] = {
            **start["nxrefine"],
            "experiment_dir": str(Path(experiment_dir).absolute()),
        }
    return start


def reduction_results(scan_file: str | os.PathLike[str], entry: str) -> list[str]:
    """Reduction records in ``scan_file:entry`` (``["f1/nxworkflow/nxmax", ...]``).

    Every reduction step, refinement included, records an ``nxworkflow/<process>``
    group; ``nxlink`` is the writer's own record.  A missing file or entry has none.
    """
    path = Path(scan_file)
    if not path.exists():
        return []
    with open_scan_file(path) as f:
        group = f.get(f"{entry}/{WORKFLOW_GROUP}")
        if not isinstance(group, h5py.Group):
            return []
        return [
            f"{entry}/{WORKFLOW_GROUP}/{name}" for name in group if name not in WRITER_PROCESSES
        ]


def _plan(
    runs: Sequence[Any], experiment_dir: str | os.PathLike[str] | None, overwrite: bool
) -> list[tuple[Path, str] | None]:
    """Each run's target ``(scan file, entry)``; refuse entries with reduction results."""
    targets: list[tuple[Path, str] | None] = []
    refused = []
    for run in runs:
        start = _target(dict(run.start), experiment_dir)
        if "nxrefine" not in start:
            targets.append(None)
            continue
        _, scan_file, entry = scan_file_for_start(start)
        found = reduction_results(scan_file, entry)
        if found and not overwrite:
            refused.append(f"{scan_file}: {', '.join(found)}")
        targets.append((scan_file, entry))
    if refused:
        raise ReplayError(
            "replay would rewrite entries that hold reduction results ("
            + "; ".join(refused)
            + "); nothing was written.  Replay into another experiment (--into), or pass "
            "--overwrite to regenerate only what the writer owns and keep the results"
        )
    return targets


def _backup_path(scan_file: Path) -> Path:
    return scan_file.with_name(f".{scan_file.name}.before-replay")


def _restore(new: h5py.Group, old: h5py.Group, prefix: str = "") -> None:
    """Put back everything of ``old`` (an ``fN`` entry) that the writer does not own."""
    for name in old:
        rel = prefix + name
        if rel in WRITER_OWNED:
            continue
        link = old.get(name, getlink=True)
        if isinstance(link, h5py.ExternalLink | h5py.SoftLink):
            if name in new:
                del new[name]
            new[name] = (
                h5py.ExternalLink(link.filename, link.path)
                if isinstance(link, h5py.ExternalLink)
                else h5py.SoftLink(link.path)
            )
            continue
        obj = old[name]
        if name in new and h5py.h5o.get_info(obj.id).rc > 1:
            continue  # a hard link the writer remade (fN/sample -> entry/sample)
        if isinstance(obj, h5py.Group) and isinstance(new.get(name), h5py.Group):
            _restore(new[name], obj, rel + "/")
            for key, value in obj.attrs.items():
                if key not in new[name].attrs:
                    new[name].attrs[key] = value
            continue
        if name in new:
            del new[name]
        old.copy(obj, new, name=name)


def _wait_writers(
    callbacks: Sequence[Any], uid: str, timeout: float | None, errors_before: list[int]
) -> None:
    for cb, before in zip(callbacks, errors_before, strict=True):
        if hasattr(cb, "wait_run"):
            status = cb.wait_run(uid, timeout)
            errors = list(getattr(cb, "errors", ()))[before:]
            if errors:
                raise ReplayError(f"the NeXus writer failed on run {uid}: {errors[0]}")
            if status is None and hasattr(cb, "flush"):
                cb.flush(timeout)  # not one of its runs (no nxrefine metadata), or slow
            logger.info("run %s written (status %s)", uid, status)
        elif hasattr(cb, "flush"):
            cb.flush(timeout)


def replay_runs(
    runs: Iterable[Any],
    callbacks: Sequence[Callable[[str, dict[str, Any]], Any]],
    *,
    experiment_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    timeout: float | None = 600.0,
) -> list[str]:
    """Feed each run's documents to ``callbacks``; return the replayed uids.

    Runs are replayed one at a time: each run's documents go to every callback, then
    replay waits until the writers (callbacks with ``wait_run``, such as
    :class:`~nxrefine_bs.callbacks.nexus_writer.NeXusScanWriter`) have written it.

    Parameters
    ----------
    runs : iterable
        Tiled BlueskyRun nodes (see :func:`select_runs`).
    callbacks : sequence of callable
        ``cb(name, doc)`` callbacks, e.g. a ``NeXusScanWriter``.
    experiment_dir : path-like, optional
        Write into this experiment instead of the one recorded in the run (the
        detector files stay where they are; links are made relative to the new place).
    overwrite : bool
        Replay into entries that hold reduction results, regenerating only what the
        writer owns (see the module docstring).  Without it such entries are refused.
    timeout : float or None
        Seconds to wait for the writers after each run.

    Raises
    ------
    ReplayError
        Before anything is written: a target entry holds reduction results (and not
        ``overwrite``), or the Tiled server cannot export documents.  Afterwards: the
        writer failed on a run.
    """
    runs = list(runs)
    if runs:
        check_documents(runs[0])
    targets = _plan(runs, experiment_dir, overwrite)
    uids = []
    for run, target in zip(runs, targets, strict=True):
        uid = run.start["uid"]
        logger.info("replaying run %s", uid)
        backup = None
        if target is not None and overwrite and reduction_results(*target):
            backup = _backup_path(target[0])
            with locked(target[0]):
                shutil.copy2(target[0], backup)
        errors_before = [len(getattr(cb, "errors", ())) for cb in callbacks]
        for name, doc in _documents(run):
            if name == "start":
                doc = _target(doc, experiment_dir)
            for cb in callbacks:
                cb(name, doc)
        _wait_writers(callbacks, uid, timeout, errors_before)
        if backup is not None and target is not None:
            _put_back(target[0], target[1], backup)
        uids.append(uid)
    return uids


def _put_back(scan_file: Path, entry: str, backup: Path) -> None:
    """Restore the non-writer parts of ``entry`` from ``backup``, then delete it."""
    index = "nxworkflow/nxlink/sequence_index"
    with h5py.File(backup, "r") as old, update_scan_file(scan_file) as f:
        if entry in old and entry in f:
            _restore(f[entry], old[entry])
            if index in old[entry] and index in f[entry]:  # nxlink keeps its place
                f[entry][index][()] = old[entry][index][()]
    with contextlib.suppress(FileNotFoundError):
        backup.unlink()
    logger.info("%s:%s: acquisition replayed, reduction results kept", scan_file, entry)
