"""Helpers for tests of code built on nxrefine-bs (used by this project's own tests)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Iterator
from typing import Any

from bluesky import RunEngine

from .callbacks.isolation import BeamlineRunEngine

__all__ = ["closing_run_engine"]

logger = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT = 30.0
"""Seconds the loop's leftover tasks get to finish after cancellation at close."""


@contextlib.contextmanager
def closing_run_engine(**kwargs: Any) -> Iterator[RunEngine]:
    """A :class:`BeamlineRunEngine` on its own event loop, halted and closed on exit.

    Keyword arguments go to :class:`bluesky.RunEngine` (e.g. ``call_returns_result``).
    """
    loop = asyncio.new_event_loop()
    engine = BeamlineRunEngine({}, loop=loop, **kwargs)
    try:
        yield engine
    finally:
        if engine.state not in ("idle", "panicked"):
            engine.halt()
        for token in list(engine._writers) + list(engine._isolated):
            engine.unsubscribe(token)  # flushes and closes isolation threads
        # as asyncio.run ends: cancel what is left and close the async generators
        # (ophyd-async's observe_value...) while the loop runs; one finalized after
        # loop.close() raises "Event loop is closed" from its await
        shutdown = asyncio.run_coroutine_threadsafe(_shutdown_loop(), loop)
        try:
            shutdown.result(timeout=SHUTDOWN_TIMEOUT)
        except (TimeoutError, asyncio.CancelledError) as exc:
            logger.warning("RunEngine loop tasks still pending at close: %r", exc)
        loop.call_soon_threadsafe(loop.stop)
        engine._th.join()
        gc.collect()  # finish abandoned device coroutines while their loop still exists
        loop.close()


async def _shutdown_loop() -> None:
    """Cancel the loop's other tasks, wait for them, then close its async generators."""
    loop = asyncio.get_running_loop()
    tasks = [t for t in asyncio.all_tasks(loop) if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await loop.shutdown_asyncgens()
