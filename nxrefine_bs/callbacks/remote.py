"""Run the NeXus writer (and optionally post-scan reduction) outside the RunEngine process.

The RunEngine process publishes documents with ``bluesky.callbacks.zmq.Publisher`` to a
``bluesky-0MQ-proxy``; this consumer subscribes to the proxy's output port::

    bluesky-0MQ-proxy --in-address 5577 --out-address 5578
    nxrefine-bs writer --zmq localhost:5578            # this module

In the RunEngine session::

    from bluesky.callbacks.zmq import Publisher
    RE.subscribe(Publisher("localhost:5577"))
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
from collections.abc import Sequence
from typing import Any

from .nexus_writer import NeXusScanWriter

logger = logging.getLogger(__name__)

__all__ = ["serve", "main"]


def serve(address: str, *, reduce_steps: Sequence[str] = ()) -> None:
    """Consume documents from a 0MQ proxy at ``address`` until interrupted.

    Parameters
    ----------
    address : str
        ``host:port`` of the proxy's output side.
    reduce_steps : sequence of str
        Reduction steps to queue after each successful rotation (post-scan reduction).
    """
    from bluesky.callbacks.zmq import RemoteDispatcher

    dispatcher = RemoteDispatcher(address)
    writer = NeXusScanWriter()
    dispatcher.subscribe(writer)
    if reduce_steps:
        from .reduction import PostScanReduction

        dispatcher.subscribe(PostScanReduction(steps=tuple(reduce_steps)))

    def _stop(*_: Any) -> None:
        dispatcher.loop.call_soon_threadsafe(dispatcher.stop)

    signal.signal(signal.SIGTERM, _stop)
    logger.info("NeXus writer listening on %s", address)
    with contextlib.suppress(KeyboardInterrupt):
        dispatcher.start()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for ``python -m nxrefine_bs.callbacks.remote``."""
    parser = argparse.ArgumentParser(prog="python -m nxrefine_bs.callbacks.remote")
    parser.add_argument("--zmq", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    serve(args.zmq)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
