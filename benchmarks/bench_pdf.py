"""Benchmark of the ``pdf`` step (issue #14): time and peak memory at 201^3 and 401^3.

Data: a seeded binary crystal with known pair correlations (A-B dimers along a, pairs of
identical planes along c; cubic cell a = b = c = 8 A, Laue group mmm), S(HKL) built from
``<|FFT f|^2>`` of a periodic supercell tiled onto a grid ``-5..5`` in every direction
(201^3: step 0.05; 401^3: step 0.025), with single-voxel Bragg peaks and a Gaussian form
factor, written in ``combine``'s layout (``v``, ``n``, ``data``).

For each size a fresh process runs ``pdf.run`` once (after a 21^3 warm-up that loads the
numba cache) and reports

* wall time per stage and in total, and the peak resident memory above the process's
  resident size before the step (``ru_maxrss``);
* **yardstick**, same process and threads: one ``scipy.fft.rfftn`` of a float32 volume of
  the PDF's size; the step's time is printed as a multiple of it;
* **correctness, same run**: ΔPDF(a) / ΔPDF(c) = -1 and ΔPDF(a + c) / ΔPDF(c) = -1/2
  (the model's correlations), |ΔPDF| < 5 % of ΔPDF(c) at uncorrelated lattice vectors;
* the Laue symmetrisation kernel with the 48 operators of m-3m on the same volume
  (information: the worst case; the step used mmm).

Then the **fill** is compared with a straight ``scipy.sparse.linalg.spsolve`` of the same
holes (all punched reflections of the 201^3 volume as one sparse system,
``fill.fill_mask``), on the same volume: times, ratio and the largest difference.  Gates
(exit status 1): every correctness check, and the fill at least ``FILL_GATE`` (5x) faster
than spsolve (not with ``--quick``).

Usage::

    python benchmarks/bench_pdf.py                 # 201^3 + fill comparison (~1 min)
    python benchmarks/bench_pdf.py --large         # also 401^3 (needs ~2.5 GB RAM, disk 1 GB)
    python benchmarks/bench_pdf.py --quick         # 81^3 smoke test (CI)
    python benchmarks/bench_pdf.py --threads 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HALF = 5.0
FILL_GATE = 5.0  # fill_holes at least this much faster than one spsolve of the same holes
CELL = (8.0, 8.0, 8.0, 90.0, 90.0, 90.0)


def _rss_mb() -> float:
    """Current resident size of this process (MB)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_data(n: int, workdir: Path, seed: int = 3, n_conf: int | None = None) -> Path:
    """Write the model in combine's layout under ``workdir``; return the scan file."""
    import h5py
    import numpy as np

    from nxrefine_bs.nexus.h5tools import nx_group, write_external_link, write_field
    from nxrefine_bs.nexus.provenance import record_process
    from nxrefine_bs.reduce.lattice import Lattice, write_lattice

    step = 2 * HALF / (n - 1)
    sc = int(round(1 / step))  # supercell cells per axis: grid points at h = m / sc
    if n_conf is None:  # about 50 000 sites in all, so that the correlations are sharp
        n_conf = max(6, int(round(48_000 / sc**3)))
    rng = np.random.default_rng(seed)
    inten = np.zeros((sc, sc, sc))
    idx = np.arange(sc // 2)
    for _ in range(n_conf):
        s = np.empty((sc, sc, sc))
        for y in range(sc):
            psi = rng.integers(2)
            for q in range(sc // 2):
                phase = rng.integers(2)
                signs = rng.choice([-1.0, 1.0], sc // 2)
                row = np.empty(sc)
                row[(2 * idx + phase) % sc] = signs
                row[(2 * idx + 1 + phase) % sc] = -signs
                s[:, y, (2 * q + psi) % sc] = row
                s[:, y, (2 * q + 1 + psi) % sc] = row
        inten += np.abs(np.fft.fftn(1.0 + 0.5 * s)) ** 2
    inten = (inten / n_conf).astype(np.float32)
    h = np.linspace(-HALF, HALF, n)
    m = np.rint(h * sc).astype(int) % sc
    env = np.exp(-((2 * np.pi * h / CELL[0]) ** 2) / 2.5**2).astype(np.float32)
    scan_dir = workdir / "300K"
    scan_dir.mkdir(parents=True, exist_ok=True)
    target = scan_dir / "transform.nxs"
    with h5py.File(target, "w") as f:
        d = nx_group(nx_group(f, "entry", "NXentry"), "data", "NXdata")
        d.attrs["signal"] = "data"
        d.attrs["axes"] = ["Ql", "Qk", "Qh"]
        for a in "lkh":
            d[f"Q{a}"] = h
        shape = (n, n, n)
        dv = d.create_dataset("v", shape=shape, dtype=np.float32, chunks=(min(64, n),) * 3)
        dn = d.create_dataset("n", shape=shape, dtype=np.float32, chunks=(min(64, n),) * 3)
        dd = d.create_dataset("data", shape=shape, dtype=np.float32, chunks=(min(64, n),) * 3)
        for il in range(n):  # storage [l, k, h]; intensity array is [x, y, z] = [h, k, l]
            plane = inten[np.ix_(m, m, [m[il]])][:, :, 0].T * env[il] * np.outer(env, env)
            dv[il] = plane
            dn[il] = 1.0
            dd[il] = plane
    scan_file = workdir / "sample_300K.nxs"
    with h5py.File(scan_file, "w") as f:
        e = nx_group(f, "entry", "NXentry")
        smp = nx_group(e, "sample", "NXsample")
        write_field(smp, "name", "bench")
        write_field(smp, "temperature", 300.0)
        write_lattice(smp, Lattice(*CELL, space_group="P m m m"))
        g = nx_group(e, "transform", "NXdata")
        write_external_link(g, "data", target, "/entry/data/data")
        write_external_link(g, "weights", target, "/entry/data/n")
        record_process(e, "nxcombine")
    return scan_file


def child_step(n: int, workdir: Path, threads: int, radius: float) -> dict:
    """Run the pdf step on the data in ``workdir`` (fresh process); time, memory, checks."""
    import h5py
    import numpy as np
    import scipy.fft

    from nxrefine_bs.reduce import pdf
    from nxrefine_bs.reduce.laue import laue_group, symmetrize
    from nxrefine_bs.reduce.pdf import _read_volume

    warm = workdir / "warm"
    warm.mkdir(exist_ok=True)
    pdf.run(make_data(21, warm), radius=radius, nthreads=threads)  # numba cache, imports
    before = _rss_mb()
    t0 = time.perf_counter()
    res = pdf.run(workdir / "sample_300K.nxs", radius=radius, nthreads=threads)
    seconds = time.perf_counter() - t0
    peak = _maxrss_mb() - before
    with h5py.File(workdir / "300K" / "pdf.nxs", "r") as f:
        delta = f["entry/pdf/pdf"][()]
    c = np.array(delta.shape) // 2
    u = int(round(delta.shape[0] * 2 * HALF / (n - 1)))

    vectors = [(0, 0, 1), (1, 0, 0), (1, 0, 1), (0, 1, 0), (2, 0, 0), (1, 1, 0), (0, 1, 1)]
    at = {r: float(delta[c[0] + r[2] * u, c[1] + r[1] * u, c[2] + r[0] * u]) for r in vectors}
    del delta
    ref = at[(0, 0, 1)]
    ratios = {"a": at[(1, 0, 0)] / ref, "a+c": at[(1, 0, 1)] / ref}
    quiet = max(abs(at[r]) / ref for r in vectors[3:])
    y = np.random.default_rng(0).random((n - 1,) * 3, dtype=np.float32)
    t = time.perf_counter()
    scipy.fft.rfftn(y, workers=threads)
    yard = time.perf_counter() - t
    del y
    grid, v, w = _read_volume(workdir / "300K" / "transform.nxs", "bench")
    t = time.perf_counter()
    symmetrize(v, w, laue_group(laue="m-3m"), grid, nthreads=threads)
    m3m = time.perf_counter() - t
    ok = abs(ratios["a"] + 1) < 0.1 and abs(ratios["a+c"] + 0.5) < 0.1 and quiet < 0.05 and ref > 0
    return {
        "n": n,
        "threads": threads,
        "seconds": round(seconds, 2),
        "stages": res["seconds"],
        "peak_mb_above_start": round(peak, 1),
        "volume_mb": round(n**3 * 4 / 2**20, 1),
        "yardstick_rfftn_s": round(yard, 3),
        "ratio_to_rfftn": round(seconds / yard, 1),
        "reflections": res["reflections"],
        "holes": res["holes"],
        "voxels_filled": res["voxels"],
        "symmetrize_m-3m_s": round(m3m, 2),
        "dpdf_ratios": {k: round(v_, 3) for k, v_ in ratios.items()},
        "dpdf_uncorrelated_max": round(quiet, 4),
        "correct": bool(ok),
    }


def child_fill(n: int, workdir: Path, radius: float) -> dict:
    """Fill the punched reflections: shared factorisation vs one spsolve of all holes."""
    import numpy as np

    from nxrefine_bs.reduce.fill import fill_holes, fill_mask
    from nxrefine_bs.reduce.lattice import Lattice
    from nxrefine_bs.reduce.pdf import _read_volume, punch_stencil, reflection_centres

    d = np.arange(-2, 3)  # warm-up: load the numba kernels from their cache
    ball = np.add.reduce(np.meshgrid(d**2, d**2, d**2, indexing="ij")) <= 4
    fill_holes(np.zeros((9, 9, 9)), np.array([[4, 4, 4]]), ball)
    grid, v, _ = _read_volume(workdir / "300K" / "transform.nxs", "bench")
    stencil = punch_stencil(grid, CELL, radius)
    half = [s // 2 for s in stencil.shape]
    _, centres, _ = reflection_centres(grid, Lattice(*CELL, space_group="P m m m"), half)
    spacing = [2 * np.pi / CELL[0] * grid.h.step] * 3
    ours = v.copy()
    t = time.perf_counter()
    result, voxels = fill_holes(ours, centres, stencil, spacing=spacing)
    t_ours = time.perf_counter() - t
    ref = v.copy()
    before = _maxrss_mb()
    t = time.perf_counter()
    fill_mask(ref, voxels, spacing=spacing)
    t_ref = time.perf_counter() - t
    diff = float(np.abs(ours - ref).max() / np.abs(ref.reshape(-1)[voxels]).max())
    return {
        "n": n,
        "holes": int(len(centres)),
        "hole_voxels": int(voxels.size),
        "stencil_voxels": int(stencil.sum()),
        "shared": result.shared,
        "grouped": result.grouped,
        "fill_holes_s": round(t_ours, 3),
        "spsolve_s": round(t_ref, 3),
        "speedup": round(t_ref / t_ours, 1),
        "spsolve_extra_peak_mb": round(_maxrss_mb() - before, 1),
        "max_rel_difference": diff,
        "correct": diff < 1e-5,
    }


def _child(args: argparse.Namespace) -> None:
    work = Path(args.workdir)
    if args.child == "data":
        make_data(args.n, work)
        out = {"ok": True}
    elif args.child == "step":
        out = child_step(args.n, work, args.threads, args.radius)
    else:
        out = child_fill(args.n, work, args.radius)
    print("RESULT " + json.dumps(out))


def _spawn(kind: str, n: int, work: Path, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(args.threads)
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--n",
        str(n),
        "--workdir",
        str(work),
        "--threads",
        str(args.threads),
        "--radius",
        str(args.radius),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"{kind} {n}^3 failed (exit {proc.returncode})")
    return json.loads(lines[-1][7:])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--large", action="store_true", help="also run 401^3 (about 2.5 GB of RAM)")
    p.add_argument("--quick", action="store_true", help="81^3 only (CI smoke test)")
    p.add_argument("--threads", type=int, default=2, help="threads (numba, FFT); default 2")
    p.add_argument("--radius", type=float, help="punch radius (1/A); default 0.2, 0.1 with --quick")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--child", choices=("data", "step", "fill"), help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args)
        return 0
    sizes = [81] if args.quick else [201] + ([401] if args.large else [])
    if args.radius is None:  # the 81^3 grid is coarse: 0.2 1/A would punch +-0.25 cells
        args.radius = 0.1 if args.quick else 0.2
    for n in sizes:
        vol = n**3 * 4 / 2**20
        print(
            f"{n}^3 grid: {n**3 / 1e6:.1f} M voxels, {vol:.0f} MB per float32 volume; "
            f"input file {3 * vol:.0f} MB, outputs {6 * vol:.0f} MB on disk"
        )
    results: dict = {"steps": [], "fill": None}
    with tempfile.TemporaryDirectory(prefix="bench_pdf_") as tmp:
        for n in sizes:
            work = Path(tmp) / f"n{n}"
            t = time.perf_counter()
            _spawn("data", n, work, args)
            print(f"  {n}^3 data written in {time.perf_counter() - t:.1f} s")
            r = _spawn("step", n, work, args)
            results["steps"].append(r)
            print(json.dumps(r))
            if n == sizes[0]:
                f = _spawn("fill", n, work, args)
                results["fill"] = f
                print(json.dumps(f))
            for path in work.rglob("*.nxs"):
                path.unlink()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    ok = all(r["correct"] for r in results["steps"]) and results["fill"]["correct"]
    print("correct" if ok else "INCORRECT")
    gate = args.quick or results["fill"]["speedup"] >= FILL_GATE
    print(
        f"fill speed-up {results['fill']['speedup']}x vs spsolve (gate >= {FILL_GATE}x): "
        + ("pass" if gate else "FAIL")
    )
    return 0 if ok and gate else 1


if __name__ == "__main__":
    raise SystemExit(main())
