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
7. save a PNG of the (H, K, 0) plane of each temperature's merged transform and
   summarise each temperature (:class:`TemperatureSummary`).

The temperature reaches the simulator through the devices: the temperature controller's
readback is read by the detector when it prepares each rotation.  The simulated crystal
(:data:`DEMO_THERMAL`) has Debye-Waller factors, thermal expansion, thermal diffuse
scattering and a charge-density wave below ``Tc = 200 K`` whose ``(1/2, 1/2, 0)``-type
superlattice reflections appear on cooling: in the HK0 PNGs and in the summary's
``superlattice / Bragg`` column (:func:`superlattice_signal`).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from numpy.typing import NDArray

from .errors import ExperimentError
from .experiment import Experiment, scan_directory_name
from .geometry import Geometry
from .nexus.provenance import process_done, read_process
from .nexus.scanfile import create_scan_file, update_scan_file
from .nexus.template import Position, create_configuration
from .plans.rotation import temperature_series
from .plots import plot_slice
from .reduce.lattice import Lattice, write_lattice
from .reduce.transform_io import read_transform
from .session import start_session
from .settings import update_settings
from .simulation.crystal import SimCrystal
from .simulation.frames import DetectorModel
from .simulation.thermal import CDW_VECTORS, ThermalModel
from .tiled.processed import register_experiment
from .workflow.database import WorkflowDB

logger = logging.getLogger(__name__)

__all__ = [
    "DEMO_THERMAL",
    "DemoResult",
    "TemperatureSummary",
    "run_demo",
    "summarise_scan",
    "superlattice_signal",
]

MARKER = ".nxrefine-bs-demo"
SAMPLE, LABEL = "demo", "xtal1"

DEMO_THERMAL = ThermalModel(
    reference_temperature=300.0,
    einstein_temperature=250.0,
    expansion=1.0e-5,
    tds=30.0,
    cdw_tc=200.0,
    cdw_beta=0.35,
    cdw_amplitude=0.04,
    cdw_vectors=CDW_VECTORS,
)
"""The demo crystal's temperature dependence: CDW below 200 K (TiSe2-like)."""


@dataclass
class TemperatureSummary:
    """What the reduction found at one temperature of the demo series.

    Attributes
    ----------
    temperature : float
        K.
    scan_file : Path
        ``<sample>_<scan>.nxs``.
    peaks : int
        Peaks found, all rotations together.
    indexed_fraction : float or None
        Indexed peaks / peaks used by the refinement, all rotations together.
    a, a_error : float or None
        Refined cell length (Angstrom) averaged over the rotations, and its standard
        error.
    superlattice : float or None
        Mean superlattice-reflection intensity over the mean Bragg intensity in the
        merged transform (:func:`superlattice_signal`).
    order_parameter : float
        CDW order parameter the simulator used at this temperature.
    png : Path or None
        The HK0 plane of the merged transform.
    """

    temperature: float
    scan_file: Path
    peaks: int = 0
    indexed_fraction: float | None = None
    a: float | None = None
    a_error: float | None = None
    superlattice: float | None = None
    order_parameter: float = 0.0
    png: Path | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready values."""
        return {
            "temperature": self.temperature,
            "scan_file": str(self.scan_file),
            "peaks": self.peaks,
            "indexed_fraction": self.indexed_fraction,
            "a": self.a,
            "a_error": self.a_error,
            "superlattice_over_bragg": self.superlattice,
            "order_parameter": self.order_parameter,
            "png": None if self.png is None else str(self.png),
        }


@dataclass
class DemoResult:
    """What the demo produced."""

    experiment_dir: Path
    scan_files: list[Path]
    run_uids: list[str]
    reduction: list[Any] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    processed: list[str] = field(default_factory=list)
    summary: list[TemperatureSummary] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no reprs of internal objects)."""
        return {
            "experiment_dir": str(self.experiment_dir),
            "scan_files": [str(p) for p in self.scan_files],
            "run_uids": list(self.run_uids),
            "steps_failed": [
                f"{o.step}:{o.entry}"
                for r in self.reduction
                for o in getattr(r, "outcomes", [])
                if not getattr(o, "ok", True)
            ],
            "plots": [str(p) for p in self.plots],
            "processed": list(self.processed),
            "temperatures": [t.as_dict() for t in self.summary],
            "seconds": round(self.seconds, 1),
        }


