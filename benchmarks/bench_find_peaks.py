"""Benchmark of the ``find`` step (nxfind) against the bare read and a scipy pipeline.

Gates (median of 5 alternating pairs, one thread, warm page cache):

* the streaming peak search (read + threshold pass + sparse union-find labeller)
  takes <= 3x the bare per-frame h5py ``read_direct`` of the same frames;
* its labeller is >= 15x faster than a scipy pipeline on the same frames, both on
  frames already in memory as in ``performance-baselines.md`` §2b (the read is
  gated above; the ratio including the reads is printed for information):
  ``(data > threshold) & ~mask``, ``scipy.ndimage.label`` (3-D, 6-connectivity) and
  moments over the hot voxels with ``np.bincount``.  Not gated with ``--quick``,
  whose 407x487 frames are too small for the comparison;
* the two peak lists agree: same number of features, and centroids, intensities and
  voxel counts equal within 1e-6 (both are intensity-weighted first moments of the
  thresholded 6-connected components, raw counts as weights, ``min_voxels = 1``, the
  zinger shape test off for this comparison only; the timed step and labeller run with
  the step's defaults, shape test on);
* >= 98 % of the injected peaks whose expected maximum exceeds 1.5x the threshold and
  lie >= 5 px from gaps/edges and >= 3 frames inside the range are found (within
  2 px / 2 frames).

Usage: ``python benchmarks/bench_find_peaks.py [--frames N] [--quick]``
"""

from __future__ import annotations

from functools import partial

import common  # noqa: I001  (first: pins threads before numpy/numba are imported)
import h5py
import numpy as np
from scipy import ndimage

from nxrefine_bs.nexus.geometry_io import read_geometry
from nxrefine_bs.reduce import peaks
from nxrefine_bs.reduce.framestream import open_frames, read_pixel_mask

READ_GATE = 3.0
SCIPY_GATE = 15.0
THRESHOLD = 50.0


def read_stack(data_file, data_path: str, first: int, last: int) -> np.ndarray:
    """Frames ``[first, last)`` as one array (per-frame ``read_direct``)."""
    with h5py.File(data_file, "r") as f:
        ds = f[data_path]
        stack = np.empty((last - first, *ds.shape[1:]), dtype=ds.dtype)
        for i in range(first, last):
            ds.read_direct(stack, np.s_[i], np.s_[i - first])
    return stack


def scipy_label(
    stack: np.ndarray, first: int, masked: np.ndarray, threshold: float
) -> dict[str, np.ndarray]:
    """Reference: ``ndimage.label`` (6-connectivity) + bincount moments of the hot voxels."""
    hot = stack > threshold
    hot &= ~masked[None]
    labels, n = ndimage.label(hot)
    z, y, x = np.nonzero(labels)
    lab = labels[z, y, x]
    w = stack[z, y, x].astype(np.float64)
    z = z.astype(np.float64) + first
    sw = np.bincount(lab, w, n + 1)[1:]
    out = {
        "x": np.bincount(lab, w * x, n + 1)[1:] / sw,
        "y": np.bincount(lab, w * y, n + 1)[1:] / sw,
        "z": np.bincount(lab, w * z, n + 1)[1:] / sw,
        "intensity": sw,
        "npixels": np.bincount(lab, None, n + 1)[1:].astype(np.float64),
    }
    order = np.lexsort((out["x"], out["y"], out["z"]))
    return {k: v[order] for k, v in out.items()}


def labeller_in_ram(
    stack: np.ndarray,
    first: int,
    masked: np.ndarray,
    threshold: float,
    min_spread: float = peaks.DEFAULT_MIN_SPREAD,
) -> dict[str, np.ndarray]:
    """The streaming labeller of the ``find`` step on frames already in memory."""
    lab = peaks.PeakLabeller(stack.shape[1:], threshold, masked, 1, min_spread=min_spread)
    for j in range(stack.shape[0]):
        lab.add_frame(stack[j], first + j)
    return peaks.peak_table_from_moments(lab.finish())


