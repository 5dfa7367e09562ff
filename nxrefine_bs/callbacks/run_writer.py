"""One run -> one ``fN`` entry: validation of the run's documents and the HDF5 writes.

:class:`RunWriter` holds what the scan-file writer knows about one run.  Its ``accept``
method runs on the RunEngine thread: it validates a document and files it in memory
(microseconds, no I/O).  Its ``apply`` method runs on the writer thread, inside one
copy-on-write update of the scan file (:func:`nxrefine_bs.nexus.scanfile.update_scan_file`),
and turns the accepted documents into HDF5.  The document contract is in
``docs/documents.md``; the start document's ``nxrefine`` dictionary is typed by
:class:`nxrefine_bs.documents.NXRefineMetadata` (the plans build it; the writer checks it).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import h5py
import numpy as np

from ..errors import InvalidNameError, MetadataError, PathSafetyError
from ..experiment import Experiment, safe_join, validate_name
from ..geometry import RUN_GEOMETRY_KEYS, Geometry
from ..nexus.entries import validate_rotation_entry
from ..nexus.geometry_io import write_geometry
from ..nexus.h5tools import nx_group, read_field, write_external_link, write_field
from ..nexus.provenance import now_iso, record_process

logger = logging.getLogger(__name__)

__all__ = ["RunWriter", "scan_file_for_start", "final_status"]

MAX_FRAMES = 10_000_000
"""Upper bound on ``n_frames`` accepted from a start document."""


def _uri_to_path(uri: str) -> Path:
    """Local path of a ``file://`` URI (or a plain path)."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file") and parsed.netloc in ("", "localhost"):
        return Path(unquote(parsed.path if parsed.scheme else uri))
    raise MetadataError(f"detector data URI {uri!r} is not a local file; cannot link it")


def nxrefine_md(start: Mapping[str, Any]) -> dict[str, Any]:
    """The start document's ``nxrefine`` dictionary (raises if missing).

    The plans build it as a :class:`~nxrefine_bs.documents.NXRefineMetadata`; here it
    is untrusted input, so it stays a plain dictionary whose values are checked where
    they are used (:meth:`RunWriter.__post_init__`).
    """
    md = start.get("nxrefine")
    if not isinstance(md, Mapping):
        raise MetadataError(
            f"run {start.get('uid', '?')}: start document has no 'nxrefine' dictionary; "
            "record it with the nxrefine_bs.plans rotation plans (see docs/documents.md)"
        )
    return dict(md)


def scan_file_for_start(start: Mapping[str, Any]) -> tuple[Path, Path, str]:
    """Validate a start document's names and return ``(experiment_dir, scan_file, entry)``.

    Only string checks: no file-system access (this runs on the RunEngine thread).

    Raises
    ------
    MetadataError
        If names are missing or unsafe, ``experiment_dir`` is not absolute, or the
        entry name is not ``f<number>``.
    """
    md = nxrefine_md(start)
    uid = start.get("uid", "?")
    try:
        sample = validate_name(str(start.get("sample", "")), "sample")
        label = validate_name(str(start.get("label", "")), "label")
        scan = validate_name(str(start.get("scan", "")), "scan")
    except ValueError as exc:
        raise MetadataError(f"run {uid}: {exc}") from exc
    try:
        entry = validate_rotation_entry(start.get("entry", ""), f"run {uid}")
    except InvalidNameError as exc:
        raise MetadataError(str(exc)) from exc
    raw_dir = str(md.get("experiment_dir", ""))
    experiment_dir = Path(raw_dir)
    if not raw_dir or not experiment_dir.is_absolute() or ".." in experiment_dir.parts:
        raise MetadataError(
            f"run {uid}: experiment_dir {raw_dir!r} must be an absolute path without '..'"
        )
    try:
        scan_file = safe_join(experiment_dir, sample, label, f"{sample}_{scan}.nxs")
    except PathSafetyError as exc:
        raise MetadataError(f"run {uid}: {exc}") from exc
    return experiment_dir, scan_file, entry


def _iso(timestamp: Any) -> str:
    if timestamp is None:
        return now_iso()
    return datetime.fromtimestamp(float(timestamp), UTC).astimezone().isoformat(timespec="seconds")


def _safe_key(key: str) -> str:
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in key) or "value"


