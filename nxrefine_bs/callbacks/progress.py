"""A terminal progress bar over the frames of rotation runs."""

from __future__ import annotations

import logging
import sys
from typing import IO, Any

from tqdm import tqdm

logger = logging.getLogger(__name__)

__all__ = ["FrameProgress"]


class FrameProgress:
    """tqdm bar counting detector frames as their ``StreamDatum``/events arrive.

    Without ``total`` there is one bar per run: it appears with the run's start document
    (its length is the run's ``nxrefine.n_frames``, its label ``sample scan entry``) and
    is closed, with its line ended, by the run's stop document.  With ``total`` one bar
    counts the frames of every run and closes when ``total`` frames have arrived or on
    :meth:`close`.  No bar is drawn before the first run starts.

    Non-critical: any error is logged and ignored.

    Parameters
    ----------
    total : int, optional
        Frames expected over all runs (one bar for all of them).
    disable : bool
        Hide the bars.
    desc : str
        Label of a bar whose run names no sample.
    file : file-like, optional
        Where bars are drawn (default: standard error).
    """

    def __init__(
        self,
        total: int | None = None,
        *,
        disable: bool = False,
        desc: str = "frames",
        file: IO[str] | None = None,
    ) -> None:
        self.total = total
        self.disable = disable
        self.desc = desc
        self.file = file
        self.bar: tqdm | None = None
        self._detector_key: str | None = None
        self._primary: set[str] = set()
        self._resources: set[str] = set()

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        try:
            self._handle(name, doc)
        except Exception:  # never let a display break a scan
            logger.exception("progress display failed on %s", name)

    def _new_bar(self, total: int | None, desc: str) -> tqdm:
        return tqdm(
            total=total,
            unit="frame",
            desc=desc,
            disable=self.disable,
            file=self.file if self.file is not None else sys.stderr,
            leave=True,
        )

    def _handle(self, name: str, doc: dict[str, Any]) -> None:
        if name == "start":
            md = doc.get("nxrefine") or {}
            self._detector_key = (md.get("detector") or {}).get("data_key")
            self._primary.clear()
            self._resources.clear()
            sample, scan, entry = doc.get("sample"), doc.get("scan"), doc.get("entry")
            desc = " ".join(str(v) for v in (sample, scan, entry) if v) or self.desc
            if self.total is None:
                self.close()
                n = md.get("n_frames")
                self.bar = self._new_bar(int(n) if n else None, desc)
            elif self.bar is None:
                self.bar = self._new_bar(self.total, desc)
            else:
                self.bar.set_description(desc)
        elif self.bar is None:
            return
        elif name == "descriptor" and doc.get("name") == "primary":
            self._primary.add(doc["uid"])
        elif name == "stream_resource" and doc.get("data_key") == self._detector_key:
            self._resources.add(doc["uid"])
        elif name == "stream_datum" and doc.get("stream_resource") in self._resources:
            self.bar.update(int(doc["indices"]["stop"]) - int(doc["indices"]["start"]))
        elif name == "event" and doc["descriptor"] in self._primary and not self._resources:
            self.bar.update(1)  # ophyd v1 step scans: one frame per event
        elif name == "stop":
            if self.total is None or self.bar.n >= self.total:
                self.close()
            else:
                self.bar.refresh()

    def close(self) -> None:
        """Close the current bar (its line is ended); safe to call more than once."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
