"""nxrefine-bs simulated beamline profile, part 4: say what the session holds."""

import time


def _banner() -> str:
    """A summary of the session: experiment, detector, callbacks and how to start.

    Returns
    -------
    str
        The text printed when IPython starts.
    """
    g = GEOMETRY  # noqa: F821  (00-base.py)
    where = "experiment"
    if EXPERIMENT_IS_TEMPORARY:  # noqa: F821  (00-base.py)
        kept = "kept" if KEEP_EXPERIMENT else "removed at exit; NXREFINE_BS_KEEP=1 keeps it"  # noqa: F821
        where = f"temporary demo experiment ({kept})"
    callbacks = ["NeXus scan-file writer (writer)"]
    if reduction is not None:  # noqa: F821  (10-session.py)
        callbacks.append(f"post-scan reduction {','.join(reduction.steps)} (reduction)")  # noqa: F821
    if tiled is not None:  # noqa: F821
        callbacks.append("Tiled archive (tiled)")
    lines = [
        "nxrefine-bs simulated beamline",
        f"  {where}: {EXPERIMENT_DIR}",  # noqa: F821
        f"  detector: {DETECTOR_MODEL.name} {DETECTOR_MODEL.shape[0]}x{DETECTOR_MODEL.shape[1]}"  # noqa: F821
        f"  ({g.wavelength:g} A, {g.distance:g} mm, chi {g.chi:g} deg)",
        f"  configuration: {CONFIGURATION or 'none (scan files without a template)'}",  # noqa: F821
        f"  callbacks: {'; '.join(callbacks)}",
        "  devices: bl.goniometer (phi chi omega theta), bl.detector, bl.monitors, "
        "bl.temperature, bl.detector_stage",
        "  plans: rotation_scan, step_rotation_scan, multi_rotation_scan, temperature_series,",
        "         reduce_scan, find_maximum, find_peaks, refine_orientation, transform, combine",
        "  try:   RE(rotation_scan(bl, **SCAN, sample='demo', label='xtal1', scan='300K',",
        "                          phi_start=0, phi_end=5, phi_step=0.1))",
        "         writer.last_scan_file",
        f"  (startup took {time.perf_counter() - _PROFILE_T0:.1f} s)",  # noqa: F821
    ]
    return "\n".join(lines)


print("\n" + _banner())
