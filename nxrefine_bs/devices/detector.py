"""Simulated rotation detector (ophyd-async ``StandardDetector``).

:class:`SimRotationDetector` behaves like a Pilatus with an areaDetector HDF5 plugin:
prepared for ``N`` frames (``TriggerInfo(number_of_events=N)``) and kicked off, it
renders frame after frame of a seeded
:class:`~nxrefine_bs.simulation.frames.RotationSimulator` - built from its crystal and
detector model, its configured :class:`~nxrefine_bs.geometry.Geometry` and the goniometer
angles at prepare time - into ``<file_path>/<file_name>.h5`` (see
:class:`~nxrefine_bs.devices.frames.FrameFile`), and emits one ``StreamResource`` per
data key plus ``StreamDatum`` pages:

=====================  ==================================================  ============
data key               dataset                                             shape/dtype
=====================  ==================================================  ============
``<name>``             ``/entry/data/data``                                ``[1, ny, nx]`` ``<i4``
``<name>-MCS1``        ``/entry/instrument/NDAttributes/MCS1``             ``[1]`` ``<f8``
``<name>-MCS2``        ``/entry/instrument/NDAttributes/MCS2``             ``[1]`` ``<f8``
``<name>-phi``         ``/entry/instrument/NDAttributes/phi``              ``[1]`` ``<f8``
=====================  ==================================================  ============

All resources have ``mimetype="application/x-hdf5"`` and
``uri="file://localhost/<absolute path>"``.  Triggered (step scans) it writes one frame
per trigger into the same file.  Rendering and HDF5 writing run on a worker thread, so
the event loop never blocks; frames are paced at the frame time.

Where the file goes: if the configuration signals ``file_path`` (directory) and
``file_name`` (no extension) are set, as the nxrefine-bs plans do, they win; otherwise
the injected ophyd-async ``PathProvider`` decides.  An existing file is never
overwritten.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path, PurePath
from typing import Any, TypeVar

import numpy as np
from ophyd_async.core import (
    AsyncStatus,
    DetectorAcquireLogic,
    DetectorDataLogic,
    DetectorTriggerLogic,
    PathInfo,
    PathProvider,
    StandardDetector,
    StreamableDataProvider,
    StreamResourceDataProvider,
    StreamResourceInfo,
    TriggerInfo,
    soft_signal_r_and_setter,
    soft_signal_rw,
)

from ..errors import FileExistsNXError, NXRefineBSError
from ..geometry import Geometry
from ..simulation.crystal import SimCrystal
from ..simulation.frames import DetectorModel, RotationSimulator
from .frames import (
    DATA_PATH,
    NDATTRIBUTES,
    NDATTRIBUTES_PATH,
    FrameSource,
    file_seed,
    file_uri,
    rotation_simulator,
)
from .goniometer import SimGoniometer
from .monitors import SimIonChamber

logger = logging.getLogger(__name__)

__all__ = ["SimRotationDetector", "RotationPathProvider"]

T = TypeVar("T")


class RotationPathProvider(PathProvider):
    """A ``PathProvider`` whose directory and file name can be changed between scans.

    Parameters
    ----------
    directory : path-like
        Absolute directory the files go to.
    filename : str
        File name without extension (``f1``...).

    Examples
    --------
    >>> p = RotationPathProvider("/data/exp", "f1")
    >>> p.set_file("/data/exp/TiSe2/xtal1/300K/f2.h5")
    >>> info = p()
    >>> info.directory_path.as_posix(), info.filename
    ('/data/exp/TiSe2/xtal1/300K', 'f2')
    """

    def __init__(self, directory: str | os.PathLike[str], filename: str = "f1") -> None:
        self.directory = Path(os.path.abspath(directory))
        self.filename = filename
        self.create_dir_depth = 0

    def set_file(
        self, path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None
    ) -> None:
        """Point the provider at ``path`` (the ``.h5`` extension is dropped).

        Parameters
        ----------
        path : path-like
            The next file.
        root : path-like, optional
            An existing directory above ``path``: the directories between it and the
            file are created by the detector (``create_dir_depth`` = minus their
            number, the areaDetector convention); without it nothing is created.
        """
        p = Path(os.path.abspath(path))
        self.directory = p.parent
        self.filename = p.stem if p.suffix == ".h5" else p.name
        self.create_dir_depth = 0
        if root is not None:
            levels = len(p.parent.relative_to(Path(os.path.abspath(root))).parts)
            self.create_dir_depth = -levels if levels else 0

    def __call__(self, datakey_name: str | None = None) -> PathInfo:
        return PathInfo(
            directory_path=PurePath(self.directory),
            filename=self.filename,
            create_dir_depth=self.create_dir_depth,
        )


def _as_path_provider(value: PathProvider | str | os.PathLike[str]) -> PathProvider:
    if isinstance(value, (str, os.PathLike)):
        return RotationPathProvider(value)
    return value


class _FrameEngine:
    """Acquisition state of one detector: the open file, its worker thread and task.

    All HDF5 calls run on one worker thread per open file; the asyncio side only
    schedules them, so the event loop never blocks on rendering or I/O.
    """

    def __init__(
        self,
        set_written: Callable[[int], None],
        on_frame: Callable[[Mapping[str, float]], None],
    ) -> None:
        self._set_written = set_written
        self._on_frame = on_frame
        self._executor: ThreadPoolExecutor | None = None
        self.source: FrameSource | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.frames_per_acquire = 1
        self.period = 0.0

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise NXRefineBSError("no detector file is open; prepare the detector first")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    async def open(
        self, path: Path, simulator: RotationSimulator, compression: str | None
    ) -> FrameSource:
        await self.close()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nxrefine-frames")
        try:
            source = await self._run(
                functools.partial(FrameSource, compression=compression), path, simulator
            )
            self.source = source
            await self._run(source.warm_up)
        except BaseException:
            await self.close()
            raise
        self._set_written(0)
        return source

    def start(self) -> None:
        if self.source is None:
            raise NXRefineBSError("no detector file is open; prepare the detector first")
        if self._task is not None and not self._task.done():
            raise NXRefineBSError("the detector is already acquiring")
        self._task = asyncio.create_task(self._acquire(self.frames_per_acquire, self.period))

    async def _acquire(self, n: int, period: float) -> None:
        source = self.source
        assert source is not None
        start = time.monotonic()
        try:
            for k in range(n):
                index, frame = await self._run(source.render_next)
                delay = start + (k + 1) * period - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                values = await self._run(source.write, index, frame)
                self._on_frame(values)
                self._set_written(source.n_written)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("simulated detector failed writing %s", source.file.path)
            raise

    async def wait(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await task

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
        if task is not None:
            with suppress(asyncio.CancelledError, Exception):
                await task
        if self._executor is not None:
            await self._run(lambda: None)  # barrier: the frame in flight is finished

    async def close(self) -> None:
        async with self._lock:
            await self.stop()
            source, self.source = self.source, None
            executor, self._executor = self._executor, None
            if executor is not None:
                if source is not None:
                    loop = asyncio.get_running_loop()
                    await loop.run_in_executor(executor, source.close)
                executor.shutdown(wait=False)


class _TriggerLogic(DetectorTriggerLogic):
    def __init__(self, detector: SimRotationDetector, engine: _FrameEngine) -> None:
        self._det = detector
        self._engine = engine

    async def prepare_internal(self, num: int, livetime: float, deadtime: float) -> None:
        period = livetime + deadtime
        if period <= 0:
            period = await self._det.frame_time.get_value()
        self._engine.frames_per_acquire = int(num)
        self._engine.period = float(period)
        self._det.exposures_prepared = int(num)

    async def default_trigger_info(self) -> TriggerInfo:
        return TriggerInfo()


class _AcquireLogic(DetectorAcquireLogic):
    def __init__(self, engine: _FrameEngine) -> None:
        self._engine = engine

    async def start_acquiring(self) -> None:
        self._engine.start()

    async def wait_for_idle(self) -> None:
        await self._engine.wait()

    async def ensure_stopped(self) -> None:
        await self._engine.stop()


class _DataLogic(DetectorDataLogic):
    def __init__(
        self,
        detector: SimRotationDetector,
        engine: _FrameEngine,
        set_full_file_name: Callable[[str], None],
    ) -> None:
        self._det = detector
        self._engine = engine
        self._set_full_file_name = set_full_file_name

    async def prepare_unbounded(self, datakey_name: str) -> StreamableDataProvider:
        det = self._det
        path = await det.resolve_file_path(datakey_name)
        simulator = await det.make_simulator(path.stem)
        await self._engine.open(path, simulator, det.compression)
        self._set_full_file_name(str(path))
        ny, nx = det.detector_model.shape
        resources = [
            StreamResourceInfo(
                data_key=datakey_name,
                shape=(ny, nx),
                chunk_shape=(1, ny, nx),
                dtype_numpy=np.dtype(np.int32).str,
                parameters={"dataset": DATA_PATH},
            ),
            *(
                StreamResourceInfo(
                    data_key=f"{datakey_name}-{attr}",
                    shape=(),
                    chunk_shape=(1024,),
                    dtype_numpy=np.dtype(np.float64).str,
                    parameters={"dataset": f"{NDATTRIBUTES_PATH}/{attr}"},
                )
                for attr in NDATTRIBUTES
            ),
        ]
        logger.info(
            "%s: writing %d frames of %s to %s",
            det.name,
            simulator.n_frames,
            det.detector_model.name,
            path,
        )
        return StreamResourceDataProvider(
            uri=file_uri(path),
            resources=resources,
            mimetype="application/x-hdf5",
            collections_written_signal=det.frames_written,
        )

    async def stop(self) -> None:
        await self._engine.close()

    def get_hinted_fields(self, datakey_name: str) -> Sequence[str]:
        return [datakey_name]


class SimRotationDetector(StandardDetector):
    """Flyable and triggerable simulated area detector for rotation scans.

    Parameters
    ----------
    path_provider : PathProvider or path-like
        Where files go when ``file_path``/``file_name`` are not set; a directory is
        wrapped in a :class:`RotationPathProvider` (file ``f1.h5``).
    crystal : SimCrystal
        The simulated sample.
    detector : DetectorModel
        Detector shape, pixel size and gaps; ``detector.name`` is the pyFAI name that
        goes into the start document.
    geometry : Geometry
        Configured instrument geometry (its ``shape`` must match ``detector``).  The
        goniometer angles are replaced by those of ``goniometer`` at prepare time and
        ``phi_start``/``phi_step`` by the signals of the same names.
    goniometer : SimGoniometer, optional
        Read at prepare time for chi, omega and theta.
    temperature : SimTemperatureController, optional
        Read at prepare time: the sample temperature the simulator renders (see
        :class:`~nxrefine_bs.simulation.thermal.ThermalModel`).
    monitors : sequence of SimIonChamber
        Channels that receive the per-frame monitor counts (matched by ``channel``).
    seed : int
        Base noise seed; file ``fN`` uses ``seed * 100 + N``.
    frame_time : float
        Default frame period (s) when ``TriggerInfo`` gives no live time.
    n_frames : int
        Initial value of the ``n_frames`` signal.
    simulator_kwargs : mapping, optional
        Further :class:`RotationSimulator` arguments (``max_intensity``, ``background``...).
    compression : str, optional
        Compression of the frames (``None``, ``"bslz4"``, ``"gzip"``...; see
        :func:`nxrefine_bs.nexus.codecs.compression_options`).
    name : str
        Device name (the data key of the frames).

    Attributes
    ----------
    file_path, file_name : SignalRW[str]
        Directory and file name (no ``.h5``) of the next file; empty: use the provider.
    phi_start, phi_step : SignalRW[float]
        Rotation angle of frame 0 and step per frame (degrees).
    n_frames : SignalRW[int]
        Frames of the rotation (0: the number the detector is prepared for).
    frame_time : SignalRW[float]
        Frame period (s).
    full_file_name : SignalR[str]
        File being written.
    frames_written : SignalR[int]
        Frames written to it so far.
    """

    # Set with object.__setattr__ in __init__ so that they are not child devices.
    _goniometer: SimGoniometer | None
    _temperature: Any | None
    _monitors: tuple[SimIonChamber, ...]

    def __init__(
        self,
        path_provider: PathProvider | str | os.PathLike[str],
        *,
        crystal: SimCrystal,
        detector: DetectorModel,
        geometry: Geometry,
        goniometer: SimGoniometer | None = None,
        temperature: Any | None = None,
        monitors: Sequence[SimIonChamber] = (),
        seed: int = 0,
        frame_time: float = 0.1,
        n_frames: int = 0,
        simulator_kwargs: Mapping[str, Any] | None = None,
        compression: str | None = None,
        name: str = "",
    ) -> None:
        if tuple(geometry.shape) != tuple(detector.shape):
            raise NXRefineBSError(
                f"geometry shape {geometry.shape} does not match detector {detector.name!r} "
                f"shape {detector.shape}"
            )
        self.path_provider = _as_path_provider(path_provider)
        self.crystal = crystal
        self.detector_model = detector
        self.geometry = geometry
        # Plain references: assigning a Device attribute would adopt it as a child
        # (and rename it <detector>-goniometer).
        object.__setattr__(self, "_goniometer", goniometer)
        object.__setattr__(self, "_temperature", temperature)
        object.__setattr__(self, "_monitors", tuple(monitors))
        self.seed = int(seed)
        self.simulator_kwargs = dict(simulator_kwargs or {})
        self.compression = compression
        self.last_simulator: RotationSimulator | None = None
        self.exposures_prepared = 0

        self.file_path = soft_signal_rw(str, "")
        self.file_name = soft_signal_rw(str, "")
        self.phi_start = soft_signal_rw(float, float(geometry.phi_start), units="deg")
        self.phi_step = soft_signal_rw(float, float(geometry.phi_step), units="deg")
        self.n_frames = soft_signal_rw(int, int(n_frames))
        self.frame_time = soft_signal_rw(float, float(frame_time), units="s")
        self.full_file_name, set_full_file_name = soft_signal_r_and_setter(str, "")
        self.frames_written, set_written = soft_signal_r_and_setter(int, 0)

        engine = _FrameEngine(set_written, self._push_monitors)
        self.add_detector_logics(
            _TriggerLogic(self, engine),
            _AcquireLogic(engine),
            _DataLogic(self, engine, set_full_file_name),
        )
        self.add_config_signals(
            self.file_path,
            self.file_name,
            self.phi_start,
            self.phi_step,
            self.n_frames,
            self.frame_time,
        )
        super().__init__(name=name)

    # ------------------------------------------------------------------ lifecycle
    def complete(self) -> AsyncStatus:  # type: ignore[override]  # no per-frame watch updates
        """Wait for the kicked-off frames, or for ``unstage`` (after an abort or failure).

        Without the second way out, a ``complete`` whose frames never come (the run
        was aborted and the detector unstaged) would only end at its timeout, long
        after the run.
        """
        inner = super().complete()
        unstaged = asyncio.Event()
        object.__setattr__(self, "_unstaged", unstaged)

        async def wait() -> None:
            stop_waiter = asyncio.ensure_future(unstaged.wait())
            try:
                await asyncio.wait({inner.task, stop_waiter}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop_waiter.cancel()
            if not inner.done:
                inner.task.cancel()
                with suppress(asyncio.CancelledError, Exception):
                    await inner
                logger.warning(
                    "%s: unstaged after %d frames; complete() ends early",
                    self.name,
                    await self.frames_written.get_value(),
                )
                return
            await inner

        return AsyncStatus(wait())

    @AsyncStatus.wrap
    async def unstage(self) -> None:
        """Stop acquiring and close the file (frames written so far stay readable)."""
        unstaged = getattr(self, "_unstaged", None)
        if unstaged is not None:
            unstaged.set()
        await super().unstage()

    # ------------------------------------------------------------------ helpers
    @property
    def goniometer(self) -> SimGoniometer | None:
        """The goniometer read at prepare time (not a child device)."""
        return self._goniometer

    @property
    def monitors(self) -> tuple[SimIonChamber, ...]:
        """Monitor channels fed with the per-frame counts (not child devices)."""
        return self._monitors

    def _push_monitors(self, values: Mapping[str, float]) -> None:
        for chamber in self.monitors:
            if chamber.channel in values:
                chamber.update(values[chamber.channel])

    async def resolve_file_path(self, datakey_name: str | None = None) -> Path:
        """Absolute path of the next file (``file_path``/``file_name`` or the provider).

        Raises
        ------
        FileExistsNXError
            If the file exists.
        NXRefineBSError
            If its directory does not exist.
        """
        directory, name = await asyncio.gather(
            self.file_path.get_value(), self.file_name.get_value()
        )
        if directory and name:
            path = Path(directory) / f"{name}.h5"
            create_depth = 0
        else:
            info = self.path_provider(datakey_name or self.name)
            path = Path(str(info.directory_path)) / f"{info.filename}.h5"
            create_depth = info.create_dir_depth
        path = Path(os.path.abspath(path))
        if not path.parent.is_dir():
            parts = path.parent.parts
            keep = len(parts) + create_depth if create_depth < 0 else create_depth + 1
            if create_depth and Path(*parts[:keep]).is_dir():
                path.parent.mkdir(parents=True, exist_ok=True)
            else:
                raise NXRefineBSError(
                    f"{self.name}: directory {path.parent} does not exist; create it first"
                )
        if path.exists():
            raise FileExistsNXError(
                f"{self.name}: detector file {path} exists; raw data are never overwritten"
            )
        return path

    async def make_simulator(self, file_name: str) -> RotationSimulator:
        """The simulator of the next file, from the current goniometer and signals."""
        phi_start, phi_step, n_frames = await asyncio.gather(
            self.phi_start.get_value(), self.phi_step.get_value(), self.n_frames.get_value()
        )
        n = int(n_frames) if n_frames > 0 else max(1, self.exposures_prepared)
        if n < self.exposures_prepared:
            raise NXRefineBSError(
                f"{self.name}: prepared for {self.exposures_prepared} frames but n_frames = {n}"
            )
        angles: dict[str, float | None] = {"chi": None, "omega": None, "theta": None}
        if self.goniometer is not None:
            chi, omega, theta = await asyncio.gather(
                self.goniometer.chi.user_readback.get_value(),
                self.goniometer.omega.user_readback.get_value(),
                self.goniometer.theta.user_readback.get_value(),
            )
            angles = {"chi": chi, "omega": omega, "theta": theta}
        temperature = None
        if self._temperature is not None:
            temperature = float(await self._temperature.readback.get_value())
        sim = rotation_simulator(
            self.geometry,
            self.crystal,
            self.detector_model,
            n_frames=n,
            phi_start=phi_start,
            phi_step=phi_step,
            seed=file_seed(self.seed, file_name),
            temperature=temperature,
            simulator_kwargs=self.simulator_kwargs,
            **angles,
        )
        self.last_simulator = sim
        return sim
