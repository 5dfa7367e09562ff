"""Simulated beamline devices for ophyd v1 (no IOC): step scans with Resource/Datum.

:class:`SimRotationDetectorV1` writes the same HDF5 frame stack as the ophyd-async
:class:`~nxrefine_bs.devices.detector.SimRotationDetector` (one frame per trigger) and
announces it the way an areaDetector HDF5 plugin with ``FileStoreHDF5IterativeWrite``
does: one legacy ``Resource`` (spec ``AD_HDF5``, ``resource_kwargs
{"frame_per_point": 1}``, ``root`` = the file's directory, ``resource_path`` = its name)
and one ``Datum`` per frame (``datum_kwargs {"point_number": i}``), whose id the event
carries under the detector's name.  Monitor counts and phi are plain event values of
the monitor signals and the goniometer.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ophyd import Component as Cpt
from ophyd import Device, Signal
from ophyd.sim import SynAxis
from ophyd.status import DeviceStatus

from ..errors import FileExistsNXError, NXRefineBSError
from ..geometry import Geometry
from ..simulation.crystal import SimCrystal
from ..simulation.frames import DetectorModel, RotationSimulator
from .frames import FrameSource, file_seed, rotation_simulator

logger = logging.getLogger(__name__)

__all__ = ["SimGoniometerV1", "SimMonitorV1", "SimRotationDetectorV1", "SimDetectorStageV1"]


class SimGoniometerV1(Device):
    """ophyd v1 goniometer of instant :class:`ophyd.sim.SynAxis` circles (degrees)."""

    phi = Cpt(SynAxis, value=0.0)
    chi = Cpt(SynAxis, value=0.0)
    omega = Cpt(SynAxis, value=0.0)
    theta = Cpt(SynAxis, value=0.0)


class SimDetectorStageV1(Device):
    """ophyd v1 detector translation stage (mm, bookkeeping only)."""

    x = Cpt(SynAxis, value=0.0)
    y = Cpt(SynAxis, value=0.0)


class SimMonitorV1(Signal):
    """A monitor channel (scaler) whose value the simulated detector sets per frame.

    Parameters
    ----------
    name : str
        Signal name, e.g. ``MCS1``.
    channel : str, optional
        Simulated channel that feeds it (``MCS1`` or ``MCS2``); defaults to ``name``.
    """

    def __init__(self, *, name: str, channel: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("value", 0.0)
        super().__init__(name=name, **kwargs)
        self.channel = channel or name


class SimRotationDetectorV1(Device):
    """ophyd v1 simulated rotation detector for step scans (Resource/Datum).

    Staging opens ``<file_path>/<file_name>.h5`` (or ``<directory>/<name>.h5`` when
    those are empty) for ``n_frames`` frames with the goniometer angles of that moment;
    every ``trigger()`` renders and appends the next frame on a worker thread.

    Parameters
    ----------
    directory : path-like
        Default directory of the files.
    crystal, detector, geometry, goniometer, monitors, seed, frame_time, simulator_kwargs, \
