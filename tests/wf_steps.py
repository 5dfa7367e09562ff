"""Small real reduction steps for the workflow-engine tests (importable by Dask workers).

They read the detector data through the scan file's external link and write real
NXprocess records, as the production steps do, but finish in milliseconds.  The
``grid`` step (standing for the transform) writes ``<scan>/<entry>_transform.nxs.part``
first, as the real transform does, then waits for a gate file, so a test can kill the
process running it at a known moment.  Every step start is appended to
``<scan>/runs.log`` so tests can count how often a task really ran.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from nxrefine_bs.nexus.provenance import record_process
from nxrefine_bs.reduce.steps import Step

MODULE = "wf_steps"
GATE_ENV = "NXRBS_TEST_GATE"
FAIL_ENV = "NXRBS_TEST_FAIL"


def _scan_dir(scan_file: Path) -> Path:
    sample = scan_file.parent.parent.name
    return scan_file.parent / scan_file.stem[len(sample) + 1 :]


def _log(scan_file: Path, entry: str, step: str) -> None:
    with open(_scan_dir(scan_file) / "runs.log", "a") as f:
        f.write(f"{step} {entry} {os.getpid()}\n")


def runs(scan_file: Path) -> list[tuple[str, str]]:
    """``[(step, entry)]`` of every step start logged for a scan."""
    path = _scan_dir(Path(scan_file)) / "runs.log"
    if not path.exists():
        return []
    return [tuple(line.split()[:2]) for line in path.read_text().splitlines() if line.strip()]


def count_step(scan_file, entry, *, overwrite=False, progress=False, **_):
    """Sum two frames through the external link; record ``wf_count``."""
    scan_file = Path(scan_file)
    _log(scan_file, entry, "count")
    with h5py.File(scan_file, "r") as f:
        total = float(np.sum(f[entry]["data/data"][0:2], dtype=np.int64))
    with h5py.File(scan_file, "r+") as f:
        record_process(f[entry], "wf_count", summary={"total": total})
    return {"total": total}


def grid_step(
    scan_file,
    entry,
    *,
    qh: Sequence[float] = (-1.0, 0.5, 1.0),
    qk: Sequence[float] = (-1.0, 0.5, 1.0),
    ql: Sequence[float] = (-1.0, 0.5, 1.0),
    overwrite=False,
    progress=False,
    **_,
):
    """Write a ``.part`` file, wait for the gate, then the grid file and ``wf_grid``."""
    scan_file = Path(scan_file)
    _log(scan_file, entry, "grid")
    if os.environ.get(FAIL_ENV) and Path(os.environ[FAIL_ENV]).exists():
        raise RuntimeError(f"told to fail by {os.environ[FAIL_ENV]}")
    out = _scan_dir(scan_file) / f"{entry}_transform.nxs"
    part = out.with_name(out.name + ".part")
    stale = part.exists()
    shape = tuple(int(round((hi - lo) / step)) + 1 for lo, step, hi in (ql, qk, qh))
    with h5py.File(part, "w") as f:
        f.create_dataset("v", data=np.zeros(shape, dtype=np.float32))
    gate = os.environ.get(GATE_ENV)
    if gate:
        deadline = time.monotonic() + 120
        while not Path(gate).exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"gate {gate} never opened")
            time.sleep(0.05)
    part.replace(out)
    with h5py.File(scan_file, "r+") as f:
        record_process(
            f[entry],
            "wf_grid",
            parameters={"qh": list(qh), "qk": list(qk), "ql": list(ql)},
            summary={"stale_part": stale, "shape": list(shape)},
        )
    return {"stale_part": stale}


def merge_step(scan_file, entry, *, overwrite=False, progress=False, **_):
    """Per-scan step after every entry's grid; records ``wf_merge``."""
    scan_file = Path(scan_file)
    _log(scan_file, entry, "merge")
    with h5py.File(scan_file, "r+") as f:
        record_process(f["entry"], "wf_merge")
    return {}


def touch_step(scan_file, entry, *, overwrite=False, progress=False, **_):
    """The cheapest step: record ``wf_touch``."""
    with h5py.File(scan_file, "r+") as f:
        record_process(f[entry], "wf_touch")
    return {}


def touch2_step(scan_file, entry, *, overwrite=False, progress=False, **_):
    """The cheapest step after ``touch``: record ``wf_touch2``."""
    with h5py.File(scan_file, "r+") as f:
        record_process(f[entry], "wf_touch2")
    return {}


def flaky_step(scan_file, entry, *, overwrite=False, progress=False, **_):
    """Fail with a transient HDF5-lock error on the first call per entry, then succeed."""
    scan_file = Path(scan_file)
    _log(scan_file, entry, "flaky")
    marker = _scan_dir(scan_file) / f"{entry}.flaky"
    if not marker.exists():
        marker.touch()
        raise BlockingIOError(11, "unable to lock file (Resource temporarily unavailable)")
    with h5py.File(scan_file, "r+") as f:
        record_process(f[entry], "wf_flaky")
    return {}


@dataclass(frozen=True)
class PartStep(Step):
    """A memory-heavy step declaring the temporary file it writes (removed on a rerun)."""

    part_files: tuple[str, ...] = ()
    memory_heavy: bool = True


REGISTRY = {
    s.name: s
    for s in (
        Step("count", "wf_count", f"{MODULE}:count_step"),
        PartStep(
            "grid",
            "wf_grid",
            f"{MODULE}:grid_step",
            requires=("count",),
            part_files=("{entry}_transform.nxs.part",),
        ),
        Step("merge", "wf_merge", f"{MODULE}:merge_step", per_entry=False, requires=("grid",)),
    )
}

CHEAP = {
    "touch": Step("touch", "wf_touch", f"{MODULE}:touch_step"),
    "touch2": Step("touch2", "wf_touch2", f"{MODULE}:touch2_step", requires=("touch",)),
}

FLAKY = {"flaky": Step("flaky", "wf_flaky", f"{MODULE}:flaky_step")}
