"""Benchmark of the reciprocal-space transform kernel (issue #6).

Pilatus-2M frames (1679 x 1475 int32, module gaps = -1, Poisson background and Gaussian
Bragg peaks, seeded) are generated in RAM and transformed onto a ``N^3`` float32
``(v, n)`` grid (default 1001^3 = 8.0 GB, allocated and pre-faulted once), on one
thread.  Following ``shared/reference/performance-baselines.md`` §5:

* **yardstick**: a random-index scatter of the same number of ``(v, n)`` updates into
  the same grid array; 5 pairs alternating yardstick / transform after a warm-up pair;
  gate: median(yardstick time / transform time) >= 0.9;
* **peer**: xrayutilities ``QConversion.area`` + ``Gridder3D`` (float64) on the same
  frames on a 501^3 grid (1001^3 would need 16 GB), alternated with the transform;
  gate: transform >= 2x faster (transform on the full grid);
* **correctness, same run**: the signal summed over the grid equals the counts of the
  unmasked in-range pixels (computed independently with numpy), and a small grid agrees
  voxel by voxel with a numpy ``bincount`` reference built on ``Geometry.pixel_to_hkl``.

Usage::

    python benchmarks/bench_transform.py                # 40 frames, 1001^3, gates
    python benchmarks/bench_transform.py --quick        # CI smoke: 4 frames, 201^3
    python benchmarks/bench_transform.py --frames 60 --grid 801 --threads 2
"""

from __future__ import annotations

import argparse
import os
import sys

# Single-thread gating: set before numpy / numba / xrayutilities are imported.
for _var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402

from nxrefine_bs.geometry import Geometry, random_rotation  # noqa: E402
from nxrefine_bs.reduce.accumulator import (  # noqa: E402
    Accumulator,
    frame_matrices,
    polarization_factor,
)
from nxrefine_bs.reduce.grid import GridAxis, QGrid  # noqa: E402


@numba.njit(cache=True, nogil=True, boundscheck=False)
def random_scatter(index, values, weights, vn):  # pragma: no cover - compiled
    """Benchmark yardstick: ``vn[2 i] += value``, ``vn[2 i + 1] += weight`` at given ``i``."""
    for j in range(index.shape[0]):
        i = index[j] * 2
        vn[i] += values[j]
        vn[i + 1] += weights[j]
    return index.shape[0]

SHAPE = (1679, 1475)
CELL = 6.0
PEAKS: dict[str, np.ndarray] = {}
"""The injected Bragg peaks ``(x, y, z)`` of the last :func:`make_frames` call."""


def pilatus_gaps(shape: tuple[int, int] = SHAPE) -> np.ndarray:
    """Pilatus 2M module gaps: 8 x 3 modules of 195 x 487 px, gaps of 17 and 7 px."""
    mask = np.zeros(shape, dtype=bool)
    for r in range(1, 8):
        y0 = r * 195 + (r - 1) * 17
        mask[y0 : y0 + 17] = True
    for c in range(1, 3):
        x0 = c * 487 + (c - 1) * 7
        mask[:, x0 : x0 + 7] = True
    return mask


def make_geometry() -> Geometry:
    """87 keV, 650 mm, beam at the detector centre, rotation axis along lab y (chi = -90)."""
    return Geometry(
        wavelength=0.1425,
        distance=650.0,
        pixel_size=0.172,
        shape=SHAPE,
        beam_center_x=737.0,
        beam_center_y=839.5,
        chi=-90.0,
        phi_start=-5.0,
        phi_step=0.1,
    )