compression
        As for :class:`~nxrefine_bs.devices.detector.SimRotationDetector`.
    name : str
        Device name (the data key of the frames).
    """

    file_path = Cpt(Signal, value="", kind="config")
    file_name = Cpt(Signal, value="", kind="config")
    phi_start = Cpt(Signal, value=-5.0, kind="config")
    phi_step = Cpt(Signal, value=0.1, kind="config")
    n_frames = Cpt(Signal, value=0, kind="config")
    frame_time = Cpt(Signal, value=0.1, kind="config")
    full_file_name = Cpt(Signal, value="", kind="omitted")
    frames_written = Cpt(Signal, value=0, kind="omitted")

    def __init__(
        self,
        directory: str | os.PathLike[str] | Any,
        *,
        crystal: SimCrystal,
        detector: DetectorModel,
        geometry: Geometry,
        goniometer: SimGoniometerV1 | None = None,
        monitors: Sequence[SimMonitorV1] = (),
        seed: int = 0,
        frame_time: float = 0.1,
        simulator_kwargs: Mapping[str, Any] | None = None,
        compression: str | None = None,
        name: str,
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, **kwargs)
        if tuple(geometry.shape) != tuple(detector.shape):
            raise NXRefineBSError(
                f"geometry shape {geometry.shape} does not match detector {detector.name!r} "
                f"shape {detector.shape}"
            )
        # A directory, or a path provider (``set_file``/``__call__`` -> PathInfo) that
        # names the next file, as for the ophyd-async detector.
        self.path_provider = None if isinstance(directory, (str, os.PathLike)) else directory
        self.directory = Path(os.path.abspath(directory)) if self.path_provider is None else None
        self.crystal = crystal
        self.detector_model = detector
        self.geometry = geometry
        self.goniometer = goniometer
        self.monitors = list(monitors)
        self.seed = int(seed)
        self.simulator_kwargs = dict(simulator_kwargs or {})
        self.compression = compression
        self.last_simulator: RotationSimulator | None = None
        self.phi_start.put(float(geometry.phi_start))
        self.phi_step.put(float(geometry.phi_step))
        self.frame_time.put(float(frame_time))
        self._executor: ThreadPoolExecutor | None = None
        self._source: FrameSource | None = None
        self._resource_uid: str | None = None
        self._asset_docs: deque[tuple[str, dict[str, Any]]] = deque()
        self._last_datum: str | None = None
        self._lock = threading.Lock()
        self._pending: Future[Any] | None = None

    # ------------------------------------------------------------------ staging
    def _resolve_path(self) -> Path:
        directory, name = self.file_path.get(), self.file_name.get()
        create_depth = 0
        if directory and name:
            path = Path(directory) / f"{name}.h5"
        elif self.path_provider is not None:
            info = self.path_provider(self.name)
            path = Path(str(info.directory_path)) / f"{info.filename}.h5"
            create_depth = int(info.create_dir_depth)
        else:
            assert self.directory is not None  # set whenever there is no path provider
            path = Path(self.directory) / f"{self.name}.h5"
        path = Path(os.path.abspath(path))
        parts = path.parent.parts
        keep = len(parts) + create_depth if create_depth < 0 else create_depth + 1
        if create_depth and not path.parent.is_dir() and Path(*parts[:keep]).is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
        if not path.parent.is_dir():
            raise NXRefineBSError(
                f"{self.name}: directory {path.parent} does not exist; create it first"
            )
        if path.exists():
            raise FileExistsNXError(
                f"{self.name}: detector file {path} exists; raw data are never overwritten"
            )
        return path

    def _make_simulator(self, file_name: str) -> RotationSimulator:
        n = int(self.n_frames.get())
        if n < 1:
            raise NXRefineBSError(f"{self.name}: set n_frames (> 0) before staging")
        angles: dict[str, float | None] = {"chi": None, "omega": None, "theta": None}
        if self.goniometer is not None:
            angles = {
                "chi": float(self.goniometer.chi.position),
                "omega": float(self.goniometer.omega.position),
                "theta": float(self.goniometer.theta.position),
            }
        sim = rotation_simulator(
            self.geometry,
            self.crystal,
            self.detector_model,
            n_frames=n,
            phi_start=float(self.phi_start.get()),
            phi_step=float(self.phi_step.get()),
            seed=file_seed(self.seed, file_name),
            simulator_kwargs=self.simulator_kwargs,
            **angles,
        )
        self.last_simulator = sim
        return sim

    def stage(self) -> list[Any]:
        """Open the detector file and queue its Resource document."""
        path = self._resolve_path()
        sim = self._make_simulator(path.stem)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nxrefine-frames")
        try:
            self._source = self._executor.submit(
                FrameSource, path, sim, compression=self.compression
            ).result()
            self._executor.submit(self._source.warm_up).result()
        except BaseException:
            self._executor.shutdown(wait=True)
            self._executor = None
            raise
        self.full_file_name.put(str(path))
        self.frames_written.put(0)
        self._resource_uid = str(uuid.uuid4())
        self._asset_docs.clear()
        self._asset_docs.append(
            (
                "resource",
                {
                    "uid": self._resource_uid,
                    "spec": "AD_HDF5",
                    "root": str(path.parent),
                    "resource_path": path.name,
                    "resource_kwargs": {"frame_per_point": 1},
                    "path_semantics": "posix",
                },
            )
        )
        logger.info("%s: writing %d frames to %s", self.name, sim.n_frames, path)
        return super().stage()

    def unstage(self) -> list[Any]:
        """Finish the frame in flight and close the file."""
        try:
            executor, self._executor = self._executor, None
            source, self._source = self._source, None
            if executor is not None:
                if source is not None:
                    executor.submit(source.close).result()
                executor.shutdown(wait=True)
        finally:
            self._resource_uid = None
        return super().unstage()

    # ------------------------------------------------------------------ acquisition
    def trigger(self) -> DeviceStatus:
        """Render and append the next frame on the worker thread."""
        status = DeviceStatus(self)
        if self._executor is None or self._source is None:
            status.set_exception(
                NXRefineBSError(f"{self.name}: trigger() before stage(); stage the detector")
            )
            return status
        source = self._source
        period = float(self.frame_time.get())
        start = time.monotonic()

        def work() -> None:
            index, frame = source.render_next()
            delay = start + period - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            values = source.write(index, frame)
            for monitor in self.monitors:
                if monitor.channel in values:
                    monitor.put(values[monitor.channel])
            datum_id = f"{self._resource_uid}/{index}"
            with self._lock:
                self._asset_docs.append(
                    (
                        "datum",
                        {
                            "datum_id": datum_id,
                            "resource": self._resource_uid,
                            "datum_kwargs": {"point_number": index},
                        },
                    )
                )
                self._last_datum = datum_id
            self.frames_written.put(source.n_written)

        def done(fut: Future[Any]) -> None:
            exc = fut.exception()
            if exc is None:
                status.set_finished()
            else:
                logger.error("%s: writing frame failed: %s", self.name, exc)
                status.set_exception(exc)

        self._pending = self._executor.submit(work)
        self._pending.add_done_callback(done)
        return status

    def read(self) -> dict[str, Any]:
        """Readings: the frame's datum id under the detector name."""
        out = dict(super().read())
        out[self.name] = {"value": self._last_datum, "timestamp": time.time()}
        return out

    def describe(self) -> dict[str, Any]:
        """Data keys: the frames (``external="FILESTORE:"``, shape ``[1, ny, nx]``)."""
        out = dict(super().describe())
        ny, nx = self.detector_model.shape
        out[self.name] = {
            "source": f"SIM:{self.name}",
            "dtype": "array",
            "dtype_numpy": "<i4",
            "shape": [1, ny, nx],
            "external": "FILESTORE:",
        }
        return out

    def collect_asset_docs(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield the queued Resource and Datum documents."""
        with self._lock:
            items = list(self._asset_docs)
            self._asset_docs.clear()
        yield from items

    @property
    def hints(self) -> dict[str, list[str]]:
        return {"fields": [self.name]}
