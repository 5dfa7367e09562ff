"""The NeXus scan-file writer: live Bluesky documents -> ``<sample>_<scan>.nxs``.

One run is one rotation and fills one ``fN`` entry of the scan file (the document
contract is in ``docs/documents.md``).  The writer

* creates the scan file at ``start`` (from the run's configuration template if it has
  one) and writes the geometry, sample and run metadata of the entry;
* writes a **relative** external link ``fN/data/data`` to the detector's ``fN.h5`` as
  soon as its ``StreamResource`` arrives -- it never copies frames and never waits for
  the detector to close its file;
* appends per-frame monitor, phi and other scalar readings as they arrive (events) or
  links them from the detector file (fly scans), and copies them in at ``stop`` when the
  detector file is readable;
* opens and closes the scan file for every document it writes, so a crash or an abort
  leaves a valid HDF5 file whose ``fN/acquisition/status`` says the run did not finish.

Legacy ophyd v1 ``Resource``/``Datum`` documents are normalised to
``StreamResource``/``StreamDatum`` by bluesky-tiled-plugins' ``RunNormalizer`` first, so
live ophyd-async, ophyd v1 and archived runs replayed from Tiled share one code path.

This is a data-saving callback: errors are raised, never swallowed.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import h5py
import numpy as np
from event_model import DocumentRouter

from ..errors import MetadataError, PathSafetyError
from ..experiment import safe_join, validate_name
from ..geometry import RUN_GEOMETRY_KEYS, Geometry
from ..nexus.geometry_io import write_geometry
from ..nexus.h5tools import nx_group, read_field, write_external_link, write_field
from ..nexus.provenance import now_iso, record_process
from ..nexus.scanfile import create_scan_file, locked, update_scan_file

logger = logging.getLogger(__name__)

__all__ = ["NeXusScanWriter", "nexus_writer_factory", "scan_file_for_start"]


def _uri_to_path(uri: str) -> Path:
    """Local path of a ``file://`` URI (or a plain path)."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path if parsed.scheme else uri))
    raise MetadataError(f"detector data URI {uri!r} is not a local file; cannot link it")


def _nxrefine_md(start: Mapping[str, Any]) -> dict[str, Any]:
    md = start.get("nxrefine")
    if not isinstance(md, Mapping):
        raise MetadataError(
            f"run {start.get('uid', '?')}: start document has no 'nxrefine' dictionary; "
            "record it with the nxrefine_bs.plans rotation plans (see docs/documents.md)"
        )
    return dict(md)


def scan_file_for_start(start: Mapping[str, Any]) -> tuple[Path, Path, str]:
    """Validate a start document and return ``(experiment_dir, scan_file, entry)``.

    Raises
    ------
    MetadataError
        If names are missing or unsafe, the experiment directory does not exist, or the
        entry name is not ``f<number>``.
    """
    md = _nxrefine_md(start)
    uid = start.get("uid", "?")
    try:
        sample = validate_name(str(start.get("sample", "")), "sample")
        label = validate_name(str(start.get("label", "")), "label")
        scan = validate_name(str(start.get("scan", "")), "scan")
    except ValueError as exc:
        raise MetadataError(f"run {uid}: {exc}") from exc
    entry = str(start.get("entry", ""))
    if not (entry.startswith("f") and entry[1:].isdigit() and int(entry[1:]) > 0):
        raise MetadataError(f"run {uid}: entry {entry!r} must be f1, f2, ...")
    experiment_dir = Path(str(md.get("experiment_dir", "")))
    if not experiment_dir.is_absolute() or not experiment_dir.is_dir():
        raise MetadataError(
            f"run {uid}: experiment_dir {str(experiment_dir)!r} is not an existing absolute "
            "directory; create it with 'nxrefine-bs experiment new'"
        )
    try:
        scan_file = safe_join(experiment_dir, sample, label, f"{sample}_{scan}.nxs")
    except PathSafetyError as exc:
        raise MetadataError(f"run {uid}: {exc}") from exc
    return experiment_dir, scan_file, entry


@dataclass
class _Resource:
    data_key: str
    path: Path
    dataset: str
    frames: int = 0


@dataclass
class _RunState:
    start: dict[str, Any]
    md: dict[str, Any]
    experiment_dir: Path
    scan_file: Path
    entry: str
    detector_key: str
    monitors: tuple[str, ...]
    resources: dict[str, _Resource] = field(default_factory=dict)
    streams: dict[str, str] = field(default_factory=dict)  # descriptor uid -> stream name
    columns: dict[str, list[float]] = field(default_factory=dict)
    n_frames: int = 0


