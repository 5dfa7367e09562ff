"""The NeXus writer's cost on the RunEngine thread, with and without a reader of the scan file.

For a fly rotation (ophyd-async, StreamResource/StreamDatum, no events) and a step
rotation (one event per frame), run with a real RunEngine and the simulated beamline,
every document's time inside ``NeXusScanWriter.__call__`` (what the RunEngine thread
pays) is recorded, together with a yardstick measured on the same document in the same
call: ``json.dumps(doc)``, the cheapest thing a journaling callback does.  Each
configuration runs once without and once with a reader process that holds the scan
file open (h5py, HDF5 file locking on) for the whole run.  Also timed: from the end of
``RE(plan)`` until the writer has finished the file (``wait_run``).

Correctness in the same run: every timed run must end ``success`` with all frames,
monitors and the data link in the scan file.  Exit status 1 if not.

Usage::

    python benchmarks/bench_writer.py [--frames N] [--repeats R] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import common  # noqa: F401, I001  (first: pins threads before numpy/numba are imported)
import h5py
import numpy as np

READER = """\
import sys, h5py
f = h5py.File(sys.argv[1], "r")          # default: HDF5 file locking on
n = len(f["f1/data/frame_number"])
print("open", n, flush=True)
sys.stdin.read()                          # hold the file until the benchmark says so
f.close()
"""


class Timed:
    """Calls the writer and the yardstick on each document; records both times (ns)."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer
        self.writer_ns: list[int] = []
        self.yard_ns: list[int] = []
        self.names: list[str] = []

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        t0 = time.perf_counter_ns()
        json.dumps(doc, default=str)
        t1 = time.perf_counter_ns()
        self.writer(name, doc)
        t2 = time.perf_counter_ns()
        self.yard_ns.append(t1 - t0)
        self.writer_ns.append(t2 - t1)
        self.names.append(name)

    def reset(self) -> None:
        self.writer_ns.clear()
        self.yard_ns.clear()
        self.names.clear()


def _pct(values: list[int], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) / 1e3  # µs


def _by_name(timed: Timed) -> dict[str, float]:
    worst: dict[str, float] = defaultdict(float)
    for name, ns in zip(timed.names, timed.writer_ns, strict=True):
        worst[name] = max(worst[name], ns / 1e3)
    return dict(worst)


