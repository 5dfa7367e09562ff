"""Reduction steps as Bluesky plans.

The work runs in a worker thread (``asyncio.to_thread``) awaited through
``bluesky.plan_stubs.wait_for``, so the RunEngine's event loop stays responsive (pause,
abort and other callbacks keep working) while frames are crunched.  The plans open no
run of their own: the results are recorded as NXprocess groups in the scan file, and the
plan returns the step summaries.

Examples
--------
>>> RE(reduce_scan(scan_file, steps=["max", "find"]))  # doctest: +SKIP
>>> RE(find_peaks(scan_file, threshold=500))  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import bluesky.plan_stubs as bps
from bluesky.utils import MsgGenerator

from ..reduce.parameters import split_parameters
from ..reduce.steps import STEP_ORDER, get_step, run_step, step_entries

logger = logging.getLogger(__name__)

__all__ = [
    "reduce_scan",
    "find_maximum",
    "find_peaks",
    "refine_orientation",
    "prepare_mask",
    "transform",
    "combine",
    "pdf",
]


def reduce_scan(
    scan_file: str | os.PathLike[str],
    steps: Sequence[str] | None = None,
    entries: Sequence[str] | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    **parameters: Any,
) -> MsgGenerator[dict[str, dict[str, Any]]]:
    """Run reduction ``steps`` (default: all, in order) on a scan file.

    The plan returns its results: ``RE(reduce_scan(...))`` gives them as
    ``.plan_result`` when the RunEngine was made with ``call_returns_result=True``
    (otherwise the RunEngine returns the uids of runs, and this plan opens none).

    Parameters
    ----------
    scan_file : path-like
        ``<sample>_<scan>.nxs``.
    steps : sequence of str, optional
        Step names from :data:`nxrefine_bs.reduce.steps.STEPS`.
    entries : sequence of str, optional
        Rotation entries for per-entry steps (default: all).
    overwrite : bool
        Redo steps that are already done.
    progress : bool
        Show each step's progress bar (on standard error) and log each step.
    **parameters
        Explicit step parameters (``threshold=...``), each given to the steps that have
        it, or ``<step>={...}`` for one step only; unset ones come from settings.  A
        name no step has raises :class:`~nxrefine_bs.reduce.parameters.ParameterError`
        before any work is done.

    Returns
    -------
    dict
        ``{"<step>:<entry>": summary}``.
    """
    names = list(steps) if steps else list(STEP_ORDER)
    for name in names:
        get_step(name)  # validate every name before doing any work
    # every parameter must belong to one of the steps (a typo is an error, not ignored)
    per_step = split_parameters(names, parameters)
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        accepted = per_step[name]
        for entry in step_entries(name, scan_file, entries):
            work = functools.partial(
                run_step,
                name,
                scan_file,
                entry,
                overwrite=overwrite,
                progress=progress,
                **accepted,
            )
            logger.info("reduce_scan: %s on %s:%s", name, scan_file, entry)
            box: dict[str, Any] = {}

            async def _work(work: Callable[[], dict] = work, box: dict = box) -> None:
                box["result"] = await asyncio.to_thread(work)

            yield from bps.wait_for([_work])
            results[f"{name}:{entry}"] = box["result"]
    return results


def find_maximum(
    scan_file: str | os.PathLike[str], entries: Sequence[str] | None = None, **kw: Any
) -> MsgGenerator[dict[str, dict[str, Any]]]:
    """Plan: find maximum (frame sums, radial sum, transmission) on each rotation."""
    return (yield from reduce_scan(scan_file, ["max"], entries, **kw))


def find_peaks(
    scan_file: str | os.PathLike[str], entries: Sequence[str] | None = None, **kw: Any
) -> MsgGenerator[dict[str, dict[str, Any]]]:
    """Plan: 3-D Bragg peak search on each rotation."""
    return (yield from reduce_scan(scan_file, ["find"], entries, **kw))


def refine_orientation(
    scan_file: str | os.PathLike[str], entries: Sequence[str] | None = None, **kw: Any
) -> MsgGenerator[dict[str, dict[str, Any]]]:
    """Plan: index and refine orientation, lattice and geometry on each rotation."""
    return (yield from reduce_scan(scan_file, ["refine"], entries, **kw))


def prepare_mask(
    scan_file: str | os.PathLike[str], entries: Sequence[str] | None = None, **kw: Any
) -> MsgGenerator[dict[str, dict[str, Any]]]:
    """Plan: 3-D artefact mask around Bragg peaks on each rotation."""
    return (yield from reduce_scan(scan_file, ["prepare"], entries, **kw))


def transform(
    scan_file: str | os.PathLike[str], entries: Sequence[str] | None = None, **kw: Any
) -> MsgGenerator[dict[str, dict[str, Any]]]:
    """Plan: transform each rotation to (H, K, L)."""
    return (yield from reduce_scan(scan_file, ["transform"], entries, **kw))


def combine(
    scan_file: str | os.PathLike[str], **kw: Any
) -> MsgGenerator[dict[str, dict[str, Any]]]:
    """Plan: merge the rotations' transforms into ``transform.nxs``."""
    return (yield from reduce_scan(scan_file, ["combine"], None, **kw))


def pdf(scan_file: str | os.PathLike[str], **kw: Any) -> MsgGenerator[dict[str, dict[str, Any]]]:
    """Plan: 3D-ΔPDF of the combined transform (symmetrise, taper, punch-and-fill, FFT)."""
    return (yield from reduce_scan(scan_file, ["pdf"], None, **kw))
