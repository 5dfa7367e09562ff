"""The simulated-beamline demonstration: ``nxrefine-bs demo DIR``.

One command does what a beamline day does, on the embedded simulated beamline:

1. create an experiment ``DIR/demo/nxrefine`` (tasks, configurations...) with
   reduction settings in ``tasks/settings.ini``;
2. build a configuration template from a pyFAI detector definition (Pilatus 300K by
   default) with three rotation positions;
3. create the scan files of a temperature series (the first temperature's scan is the
   parent of the others);
4. run the temperature series on the RunEngine: for each temperature, three continuous
   rotations whose frames hold physically correct Bragg peaks and diffuse scattering;
   the NeXus writer fills ``<sample>_<scan>.nxs`` while the detector writes ``fN.h5``;
5. reduce every rotation as soon as it ends (find maximum, find peaks, orientation,
   transform to HKL, combine) on a background thread, tracked in the workflow database;
6. archive the runs in the experiment's embedded Tiled catalog and register the
   processed scans there, searchable by sample, temperature and lattice;
7. save a PNG of the (H, K, 0) plane of each temperature's merged transform.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ExperimentError
from .experiment import Experiment, scan_directory_name
from .geometry import Geometry
from .nexus.scanfile import create_scan_file, update_scan_file
from .nexus.template import Position, create_configuration
from .reduce.lattice import Lattice, write_lattice
from .simulation.crystal import SimCrystal
from .simulation.frames import DetectorModel

logger = logging.getLogger(__name__)

__all__ = ["DemoResult", "run_demo"]

MARKER = ".nxrefine-bs-demo"
SAMPLE, LABEL = "demo", "xtal1"


@dataclass
class DemoResult:
    """What the demo produced."""

    experiment_dir: Path
    scan_files: list[Path]
    run_uids: list[str]
    reduction: list[Any] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    processed: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _prepare_directory(directory: Path, overwrite: bool) -> Path:
    home = directory / "demo"
    if home.exists():
        if not overwrite:
            raise ExperimentError(
                f"{home} already exists; choose another directory or pass --overwrite "
                "to replace the previous demo"
            )
        if not (home / "nxrefine" / MARKER).exists():
            raise ExperimentError(
                f"{home} was not made by 'nxrefine-bs demo'; refusing to delete it"
            )
        shutil.rmtree(home)
    return home


def run_demo(
    directory: str | Path,
    *,
    detector: str = "Pilatus 300K",
    temperatures: Sequence[float] = (300.0, 100.0),
    omegas: Sequence[float] = (0.0, 15.0, -15.0),
    phi_start: float = -5.0,
    phi_end: float = 175.0,
    phi_step: float = 1.0,
    grid_step: float = 0.05,
    reduce: bool = True,
    tiled: bool = True,
    progress: bool = True,
    overwrite: bool = False,
    seed: int = 0,
    frame_time: float = 0.01,
) -> DemoResult:
    """Run the whole simulated experiment; see the module docstring.

    Parameters
    ----------
    directory : path-like
        Where to create the ``demo`` experiment (the analysis home).
    detector : str
        pyFAI detector name.
    temperatures : sequence of float
        Temperatures of the series (K).
    omegas : sequence of float
        Goniometer omega of each rotation (one rotation per value).
    phi_start, phi_end, phi_step : float
        Rotation range and step (degrees).
    grid_step : float
        HKL grid step (r.l.u.) of the transforms.
    reduce : bool
        Run the post-scan reduction.
    tiled : bool
        Archive runs and processed scans in the embedded Tiled catalog.
    progress : bool
        Show progress bars.
    overwrite : bool
        Replace a previous demo in ``directory``.
    seed : int
        Seed of the simulation.
    frame_time : float
        Simulated exposure per frame (s); the simulated detector keeps this pace.
    """
    from .plans.rotation import temperature_series
    from .session import start_session
    from .settings import update_settings

    t0 = time.perf_counter()
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    _prepare_directory(directory, overwrite)
    exp = Experiment.create(directory, "demo", analysis_path="nxrefine", beamline="sim")
    (exp.directory / MARKER).write_text("created by nxrefine-bs demo\n")
    update_settings(
        exp.settings_file,
        {
            "nxreduce.threshold": 400,
            "nxreduce.min_pixels": 4,
            "nxreduce.first_frame": 2,
            "nxreduce.last_frame": "",
            "nxreduce.polar_max": 30.0,
        },
    )

    model = DetectorModel.from_pyfai(detector)
    ny, nx = model.shape
    geometry = Geometry(
        wavelength=0.3,
        distance=200.0,
        pixel_size=model.pixel_size,
        shape=model.shape,
        beam_center_x=nx / 2 + 0.3,
        beam_center_y=ny / 2 - 0.4,
        chi=-90.0,
        phi_start=phi_start,
        phi_step=phi_step,
    )
    config = create_configuration(
        exp.configurations_dir / "demo.nxs",
        detector=detector,
        wavelength=geometry.wavelength,
        distance=geometry.distance,
        phi_start=phi_start,
        phi_step=phi_step,
        phi_end=phi_end,
        frame_rate=10.0,
        positions=[
            Position(chi=-90.0, omega=omega, theta=0.0, x=0.0, y=5.0 * k)
            for k, omega in enumerate(omegas)
        ],
        beam_center_x=geometry.beam_center_x,
        beam_center_y=geometry.beam_center_y,
        instrument_name="simulated",
        facility="nxrefine-bs",
    )
    scans = [scan_directory_name(t) for t in temperatures]
    parent = None
    scan_files = []
    for temperature, scan in zip(temperatures, scans, strict=True):
        exp.new_sample(SAMPLE, LABEL)
        path = create_scan_file(
            config,
            exp.directory,
            SAMPLE,
            LABEL,
            scan,
            temperature=temperature,
            parent=parent,
        )
        parent = parent or path
        scan_files.append(path)
    lattice = Lattice.from_space_group("F m -3 m", 5.43)
    for path in scan_files:  # "Define Lattice": every scan knows the cell and space group
        with update_scan_file(path) as f:
            write_lattice(f["entry/sample"], lattice)

    crystal = SimCrystal.random((5.43, 5.43, 5.43, 90.0, 90.0, 90.0), centring="F", seed=seed)
    g_max = 0.8 * geometry.q_max() * 5.43
    half = float(int(g_max) + 1)
    grid = (-half, grid_step, half)
    session = start_session(
        exp.directory,
        detector=model,
        geometry=geometry,
        crystal=crystal,
        seed=seed,
        reduce_steps=("max", "find", "refine", "transform", "combine") if reduce else (),
        reduce_params={"qh": grid, "qk": grid, "ql": grid},
        tiled=tiled,
        progress=progress,
        simulator_kwargs={"diffuse": 1.5, "max_intensity": 5.0e6},
    )
    result = DemoResult(exp.directory, scan_files, [])
    try:
        uids = session.RE(
            temperature_series(
                session.devices,
                list(temperatures),
                experiment_dir=exp.directory,
                sample=SAMPLE,
                label=LABEL,
                rotations=[{"omega": omega} for omega in omegas],
                phi_start=phi_start,
                phi_end=phi_end,
                phi_step=phi_step,
                configuration=config,
                frame_time=frame_time,
            )
        )
        # RE(...) returns the run uids (a tuple), or a RunEngineResult whose plan_result
        # holds them when the RunEngine was made with call_returns_result=True.
        uids = getattr(uids, "plan_result", uids)
        result.run_uids = list(uids or [])
        if session.progress is not None:
            session.progress.close()
        if session.reduction is not None:
            logger.info("waiting for the post-scan reduction to finish")
            result.reduction = session.reduction.wait()
            from .reduce.transform import plot_slice

            for scan_file in scan_files:
                transform = scan_file.parent / scan_file.stem.split("_", 1)[1] / "transform.nxs"
                if transform.exists():
                    png = transform.with_name("transform_hk0.png")
                    plot_slice(transform, axis="l", value=0.0, png=png)
                    result.plots.append(png)
        if session.tiled is not None:
            from .tiled.processed import register_experiment
            from .workflow.database import WorkflowDB

            registered = register_experiment(
                session.tiled, exp.directory, db=WorkflowDB(exp.directory)
            )
            result.processed = [str(k) for k in (registered or [])]
    finally:
        session.close()
    result.seconds = time.perf_counter() - t0
    return result