def _check(scan_file: Path, entry: str, n: int) -> list[str]:
    problems = []
    with h5py.File(scan_file, "r") as f:
        fe = f[entry]
        status = fe["acquisition/status"][()].decode()
        if status != "success":
            problems.append(f"{entry}: status {status}")
        if fe["data/data"].shape[0] != n:
            problems.append(f"{entry}: data link has {fe['data/data'].shape[0]} of {n} frames")
        for mon in ("MCS1", "MCS2"):
            if fe[f"monitor/{mon}"].shape != (n,):
                problems.append(f"{entry}: {mon} has shape {fe[f'monitor/{mon}'].shape}")
    return problems


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=None, help="frames per rotation")
    p.add_argument("--repeats", type=int, default=3, help="timed rotations per configuration")
    p.add_argument("--quick", action="store_true", help="small rotations (smoke test)")
    p.add_argument("--json", type=Path, default=None, help="write results as JSON here")
    args = p.parse_args()
    frames = args.frames or (40 if args.quick else 360)
    repeats = 1 if args.quick else args.repeats

    import logging

    logging.disable(logging.WARNING)
    from bluesky import RunEngine

    from nxrefine_bs.callbacks.nexus_writer import NeXusScanWriter
    from nxrefine_bs.devices import make_sim_beamline
    from nxrefine_bs.experiment import Experiment
    from nxrefine_bs.plans import rotation_scan, step_rotation_scan
    from nxrefine_bs.settings import ENV_VAR, init_server_settings

    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-writer-") as tmp:
        os.environ[ENV_VAR] = str(Path(tmp) / "settings")
        init_server_settings(Path(tmp) / "settings" / "settings.ini")
        exp = Experiment.create(Path(tmp) / "analysis", "bench", beamline="sim").directory
        devices = make_sim_beamline(
            exp, detector="small", shape=(48, 64), frame_time=0.002, seed=1,
            temperature_time_constant=0.01,
        )  # fmt: skip
        RE = RunEngine({})
        writer = NeXusScanWriter()
        timed = Timed(writer)
        RE.subscribe(timed)
        step = 0.1
        for mode in ("fly", "step"):
            plan_fn = rotation_scan if mode == "fly" else step_rotation_scan
            n = frames if mode == "fly" else max(frames // 4, 10)
            for reader in (False, True):
                scan = f"{mode}{'R' if reader else ''}"
                kw: dict[str, Any] = {
                    "experiment_dir": exp, "sample": "bench", "label": "xtal", "scan": scan,
                    "phi_start": 0.0, "phi_end": n * step, "phi_step": step,
                }  # fmt: skip
                RE(plan_fn(devices, entry="f1", **kw))  # warm-up; creates the scan file
                writer.flush(120)
                scan_file = writer.last_scan_file
                assert scan_file is not None
                proc = None
                if reader:
                    env = {k: v for k, v in os.environ.items() if k != "HDF5_USE_FILE_LOCKING"}
                    proc = subprocess.Popen(
                        [sys.executable, "-c", READER, str(scan_file)],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                    )  # fmt: skip
                    assert proc.stdout is not None
                    line = proc.stdout.readline()
                    if not line.startswith("open"):
                        problems.append(f"{scan}: the reader could not open {scan_file}")
                timed.reset()
                after = []
                try:
                    for r in range(repeats):
                        entry = f"f{r + 2}"
                        uid = RE(plan_fn(devices, entry=entry, **kw))
                        uid = uid[0] if isinstance(uid, tuple) else uid
                        t0 = time.perf_counter()
                        status = writer.wait_run(uid, 600)
                        after.append(time.perf_counter() - t0)
                        if status != "success":
                            problems.append(f"{scan}:{entry}: writer status {status}")
                        problems += [f"{scan}: {m}" for m in _check(scan_file, entry, n)]
                finally:
                    if proc is not None:
                        proc.communicate("", timeout=60)
                if reader and proc is not None and proc.returncode != 0:
                    problems.append(f"{scan}: reader exited with {proc.returncode}")
                pairs = zip(timed.writer_ns, timed.yard_ns, strict=True)
                ratios = [w / max(y, 1) for w, y in pairs]
                rows.append(
                    {
                        "rotation": mode,
                        "reader": reader,
                        "frames": n,
                        "documents": len(timed.writer_ns) // repeats,
                        "writer_median_us": _pct(timed.writer_ns, 50),
                        "writer_p99_us": _pct(timed.writer_ns, 99),
                        "writer_max_us": max(timed.writer_ns) / 1e3,
                        "yardstick_median_us": _pct(timed.yard_ns, 50),
                        "yardstick_p99_us": _pct(timed.yard_ns, 99),
                        "yardstick_max_us": max(timed.yard_ns) / 1e3,
                        "median_ratio": statistics.median(ratios),
                        "complete_after_run_s": statistics.median(after),
                        "by_document_max_us": _by_name(timed),
                    }
                )
        writer.close()

    header = (
        f"{'rotation':8} {'reader':6} {'frames':>6} {'docs/run':>8} {'median µs':>10} "
        f"{'p99 µs':>8} {'max µs':>8} {'json µs':>8} {'json p99':>8} {'json max':>8} "
        f"{'ratio':>6} {'complete s':>10}"
    )
    print(f"NeXus writer on the RunEngine thread ({repeats} timed rotation(s) each)")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['rotation']:8} {'yes' if r['reader'] else 'no':6} {r['frames']:6d} "
            f"{r['documents']:8d} {r['writer_median_us']:10.1f} {r['writer_p99_us']:8.1f} "
            f"{r['writer_max_us']:8.1f} {r['yardstick_median_us']:8.1f} "
            f"{r['yardstick_p99_us']:8.1f} {r['yardstick_max_us']:8.1f} "
            f"{r['median_ratio']:6.2f} {r['complete_after_run_s']:10.3f}"
        )
    print("ratio: median over documents of writer time / json.dumps(doc) time (same call)")
    print("slowest call per document type (µs):")
    for r in rows:
        worst = ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["by_document_max_us"].items()))
        print(f"  {r['rotation']:4} reader={'yes' if r['reader'] else 'no ':3}  {worst}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "problems": problems}, indent=2))
    if problems:
        print("CORRECTNESS FAILURES:", *problems, sep="\n  ")
        return 1
    print("correctness: every timed run ended 'success' with all frames, monitors and links")
    return 0


if __name__ == "__main__":
    sys.exit(main())
