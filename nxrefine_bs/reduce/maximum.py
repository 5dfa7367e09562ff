"""Reduction step ``max`` (NXRefine's ``nxmax``): frame statistics, radial sum, transmission.

One streaming pass over frames ``[first, last)`` of a rotation entry accumulates, with a
single-threaded, branch-free numba kernel (``performance-baselines.md`` §2a):

* ``summed_data`` -- the 2-D sum of all frames, masked pixels (pixel mask, detector gaps
  stored as negative values) set to 0.  Integer frames are summed into an int32
  accumulator that is flushed into int64 before it could overflow (exact for any
  int32 data: the accumulator is read back as uint32 and the flush happens once the
  sum of the frame totals since the last flush exceeds 2**31);
* ``summed_frames`` -- the masked total of each frame (int64, exact);
* ``partial_frames`` -- a robust baseline of each frame in a Q annulus
  ``qmin <= Q <= qmax``: the unmasked annulus pixels are subsampled to at most
  50 000, the brightest 10 % discarded, and the mean of the rest multiplied by the
  number of unmasked annulus pixels (the trimmed sum of inventory §5.3);
* ``maximum`` -- the largest unmasked count inside the annulus.

Afterwards the summed image is integrated with pyFAI (2048 bins in 2-theta, solid-angle
and polarization corrected, masked) into ``radial_sum``, and the transmission is
estimated from ``partial_frames / monitor`` (31-frame median filter, divided by its
median; entries after the first are rescaled to keep their transmission relative to
the first entry).

``Q`` is ``4 pi sin(theta) / lambda`` (1/Angstrom, *with* 2 pi, as NXRefine stores it).
The annulus uses each pixel's exact Q from :class:`~nxrefine_bs.geometry.Geometry`;
when ``qmin``/``qmax`` are not given they are derived as NXRefine does from the
vertical beam-centre distance ``d_y = max(yc, ny - 1 - yc)``:
``qmin = 0.3 d_y k``, ``qmax = 0.95 d_y k`` with ``k = 2 pi p / (lambda L)``.

Not done (yet): NXRefine's hot-pixel detection on frames 0-9 (constant pixels >= 100
counts are added to the pixel mask); the pixel mask is used as stored.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numba
import numpy as np
from numpy.typing import NDArray
from scipy.ndimage import median_filter
from tqdm import tqdm

from ..errors import ReductionError
from ..geometry import Geometry
from ..nexus.h5tools import nx_group, write_field
from ..nexus.monitors import read_monitor as _read_monitor
from ..nexus.nxreduce import store_parameters
from ..nexus.provenance import now_iso, record_process
from ..nexus.scanfile import open_scan_file, update_scan_file
from ..pyfai_geometry import integrator
from .framestream import (
    FrameStream,
    frame_window,
    open_entry,
    open_frames,
    replace_group,
    rotation_entries,
    step_parameters,
)

logger = logging.getLogger(__name__)

__all__ = [
    "run",
    "FrameSums",
    "accumulate_frame_sums",
    "annulus_pixels",
    "default_q_range",
    "pixel_q",
    "trimmed_sum",
    "PROCESS",
]

PROCESS = "nxmax"
RADIAL_BINS = 2048
MAX_ANNULUS_SAMPLES = 50_000
TRIM_FRACTION = 0.10
MEDIAN_WINDOW = 31
QMIN_PIXEL_FRACTION = 0.3
QMAX_PIXEL_FRACTION = 0.95
_HIST_BINS = 4096
_FLUSH_BOUND = 2**31
_SMALL_INTS = tuple(np.dtype(t) for t in (np.int8, np.uint8, np.int16, np.uint16, np.int32))


# --------------------------------------------------------------------------- kernels


@numba.njit(cache=True, nogil=True)
def _frame_pass(row, code, acc):  # pragma: no cover - numba
    """One branch-free pass over a frame: ``acc += w``; returns (sum, annulus max).

    ``w`` is the pixel value where ``code`` bit 0 is set (unmasked) and the value is
    not negative (gap), else 0; the annulus maximum uses pixels with ``code`` bit 1.
    (A second, global maximum would cost 70 % more time: it defeats vectorisation.)
    """
    zero = row.dtype.type(0)
    s = 0
    am = zero
    for i in range(row.size):
        v = row[i]
        c = code[i]
        w = v if ((c & 1) != 0) & (v >= zero) else zero
        acc[i] += w
        s += w
        a = w if (c & 2) != 0 else zero
        am = max(am, a)
    return s, am


@numba.njit(cache=True, nogil=True)
def _sum_block(block, code, acc, sums, amax, offset):  # pragma: no cover - numba
    """Accumulate frames ``block`` (k, npix) into a wide (int64/float64) ``acc``."""
    for f in range(block.shape[0]):
        s, am = _frame_pass(block[f], code, acc)
        sums[offset + f] = s
        amax[offset + f] = am


@numba.njit(cache=True, nogil=True)
def _sum_block_int32(block, code, acc, wide, state, sums, amax, offset):  # pragma: no cover
    """Accumulate integer frames of at most 32 bits into an int32 ``acc``, exactly.

    Every added value lies in ``[0, 2**31)`` and no pixel of a frame exceeds the
    frame's sum, so while ``state[0]`` (the sum of the frame sums added since the last
    flush) is at most ``2**31`` before a frame, every per-pixel sum stays below
    ``2**32`` after it and the int32 accumulator, read as uint32, is exact.  It is
    flushed into ``wide`` (int64) before that bound could be broken.
    """
    for f in range(block.shape[0]):
        if state[0] > 2147483648:
            for i in range(acc.size):
                wide[i] += np.int64(acc[i]) & 0xFFFFFFFF
                acc[i] = 0
            state[0] = 0
        s, am = _frame_pass(block[f], code, acc)
        sums[offset + f] = s
        amax[offset + f] = am
        state[0] += s


@numba.njit(cache=True, nogil=True)
def _trimmed_sum_kernel(row, idx, hist, keep_fraction, exact_int):  # pragma: no cover
    """Sum of the smallest ``keep_fraction`` of ``row[idx]`` (values < 0 ignored).

    Integer data use a histogram of values below ``hist.size`` (exact, O(n)); when
    the values above it are not all among the discarded ones, or for float data, the
    values are sorted instead.  Returns ``(sum_kept, n_kept, n_valid)``.
    """
    nb = hist.size
    n = 0
    over = 0
    vmax = 0
    if exact_int:
        for j in range(idx.size):
            v = row[idx[j]]
            if v >= 0:
                n += 1
                if v < nb:
                    iv = int(v)
                    hist[iv] += 1
                    if iv > vmax:
                        vmax = iv
                else:
                    over += 1
    else:
        over = idx.size  # force the sort path
        for j in range(idx.size):
            if row[idx[j]] >= 0:
                n += 1
    if n == 0:
        if exact_int:
            for b in range(vmax + 1):
                hist[b] = 0
        return 0.0, 0, 0
    nkeep = n - int((1.0 - keep_fraction) * n)
    if nkeep < 1:
        nkeep = 1
    total = 0.0
    if exact_int and over <= n - nkeep:
        need = nkeep
        for b in range(vmax + 1):
            c = hist[b]
            if need > 0:
                take = c if c < need else need
                total += float(b) * take
                need -= take
            hist[b] = 0
        return total, nkeep, n
    if exact_int:
        for b in range(vmax + 1):
            hist[b] = 0
    vals = np.empty(n, dtype=np.float64)
    j2 = 0
    for j in range(idx.size):
        v = row[idx[j]]
        if v >= 0:
            vals[j2] = v
            j2 += 1
    vals.sort()
    for j in range(nkeep):
        total += vals[j]
    return total, nkeep, n


def trimmed_sum(
    values: NDArray[Any], keep_fraction: float = 1.0 - TRIM_FRACTION
) -> tuple[float, int, int]:
    """Sum of the smallest ``keep_fraction`` of the non-negative ``values``.

    Returns ``(sum_kept, n_kept, n_valid)``; ``n_kept = n_valid - int(0.1 n_valid)``
    for the default fraction.  Reference implementation for tests and callers.
    """
    v = np.ascontiguousarray(np.ravel(values))
    idx = np.arange(v.size, dtype=np.int64)
    hist = np.zeros(_HIST_BINS, dtype=np.int64)
    exact = v.dtype.kind in "iu"
    s, k, n = _trimmed_sum_kernel(v, idx, hist, float(keep_fraction), exact)
    return float(s), int(k), int(n)


# --------------------------------------------------------------------------- geometry


def pixel_q(geometry: Geometry) -> NDArray[np.float64]:
    """``|Q| = 4 pi sin(theta) / lambda`` (1/Angstrom) of every pixel, shape ``(ny, nx)``."""
    ny, nx = geometry.shape
    tth = geometry.two_theta(
        np.arange(nx, dtype=np.float64), np.arange(ny, dtype=np.float64)[:, None]
    )
    return 4.0 * math.pi * np.sin(np.radians(tth) / 2.0) / geometry.wavelength


def default_q_range(geometry: Geometry) -> tuple[float, float]:
    """NXRefine's automatic ``(qmin, qmax)`` of the transmission annulus (1/Angstrom)."""
    ny = geometry.shape[0]
    dy = max(geometry.beam_center_y, ny - 1 - geometry.beam_center_y)
    k = 2.0 * math.pi * geometry.pixel_size / (geometry.wavelength * geometry.distance)
    return QMIN_PIXEL_FRACTION * dy * k, QMAX_PIXEL_FRACTION * dy * k


