"""The reduction graph: one task per (scan, entry, step), with its dependencies.

The graph comes from the step registry (:data:`~nxrefine_bs.reduce.steps.STEPS`):
``Step.requires`` (and ``requires_all``: on every entry) names the steps a step needs,
``Step.per_entry`` says whether it
runs per rotation or once per scan.  A requirement of a per-entry step on a
per-entry step is the same entry; a per-scan step needs the requirement on every
entry.  A ``from_first`` step (``max``) on ``f2``... also needs itself on the first
rotation, an ``in_order`` step (``refine``) on ``fN`` needs itself on ``f(N-1)``, and a
``from_parent`` step (``refine``) of a child scan needs itself on the parent scan's same
entry; ``memory_heavy`` steps ask the executor for a memory slot.
Nothing is hard-coded about which steps exist: a step added to the registry (``pdf``
requiring ``combine``) joins the graph.

Keys read like ``transform-<sample>_<scan>-f2-<token>`` (``combine-<sample>_<scan>-
<token>`` for per-scan steps), where the token is unique to one submission, so the
dashboard groups tasks by step and two submissions never collide.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py

from ..errors import WorkflowError
from ..nexus.provenance import process_done
from ..nexus.scanfile import find_parent, open_scan_file
from ..reduce.steps import STEPS, Step
from .params import step_params
from .schema import SCAN_ENTRY
from .sync import rotation_entries, scan_targets

logger = logging.getLogger(__name__)

__all__ = [
    "TaskSpec",
    "build_graph",
    "new_token",
    "parent_scan_file",
    "requirement_targets",
    "requirements",
    "select_steps",
    "task_key",
]


def from_parent(step: Step) -> bool:
    """True if ``step`` on a child scan needs it done on the parent's same entry."""
    return bool(getattr(step, "from_parent", False))


@dataclass(frozen=True)
class TaskSpec:
    """One task of the graph: everything a worker needs, as plain picklable data.

    ``deps`` are keys of tasks (of this graph or of an earlier submission still
    running) whose results this task receives; the ``soft`` ones only order the work
    (``requires_all``, ``from_first``, ``in_order``): their failure does not block it.
    ``params`` are the explicit parameters of this step as submitted (resolved through
    the settings layers when the task runs).
    """

    key: str
    scan_file: str
    entry: str
    step: Step
    deps: tuple[str, ...] = ()
    soft: tuple[str, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)
    overwrite: bool = False
    heavy: bool = False


def select_steps(
    steps: Iterable[str] | None, registry: Mapping[str, Step] | None = None
) -> list[Step]:
    """Steps by name, validated and sorted in registry order (all steps if None)."""
    registry = STEPS if registry is None else registry
    if steps is None:
        return list(registry.values())
    names = [s.strip() for s in steps if s and s.strip()]
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise WorkflowError(
            f"unknown reduction step(s) {', '.join(unknown)}; choose from {', '.join(registry)}"
        )
    return [registry[n] for n in registry if n in names]


def parent_scan_file(scan_file: str | os.PathLike[str]) -> Path | None:
    """The parent scan named by ``/entry/nxscans/parent`` (None if none or itself)."""
    scan_file = Path(scan_file).absolute()
    found = find_parent(scan_file)
    parent = Path(found).absolute() if found else None
    if parent is None or parent.resolve() == scan_file.resolve():
        return None
    return parent


def safe_parent(scan_file: Path) -> Path | None:
    """:func:`parent_scan_file`, or None with a warning for a broken pointer."""
    try:
        return parent_scan_file(scan_file)
    except Exception as exc:  # a broken pointer fails the child's refine when it runs
        logger.warning("%s: cannot resolve its parent scan: %s", scan_file.name, exc)
        return None


def new_token(experiment: str) -> str:
    """An 8-hex-digit token unique to one submission of one experiment."""
    return hashlib.sha1(f"{experiment}|{uuid.uuid4()}".encode()).hexdigest()[:8]


def task_key(scan_file: str | os.PathLike[str], entry: str, step: str, token: str) -> str:
    """``<step>-<sample>_<scan>-<entry>-<token>`` (no entry for per-scan steps)."""
    stem = Path(scan_file).stem
    middle = stem if entry == SCAN_ENTRY else f"{stem}-{entry}"
    return f"{step}-{middle}-{token}"


def requirement_targets(step: Step, req: Step, entry: str, entries: Sequence[str]) -> list[str]:
    """Entries of ``req`` that ``step`` on ``entry`` needs."""
    if not req.per_entry:
        return [SCAN_ENTRY]
    return [entry] if step.per_entry else list(entries)


def requirements(
    step: Step,
    registry: Mapping[str, Step],
    entry: str,
    entries: Sequence[str],
    *,
    shared: bool = True,
) -> list[tuple[Step, str]]:
    """``(required step, entry)`` pairs that ``step`` on ``entry`` needs, without repeats.

    ``requires`` on the same entry (every entry for a per-scan step), and with
    ``shared`` also ``requires_all`` on every entry.
    """
    out: list[tuple[Step, str]] = []
    for req_name in step.requires:
        req = _lookup(registry, req_name)
        out += [(req, t) for t in requirement_targets(step, req, entry, entries)]
    for req_name in getattr(step, "requires_all", ()) if shared else ():
        req = _lookup(registry, req_name)
        out += [(req, t) for t in (list(entries) if req.per_entry else [SCAN_ENTRY])]
    unique: list[tuple[Step, str]] = []
    for pair in out:
        if all((p[0].name, p[1]) != (pair[0].name, pair[1]) for p in unique):
            unique.append(pair)
    return unique


