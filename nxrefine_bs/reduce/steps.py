"""Registry of reduction steps shared by the CLI, the plans and the post-scan callbacks.

A step is a callable ``run(scan_file, entry, *, overwrite=False, progress=False,
**parameters) -> dict``.  Targets are imported lazily so that importing the registry is
cheap and has no side effects.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import WorkflowError
from ..nexus.nxreduce import resolve_parameters
from ..nexus.scanfile import rotation_entries
from .parameters import parameters_of, validate_parameters

__all__ = [
    "Step",
    "STEPS",
    "STEP_ORDER",
    "get_step",
    "run_step",
    "step_entries",
    "step_parameters",
    "step_targets",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Step:
    """One reduction step.

    Parameters
    ----------
    name : str
        Short name used on the command line and in the workflow database.
    process : str
        Name of the NXprocess group recording completion (NXRefine's names).
    target : str
        ``"module:function"`` implementing the step.
    per_entry : bool
        True if the step runs once per rotation entry (``f1``...), False if once per
        scan (on ``entry``).
    requires : tuple of str
        Steps that must be done first (on the same entry, or on every rotation entry
        for per-scan steps).
    requires_all : tuple of str
        Steps that must be done on *every* rotation entry first, because this step
        reads a result they share (``transform`` reads the lattice in ``entry/sample``
        that each rotation's ``refine`` rewrites).
    from_first : bool
        Per-entry step whose run on ``f2``... reads its own result on the first
        rotation (``max``: the transmission of ``f1`` normalises the others'), so it
        waits for it.
    in_order : bool
        Per-entry step run on the rotations one after another, each starting from the
        previous one's result (``refine``: the orientation and the lattice in
        ``entry/sample``), so ``fN`` waits for ``f(N-1)``.
    from_parent : bool
        Step whose run on a child scan starts from its result on the parent scan's
        same entry (``refine``), so it waits for it.
    memory_heavy : bool
        Holds a large array (a grid or a stack): executors run few at once.
    """

    name: str
    process: str
    target: str
    per_entry: bool = True
    requires: tuple[str, ...] = ()
    requires_all: tuple[str, ...] = ()
    from_first: bool = False
    in_order: bool = False
    from_parent: bool = False
    memory_heavy: bool = False

    def load(self) -> Callable[..., dict[str, Any]]:
        """Import and return the step function."""
        module, _, attr = self.target.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise WorkflowError(
                f"reduction step {self.name!r}: cannot import {self.target!r} ({exc})"
            ) from exc


STEPS: dict[str, Step] = {
    s.name: s
    for s in (
        Step("max", "nxmax", "nxrefine_bs.reduce.maximum:run", from_first=True),
        Step("find", "nxfind", "nxrefine_bs.reduce.peaks:run", requires=("max",)),
        Step(
            "refine",
            "nxrefine",
            "nxrefine_bs.reduce.refine:run",
            requires=("find",),
            in_order=True,
            from_parent=True,
        ),
        Step(
            "prepare",
            "nxprepare_mask",
            "nxrefine_bs.reduce.mask3d:run",
            requires=("refine",),
            requires_all=("refine",),
            memory_heavy=True,
        ),
        Step(
            "transform",
            "nxtransform",
            "nxrefine_bs.reduce.transform:run",
            requires=("refine",),
            requires_all=("refine",),
            memory_heavy=True,
        ),
        Step(
            "combine",
            "nxcombine",
            "nxrefine_bs.reduce.combine:run",
            per_entry=False,
            requires=("transform",),
            memory_heavy=True,
        ),
        Step("pdf", "nxpdf", "nxrefine_bs.reduce.pdf:run", per_entry=False, requires=("combine",)),
    )
}

STEP_ORDER: tuple[str, ...] = tuple(STEPS)


def get_step(name: str) -> Step:
    """Return the step called ``name`` or raise a :class:`WorkflowError` listing the valid ones."""
    try:
        return STEPS[name]
    except KeyError:
        raise WorkflowError(
            f"unknown reduction step {name!r}; choose one of {', '.join(STEPS)}"
        ) from None


def step_parameters(
    name: str, scan_file: str | os.PathLike[str], explicit: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Keyword arguments for step ``name``: explicit values over the settings layers.

    ``explicit`` uses the names of the step's parameter model
    (:data:`nxrefine_bs.reduce.parameters.STEP_PARAMETERS`); each is checked and
    converted to its type.  Parameters left unset (None) that have a settings key are
    filled from the scan file, its parent, the experiment's and the server's settings
    (:func:`nxrefine_bs.nexus.nxreduce.resolve_parameters`); the others keep the step
    function's default.

    Raises
    ------
    ParameterError
        On a name the step does not have (the message lists the valid ones) or a value
        of the wrong type.
    """
    step = get_step(name).name
    params = validate_parameters(step, explicit or {})
    settings = {p.setting: p.name for p in parameters_of(step) if p.setting}
    given = {key: params.get(arg) for key, arg in settings.items()}
    resolved = resolve_parameters(settings, explicit=given, scan_file=scan_file)
    for key, arg in settings.items():
        params[arg] = resolved[key]
    return params


def step_targets(step: Step, entries: Iterable[str]) -> list[str]:
    """Entries ``step`` works on: each of the rotation ``entries``, or ``entry`` for a
    per-scan step (the one rule; :func:`step_entries` checks the entries exist)."""
    return list(entries) if step.per_entry else ["entry"]


def step_entries(
    name: str, scan_file: str | os.PathLike[str], entries: Sequence[str] | None = None
) -> list[str]:
    """The entries step ``name`` runs on: the rotation entries (or a subset), or ``entry``."""
    step = get_step(name)
    if not step.per_entry:
        return step_targets(step, ())
    available = rotation_entries(scan_file)
    if not entries:
        return available
    unknown = [e for e in entries if e not in available]
    if unknown:
        raise WorkflowError(
            f"{scan_file}: no rotation entries {', '.join(unknown)}; "
            f"available: {', '.join(available) or 'none'}"
        )
    return list(entries)


def run_step(
    name: str,
    scan_file: str | os.PathLike[str],
    entry: str,
    *,
    overwrite: bool = False,
    progress: bool = False,
    **explicit: Any,
) -> dict[str, Any]:
    """Run step ``name`` on one entry with parameters resolved through the settings layers."""
    func = get_step(name).load()
    params = step_parameters(name, scan_file, explicit)
    logger.info("running %s on %s:%s with %s", name, scan_file, entry, params)
    return func(Path(scan_file), entry, overwrite=overwrite, progress=progress, **params)