def make_frames(n: int, seed: int = 0) -> np.ndarray:
    """``n`` seeded Poisson frames (radial background 2-7 counts, 60 peaks, gaps -1)."""
    rng = np.random.default_rng(seed)
    ny, nx = SHAPE
    yy, xx = np.mgrid[0:ny, 0:nx]
    r = np.hypot(yy - ny / 2, xx - nx / 2)
    bg = 2.0 + 5.0 * np.exp(-r / 500.0)
    gaps = pilatus_gaps()
    frames = np.empty((n, ny, nx), dtype=np.int32)
    peaks = np.column_stack(
        [rng.uniform(20, nx - 20, 60), rng.uniform(20, ny - 20, 60), rng.uniform(0, n, 60)]
    )
    heights = 10 ** rng.uniform(2, 5, 60)
    PEAKS["xyz"] = peaks[np.argsort(-heights)]  # strongest first
    for i in range(n):
        lam = bg.copy()
        for (px, py, pz), h in zip(peaks, heights, strict=True):
            wz = np.exp(-0.5 * ((i - pz) / 1.2) ** 2)
            if wz < 1e-3:
                continue
            x0, y0 = int(px), int(py)
            sl = np.s_[y0 - 8 : y0 + 9, x0 - 8 : x0 + 9]
            lam[sl] += h * wz * np.exp(-0.5 * (((xx[sl] - px) ** 2 + (yy[sl] - py) ** 2) / 2.25))
        f = rng.poisson(lam).astype(np.int32)
        f[gaps] = -1
        frames[i] = f
    return frames


def cubic_grid(n: int, half: float = 10.0) -> QGrid:
    step = 2 * half / (n - 1)
    return QGrid(*(GridAxis(a, -half, step, n) for a in "hkl"))


def expected_total(geom, ub, grid, frames, pixel_weight) -> tuple[float, int]:
    """Sum of counts and number of the unmasked pixels whose voxel is inside ``grid``."""
    q = geom.pixel_q_lab(*np.meshgrid(np.arange(SHAPE[1]), np.arange(SHAPE[0]))).reshape(-1, 3)
    mats, offs, _ = frame_matrices(geom, ub, grid, np.arange(len(frames)))
    n_ax = grid.counts
    total, count = 0.0, 0
    good_pix = pixel_weight.ravel() > 0
    for f in range(len(frames)):
        u = q @ mats[f].T + offs[f]
        inside = np.all((u >= 0) & (u < n_ax), axis=1)
        c = frames[f].ravel()
        ok = inside & good_pix & (c >= 0)
        total += float(c[ok].sum(dtype=np.float64))
        count += int(ok.sum())
    return total, count


def reference_small(geom, ub, grid, frames, pixel_weight):
    """numpy ``bincount`` transform on ``Geometry.pixel_to_hkl`` (independent path)."""
    yy, xx = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]]
    v = np.zeros(grid.size)
    n = np.zeros(grid.size)
    for f in range(len(frames)):
        flat = grid.flat_index(geom.pixel_to_hkl(xx, yy, f, ub)).ravel()
        c = frames[f].ravel().astype(np.float64)
        ok = (flat >= 0) & (c >= 0) & (pixel_weight.ravel() > 0)
        v += np.bincount(flat[ok], weights=c[ok], minlength=grid.size)
        n += np.bincount(flat[ok], weights=pixel_weight.ravel()[ok], minlength=grid.size)
    return v.reshape(grid.shape), n.reshape(grid.shape)


def run_transform(acc: Accumulator, frames: np.ndarray, fw: np.ndarray, block: int) -> float:
    t0 = time.perf_counter()
    for i0 in range(0, len(frames), block):
        acc.add(frames[i0 : i0 + block], i0, fw[i0 : i0 + block])
    return time.perf_counter() - t0


def rx(deg: float) -> np.ndarray:
    """Rotation matrix about x by ``deg`` degrees."""
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def xu_setup(geom: Geometry, ub: np.ndarray):
    """xrayutilities conversion for the same detector (phi about lab y, fixed detector).

    Detector direction 1 runs along the frame rows (y, which point up: ``z+``) so that
    ``area`` returns arrays in the data's ``(frame, y, x)`` order.  Our goniometer has
    the base rotation chi = -90 deg (about the beam, x) that turns the phi axis onto
    lab y; xrayutilities' sample circle is lab y directly, so its UB is
    ``2 pi Rx(-90 deg) UB`` (xrayutilities includes 2 pi in Q).
    """
    import xrayutilities as xu

    qconv = xu.experiment.QConversion(["y+"], ["z+"], [1, 0, 0], wl=geom.wavelength)
    qconv.init_area(
        "z+",
        "y-",
        cch1=geom.beam_center_y,
        cch2=geom.beam_center_x,
        Nch1=SHAPE[0],
        Nch2=SHAPE[1],
        distance=geom.distance,
        pwidth1=geom.pixel_size,
        pwidth2=geom.pixel_size,
    )
    return xu, qconv, 2 * np.pi * rx(geom.chi) @ ub


