"""Sum repeated scans taken under identical conditions into a new scan.

:func:`sum_scans` adds the detector stacks of two or more scan files frame by frame
(and their monitors) and writes a new scan ``<sample>_<output>.nxs`` with its own
``<output>/fN.h5`` beside the first scan, in the layout of
:func:`~nxrefine_bs.nexus.scanfile.create_scan_file`, so the normal workflow can
reduce it.

Rules
-----
* Every scan must have the same rotation entries, and for each entry the same stack
  shape ``(frames, ny, nx)``, phi start and step, chi, omega, theta, wavelength and
  distance; anything else is refused with an error naming the scans and the mismatch.
* Pixels that are negative (detector gaps, dead pixels: -1 in Pilatus frames) in any
  of the scans stay -1 in the sum: they are not summed to -N.
* Integer stacks are summed in int64 and stored as int32; a sum beyond the int32
  range is an error.  Floating-point stacks are summed in float64, stored as float32.
* Frames are streamed in slabs, so memory use does not grow with the scan length.
* Monitors (every per-frame channel of ``fN/monitor``) are summed, and so is
  ``fN/data/monitor_weight`` when every scan has it.
* What the new scan keeps of the first scan: ``/entry`` ``sample``, ``instrument``,
  ``nxreduce``, ``nxscans`` and ``start_time``; per entry ``instrument`` (without
  ``logs``, which are per scan), ``start_time``, ``data`` axes and the summed monitor.
  Reduction results (peaks, transforms, workflow records...) are not copied.  An
  ``nxsum`` NXprocess in ``/entry`` and every ``fN`` lists the source scans.
* Nothing existing is replaced unless ``overwrite`` is True; stacks and the scan
  file are written to temporary names and renamed at the end.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from .. import __version__
from ..errors import FileExistsNXError, ScanFileError
from ..experiment import ScanPaths, validate_name
from .codecs import ensure_plugins
from .h5tools import nx_group, read_field, write_external_link, write_field
from .provenance import record_process
from .scanfile import check_data_link, locked, open_scan_file, rotation_entries
from .template import DATA_PATH

__all__ = ["sum_scans", "SLAB_BYTES", "ANGLE_TOLERANCE"]

logger = logging.getLogger(__name__)

SLAB_BYTES = 64 * 1024**2
"""Bytes of one source slab read at a time (per source, before the int64 sum)."""

ANGLE_TOLERANCE = 1e-6
"""Largest difference (deg, or relative for wavelength/distance) accepted as equal."""

ENTRY_KEEP = ("sample", "instrument", "nxreduce", "nxscans", "start_time", "title")
"""Members of ``/entry`` copied from the first scan."""

ROTATION_KEEP = ("instrument", "start_time", "title", "scan_number")
"""Members of ``/fN`` copied from the first scan (besides ``data``, ``monitor``, ``sample``)."""

DATA_KEEP = ("x_pixel", "y_pixel", "frame_number", "frame_time", "phi")
"""Members of ``fN/data`` copied from the first scan."""

INT32_MIN, INT32_MAX = int(np.iinfo(np.int32).min), int(np.iinfo(np.int32).max)


@dataclass
class _Source:
    """One entry of one source scan, with everything that must agree."""

    scan_file: Path
    entry: str
    data_file: Path
    dataset: str
    shape: tuple[int, ...]
    dtype: np.dtype
    values: dict[str, float | None]


def _name(path: Path) -> str:
    return path.name


def _angle_values(fe: h5py.Group) -> dict[str, float | None]:
    """phi start/step, chi, omega, theta, wavelength and distance of an entry."""
    out: dict[str, float | None] = {}
    gon = fe.get("instrument/goniometer")
    phi_start = phi_step = None
    if isinstance(gon, h5py.Group) and isinstance(gon.get("phi"), h5py.Dataset):
        phi = gon["phi"]
        values = np.ravel(phi[()]).astype(float)
        if values.size:
            phi_start = float(values[0])
        if values.size > 1:
            phi_step = float(values[1] - values[0])
        elif "step" in phi.attrs:
            phi_step = float(np.ravel(phi.attrs["step"])[0])
    out["phi start"] = phi_start
    out["phi step"] = phi_step
    for key in ("chi", "omega", "theta"):
        value = read_field(fe, f"instrument/goniometer/{key}")
        out[key] = None if value is None else float(np.ravel(value)[0])
    for key, path in (
        ("wavelength", "instrument/monochromator/wavelength"),
        ("distance", "instrument/detector/distance"),
    ):
        value = read_field(fe, path)
        out[key] = None if value is None else float(np.ravel(value)[0])
    return out


def _same(key: str, a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if key in ("wavelength", "distance"):
        return abs(a - b) <= ANGLE_TOLERANCE * max(abs(a), abs(b), 1.0)
    return abs(a - b) <= ANGLE_TOLERANCE


def _read_source(scan_file: Path, entry: str) -> _Source:
    data_file = check_data_link(scan_file, entry)
    with open_scan_file(scan_file) as f:
        fe = f[entry]
        link = fe["data"].get("data", getlink=True)
        dataset = link.path if isinstance(link, h5py.ExternalLink) else f"/{entry}/data/data"
        values = _angle_values(fe)
    ensure_plugins()
    with h5py.File(data_file, "r") as df:
        ds = df[dataset]
        shape = tuple(int(n) for n in ds.shape)
        dtype = ds.dtype
    if len(shape) != 3:
        raise ScanFileError(
            f"{scan_file}:/{entry}/data/data has shape {shape}; expected (frames, ny, nx)"
        )
    if dtype.kind not in "iuf":
        raise ScanFileError(f"{scan_file}:/{entry}/data/data has non-numeric type {dtype}")
    return _Source(scan_file, entry, data_file, dataset, shape, dtype, values)


def _check(scan_files: list[Path]) -> tuple[list[str], dict[str, list[_Source]]]:
    """Entries and per-entry sources; refuse anything that differs between scans."""
    entry_sets = []
    for path in scan_files:
        if not path.is_file():
            raise ScanFileError(f"scan file {path} does not exist")
        entries = rotation_entries(path)
        if not entries:
            raise ScanFileError(f"{path} has no rotation entries f1, f2...")
        entry_sets.append(entries)
    first = scan_files[0]
    for path, entries in zip(scan_files[1:], entry_sets[1:], strict=True):
        if entries != entry_sets[0]:
            raise ScanFileError(
                f"cannot sum {_name(first)} and {_name(path)}: their entries differ "
                f"({', '.join(entry_sets[0])} vs {', '.join(entries)})"
            )
    sources: dict[str, list[_Source]] = {}
    for entry in entry_sets[0]:
        items = [_read_source(path, entry) for path in scan_files]
        ref = items[0]
        for other in items[1:]:
            pair = f"{_name(ref.scan_file)} and {_name(other.scan_file)}"
            if other.shape != ref.shape:
                if other.shape[0] != ref.shape[0] and other.shape[1:] == ref.shape[1:]:
                    what = f"frame counts differ ({ref.shape[0]} vs {other.shape[0]})"
                else:
                    what = f"frame stack shapes differ ({ref.shape} vs {other.shape})"
                raise ScanFileError(f"cannot sum {pair}, entry {entry}: {what}")
            if (ref.dtype.kind == "f") != (other.dtype.kind == "f"):
                raise ScanFileError(
                    f"cannot sum {pair}, entry {entry}: one stack holds integers and the "
                    f"other floating-point values ({ref.dtype} vs {other.dtype})"
                )
            for key, value in ref.values.items():
                if not _same(key, value, other.values[key]):
                    raise ScanFileError(
                        f"cannot sum {pair}, entry {entry}: {key} differs "
                        f"({value} vs {other.values[key]}); only scans taken under "
                        "identical conditions can be summed"
                    )
        sources[entry] = items
    return entry_sets[0], sources


def _slabs(nframes: int, frame_bytes: int) -> Iterator[tuple[int, int]]:
    step = max(1, SLAB_BYTES // max(1, frame_bytes))
    for start in range(0, nframes, step):
        yield start, min(nframes, start + step)


def _sum_stack(items: list[_Source], target: Path, dataset: str, progress: bool) -> None:
    """Write the frame-wise sum of the sources' stacks to the new file ``target``."""
    ref = items[0]
    nframes, ny, nx = ref.shape
    integer = all(item.dtype.kind in "iu" for item in items)
    out_dtype = np.int32 if integer else np.float32
    acc_dtype = np.int64 if integer else np.float64
    ensure_plugins()  # compressed detector stacks (bitshuffle-LZ4, ...)
    with ExitStack() as stack:
        datasets = []
        for item in items:
            f = stack.enter_context(h5py.File(item.data_file, "r"))
            datasets.append(f[item.dataset])
        out = stack.enter_context(h5py.File(target, "x", libver="latest"))
        ds = out.create_dataset(
            dataset, shape=(nframes, ny, nx), dtype=out_dtype, chunks=(1, ny, nx)
        )
        group = ds.parent
        if group.name != "/":
            group.attrs["NX_class"] = "NXdata"
            group.attrs["signal"] = ds.name.rsplit("/", 1)[-1]
            if group.parent.name != "/":
                group.parent.attrs["NX_class"] = "NXentry"
        slabs = list(_slabs(nframes, ny * nx * np.dtype(acc_dtype).itemsize))
        for start, stop in tqdm(slabs, disable=not progress, desc=target.name, unit="slab"):
            total = np.zeros((stop - start, ny, nx), dtype=acc_dtype)
            invalid = np.zeros((stop - start, ny, nx), dtype=bool)
            for src in datasets:
                block = np.asarray(src[start:stop], dtype=acc_dtype)
                invalid |= block < 0
                if not integer:
                    invalid |= np.isnan(block)
                total += block
            total[invalid] = -1
            if integer and (total.max(initial=0) > INT32_MAX):
                frame = start + int(np.argmax(total.reshape(total.shape[0], -1).max(axis=1)))
                raise ScanFileError(
                    f"the sum of entry {ref.entry} exceeds the int32 range at frame {frame}; "
                    "sum fewer scans at a time"
                )
            ds[start:stop] = total.astype(out_dtype)