def annulus_pixels(
    q: NDArray[np.float64], masked: NDArray[np.bool_], qmin: float, qmax: float
) -> NDArray[np.bool_]:
    """Unmasked pixels with ``qmin <= Q <= qmax``."""
    return (q >= qmin) & (q <= qmax) & ~masked


# --------------------------------------------------------------------------- streaming pass


@dataclass
class FrameSums:
    """Results of the streaming pass over frames ``[first, last)``.

    Per-frame arrays have length ``nframes`` (the whole stack); frames outside
    ``[first, last)`` hold 0.
    """

    first: int
    last: int
    summed_data: NDArray[np.float64]
    summed_frames: NDArray[np.float64]
    partial_frames: NDArray[np.float64]
    annulus_maximum: NDArray[np.float64]
    gaps: NDArray[np.bool_]
    n_annulus: int

    @property
    def maximum(self) -> float:
        """Largest unmasked count in the annulus over all frames."""
        seg = self.annulus_maximum[self.first : self.last]
        return float(seg.max()) if seg.size else 0.0


def accumulate_frame_sums(
    stream: FrameStream,
    first: int,
    last: int,
    masked: NDArray[np.bool_],
    annulus: NDArray[np.bool_],
    *,
    progress: bool = False,
) -> FrameSums:
    """Stream frames ``[first, last)`` once and accumulate the frame statistics.

    Parameters
    ----------
    stream : FrameStream
        Open frame stack.
    first, last : int
        Frame range (``last`` exclusive, already clipped to the stack).
    masked : ndarray of bool, shape (ny, nx)
        Pixel mask (True = masked).
    annulus : ndarray of bool, shape (ny, nx)
        Unmasked pixels of the transmission annulus.
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    FrameSums
    """
    nframes, ny, nx = stream.shape
    npix = ny * nx
    dtype = stream.dtype
    is_int = dtype.kind in "iu"
    code = np.where(masked, 0, 1).astype(np.uint8).ravel()
    code |= annulus.ravel().astype(np.uint8) << 1
    code = np.ascontiguousarray(code)
    if dtype in _SMALL_INTS:
        acc: NDArray[Any] = np.zeros(npix, dtype=np.int32)
        wide = np.zeros(npix, dtype=np.int64)
        flushing = True
    else:
        acc = np.zeros(npix, dtype=np.int64 if is_int else np.float64)
        wide = acc
        flushing = False
    sums = np.zeros(nframes, dtype=np.int64 if is_int else np.float64)
    amax = np.zeros(nframes, dtype=np.int64 if is_int else np.float64)
    partial = np.zeros(nframes, dtype=np.float64)
    ann_idx = np.flatnonzero(annulus.ravel())
    n_annulus = int(ann_idx.size)
    stride = max(1, n_annulus // MAX_ANNULUS_SAMPLES)
    sample = np.ascontiguousarray(ann_idx[::stride].astype(np.int64))
    hist = np.zeros(_HIST_BINS, dtype=np.int64)
    gaps = np.zeros((ny, nx), dtype=bool)
    state = np.zeros(1, dtype=np.int64)
    keep = 1.0 - TRIM_FRACTION
    with tqdm(
        total=max(0, last - first),
        disable=not progress,
        desc=f"nxmax {stream.source.entry}",
        unit="frame",
    ) as bar:
        for start, block in stream.blocks(first, last):
            k = block.shape[0]
            flat = block.reshape(k, npix)
            if start == first:
                gaps = block[0] < 0
            if flushing:
                _sum_block_int32(flat, code, acc, wide, state, sums, amax, start)
            else:
                _sum_block(flat, code, acc, sums, amax, start)
            for j in range(k):
                s, nkeep, _n = _trimmed_sum_kernel(flat[j], sample, hist, keep, is_int)
                partial[start + j] = s * n_annulus / nkeep if nkeep else 0.0
            bar.update(k)
    if flushing:
        wide += acc.view(np.uint32)
    summed = wide.astype(np.float64).reshape(ny, nx)
    summed[masked | gaps] = 0.0
    return FrameSums(
        first=first,
        last=last,
        summed_data=summed,
        summed_frames=sums.astype(np.float64),
        partial_frames=partial,
        annulus_maximum=amax.astype(np.float64),
        gaps=gaps,
        n_annulus=n_annulus,
    )


# ---------------------------------------------------------------- radial sum, transmission


def radial_sum(
    summed: NDArray[np.float64],
    geometry: Geometry,
    masked: NDArray[np.bool_],
    polarization: float,
    bins: int = RADIAL_BINS,
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64], NDArray[np.float32]]:
    """Azimuthal integration of the summed image with pyFAI.

    The 2-theta range is that of the unmasked pixels.  Returns ``(polar_angle,
    radial_sum, Q, polarization_array)``: bin centres in degrees, the mean solid-angle
    and polarization corrected intensity per bin, ``Q`` in 1/Angstrom (with 2 pi) and
    pyFAI's polarization factor of every pixel.
    """
    ai = integrator(geometry, mask=masked)
    pol = np.asarray(ai.polarization(factor=polarization), dtype=np.float32)
    tth = np.asarray(ai.center_array(unit="2th_deg"))[~masked]
    res = ai.integrate1d(
        summed / pol,
        bins,
        unit="2th_deg",
        radial_range=(float(tth.min()), float(tth.max())),
        correctSolidAngle=True,
        mask=masked.astype(np.int8),
        method=("no", "histogram", "cython"),
    )
    polar = np.asarray(res.radial, dtype=np.float64)
    intensity = np.nan_to_num(np.asarray(res.intensity, dtype=np.float64))
    q = 4.0 * math.pi * np.sin(np.radians(polar) / 2.0) / geometry.wavelength
    return polar, intensity, q, pol


