"""Write a complete simulated scan (scan file + detector stacks) without a RunEngine.

This is the quickest way to get realistic, seeded test data for the reduction steps
and benchmarks.  The acquisition path (devices, plans and the NeXus writer callback)
produces the same layout from live documents.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..geometry import Geometry
from ..nexus.geometry_io import (
    write_cell,
    write_geometry,
    write_orientation,
    write_pyfai_parameters,
)
from ..nexus.h5tools import nx_group, write_external_link, write_field
from .crystal import SimCrystal
from .frames import DetectorModel, PeakTable, RotationSimulator

logger = logging.getLogger(__name__)

__all__ = ["SimulatedScan", "make_simulated_scan", "small_test_setup"]


@dataclass
class SimulatedScan:
    """A simulated scan on disk and its ground truth."""

    scan_file: Path
    scan_dir: Path
    crystal: SimCrystal
    geometries: dict[str, Geometry]
    simulators: dict[str, RotationSimulator]

    def truth(self, entry: str) -> PeakTable:
        """Injected peaks of rotation ``entry``."""
        return self.simulators[entry].peaks


def small_test_setup(
    *,
    shape: tuple[int, int] = (195, 235),
    n_frames: int = 360,
    cell: tuple[float, ...] = (5.43, 5.43, 5.43, 90.0, 90.0, 90.0),
    centring: str = "F",
    seed: int = 0,
) -> tuple[Geometry, SimCrystal, DetectorModel, int]:
    """A small but realistic set-up for fast tests: 0.5 deg/frame over 180 degrees."""
    det = DetectorModel.synthetic(shape, pixel_size=0.6)
    geom = Geometry(
        wavelength=0.3,
        distance=150.0,
        pixel_size=det.pixel_size,
        shape=det.shape,
        beam_center_x=shape[1] / 2 + 0.3,
        beam_center_y=shape[0] / 2 - 0.4,
        chi=-90.0,
        phi_start=-5.0,
        phi_step=0.5,
    )
    crystal = SimCrystal.random(tuple(cell), centring=centring, seed=seed)  # type: ignore[arg-type]
    return geom, crystal, det, n_frames


def make_simulated_scan(
    directory: str | Path,
    *,
    sample: str = "sim",
    label: str = "xtal1",
    scan: str = "300K",
    temperature: float = 300.0,
    geometry: Geometry | None = None,
    crystal: SimCrystal | None = None,
    detector: DetectorModel | None = None,
    n_frames: int | None = None,
    omegas: Sequence[float] = (0.0,),
    seed: int = 0,
    write_truth_orientation: bool = False,
    progress: bool = False,
    compression: str | None = None,
    **simulator_kwargs: Any,
) -> SimulatedScan:
    """Create ``<directory>/<sample>/<label>/<sample>_<scan>.nxs`` and ``<scan>/fN.h5``.

    One rotation entry ``fN`` is written per value in ``omegas`` (the goniometer omega
    of that rotation), each with its own noise seed.  The unit cell is stored in
    ``entry/sample``; the true orientation only if ``write_truth_orientation``.
    ``temperature`` is recorded and, with a ``thermal`` model among the simulator
    options, changes the frames (:mod:`nxrefine_bs.simulation.thermal`).
    ``compression`` writes the detector stacks compressed (e.g. ``"bslz4"``, as Eiger
    and many Pilatus set-ups do; see :func:`nxrefine_bs.nexus.codecs.compression_options`).
    """
    g0, c0, d0, n0 = small_test_setup(seed=seed)
    geometry = geometry or g0
    crystal = crystal or c0
    detector = detector or d0
    n_frames = n_frames or n0
    label_dir = Path(directory) / sample / label
    scan_dir = label_dir / scan
    scan_dir.mkdir(parents=True, exist_ok=True)
    scan_file = label_dir / f"{sample}_{scan}.nxs"
    geometries: dict[str, Geometry] = {}
    sims: dict[str, RotationSimulator] = {}
    with h5py.File(scan_file, "w") as f:
        f.attrs["default"] = "entry"
        entry = nx_group(f, "entry", "NXentry")
        sample_grp = nx_group(entry, "sample", "NXsample")
        write_field(sample_grp, "name", sample)
        write_field(sample_grp, "label", label)
        write_field(sample_grp, "temperature", float(temperature), units="K")
        write_cell(sample_grp, crystal.cell)
        write_field(sample_grp, "lattice_centring", crystal.centring)
        for n, omega in enumerate(omegas, start=1):
            name = f"f{n}"
            geom = geometry.replace(omega=float(omega))
            sim = RotationSimulator(
                geom,
                crystal,
                detector,
                n_frames,
                seed=seed * 100 + n,
                temperature=temperature,
                **simulator_kwargs,
            )
            geometries[name], sims[name] = geom, sim
            fe = nx_group(f, name, "NXentry")
            write_geometry(fe, geom, phi_end=float(geom.phi(n_frames)))
            write_pyfai_parameters(fe, geom)  # what NXRefine's radial sum reads
            det = fe["instrument/detector"]
            write_field(det, "description", detector.name)
            write_field(det, "pixel_mask", detector.mask.astype(np.int8))
            write_field(det, "pixel_mask_applied", False)
            write_field(det, "frame_time", 0.1, units="s")
            if write_truth_orientation:
                write_orientation(fe, crystal.U)
            fe["sample"] = sample_grp
            data = nx_group(fe, "data", "NXdata")
            data.attrs["signal"] = "data"
            data.attrs["axes"] = ["frame_number", "y_pixel", "x_pixel"]
            write_external_link(data, "data", scan_dir / f"{name}.h5", "/entry/data/data")
            write_field(data, "frame_number", np.arange(n_frames, dtype=np.int32))
            write_field(data, "x_pixel", np.arange(detector.shape[1], dtype=np.int32))
            write_field(data, "y_pixel", np.arange(detector.shape[0], dtype=np.int32))
            write_field(data, "frame_time", 0.1 * np.arange(n_frames), units="s")
            mon = nx_group(fe, "monitor", "NXmonitor")
            write_field(mon, "MCS1", sim.monitor)
            write_field(mon, "frame_number", np.arange(n_frames, dtype=np.int32))
            mon.attrs["signal"] = "MCS1"
            mon.attrs["axes"] = "frame_number"
    for name, sim in sims.items():
        sim.write_stack(
            scan_dir / f"{name}.h5", progress=progress, overwrite=True, compression=compression
        )
    logger.info("simulated scan %s with %d rotations", scan_file, len(sims))
    return SimulatedScan(scan_file, scan_dir, crystal, geometries, sims)