def main() -> int:
    args = common.parse_args(__doc__.splitlines()[0])
    scan_file = common.benchmark_scan(args.frames, quick=args.quick)
    data_file, data_path = common.data_location(scan_file)
    entry, first, last = "f1", 0, args.frames
    common.warm_page_cache(data_file)
    with h5py.File(scan_file, "r") as f:
        geometry = read_geometry(f[entry])
        masked = read_pixel_mask(f[entry], geometry.shape)

    def step() -> dict[str, np.ndarray]:
        with open_frames(scan_file, entry) as stream:
            return peaks.find_peaks(stream, first, last, THRESHOLD, masked, geometry=geometry)

    def ref_io() -> dict[str, np.ndarray]:
        return scipy_label(read_stack(data_file, data_path, first, last), first, masked, THRESHOLD)

    read = common.read_yardstick(data_file, data_path, first, last)
    vs_read = common.paired_ratio(read, step, args.pairs)

    # Compute on frames in RAM (as performance-baselines §2b): labeller vs scipy.
    stack = read_stack(data_file, data_path, first, last)
    vs_scipy = common.paired_ratio(
        partial(labeller_in_ram, stack, first, masked, THRESHOLD),
        partial(scipy_label, stack, first, masked, THRESHOLD),
        args.pairs,
    )  # ratio = scipy time / labeller time
    ours = step()
    every = labeller_in_ram(stack, first, masked, THRESHOLD, min_spread=0.0)
    theirs = scipy_label(stack, first, masked, THRESHOLD)
    del stack
    # Including the reads (information only): the whole step vs read + scipy.
    vs_scipy_io = common.paired_ratio(step, ref_io, 1)

    same_count = len(every["x"]) == len(theirs["x"])
    diffs = {}
    if same_count:
        for key in ("x", "y", "z"):
            diffs[key] = float(np.max(np.abs(every[key] - theirs[key]), initial=0.0))
        rel_i = np.abs(every["intensity"] - theirs["intensity"]) / np.maximum(
            theirs["intensity"], 1
        )
        diffs["intensity (rel)"] = float(np.max(rel_i, initial=0.0))
        diffs["npixels"] = float(np.max(np.abs(every["npixels"] - theirs["npixels"]), initial=0.0))
    agree = same_count and all(v <= 1e-6 for v in diffs.values())

    truth = common.benchmark_truth(args.frames, quick=args.quick)
    recovered, n_truth, err_xy = recovery(truth, ours, masked, first, last, THRESHOLD)

    n = last - first
    results = {
        "frames": n,
        "frame_shape": f"{geometry.shape[0]}x{geometry.shape[1]}",
        "page_cache": "warm (file read once before timing)",
        "threshold": THRESHOLD,
        "peaks found": len(ours["x"]),
        "features rejected by the zinger shape test": len(every["x"]) - len(ours["x"]),
        "scipy features": len(theirs["x"]),
        "ratio_step_over_read (median)": vs_read["ratio_median"],
        "ratio min": vs_read["ratio_min"],
        "ratio max": vs_read["ratio_max"],
        "ratios": vs_read["ratios"],
        "read frames/s": n / vs_read["yardstick_s"],
        "find-peaks frames/s": n / vs_read["step_s"],
        "labeller in RAM frames/s": n / vs_scipy["yardstick_s"],
        "scipy label in RAM frames/s": n / vs_scipy["step_s"],
        "speed-up over scipy in RAM (median)": vs_scipy["ratio_median"],
        "speed-up min": vs_scipy["ratio_min"],
        "speed-up max": vs_scipy["ratio_max"],
        "speed-up incl. reads (1 pair, info)": vs_scipy_io["ratio_median"],
        "max |difference| vs scipy": diffs,
        "injected peaks selected": n_truth,
        "fraction recovered": recovered,
        "centroid error x,y (max px)": err_xy,
    }
    gates = [
        (f"find peaks <= {READ_GATE}x read (median ratio)", vs_read["ratio_median"] <= READ_GATE),
        (
            f">= {SCIPY_GATE}x faster than scipy label"
            + (" (not gated with --quick: frames too small)" if args.quick else ""),
            args.quick or vs_scipy["ratio_median"] >= SCIPY_GATE,
        ),
        ("same features as scipy, shape test off (count, centroids within 1e-6)", agree),
        (">= 98% of injected peaks found", n_truth > 0 and recovered >= 0.98),
    ]
    return common.report("find peaks", results, gates, args.json)


def recovery(truth, found, masked, first, last, threshold) -> tuple[float, int, float]:
    """Fraction of well-placed injected peaks above 1.5x threshold that were found."""
    ny, nx = masked.shape
    near = ndimage.binary_dilation(masked, iterations=5)
    near[:5] = near[-5:] = True
    near[:, :5] = near[:, -5:] = True
    xi = np.clip(np.round(truth.x).astype(int), 0, nx - 1)
    yi = np.clip(np.round(truth.y).astype(int), 0, ny - 1)
    sel = (
        (truth.peak_max > 1.5 * threshold)
        & ~near[yi, xi]
        & (truth.z >= first + 3)
        & (truth.z <= last - 4)
    )
    if not sel.any() or len(found["x"]) == 0:
        return 0.0, int(sel.sum()), float("nan")
    pos = np.c_[found["x"], found["y"], found["z"]]
    tx, ty, tz = truth.x[sel], truth.y[sel], truth.z[sel]
    d = (
        (pos[None, :, 0] - tx[:, None]) ** 2
        + (pos[None, :, 1] - ty[:, None]) ** 2
        + ((pos[None, :, 2] - tz[:, None]) / 1.0) ** 2
    )
    j = np.argmin(d, axis=1)
    ok = (np.abs(pos[j, 0] - tx) < 2) & (np.abs(pos[j, 1] - ty) < 2) & (np.abs(pos[j, 2] - tz) < 2)
    err = np.max(np.abs(np.r_[pos[j, 0] - tx, pos[j, 1] - ty][np.r_[ok, ok]]), initial=0.0)
    return float(ok.mean()), int(sel.sum()), float(err)


if __name__ == "__main__":
    common.exit_with(main())