def _per_frame(group: h5py.Group, nframes: int) -> dict[str, np.ndarray]:
    out = {}
    for name, item in group.items():
        if name == "frame_number" or not isinstance(item, h5py.Dataset):
            continue
        if item.shape == (nframes,) and item.dtype.kind in "iuf":
            out[name] = np.asarray(item[()], dtype=np.float64)
    return out


def _sum_monitors(items: list[_Source]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Summed monitor channels and monitor_weight (None unless every scan has it)."""
    nframes = items[0].shape[0]
    channels: list[dict[str, np.ndarray]] = []
    weights: list[np.ndarray | None] = []
    for item in items:
        with h5py.File(item.scan_file, "r") as f:
            fe = f[item.entry]
            mon = fe.get("monitor")
            channels.append(_per_frame(mon, nframes) if isinstance(mon, h5py.Group) else {})
            weight = fe.get("data/monitor_weight")
            weights.append(
                np.asarray(weight[()], dtype=np.float64)
                if isinstance(weight, h5py.Dataset) and weight.shape == (nframes,)
                else None
            )
    ref = items[0]
    for item, chans in zip(items[1:], channels[1:], strict=True):
        if set(chans) != set(channels[0]):
            raise ScanFileError(
                f"cannot sum {_name(ref.scan_file)} and {_name(item.scan_file)}, entry "
                f"{ref.entry}: their monitor channels differ "
                f"({', '.join(sorted(channels[0])) or 'none'} vs "
                f"{', '.join(sorted(chans)) or 'none'})"
            )
    summed = {name: np.sum([c[name] for c in channels], axis=0) for name in channels[0]}
    weight = None
    if all(w is not None for w in weights):
        weight = np.sum(np.stack(weights), axis=0)  # type: ignore[arg-type]
    elif any(w is not None for w in weights):
        logger.warning(
            "entry %s: monitor_weight is missing from some scans; not summed (the transform "
            "step recomputes it)",
            ref.entry,
        )
    return summed, weight


def _copy_members(source: h5py.Group, dest: h5py.Group, names: Sequence[str]) -> None:
    for name in names:
        if name in source:
            source.copy(source[name], dest, name=name)


def _write_scan_file(
    tmp: Path,
    scan_files: list[Path],
    entries: list[str],
    sources: dict[str, list[_Source]],
    monitors: dict[str, tuple[dict[str, np.ndarray], np.ndarray | None]],
    paths: ScanPaths,
    data_dir: Path,
) -> None:
    names = [os.path.relpath(p, paths.label_dir) for p in scan_files]
    with h5py.File(scan_files[0], "r") as src, h5py.File(tmp, "x") as f:
        f.attrs["NX_class"] = "NXroot"
        f.attrs["file_name"] = paths.scan_file.name
        f.attrs["file_time"] = datetime.now().astimezone().isoformat()
        f.attrs["creator"] = f"nxrefine-bs {__version__}"
        f.attrs["HDF5_Version"] = h5py.version.hdf5_version
        f.attrs["h5py_version"] = h5py.version.version
        f.attrs["default"] = "entry"
        entry = nx_group(f, "entry", "NXentry")
        _copy_members(src["entry"], entry, ENTRY_KEEP)
        sample = nx_group(entry, "sample", "NXsample")
        sample.attrs["target"] = "/entry/sample"
        for name in entries:
            sfe = src[name]
            fe = nx_group(f, name, "NXentry")
            _copy_members(sfe, fe, ROTATION_KEEP)
            if "instrument/logs" in fe:
                del fe["instrument/logs"]
            fe["sample"] = sample  # hard link, as in create_scan_file
            data = nx_group(fe, "data", "NXdata")
            sdata = sfe["data"]
            for key, value in sdata.attrs.items():
                if key != "NX_class":
                    data.attrs[key] = value
            _copy_members(sdata, data, DATA_KEEP)
            first = sources[name][0]
            write_external_link(data, "data", data_dir / f"{name}.h5", first.dataset)
            summed, weight = monitors[name]
            if weight is not None:
                write_field(data, "monitor_weight", weight, attrs={"axes": "frame_number"})
            smon = sfe.get("monitor")
            if summed and isinstance(smon, h5py.Group):
                mon = nx_group(fe, "monitor", "NXmonitor")
                for key, value in smon.attrs.items():
                    if key != "NX_class":
                        mon.attrs[key] = value
                for channel, values in summed.items():
                    write_field(mon, channel, values)
                nframes = first.shape[0]
                write_field(mon, "frame_number", np.arange(nframes, dtype=np.int32))
            record_process(
                fe,
                "nxsum",
                parameters={"sources": names, "entry": name},
                summary={"scans": len(scan_files), "frames": first.shape[0]},
            )
        record_process(
            entry,
            "nxsum",
            parameters={"sources": names},
            summary={"scans": len(scan_files), "entries": entries},
        )


def _output_paths(first: Path, output_scan: str | os.PathLike[str]) -> ScanPaths:
    ref = ScanPaths.from_scan_file(first)
    text = os.fspath(output_scan)
    if text.endswith(".nxs"):
        out = ScanPaths.from_scan_file(text if os.path.isabs(text) else ref.label_dir / text)
        if out.label_dir != ref.label_dir:
            raise ScanFileError(
                f"the summed scan {out.scan_file} must be written beside {first} "
                f"(in {ref.label_dir})"
            )
        return out
    validate_name(text, "output scan")
    return ScanPaths.from_names(ref.experiment_dir, ref.sample, ref.label, text)


def sum_scans(
    scan_files: Sequence[str | os.PathLike[str]],
    output_scan: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Sum repeated scans into a new scan file and detector stacks.

    Parameters
    ----------
    scan_files : sequence of path-like
        Two or more scan files ``<sample>_<scan>.nxs`` of the same sample and label.
    output_scan : str or path-like
        Name of the new scan (e.g. ``'300K_sum'``), giving
        ``<label dir>/<sample>_<output_scan>.nxs`` and ``<label dir>/<output_scan>/``;
        a ``<sample>_<name>.nxs`` file name in the same directory is accepted too.
    overwrite : bool
        Replace an existing summed scan file and stacks.
    progress : bool
        Show progress bars.

    Returns
    -------
    Path
        The new scan file.

    Raises
    ------
    ScanFileError
        On fewer than two scans, a repeated scan, an output that is also an input,
        scans from different sample/label directories, or any mismatch of entries,
        stack shapes, frame counts, angles, wavelength, distance or monitor channels;
        or if an integer sum leaves the int32 range.
    DataLinkError
        If a scan's detector stack is missing.
    FileExistsNXError
        If the output scan file or a stack exists and ``overwrite`` is False.

    Examples
    --------
    >>> sum_scans(["TiSe2/xtal1/TiSe2_300K.nxs", "TiSe2/xtal1/TiSe2_300Kb.nxs"],
    ...           "300K_sum")  # doctest: +SKIP
    PosixPath('.../TiSe2/xtal1/TiSe2_300K_sum.nxs')
    """
    files = [Path(os.path.abspath(p)) for p in scan_files]
    if len(files) < 2:
        raise ScanFileError(f"summing needs at least two scan files, got {len(files)}")
    resolved = [p.resolve() for p in files]
    if len(set(resolved)) != len(resolved):
        raise ScanFileError("the same scan file is listed twice: " + ", ".join(map(str, files)))
    paths = _output_paths(files[0], output_scan)
    label_dirs = {ScanPaths.from_scan_file(p).label_dir.resolve() for p in files}
    if len(label_dirs) != 1:
        raise ScanFileError(
            "the scans to sum must belong to one sample and label (one directory); got "
            + ", ".join(str(p) for p in files)
        )
    if paths.scan_file.resolve() in resolved:
        raise ScanFileError(f"the output {paths.scan_file} is one of the scans to sum")
    entries, sources = _check(files)
    data_dir = paths.scan_dir
    for item_list in sources.values():
        for item in item_list:
            if item.data_file.resolve().parent == data_dir.resolve():
                raise ScanFileError(
                    f"the output directory {data_dir} holds the detector data of "
                    f"{item.scan_file}; choose another output scan name"
                )
    monitors = {entry: _sum_monitors(sources[entry]) for entry in entries}
    targets = {entry: data_dir / f"{entry}.h5" for entry in entries}

    def refuse_existing() -> None:
        for path in (paths.scan_file, *targets.values()):
            if path.exists() and not overwrite:
                raise FileExistsNXError(
                    f"{path} already exists; pass overwrite=True (--overwrite) to replace "
                    "the summed scan"
                )

    refuse_existing()
    made_dir = not data_dir.exists()
    temps: dict[Path, Path] = {}
    pid = os.getpid()
    with locked(paths.scan_file):
        try:
            refuse_existing()
            data_dir.mkdir(exist_ok=True)
            for entry in entries:
                tmp = targets[entry].with_name(f".{entry}.h5.{pid}.tmp")
                tmp.unlink(missing_ok=True)
                temps[tmp] = targets[entry]
                items = sources[entry]
                _sum_stack(items, tmp, items[0].dataset or DATA_PATH, progress)
            tmp_scan = paths.scan_file.with_name(f".{paths.scan_file.name}.{pid}.tmp")
            tmp_scan.unlink(missing_ok=True)
            temps[tmp_scan] = paths.scan_file
            _write_scan_file(tmp_scan, files, entries, sources, monitors, paths, data_dir)
            for tmp, target in temps.items():
                os.replace(tmp, target)
            temps.clear()
        except BaseException:
            for tmp in temps:
                tmp.unlink(missing_ok=True)
            if made_dir:
                with contextlib.suppress(OSError):
                    data_dir.rmdir()
            raise
    logger.info("summed %d scans into %s", len(files), paths.scan_file)
    return paths.scan_file
