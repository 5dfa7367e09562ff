"""areaDetector driver (``cam1:``) and NDFileHDF5 plugin (``HDF1:``) of the simulated IOC.

The PVs are those ophyd-async's ``epics.adcore`` detectors (``ADBaseIO``,
``NDFileHDF5IO``) and ``ADHDFDataLogic`` read, write and wait on.  ``Acquire`` = 1
starts ``NumImages`` frames (``ImageMode`` Multiple; Single: one) at the period
``max(AcquireTime, AcquirePeriod)``; the put completes when they are done.  Each frame
is rendered by the package's :class:`~nxrefine_bs.simulation.frames.RotationSimulator`
at the goniometer angles the IOC's motors report at the exposure times, its monitor
counts go to the monitor PVs, and - while ``Capture`` is on - it is appended to
``<FilePath><FileName>.h5`` (``FileTemplate`` ``%s%s.h5``) with SWMR, ``/entry/data/data``
and the NDAttributes ``MCS1``, ``MCS2``, ``phi`` (declared in the driver's
``NDAttributesFile`` XML, as ophyd-async expects).  Rendering and HDF5 writes run on
one worker thread, so Channel Access is served while frames are made.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..devices.frames import NDATTRIBUTES, FrameFile, file_seed, mcs2_counts, rotation_simulator
from ..geometry import Geometry
from ..simulation.crystal import SimCrystal
from ..simulation.frames import DetectorModel, RotationSimulator
from .pvs import PVDict

logger = logging.getLogger(__name__)

__all__ = ["AreaDetectorSim", "RotationContext", "ndattributes_xml"]

AD_STATES = (
    "Idle", "Acquire", "Readout", "Correct", "Saving", "Aborting", "Error", "Waiting",
    "Initializing", "Disconnected", "Aborted",
)  # fmt: skip
DATA_TYPES = (
    "Int8", "UInt8", "Int16", "UInt16", "Int32", "UInt32", "Int64", "UInt64", "Float32",
    "Float64",
)  # fmt: skip
COLOR_MODES = ("Mono", "Bayer", "RGB1", "RGB2", "RGB3", "YUV444", "YUV422", "YUV421")
COMPRESSIONS = ("None", "N-bit", "szip", "zlib", "Blosc", "BSLZ4", "LZ4", "JPEG")
ARMING_TIME = 0.002
"""Seconds between ``Acquire`` = 1 and the start of the first exposure.  The simulator of
the rotation is built meanwhile, from the motors' motion profiles at the exposure
times; if that takes longer, the first frames are handed out late (``LateFrames_RBV``)
but show the angles of their exposure times."""

_CODEC = {"None": None, "zlib": "gzip", "BSLZ4": "bslz4", "LZ4": "lz4"}


def ndattributes_xml(sources: dict[str, str]) -> str:
    """The ``NDAttributesFile`` XML of EPICS_PV attributes ``name -> source PV``.

    Examples
    --------
    >>> ndattributes_xml({"MCS1": "SIM:MCS1:Counts"})[:40]
    '<Attributes><Attribute name="MCS1" type='
    """
    rows = "".join(
        f'<Attribute name="{name}" type="EPICS_PV" source="{source}" dbrtype="DBR_DOUBLE" '
        f'description="{name} per frame"/>'
        for name, source in sources.items()
    )
    return f"<Attributes>{rows}</Attributes>"


@dataclass
class RotationContext:
    """What the detector reads from the rest of the IOC when it takes frames.

    Attributes
    ----------
    phi, chi, omega : callable
        ``position(t)`` of the goniometer axes at monotonic time ``t``.
    temperature : callable
        Sample temperature now (K).
    monitors : callable
        ``publish(values)``: push one frame's monitor counts to the monitor PVs.
    """

    phi: Callable[[float], float]
    chi: Callable[[float], float]
    omega: Callable[[float], float]
    temperature: Callable[[], float]
    monitors: Callable[[dict[str, float]], Any]


class AreaDetectorSim:
    """Driver and HDF5 plugin PVs plus the acquisition engine.

    Parameters
    ----------
    pvs : PVDict
        Prefixed with the detector prefix (``"SIM:DET:"``).
    context : RotationContext
        Goniometer, temperature and monitor links.
    crystal, model, geometry
        The simulated sample, detector and configured geometry.
    seed : int
        Noise seed (file ``fN`` uses ``seed * 100 + N``, as the in-process detector).
    attribute_sources : dict
        ``NDAttribute name -> source PV`` declared in ``NDAttributesFile``.
    """

    def __init__(
        self,
        pvs: PVDict,
        context: RotationContext,
        *,
        crystal: SimCrystal,
        model: DetectorModel,
        geometry: Geometry,
        seed: int = 0,
        attribute_sources: dict[str, str],
        simulator_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.context = context
        self.crystal, self.model, self.geometry = crystal, model, geometry
        self.seed = int(seed)
        self.simulator_kwargs = dict(simulator_kwargs or {})
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ioc-frames")
        self._file: FrameFile | None = None
        self._stop = asyncio.Event()
        self._capture_done = asyncio.Event()
        self.frames_late = 0
        ny, nx = model.shape
        cam = pvs.sub("cam1:")
        self.cam = cam
        self._ndarray_base(cam, "SIMDET", ny, nx)
        self.acquire_time, _ = cam.rw("double", "AcquireTime", 0.1, units="s")
        self.acquire_period, _ = cam.rw("double", "AcquirePeriod", 0.0, units="s")
        self.num_images, _ = cam.rw("integer", "NumImages", 1)
        self.image_mode, _ = cam.rw("enum", "ImageMode", ("Single", "Multiple", "Continuous"))
        self.state = cam.enum("DetectorState_RBV", AD_STATES)
        self.acquire = cam.boolean("Acquire", False, ("Done", "Acquire"))
        self.acquire_rbv = cam.boolean("Acquire_RBV", False, ("Done", "Acquire"))
        cam.boolean("WaitForPlugins")
        for suffix, value in (
            ("Manufacturer_RBV", "nxrefine-bs"),
            ("Model_RBV", model.name[:40]),
            ("SerialNumber_RBV", "0"),
            ("SDKVersion_RBV", "sim"),
            ("FirmwareVersion_RBV", "sim"),
        ):
            cam.string(suffix, value)
        # not an areaDetector PV: frames handed out more than one period after their
        # exposure ended (the IOC could not keep up); they are still written, in order
        self.late_frames = cam.integer("LateFrames_RBV", 0)
        self.acquire.on_write(self._on_acquire)
        hdf = pvs.sub("HDF1:")
        self.hdf = hdf
        self._ndarray_base(hdf, "HDF1", ny, nx, plugin=True)
        hdf.string40("PluginType_RBV", "NDFileHDF5")  # ophyd v1 plugins check it
        self.file_path, self.file_path_rbv = hdf.rw("string", "FilePath", "")
        self.file_name, _ = hdf.rw("string", "FileName", "")
        self.file_template, _ = hdf.rw("string", "FileTemplate", "%s%s.h5")
        self.file_path_exists = hdf.boolean("FilePathExists_RBV")
        self.full_file_name = hdf.string("FullFileName_RBV", "")
        self.file_number = hdf.integer("FileNumber", 0)
        hdf.boolean("AutoIncrement")
        hdf.rw("enum", "FileWriteMode", ("Single", "Capture", "Stream"))
        hdf.rw("integer", "NumCapture", 0)
        self.num_captured = hdf.integer("NumCaptured_RBV", 0)
        self.capture = hdf.boolean("Capture", False, ("Done", "Capture"))
        self.capture_rbv = hdf.boolean("Capture_RBV", False, ("Done", "Capture"))
        hdf.integer("ArraySize0", nx)
        hdf.integer("ArraySize1", ny)
        self.create_directory, _ = hdf.rw("integer", "CreateDirectory", 0)
        hdf.rw("string", "NDArrayPort", "SIMDET")
        hdf.rw("enum", "EnableCallbacks", ("Disable", "Enable"))
        hdf.rw("integer", "NDArrayAddress", 0)
        hdf.rw("integer", "QueueSize", 20)
        hdf.rw("boolean", "PositionMode", choices=("Off", "On"))
        self.compression, _ = hdf.rw("enum", "Compression", COMPRESSIONS)
        hdf.rw("integer", "NumExtraDims", 0)
        self.swmr, _ = hdf.rw("boolean", "SWMRMode", choices=("Off", "On"))  # bo ZNAM/ONAM
        self.flush_now = hdf.boolean("FlushNow")
        hdf.rw("string", "XMLFileName", "")
        hdf.rw("integer", "NumFramesChunks", 1)
        hdf.rw("boolean", "ChunkSizeAuto")
        hdf.rw("boolean", "LazyOpen")
        self._attribute_xml = ndattributes_xml(attribute_sources)
        self.file_path.on_write(self._on_file_path)
        self.capture.on_write(self._on_capture)

    # ------------------------------------------------------------------ PVs
    def _ndarray_base(self, pvs: PVDict, port: str, ny: int, nx: int, plugin: bool = False) -> None:
        pvs.string("PortName_RBV", port)
        pvs.integer("UniqueId_RBV", 0)
        nd = pvs.string("NDAttributesFile", "")
        if not plugin:
            self.ndattributes = nd
        for axis, size in (("X", nx), ("Y", ny), ("Z", 0)):
            pvs.integer(f"ArraySize{axis}_RBV", size)
        for k, size in enumerate((nx, ny, 0)):
            pvs.integer(f"ArraySize{k}_RBV", size)
        pvs.enum("ColorMode_RBV", COLOR_MODES)
        if plugin:
            pvs.enum("DataType_RBV", DATA_TYPES, "Int32")
        else:  # the driver's is settable (ophyd v1 connects both)
            pvs.rw("enum", "DataType", DATA_TYPES, "Int32")
        counter, counter_rbv = pvs.rw("integer", "ArrayCounter", 0)
        if not plugin:
            self.array_counter = counter_rbv
        pvs.string("ADCoreVersion_RBV", "3.12.1")
        pvs.string("DriverVersion_RBV", "nxrefine-bs")

    async def startup(self) -> None:
        """Publish the NDAttribute XML; render one frame (compiles the simulator's kernels)."""
        await self.ndattributes.put(self._attribute_xml)
        await self._run(lambda: self._simulator(2, time.monotonic(), 0.1).frame(0))

    # ------------------------------------------------------------------ file plugin
    async def _on_file_path(self, value: str) -> None:
        """Create directories as ``CreateDirectory`` allows and report if the path exists."""
        path = Path(str(value))
        depth = int(self.create_directory.value)
        if depth != 0 and path.is_absolute() and not path.is_dir():
            parts = path.parts[1:]
            keep = len(parts) + depth if depth < 0 else depth
            base = Path(path.anchor, *parts[:keep])
            if base.is_dir():
                try:
                    path.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    logger.warning("cannot create %s: %s", path, exc)
        await self.file_path_rbv.put(str(value))
        await self.file_path_exists.put(
            "Yes" if path.is_dir() and os.access(path, os.W_OK) else "No"
        )

    def _target(self) -> Path:
        template = str(self.file_template.value) or "%s%s.h5"
        if template.count("%") != 2 or "%s%s" not in template:
            raise ValueError(f"FileTemplate {template!r} is not supported; use %s%s.h5")
        return Path(
            template.replace("%s%s", "{}{}", 1).format(self.file_path.value, self.file_name.value)
        )

    async def _on_capture(self, value: Any) -> str:
        if value in (1, "Capture", True):
            if self._file is not None:
                raise ValueError("HDF1:Capture is already on; write 0 to close the file first")
            path = self._target()
            if not path.parent.is_dir():
                raise ValueError(f"HDF1:FilePath {path.parent} does not exist")
            codec = _CODEC.get(str(self.compression.value))
            self._file = await self._run(
                functools.partial(FrameFile, attributes=NDATTRIBUTES, compression=codec),
                path,
                self.model.shape,
            )
            self._capture_done.clear()
            await self.full_file_name.put(str(path))
            await self.num_captured.put(0)
            await self.capture_rbv.put("Capture")
            logger.info("capturing to %s", path)
            await self._capture_done.wait()  # put-callback completes when capture ends
            return "Done"
        await self._close_file()
        return "Done"

    async def _close_file(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            await self._run(file.close)
            logger.info("closed %s with %d frames", file.path, file.n_written)
        await self.capture_rbv.put("Done")
        self._capture_done.set()

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, functools.partial(fn, *args)
        )

    # ------------------------------------------------------------------ driver
    async def _on_acquire(self, value: Any) -> str:
        if value not in (1, "Acquire", True):
            self._stop.set()
            return "Done"
        if self.acquire_rbv.value == "Acquire":
            raise ValueError("cam1:Acquire: already acquiring")
        self._stop.clear()
        await self.acquire_rbv.put("Acquire")
        await self.state.put("Acquire")
        try:
            await self._acquire()
        except Exception:
            logger.exception("acquisition failed")
            await self.state.put("Error")
            raise
        finally:
            await self.acquire_rbv.put("Done")
            await self.acquire.put("Done")
        await self.state.put("Aborted" if self._stop.is_set() else "Idle")
        return "Done"

    def _simulator(self, n: int, t_start: float, period: float) -> RotationSimulator:
        ctx = self.context
        phi0 = ctx.phi(t_start + 0.5 * period)
        phi1 = ctx.phi(t_start + 1.5 * period)
        step = phi1 - phi0
        if abs(step) < 1e-9:  # phi at rest: a still exposure over the configured width
            step = self.geometry.phi_step
        name = Path(str(self.file_name.value) or "frames").stem
        return rotation_simulator(
            self.geometry,
            self.crystal,
            self.model,
            n_frames=n,
            phi_start=phi0,
            phi_step=step,
            chi=ctx.chi(t_start),
            omega=ctx.omega(t_start),
            seed=file_seed(self.seed, name),
            temperature=ctx.temperature(),
            simulator_kwargs=self.simulator_kwargs,
        )

    async def _acquire(self) -> None:
        mode = str(self.image_mode.value)
        n = 1 if mode == "Single" else int(self.num_images.value)
        if mode == "Continuous":
            n = 10**9
        period = max(float(self.acquire_time.value), float(self.acquire_period.value), 1e-3)
        t_start = time.monotonic() + ARMING_TIME
        sim = await self._run(self._simulator, min(n, 100000), t_start, period)
        await self._run(lambda: sim.peaks)
        mcs2 = mcs2_counts(sim)
        counter = int(self.array_counter.value)
        for k in range(n):
            if self._stop.is_set():
                logger.info("acquisition stopped after %d frames", k)
                return
            t_end = t_start + (k + 1) * period
            index = k % sim.n_frames
            frame = await self._run(sim.frame, index)
            delay = t_end - time.monotonic()
            if delay > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                if self._stop.is_set():
                    logger.info("acquisition stopped after %d frames", k)
                    return
            elif delay < -period:
                self.frames_late += 1
                await self.late_frames.put(self.frames_late)
            values = {
                "MCS1": float(sim.monitor[index]),
                "MCS2": float(mcs2[index]),
                "phi": float(self.context.phi(t_end - 0.5 * period)),
            }
            counter += 1
            await self.array_counter.put(counter)
            self.context.monitors(values)
            file = self._file
            if file is not None:
                written = await self._run(file.append, frame, values)
                await self.num_captured.put(written)

    def close(self) -> None:
        """Close an open file and stop the worker thread."""
        if self._file is not None:
            self._file.close()
        self._executor.shutdown(wait=True)
