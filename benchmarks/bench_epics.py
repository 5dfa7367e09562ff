"""Plan and writer overhead per frame over Channel Access at 10 Hz and 100 Hz; dropped frames.

Starts the simulated beamline IOC (``nxrefine-bs ioc``) on 127.0.0.1 at a free port,
connects the ophyd-async EPICS devices and flies one rotation per frame rate with the
NeXus scan-file writer subscribed.  For each rate:

* yardstick: the acquisition time ``N x frame_time`` (what the frames cost at best);
* plan overhead per frame: ``(RE wall time - N x frame_time) / N`` (pre-positioning
  moves, staging, arming, the motor's ramps, closing the file: everything that is not
  frames), and the run's own window (start to stop document) against the yardstick,
  with its fixed part ``window - N x frame_time`` per rotation;
* writer: CPU time spent in the writer's callback per frame, and how long after the
  RunEngine returns ``writer.flush()`` takes (the scan file complete);
* dropped frames: frames in the detector file and linked in the scan file against N,
  frames the IOC handed out late (``cam1:LateFrames_RBV``), and whether the per-frame
  ``phi`` NDAttribute is regular (no frame missing from the rotation).

Correctness in the same run: the scan file links all N frames, equal to the IOC's file.

    python benchmarks/bench_epics.py [--rates 10,100] [--seconds 3] [--api ophyd] [--json out.json]

``--api ophyd`` flies the same rotations with the ophyd v1 devices behind the thin
adapter of :mod:`nxrefine_bs.devices.epics_v1` instead of ophyd-async's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402, F401  (pins one thread per process before numpy/numba)
import h5py  # noqa: E402
import numpy as np  # noqa: E402


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_ioc(prefix: str, shape: str) -> subprocess.Popen:
    env = {
        "EPICS_CA_SERVER_PORT": str(free_port()),
        "EPICS_CA_REPEATER_PORT": str(free_port()),
        "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
        "EPICS_CA_ADDR_LIST": "127.0.0.1",
        "EPICS_CA_AUTO_ADDR_LIST": "NO",
        "EPICS_CAS_BEACON_ADDR_LIST": "127.0.0.1",
        "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
    }
    os.environ.update(env)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nxrefine_bs.cli",
            "ioc",
            "--prefix",
            prefix,
            "--shape",
            shape,
            "--watch-pid",
            str(os.getpid()),
        ],
        env=dict(os.environ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    from caproto.sync.client import read

    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError("the IOC exited")
        try:
            read(f"{prefix}DET:cam1:DetectorState_RBV", timeout=0.5, repeater=False)
            return proc
        except TimeoutError:
            if time.monotonic() > deadline:
                proc.terminate()
                raise


class TimedWriter:
    """The NeXus writer with the time spent in its callback accumulated."""

    def __init__(self, writer) -> None:
        self.writer = writer
        self.seconds = 0.0

    def __call__(self, name, doc) -> None:
        t0 = time.perf_counter()
        self.writer(name, doc)
        self.seconds += time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", default="10,100", help="frame rates (Hz)")
    p.add_argument("--seconds", type=float, default=3.0, help="acquisition time per rotation")
    p.add_argument("--shape", default="96,128", help="detector shape NY,NX")
    p.add_argument("--api", default="ophyd-async", choices=("ophyd-async", "ophyd"))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    rates = [float(r) for r in args.rates.split(",")]

    from bluesky.run_engine import call_in_bluesky_event_loop
    from caproto.sync.client import read

    from nxrefine_bs.callbacks.isolation import BeamlineRunEngine
    from nxrefine_bs.callbacks.nexus_writer import NeXusScanWriter
    from nxrefine_bs.devices.beamline import default_geometry, detector_model
    from nxrefine_bs.devices.epics import connect_epics_beamline, make_epics_beamline
    from nxrefine_bs.experiment import Experiment
    from nxrefine_bs.plans import rotation_scan

    prefix = "BENCH:"
    shape = tuple(int(v) for v in args.shape.split(","))
    proc = start_ioc(prefix, args.shape)
    results = []
    ok = True
    try:
        with tempfile.TemporaryDirectory(prefix="bench-epics-") as tmp:
            os.environ.setdefault("NXREFINE_BS_SETTINGS", str(Path(tmp) / "server"))
            exp = Experiment.create(Path(tmp) / "analysis", "exp", beamline="sim").directory
            model = detector_model("small", shape)
            devices = make_epics_beamline(
                exp, prefix=prefix, geometry=default_geometry(model), detector_model=model,
                api=args.api,
            )  # fmt: skip
            RE = BeamlineRunEngine({})
            call_in_bluesky_event_loop(connect_epics_beamline(devices, timeout=10))
            writer = NeXusScanWriter()
            timed = TimedWriter(writer)
            RE.subscribe(timed, critical=True)
            docs: dict[str, float] = {}
            RE.subscribe(
                lambda name, doc: (
                    docs.__setitem__(name, doc["time"]) if name in ("start", "stop") else None
                )
            )
            for rate in rates:
                frame_time = 1.0 / rate
                n = max(10, round(args.seconds * rate))
                step = 0.5
                timed.seconds = 0.0
                late0 = read(f"{prefix}DET:cam1:LateFrames_RBV", repeater=False).data[0]
                t0 = time.perf_counter()
                RE(
                    rotation_scan(
                        devices, experiment_dir=exp, sample="bench", label="xtal1",
                        scan=f"{int(rate)}Hz", phi_start=0.0, phi_end=n * step, phi_step=step,
                        frame_time=frame_time,
                    )
                )  # fmt: skip
                wall = time.perf_counter() - t0
                t1 = time.perf_counter()
                assert writer.flush(120)
                flush = time.perf_counter() - t1
                late = int(read(f"{prefix}DET:cam1:LateFrames_RBV", repeater=False).data[0] - late0)
                scan_file = exp / "bench" / "xtal1" / f"bench_{int(rate)}Hz.nxs"
                raw = scan_file.parent / f"{int(rate)}Hz" / "f1.h5"
                with h5py.File(raw, "r") as f:
                    raw_frames = f["/entry/data/data"].shape[0]
                    phi = f["/entry/instrument/NDAttributes/phi"][()]
                    raw_last = f["/entry/data/data"][-1]
                with h5py.File(scan_file, "r") as f:
                    linked = f["f1/data/data"].shape[0]
                    same = bool(np.array_equal(f["f1/data/data"][-1], raw_last))
                gaps = np.diff(phi)
                regular = bool(np.all(np.abs(gaps - step) < 0.5 * step))
                yardstick = n * frame_time
                window = docs["stop"] - docs["start"]
                row = {
                    "api": args.api,
                    "rate_hz": rate,
                    "frames": n,
                    "yardstick_s": yardstick,
                    "wall_s": round(wall, 3),
                    "wall_over_yardstick": round(wall / yardstick, 3),
                    "run_window_over_yardstick": round(window / yardstick, 3),
                    "run_overhead_s": round(window - yardstick, 3),
                    "plan_overhead_ms_per_frame": round(1000 * (wall - yardstick) / n, 2),
                    "writer_cpu_ms_per_frame": round(1000 * timed.seconds / n, 3),
                    "writer_flush_after_run_s": round(flush, 3),
                    "frames_in_file": raw_frames,
                    "frames_linked": linked,
                    "dropped": n - raw_frames,
                    "late_frames": late,
                    "phi_regular": regular,
                    "scan_file_matches_raw": same,
                }
                ok &= raw_frames == n and linked == n and same and regular
                results.append(row)
                print(json.dumps(row))
            RE.halt() if RE.state != "idle" else None
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print("OK" if ok else "FAILED: frames missing or scan file differs")
    return 0 if ok else 1


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    sys.exit(main())
