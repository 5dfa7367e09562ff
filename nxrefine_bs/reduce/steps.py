"""Registry of reduction steps shared by the CLI, the plans and the post-scan callbacks.

A step is a callable ``run(scan_file, entry, *, overwrite=False, progress=False,
**parameters) -> dict``.  Targets are imported lazily so that importing the registry is
cheap and has no side effects.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import WorkflowError

__all__ = ["Step", "STEPS", "get_step", "STEP_ORDER"]


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
    """

    name: str
    process: str
    target: str
    per_entry: bool = True
    requires: tuple[str, ...] = ()

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
        Step("max", "nxmax", "nxrefine_bs.reduce.maximum:run"),
        Step("find", "nxfind", "nxrefine_bs.reduce.peaks:run"),
        Step("refine", "nxrefine", "nxrefine_bs.reduce.refine:run", requires=("find",)),
        Step("prepare", "nxprepare_mask", "nxrefine_bs.reduce.mask3d:run"),
        Step("transform", "nxtransform", "nxrefine_bs.reduce.transform:run", requires=("refine",)),
        Step(
            "combine",
            "nxcombine",
            "nxrefine_bs.reduce.combine:run",
            per_entry=False,
            requires=("transform",),
        ),
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
