"""Reduction throughput on a Dask cluster: two single-thread workers vs one serial process.

The work: the real reduction (max, find, refine, prepare, transform, combine) of
``--scans`` simulated scans of ``--rotations`` rotations each (seeded, 360 frames of
195 x 235 pixels, written once into a temporary directory); before each run the scan
files are restored as simulated and every step is redone (``overwrite``).

* yardstick -- the same graph run serially in this process (``run_scan_steps`` scan
  after scan, one thread);
* measured  -- the graph submitted to a ``dask scheduler`` with two ``dask worker``
  processes (``--nthreads 1``), without a nanny and (``--nanny``) with one.

Each is repeated ``--repeats`` times (median reported).  Correctness in the same run:
every task ends DONE, and every scan's combined ``transform.nxs`` is identical to the
serial one.  Where the remainder goes, from the task rows of the workflow database:
worker utilisation (busy / (2 x wall)), time with 0, 1 and 2 tasks running (the
ramp-up, dependency waits and the tail), and the inflation of the summed task time
over the serial one (two processes sharing memory bandwidth and caches).

Usage::

    python benchmarks/bench_workflow.py [--scans 5] [--rotations 3] [--repeats 3]
                                        [--nanny] [--json out.json]
"""

from __future__ import annotations

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import common  # noqa: F401  (pins one thread per process before numpy/numba)
import h5py  # noqa: E402
import numpy as np  # noqa: E402

STEPS = ["max", "find", "refine", "prepare", "transform", "combine"]
GRID = [-3.0, 0.05, 3.0]
PARAMS = {"first": 0, "threshold": 400.0, "transform": {"qh": GRID, "qk": GRID, "ql": GRID}}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scans", type=int, default=5)
    p.add_argument("--rotations", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--nanny", action="store_true", help="also measure workers with a nanny")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args()


def make_data(root: Path, scans: int, rotations: int) -> list[Path]:
    from nxrefine_bs.simulation.scan import make_simulated_scan

    omegas = tuple(float(30 * i) for i in range(rotations))
    files = [
        make_simulated_scan(root, scan=f"{100 + 10 * i}K", omegas=omegas, seed=i).scan_file
        for i in range(scans)
    ]
    for f in files:
        shutil.copy2(f, f.with_suffix(".pristine"))
    return files


def restore(files: list[Path]) -> None:
    """Every scan file as simulated (a rerun must not start from the last run's geometry)."""
    for f in files:
        shutil.copy2(f.with_suffix(".pristine"), f)


def combined(files: list[Path]) -> list[np.ndarray]:
    """Every scan's combined ``transform.nxs`` signal."""
    out = []
    for f in files:
        path = f.parent / f.stem.split("_", 1)[1] / "transform.nxs"
        with h5py.File(path, "r") as fh:
            out.append(fh["entry/data/v"][()])
    return out


def max_difference(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Largest |a - b| relative to max |a| over all scans."""
    pairs = zip(a, b, strict=True)
    return max(float(np.max(np.abs(x - y)) / max(np.max(np.abs(x)), 1e-30)) for x, y in pairs)


def check_done(db, files: list[Path], n_tasks: int) -> None:
    from nxrefine_bs.workflow import Status

    rows = [r for f in files for r in db.list_tasks(scan_file=f) if r.step in STEPS]
    bad = [(r.filename, r.entry, r.step, r.status.name, r.message) for r in rows
           if r.status is not Status.DONE]  # fmt: skip
    if bad or len(rows) != n_tasks:
        raise SystemExit(f"not every task is DONE ({len(rows)} rows): {bad[:5]}")


def intervals(db, files: list[Path]) -> list[tuple[float, float]]:
    rows = [r for f in files for r in db.list_tasks(scan_file=f) if r.step in STEPS]
    return [(r.start_time.timestamp(), r.end_time.timestamp()) for r in rows]


def concurrency(spans: list[tuple[float, float]], t0: float, t1: float) -> dict[int, float]:
    """Seconds of [t0, t1] with 0, 1, 2... tasks running."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    out: dict[int, float] = {}
    level, last = 0, t0
    for t, d in events:
        t = min(max(t, t0), t1)
        out[level] = out.get(level, 0.0) + (t - last)
        level, last = level + d, t
    out[level] = out.get(level, 0.0) + (t1 - last)
    return out


def run_serial(db, files: list[Path]) -> float:
    from nxrefine_bs.workflow import run_scan_steps

    restore(files)
    t0 = time.perf_counter()
    for f in files:
        result = run_scan_steps(f, STEPS, None, PARAMS, db, overwrite=True)
        if not result.ok:
            raise SystemExit(f"serial run failed: {[o.message for o in result.failed][:3]}")
    return time.perf_counter() - t0


class Cluster:
    """``dask scheduler`` + two single-thread ``dask worker`` processes on 127.0.0.1."""

    def __init__(self, root: Path, nanny: bool) -> None:
        self.root = root
        self.procs: list[subprocess.Popen] = []
        env = dict(os.environ)
        env["PYTHONPATH"] = str(Path(__file__).resolve().parent)
        sched_file = root / f"scheduler-{nanny}.json"
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
             "--port", "0", "--no-dashboard", "--scheduler-file", str(sched_file)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))  # fmt: skip
        deadline = time.monotonic() + 60
        while not (sched_file.exists() and sched_file.read_text().strip()):
            if time.monotonic() > deadline:
                raise SystemExit("the scheduler did not start")
            time.sleep(0.1)
        self.address = json.loads(sched_file.read_text())["address"]
        for i in range(2):
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_worker", self.address,
                 "--nthreads", "1", "--no-dashboard", "--name", f"w{i}",
                 "--resources", "reduce_memory=1", *([] if nanny else ["--no-nanny"])],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))  # fmt: skip
        from distributed import Client

        with Client(self.address) as c:
            c.wait_for_workers(2, timeout=120)

    def close(self) -> None:
        for p in reversed(self.procs):
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def run_dask(db, files: list[Path], address: str) -> float:
    from nxrefine_bs.workflow import DaskExecutor, ReductionQueue

    with DaskExecutor(address) as ex:
        queue = ReductionQueue(db, ex)
        restore(files)
        t0 = time.perf_counter()
        queue.submit(files, steps=STEPS, overwrite=True, params=PARAMS)
        results = queue.wait()
        seconds = time.perf_counter() - t0
    if not all(r.ok for r in results):
        raise SystemExit(f"dask run failed: {[r.failed[:2] for r in results if not r.ok]}")
    return seconds


