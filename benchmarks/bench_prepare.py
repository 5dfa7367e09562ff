"""Benchmark of the ``prepare`` step (3-D mask, nxprepare_mask) against its first version.

Yardstick: :func:`nxrefine_bs.reduce.mask3d.frame_difference_mask_reference`, the scipy
``uniform_filter`` implementation the step used before (16.6 Pilatus-2M frame pairs/s
measured on one core in issue #15).  Step: :func:`mask3d.change_mask`, the numba
running-sum kernel.  Both run on the same consecutive frame pairs of the benchmark stack
held in RAM, one thread, in alternating pairs after a warm-up pair.

Gate: new frame rate >= **3x** the reference's (median of the per-pair ratios).
Correctness in the same run: every pair's mask is identical to the reference's.  The
whole streaming pass of ``run()`` (read-ahead, kernel, gzip chunks in a writer thread)
is timed once from the file and reported as frames/s, not gated.

Usage: ``python benchmarks/bench_prepare.py [--frames N] [--quick] [--pairs 5]``
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import common  # noqa: I001  (first: pins threads before numpy/numba are imported)
import h5py
import numpy as np

from nxrefine_bs.reduce import mask3d
from nxrefine_bs.reduce.framestream import open_frames, read_pixel_mask

GATE = 3.0
PAIRS_IN_RAM = 24


def main() -> int:
    args = common.parse_args(__doc__.splitlines()[0])
    scan_file = common.benchmark_scan(args.frames, quick=args.quick)
    data_file, data_path = common.data_location(scan_file)
    n = min(args.frames, PAIRS_IN_RAM + 1)
    with h5py.File(data_file, "r") as f:
        stack = f[data_path][:n]
    with h5py.File(scan_file, "r") as f:
        bad = read_pixel_mask(f["f1"], stack.shape[1:])
    rows, cols = mask3d.gap_runs(bad, 0), mask3d.gap_runs(bad, 1)
    kw = {"t1": 2.0, "h1": 11, "t2": 0.8, "h2": 51, "rows": rows, "cols": cols}
    out = np.empty(stack.shape[1:], dtype=np.uint8)
    work = np.empty(stack.shape[1:], dtype=np.uint8)

    def reference() -> list[np.ndarray]:
        return [
            mask3d.frame_difference_mask_reference(stack[i], stack[i + 1], bad, **kw)
            for i in range(n - 1)
        ]

    def fast() -> None:
        for i in range(n - 1):
            mask3d.change_mask(stack[i], stack[i + 1], bad, out, work=work, **kw)

    # correctness: identical masks for every pair
    ref = reference()
    same = True
    masked_pairs = 0
    for i in range(n - 1):
        mask3d.change_mask(stack[i], stack[i + 1], bad, out, work=work, **kw)
        same &= bool(np.array_equal(out.view(bool), ref[i]))
        masked_pairs += bool(ref[i].any())
    del ref
    timing = common.paired_ratio(reference, fast, args.pairs)
    speedup = 1.0 / timing["ratio_median"]
    ref_rate = (n - 1) / timing["yardstick_s"]
    new_rate = (n - 1) / timing["step_s"]

    # the whole streaming pass from the file, written to a temporary mask file
    params = {k: kw[k] for k in ("t1", "h1", "t2", "h2")}
    with (
        tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp,
        open_frames(scan_file, "f1") as stream,
    ):
        nf = stream.nframes
        t0 = time.perf_counter()
        mask3d._write_mask(stream, Path(tmp) / "m.nxs", bad, 0, nf - 1, params)
        t_run = time.perf_counter() - t0
    results = {
        "frame_shape": list(stack.shape[1:]),
        "pairs_in_ram": n - 1,
        "pairs_with_mask": masked_pairs,
        "reference_pairs_per_s": ref_rate,
        "kernel_pairs_per_s": new_rate,
        "speedup_median": speedup,
        "speedup_min": 1.0 / timing["ratio_max"],
        "speedup_max": 1.0 / timing["ratio_min"],
        "run_pass_frames_per_s": nf / t_run,
    }
    gates = [
        ("masks identical to the scipy reference", same),
        (f"prepare kernel >= {GATE}x the reference frame rate", speedup >= GATE),
    ]
    return common.report("prepare (3-D mask)", results, gates, args.json)


if __name__ == "__main__":
    common.exit_with(main())