class _RunWriter(DocumentRouter):
    """Writes one run (one ``fN`` entry); created by :class:`NeXusScanWriter` per run."""

    def __init__(self, start: Mapping[str, Any]) -> None:
        super().__init__()
        experiment_dir, scan_file, entry = scan_file_for_start(start)
        md = _nxrefine_md(start)
        det = md.get("detector") or {}
        self.state = _RunState(
            start=dict(start),
            md=md,
            experiment_dir=experiment_dir,
            scan_file=scan_file,
            entry=entry,
            detector_key=str(det.get("data_key", "")),
            monitors=tuple(str(m) for m in md.get("monitors", ())),
        )

    # ------------------------------------------------------------------ helpers
    def _open(self) -> contextlib.AbstractContextManager[h5py.File]:
        return update_scan_file(self.state.scan_file)

    def _key_role(self, data_key: str) -> tuple[str, str] | None:
        """Classify a data key: ``("monitor", name)``, ``("phi", "phi")`` or ``None``."""
        st = self.state
        short = (
            data_key.split("-", 1)[1] if data_key.startswith(f"{st.detector_key}-") else data_key
        )
        if short in st.monitors:
            return "monitor", short
        # ophyd-async names the readback "goniometer-phi", ophyd v1 "goniometer_phi"
        if short == "phi" or short.endswith(("-phi", "_phi")):
            return "phi", "phi"
        return None

    def _monitor_signal(self, mon: h5py.Group, name: str) -> None:
        """Make the first monitor of ``nxrefine.monitors`` the NXmonitor's signal.

        The choice must not depend on the order in which the monitors' resources or
        readings arrive (an archived run replayed from Tiled may list them in another
        order than the live run did).
        """
        preferred = self.state.monitors[0] if self.state.monitors else name
        if "signal" not in mon.attrs or name == preferred:
            mon.attrs["signal"] = name
        mon.attrs["axes"] = "frame_number"

    # ------------------------------------------------------------------ documents
    def start(self, doc: dict[str, Any]) -> None:
        st = self.state
        geom_md = st.md.get("geometry") or {}
        missing = [k for k in RUN_GEOMETRY_KEYS if k not in geom_md]
        if missing:
            raise MetadataError(
                f"run {doc.get('uid')}: nxrefine.geometry lacks {', '.join(missing)}"
            )
        geometry = Geometry(**{k: geom_md[k] for k in RUN_GEOMETRY_KEYS})
        config = st.md.get("configuration")
        if not st.scan_file.exists():
            if config:
                create_scan_file(
                    Path(config),
                    st.experiment_dir,
                    str(doc["sample"]),
                    str(doc["label"]),
                    str(doc["scan"]),
                    temperature=doc.get("temperature"),
                    temperature_units=str(st.md.get("temperature_units", "K")),
                )
            else:
                _create_bare_scan_file(st.scan_file, doc)
        with self._open() as f:
            root = f["entry"] if "entry" in f else nx_group(f, "entry", "NXentry")
            sample = nx_group(root, "sample", "NXsample")
            if doc.get("temperature") is not None:
                write_field(
                    sample,
                    "temperature",
                    float(doc["temperature"]),
                    units=str(st.md.get("temperature_units", "K")),
                )
            fe = nx_group(f, st.entry, "NXentry")
            phi_end = geom_md.get("phi_end")
            write_geometry(fe, geometry, phi_end=None if phi_end is None else float(phi_end))
            det_md = st.md.get("detector") or {}
            detector = fe["instrument/detector"]
            if det_md.get("name"):
                write_field(detector, "description", str(det_md["name"]))
            if det_md.get("frame_time") is not None:
                write_field(detector, "frame_time", float(det_md["frame_time"]), units="s")
            trans = st.md.get("translation") or {}
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
            for name in ("frame_number", "frame_time", "monitor_weight"):
                if name in data:
                    del data[name]
            _resizable(data, "frame_number", np.int32)
            write_field(fe, "start_time", _iso(doc.get("time")))
            acq = nx_group(fe, "acquisition", "NXcollection")
            write_field(acq, "status", "running")
            write_field(acq, "run_uid", str(doc.get("uid", "")))
            write_field(acq, "plan_name", str(doc.get("plan_name", "")))
            write_field(acq, "start_document", json.dumps(doc, default=str))
            if "end_time" in fe:
                del fe["end_time"]
        logger.info("writing run %s into %s:%s", doc.get("uid"), st.scan_file, st.entry)

    def descriptor(self, doc: dict[str, Any]) -> None:
        self.state.streams[doc["uid"]] = doc.get("name", "primary")

    def stream_resource(self, doc: dict[str, Any]) -> None:
        st = self.state
        if doc.get("mimetype", "application/x-hdf5") != "application/x-hdf5":
            logger.warning(
                "run %s: data key %s has mimetype %s; only HDF5 detector files are linked",
                st.start.get("uid"),
                doc.get("data_key"),
                doc.get("mimetype"),
            )
            return
        path = _uri_to_path(str(doc["uri"]))
        dataset = str((doc.get("parameters") or {}).get("dataset", "/entry/data/data"))
        res = _Resource(str(doc["data_key"]), path, dataset)
        st.resources[str(doc["uid"])] = res
        role = self._key_role(res.data_key)
        with self._open() as f:
            fe = f[st.entry]
            if res.data_key == st.detector_key:
                write_external_link(fe["data"], "data", path, dataset)
            elif role is not None and role[0] == "monitor":
                mon = nx_group(fe, "monitor", "NXmonitor")
                write_external_link(mon, role[1], path, dataset)
                self._monitor_signal(mon, role[1])
            elif role is not None and role[0] == "phi":
                write_external_link(fe["data"], "phi", path, dataset)
            else:
                logs = nx_group(nx_group(fe, "instrument", "NXinstrument"), "logs", "NXcollection")
                write_external_link(logs, _safe_key(res.data_key), path, dataset)

    def stream_datum(self, doc: dict[str, Any]) -> None:
        st = self.state
        res = st.resources.get(str(doc["stream_resource"]))
        if res is None:
            return
        res.frames = max(res.frames, int(doc["indices"]["stop"]))
        if res.data_key == st.detector_key and res.frames > st.n_frames:
            st.n_frames = res.frames
            with self._open() as f:
                _extend(f[st.entry]["data/frame_number"], np.arange(st.n_frames, dtype=np.int32))

    def event_page(self, doc: dict[str, Any]) -> None:
        st = self.state
        stream = st.streams.get(doc["descriptor"], "primary")
        if stream == "baseline":
            self._baseline(doc)
            return
        if stream != "primary":
            return
        updates: dict[str, list[float]] = {}
        for key, values in doc["data"].items():
            role = self._key_role(key)
            if role is None:
                continue
            col = st.columns.setdefault(role[1], [])
            new = [float(v) for v in values]
            col.extend(new)
            updates[role[1]] = new
        if not updates:
            return
        with self._open() as f:
            fe = f[st.entry]
            for name, values in updates.items():
                if name == "phi":
                    ds = _resizable(fe["data"], "phi", np.float64, units="degree")
                else:
                    mon = nx_group(fe, "monitor", "NXmonitor")
                    self._monitor_signal(mon, name)
                    ds = _resizable(mon, name, np.float64)
                _append(ds, values)

    def _baseline(self, doc: dict[str, Any]) -> None:
        st = self.state
        with self._open() as f:
            logs = nx_group(
                nx_group(f[st.entry], "instrument", "NXinstrument"), "logs", "NXcollection"
            )
            for key, values in doc["data"].items():
                try:
                    arr = np.asarray(values, dtype=np.float64)
                except (TypeError, ValueError):
                    continue
                ds = _resizable(logs, _safe_key(key), np.float64)
                _append(ds, arr.tolist())

    def stop(self, doc: dict[str, Any]) -> None:
        st = self.state
        status = str(doc.get("exit_status", "unknown"))
        with self._open() as f:
            fe = f[st.entry]
            data = fe["data"]
            n = st.n_frames or max((len(v) for v in st.columns.values()), default=0)
            if n and data["frame_number"].shape[0] != n:
                _extend(data["frame_number"], np.arange(n, dtype=np.int32))
            frame_time = read_field(fe, "instrument/detector/frame_time", 0.1)
            write_field(
                data,
                "frame_time",
                float(frame_time) * np.arange(n, dtype=np.float64),
                units="s",
                attrs={"start": read_field(fe, "start_time", "")},
            )
            self._materialise_links(fe)
            self._finish_phi(fe)
            if "instrument/detector/pixel_mask" not in fe:
                self._mask_from_frames(fe)
            write_field(fe, "end_time", _iso(doc.get("time")))
            acq = nx_group(fe, "acquisition", "NXcollection")
            write_field(acq, "status", status)
            write_field(acq, "exit_status", status)
            if doc.get("reason"):
                write_field(acq, "reason", str(doc["reason"]))
            write_field(acq, "num_frames", np.int64(n))
            if status == "success":
                record_process(
                    fe,
                    "nxlink",
                    parameters={"run_uid": st.start.get("uid"), "frames": n},
                    start_time=read_field(fe, "start_time"),
                    summary={"frames": n, "monitors": sorted(st.columns)},
                )
        logger.info(
            "run %s finished (%s): %s:%s has %d frames",
            st.start.get("uid"),
            status,
            st.scan_file,
            st.entry,
            n,
        )

    # ------------------------------------------------------------------ stop helpers
    def _materialise_links(self, fe: h5py.Group) -> None:
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

    def _finish_phi(self, fe: h5py.Group) -> None:
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

    def _mask_from_frames(self, fe: h5py.Group) -> None:
        """Derive the gap mask from the first frame (gaps are negative) if none is known.

        The detector file is opened separately, read-only: dereferencing the link from
        the scan file (open for writing) would open the raw file for writing too.
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


def _create_bare_scan_file(scan_file: Path, start: Mapping[str, Any]) -> None:
    """Create a scan file with only ``entry/sample`` (runs without a configuration)."""
    scan_file.parent.mkdir(parents=True, exist_ok=True)
    with locked(scan_file), h5py.File(scan_file, "w-") as f:
        f.attrs["NX_class"] = "NXroot"
        f.attrs["default"] = "entry"
        f.attrs["creator"] = "nxrefine-bs NeXusScanWriter"
        entry = nx_group(f, "entry", "NXentry")
        sample = nx_group(entry, "sample", "NXsample")
        write_field(sample, "name", str(start["sample"]))
        write_field(sample, "label", str(start["label"]))


def _iso(timestamp: Any) -> str:
    if timestamp is None:
        return now_iso()
    from datetime import UTC, datetime

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


def _append(ds: h5py.Dataset, values: list[float]) -> None:
    n = ds.shape[0]
    ds.resize((n + len(values),))
    ds[n:] = values


def _extend(ds: h5py.Dataset, values: np.ndarray) -> None:
    ds.resize((len(values),))
    ds[:] = values


def _pyfai_mask(name: str, shape: tuple[int, int]) -> np.ndarray | None:
    if not name:
        return None
    import pyFAI.detectors

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


class NeXusScanWriter:
    """Bluesky callback writing every rotation run into its scan file.

    Subscribe it to a RunEngine (``RE.subscribe(NeXusScanWriter())``) or to a
    ``RemoteDispatcher`` to run it out of process.  Runs whose start document has no
    ``nxrefine`` dictionary are ignored (with a debug message); a run with invalid
    ``nxrefine`` metadata raises :class:`~nxrefine_bs.errors.MetadataError`.

    Parameters
    ----------
    normalize : bool
        Pass documents through bluesky-tiled-plugins' ``RunNormalizer`` first, so that
        ophyd v1 ``Resource``/``Datum`` runs are written like ophyd-async ones.
    """

    def __init__(self, *, normalize: bool = True) -> None:
        self.normalize = normalize
        self._entry: Callable[[str, dict[str, Any]], Any] | None = None
        self._writer: _RunWriter | None = None
        self.last_scan_file: Path | None = None
        # Import now, at set-up: importing these on the first start document (~1-2 s)
        # would block the RunEngine at the start of the first scan.
        import pyFAI.detectors  # noqa: F401  (used by _pyfai_mask)

        if normalize:
            from bluesky_tiled_plugins.writing.tiled_writer import RunNormalizer  # noqa: F401

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        if name == "start":
            self._writer = None
            self._entry = None
            if "nxrefine" not in doc:
                logger.debug("run %s has no nxrefine metadata; not writing it", doc.get("uid"))
                return
            writer = _RunWriter(doc)
            self._writer = writer
            self.last_scan_file = writer.state.scan_file
            if self.normalize:
                from bluesky_tiled_plugins.writing.tiled_writer import RunNormalizer

                normalizer = RunNormalizer()
                normalizer.subscribe(writer)
                self._entry = normalizer
            else:
                self._entry = writer
        if self._entry is None:
            return
        try:
            self._entry(name, doc)
        finally:
            if name == "stop":
                self._entry = None
                self._writer = None


def nexus_writer_factory(name: str, start_doc: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    """``event_model.RunRouter`` factory giving one :class:`NeXusScanWriter` per run."""
    return [NeXusScanWriter()], []
