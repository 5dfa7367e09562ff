"""ophyd v1 EPICS devices for the rotation plans, through a thin adapter.

Beamlines whose device library is ophyd v1 keep their stock devices; this module adds
only what the plans' protocols (:mod:`nxrefine_bs.devices.protocols`) need and v1 lacks,
through the devices' public interfaces (signals' ``put``/``get``/``subscribe``,
``EpicsMotor.move``/``stop``, ophyd status objects):

* :class:`FlyingEpicsMotor` - a stock ``ophyd.EpicsMotor`` that also flies:
  ``prepare(FlyMotorInfo)`` moves to the run-up position and sets ``VELO``,
  ``kickoff`` starts the move through the rotation, ``complete`` finishes with it.
* :class:`AreaDetectorV1Adapter` - wraps a stock ophyd v1 areaDetector (a ``cam``
  driver and an HDF5 file plugin, e.g. :class:`SimDetectorV1`: ``DetectorBase`` with
  ``SimDetectorCam`` and ``HDF5Plugin_V34``).  Staging points the plugin at the file the
  beamline's path provider names and starts capture (``FileWriteMode`` Stream);
  step scans ``trigger``/``read`` one frame at a time and announce it as ophyd v1
  detectors do (``Resource`` spec ``AD_HDF5`` + one ``Datum`` per frame); fly scans
  ``prepare(TriggerInfo)``/``kickoff``/``complete``/``collect_asset_docs`` and announce
  the frames and the NDAttributes as ophyd-async's ``ADHDFWriter`` does
  (``StreamResource``/``StreamDatum``).  Only the PVs it uses are connected (the
  areaDetector components of ophyd are lazy).
* :class:`TemperatureControllerV1` - ``SP``/``T``/``TOL``; ``set`` finishes when the
  readback is within the tolerance of the set point.
* :class:`GoniometerV1` - ``phi`` (:class:`FlyingEpicsMotor`), ``chi``, ``omega``.

:func:`make_v1_devices` builds them and :func:`connect_v1_devices` waits for exactly
the PVs they use, raising :class:`~nxrefine_bs.errors.DeviceConnectionError` that
names the PVs which did not connect.  Use both through
:func:`nxrefine_bs.devices.epics.make_epics_beamline` with ``api="ophyd"``.

ophyd picks its Channel Access layer itself: pyepics when installed, else caproto
(a dependency of this package).
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from event_model import ComposeStreamResource
from ophyd import Component as Cpt
from ophyd import Device, EpicsMotor, EpicsSignal, EpicsSignalRO
from ophyd import FormattedComponent as FCpt
from ophyd.areadetector import ADComponent, DetectorBase
from ophyd.areadetector.cam import PilatusDetectorCam, SimDetectorCam
from ophyd.areadetector.plugins import HDF5Plugin_V34
from ophyd.signal import EpicsSignalBase
from ophyd.status import Status, StatusBase, SubscriptionStatus

from ..errors import DeviceConnectionError, NXRefineBSError

logger = logging.getLogger(__name__)

__all__ = [
    "AreaDetectorV1Adapter",
    "FlyingEpicsMotor",
    "GoniometerV1",
    "PilatusDetectorV1",
    "SimDetectorV1",
    "TemperatureControllerV1",
    "all_connected",
    "channel_access_devices",
    "connect_v1_devices",
    "make_v1_devices",
]

FILE_TEMPLATE = "%s%s.h5"
"""The HDF5 plugin's ``FileTemplate``: ``<FilePath><FileName>.h5``."""

_DBR_DTYPES = {
    "DBR_DOUBLE": "<f8",
    "DBR_FLOAT": "<f4",
    "DBR_LONG": "<i4",
    "DBR_SHORT": "<i2",
    "DBR_CHAR": "|u1",
    "DBR_ENUM": "<u2",
}
_AD_DTYPES = {
    "Int8": "|i1", "UInt8": "|u1", "Int16": "<i2", "UInt16": "<u2", "Int32": "<i4",
    "UInt32": "<u4", "Int64": "<i8", "UInt64": "<u8", "Float32": "<f4", "Float64": "<f8",
}  # fmt: skip
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")


