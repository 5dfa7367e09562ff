"""nxrefine-bs EPICS beamline profile, part 4: say what the session holds."""

import time

print(
    "\n".join(
        [
            "",
            f"nxrefine-bs EPICS beamline ({bl.api} over Channel Access)",  # noqa: F821
            f"  experiment: {EXPERIMENT_DIR}",  # noqa: F821  (00-base.py)
            "  PVs: " + ", ".join(f"{k}={v}" for k, v in sorted(bl.prefixes.items())),  # noqa: F821
            f"  detector: {DETECTOR_DRIVER} driver, {DETECTOR_MODEL.name}",  # noqa: F821
            "  plans: rotation_scan, multi_rotation_scan, temperature_series, reduce_scan ...",
            "  try:   RE(temperature_series(bl, [300, 290], **SCAN, sample='demo',",
            "                               label='xtal1', phi_start=0, phi_end=10, phi_step=0.5))",
            f"  (startup took {time.perf_counter() - _PROFILE_T0:.1f} s)",  # noqa: F821
        ]
    )
)