def _resizable(group: h5py.Group, name: str, dtype: Any, units: str | None = None) -> h5py.Dataset:
    if name in group:
        obj = group.get(name, getlink=True)
        ds = group[name] if not isinstance(obj, h5py.ExternalLink) else None
        if isinstance(ds, h5py.Dataset) and ds.maxshape and ds.maxshape[0] is None:
            return ds
        del group[name]
    ds = group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(1024,))
    if units:
        ds.attrs["units"] = units
    return ds


def _write_column(group: h5py.Group, name: str, values: list[float], units: str | None) -> None:
    ds = _resizable(group, name, np.float64, units)
    ds.resize((len(values),))
    ds[:] = values


def _set_length(ds: h5py.Dataset, n: int) -> None:
    ds.resize((n,))
    ds[:] = np.arange(n, dtype=ds.dtype)


@dataclass
class _Resource:
    uid: str
    data_key: str
    path: Path
    dataset: str
    frames: int = 0
    linked: bool = False


@dataclass
class RunWriter:
    """Everything known about one run, and how to write it into its ``fN`` entry.

    Parameters
    ----------
    start : mapping
        The run's start document (validated by :func:`scan_file_for_start`).
    """

    start: dict[str, Any]
    md: dict[str, Any] = field(init=False)
    experiment_dir: Path = field(init=False)
    scan_file: Path = field(init=False)
    entry: str = field(init=False)
    detector_key: str = field(init=False)
    monitors: tuple[str, ...] = field(init=False)
    expected_frames: int | None = field(init=False)
    resources: dict[str, _Resource] = field(default_factory=dict)
    pending_datums: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    descriptors: dict[str, str] = field(default_factory=dict)  # uid -> stream name
    columns: dict[str, list[float]] = field(default_factory=dict)
    written: dict[str, int] = field(default_factory=dict)  # column -> values in the file
    baseline: dict[str, list[float]] = field(default_factory=dict)
    n_frames: int = 0
    stop_doc: dict[str, Any] | None = None
    prepared: bool = False
    roots: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        self.experiment_dir, self.scan_file, self.entry = scan_file_for_start(self.start)
        self.md = nxrefine_md(self.start)
        uid = self.start.get("uid", "?")
        if not (self.experiment_dir / "tasks" / "settings.ini").is_file():  # one stat
            raise MetadataError(
                f"run {uid}: experiment_dir {self.experiment_dir} is not an nxrefine-bs "
                "experiment (no tasks/settings.ini); create it with 'nxrefine-bs experiment new'"
            )
        det = self.md.get("detector") or {}
        if not isinstance(det, Mapping):
            raise MetadataError(f"run {uid}: nxrefine.detector must be a dictionary")
        self.detector_key = str(det.get("data_key", ""))
        monitors = self.md.get("monitors", ())
        if not isinstance(monitors, list | tuple):
            raise MetadataError(f"run {uid}: nxrefine.monitors must be a list of names")
        self.monitors = tuple(str(m) for m in monitors)
        n = self.md.get("n_frames")
        if n is not None and (not isinstance(n, int) or not 0 < n <= MAX_FRAMES):
            raise MetadataError(
                f"run {uid}: nxrefine.n_frames = {n!r} must be an integer in 1..{MAX_FRAMES}"
            )
        self.expected_frames = n
        geom = self.md.get("geometry") or {}
        missing = [k for k in RUN_GEOMETRY_KEYS if k not in geom]
        if missing:
            raise MetadataError(f"run {uid}: nxrefine.geometry lacks {', '.join(missing)}")
        try:
            Geometry(**{k: geom[k] for k in RUN_GEOMETRY_KEYS})
        except Exception as exc:
            raise MetadataError(f"run {uid}: invalid nxrefine.geometry: {exc}") from exc

    @property
    def uid(self) -> str:
        """The run's uid."""
        return str(self.start.get("uid", ""))

    # ------------------------------------------------------------------ RE thread
    def accept(self, name: str, doc: Mapping[str, Any]) -> None:
        """Validate ``doc`` and record it in memory (no I/O; runs on the RunEngine thread).

        Raises
        ------
        MetadataError
            For a document that does not belong to this run or breaks the contract.
        """
        handler = getattr(self, f"_accept_{name}", None)
        if handler is not None:
            handler(doc)

    def _accept_descriptor(self, doc: Mapping[str, Any]) -> None:
        self.descriptors[str(doc["uid"])] = str(doc.get("name", "primary"))

    def _accept_stream_resource(self, doc: Mapping[str, Any]) -> None:
        mimetype = doc.get("mimetype", "application/x-hdf5")
        if mimetype != "application/x-hdf5":
            logger.warning(
                "run %s: data key %s has mimetype %s; only HDF5 detector files are linked",
                self.uid,
                doc.get("data_key"),
                mimetype,
            )
            return
        path = _uri_to_path(str(doc["uri"]))
        dataset = str((doc.get("parameters") or {}).get("dataset", "/entry/data/data"))
        if not dataset.startswith("/") or ".." in dataset.split("/"):
            raise MetadataError(f"run {self.uid}: dataset path {dataset!r} is not absolute")
        uid = str(doc["uid"])
        self.resources[uid] = _Resource(uid, str(doc["data_key"]), path, dataset)
        for datum in self.pending_datums.pop(uid, []):
            self._accept_stream_datum(datum)

    def _accept_stream_datum(self, doc: Mapping[str, Any]) -> None:
        sres = str(doc["stream_resource"])
        res = self.resources.get(sres)
        if res is None:  # out of order: keep it until its StreamResource arrives
            self.pending_datums.setdefault(sres, []).append(dict(doc))
            return
        indices = doc.get("indices") or {}
        try:
            start, stop = int(indices["start"]), int(indices["stop"])
        except (KeyError, TypeError, ValueError):
            raise MetadataError(
                f"run {self.uid}: StreamDatum {doc.get('uid')} has no integer indices"
            ) from None
        limit = self.expected_frames or MAX_FRAMES
        if not 0 <= start <= stop <= limit:
            raise MetadataError(
                f"run {self.uid}: StreamDatum {doc.get('uid')} covers frames {start}..{stop}, "
                f"outside the {limit} frames the run declared (nxrefine.n_frames)"
            )
        res.frames = max(res.frames, stop)
        if res.data_key == self.detector_key:
            self.n_frames = max(self.n_frames, res.frames)

    def _accept_event_page(self, doc: Mapping[str, Any]) -> None:
        stream = self.descriptors.get(str(doc["descriptor"]))
        if stream is None:
            raise MetadataError(
                f"run {self.uid}: event page for unknown descriptor {doc['descriptor']}"
            )
        if stream == "baseline":
            for key, values in doc["data"].items():
                try:
                    arr = np.asarray(values, dtype=np.float64).ravel()
                except (TypeError, ValueError):
                    continue
                self.baseline.setdefault(_safe_key(key), []).extend(arr.tolist())
            return
        if stream != "primary":
            return
        for key, values in doc["data"].items():
            role = self.key_role(key)
            if role is None:
                continue
            col = self.columns.setdefault(role[1], [])
            col.extend(float(v) for v in values)
            limit = self.expected_frames or MAX_FRAMES
            if len(col) > limit:
                raise MetadataError(
                    f"run {self.uid}: more than {limit} values of {key} (nxrefine.n_frames)"
                )

    def _accept_stop(self, doc: Mapping[str, Any]) -> None:
        self.stop_doc = dict(doc)

    def key_role(self, data_key: str) -> tuple[str, str] | None:
        """Classify a data key: ``("monitor", name)``, ``("phi", "phi")`` or ``None``."""
        short = (
            data_key.split("-", 1)[1]
            if self.detector_key and data_key.startswith(f"{self.detector_key}-")
            else data_key
        )
        if short in self.monitors:
            return "monitor", short
        # ophyd-async names the readback "goniometer-phi", ophyd v1 "goniometer_phi"
        if short == "phi" or short.endswith(("-phi", "_phi")):
            return "phi", "phi"
        return None

    # ------------------------------------------------------------------ writer thread
    def check_roots(self) -> None:
        """Check the experiment and the linked files' locations (file-system checks).

        Raises
        ------
        MetadataError
            If ``experiment_dir`` is not an experiment made by this package, or a
            detector file lies outside the experiment's analysis and raw trees.
        """
        try:
            experiment = Experiment.open(self.experiment_dir)
        except Exception as exc:
            raise MetadataError(f"run {self.uid}: {exc}") from exc
        roots = [experiment.directory.resolve()]
        raw_home = (experiment.instrument_settings() or {}).get("raw_home")
        if raw_home:
            roots.append(Path(str(raw_home)).expanduser().resolve())
        self.roots = tuple(roots)

    def _check_link_target(self, res: _Resource) -> None:
        target = res.path.resolve()
        if not any(target == r or r in target.parents for r in self.roots):
            raise MetadataError(
                f"run {self.uid}: detector file {res.path} of {res.data_key} is outside the "
                f"experiment's analysis and raw trees ({', '.join(map(str, self.roots))}); "
                "links are only made to files under them"
            )

    def write_start(self, f: h5py.File) -> None:
        """Write the entry's geometry, metadata and empty data group."""
        doc, md = self.start, self.md
        geom_md = md.get("geometry") or {}
        geometry = Geometry(**{k: geom_md[k] for k in RUN_GEOMETRY_KEYS})
        root = f["entry"] if "entry" in f else nx_group(f, "entry", "NXentry")
        sample = nx_group(root, "sample", "NXsample")
        units = str(md.get("temperature_units", "K"))
        if doc.get("temperature") is not None:
            write_field(sample, "temperature", float(doc["temperature"]), units=units)
        fe = nx_group(f, self.entry, "NXentry")
        previous = read_field(fe, "acquisition/status")
        if read_field(fe, "acquisition/run_uid") == self.uid:
            previous = None  # the same run again (a restarted writer catching up)
        phi_end = geom_md.get("phi_end")
        write_geometry(fe, geometry, phi_end=None if phi_end is None else float(phi_end))
        det_md = md.get("detector") or {}
        detector = fe["instrument/detector"]
        if det_md.get("name"):
            write_field(detector, "description", str(det_md["name"]))
        if det_md.get("frame_time") is not None:
            write_field(detector, "frame_time", float(det_md["frame_time"]), units="s")
        trans = md.get("translation") or {}
        for axis in ("x", "y"):
            if axis in trans:
                write_field(detector, f"translation_{axis}", float(trans[axis]), units="mm")
        if "pixel_mask" not in detector:
            mask = _pyfai_mask(str(det_md.get("name", "")), geometry.shape)
            if mask is not None:
                write_field(detector, "pixel_mask", mask)
                write_field(detector, "pixel_mask_applied", False)
        if "sample" not in fe:
            fe["sample"] = sample
        data = nx_group(fe, "data", "NXdata")
        data.attrs["signal"] = "data"
        data.attrs["axes"] = ["frame_number", "y_pixel", "x_pixel"]
        ny, nx = geometry.shape
        write_field(data, "x_pixel", np.arange(nx, dtype=np.int32), units="pixel")
        write_field(data, "y_pixel", np.arange(ny, dtype=np.int32), units="pixel")
        for name in ("frame_number", "frame_time", "monitor_weight", "phi"):
            if name in data:
                del data[name]
        if previous is not None and "monitor" in fe:
            del fe["monitor"]
        _resizable(data, "frame_number", np.int32)
        write_field(fe, "start_time", _iso(doc.get("time")))
        if "end_time" in fe:
            del fe["end_time"]
        acq = nx_group(fe, "acquisition", "NXcollection")
        if previous is not None:
            attempts = int(read_field(acq, "attempts", 1))
            write_field(acq, "attempts", attempts + 1)
            logger.warning(
                "run %s re-collects %s:%s (previous status %s)",
                self.uid,
                self.scan_file,
                self.entry,
                previous,
            )
        for name in ("exit_status", "reason", "num_frames", "frames_collected"):
            if name in acq:
                del acq[name]
        write_field(acq, "status", "running")
        write_field(acq, "run_uid", self.uid)
        write_field(acq, "plan_name", str(doc.get("plan_name", "")))
        if self.expected_frames is not None:
            write_field(acq, "frames_expected", np.int64(self.expected_frames))
        write_field(acq, "start_document", json.dumps(doc, default=str))

    def write_progress(self, f: h5py.File) -> None:
        """Bring links, frame numbers and per-frame columns up to date in ``f``."""
        fe = f[self.entry]
        # The RunEngine thread adds resources and appends values meanwhile: work on
        # snapshots (list() of a dict or list is atomic under the GIL).
        for res in list(self.resources.values()):
            if not res.linked:
                self._check_link_target(res)
                self._link(fe, res)
                res.linked = True
        data = fe["data"]
        n = self.n_frames
        if n and data["frame_number"].shape[0] != n:
            _set_length(data["frame_number"], n)
        for name, column in list(self.columns.items()):
            values = list(column)
            if self.written.get(name) == len(values):
                continue
            if name == "phi":
                _write_column(data, "phi", values, "degree")
            else:
                mon = nx_group(fe, "monitor", "NXmonitor")
                self._monitor_signal(mon, name)
                _write_column(mon, name, values, None)
            self.written[name] = len(values)
        if self.baseline:
            logs = nx_group(nx_group(fe, "instrument", "NXinstrument"), "logs", "NXcollection")
            for key, column in list(self.baseline.items()):
                values = list(column)
                if self.written.get(f"baseline:{key}") != len(values):
                    _write_column(logs, key, values, None)
                    self.written[f"baseline:{key}"] = len(values)

    def _link(self, fe: h5py.Group, res: _Resource) -> None:
        role = self.key_role(res.data_key)
        if res.data_key == self.detector_key:
            write_external_link(fe["data"], "data", res.path, res.dataset)
        elif role is not None and role[0] == "monitor":
            mon = nx_group(fe, "monitor", "NXmonitor")
            write_external_link(mon, role[1], res.path, res.dataset)
            self._monitor_signal(mon, role[1])
        elif role is not None and role[0] == "phi":
            write_external_link(fe["data"], "phi", res.path, res.dataset)
        else:
            logs = nx_group(nx_group(fe, "instrument", "NXinstrument"), "logs", "NXcollection")
            write_external_link(logs, _safe_key(res.data_key), res.path, res.dataset)

    def _monitor_signal(self, mon: h5py.Group, name: str) -> None:
        """The first of ``nxrefine.monitors`` is the signal, whatever the arrival order."""
        preferred = self.monitors[0] if self.monitors else name
        if "signal" not in mon.attrs or name == preferred:
            mon.attrs["signal"] = name
        mon.attrs["axes"] = "frame_number"

    def write_stop(self, f: h5py.File) -> str:
        """Finish the entry from the stop document; return the status recorded."""
        doc = self.stop_doc or {}
        fe = f[self.entry]
        data = fe["data"]
        n = self.n_frames or max((len(v) for v in self.columns.values()), default=0)
        if n and data["frame_number"].shape[0] != n:
            _set_length(data["frame_number"], n)
        frame_time = read_field(fe, "instrument/detector/frame_time", 0.1)
        write_field(
            data,
            "frame_time",
            float(frame_time) * np.arange(n, dtype=np.float64),
            units="s",
            attrs={"start": read_field(fe, "start_time", "")},
        )
        _materialise_links(fe)
        counts = _monitor_counts(fe)
        if "monitor" in fe:
            write_field(fe["monitor"], "frame_number", np.arange(n, dtype=np.int32))
        _finish_phi(fe)
        if "instrument/detector/pixel_mask" not in fe:
            _mask_from_frames(fe)
        status, reason = final_status(doc, n, self.expected_frames, counts)
        if self.pending_datums:
            status = "fail" if status == "success" else status
            reason = (reason + "; " if reason else "") + (
                "StreamDatum documents for unknown resources "
                f"{', '.join(sorted(self.pending_datums))} were never resolved"
            )
        write_field(fe, "end_time", _iso(doc.get("time")))
        acq = nx_group(fe, "acquisition", "NXcollection")
        write_field(acq, "status", status)
        write_field(acq, "exit_status", str(doc.get("exit_status", "unknown")))
        if reason:
            write_field(acq, "reason", reason)
        write_field(acq, "num_frames", np.int64(n))
        write_field(acq, "frames_collected", np.int64(n))
        if counts:
            write_field(acq, "monitor_counts", json.dumps(counts))
        if status == "success":
            record_process(
                fe,
                "nxlink",
                parameters={"run_uid": self.uid, "frames": n},
                start_time=read_field(fe, "start_time"),
                summary={"frames": n, "monitors": sorted(counts)},
            )
        elif "nxworkflow/nxlink" in fe:
            del fe["nxworkflow/nxlink"]
        logger.info(
            "run %s finished (%s): %s:%s has %d of %s frames",
            self.uid,
            status,
            self.scan_file,
            self.entry,
            n,
            self.expected_frames if self.expected_frames is not None else "?",
        )
        return status


