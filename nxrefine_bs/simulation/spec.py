r"""Write a QM2-like raw tree (SPEC file + CBF/TIFF image directories) from the simulator.

The tree looks like what the QM2 beamline at CHESS leaves behind::

    <spec_file>                                          SPEC log of the sample
    <raw_directory>/<sample>/<label>/<scan>/<sample>_NNN/<sample>_NNN_00001.cbf ...

with one image directory per rotation, ``NNN`` being its SPEC scan number.  Each
SPEC scan has the command ``flyangle phi START END N COUNT_TIME``, the motor
positions ``phi  chi  th  Two Theta`` and ``sample x  sample y  sample z`` (names
separated by two spaces and holding single spaces, as SPEC writes them; ``chi`` in
SPEC convention: ``90 - chi`` of nxrefine-bs) and one data row per frame with the
columns ``phi  Epoch  Seconds  flyc1  flyc2  sampleT``, optionally followed by an MCA
spectrum (``@A`` lines continued with ``\``).  Frames are the seeded
:class:`~nxrefine_bs.simulation.frames.RotationSimulator` frames (int32, gaps -1),
so a test can compare an import with the simulator frame by frame.

Examples
--------
>>> import tempfile, pathlib
>>> with tempfile.TemporaryDirectory() as d:
...     tree = make_qm2_raw_tree(pathlib.Path(d) / "raw", n_frames=3, positions=[(-90, 0, 0)])
...     [r.image_dir.name for r in tree.rotations], len(tree.rotations[0].images)
(['sim_001'], 3)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from fabio.cbfimage import CbfImage
from fabio.tifimage import TifImage
from numpy.typing import NDArray

from ..geometry import Geometry
from .crystal import SimCrystal
from .frames import DetectorModel, RotationSimulator

__all__ = ["SimulatedRotation", "SimulatedRawTree", "make_qm2_raw_tree", "SPEC_COLUMNS"]

logger = logging.getLogger(__name__)

SPEC_COLUMNS: tuple[str, ...] = ("phi", "Epoch", "Seconds", "flyc1", "flyc2", "sampleT")
"""Data columns written for every frame."""

SPEC_DATE_FORMAT = "%a %b %d %H:%M:%S %Y"

SPEC_MOTORS: tuple[tuple[str, ...], ...] = (
    ("phi", "chi", "th", "Two Theta"),
    ("sample x", "sample y", "sample z"),
)
"""Motor names of the ``#O0`` and ``#O1`` lines."""

MCA_VALUES_PER_LINE = 16
r"""Values per ``@A`` line before SPEC continues it on the next line (``\``)."""


@dataclass(frozen=True)
class SimulatedRotation:
    """One simulated rotation: its simulator, images and the values written to SPEC.

    ``temperature``, ``flyc1`` and ``flyc2`` hold exactly the values written to the
    SPEC file (parsed back from their text).
    """

    scan: str
    entry: str
    scan_number: int
    simulator: RotationSimulator
    image_dir: Path
    images: tuple[Path, ...]
    spec_chi: float
    spec_th: float
    phi_start: float
    phi_end: float
    count_time: float
    date: datetime
    flyc1: NDArray[np.float64]
    flyc2: NDArray[np.float64]
    temperature: NDArray[np.float64]


@dataclass
class SimulatedRawTree:
    """A simulated raw tree and its ground truth."""

    raw_directory: Path
    spec_file: Path
    sample: str
    label: str
    crystal: SimCrystal
    rotations: list[SimulatedRotation] = field(default_factory=list)

    @property
    def scans(self) -> list[str]:
        """Scan directory names, in the order written."""
        return list(dict.fromkeys(r.scan for r in self.rotations))

    def scan(self, scan: str) -> list[SimulatedRotation]:
        """Rotations of scan directory ``scan`` (in entry order)."""
        out = [r for r in self.rotations if r.scan == scan]
        if not out:
            raise KeyError(f"no simulated scan {scan!r}; scans: {', '.join(self.scans)}")
        return out


def _default_detector() -> DetectorModel:
    return DetectorModel.synthetic((48, 40), pixel_size=0.6, modules=(2, 2), gap=(2, 2))


def _default_geometry(detector: DetectorModel) -> Geometry:
    ny, nx = detector.shape
    return Geometry(
        wavelength=0.3,
        distance=60.0,
        pixel_size=detector.pixel_size,
        shape=detector.shape,
        beam_center_x=nx / 2 + 0.3,
        beam_center_y=ny / 2 - 0.4,
        chi=-90.0,
        phi_start=-5.0,
        phi_step=0.5,
    )


