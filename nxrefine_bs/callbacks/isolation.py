"""Callback isolation: non-critical callbacks can neither fail nor stall a scan.

Two pieces:

* :class:`NonCritical` runs a callback (Tiled archiving, progress, post-scan reduction,
  anything a user subscribes) on its own thread with its own queue.  Its ``__call__``
  only enqueues, so a callback that blocks (a Tiled server that is down) or raises
  never touches the RunEngine; exceptions are logged once per run and counted.
* :class:`BeamlineRunEngine` is a :class:`bluesky.RunEngine` whose ``subscribe``
  wraps every callback in :class:`NonCritical` unless it is critical (the NeXus
  writer, or ``critical=True``).  After each ``RE(plan)`` it waits for the critical
  writers to finish writing and raises their failures, so a failure that happened
  after the last document still reaches the user.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any

from bluesky import RunEngine

from ..errors import WriterError
from .nexus_writer import NeXusScanWriter

logger = logging.getLogger(__name__)

__all__ = ["NonCritical", "BeamlineRunEngine"]

ISOLATED_FLUSH_TIMEOUT = 5.0
"""Seconds ``RE(plan)`` gives isolated callbacks to catch up after the plan."""


class NonCritical:
    """Run ``callback`` on a worker thread; never raise into, or block, the caller.

    Parameters
    ----------
    callback : callable
        ``callback(name, doc)``.
    name : str, optional
        Name used in log messages (default: the callback's class name).
    maxsize : int
        Documents kept waiting before new ones are dropped (with an error message);
        0 means unbounded.
    """

    def __init__(
        self, callback: Callable[[str, dict[str, Any]], Any], name: str = "", maxsize: int = 0
    ) -> None:
        self.callback = callback
        self.name = name or type(callback).__name__
        self.failures = 0
        self.dropped = 0
        self._queue: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue(maxsize)
        self._logged_run: str | None = None
        self._thread = threading.Thread(
            target=self._work, name=f"callback {self.name}", daemon=True
        )
        self._thread.start()
        # stop the thread before the interpreter tears modules down (a daemon thread
        # still inside h5py or a Tiled client at shutdown can crash the process)
        atexit.register(_close_at_exit, weakref.ref(self))

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait((name, doc))
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                logger.error("%s is too slow: %d documents dropped", self.name, self.dropped)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                name, doc = item
                try:
                    self.callback(name, doc)
                except Exception:
                    self.failures += 1
                    run = str(doc.get("run_start") or doc.get("uid") or "")
                    if self._logged_run != run or name == "start":
                        self._logged_run = run
                        logger.exception(
                            "non-critical callback %s failed on a %s document (the scan goes "
                            "on; further failures in this run are counted, not logged)",
                            self.name,
                            name,
                        )
            finally:
                self._queue.task_done()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued document has been handled; True if done in time."""
        done = threading.Event()
        def wait() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=wait, daemon=True).start()
        return done.wait(timeout)

    def close(self, timeout: float | None = 10.0) -> None:
        """Handle what is queued, then stop the worker thread."""
        self.flush(timeout)
        self._queue.put(None)
        self._thread.join(timeout)


def _close_at_exit(ref: weakref.ReferenceType[NonCritical]) -> None:
    wrapper = ref()
    if wrapper is not None and wrapper._thread.is_alive():
        wrapper.close(timeout=10.0)


def _is_critical(func: Any) -> bool:
    return isinstance(func, NeXusScanWriter)


class BeamlineRunEngine(RunEngine):
    """A RunEngine that isolates non-critical callbacks and reports writer failures.

    ``subscribe(func, name="all", *, critical=None)``: the NeXus writer is critical
    by default, everything else non-critical (wrapped in :class:`NonCritical`).

    Parameters
    ----------
    *args, **kwargs
        Passed to :class:`bluesky.RunEngine`.
    flush_timeout : float or None
        Seconds ``RE(plan)`` waits, after the plan, for critical writers to finish.
    """

    def __init__(self, *args: Any, flush_timeout: float | None = 60.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.flush_timeout = flush_timeout
        self._writers: dict[int, Any] = {}
        self._isolated: dict[int, NonCritical] = {}

    def subscribe(self, func: Any, name: str = "all", *, critical: bool | None = None) -> int:
        """Subscribe ``func``; non-critical callbacks run isolated on their own thread."""
        if critical is None:
            critical = _is_critical(func)
        if critical:
            token = super().subscribe(func, name)
            if hasattr(func, "flush"):
                self._writers[token] = func
            return token
        wrapper = func if isinstance(func, NonCritical) else NonCritical(func)
        token = super().subscribe(wrapper, name)
        self._isolated[token] = wrapper
        return token

    def unsubscribe(self, token: int) -> None:
        """Unsubscribe, flushing and closing an isolation wrapper made by :meth:`subscribe`."""
        super().unsubscribe(token)
        writer = self._writers.pop(token, None)
        if writer is not None and hasattr(writer, "flush"):
            writer.flush(self.flush_timeout)
        wrapper = self._isolated.pop(token, None)
        if wrapper is not None:
            wrapper.close()

    def flush(self, timeout: float | None = None) -> None:
        """Wait for critical writers and isolated callbacks to catch up."""
        for writer in list(self._writers.values()):
            if not writer.flush(timeout):
                logger.error("%s still has unwritten documents after %s s", writer, timeout)
        for wrapper in list(self._isolated.values()):
            wrapper.flush(timeout)

    def _then_flush(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        errors_before = {id(w): len(getattr(w, "errors", ())) for w in self._writers.values()}
        try:
            result = method(*args, **kwargs)
        finally:
            for writer in list(self._writers.values()):
                if not writer.flush(self.flush_timeout):
                    logger.warning(
                        "%s is still writing %s s after the plan (is the scan file locked by "
                        "another program?); it goes on in the background",
                        type(writer).__name__,
                        self.flush_timeout,
                    )
            # let isolated callbacks catch up briefly, so code after RE(...) sees what
            # they recorded; a slow one (a Tiled server that is down) goes on alone
            for wrapper in list(self._isolated.values()):
                wrapper.flush(ISOLATED_FLUSH_TIMEOUT)
        for writer in list(self._writers.values()):
            new = list(getattr(writer, "errors", ()))[errors_before.get(id(writer), 0) :]
            if new:
                raise WriterError(f"NeXus writer failed: {new[0]}") from new[0]
        return result

    def __call__(self, *args: Any, **metadata_kw: Any) -> Any:
        """Run a plan, then wait for the critical writers (see the class docstring)."""
        return self._then_flush(super().__call__, *args, **metadata_kw)

    def resume(self) -> Any:
        """Resume a paused plan, then wait for the critical writers."""
        return self._then_flush(super().resume)

    def abort(self, reason: str = "") -> Any:
        """Abort a paused plan, then wait for the critical writers."""
        return self._then_flush(super().abort, reason)

    def stop(self) -> Any:
        """Stop a paused plan, then wait for the critical writers."""
        return self._then_flush(super().stop)

    def halt(self) -> Any:
        """Halt the plan, then wait for the critical writers.

        Bluesky reports a halt as ``abort`` with no reason; the writers are told, so
        the scan file records ``halt``.
        """
        for writer in self._writers.values():
            if hasattr(writer, "interrupt_hint"):
                writer.interrupt_hint = "halt"
        return self._then_flush(super().halt)
