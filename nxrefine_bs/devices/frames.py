"""Detector-side helpers shared by the ophyd-async and ophyd v1 simulated detectors.

* :func:`rotation_simulator` builds the :class:`~nxrefine_bs.simulation.frames.RotationSimulator`
  of one rotation from a configured :class:`~nxrefine_bs.geometry.Geometry` and the
  goniometer angles at acquisition time.
* :class:`FrameFile` is the HDF5 stack a Pilatus + areaDetector HDF5 plugin would write:
  ``/entry/data/data`` ``(n, ny, nx)`` int32, one frame per chunk, and per-frame
  NDAttributes ``/entry/instrument/NDAttributes/{MCS1, MCS2, phi}``; written with SWMR
  (``libver="latest"``, ``swmr_mode=True``) and flushed after every frame so readers
  that open it with ``h5py.File(path, "r", swmr=True)`` see the frames as they arrive.
* :class:`FrameSource` renders frame after frame from a simulator into a :class:`FrameFile`.

Neither class is thread-safe; each detector confines one to a single worker thread.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from numpy.typing import NDArray

from ..errors import FileExistsNXError, NXRefineBSError
from ..geometry import Geometry
from ..nexus.codecs import compression_options
from ..simulation.crystal import SimCrystal
from ..simulation.frames import DetectorModel, RotationSimulator

logger = logging.getLogger(__name__)

__all__ = [
    "DATA_PATH",
    "NDATTRIBUTES_PATH",
    "NDATTRIBUTES",
    "MCS2_RATIO",
    "FrameFile",
    "FrameSource",
    "rotation_simulator",
    "file_seed",
    "mcs2_counts",
    "file_uri",
]

DATA_PATH = "/entry/data/data"
"""Dataset of the frames in every detector file."""

NDATTRIBUTES_PATH = "/entry/instrument/NDAttributes"
"""Group of the per-frame scalar attributes (as the areaDetector HDF5 plugin writes them)."""

NDATTRIBUTES: tuple[str, ...] = ("MCS1", "MCS2", "phi")
"""Per-frame attributes written next to every frame: two monitors and the rotation angle."""

MCS2_RATIO = 0.2
"""Mean ratio of the second (downstream) monitor to the first."""


def file_seed(seed: int, file_name: str) -> int:
    """Noise seed of the detector file ``file_name`` for a detector seeded with ``seed``.

    ``fN`` files get ``seed * 100 + N``, the convention of
    :func:`nxrefine_bs.simulation.scan.make_simulated_scan`, so that the rotations of a
    multi-rotation scan have independent noise; other names get ``seed * 100``.

    Examples
    --------
    >>> file_seed(0, "f2"), file_seed(3, "f1"), file_seed(1, "dark")
    (2, 301, 100)
    """
    match = re.fullmatch(r"f(\d+)", Path(file_name).stem)
    return int(seed) * 100 + (int(match.group(1)) if match else 0)


def mcs2_counts(simulator: RotationSimulator) -> NDArray[np.float64]:
    """Counts of the second monitor: ``MCS2_RATIO`` x MCS1 with its own counting noise."""
    rng = np.random.default_rng([simulator.seed, 65537])
    return rng.poisson(simulator.monitor * MCS2_RATIO).astype(np.float64)


def file_uri(path: str | os.PathLike[str]) -> str:
    """``file://localhost/<absolute path>`` of a local file, as ophyd-async writes it.

    Examples
    --------
    >>> file_uri("/data/exp/TiSe2/xtal1/300K/f1.h5")
    'file://localhost/data/exp/TiSe2/xtal1/300K/f1.h5'
    """
    return "file://localhost" + Path(os.path.abspath(path)).as_posix()


def rotation_simulator(
    geometry: Geometry,
    crystal: SimCrystal,
    detector: DetectorModel,
    *,
    n_frames: int,
    phi_start: float,
    phi_step: float,
    chi: float | None = None,
    omega: float | None = None,
    theta: float | None = None,
    seed: int = 0,
    temperature: float | None = None,
    simulator_kwargs: Mapping[str, Any] | None = None,
) -> RotationSimulator:
    """The simulator of one rotation with the goniometer angles at acquisition time.

    Parameters
    ----------
    geometry : Geometry
        Configured geometry of the instrument (detector position, wavelength...).
    crystal : SimCrystal
        The sample.
    detector : DetectorModel
        Detector shape, pixel size and gaps (must match ``geometry.shape``).
    n_frames : int
        Number of frames of the rotation.
    phi_start, phi_step : float
        Rotation angle of frame 0 and step per frame (degrees).
    chi, omega, theta : float, optional
        Goniometer angles; ``None`` keeps the value of ``geometry``.
    seed : int
        Noise seed (see :func:`file_seed`).
    temperature : float, optional
        Sample temperature (K) at acquisition time; it changes the frames when
        ``simulator_kwargs`` holds a ``thermal`` model.
    simulator_kwargs : mapping, optional
        Further keyword arguments of :class:`RotationSimulator` (``max_intensity``...).

    Returns
    -------
    RotationSimulator
    """
    changes: dict[str, float] = {"phi_start": float(phi_start), "phi_step": float(phi_step)}
    for key, value in (("chi", chi), ("omega", omega), ("theta", theta)):
        if value is not None:
            changes[key] = float(value)
    return RotationSimulator(
        geometry.replace(**changes),
        crystal,
        detector,
        int(n_frames),
        seed=int(seed),
        temperature=temperature,
        **dict(simulator_kwargs or {}),
    )


class FrameFile:
    """An HDF5 frame stack written frame by frame in SWMR mode.

    Parameters
    ----------
    path : path-like
        File to create; an existing file is never overwritten.
    shape : tuple of int
        Frame shape ``(ny, nx)``.
    attributes : sequence of str
        Names of the per-frame scalar attributes (float64) under
        :data:`NDATTRIBUTES_PATH`.
    compression : str, optional
        Compression of the frames: ``None`` (uncompressed, as tests want) or a codec of
        :data:`nxrefine_bs.nexus.codecs.CODECS`, e.g. ``"bslz4"`` (bitshuffle-LZ4, what
        Eiger and many Pilatus set-ups write), ``"gzip"``, ``"lz4"``, ``"zstd"``.

    Raises
    ------
    FileExistsNXError
        If ``path`` exists (raw data are never overwritten).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        shape: tuple[int, int],
        *,
        attributes: Sequence[str] = NDATTRIBUTES,
        compression: str | None = None,
    ) -> None:
        self.path = Path(os.path.abspath(path))
        if self.path.exists():
            raise FileExistsNXError(
                f"detector file {self.path} exists; raw data are never overwritten - "
                "choose a new entry (fN) or scan name"
            )
        ny, nx = (int(v) for v in shape)
        self.shape = (ny, nx)
        self.attributes = tuple(attributes)
        try:
            self._file = h5py.File(self.path, "x", libver="latest")
        except (FileExistsError, BlockingIOError) as exc:
            raise FileExistsNXError(
                f"detector file {self.path} exists or is open elsewhere: {exc}"
            ) from exc
        try:
            f = self._file
            f.attrs["default"] = "entry"
            entry = f.create_group("entry")
            entry.attrs["NX_class"] = "NXentry"
            entry.attrs["default"] = "data"
            data = entry.create_group("data")
            data.attrs["NX_class"] = "NXdata"
            data.attrs["signal"] = "data"
            self._data = data.create_dataset(
                "data",
                shape=(0, ny, nx),
                maxshape=(None, ny, nx),
                chunks=(1, ny, nx),
                dtype=np.int32,
                **compression_options(compression),
            )
            instrument = entry.create_group("instrument")
            instrument.attrs["NX_class"] = "NXinstrument"
            ndattr = instrument.create_group("NDAttributes")
            ndattr.attrs["NX_class"] = "NXcollection"
            self._attrs: dict[str, h5py.Dataset] = {}
            for name in self.attributes:
                ds = ndattr.create_dataset(
                    name, shape=(0,), maxshape=(None,), chunks=(1024,), dtype=np.float64
                )
                if name == "phi":
                    ds.attrs["units"] = "degree"
                self._attrs[name] = ds
            # Everything is created: from now on readers may open the file with swmr=True.
            f.swmr_mode = True
        except BaseException:
            self._file.close()
            raise
        self.n_written = 0
        logger.debug("opened detector file %s for %s frames", self.path, self.shape)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return not bool(self._file)

    def append(self, frame: NDArray[Any], values: Mapping[str, float]) -> int:
        """Append one frame and its attribute values, flush, return the frame count.

        The attributes are written before the frame, so a reader that sees frame ``i``
        also sees its ``phi`` and monitor counts.
        """
        if self.closed:
            raise NXRefineBSError(f"detector file {self.path} is closed")
        if tuple(frame.shape) != self.shape:
            raise NXRefineBSError(
                f"frame of shape {frame.shape} does not fit {self.path} frames {self.shape}"
            )
        i = self.n_written
        for name, ds in self._attrs.items():
            ds.resize(i + 1, axis=0)
            ds[i] = float(values.get(name, math.nan))
            ds.flush()
        self._data.resize(i + 1, axis=0)
        self._data[i] = frame
        self._data.flush()
        self.n_written = i + 1
        return self.n_written

    def close(self) -> None:
        """Close the file (idempotent)."""
        if not self.closed:
            self._file.close()
            logger.debug("closed detector file %s with %d frames", self.path, self.n_written)