def _text(value: float, fmt: str) -> tuple[str, float]:
    text = format(value, fmt)
    return text, float(text)


def _write_image(path: Path, frame: NDArray[np.int32], image_format: str) -> None:
    if image_format == "cbf":
        CbfImage(data=frame).write(str(path))
    else:
        TifImage(data=frame).write(str(path))


def _mca_lines(counts: NDArray[np.int64]) -> list[str]:
    """``@A`` lines of one spectrum, each full line continued with a backslash."""
    values = [str(int(v)) for v in counts]
    step = MCA_VALUES_PER_LINE
    chunks = [values[i : i + step] for i in range(0, len(values), step)]
    out = []
    for i, chunk in enumerate(chunks):
        text = ("@A " if i == 0 else " ") + " ".join(chunk)
        out.append(text + ("\\" if i < len(chunks) - 1 else ""))
    return out


def make_qm2_raw_tree(
    raw_directory: str | os.PathLike[str],
    *,
    spec_file: str | os.PathLike[str] | None = None,
    sample: str = "sim",
    label: str = "xtal1",
    scans: Mapping[str, float] | None = None,
    positions: Sequence[tuple[float, float, float]] = ((-90.0, 0.0, 0.0), (-90.0, 15.0, 0.0)),
    geometry: Geometry | None = None,
    crystal: SimCrystal | None = None,
    detector: DetectorModel | None = None,
    n_frames: int = 8,
    image_format: str = "cbf",
    first_scan_number: int = 1,
    count_time: float = 0.1,
    start: datetime | None = None,
    seed: int = 0,
    append: bool = False,
    header: bool | None = None,
    mca_channels: int = 0,
    **simulator_kwargs: Any,
) -> SimulatedRawTree:
    """Write a seeded QM2-like raw tree and its SPEC file.

    Parameters
    ----------
    raw_directory : path-like
        Root of the image tree (``raw_home/<experiment>/<raw_path>``).
    spec_file : path-like, optional
        The SPEC file (default ``<raw_directory>/<sample>/<sample>``).
    sample, label : str
        Names.
    scans : mapping, optional
        ``{scan directory: temperature}``; default ``{"300K": 300.0}``.  The temperature
        reaches the simulator (it changes the frames with a ``thermal`` model among the
        simulator options).
    positions : sequence of (chi, omega, theta)
        One rotation per position (nxrefine-bs angles, degrees); SPEC records
        ``chi`` as ``90 - chi`` and ``th`` as ``theta`` (omega is not logged).
    geometry, crystal, detector : optional
        Set-up of the simulator (default: a small synthetic detector with gaps).
        ``geometry.shape`` must equal ``detector.shape``.
    n_frames : int
        Frames per rotation.
    image_format : {'cbf', 'tif'}
        Image file format (written with fabio).
    first_scan_number : int
        SPEC number of the first rotation; the following ones count up.
    count_time : float
        Seconds per frame.
    start : datetime, optional
        Date of the first scan (default 2026-01-02 03:04:05); each rotation starts
        ten minutes after the previous one.
    seed : int
        Seed of the crystal and of every rotation's noise.
    append : bool
        Add scans to an existing SPEC file instead of refusing to replace it.
    header : bool, optional
        Write a file header (``#F``, ``#E``, ``#D``, ``#O`` lines) before the scans; by
        default only for a new file.  Pass True when appending to a file written by
        something else (SPEC starts a new header section the same way).
    mca_channels : int
        If above zero, every frame also gets an ``@A`` MCA spectrum of this many
        seeded counts, 16 values per line, each full line ending in a backslash.
    **simulator_kwargs
        Passed to :class:`RotationSimulator` (``max_intensity``, ``background``...).

    Returns
    -------
    SimulatedRawTree
        Paths and ground truth.

    Raises
    ------
    FileExistsError
        If an image directory exists, or the SPEC file exists and ``append`` is False.
    ValueError
        On an unknown image format.
    """
    if image_format not in ("cbf", "tif", "tiff"):
        raise ValueError(f"image_format must be 'cbf' or 'tif', got {image_format!r}")
    suffix = ".cbf" if image_format == "cbf" else ".tif"
    raw_directory = Path(raw_directory)
    spec_path = Path(spec_file) if spec_file is not None else raw_directory / sample / sample
    if spec_path.exists() and not append:
        raise FileExistsError(f"SPEC file {spec_path} exists; pass append=True to add scans")
    scans = dict(scans) if scans is not None else {"300K": 300.0}
    detector = detector or _default_detector()
    geometry = geometry or _default_geometry(detector)
    if crystal is None:
        crystal = SimCrystal.random((5.43, 5.43, 5.43, 90.0, 90.0, 90.0), centring="F", seed=seed)
    start = start or datetime(2026, 1, 2, 3, 4, 5)
    rng = np.random.default_rng([seed, 31337])
    tree = SimulatedRawTree(raw_directory, spec_path, sample, label, crystal)
    if mca_channels < 0:
        raise ValueError(f"mca_channels must be >= 0, got {mca_channels}")
    lines: list[str] = []
    if header if header is not None else not spec_path.exists():
        if spec_path.exists():
            lines.append("")
        lines += [
            f"#F {spec_path}",
            f"#E {int(start.timestamp())}",
            f"#D {start.strftime(SPEC_DATE_FORMAT)}",
            "#C qm2  User = nxrefine-bs simulator",
            *(f"#O{k}    " + "  ".join(names) for k, names in enumerate(SPEC_MOTORS)),
            "",
        ]
    number = first_scan_number
    for scan, temperature in scans.items():
        for k_rot, (chi, omega, theta) in enumerate(positions):
            entry = f"f{k_rot + 1}"
            geom = geometry.replace(chi=float(chi), omega=float(omega), theta=float(theta))
            sim = RotationSimulator(
                geom,
                crystal,
                detector,
                n_frames,
                seed=seed * 1000 + number,
                temperature=float(temperature),
                **simulator_kwargs,
            )
            image_dir = raw_directory / sample / label / scan / f"{sample}_{number:03d}"
            if image_dir.exists():
                raise FileExistsError(f"image directory {image_dir} exists; refusing to replace it")
            image_dir.mkdir(parents=True)
            images = []
            for i in range(n_frames):
                path = image_dir / f"{sample}_{number:03d}_{i + 1:05d}{suffix}"
                _write_image(path, sim.frame(i), image_format)
                images.append(path)
            date = start + timedelta(minutes=10 * (number - first_scan_number))
            spec_chi = 90.0 - float(chi)
            phi_start = float(geom.phi_start)
            phi_end = float(geom.phi(n_frames))
            flyc2 = np.round(sim.monitor * 0.02)
            temps = temperature + rng.normal(0.0, 0.05, n_frames)
            epoch0 = date.timestamp()
            lines += [
                f"#S {number}  flyangle phi {phi_start:.10g} {phi_end:.10g} {n_frames} "
                f"{count_time:g}",
                f"#D {date.strftime(SPEC_DATE_FORMAT)}",
                f"#T {count_time:g}  (Seconds)",
                "#G0 0 0 0 0",
                f"#P0 {phi_start:.10g} {spec_chi:.10g} {float(theta):.10g} 0",
                "#P1 0.25 -1.5 12",
                f"#N {len(SPEC_COLUMNS)}",
            ]
            if mca_channels:
                lines += [
                    f"#@MCA {MCA_VALUES_PER_LINE}C",
                    f"#@CHANN {mca_channels} 0 {mca_channels - 1} 1",
                ]
            lines.append("#L " + "  ".join(SPEC_COLUMNS))
            t_values = []
            for i in range(n_frames):
                t_text, t_value = _text(float(temps[i]), ".4f")
                t_values.append(t_value)
                row = [
                    format(float(sim.phi[i]), ".10g"),
                    format(epoch0 + count_time * i, ".3f"),
                    format(count_time, "g"),
                    str(int(sim.monitor[i])),
                    str(int(flyc2[i])),
                    t_text,
                ]
                lines.append(" ".join(row))
                if mca_channels:
                    lines += _mca_lines(rng.poisson(20.0, mca_channels))
                if i == n_frames // 2:
                    lines.append(f"#C {date.strftime('%H:%M:%S')}  halfway through the rotation")
            lines.append("")
            tree.rotations.append(
                SimulatedRotation(
                    scan=scan,
                    entry=entry,
                    scan_number=number,
                    simulator=sim,
                    image_dir=image_dir,
                    images=tuple(images),
                    spec_chi=spec_chi,
                    spec_th=float(theta),
                    phi_start=phi_start,
                    phi_end=phi_end,
                    count_time=float(count_time),
                    date=date,
                    flyc1=sim.monitor.copy(),
                    flyc2=flyc2.astype(np.float64),
                    temperature=np.asarray(t_values),
                )
            )
            number += 1
        logger.debug("simulated raw scan %s (%d rotations)", scan, len(positions))
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    with open(spec_path, "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    logger.info("wrote raw tree %s and SPEC file %s", raw_directory, spec_path)
    return tree
