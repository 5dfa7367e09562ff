"""Benchmark of the ``max`` step (nxmax) against the bare HDF5 read of the same frames.

Gate: the streaming pass of find-maximum (read + numba kernel + trimmed annulus sums, all
in the calling thread: ``readers=0``) takes <= 2.5x the time of a bare per-frame h5py
``read_direct`` of the same frames into one buffer (median of 5 alternating pairs, one
thread, warm page cache).  Correctness in the same run: summed image, per-frame sums and
annulus maximum equal numpy's.  The same pass with the default background reader thread
(reading overlapped with the kernel) is reported, not gated.  The whole ``run()``
(including the pyFAI radial sum and writing the results) is timed too and reported, not
gated.

Usage: ``python benchmarks/bench_find_maximum.py [--frames N] [--quick]``
"""

from __future__ import annotations

import time

import common  # noqa: I001  (first: pins threads before numpy/numba are imported)
import h5py
import numpy as np

from nxrefine_bs.nexus.geometry_io import read_geometry
from nxrefine_bs.reduce import maximum
from nxrefine_bs.reduce.framestream import open_frames, read_pixel_mask

GATE = 2.5


def main() -> int:
    args = common.parse_args(__doc__.splitlines()[0])
    scan_file = common.benchmark_scan(args.frames, quick=args.quick)
    data_file, data_path = common.data_location(scan_file)
    entry, first, last = "f1", 0, args.frames
    common.warm_page_cache(data_file)
    with h5py.File(scan_file, "r") as f:
        geometry = read_geometry(f[entry])
        masked = read_pixel_mask(f[entry], geometry.shape)
    q = maximum.pixel_q(geometry)
    annulus = maximum.annulus_pixels(q, masked, *maximum.default_q_range(geometry))

    def step(readers: int = 0) -> maximum.FrameSums:
        with open_frames(scan_file, entry, readers=readers) as stream:
            return maximum.accumulate_frame_sums(stream, first, last, masked, annulus)

    read = common.read_yardstick(data_file, data_path, first, last)
    timing = common.paired_ratio(read, step, args.pairs)  # all in one thread (the gate)
    overlap = common.paired_ratio(read, lambda: step(1), args.pairs)  # + reader thread (info)

    # Correctness against numpy on the same frames.
    sums = step()
    with h5py.File(data_file, "r") as f:
        stack = f[data_path][first:last]
    img = np.zeros(stack.shape[1:], np.int64)
    fsum = np.zeros(len(stack), np.int64)
    amax = 0
    for i, frame in enumerate(stack):
        w = np.where(~masked & (frame >= 0), frame, 0).astype(np.int64)
        img += w
        fsum[i] = w.sum()
        amax = max(amax, int(w[annulus].max()))
    ok_sum = np.array_equal(fsum, sums.summed_frames[first:last].astype(np.int64))
    ok_img = np.array_equal(img.astype(np.float64), sums.summed_data)
    ok_max = float(amax) == sums.maximum

    # Kernel alone on frames in RAM against stack.max() (information).
    flat = np.ascontiguousarray(stack.reshape(stack.shape[0], -1))
    code = (np.where(masked, 0, 1) | (annulus.astype(int) << 1)).astype(np.uint8).ravel()
    acc = np.zeros(flat.shape[1], np.int32)
    wide = np.zeros(flat.shape[1], np.int64)
    st = np.zeros(1, np.int64)
    per = np.zeros(flat.shape[0], np.int64)
    args_k = (flat, code, acc, wide, st, per, per.copy(), 0)
    maximum._sum_block_int32(*args_k)
    t0 = time.perf_counter()
    maximum._sum_block_int32(*args_k)
    t_kernel = time.perf_counter() - t0
    t0 = time.perf_counter()
    flat.max()
    t_max = time.perf_counter() - t0
    del stack, flat

    # Whole step (fixed costs included), once, for information.
    t0 = time.perf_counter()
    maximum.run(scan_file, entry, first=first, last=last, overwrite=True)
    t_run = time.perf_counter() - t0

    n = last - first
    results = {
        "frames": n,
        "frame_shape": f"{geometry.shape[0]}x{geometry.shape[1]}",
        "page_cache": "warm (file read once before timing)",
        "ratio_step_over_read (median)": timing["ratio_median"],
        "ratio min": timing["ratio_min"],
        "ratio max": timing["ratio_max"],
        "ratios": timing["ratios"],
        "read frames/s": n / timing["yardstick_s"],
        "find-maximum frames/s": n / timing["step_s"],
        "with a reader thread: ratio (info)": overlap["ratio_median"],
        "with a reader thread: frames/s": n / overlap["step_s"],
        "kernel in RAM frames/s": n / t_kernel,
        "stack.max() in RAM frames/s": n / t_max,
        "kernel / stack.max() throughput": t_max / t_kernel,
        "whole run() s (pyFAI + write incl.)": t_run,
    }
    gates = [
        (f"find maximum <= {GATE}x read (median ratio)", timing["ratio_median"] <= GATE),
        ("per-frame sums equal numpy", ok_sum),
        ("summed image equals numpy", ok_img),
        ("annulus maximum equals numpy", ok_max),
    ]
    return common.report("find maximum", results, gates, args.json)


if __name__ == "__main__":
    common.exit_with(main())