class FrameSource:
    """Render the frames of a :class:`RotationSimulator` one by one into a :class:`FrameFile`.

    Frame ``i`` of the file is ``simulator.frame(i)``; its attributes are
    ``MCS1 = simulator.monitor[i]``, ``MCS2`` from :func:`mcs2_counts` and
    ``phi = simulator.phi[i]`` (the rotation angle at the centre of the frame).

    Parameters
    ----------
    path : path-like
        Detector file to create.
    simulator : RotationSimulator
        The rotation to render.
    compression : str, optional
        Passed to :class:`FrameFile`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        simulator: RotationSimulator,
        *,
        compression: str | None = None,
    ) -> None:
        self.simulator = simulator
        self.mcs1 = simulator.monitor
        self.mcs2 = mcs2_counts(simulator)
        self.phi = simulator.phi
        self.file = FrameFile(path, simulator.detector.shape, compression=compression)

    @property
    def n_written(self) -> int:
        """Frames written so far."""
        return self.file.n_written

    @property
    def n_frames(self) -> int:
        """Frames the simulator can render."""
        return self.simulator.n_frames

    def values(self, index: int) -> dict[str, float]:
        """Attribute values (MCS1, MCS2, phi) of frame ``index``."""
        return {
            "MCS1": float(self.mcs1[index]),
            "MCS2": float(self.mcs2[index]),
            "phi": float(self.phi[index]),
        }

    def warm_up(self) -> None:
        """Compute the peak table (the slow part of the first frame) ahead of time."""
        _ = self.simulator.peaks

    def render_next(self) -> tuple[int, NDArray[np.int32]]:
        """Render (without writing) the next frame; returns ``(index, frame)``."""
        index = self.n_written
        if index >= self.n_frames:
            raise NXRefineBSError(
                f"detector file {self.file.path} already holds all {self.n_frames} frames "
                "the detector was prepared for; set n_frames before staging"
            )
        return index, self.simulator.frame(index)

    def write(self, index: int, frame: NDArray[np.int32]) -> dict[str, float]:
        """Append rendered frame ``index``; returns its attribute values."""
        if index != self.n_written:
            raise NXRefineBSError(
                f"frame {index} written out of order into {self.file.path} "
                f"(it holds {self.n_written})"
            )
        values = self.values(index)
        self.file.append(frame, values)
        return values

    def write_next(self) -> dict[str, float]:
        """Render and append the next frame; returns its attribute values."""
        index, frame = self.render_next()
        return self.write(index, frame)

    def close(self) -> None:
        """Close the file."""
        self.file.close()