def final_status(
    stop: Mapping[str, Any], frames: int, expected: int | None, monitor_counts: Mapping[str, int]
) -> tuple[str, str]:
    """The truthful status of a run: ``(status, reason)``.

    ``success`` only when the RunEngine says so **and** every expected frame and every
    monitor value is present; a RunEngine ``stop()`` (reported by Bluesky as success)
    that ends a rotation early is ``stop``; ``abort``, ``halt`` and ``fail`` are kept.

    Examples
    --------
    >>> final_status({"exit_status": "success"}, 60, 60, {"MCS1": 60})
    ('success', '')
    >>> final_status({"exit_status": "success"}, 25, 60, {"MCS1": 25})[0]
    'stop'
    >>> final_status({"exit_status": "abort", "reason": "RE.halt()"}, 5, 60, {})[0]
    'halt'
    """
    exit_status = str(stop.get("exit_status", "unknown"))
    reason = str(stop.get("reason") or "")
    if exit_status == "abort" and "halt" in reason.lower():
        exit_status = "halt"
    problems = []
    if expected is not None and frames != expected:
        problems.append(f"{frames} of {expected} frames")
    bad = {k: v for k, v in monitor_counts.items() if v != frames}
    if bad:
        problems.append(
            "monitor values " + ", ".join(f"{k}: {v}" for k, v in sorted(bad.items()))
            + f" for {frames} frames"
        )
    if exit_status == "success" and problems:
        what = "; ".join(problems)
        if expected is not None and frames < expected:
            return "stop", f"rotation ended early (RunEngine stop or plan end): {what}"
        return "fail", f"inconsistent run: {what}"
    if problems:
        reason = "; ".join([reason, *problems]) if reason else "; ".join(problems)
    return exit_status, reason


