"""Helpers for tests of code built on nxrefine-bs (used by this project's own tests)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Iterator
from typing import Any

from bluesky import RunEngine

from .callbacks.isolation import BeamlineRunEngine

__all__ = ["closing_run_engine"]


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
        loop.call_soon_threadsafe(loop.stop)
        engine._th.join()
        gc.collect()  # finish abandoned device coroutines while their loop still exists
        loop.close()
