"""A terminal progress bar over the frames of a series of rotation runs."""

from __future__ import annotations

import logging
from typing import Any

from tqdm import tqdm

logger = logging.getLogger(__name__)

__all__ = ["FrameProgress"]


class FrameProgress:
    """tqdm bar counting detector frames as their ``StreamDatum``/events arrive.

    Non-critical: any error is logged and ignored.

    Parameters
    ----------
    total : int, optional
        Frames expected over all runs; if None the bar grows with each run's
        ``nxrefine.n_frames``.
    disable : bool
        Hide the bar.
    """

    def __init__(self, total: int | None = None, *, disable: bool = False, desc: str = "frames"):
        self._fixed_total = total is not None
        self.bar = tqdm(total=total or 0, unit="frame", desc=desc, disable=disable)
        self._detector_key: str | None = None
        self._primary: set[str] = set()
        self._resources: set[str] = set()

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        try:
            self._handle(name, doc)
        except Exception:  # never let a display break a scan
            logger.exception("progress display failed on %s", name)

    def _handle(self, name: str, doc: dict[str, Any]) -> None:
        if name == "start":
            md = doc.get("nxrefine") or {}
            self._detector_key = (md.get("detector") or {}).get("data_key")
            self._primary.clear()
            self._resources.clear()
            if not self._fixed_total and md.get("n_frames"):
                self.bar.total += int(md["n_frames"])
                self.bar.refresh()
            sample, scan, entry = doc.get("sample"), doc.get("scan"), doc.get("entry")
            if sample:
                self.bar.set_description(f"{sample} {scan} {entry}")
        elif name == "descriptor" and doc.get("name") == "primary":
            self._primary.add(doc["uid"])
        elif name == "stream_resource" and doc.get("data_key") == self._detector_key:
            self._resources.add(doc["uid"])
        elif name == "stream_datum" and doc.get("stream_resource") in self._resources:
            self.bar.update(int(doc["indices"]["stop"]) - int(doc["indices"]["start"]))
        elif name == "event" and doc["descriptor"] in self._primary and not self._resources:
            self.bar.update(1)  # ophyd v1 step scans: one frame per event
        elif name == "stop":
            self.bar.refresh()

    def close(self) -> None:
        """Close the bar."""
        self.bar.close()