def superlattice_signal(
    transform_file: str | Path,
    *,
    centring: str = "F",
    vectors: Sequence[Sequence[float]] = CDW_VECTORS,
) -> tuple[float, float]:
    """Mean integrated intensity of superlattice and of Bragg reflections.

    Every allowed reciprocal-lattice point ``G`` (``centring``) inside the grid and every
    ``G ± q`` (``q`` in ``vectors``) is measured in the merged transform: the sum over
    the 3x3x3 voxels around the position minus 27 times the mean of the rest of the
    7x7x7 box (the local background; for a step of 0.1 r.l.u. the box reaches 0.3
    r.l.u. from the position).  Positions whose box holds unmeasured voxels are skipped.
    Without a superlattice the first value scatters around zero.

    Returns
    -------
    superlattice, bragg : float
        Mean integrated intensities (NaN when no position was measured).
    """
    grid, f = read_transform(transform_file)
    with f:
        data = f["entry/data"]
        if "data" in data:
            arr = np.asarray(data["data"][()], dtype=np.float64)
        else:
            v = np.asarray(data["v"][()], dtype=np.float64)
            n = np.asarray(data["n"][()], dtype=np.float64)
            arr = np.divide(v, n, out=np.full_like(v, np.nan), where=n > 0)
    arr = np.where(np.isfinite(arr) & (arr > 0), arr, np.nan)
    axes = [grid.h, grid.k, grid.l]
    lo = np.array([a.start for a in axes])
    hi = np.array([a.stop for a in axes])
    step = np.array([a.step for a in axes])
    box = int(np.ceil(0.3 / step.min()))
    ranges = [
        np.arange(np.ceil(a + 0.3), np.floor(b - 0.3) + 1) for a, b in zip(lo, hi, strict=True)
    ]
    g = np.stack(np.meshgrid(*ranges, indexing="ij"), -1).reshape(-1, 3)
    probe = SimCrystal(cell=(1.0, 1.0, 1.0, 90.0, 90.0, 90.0), centring=centring)
    g = g[probe.allowed(g) & np.any(g != 0, axis=1)]
    q = np.asarray(vectors, dtype=np.float64).reshape(-1, 3)
    sat = (g[:, None, :] + np.concatenate([q, -q])[None]).reshape(-1, 3)
    sat = np.unique(np.round(sat, 6), axis=0)

    def mean_signal(points: NDArray[np.float64]) -> float:
        values = []
        for p in points:
            i = np.rint((p - lo) / step).astype(int)  # (h, k, l) index; storage is [l, k, h]
            sl = tuple(slice(i[j] - box, i[j] + box + 1) for j in (2, 1, 0))
            if any(s.start < 0 for s in sl):
                continue
            cube = arr[sl]
            if cube.shape != (2 * box + 1,) * 3 or np.isnan(cube).any():
                continue
            core = cube[box - 1 : box + 2, box - 1 : box + 2, box - 1 : box + 2].sum()
            shell = (cube.sum() - core) / (cube.size - 27)
            values.append(core - 27.0 * shell)
        return float(np.mean(values)) if values else float("nan")

    inside = np.all((sat >= lo + 0.3) & (sat <= hi - 0.3), axis=1)
    return mean_signal(sat[inside]), mean_signal(g)


def summarise_scan(
    scan_file: Path,
    temperature: float,
    png: Path | None = None,
    thermal: ThermalModel | None = DEMO_THERMAL,
) -> TemperatureSummary:
    """Collect peaks, indexing, refined cell and superlattice signal of one scan.

    ``thermal`` is the model the simulator used (for the order parameter column).
    """
    out = TemperatureSummary(
        temperature=float(temperature),
        scan_file=scan_file,
        order_parameter=0.0 if thermal is None else thermal.order_parameter(temperature),
        png=png,
    )
    cells, errors = [], []
    n_indexed = n_used = 0
    with h5py.File(scan_file, "r") as f:
        for entry in sorted(k for k in f if k != "entry"):
            if process_done(f[entry], "nxfind"):
                found = read_process(f[entry], "nxfind") or {}
                out.peaks += int(found["summary"].get("npeaks", 0))
            if process_done(f[entry], "nxrefine"):
                summary = (read_process(f[entry], "nxrefine") or {})["summary"]
                n_indexed += int(summary.get("n_indexed", 0))
                n_used += int(summary.get("n_used", 0))
                cells.append(float(summary["cell"][0]))
                errors.append(float((summary.get("errors") or {}).get("a", np.nan)))
    if n_used:
        out.indexed_fraction = n_indexed / n_used
    if cells:
        out.a = float(np.mean(cells))
        out.a_error = float(np.sqrt(np.nansum(np.square(errors))) / len(cells))
    transform = scan_file.parent / scan_file.stem.split("_", 1)[1] / "transform.nxs"
    if transform.exists():
        sat, bragg = superlattice_signal(transform)
        if np.isfinite(sat) and np.isfinite(bragg) and bragg > 0:
            out.superlattice = sat / bragg
    return out


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
    grid_step: float = 0.1,
    reduce: bool = True,
    tiled: bool = True,
    progress: bool = True,
    overwrite: bool = False,
    seed: int = 0,
    frame_time: float = 0.01,
    thermal: ThermalModel | None = DEMO_THERMAL,
    compression: str | None = "gzip",
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
    thermal : ThermalModel, optional
        Temperature dependence of the simulated crystal (default :data:`DEMO_THERMAL`;
        None: every temperature gives the same frames).
    compression : str, optional
        h5py compression of the detector files (None: uncompressed).
    """
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
        simulator_kwargs={"diffuse": 1.5, "max_intensity": 5.0e6, "thermal": thermal},
        compression=compression,
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
        result.run_uids = [str(u) for u in (uids or [])]  # type: ignore[union-attr]
        if session.progress is not None:
            session.progress.close()
        if session.reduction is not None:
            logger.info("waiting for the post-scan reduction to finish")
            result.reduction = session.reduction.wait()

            for scan_file, temperature in zip(scan_files, temperatures, strict=True):
                transform = scan_file.parent / scan_file.stem.split("_", 1)[1] / "transform.nxs"
                png = None
                if transform.exists():
                    png = transform.with_name("transform_hk0.png")
                    plot_slice(
                        transform,
                        axis="l",
                        value=0.0,
                        png=png,
                        title=f"{SAMPLE} {LABEL}, T = {temperature:g} K",
                    )
                    result.plots.append(png)
                result.summary.append(summarise_scan(scan_file, temperature, png, thermal))
        if session.tiled is not None:
            registered = register_experiment(
                session.tiled, exp.directory, db=WorkflowDB(exp.directory)
            )
            result.processed = [str(k) for k in (registered or [])]
    finally:
        session.close()
    result.seconds = time.perf_counter() - t0
    return result