def _monitor_counts(fe: h5py.Group) -> dict[str, int]:
    if "monitor" not in fe:
        return {}
    counts = {}
    for name, obj in fe["monitor"].items():
        if name == "frame_number":
            continue
        if isinstance(obj, h5py.Dataset) and obj.ndim == 1:
            counts[name] = int(obj.shape[0])
    return counts


def _materialise_links(fe: h5py.Group) -> None:
    """Replace links to small per-frame datasets by copies, when the file is readable."""
    targets: list[h5py.Group] = [fe["data"]]
    if "monitor" in fe:
        targets.append(fe["monitor"])
    for grp in targets:
        for name in list(grp):
            link = grp.get(name, getlink=True)
            if not isinstance(link, h5py.ExternalLink) or name == "data":
                continue
            path = (Path(grp.file.filename).parent / link.filename).resolve()
            try:
                with h5py.File(path, "r", swmr=True, libver="latest") as src:
                    values = np.asarray(src[link.path][()], dtype=np.float64).ravel()
            except (OSError, KeyError) as exc:
                logger.info("keeping link %s -> %s (%s)", grp.name + "/" + name, path, exc)
                continue
            del grp[name]
            write_field(grp, name, values, attrs={"source": f"{link.filename}#{link.path}"})


def _finish_phi(fe: h5py.Group) -> None:
    """Store per-frame phi as ``goniometer/phi`` (array, @step, @end) as NXRefine reads it."""
    phi = read_field(fe, "data/phi")
    if phi is None or np.size(phi) < 2:
        return
    values = np.asarray(phi, dtype=np.float64)
    gon = fe["instrument/goniometer"]
    old = gon["phi"].attrs
    attrs = {k: old[k] for k in ("end",) if k in old}
    attrs["step"] = float(np.median(np.diff(values)))
    write_field(gon, "phi", values, units="degree", attrs=attrs)