# ---------------------------------------------------------------------- stock devices
class SimDetectorV1(DetectorBase):
    """Stock ophyd v1 ADSimDetector: driver ``cam1:``, NDFileHDF5 plugin ``HDF1:`` (lazy)."""

    cam = ADComponent(SimDetectorCam, "cam1:")
    hdf1 = ADComponent(HDF5Plugin_V34, "HDF1:")


class PilatusDetectorV1(DetectorBase):
    """Stock ophyd v1 ADPilatus: driver ``cam1:``, NDFileHDF5 plugin ``HDF1:`` (lazy)."""

    cam = ADComponent(PilatusDetectorCam, "cam1:")
    hdf1 = ADComponent(HDF5Plugin_V34, "HDF1:")


def _in_thread(obj: Any, work: Callable[[], None], what: str) -> Status:
    """Run blocking ``work`` on a thread; the status reports how it ended."""
    status = Status(obj)

    def run() -> None:
        try:
            work()
        except Exception as exc:
            logger.error("%s failed: %s", what, exc)
            status.set_exception(exc)
        else:
            status.set_finished()

    threading.Thread(target=run, name=f"nxrefine-bs {what}", daemon=True).start()
    return status


def _no_lazy_wait(device: Any) -> None:
    """Let ``device`` and its sub-devices create lazy components without waiting for them."""
    if isinstance(device, Device):
        device.lazy_wait_for_connection = False
        for _, sub in device.walk_subdevices(include_lazy=False):
            sub.lazy_wait_for_connection = False


def _put(signal: Any, value: Any, timeout: float) -> None:
    """Write ``value`` and wait for the IOC to finish processing it (put completion)."""
    signal.put(value, use_complete=True, wait=True, timeout=timeout)


def _wait_value(signal: Any, predicate: Callable[[Any], bool], timeout: float, what: str) -> None:
    """Block until ``predicate(value)`` holds for ``signal`` (monitor updates)."""
    done = threading.Event()

    def check(value: Any = None, **kwargs: Any) -> None:
        if predicate(value):
            done.set()

    cid = signal.subscribe(check, run=True)
    try:
        if not done.wait(timeout):
            raise NXRefineBSError(
                f"{what}: {signal.pvname} did not reach the expected value within {timeout} s "
                f"(it reads {signal.get()!r}); is the IOC alive?"
            )
    finally:
        signal.unsubscribe(cid)


