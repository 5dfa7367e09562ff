"""Does the reduction keep up with the beam?  One rotation, end to end, raw and bslz4.

A seeded simulated rotation of a Pilatus-2M-size detector (1679 x 1475 int32, the
pyFAI "Pilatus CdTe 2M" model with its module gaps; 900 frames by default) is written
twice into a temporary directory - uncompressed and bitshuffle-LZ4 (what Eiger and many
Pilatus set-ups write) - and reduced through the step registry
(:func:`nxrefine_bs.reduce.steps.run_step`, as the CLI, plans and workflow do): ``max``,
``find``, ``refine``, ``prepare``, ``transform`` (masked, on a ``--grid``^3 grid spanning
the HKL range the detector reaches; 1001^3 by default) and ``combine``.  Each step runs
in a fresh process pinned to 1 or 2 cores (CPU affinity; numba/OpenMP threads, reader
threads and transform threads follow the core count), which reports the step's wall
time and peak resident memory.

Each frame-streaming step is timed after a warm-up call on 2 frames (imports, numba
caches, pyFAI set-up).  The reduction time of one rotation is extrapolated to a
temperature point of 3 x 3650 frames (:func:`extrapolate`): max, find and prepare scale
with the number of frames (fixed costs included: pessimistic), the transform's
accumulation scales and its output writing counts once per rotation, refine and
combine count once per rotation.  Collection takes 0.1 s per frame (3 x 3650 x 0.1 s =
1095 s).

Gates (printed and checked):

* bslz4 reduction speed >= 0.8x the raw reduction speed on one core (each step's ratio
  is printed too);
* reduction / collection <= 0.5 with 2 cores (and <= 1.0 with 1 core), extrapolated;
* correctness: the raw and bslz4 runs give the same maximum, peak count and transform
  sum.

The disk space needed is stated (and checked) before any data are made; everything is
written to a temporary directory removed at the end.

Usage::

    python benchmarks/bench_temperature_point.py [--frames 900] [--grid 1001] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

STEPS = ("max", "find", "refine", "prepare", "transform", "combine")
FRAME_TIME = 0.1  # s per frame during collection
POINT_FRAMES = 3650
POINT_ROTATIONS = 3
FRAME_PIXELS = 1679 * 1475
FRAME_BYTES = 4 * FRAME_PIXELS
BSLZ4_RATIO = 6.0  # conservative compression estimate for the disk check


def _child(args: argparse.Namespace) -> int:
    """Run one step in this process (pinned to ``args.cores`` cores); print JSON."""
    cores = sorted(os.sched_getaffinity(0))[: args.cores]
    os.sched_setaffinity(0, cores)
    import warnings

    warnings.filterwarnings("ignore")
    from nxrefine_bs.reduce.steps import run_step

    params: dict[str, Any] = json.loads(args.params)
    step = args.child

    def cpu() -> float:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime

    def timed(**over: Any) -> tuple[float, dict[str, Any]]:
        t0, c0 = time.perf_counter(), cpu()
        out = run_step(step, args.scan, args.entry, overwrite=True, **{**params, **over})
        out["_cpu_s"] = cpu() - c0
        return time.perf_counter() - t0, out

    if "last" in params:  # a frame-streaming step: warm up on 2 frames first
        small = {"qh": [0, 1, 1], "qk": [0, 1, 1], "ql": [0, 1, 1]} if step == "transform" else {}
        timed(last=2, **small)  # imports, numba caches, pyFAI set-up
    seconds, summary = timed()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    names = ("maximum", "npeaks", "counts", "pixels", "mpix_per_s", "threads", "frames",
             "memory_gb", "output_gb")  # fmt: skip
    keep = {k: summary.get(k) for k in names}
    print("RESULT " + json.dumps({"seconds": seconds, "cpu_s": summary["_cpu_s"], "peak_rss": peak,
                                  "summary": keep}, default=str))  # fmt: skip
    return 0


def run_step_process(step: str, scan: Path, cores: int, params: dict[str, Any]) -> dict[str, Any]:
    entry = "entry" if step == "combine" else "f1"
    env = dict(os.environ)
    for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(cores)
    cmd = [sys.executable, __file__, "--child", step, "--scan", str(scan), "--entry", entry,
           "--cores", str(cores), "--params", json.dumps(params)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"step {step} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def make_scans(directory: Path, n_frames: int, quick: bool) -> dict[str, Path]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common

    from nxrefine_bs.simulation.scan import make_simulated_scan

    geometry, crystal, det, _ = common._setup(quick)
    scans = {}
    for fmt, codec in (("raw", None), ("bslz4", "bslz4")):
        t0 = time.perf_counter()
        sim = make_simulated_scan(
            directory / fmt, sample="bench", label="xtal", scan="300K", geometry=geometry,
            crystal=crystal, detector=det, n_frames=n_frames, seed=common.SIM_SEED,
            write_truth_orientation=True, compression=codec, **common.SIM_OPTIONS,
        )  # fmt: skip
        size = (sim.scan_dir / "f1.h5").stat().st_size
        print(f"  {fmt}: {n_frames} frames written in {time.perf_counter() - t0:.0f} s, "
              f"{size / 1e9:.2f} GB", flush=True)  # fmt: skip
        scans[fmt] = sim.scan_file
    return scans


def grid_for(scan: Path, n: int, n_frames: int) -> dict[str, list[float]]:
    """An ``n``-point-per-axis grid over the HKL range the detector reaches."""
    import h5py

    from nxrefine_bs.nexus.geometry_io import read_geometry, read_ub
    from nxrefine_bs.reduce.grid import reached_hkl

    with h5py.File(scan, "r") as f:
        g, ub = read_geometry(f["f1"]), read_ub(f["f1"])
    lo, hi = reached_hkl(g, ub, (0, n_frames))
    out = {}
    for i, name in enumerate("hkl"):
        step = float(f"{(hi[i] - lo[i]) / (n - 3):.3g}")
        start = float(f"{lo[i] - step:.4g}")
        out[f"q{name}"] = [start, step, start + step * (n - 1)]
    return out


def extrapolate(
    times: dict[str, dict[str, Any]],
    n_frames: int,
    frame_pixels: int = FRAME_PIXELS,
    key: str = "seconds",
) -> float:
    """Reduction time of a temperature point (3 rotations of 3650 frames).

    ``max``, ``find`` and ``prepare`` are scaled by ``3650 / N`` as a whole (their fixed
    costs too: pessimistic - some of these steps read every frame of the stack whatever
    the range, so timing a shorter range would not separate the costs).  For the
    transform, the accumulation (pixels / the measured Mpix/s) is scaled and the rest
    (grid set-up, writing the output) counted once per rotation.  Refine and combine
    count once per rotation.  ``key="cpu_s"`` extrapolates the CPU time instead (the
    transform's CPU time split in the same proportion as its wall time).
    """
    scale = POINT_FRAMES / n_frames
    rot = 0.0
    for step in STEPS:
        wall = times[step]["seconds"]
        t = times[step].get(key) or 0.0
        if step in ("max", "find", "prepare"):
            rot += t * scale
        elif step == "transform" and times[step]["summary"].get("mpix_per_s"):
            s = times[step]["summary"]
            kernel = min(wall, n_frames * frame_pixels / (float(s["mpix_per_s"]) * 1e6))
            share = kernel / wall if wall > 0 else 1.0
            rot += t * share * scale + t * (1.0 - share)
        else:
            rot += t
    return POINT_ROTATIONS * rot


def evaluate(results: dict[str, Any]) -> list[tuple[str, bool]]:
    """Extrapolate every run to a temperature point, print the figures and the gates."""
    collect = POINT_ROTATIONS * POINT_FRAMES * FRAME_TIME
    n_frames, pixels = results["frames"], results.get("frame_pixels", FRAME_PIXELS)
    for key, run in results["runs"].items():
        run["point_s"] = extrapolate(run["steps"], n_frames, pixels)
        run["ratio"] = run["point_s"] / collect
        cpu = sum(t.get("cpu_s") or 0.0 for t in run["steps"].values())
        if cpu:
            run["point_cpu_s"] = extrapolate(run["steps"], n_frames, pixels, key="cpu_s")
            print(f"  {key}: CPU time {cpu:.1f} s, {cpu / run['rotation_s']:.2f} cores busy on "
                  f"average (machine load shows as < 1 per core); the point's CPU time "
                  f"{run['point_cpu_s']:.0f} s = {run['point_cpu_s'] / collect:.2f} of the "
                  "collection (information)")  # fmt: skip
        print(f"  {key}: rotation {run['rotation_s']:.1f} s for {n_frames} frames "
              f"({run['rotation_s'] / (n_frames * FRAME_TIME):.2f} of its collection); "
              f"temperature point ~{run['point_s']:.0f} s vs {collect:.0f} s collection: "
              f"ratio {run['ratio']:.2f}", flush=True)  # fmt: skip
    runs = results["runs"]
    gates = []
    if "raw_1" in runs and "bslz4_1" in runs:
        speed = runs["raw_1"]["rotation_s"] / runs["bslz4_1"]["rotation_s"]
        per_step = {s: runs["raw_1"]["steps"][s]["seconds"] / runs["bslz4_1"]["steps"][s]["seconds"]
                    for s in STEPS}  # fmt: skip
        print("bslz4 speed / raw speed, 1 core, per step: "
              + ", ".join(f"{s} {v:.2f}" for s, v in per_step.items()))  # fmt: skip
        results["bslz4_vs_raw_1core"] = speed
        gates.append((f"bslz4 reduction >= 0.8x raw speed on 1 core ({speed:.2f})", speed >= 0.8))
        raw1, bs1 = runs["raw_1"]["steps"], runs["bslz4_1"]["steps"]
        same = all(
            raw1[s]["summary"].get(k) == bs1[s]["summary"].get(k)
            for s, k in (("max", "maximum"), ("find", "npeaks"), ("transform", "counts"))
        )
        gates.append(("raw and bslz4 give the same maximum, peaks and transform sum", same))
    for fmt in ("raw", "bslz4"):
        if f"{fmt}_2" in runs:
            r = runs[f"{fmt}_2"]["ratio"]
            gates.append((f"{fmt}: reduction / collection <= 0.5 with 2 cores ({r:.2f})", r <= 0.5))
        if f"{fmt}_1" in runs:
            r = runs[f"{fmt}_1"]["ratio"]
            gates.append((f"{fmt}: reduction / collection <= 1.0 with 1 core ({r:.2f})", r <= 1.0))
    for label, ok in gates:
        print(f"[{'PASS' if ok else 'FAIL'}] {label}")
    return gates


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=900)
    ap.add_argument("--grid", type=int, default=1001, help="transform grid points per axis")
    ap.add_argument("--quick", action="store_true", help="small detector, 40 frames, 101^3")
    ap.add_argument("--cores", default="1,2", help="core counts to time (default 1,2)")
    ap.add_argument("--tmpdir", default=None, help="where to make the data (default: TMPDIR)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--recompute", type=Path, default=None,
                    help="recompute the extrapolation and gates from a --json file")  # fmt: skip
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--scan", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--entry", default="f1", help=argparse.SUPPRESS)
    ap.add_argument("--params", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.cores = int(args.cores)
        return _child(args)
    if args.recompute:
        saved = json.loads(args.recompute.read_text())["results"]
        gates = evaluate(saved)
        return 0 if all(ok for _, ok in gates) else 1
    if args.quick:
        args.frames, args.grid = 40, 101
    cores = [int(c) for c in args.cores.split(",")]
    frame_bytes = (407 * 487 * 4) if args.quick else FRAME_BYTES
    raw_bytes = args.frames * frame_bytes
    out_bytes = 2 * 8 * args.grid**3  # transform + combine
    need = raw_bytes * (1 + 1 / BSLZ4_RATIO) + 2 * out_bytes + args.frames * frame_bytes / 4
    base = Path(args.tmpdir or tempfile.gettempdir())
    free = shutil.disk_usage(base).free
    print(f"data: {args.frames} frames raw {raw_bytes / 1e9:.2f} GB + bslz4 (~1/{BSLZ4_RATIO:g}); "
          f"transform and combine outputs {out_bytes / 1e9:.2f} GB per format run; "
          f"needs about {need / 1e9:.1f} GB in {base} ({free / 1e9:.1f} GB free)")  # fmt: skip
    if need > 0.9 * free:
        print("not enough free disk space: use --frames/--grid smaller or --tmpdir elsewhere")
        return 2
    results: dict[str, Any] = {
        "frames": args.frames, "grid": args.grid, "runs": {},
        "frame_pixels": frame_bytes // 4,
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-tpoint-", dir=base) as tmp:
        scans = make_scans(Path(tmp), args.frames, args.quick)
        grid = grid_for(scans["raw"], args.grid, args.frames)
        print("transform grid: " + ", ".join(f"{k} {v[0]:g}:{v[2]:g}:{v[1]:g}"
                                              for k, v in grid.items()))  # fmt: skip
        params = {
            "max": {"first": 0, "last": args.frames},
            "find": {"first": 0, "last": args.frames, "threshold": 50.0},
            "refine": {},
            "prepare": {"first": 0, "last": args.frames},
            "transform": {"first": 0, "last": args.frames, "mask": True, **grid},
            "combine": {"mask": True},
        }
        for n in cores:
            for fmt, scan in scans.items():
                times = {}
                for step in STEPS:
                    r = run_step_process(step, scan, n, params[step])
                    times[step] = r
                    extra = {k: v for k, v in r["summary"].items() if v is not None}
                    print(f"  {n} core(s) {fmt:5s} {step:9s} {r['seconds']:8.1f} s (CPU "
                          f"{r.get('cpu_s', 0):6.1f} s)  peak RSS {r['peak_rss'] / 1e9:5.2f} GB"
                          f"  {extra}", flush=True)  # fmt: skip
                total = sum(t["seconds"] for t in times.values())
                results["runs"][f"{fmt}_{n}"] = {"steps": times, "rotation_s": total}
                print(f"  {n} core(s) {fmt}: rotation {total:.1f} s for {args.frames} frames",
                      flush=True)  # fmt: skip
    gates = evaluate(results)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "gates": gates}, indent=1,
                                        default=str))  # fmt: skip
    return 0 if all(ok for _, ok in gates) else 1


if __name__ == "__main__":
    sys.exit(main())