def xu_agreement(geom: Geometry, ub: np.ndarray, qconv, ub2pi, frames_at, peaks) -> dict:
    """Largest |HKL| difference between xrayutilities and ``Geometry.pixel_to_hkl``.

    Over every pixel of the frames ``frames_at`` and at the centres of the injected
    Bragg ``peaks`` ``(x, y, z)``: both must put them at the same HKL.
    """
    yy, xx = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]]
    worst = 0.0
    for z in frames_at:
        phi = np.array([geom.phi(z)])
        h, k, l_ = qconv.area(phi, np.zeros(1), UB=ub2pi)
        ours = geom.pixel_to_hkl(xx, yy, z, ub)
        theirs = np.stack([h, k, l_], -1).reshape(ours.shape)
        worst = max(worst, float(np.max(np.abs(theirs - ours))))
    dpk = []
    for px, py, pz in peaks:
        iz, iy, ix = int(round(pz)), int(round(py)), int(round(px))
        phi = np.array([geom.phi(iz)])
        h, k, l_ = qconv.area(phi, np.zeros(1), UB=ub2pi)
        theirs = np.array([a.reshape(SHAPE)[iy, ix] for a in (h, k, l_)])
        ours = geom.pixel_to_hkl(ix, iy, iz, ub)
        dpk.append(float(np.max(np.abs(theirs - ours))))
    return {"pixels_max_dhkl": worst, "peaks_max_dhkl": max(dpk), "peaks": len(dpk)}