def _mask_from_frames(fe: h5py.Group) -> None:
    """Derive the gap mask from the first frame (gaps are negative) if none is known.

    The detector file is opened separately, read-only, so raw data are never opened for
    writing through the link.
    """
    link = fe["data"].get("data", getlink=True)
    if not isinstance(link, h5py.ExternalLink):
        return
    path = (Path(fe.file.filename).parent / link.filename).resolve()
    try:
        with h5py.File(path, "r", swmr=True, libver="latest") as src:
            frame = src[link.path][0]
    except (KeyError, OSError, IndexError, ValueError):
        return
    write_field(fe["instrument/detector"], "pixel_mask", (frame < 0).astype(np.int8))
    write_field(fe["instrument/detector"], "pixel_mask_applied", False)


def _pyfai_mask(name: str, shape: tuple[int, int]) -> np.ndarray | None:
    if not name:
        return None
    import pyFAI.detectors  # heavy: pyFAI (loaded at NeXusScanWriter set-up)

    known = pyFAI.detectors.ALL_DETECTORS
    if not any(n in known for n in (name.lower().replace(" ", "_"), name.lower().replace(" ", ""))):
        return None
    try:
        det = pyFAI.detectors.detector_factory(name)
    except Exception:  # unknown names are fine: the mask then comes from the frames
        return None
    if tuple(det.shape) != tuple(shape):
        return None
    mask = det.calc_mask()
    return None if mask is None else mask.astype(np.int8)