# ---------------------------------------------------------------------- motors
class FlyingEpicsMotor(EpicsMotor):
    """``ophyd.EpicsMotor`` with the fly protocol of ophyd-async's ``Motor``.

    ``prepare(FlyMotorInfo)`` moves (at the present ``VELO``) to the start minus the
    run-up distance ``VELO_fly * ACCL / 2`` and sets ``VELO`` to the fly speed
    ``|end - start| / time_for_move``; ``kickoff`` starts the move to the end plus the
    run-up and finishes when the readback passes the start (the axis is at speed, so a
    detector started then sees a uniform rotation); ``complete`` returns the move's
    status.  The plans restore ``velocity`` after the
    rotation.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fly_target: float | None = None
        self._fly_start = (0.0, 1.0, 0.0)  # start, direction, ACCL of the prepared move
        self._fly_move: Any = None

    def prepare(self, value: Any) -> Status:
        """Go to the run-up position of ``value`` (a ``FlyMotorInfo``) and set the speed."""
        start, end = float(value.start_position), float(value.end_position)
        duration = float(value.time_for_move)
        if duration <= 0 or start == end:
            raise NXRefineBSError(
                f"{self.name}: a fly move needs a range and a positive time, got {start} -> "
                f"{end} in {duration} s"
            )
        speed = abs(end - start) / duration

        def work() -> None:
            direction = 1.0 if end > start else -1.0
            accel_time = float(self.acceleration.get())
            ramp = 0.5 * speed * accel_time
            self.move(start - direction * ramp, wait=True)
            _put(self.velocity, speed, timeout=30.0)
            self._fly_target = end + direction * ramp
            self._fly_start = (start, direction, accel_time)
            logger.debug("%s: prepared to fly %s -> %s at %s/s", self.name, start, end, speed)

        self._fly_target = None
        return _in_thread(self, work, f"{self.name} prepare")

    def kickoff(self) -> SubscriptionStatus:
        """Start the fly move; done when the axis passes the start at the fly speed."""
        if self._fly_target is None:
            raise NXRefineBSError(f"{self.name}: kickoff() before prepare(FlyMotorInfo)")
        start, direction, accel_time = self._fly_start
        self._fly_move = self.move(self._fly_target, wait=False)
        self._fly_target = None
        return SubscriptionStatus(
            self.user_readback,
            lambda value=None, **kw: value is not None and direction * (value - start) >= 0,
            timeout=2 * accel_time + 30.0,
            run=True,
        )

    def complete(self) -> Any:
        """The status of the fly move started by :meth:`kickoff`."""
        if self._fly_move is None:
            raise NXRefineBSError(f"{self.name}: complete() before kickoff()")
        move, self._fly_move = self._fly_move, None
        return move


class GoniometerV1(Device):
    """``phi`` (flies), ``chi``, ``omega`` motor records at absolute PV prefixes."""

    phi = FCpt(FlyingEpicsMotor, "{self._pv_phi}")
    chi = FCpt(EpicsMotor, "{self._pv_chi}")
    omega = FCpt(EpicsMotor, "{self._pv_omega}")

    def __init__(self, prefixes: Mapping[str, str], *, name: str, **kwargs: Any) -> None:
        self._pv_phi = prefixes["phi"]
        self._pv_chi = prefixes["chi"]
        self._pv_omega = prefixes["omega"]
        super().__init__("", name=name, **kwargs)


# ---------------------------------------------------------------------- temperature
class TemperatureControllerV1(Device):
    """``SP`` set point, ``T`` readback, ``TOL`` tolerance (K), as ophyd v1 signals.

    ``set(T)`` writes the set point; its status finishes when the readback is within
    the tolerance of ``T`` (fails after ``settle_timeout`` s).
    """

    readback = Cpt(EpicsSignalRO, "T", kind="hinted", auto_monitor=True)
    setpoint = Cpt(EpicsSignal, "SP", kind="config")
    tolerance = Cpt(EpicsSignal, "TOL", kind="config")

    def __init__(self, prefix: str, *, settle_timeout: float = 600.0, name: str, **kw: Any) -> None:
        super().__init__(prefix, name=name, **kw)
        self.settle_timeout = float(settle_timeout)

    def set(self, value: float, **kwargs: Any) -> StatusBase:
        """Go to ``value`` K; done when the readback is within ``TOL`` of it."""
        target = float(value)
        tolerance = float(self.tolerance.get())
        self.setpoint.put(target)
        return SubscriptionStatus(
            self.readback,
            lambda value=None, **kw: value is not None and abs(float(value) - target) <= tolerance,
            timeout=self.settle_timeout,
            run=True,
        )

    @property
    def position(self) -> float:
        """The readback (K)."""
        return float(self.readback.get())


# ---------------------------------------------------------------------- detector
class AreaDetectorV1Adapter:
    """A stock ophyd v1 areaDetector as a rotation detector (step and fly).

    Parameters
    ----------
    device : ophyd.areadetector.DetectorBase
        The v1 detector: a ``cam`` driver and an HDF5 file plugin (attribute ``writer``).
    path_provider : RotationPathProvider
        Names each rotation's file (``directory_path``, ``filename``,
        ``create_dir_depth``); the plans point it at ``<scan dir>/fN.h5``.
    writer : str
        Attribute of the file plugin on ``device``.
    timeout : float
        Seconds to wait for the IOC beyond the expected acquisition time.
    """

    def __init__(
        self, device: Any, path_provider: Any, *, writer: str = "hdf1", timeout: float = 30.0
    ) -> None:
        # Lazy areaDetector components connect on first use (connect_v1_devices waits for
        # them all at once) instead of blocking, one by one, when first touched.
        _no_lazy_wait(device)
        cam, hdf = getattr(device, "cam", None), getattr(device, writer, None)
        if cam is None or hdf is None:
            raise NXRefineBSError(
                f"{getattr(device, 'name', device)!r} is not an areaDetector with a cam and a "
                f"file plugin {writer!r}"
            )
        _no_lazy_wait(cam)
        _no_lazy_wait(hdf)
        self.device, self.cam, self.hdf = device, cam, hdf
        self.path_provider = path_provider
        self.timeout = float(timeout)
        self.parent = None
        self._lock = threading.Lock()
        self._file: Path | None = None
        self._mode: str | None = None
        self._per_event = 1
        self._n_events = 0
        self._period = 0.0
        self._first = 0  # NumCaptured when the fly acquisition was prepared
        self._acquired: Status | None = None
        self._assets: deque[tuple[str, dict[str, Any]]] = deque()
        self._resource_uid: str | None = None
        self._last_datum: str | None = None
        self._bundles: list[Any] = []
        self._emitted = 0
        self._collect_keys: dict[str, dict[str, Any]] | None = None

    # ------------------------------------------------------------------ identity
    @property
    def name(self) -> str:
        """The device name (the frames' data key)."""
        return str(self.device.name)

    @property
    def hints(self) -> dict[str, list[str]]:
        return {"fields": [self.name]}

    def signals(self) -> list[Any]:
        """The v1 signals this adapter uses (what :func:`connect_v1_devices` waits for)."""
        cam, hdf = self.cam, self.hdf
        return [
            cam.acquire, cam.acquire_time, cam.acquire_period, cam.num_images, cam.image_mode,
            cam.array_size.array_size_x, cam.array_size.array_size_y, cam.nd_attributes_file,
            hdf.file_path, hdf.file_name, hdf.file_template, hdf.file_write_mode,
            hdf.num_capture, hdf.num_captured, hdf.capture, hdf.full_file_name,
            hdf.file_path_exists, hdf.create_directory, cam.data_type,
        ]  # fmt: skip

    def __repr__(self) -> str:
        return f"AreaDetectorV1Adapter({self.device.prefix!r}, name={self.name!r})"

    # ------------------------------------------------------------------ staging
    def stage(self) -> list[Any]:
        """Point the HDF5 plugin at the path provider's file and start capturing."""
        info = self.path_provider(self.name)
        directory = str(info.directory_path).rstrip("/") + "/"
        hdf, t = self.hdf, self.timeout
        _put(hdf.create_directory, int(info.create_dir_depth), t)
        _put(hdf.file_path, directory, t)
        _put(hdf.file_name, str(info.filename), t)
        _put(hdf.file_template, FILE_TEMPLATE, t)
        _put(hdf.file_write_mode, 2, t)  # Stream
        _put(hdf.num_capture, 0, t)  # until Capture = 0
        if not int(hdf.file_path_exists.get()):
            raise NXRefineBSError(
                f"{self.name}: the IOC reports that {directory} does not exist or is not "
                f"writable ({hdf.file_path_exists.pvname}); create it on the detector host or "
                "allow the plugin to create it (CreateDirectory)"
            )
        hdf.capture.put(1, use_complete=True, callback=self._capture_ended)
        _wait_value(hdf.capture, lambda v: v in (1, "Capture"), t, f"{self.name} capture")
        self._file = Path(str(hdf.full_file_name.get()))
        self._mode, self._resource_uid, self._last_datum = None, None, None
        self._assets.clear()
        self._bundles, self._emitted, self._collect_keys = [], 0, None
        self._n_events, self._per_event, self._first = 0, 1, 0
        logger.info("%s: capturing to %s", self.name, self._file)
        return [self]

    def _capture_ended(self, *args: Any, **kwargs: Any) -> None:
        logger.debug("%s: capture ended", self.name)

    def unstage(self) -> list[Any]:
        """Stop an acquisition still running and close the file (``Capture`` = 0)."""
        try:
            if int(self.cam.acquire.get()):
                _put(self.cam.acquire, 0, self.timeout)
            _put(self.hdf.capture, 0, self.timeout)
            _wait_value(self.hdf.capture, lambda v: v in (0, "Done"), self.timeout, "unstage")
        finally:
            logger.info("%s: closed %s", self.name, self._file)
            self._file = None
        return [self]

    def _check_staged(self, what: str) -> Path:
        if self._file is None:
            raise NXRefineBSError(f"{self.name}: {what} before stage(); stage the detector")
        return self._file

    # ------------------------------------------------------------------ prepare
    def prepare(self, value: Any) -> Status:
        """Set exposure, period and images per acquisition from a ``TriggerInfo``."""
        self._check_staged("prepare()")
        n = value.number_of_events
        n = int(sum(n)) if isinstance(n, Sequence) else int(n)
        livetime, deadtime = float(value.livetime), float(value.deadtime)
        if n < 1 or livetime <= 0:
            raise NXRefineBSError(
                f"{self.name}: prepare needs number_of_events >= 1 and livetime > 0, got "
                f"{n} and {livetime}"
            )

        def work() -> None:
            cam, t = self.cam, self.timeout
            _put(cam.acquire_time, livetime, t)
            _put(cam.acquire_period, livetime + deadtime, t)
            _put(cam.num_images, n, t)
            _put(cam.image_mode, 1, t)  # Multiple
            self._n_events, self._period = n, livetime + deadtime
            self._first = int(self.hdf.num_captured.get())

        return _in_thread(self, work, f"{self.name} prepare")

    def _acquire(self) -> Status:
        """Start ``Acquire``; the status finishes when the IOC reports the acquisition done."""
        acquired = Status(self)

        def done(*args: Any, **kwargs: Any) -> None:
            if not acquired.done:
                acquired.set_finished()

        self.cam.acquire.put(1, use_complete=True, callback=done)
        return acquired

    def _frames_status(self, target: int, n: int) -> SubscriptionStatus:
        return SubscriptionStatus(
            self.hdf.num_captured,
            lambda value=None, **kw: value is not None and int(value) >= target,
            timeout=n * max(self._period, 1e-3) + self.timeout,
            run=True,
        )

    # ------------------------------------------------------------------ step
    def trigger(self) -> StatusBase:
        """Acquire the prepared frames (one by default) into the open file."""
        self._check_staged("trigger()")
        if self._mode is None:
            self._mode = "step"
            if not self._n_events:  # not prepared: one image per trigger
                _put(self.cam.image_mode, 0, self.timeout)  # Single
                self._n_events, self._period = 1, float(self.cam.acquire_time.get())
            self._per_event = self._n_events
        elif self._mode != "step":
            raise NXRefineBSError(f"{self.name}: trigger() during a fly acquisition")
        first = int(self.hdf.num_captured.get())
        self._queue_datum(first)
        frames = self._frames_status(first + self._per_event, self._per_event)
        return frames & self._acquire()

    def _queue_datum(self, first: int) -> None:
        path = self._check_staged("trigger()")
        with self._lock:
            if self._resource_uid is None:
                self._resource_uid = str(uuid.uuid4())
                self._assets.append(
                    (
                        "resource",
                        {
                            "uid": self._resource_uid,
                            "spec": "AD_HDF5",
                            "root": str(path.parent),
                            "resource_path": path.name,
                            "resource_kwargs": {"frame_per_point": self._per_event},
                            "path_semantics": "posix",
                        },
                    )
                )
            point = first // self._per_event
            datum_id = f"{self._resource_uid}/{point}"
            self._assets.append(
                (
                    "datum",
                    {
                        "datum_id": datum_id,
                        "resource": self._resource_uid,
                        "datum_kwargs": {"point_number": point},
                    },
                )
            )
            self._last_datum = datum_id

    def read(self) -> dict[str, Any]:
        """The last frame's datum id under the detector name."""
        return {self.name: {"value": self._last_datum, "timestamp": time.time()}}

    def _frame_shape(self) -> tuple[list[int], str]:
        size = self.cam.array_size
        shape = [int(size.array_size_y.get()), int(size.array_size_x.get())]
        dtype = _AD_DTYPES.get(str(self.cam.data_type.get(as_string=True)), "<i4")
        return shape, dtype

    def describe(self) -> dict[str, Any]:
        """The frames: ``external="FILESTORE:"``, shape ``[frames per event, ny, nx]``."""
        shape, dtype = self._frame_shape()
        return {
            self.name: {
                "source": f"PV:{self.hdf.prefix}",
                "dtype": "array",
                "dtype_numpy": dtype,
                "shape": [self._per_event, *shape],
                "external": "FILESTORE:",
            }
        }

    def read_configuration(self) -> dict[str, Any]:
        return {}

    def describe_configuration(self) -> dict[str, Any]:
        return {}

    # ------------------------------------------------------------------ fly
    def _ndattributes(self) -> dict[str, tuple[str, str]]:
        """``name -> (dtype, source)`` of the EPICS_PV NDAttributes the driver declares."""
        text = str(self.cam.nd_attributes_file.get() or "")
        if "<Attributes>" not in text:
            if text:
                logger.warning(
                    "%s: NDAttributesFile names a file on the IOC host (%s); its attributes are "
                    "not announced",
                    self.name,
                    text,
                )
            return {}
        try:
            root = ElementTree.fromstring(text)
        except ElementTree.ParseError as exc:
            logger.warning("%s: NDAttributesFile is not valid XML (%s)", self.name, exc)
            return {}
        out = {}
        for child in root:
            name = child.attrib.get("name", "")
            if not _KEY.match(name) or name == self.name:
                logger.warning("%s: skipping NDAttribute %r (not a data key)", self.name, name)
                continue
            if child.attrib.get("type", "EPICS_PV") == "EPICS_PV":
                dbr = child.attrib.get("dbrtype", "DBR_DOUBLE")
                out[name] = (_DBR_DTYPES.get(dbr, "<f8"), "ca://" + child.attrib.get("source", ""))
        return out

    def describe_collect(self) -> dict[str, Any]:
        """The frames and NDAttributes as ``STREAM:`` data keys (as ophyd-async's)."""
        if self._collect_keys is None:
            shape, dtype = self._frame_shape()
            source = f"ca://{self.hdf.full_file_name.pvname}"
            keys: dict[str, dict[str, Any]] = {
                self.name: {
                    "source": source,
                    "shape": [1, *shape],
                    "dtype": "array",
                    "dtype_numpy": dtype,
                    "external": "STREAM:",
                }
            }
            for name, (attr_dtype, attr_source) in self._ndattributes().items():
                keys[name] = {
                    "source": attr_source or source,
                    "shape": [1],
                    "dtype": "number",
                    "dtype_numpy": attr_dtype,
                    "external": "STREAM:",
                }
            self._collect_keys = keys
        return dict(self._collect_keys)

    def kickoff(self) -> StatusBase:
        """Start the prepared acquisition; done once the driver reports it is acquiring."""
        path = self._check_staged("kickoff()")
        if not self._n_events or self._mode == "step":
            raise NXRefineBSError(f"{self.name}: kickoff() needs prepare(TriggerInfo) first")
        self._mode = "fly"
        keys = self.describe_collect()
        compose = ComposeStreamResource()
        uri = path.as_uri()
        self._bundles = [
            compose(
                mimetype="application/x-hdf5",
                uri=uri,
                data_key=key,
                parameters={
                    "dataset": "/entry/data/data"
                    if key == self.name
                    else f"/entry/instrument/NDAttributes/{key}",
                    "chunk_shape": [1, *keys[key]["shape"][1:]] if key == self.name else [16384],
                },
            )
            for key in keys
        ]
        self._emitted = 0
        acquired = self._acquired = self._acquire()
        return SubscriptionStatus(
            self.cam.acquire,
            lambda value=None, **kw: value in (1, "Acquire") or bool(acquired.done),
            timeout=self.timeout,
            run=True,
        )

    def complete(self) -> StatusBase:
        """Done when every prepared frame is in the file and the acquisition has ended."""
        if self._mode != "fly" or self._acquired is None:
            raise NXRefineBSError(f"{self.name}: complete() before kickoff()")
        frames = self._frames_status(self._first + self._n_events, self._n_events)
        return frames & self._acquired

    def get_index(self) -> int:
        """Frames of the fly acquisition in the file so far."""
        return max(0, min(int(self.hdf.num_captured.get()) - self._first, self._n_events))

    def collect_asset_docs(self, index: int | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        """Step: the queued Resource/Datum.  Fly: StreamResource/StreamDatum up to ``index``."""
        if self._mode == "fly":
            stop = self.get_index() if index is None else min(int(index), self.get_index())
            if stop > self._emitted:
                if self._emitted == 0:
                    for bundle in self._bundles:
                        yield "stream_resource", bundle.stream_resource_doc
                indices = {"start": self._emitted, "stop": stop}
                self._emitted = stop
                for bundle in self._bundles:
                    yield "stream_datum", bundle.compose_stream_datum(indices)
            return
        with self._lock:
            items = list(self._assets)
            self._assets.clear()
        yield from items


# ---------------------------------------------------------------------- factory
def make_v1_devices(
    prefixes: Mapping[str, str],
    path_provider: Any,
    *,
    detector_class: str = "sim",
    monitors: Sequence[str] = ("MCS1", "MCS2"),
    detector_name: str = "detector",
) -> dict[str, Any]:
    """The ophyd v1 devices of a beamline (PV searches start; nothing waits).

    Parameters
    ----------
    prefixes : mapping
        Absolute PV prefixes of ``phi``, ``chi``, ``omega``, ``temperature``,
        ``detector`` and each monitor.
    path_provider : RotationPathProvider
        Names the detector's files.
    detector_class : str
        ``"sim"`` (ADSimDetector driver) or ``"pilatus"`` (ADPilatus).

    Returns
    -------
    dict
        ``goniometer``, ``detector`` (an :class:`AreaDetectorV1Adapter`), ``monitors``,
        ``temperature``.
    """
    classes = {"sim": SimDetectorV1, "pilatus": PilatusDetectorV1}
    if detector_class not in classes:
        raise NXRefineBSError(f"detector class must be 'sim' or 'pilatus', got {detector_class!r}")
    device = classes[detector_class](prefixes["detector"], name=detector_name)
    return {
        "goniometer": GoniometerV1(prefixes, name="goniometer"),
        "detector": AreaDetectorV1Adapter(device, path_provider),
        "monitors": [EpicsSignalRO(prefixes[m] + "Counts", name=m) for m in monitors],
        "temperature": TemperatureControllerV1(prefixes["temperature"], name="temperature"),
    }


def _signals_of(device: Any) -> list[Any]:
    if isinstance(device, AreaDetectorV1Adapter):
        return device.signals()
    if isinstance(device, Device):
        return [walk.item for walk in device.walk_signals()]
    return [device]


def channel_access_devices(devices: Sequence[Any]) -> list[Any]:
    """The ophyd v1 devices among ``devices`` that talk Channel Access (have EPICS signals)."""
    return [
        d
        for d in devices
        if isinstance(d, AreaDetectorV1Adapter)
        or (
            isinstance(d, (Device, EpicsSignalBase))
            and any(isinstance(s, EpicsSignalBase) for s in _signals_of(d))
        )
    ]


def all_connected(devices: Sequence[Any]) -> bool:
    """True when every PV the v1 ``devices`` use is connected."""
    return all(s.connected for d in devices for s in _signals_of(d))


def _pv_names(signal: Any) -> list[str]:
    names = [getattr(signal, "pvname", None), getattr(signal, "setpoint_pvname", None)]
    return sorted({str(n) for n in names if n})


def connect_v1_devices(devices: Sequence[Any], timeout: float = 5.0) -> None:
    """Wait until every PV the v1 devices use is connected.

    Raises
    ------
    DeviceConnectionError
        Naming the PVs (the first six per device) that did not connect within ``timeout``.
    """
    deadline = time.monotonic() + float(timeout)
    pending = [(d, s) for d in devices for s in _signals_of(d)]
    for _, signal in pending:
        with contextlib.suppress(TimeoutError):  # reported below, all at once
            signal.wait_for_connection(timeout=max(deadline - time.monotonic(), 0.01))
    failures = []
    for device in devices:
        # in component order (a motor's RBV and VAL first), each PV once
        names = list(
            dict.fromkeys(
                n for d, s in pending if d is device and not s.connected for n in _pv_names(s)
            )
        )
        if names:
            more = f" and {len(names) - 6} more" if len(names) > 6 else ""
            failures.append(f"{device.name}: {', '.join(names[:6])}{more}")
    if failures:
        raise DeviceConnectionError.from_failures(failures, timeout, "ophyd v1")
