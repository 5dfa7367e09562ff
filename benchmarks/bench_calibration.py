"""Zero-click powder calibration: accuracy from no hint, against pyFAI's own ring picking.

For each case a pyFAI-drawn calibrant image (Poisson noise, seeded) is calibrated from
only the calibrant, wavelength and detector (:func:`calibrate_powder`).  The yardstick,
run on the same image in the same process, is pyFAI's own picking and refinement
(``SingleGeometry.extract_cp`` + ``GeometryRefinement.refine3``, wavelength and rot3 fixed)
started from the *true* geometry, which is the best it can be given.  Reported per case:
errors of both against the truth (distance relative, beam centre px, yaw/pitch deg) and
wall times.  Gate: ``calibrate_powder`` meets distance <= 3e-5, centre <= 0.03 px,
tilts <= 0.015 deg in every case (exit status 1 otherwise).

    python benchmarks/bench_calibration.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import common  # noqa: I001, F401  (first of the third-party imports: pins threads)
import numpy as np

TARGETS = {"distance": 3e-5, "x": 0.03, "y": 0.03, "yaw": 0.015, "pitch": 0.015}

CASES = [
    # name, detector, calibrant, wavelength, (distance, x, y, yaw, pitch), ring FWHM deg
    ("P300K CeO2 narrow", "Pilatus 300k", "CeO2", 0.5, (150.0, 230.3, 330.7, 1.5, -2.0), 0.03),
    ("P300K LaB6", "Pilatus 300k", "LaB6", 0.63, (145.0, 200.3, 300.7, 1.1, -1.6), 0.1),
    ("P1M CeO2", "Pilatus 1M", "CeO2", 0.5, (250.0, 540.2, 470.6, -2.0, 1.2), 0.03),
    ("P1M LaB6", "Pilatus 1M", "LaB6", 0.4, (300.0, 420.8, 560.1, 0.8, 2.0), 0.05),
    ("E1M CeO2", "Eiger 1M", "CeO2", 0.5, (120.0, 560.4, 480.9, 2.0, -1.0), 0.03),
    ("E1M LaB6 edge", "Eiger 1M", "LaB6", 0.6, (130.0, 880.6, 400.3, -1.2, -2.0), 0.03),
    ("E1M CeO2 5 rings", "Eiger 1M", "CeO2", 0.5, (150.0, 515.2, 533.4, -1.7, 1.9), 0.03),
]


def _errors(nx: dict[str, float], truth: dict[str, float]) -> dict[str, float]:
    return {
        "distance": (nx["distance"] - truth["distance"]) / truth["distance"],
        "x": nx["beam_center_x"] - truth["beam_center_x"],
        "y": nx["beam_center_y"] - truth["beam_center_y"],
        "yaw": nx["yaw"] - truth["yaw"],
        "pitch": nx["pitch"] - truth["pitch"],
    }


def _pyfai(image, det, cal, poni) -> tuple[dict[str, float], float, int]:
    """pyFAI's extract_cp + refine3 from the true PONI: NXRefine parameters, time, points."""
    from pyFAI.geometry import Geometry
    from pyFAI.goniometer import SingleGeometry

    from nxrefine_bs.calibration import poni_to_nxrefine

    geo = Geometry(detector=det, wavelength=cal.wavelength, **poni)
    t0 = time.perf_counter()
    sg = SingleGeometry("bench", image=np.where(image < 0, 0, image), calibrant=cal,
                        detector=det, geometry=geo)  # fmt: skip
    sg.extract_cp(max_rings=20, pts_per_deg=1.0)
    gr = sg.geometry_refinement
    gr.refine3(fix=["rot3", "wavelength"])
    elapsed = time.perf_counter() - t0
    nx = poni_to_nxrefine(gr.dist, gr.poni1, gr.poni2, gr.rot1, gr.rot2, gr.rot3,
                          det.pixel1, det.pixel2)  # fmt: skip
    return nx, elapsed, len(gr.data)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="three cases only (CI smoke test)")
    p.add_argument("--json", type=Path, default=None, help="write results as JSON here")
    args = p.parse_args()
    logging.disable(logging.WARNING)

    from nxrefine_bs.calibration import calibrate_powder, nxrefine_to_poni, simulate_powder_image
    from nxrefine_bs.calibration.convert import get_calibrant, get_detector

    cases = CASES[::3] if args.quick else CASES
    rows, failed = [], []
    for name, detector, calibrant, wavelength, geo, fwhm in cases:
        det = get_detector(detector)
        truth = dict(zip(("distance", "beam_center_x", "beam_center_y", "yaw", "pitch"), geo,
                         strict=True), roll=0.0)  # fmt: skip
        poni = nxrefine_to_poni(**truth, pixel1=det.pixel1, pixel2=det.pixel2)
        image = simulate_powder_image(
            det, calibrant, wavelength=wavelength, distance_m=poni["dist"], poni1=poni["poni1"],
            poni2=poni["poni2"], rot1=poni["rot1"], rot2=poni["rot2"], rot3=poni["rot3"],
            seed=1, fwhm_deg=fwhm,
        )  # fmt: skip
        t0 = time.perf_counter()
        result = calibrate_powder(image, det, calibrant, wavelength=wavelength)
        ours_s = time.perf_counter() - t0
        ours = _errors(result.nxrefine_parameters(), truth)
        theirs_nx, theirs_s, theirs_n = _pyfai(image, det, get_calibrant(calibrant, wavelength),
                                               poni)  # fmt: skip
        theirs = _errors(theirs_nx, truth)
        over = [k for k, v in TARGETS.items() if abs(ours[k]) > v]
        if over:
            failed.append(f"{name}: {', '.join(over)}")
        rows.append({"case": name, "rings": result.n_rings, "points": result.n_points,
                     "rms_px": result.rms_pixels, "ours": ours, "ours_s": ours_s,
                     "pyfai": theirs, "pyfai_s": theirs_s, "pyfai_points": theirs_n})  # fmt: skip

    def fmt(e: dict[str, float]) -> str:
        return (f"{e['distance']:+.1e} | {max(abs(e['x']), abs(e['y'])):.4f} | "
                f"{max(abs(e['yaw']), abs(e['pitch'])):.4f}")  # fmt: skip

    print("| case | rings | rms px | ours: d rel / centre px / tilt deg | s | "
          "pyFAI extract_cp from truth: d rel / centre px / tilt deg | s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['rings']} | {r['rms_px']:.3f} | {fmt(r['ours'])} | "
              f"{r['ours_s']:.1f} | {fmt(r['pyfai'])} | {r['pyfai_s']:.1f} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if failed:
        print("FAILED targets:", "; ".join(failed))
        return 1
    print("all cases within distance 3e-5, centre 0.03 px, tilts 0.015 deg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