def _earlier_entries(step: Step, entry: str, entries: Sequence[str]) -> list[str]:
    """Rotations whose run of ``step`` this one reads (``from_first``, ``in_order``)."""
    if not step.per_entry or entry not in entries or entry == entries[0]:
        return []
    out = []
    if getattr(step, "from_first", False):
        out.append(entries[0])
    if getattr(step, "in_order", False):
        out.append(entries[list(entries).index(entry) - 1])
    return list(dict.fromkeys(out))


def _lookup(registry: Mapping[str, Step], name: str) -> Step:
    step = registry.get(name) or STEPS.get(name)
    if step is None:
        raise WorkflowError(f"a registered step requires unknown step {name!r}")
    return step


def build_graph(
    scan_files: Sequence[Path],
    *,
    steps: Iterable[str] | None = None,
    entries: Sequence[str] | None = None,
    params: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    registry: Mapping[str, Step] | None = None,
    token: str,
    running: Callable[[Path, str, str], str | None] | None = None,
    only: set[tuple[Path, str, str]] | None = None,
    params_for: Callable[[Path, str, str], Mapping[str, Any] | None] | None = None,
) -> tuple[list[TaskSpec], dict[Path, list[str]]]:
    """The tasks to submit for some scan files, in dependency order.

    Parameters
    ----------
    scan_files : sequence of Path
        Scan files; parents are put before their children.
    steps, entries : optional
        Steps (default all) and rotation entries (default all of each file's).
    params : mapping, optional
        Parameters: scalars for every step that takes them, ``{step: {...}}`` for one.
    overwrite : bool
        Redo steps already done in the file.
    token : str
        Unique to this submission (see :func:`new_token`).
    running : callable, optional
        ``running(scan_file, entry, step)`` -> the key of a task of an earlier
        submission that is still pending for it, or None.  Such a task is not
        submitted again; tasks needing it depend on its key.
    only : set of (scan file, entry, step), optional
        Submit only these tasks (``retry``).
    params_for : callable, optional
        ``params_for(scan_file, entry, step)`` -> the parameters of that task (the
        stored job spec, for ``retry``) instead of ``params``; None falls back.

    Returns
    -------
    tasks : list of TaskSpec
        New tasks, each after its dependencies.
    entries_of : dict
        Rotation entries of each scan file.
    """
    registry = STEPS if registry is None else registry
    chosen = select_steps(steps, registry)
    parents = {f: safe_parent(f) for f in scan_files}
    ordered = sorted(scan_files, key=lambda f: (parents[f] in parents, str(f)))
    keys: dict[tuple[Path, str, str], str] = {}
    tasks: list[TaskSpec] = []
    entries_of: dict[Path, list[str]] = {}
    for scan_file in ordered:
        try:
            with open_scan_file(scan_file) as f:
                all_entries = rotation_entries(f)
                wanted = list(entries) if entries is not None else all_entries
                missing = [e for e in wanted if e not in all_entries]
                if missing:
                    raise WorkflowError(
                        f"{scan_file.name} has no entries {', '.join(missing)}; "
                        f"it has {', '.join(all_entries) or 'none'}"
                    )
                done = {
                    (step.name, entry)
                    for step in chosen
                    for entry in scan_targets(step, wanted)
                    if isinstance(f.get(entry), h5py.Group)
                    and process_done(f[entry], step.process)
                }
        except OSError as exc:
            raise WorkflowError(f"cannot open scan file {scan_file}: {exc}") from exc
        entries_of[scan_file] = all_entries
        for step in chosen:
            for entry in scan_targets(step, wanted):
                if (step.name, entry) in done and not overwrite:
                    continue
                if only is not None and (scan_file, entry, step.name) not in only:
                    continue
                pending = running(scan_file, entry, step.name) if running else None
                if pending is not None and not overwrite:
                    keys[(scan_file, entry, step.name)] = pending
                    continue
                def key_of(path: Path, target: str, name: str) -> str | None:
                    dep = keys.get((path, target, name))
                    if dep is None and running is not None:
                        dep = running(path, target, name)
                    return dep

                hard = [
                    key_of(scan_file, target, req.name)
                    for req, target in requirements(
                        step, registry, entry, all_entries, shared=False
                    )
                ]
                parent = parents[scan_file]
                if from_parent(step) and parent is not None:
                    hard.append(key_of(parent, entry, step.name))
                # ordering only: run after these if they are queued, never fail for them
                soft = [
                    key_of(scan_file, target, req.name)
                    for req, target in requirements(step, registry, entry, all_entries)
                ] + [
                    key_of(scan_file, earlier, step.name)
                    for earlier in _earlier_entries(step, entry, all_entries)
                ]
                hard_keys = [k for k in dict.fromkeys(hard) if k is not None]
                soft_keys = [k for k in dict.fromkeys(soft) if k is not None and k not in hard]
                deps = hard_keys + soft_keys
                stored = params_for(scan_file, entry, step.name) if params_for else None
                key = task_key(scan_file, entry, step.name, token)
                keys[(scan_file, entry, step.name)] = key
                tasks.append(
                    TaskSpec(
                        key=key,
                        scan_file=str(scan_file),
                        entry=entry,
                        step=step,
                        deps=tuple(deps),
                        soft=tuple(soft_keys),
                        params=dict(stored)
                        if stored is not None
                        else step_params(params, step.name),
                        overwrite=overwrite,
                        heavy=bool(getattr(step, "memory_heavy", False)),
                    )
                )
    return tasks, entries_of
