"""What compressing the transform's output costs: time and size against no compression.

The cached benchmark stack (seeded Pilatus-2M simulation, ``common.benchmark_scan``) is
copied into a temporary directory and reduced up to ``refine``; then the ``transform``
step (the step registry's ``run_step``, as the CLI, plans and workflow call it) runs
once per output codec on the same grid, alternating with the uncompressed run (the
yardstick) in pairs, one thread.  Printed per codec: the step's time relative to the
uncompressed step, the output file size and the time to read ``v`` and ``n`` back (what
``combine`` pays).  Correctness in the same run: every codec's ``v`` and ``n`` equal the
uncompressed ones exactly (all codecs are lossless).  The fraction of voxels the
rotation reaches (``n > 0``) is printed: it decides how well the output compresses
(a full 360-degree rotation reaches far more of the grid than a short stack).

No gate: this documents a choice (``transform --compression``), it does not guard a
speed.

Usage: ``python benchmarks/bench_transform_output.py [--frames 100] [--grid 401]
[--pairs 2] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: I001  (first: pins threads before numpy/numba are imported)
import h5py
import numpy as np

from nxrefine_bs.reduce.steps import run_step

CODECS = ("gzip", "bslz4", "zstd", "blosc")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--grid", type=int, default=401, help="grid points per axis")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="small detector, 40 frames, 101^3")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.quick:
        args.frames, args.grid, args.pairs = 40, 101, 1
    src = common.benchmark_scan(args.frames, quick=args.quick)
    tmp = Path(tempfile.mkdtemp(prefix="bench-tout-"))
    try:
        root = src.parents[2]
        shutil.copytree(root, tmp / "exp")
        scan = tmp / "exp" / src.relative_to(root)
        frames = {"first": 0, "last": args.frames}
        run_step("max", scan, "f1", overwrite=True, **frames)
        run_step("find", scan, "f1", overwrite=True, threshold=50.0, **frames)
        run_step("refine", scan, "f1", overwrite=True)
        half = 6.0
        step = 2 * half / (args.grid - 1)
        grid = dict.fromkeys(("qh", "qk", "ql"), (-half, step, half))
        last: dict[str, Path] = {}

        def transform(codec: str | None):
            def run() -> dict:
                out = run_step(
                    "transform",
                    scan,
                    "f1",
                    overwrite=True,
                    nthreads=1,
                    compression=codec,
                    **frames,
                    **grid,
                )
                last["file"] = Path(out["file"])
                return out

            return run

        def output() -> Path:
            return last["file"]

        def read_back(path: Path) -> tuple[np.ndarray, np.ndarray, float]:
            t0 = time.perf_counter()
            with h5py.File(path, "r") as f:
                data = f["entry/data"]
                v, n = data["v"][()], data["n"][()]
            return v, n, time.perf_counter() - t0

        transform(None)()  # warm-up (numba, pyFAI)
        transform(None)()
        ref = output()
        v0, n0, t_read0 = read_back(ref)
        size0 = ref.stat().st_size
        reached = float((n0 > 0).mean())
        print(f"grid {args.grid}^3, {args.frames} frames; voxels reached (n > 0): "
              f"{100 * reached:.1f} %; uncompressed {size0 / 1e9:.3f} GB, read back "
              f"{t_read0:.2f} s")  # fmt: skip
        results: dict = {"grid": args.grid, "frames": args.frames, "reached": reached,
                         "size_none": size0, "codecs": {}}  # fmt: skip
        ok = True
        for codec in CODECS:
            pair = common.paired_ratio(transform(None), transform(codec), args.pairs)
            path = output()
            v, n, t_read = read_back(path)
            same = np.array_equal(v, v0) and np.array_equal(n, n0)
            ok &= same
            size = path.stat().st_size
            row = {
                "time_ratio": pair["ratio_median"],
                "step_s": pair["step_s"],
                "none_s": pair["yardstick_s"],
                "size": size,
                "size_ratio": size0 / size,
                "read_s": t_read,
                "read_none_s": t_read0,
                "identical": same,
            }
            results["codecs"][codec] = row
            print(f"  {codec:6s} step {pair['step_s']:6.2f} s = {pair['ratio_median']:.2f}x "
                  f"uncompressed ({pair['yardstick_s']:.2f} s); file {size / 1e9:.3f} GB "
                  f"({size0 / size:.1f}x smaller); read back {t_read:.2f} s; "
                  f"values {'identical' if same else 'DIFFER'}")  # fmt: skip
        print(f"[{'PASS' if ok else 'FAIL'}] every codec gives the uncompressed v and n")
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        return 0 if ok else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