def read_monitor(entry: h5py.Group, monitor: str, norm: float, nframes: int) -> NDArray | None:
    """Per-frame monitor counts divided by ``norm`` and smoothed (inventory §5.9).

    The one lookup every step uses: :func:`nxrefine_bs.nexus.monitors.read_monitor`.
    Returns None if there is no usable monitor.
    """
    return _read_monitor(entry, monitor, norm, nframes)


def transmission(
    partial: NDArray[np.float64], monitor: NDArray | None, first: int, last: int
) -> tuple[NDArray[np.float64], float]:
    """Relative sample transmission per frame and its median (before normalisation).

    ``partial / monitor`` on ``[first, last)``, held at the edge values outside,
    median-filtered over 31 frames and divided by its median.
    """
    n = partial.size
    y = partial / monitor if monitor is not None else partial.copy()
    if last > first:
        y[:first] = y[first]
        y[last:] = y[last - 1]
    y = median_filter(y, size=min(MEDIAN_WINDOW, max(1, n)), mode="nearest")
    median = float(np.median(y[first:last])) if last > first else 0.0
    if not np.isfinite(median) or median <= 0:
        return np.ones(n), median
    return y / median, median


# --------------------------------------------------------------------------- step


def run(
    scan_file: str | os.PathLike[str],
    entry: str,
    *,
    first: int | None = None,
    last: int | None = None,
    qmin: float | None = None,
    qmax: float | None = None,
    polarization: float | None = None,
    monitor: str | None = None,
    norm: float | None = None,
    overwrite: bool = False,
    progress: bool = False,
    swmr: bool = False,
) -> dict[str, Any]:
    """Run the ``max`` step (process ``nxmax``) on rotation entry ``entry``.

    Parameters
    ----------
    scan_file : path-like
        Scan file ``<sample>_<scan>.nxs``.
    entry : str
        Rotation entry, e.g. ``"f1"``.
    first, last : int, optional
        Frame range ``[first, last)``; default: settings ``first_frame`` /
        ``last_frame`` (10 / 3640), clipped to the stack.
    qmin, qmax : float, optional
        Transmission annulus in 1/Angstrom (4 pi sin(theta)/lambda); default: the
        settings, else derived from the geometry (module docstring).
    polarization : float, optional
        pyFAI polarization factor (default: settings, 0.99).
    monitor, norm : optional
        Monitor channel and normalisation (default: settings, ``MCS1`` / 50000).
    overwrite : bool
        Recompute even if ``nxmax`` is recorded (results are replaced).
    progress : bool
        Show a progress bar.
    swmr : bool
        Open the files in SWMR-read mode (data still being written).

    Returns
    -------
    dict
        ``entry``, ``skipped``, ``first``, ``last``, ``nframes``, ``maximum``,
        ``qmin``, ``qmax``, ``n_annulus``, ``transmission_median``, ``elapsed_s``.

    Raises
    ------
    ScanFileError, DataLinkError
        Missing entry, geometry or detector data.
    ReductionError
        No frames in ``[first, last)``, every pixel masked, or an empty annulus.
    """
    t0 = time.perf_counter()
    start_time = now_iso()
    scan_file = Path(scan_file)
    geometry, skipped = open_entry(scan_file, entry, PROCESS, overwrite=overwrite)
    if skipped is not None:
        return skipped
    assert geometry is not None  # open_entry returns one of the two
    with open_scan_file(scan_file) as f:
        first_rotation = rotation_entries(f)[0]
        ref_median = None
        if entry != first_rotation:
            tr = f.get(f"{first_rotation}/frame_sums/transmission/transmission")
            if isinstance(tr, h5py.Dataset) and "median" in tr.attrs:
                ref_median = float(tr.attrs["median"])
    params = step_parameters(
        ("first_frame", "last_frame", "polarization", "monitor", "norm", "qmin", "qmax"),
        {
            "first_frame": first,
            "last_frame": last,
            "polarization": polarization,
            "monitor": monitor,
            "norm": norm,
            "qmin": qmin,
            "qmax": qmax,
        },
        scan_file,
    )
    with open_frames(scan_file, entry, swmr=swmr) as stream:
        nframes, ny, nx = stream.shape
        lo, hi, masked = frame_window(
            stream, geometry, params["first_frame"], params["last_frame"], scan_file, entry
        )
        with open_scan_file(scan_file) as f:
            monitor_values = read_monitor(
                f[entry], str(params["monitor"]), float(params["norm"]), nframes
            )
        q = pixel_q(geometry)
        auto = default_q_range(geometry)
        q_lo = float(params["qmin"]) if params["qmin"] is not None else auto[0]
        q_hi = float(params["qmax"]) if params["qmax"] is not None else auto[1]
        annulus = annulus_pixels(q, masked, q_lo, q_hi)
        if not annulus.any():
            raise ReductionError(
                f"{scan_file}:/{entry}: no unmasked pixel has {q_lo:.4g} <= Q <= {q_hi:.4g} "
                f"1/Angstrom (detector covers {q.min():.4g}-{q.max():.4g}); adjust qmin/qmax"
            )
        sums = accumulate_frame_sums(stream, lo, hi, masked, annulus, progress=progress)
    invalid = masked | sums.gaps
    if invalid.all():
        raise ReductionError(f"{scan_file}:/{entry}: every pixel is masked or a detector gap")
    pol_factor = float(params["polarization"])
    polar, radial, qrad, pol = radial_sum(sums.summed_data, geometry, invalid, pol_factor)
    if monitor_values is None:
        logger.warning(
            "%s:%s: no usable monitor %r; transmission uses the partial sums only",
            scan_file,
            entry,
            params["monitor"],
        )
    trans, median = transmission(sums.partial_frames, monitor_values, lo, hi)
    if ref_median is not None and ref_median > 0 and median > 0:
        trans = trans * (median / ref_median)
    maximum = sums.maximum
    summary = {
        "first": lo,
        "last": hi,
        "nframes": hi - lo,
        "maximum": maximum,
        "qmin": q_lo,
        "qmax": q_hi,
        "n_annulus": sums.n_annulus,
        "transmission_median": median,
    }
    parameters = {
        "first_frame": lo,
        "last_frame": hi,
        "qmin": q_lo,
        "qmax": q_hi,
        "polarization": pol_factor,
        "monitor": str(params["monitor"]),
        "norm": float(params["norm"]),
    }

    def build(fs: h5py.Group) -> None:
        fs.attrs["NX_class"] = "NXcollection"
        sd = nx_group(fs, "summed_data", "NXdata")
        sd.attrs["signal"] = "summed_data"
        sd.attrs["axes"] = ["y_pixel", "x_pixel"]
        write_field(sd, "summed_data", sums.summed_data)
        write_field(sd, "y_pixel", np.arange(ny, dtype=np.int32))
        write_field(sd, "x_pixel", np.arange(nx, dtype=np.int32))
        sf = nx_group(fs, "summed_frames", "NXdata")
        sf.attrs["signal"] = "summed_frames"
        sf.attrs["axes"] = "frame_number"
        write_field(sf, "summed_frames", sums.summed_frames)
        write_field(sf, "partial_frames", sums.partial_frames, attrs={"qmin": q_lo, "qmax": q_hi})
        write_field(sf, "frame_number", np.arange(nframes, dtype=np.int32))
        rs = nx_group(fs, "radial_sum", "NXdata")
        rs.attrs["signal"] = "radial_sum"
        rs.attrs["axes"] = "polar_angle"
        rs.attrs["Q_indices"] = 0
        write_field(rs, "radial_sum", radial)
        write_field(rs, "polar_angle", polar, units="degree")
        write_field(rs, "Q", qrad, units="1/angstrom")
        tr = nx_group(fs, "transmission", "NXdata")
        tr.attrs["signal"] = "transmission"
        tr.attrs["axes"] = "frame_number"
        write_field(tr, "transmission", trans, attrs={"median": median})
        write_field(tr, "frame_number", np.arange(nframes, dtype=np.int32))

    with update_scan_file(scan_file) as f:
        group = f[entry]
        replace_group(group, "frame_sums", build)
        data = group["data"]
        data.attrs["maximum"] = maximum
        data.attrs["first"] = lo
        data.attrs["last"] = hi
        det = nx_group(nx_group(group, "instrument", "NXinstrument"), "detector", "NXdetector")
        write_field(det, "polarization", pol, attrs={"factor": pol_factor})
        record_process(
            group, PROCESS, parameters=parameters, start_time=start_time, summary=summary
        )
        store_parameters(f, parameters, known_only=True)  # where NXRefine reads them
    elapsed = time.perf_counter() - t0
    logger.info(
        "%s:%s: nxmax frames %d-%d, maximum %g (%.2f s)", scan_file, entry, lo, hi, maximum, elapsed
    )
    return {"entry": entry, "skipped": False, **summary, "elapsed_s": elapsed}