def xu_transform(xu, qconv, ub2pi, frames, gridder, block: int = 4) -> float:
    """``QConversion.area`` + ``Gridder3D`` over ``frames`` in blocks; returns seconds.

    Gap pixels are passed with zero intensity (xrayutilities' gridder has no pixel
    mask; selecting the good pixels with a boolean index first was 4x slower).
    """
    t0 = time.perf_counter()
    for i0 in range(0, len(frames), block):
        blk = frames[i0 : i0 + block]
        phi = -5.0 + 0.1 * np.arange(i0, i0 + len(blk))
        qh, qk, ql = qconv.area(phi, np.zeros_like(phi), UB=ub2pi)
        d = np.maximum(blk, 0).astype(np.float64)
        gridder(qh, qk, ql, d)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=40, help="frames per timed call (default 40)")
    ap.add_argument("--grid", type=int, default=1001, help="grid points per axis (default 1001)")
    ap.add_argument("--pairs", type=int, default=5, help="timed pairs after the warm-up")
    ap.add_argument("--block", type=int, default=16, help="frames per kernel block")
    ap.add_argument("--quick", action="store_true", help="CI smoke: 4 frames, 201^3, 1 pair")
    ap.add_argument("--no-xu", action="store_true", help="skip the xrayutilities comparison")
    ap.add_argument("--xu-grid", type=int, default=501, help="xrayutilities grid (default 501)")
    ap.add_argument(
        "--threads", type=int, default=2, help="also time N banded threads (gate >= 1.7x)"
    )
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.frames, args.grid, args.pairs, args.xu_grid = 4, 201, 1, 101
    results: dict[str, object] = {"frames": args.frames, "grid": args.grid, "shape": SHAPE}
    ok = True

    geom = make_geometry()
    ub = random_rotation(np.random.default_rng(3)) @ (np.eye(3) / CELL)
    t = time.perf_counter()
    frames = make_frames(args.frames)
    print(f"frames: {args.frames} x {SHAPE} generated in {time.perf_counter() - t:.1f} s")
    gaps = pilatus_gaps()
    pw = polarization_factor(geom) * (~gaps)
    fw = np.ones(args.frames)
    npix = frames.size

    # --- correctness 1: small grid against numpy bincount (3 frames) -----------------
    small = cubic_grid(101)
    with Accumulator(small, geom, ub, pw) as acc:
        run_transform(acc, frames[:3], fw, args.block)
        v_s, n_s = acc.v.astype(np.float64), acc.n.astype(np.float64)
    vr, nr = reference_small(geom, ub, small, frames[:3], pw)
    bad = int((~np.isclose(v_s, vr, rtol=1e-5, atol=1e-3)).sum())
    n_err = float(np.max(np.abs(n_s - nr) / np.maximum(nr, 1.0)))
    good_small = bad <= 5 and abs(v_s.sum() - vr.sum()) <= 1e-6 * vr.sum() + 5 * vr.max()
    print(
        f"small-grid check (101^3, 3 frames): {bad} voxels differ, max rel |dn| {n_err:.1e}: "
        f"{'OK' if good_small else 'FAIL'}"
    )
    results["small_grid_voxels_differ"] = bad
    ok &= good_small

    # --- the big grid, allocated once and pre-faulted --------------------------------
    grid = cubic_grid(args.grid)
    t = time.perf_counter()
    vn = np.empty(2 * grid.size, dtype=np.float32)
    vn.fill(0.0)
    print(
        f"grid {args.grid}^3 (v, n) float32 = {vn.nbytes / 1e9:.2f} GB allocated and "
        f"zeroed in {time.perf_counter() - t:.1f} s"
    )
    acc = Accumulator(grid, geom, ub, pw, vn=vn)
    run_transform(acc, frames[:2], fw, args.block)  # JIT warm-up (cache=True)
    vn.fill(0.0)
    acc.added, acc.total = 0, 0.0

    # --- correctness 2: total signal on the full grid ---------------------------------
    t_first = run_transform(acc, frames, fw, args.block)
    exp_total, exp_count = expected_total(geom, ub, grid, frames, pw)
    v_sum = float(acc.v.sum(dtype=np.float64))
    n_upd = acc.added
    total_ok = abs(v_sum - exp_total) <= 1e-5 * exp_total and abs(n_upd - exp_count) <= 10
    print(
        f"total check: sum(v) {v_sum:.6e} vs counts {exp_total:.6e} "
        f"(rel {abs(v_sum - exp_total) / exp_total:.1e}), updates {n_upd} vs {exp_count}: "
        f"{'OK' if total_ok else 'FAIL'}"
    )
    print(f"first pass (fresh zeroed grid): {npix / t_first / 1e6:.1f} Mpix/s")
    results.update(total_rel_error=abs(v_sum - exp_total) / exp_total, updates=n_upd)
    ok &= total_ok

    # --- yardstick vs transform, alternated ---------------------------------------------
    rng = np.random.default_rng(7)
    yd = {
        "index": rng.integers(0, grid.size, n_upd, dtype=np.int64),
        "vals": rng.random(n_upd, dtype=np.float32),
    }

    def yard() -> float:
        t0 = time.perf_counter()
        random_scatter(yd["index"], yd["vals"], yd["vals"], vn)
        return time.perf_counter() - t0

    yard()
    run_transform(acc, frames, fw, args.block)  # warm-up pair
    ratios, t_tr, t_yd = [], [], []
    for _ in range(args.pairs):
        a = yard()
        b = run_transform(acc, frames, fw, args.block)
        t_yd.append(a)
        t_tr.append(b)
        ratios.append(a / b)
    yd.clear()  # free the yardstick arrays
    med = statistics.median(ratios)
    mpix = npix / statistics.median(t_tr) / 1e6
    upd = n_upd / statistics.median(t_yd) / 1e6
    gate_y = med >= 0.9
    print(
        f"transform: {mpix:.1f} Mpix/s ({n_upd / statistics.median(t_tr) / 1e6:.1f} M updates/s)"
        f"; yardstick {upd:.1f} M updates/s"
    )
    print(
        f"transform speed / yardstick: median {med:.2f} (min {min(ratios):.2f}, max "
        f"{max(ratios):.2f}) gate >= 0.9: {'PASS' if gate_y else 'FAIL'}"
    )
    results.update(
        mpix_per_s=mpix,
        yardstick_mupd_per_s=upd,
        ratio_vs_yardstick=med,
        ratio_vs_yardstick_range=[min(ratios), max(ratios)],
    )
    if not args.quick:
        ok &= gate_y

    # --- threads (information only) -------------------------------------------------------
    if args.threads > 1:
        # same sums: one pass each from a zeroed grid
        vn.fill(0.0)
        run_transform(acc, frames, fw, args.block)
        v1 = float(acc.v.sum(dtype=np.float64))
        with Accumulator(grid, geom, ub, pw, vn=vn, nthreads=args.threads) as acc2:
            vn.fill(0.0)
            run_transform(acc2, frames, fw, args.block)
            vt = float(acc2.v.sum(dtype=np.float64))
            same = vt == v1
            print(
                f"{args.threads} threads: sum(v) {vt:.9e} vs 1 thread {v1:.9e}: "
                f"{'identical' if same else 'DIFFERENT'}"
            )
            ok &= same
            tr = []
            for _ in range(args.pairs):  # alternate 1 thread / N threads on the same grid
                a = run_transform(acc, frames, fw, args.block)
                b = run_transform(acc2, frames, fw, args.block)
                tr.append(a / b)
        sp = statistics.median(tr)
        gate_t = sp >= 1.7
        print(
            f"{args.threads} banded threads / 1 thread: median {sp:.2f}x (min {min(tr):.2f}, "
            f"max {max(tr):.2f}) gate >= 1.7: {'PASS' if gate_t else 'FAIL'}"
        )
        results.update(thread_speedup=sp, thread_speedup_range=[min(tr), max(tr)])
        if not args.quick:
            ok &= gate_t

    # --- xrayutilities --------------------------------------------------------------------
    if not args.no_xu:
        try:
            xu, qconv, ub2pi = xu_setup(geom, ub)
        except ImportError:
            print("xrayutilities not installed (pip install xrayutilities): comparison skipped")
        else:
            agree = xu_agreement(geom, ub, qconv, ub2pi, (0, args.frames - 1), PEAKS["xyz"][:20])
            same = agree["pixels_max_dhkl"] < 1e-6 and agree["peaks_max_dhkl"] < 1e-6
            print(
                f"xrayutilities vs ours, same HKL: every pixel of 2 frames max |dHKL| "
                f"{agree['pixels_max_dhkl']:.1e}, {agree['peaks']} Bragg peaks max |dHKL| "
                f"{agree['peaks_max_dhkl']:.1e}: {'OK' if same else 'FAIL'}"
            )
            results["xu_agreement"] = agree
            ok &= same
            gxu = xu.Gridder3D(args.xu_grid, args.xu_grid, args.xu_grid)
            gxu.KeepData(True)
            gxu.dataRange(-10, 10, -10, 10, -10, 10, fixed=True)
            xu_transform(xu, qconv, ub2pi, frames[:4], gxu)  # warm-up, allocates
            xr, txu, ttr = [], [], []
            for _ in range(max(1, min(args.pairs, 3))):
                a = xu_transform(xu, qconv, ub2pi, frames, gxu)
                b = run_transform(acc, frames, fw, args.block)
                txu.append(a)
                ttr.append(b)
                xr.append(a / b)
            mxu = npix / statistics.median(txu) / 1e6
            medx = statistics.median(xr)
            gate_x = medx >= 2.0
            print(f"xrayutilities area + Gridder3D ({args.xu_grid}^3 float64): {mxu:.1f} Mpix/s")
            print(
                f"transform ({args.grid}^3) / xrayutilities: {medx:.2f}x faster (min "
                f"{min(xr):.2f}, max {max(xr):.2f}) gate >= 2: {'PASS' if gate_x else 'FAIL'}"
            )
            results.update(xu_mpix_per_s=mxu, ratio_vs_xu=medx)
            if not args.quick:
                ok &= gate_x
            del gxu
    acc.close()
    results["ok"] = bool(ok)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    print("ALL OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
