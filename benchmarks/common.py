"""Shared helpers for the benchmarks: single-threaded set-up, cached data, paired timing.

Import this module **first** in a benchmark script: it pins numba/OpenMP/BLAS to one
thread before numpy or numba are imported (``performance-baselines.md`` §5).
"""

from __future__ import annotations

import os

for _var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import h5py  # noqa: E402
import numpy as np  # noqa: E402

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"
FULL_FRAMES = 100
QUICK_FRAMES = 12
QUICK_SHAPE = (407, 487)  # Pilatus 100K-sized: fast CI smoke test


def parse_args(description: str) -> argparse.Namespace:
    """Common command-line flags: ``--frames N``, ``--quick``, ``--pairs``, ``--json``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--frames", type=int, default=None, help="frames per timed call")
    p.add_argument("--quick", action="store_true", help="small stack (CI smoke test)")
    p.add_argument("--pairs", type=int, default=5, help="timed (yardstick, step) pairs")
    p.add_argument("--json", type=Path, default=None, help="write results as JSON here")
    args = p.parse_args()
    if args.frames is None:
        args.frames = QUICK_FRAMES if args.quick else FULL_FRAMES
    return args


SIM_SEED = 5
SIM_OPTIONS = {"sigma_xy": 1.5, "sigma_frames": 1.2, "background": 4.0}


def _setup(quick: bool) -> tuple[Any, Any, Any, str]:
    """Geometry, crystal, detector and tag of the benchmark stack."""
    from nxrefine_bs.geometry import Geometry
    from nxrefine_bs.simulation.crystal import SimCrystal
    from nxrefine_bs.simulation.frames import DetectorModel

    warnings.filterwarnings("ignore")
    if quick:
        det = DetectorModel.synthetic(QUICK_SHAPE, pixel_size=0.172, modules=(2, 2), gap=(17, 7))
    else:
        det = DetectorModel.from_pyfai("Pilatus CdTe 2M")
    ny, nx = det.shape
    geometry = Geometry(
        wavelength=0.1425,
        distance=250.0 if quick else 650.0,
        pixel_size=det.pixel_size,
        shape=det.shape,
        beam_center_x=nx / 2 + 0.3,
        beam_center_y=ny / 2 - 0.4,
        yaw=0.3,
        pitch=-0.2,
        roll=0.1,
        chi=-90.0,
        omega=0.0,
        phi_start=-5.0,
        phi_step=0.1,
    )
    crystal = SimCrystal.random((6.0, 6.0, 6.0, 90.0, 90.0, 90.0), centring="P", seed=11)
    return geometry, crystal, det, "quick" if quick else "p2m"


def benchmark_scan(n_frames: int, *, quick: bool = False) -> Path:
    """Scan file of a cached, seeded Pilatus-2M (or quick 100K-sized) simulated stack.

    The files live under ``benchmarks/data/`` (git-ignored) and are reused when they
    hold ``n_frames`` frames; otherwise they are (re)generated.
    """
    from nxrefine_bs.simulation.scan import make_simulated_scan

    geometry, crystal, det, tag = _setup(quick)
    directory = DATA_DIR / f"{tag}_{n_frames}"
    scan_file = directory / "bench" / "xtal" / "bench_300K.nxs"
    data_file = directory / "bench" / "xtal" / "300K" / "f1.h5"
    if scan_file.is_file() and data_file.is_file():
        with h5py.File(data_file, "r") as f:
            if f["/entry/data/data"].shape[0] == n_frames:
                return scan_file
    print(f"generating {n_frames} frames of {det.shape} under {directory} ...", flush=True)
    t0 = time.perf_counter()
    make_simulated_scan(
        directory,
        sample="bench",
        label="xtal",
        scan="300K",
        geometry=geometry,
        crystal=crystal,
        detector=det,
        n_frames=n_frames,
        seed=SIM_SEED,
        progress=True,
        **SIM_OPTIONS,
    )
    print(f"  done in {time.perf_counter() - t0:.1f} s", flush=True)
    return scan_file


def benchmark_truth(n_frames: int, *, quick: bool = False) -> Any:
    """Ground-truth :class:`PeakTable` of the benchmark stack (recomputed, no frames)."""
    from nxrefine_bs.simulation.frames import RotationSimulator

    geometry, crystal, det, _ = _setup(quick)
    # make_simulated_scan seeds rotation n with seed * 100 + n.
    sim = RotationSimulator(
        geometry, crystal, det, n_frames, seed=SIM_SEED * 100 + 1, **SIM_OPTIONS
    )
    return sim.peaks


def reset_results(scan_file: Path, entry: str, groups: tuple[str, ...]) -> None:
    """Remove step results so that a step recomputes (benchmarks also pass overwrite)."""
    with h5py.File(scan_file, "r+") as f:
        for name in groups:
            if name in f[entry]:
                del f[entry][name]


def data_location(scan_file: Path, entry: str = "f1") -> tuple[Path, str]:
    """Detector file and dataset path behind ``entry/data/data``."""
    from nxrefine_bs.reduce.framestream import resolve_data_link

    src = resolve_data_link(scan_file, entry)
    return src.data_file, src.data_path


def warm_page_cache(path: Path) -> None:
    """Read ``path`` once so that the timed reads hit the page cache (stated in the output)."""
    with open(path, "rb") as fh:
        while fh.read(64 * 1024 * 1024):
            pass


def drop_page_cache(*paths: Path) -> None:
    """Evict ``paths`` from the page cache (``posix_fadvise(DONTNEED)``: clean pages, no root).

    The state of a whole rotation of raw frames (3650 Pilatus-2M frames = 36 GB) on a
    reduction node with less memory: every frame comes from the disk.  Dirty pages are not
    evicted: write the files (and ``os.sync()``) before.
    """
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cold(func: Callable[[], Any], *paths: Path) -> Callable[[], Any]:
    """``func`` run with ``paths`` evicted from the page cache first.

    Inside :func:`paired_ratio` the eviction is timed with the step; it is one
    ``fadvise`` call per file (well under a millisecond).
    """

    def run() -> Any:
        drop_page_cache(*paths)
        return func()

    return run


def read_yardstick(data_file: Path, data_path: str, first: int, last: int) -> Callable[[], None]:
    """Bare per-frame h5py ``read_direct`` of frames ``[first, last)`` into one buffer."""

    def read() -> None:
        with h5py.File(data_file, "r") as f:
            ds = f[data_path]
            buf = np.empty(ds.shape[1:], dtype=ds.dtype)
            for i in range(first, last):
                ds.read_direct(buf, np.s_[i], np.s_[...])

    return read


def paired_ratio(
    yardstick: Callable[[], Any], step: Callable[[], Any], pairs: int = 5
) -> dict[str, Any]:
    """Warm-up pair, then ``pairs`` alternating (yardstick, step) timings.

    Returns the per-pair ratios step/yardstick with their median, min and max, and the
    median absolute times.
    """
    yardstick()
    step()
    ta, tb, ratios = [], [], []
    for _ in range(pairs):
        t0 = time.perf_counter()
        yardstick()
        t1 = time.perf_counter()
        step()
        t2 = time.perf_counter()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
        ratios.append((t2 - t1) / (t1 - t0))
    return {
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ratios": ratios,
        "yardstick_s": statistics.median(ta),
        "step_s": statistics.median(tb),
    }


def machine() -> dict[str, Any]:
    """A short description of the machine and library versions."""
    import numba
    import scipy

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "scipy": scipy.__version__,
        "h5py": h5py.__version__,
        "threads": os.environ.get("NUMBA_NUM_THREADS"),
    }


def report(
    name: str, results: dict[str, Any], gates: list[tuple[str, bool]], out: Path | None
) -> int:
    """Print results and gates; write JSON if asked; return the exit status."""
    print(f"\n== {name} ==")
    for key, val in results.items():
        if isinstance(val, float):
            print(f"  {key:32s} {val:.4g}")
        elif isinstance(val, list) and val and isinstance(val[0], float):
            print(f"  {key:32s} " + " ".join(f"{v:.3f}" for v in val))
        else:
            print(f"  {key:32s} {val}")
    failed = [label for label, ok in gates if not ok]
    for label, ok in gates:
        print(f"  [{'PASS' if ok else 'FAIL'}] {label}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"name": name, "machine": machine(), "results": results, "gates": gates}
        out.write_text(json.dumps(payload, indent=2, default=float))
    return 1 if failed else 0


def exit_with(status: int) -> None:
    """Exit the benchmark with ``status`` (non-zero when a gate failed)."""
    sys.exit(status)