def main() -> int:
    args = parse_args()
    from nxrefine_bs.workflow import WorkflowDB

    root = Path(tempfile.mkdtemp(prefix="nxrbs-bench-wf-"))
    results: dict[str, object] = {}
    cluster = None
    try:
        t = time.perf_counter()
        files = make_data(root, args.scans, args.rotations)
        results["data_seconds"] = time.perf_counter() - t
        n_tasks = args.scans * (5 * args.rotations + 1)
        db = WorkflowDB(root)
        run_serial(db, files[:1])  # warm-up: numba caches, imports
        serial, busy_serial = [], []
        for _ in range(args.repeats):
            serial.append(run_serial(db, files))
            check_done(db, files, n_tasks)
            spans = intervals(db, files)
            busy_serial.append(sum(e - s for s, e in spans))
        reference = combined(files)
        modes = [False, True] if args.nanny else [False]
        for nanny in modes:
            tag = "nanny" if nanny else "no_nanny"
            cluster = Cluster(root, nanny)
            run_dask(db, files[:2], cluster.address)  # warm-up: worker imports, caches
            walls, utils, busies, levels = [], [], [], []
            for _ in range(args.repeats):
                start = time.time()
                wall = run_dask(db, files, cluster.address)
                end = time.time()
                check_done(db, files, n_tasks)
                diff = max_difference(reference, combined(files))
                results[f"{tag}_max_relative_difference"] = diff
                if diff > 1e-3:
                    raise SystemExit(f"{tag}: combined transforms differ from serial by {diff:.2g}")
                spans = intervals(db, files)
                busy = sum(e - s for s, e in spans)
                walls.append(wall)
                busies.append(busy)
                utils.append(busy / (2 * wall))
                levels.append(concurrency(spans, start, end))
            cluster.close()
            cluster = None
            i = walls.index(statistics.median(walls))
            results[f"{tag}_wall_s"] = walls
            results[f"{tag}_speedup_median"] = statistics.median(serial) / statistics.median(walls)
            results[f"{tag}_utilisation"] = utils[i]
            results[f"{tag}_task_inflation"] = busies[i] / statistics.median(busy_serial)
            lv = levels[i]
            results[f"{tag}_seconds_with_0_1_2_tasks"] = [lv.get(k, 0.0) for k in (0, 1, 2)]
        results["serial_wall_s"] = serial
        results["serial_task_seconds"] = statistics.median(busy_serial)
        results["tasks"] = n_tasks
        results["correct"] = "every task DONE; combined transforms match serial (rel. 1e-3)"
    finally:
        if cluster is not None:
            cluster.close()
        shutil.rmtree(root, ignore_errors=True)
    gates = [("two workers >= 1.8x serial (no nanny)", results["no_nanny_speedup_median"] >= 1.8)]
    return common.report("workflow: 2 single-thread Dask workers vs serial", results, gates,
                         args.json)  # fmt: skip


if __name__ == "__main__":
    common.exit_with(main())
