"""The NeXus scan-file writer: live Bluesky documents -> ``<sample>_<scan>.nxs``.

One run is one rotation and fills one ``fN`` entry of the scan file (the document
contract is in ``docs/documents.md``).  The writer is a data-saving callback built so
that the scan goes on and nothing that reached the detector is lost:

* **Nothing blocks the RunEngine.**  On the RunEngine thread a document is only
  validated and filed in memory (:meth:`RunWriter.accept`, microseconds); a writer
  thread does every file operation.  Readers of the scan file (h5py, silx, NeXpy,
  NXRefine) can never stall or fail a scan: each update is copy-on-write
  (:func:`~nxrefine_bs.nexus.scanfile.update_scan_file`), so a reader holding the file
  open keeps reading the previous version while the new one replaces it.  A NeXpy or
  NXRefine *writer* holding the NXLock ``.lock`` file only delays the writer thread.
* **Crash-consistent files.**  kill -9 or a full disk at any instant leaves the previous
  or the new content of the scan file; ``fN/acquisition/status`` says ``running`` until
  the run ends (``nxrefine-bs repair`` turns a dead run into ``crash``).
* **A status that tells the truth** (:func:`~nxrefine_bs.callbacks.run_writer.final_status`):
  ``success`` only with every expected frame and monitor value; ``stop``, ``abort``,
  ``halt`` and ``fail`` recorded as such, with frame counts.
* **Failures reach the run.**  A document that breaks the contract is refused on the
  RunEngine thread (the RunEngine then fails the run); a write that fails on the writer
  thread is raised on the run's next document (failing the run with the writer's
  message) and recorded in ``fN/acquisition``.  The writer never raises on ``stop``, so
  callbacks subscribed after it always get the stop document.
* **Documents are validated before anything is written:** names, the experiment
  (made by this package), links only to files under the experiment's analysis or raw
  trees, StreamDatum ranges within the declared frames, strict routing by run uid,
  out-of-order StreamDatums held until their StreamResource arrives.

Legacy ophyd v1 ``Resource``/``Datum`` documents are normalised to
``StreamResource``/``StreamDatum`` by bluesky-tiled-plugins' ``RunNormalizer``, so live
ophyd-async, ophyd v1 and archived runs share one code path.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import queue
import threading
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from event_model import pack_event_page

from ..errors import MetadataError, WriterError
from ..nexus.h5tools import nx_group, write_field
from ..nexus.scanfile import create_scan_file, update_scan_file
from .run_writer import RunWriter, scan_file_for_start

logger = logging.getLogger(__name__)

__all__ = ["NeXusScanWriter", "nexus_writer_factory", "scan_file_for_start"]

IDLE_EXIT = 10.0
"""Seconds without documents after which the writer thread ends (restarted on demand)."""

MAX_QUEUED = 200_000
"""Documents the writer may hold before it refuses more (a run then fails)."""


class _Run:
    """A run being written: its :class:`RunWriter`, its normaliser and its failure."""

    def __init__(self, writer: RunWriter, router: Callable[[str, dict[str, Any]], Any]):
        self.writer = writer
        self.router = router
        self.error: BaseException | None = None
        self.reported = False
        self.finished = threading.Event()
        self.status: str | None = None


class NeXusScanWriter:
    """Bluesky callback writing every rotation run into its scan file.

    Subscribe it to a RunEngine (``RE.subscribe(NeXusScanWriter())``) or to a
    ``RemoteDispatcher`` to run it out of process.  Runs whose start document has no
    ``nxrefine`` dictionary are ignored.  Several runs may be open at once (documents
    are routed by run uid).

    Parameters
    ----------
    normalize : bool
        Pass documents through bluesky-tiled-plugins' ``RunNormalizer`` first, so that
        ophyd v1 ``Resource``/``Datum`` runs are written like ophyd-async ones.
    lock_timeout : float or None
        Seconds the writer thread waits for another writer's lock on a scan file before
        failing the run; ``None`` (default) waits as long as it takes.
    """

    def __init__(self, *, normalize: bool = True, lock_timeout: float | None = None) -> None:
        self.normalize = normalize
        self.lock_timeout = lock_timeout
        self.last_scan_file: Path | None = None
        self.errors: list[BaseException] = []
        self.interrupt_hint: str | None = None
        """Set to ``"halt"`` by :meth:`BeamlineRunEngine.halt` (Bluesky says ``abort``)."""
        self._runs: dict[str, _Run] = {}
        self._all_runs: dict[str, _Run] = {}  # the last runs seen, for wait_run()
        self._descriptors: dict[str, str] = {}  # descriptor uid -> run uid
        self._resources: dict[str, str] = {}  # (stream) resource uid -> run uid
        self._queue: queue.Queue[tuple[_Run, str, dict[str, Any]] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._routing = threading.Lock()  # guards the three routing tables
        self._starting = threading.Lock()  # guards starting/stopping the writer thread
        self._closed = False
        # heavy: pyFAI (and tiled with normalize) are imported here, at set-up: not at
        # module import, which stays light, nor on the first start document, where ~1-2 s
        # would block the RunEngine at the start of the first scan.
        import pyFAI.detectors  # noqa: F401  (used for detector masks)

        if normalize:
            from bluesky_tiled_plugins.writing.tiled_writer import RunNormalizer  # noqa: F401
        atexit.register(_flush_at_exit, weakref.ref(self))

    # ------------------------------------------------------------------ RunEngine thread
    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        """Receive one document (RunEngine thread: validation and bookkeeping only)."""
        if self._closed:
            raise WriterError("the NeXus writer is closed; create a new one")
        with self._routing:
            run = self._route(name, doc)
        if run is None:
            return
        if name != "stop" and run.error is not None and not run.reported:
            run.reported = True
            raise WriterError(
                f"NeXus writer failed on run {run.writer.uid} "
                f"({run.writer.scan_file}:{run.writer.entry}): {run.error}"
            ) from run.error
        if name == "stop" and self.interrupt_hint and doc.get("exit_status") == "abort":
            doc = {**doc, "reason": (doc.get("reason") or "") + f" (RE.{self.interrupt_hint}())"}
            self.interrupt_hint = None
        run.router(name, doc)

    def _route(self, name: str, doc: dict[str, Any]) -> _Run | None:
        if name == "start":
            if "nxrefine" not in doc:
                logger.debug("run %s has no nxrefine metadata; not writing it", doc.get("uid"))
                return None
            uid = str(doc.get("uid", ""))
            if not uid or uid in self._runs:
                raise MetadataError(f"start document with missing or repeated uid {uid!r}")
            writer = RunWriter(dict(doc))  # raises MetadataError on bad names
            run = _Run(writer, self._make_router(writer))
            self._runs[uid] = run
            self._all_runs[uid] = run
            while len(self._all_runs) > 1000:
                self._all_runs.pop(next(iter(self._all_runs)))
            self.last_scan_file = writer.scan_file
            return run
        run_uid = self._run_uid(name, doc)
        if run_uid is None:
            return None
        return self._runs.get(run_uid)

    def _run_uid(self, name: str, doc: Mapping[str, Any]) -> str | None:
        """The uid of the run a document belongs to (None: not one of ours)."""
        if name in ("descriptor", "stop"):
            uid = str(doc.get("run_start", ""))
            if name == "descriptor" and uid in self._runs:
                self._descriptors[str(doc["uid"])] = uid
            return uid
        if name in ("event", "event_page", "stream_datum"):
            key = str(doc.get("descriptor", ""))
            if key in self._descriptors:
                return self._descriptors[key]
            if name == "stream_datum":
                return self._resources.get(str(doc.get("stream_resource", "")))
            return None
        if name in ("stream_resource", "resource"):
            start_uid: str | None = doc.get("run_start")
            if start_uid is None:
                open_runs = [u for u, r in self._runs.items() if r.writer.stop_doc is None]
                if len(open_runs) > 1:
                    raise MetadataError(
                        f"{name} {doc.get('uid')} has no run_start and {len(open_runs)} runs are "
                        "open; cannot tell which run it belongs to"
                    )
                start_uid = open_runs[0] if open_runs else None
            if start_uid is not None:
                self._resources[str(doc.get("uid", ""))] = str(start_uid)
            return None if start_uid is None else str(start_uid)
        if name in ("datum", "datum_page"):
            return self._resources.get(str(doc.get("resource", "")))
        return None

    def _make_router(self, writer: RunWriter) -> Callable[[str, dict[str, Any]], Any]:
        def accept(name: str, doc: dict[str, Any]) -> None:
            if name == "event":  # RunNormalizer emits events; file them as pages
                name, doc = "event_page", dict(pack_event_page(doc))  # type: ignore[arg-type]
            writer.accept(name, doc)
            self._submit(writer, name, doc)

        if not self.normalize:
            return accept
        normalizer = _normalizer_class()()
        normalizer.subscribe(accept)
        return normalizer

    def _submit(self, writer: RunWriter, name: str, doc: dict[str, Any]) -> None:
        run = self._runs[writer.uid]
        if self._queue.qsize() > MAX_QUEUED:
            run.error = run.error or WriterError(
                f"more than {MAX_QUEUED} documents wait to be written; the scan file "
                f"{writer.scan_file} cannot keep up (is its lock held elsewhere?)"
            )
            return
        with self._starting:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._work, name="nxrefine-bs NeXus writer", daemon=True
                )
                self._thread.start()
            self._queue.put((run, name, doc))

    # ------------------------------------------------------------------ writer thread
    def _work(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=IDLE_EXIT)
            except queue.Empty:
                with self._starting:  # no document can be queued while we decide
                    if self._queue.empty():
                        self._thread = None
                        return
                continue
            if item is None:
                self._queue.task_done()
                return
            batch = [item]
            while len(batch) < 5000:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # handle the sentinel after this batch
                    self._queue.task_done()
                    break
                batch.append(nxt)
            try:
                self._write_batch(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    def _write_batch(self, batch: list[tuple[_Run, str, dict[str, Any]]]) -> None:
        runs: dict[str, tuple[_Run, list[str]]] = {}
        for run, name, _ in batch:
            runs.setdefault(run.writer.uid, (run, []))[1].append(name)
        for run, names in runs.values():
            if run.error is not None:
                if "stop" in names:
                    self._record_failure(run)
                continue
            try:
                self._write_run(run, names)
            except Exception as exc:  # recorded, reported on the run's next document
                logger.error(
                    "NeXus writer failed on run %s (%s:%s): %s",
                    run.writer.uid,
                    run.writer.scan_file,
                    run.writer.entry,
                    exc,
                )
                run.error = exc
                self.errors.append(exc)
                self._record_failure(run)

    def _write_run(self, run: _Run, names: list[str]) -> None:
        w = run.writer
        if not w.prepared:
            w.check_roots()
            if not w.scan_file.exists():
                self._create(w)
            with update_scan_file(w.scan_file, timeout=self.lock_timeout) as f:
                w.write_start(f)
            w.prepared = True
            logger.info("writing run %s into %s:%s", w.uid, w.scan_file, w.entry)
        with update_scan_file(w.scan_file, timeout=self.lock_timeout) as f:
            w.write_progress(f)
            if "stop" in names:
                run.status = w.write_stop(f)
        if "stop" in names:
            run.finished.set()
            self._forget(w.uid)

    def _create(self, w: RunWriter) -> None:
        config = w.md.get("configuration")
        doc = w.start
        if config:
            create_scan_file(
                Path(str(config)),
                w.experiment_dir,
                str(doc["sample"]),
                str(doc["label"]),
                str(doc["scan"]),
                temperature=doc.get("temperature"),
                temperature_units=str(w.md.get("temperature_units", "K")),
            )
            return
        w.scan_file.parent.mkdir(parents=True, exist_ok=True)
        with update_scan_file(w.scan_file, mode="a", timeout=self.lock_timeout) as f:
            f.attrs["NX_class"] = "NXroot"
            f.attrs["default"] = "entry"
            f.attrs["creator"] = "nxrefine-bs NeXusScanWriter"
            entry = nx_group(f, "entry", "NXentry")
            sample = nx_group(entry, "sample", "NXsample")
            write_field(sample, "name", str(doc["sample"]))
            write_field(sample, "label", str(doc["label"]))

    def _record_failure(self, run: _Run) -> None:
        """Record the failure in ``fN/acquisition`` if the file can still be written."""
        w = run.writer
        run.status = "fail"
        try:
            if w.scan_file.exists():
                with update_scan_file(w.scan_file, timeout=self.lock_timeout) as f:
                    if w.entry in f:
                        acq = nx_group(f[w.entry], "acquisition", "NXcollection")
                        write_field(acq, "status", "fail")
                        write_field(acq, "reason", f"NeXus writer: {run.error}")
                        write_field(acq, "frames_collected", w.n_frames)
        except Exception as exc:  # the disk may be full: the status then stays "running"
            logger.error("cannot record the failure of run %s in %s: %s", w.uid, w.scan_file, exc)
        if w.stop_doc is not None:
            run.finished.set()
            self._forget(w.uid)

    def _forget(self, uid: str) -> None:
        with self._routing:
            self._runs.pop(uid, None)
            for table in (self._descriptors, self._resources):
                for key in [k for k, v in table.items() if v == uid]:
                    del table[key]

    # ------------------------------------------------------------------ public helpers
    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every received document is written; True if done in time."""
        if self._thread is None:
            return True
        done = threading.Event()

        def waiter() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=waiter, daemon=True).start()
        return done.wait(timeout)

    def wait_run(self, uid: str, timeout: float | None = None) -> str | None:
        """Wait until run ``uid`` is written to the end; return its recorded status.

        Returns None if the run is unknown to this writer or not finished in time.
        """
        run = self._all_runs.get(uid)
        if run is None or not run.finished.wait(timeout):
            return None
        return run.status

    def raise_errors(self) -> None:
        """Raise the first write failure seen so far (e.g. after the last run's stop)."""
        if self.errors:
            raise WriterError(f"NeXus writer failed: {self.errors[0]}") from self.errors[0]

    def close(self, timeout: float | None = 60.0) -> None:
        """Flush, then stop the writer thread."""
        if self._closed:
            return
        if not self.flush(timeout):
            logger.error("NeXus writer: documents still unwritten after %s s", timeout)
        self._closed = True
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=5)


@functools.cache
def _normalizer_class() -> type:
    """bluesky-tiled-plugins' ``RunNormalizer`` without re-validating what it emits.

    ``RunNormalizer.emit`` checks every document it passes on against its event-model
    JSON schema: 5-30 ms per descriptor on the RunEngine thread (jsonschema), far
    above the writer's budget.  The documents come from the RunEngine (or an archive
    written from it) and :meth:`RunWriter.accept` checks every field the writer uses,
    so the emitted documents are passed on as they are.
    """
    # heavy: tiled, only with normalize=True
    from bluesky_tiled_plugins.writing.tiled_writer import RunNormalizer

    class _RunNormalizer(RunNormalizer):
        def emit(self, name: Any, doc: Any) -> None:
            self.dispatcher.process(name, doc)

    return _RunNormalizer


def _flush_at_exit(ref: weakref.ReferenceType[NeXusScanWriter]) -> None:
    writer = ref()
    if writer is not None and not writer._closed:
        with contextlib.suppress(Exception):
            writer.close(timeout=30.0)


def nexus_writer_factory(name: str, start_doc: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    """``event_model.RunRouter`` factory giving one :class:`NeXusScanWriter` per run."""
    return [NeXusScanWriter()], []
