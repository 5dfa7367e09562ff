"""Compressed detector stacks: HDF5 filter plugins, write options and chunk-wise decoding.

Detectors write their frames compressed: Eiger and many Pilatus set-ups use
bitshuffle-LZ4 (HDF5 filter 32008, "bslz4"), others LZ4 (32004), Zstd (32015), Blosc
(32001), Blosc2 (32026), gzip (1) or LZF (32000).  h5py only knows gzip and LZF; the
others need the plugins shipped by :mod:`hdf5plugin`, which :func:`ensure_plugins`
registers (it is called by every frame reader before a file is opened).

Reading through h5py's filter pipeline is serial: the pipeline runs under h5py's global
lock, so a second thread cannot decode at the same time (performance-baselines §1: bslz4
through h5py 192-232 frames/s, 1.7x slower per core than the AVX2 bitshuffle codec).
:class:`ChunkReader` therefore reads a chunk's *compressed* bytes with
``read_direct_chunk`` (fast, 1400 frames/s) and decodes them itself with a codec that
releases the GIL, so that several threads decode different chunks in parallel:

========================  =====================================================
pipeline                  decoder
========================  =====================================================
bitshuffle + LZ4 / Zstd   bitshuffle's C decoder (AVX2) via :mod:`ctypes`, into
                          the caller's buffer (no temporary, no copy)
gzip (optionally shuffle) :func:`zlib.decompress` (+ byte unshuffle in numpy)
LZ4 (32004)               :mod:`lz4.block`, if installed
Blosc (32001)             :func:`blosc2.decompress`, if installed
anything else             h5py's filter pipeline (correct, serial)
========================  =====================================================

Every chunk whose filter mask says a filter was skipped is read through h5py as well,
so the result is always the one HDF5 itself would return.
"""

from __future__ import annotations

import ctypes
import logging
import struct
import threading
import zlib
from collections.abc import Callable
from itertools import product
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from numpy.typing import NDArray

from ..errors import SettingsError

logger = logging.getLogger(__name__)

__all__ = [
    "CODECS",
    "ensure_plugins",
    "compression_options",
    "dataset_filters",
    "ChunkReader",
]

FILTER_NAMES: dict[int, str] = {
    1: "gzip",
    2: "shuffle",
    3: "fletcher32",
    32000: "lzf",
    32001: "blosc",
    32004: "lz4",
    32008: "bitshuffle",
    32015: "zstd",
    32026: "blosc2",
}
"""HDF5 filter ids of the codecs detectors use."""

CODECS: tuple[str, ...] = ("bslz4", "bszstd", "lz4", "zstd", "blosc", "blosc2", "gzip", "lzf")
"""Names accepted by :func:`compression_options` (besides ``None``/``"none"``)."""

_plugins_loaded = False


def ensure_plugins() -> None:
    """Register the :mod:`hdf5plugin` filters with HDF5 (once; cheap afterwards)."""
    global _plugins_loaded
    if not _plugins_loaded:
        import hdf5plugin  # noqa: F401  (registers bitshuffle, LZ4, Zstd, Blosc, ... filters)

        _plugins_loaded = True


def compression_options(name: str | None, level: int | None = None) -> dict[str, Any]:
    """Keyword arguments of ``h5py.Group.create_dataset`` for compression ``name``.

    Parameters
    ----------
    name : str or None
        One of :data:`CODECS`, or ``None``/``"none"`` for no compression.
    level : int, optional
        Compression level for ``gzip`` (default 1) and ``zstd`` (default 3).

    Raises
    ------
    SettingsError
        For an unknown name (the message lists the valid ones).
    """
    if name is None or str(name).lower() in ("", "none"):
        return {}
    key = str(name).lower()
    if key == "gzip":
        return {"compression": "gzip", "compression_opts": 1 if level is None else int(level)}
    if key == "lzf":
        return {"compression": "lzf"}
    if key not in CODECS:
        raise SettingsError(
            f"unknown compression {name!r}; choose one of none, {', '.join(CODECS)}"
        )
    ensure_plugins()
    import hdf5plugin

    if key == "bslz4":
        opts = hdf5plugin.Bitshuffle(cname="lz4")
    elif key == "bszstd":
        opts = hdf5plugin.Bitshuffle(cname="zstd")
    elif key == "lz4":
        opts = hdf5plugin.LZ4()
    elif key == "zstd":
        opts = hdf5plugin.Zstd(clevel=3 if level is None else int(level))
    elif key == "blosc":
        opts = hdf5plugin.Blosc(cname="lz4", shuffle=hdf5plugin.Blosc.BITSHUFFLE)
    else:
        opts = hdf5plugin.Blosc2(cname="lz4", filters=hdf5plugin.Blosc2.BITSHUFFLE)
    return dict(opts)


def dataset_filters(dataset: h5py.Dataset) -> list[tuple[int, tuple[int, ...]]]:
    """The filter pipeline of ``dataset`` as ``[(filter id, cd_values), ...]`` in write order."""
    dcpl = dataset.id.get_create_plist()
    out = []
    for i in range(dcpl.get_nfilters()):
        fid, _flags, values, _name = dcpl.get_filter(i)
        out.append((int(fid), tuple(int(v) for v in values)))
    return out


# ----------------------------------------------------------------------------- decoders
Decoder = Callable[..., NDArray[Any]]
"""``decode(buf, shape, dtype[, out])``: a chunk's bytes -> array (``out`` if given)."""


class _BitshuffleC:
    """The bitshuffle C library's block decoders, called through :mod:`ctypes`.

    ``bshuf_decompress_lz4/zstd`` write straight into the caller's buffer (no temporary
    frame, no copy) and, being foreign calls, release the GIL.  The library's own OpenMP
    team is limited to one thread in every thread that decodes: parallelism comes from
    the reader threads, whose number the caller chooses.  ``None`` attributes if the
    symbols cannot be found (then the Python API is used).
    """

    def __init__(self) -> None:
        self.lz4: Any = None
        self.zstd: Any = None
        self._omp_set: Any = None
        self._local = threading.local()
        try:
            import bitshuffle.ext as ext

            lib = ctypes.CDLL(ext.__file__)
        except (ImportError, OSError) as exc:  # pragma: no cover - declared dependency
            logger.debug("bitshuffle C decoder unavailable: %s", exc)
            return
        for name in ("lz4", "zstd"):
            func = getattr(lib, f"bshuf_decompress_{name}", None)
            if func is not None:
                func.restype = ctypes.c_int64
                func.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_size_t] * 3
                setattr(self, name, func)
        libs = Path(ext.__file__).parent.parent / "bitshuffle.libs"
        for gomp in sorted(libs.glob("libgomp*.so*")) if libs.is_dir() else []:
            try:
                self._omp_set = ctypes.CDLL(str(gomp)).omp_set_num_threads
            except (OSError, AttributeError):  # pragma: no cover
                continue
            break

    def one_thread(self) -> None:
        """Limit bitshuffle's OpenMP team to one thread for the calling thread (once)."""
        if self._omp_set is not None and not getattr(self._local, "done", False):
            self._omp_set(1)
            self._local.done = True


_BSHUF: _BitshuffleC | None = None


def _bshuf_c() -> _BitshuffleC:
    global _BSHUF
    if _BSHUF is None:
        _BSHUF = _BitshuffleC()
    return _BSHUF


def _bitshuffle_decoder(values: tuple[int, ...]) -> Decoder | None:
    comp = values[4] if len(values) > 4 else 0
    if comp not in (2, 3):
        return None
    clib = _bshuf_c()
    cfunc = clib.lz4 if comp == 2 else clib.zstd
    if cfunc is None:  # pragma: no cover - the Python API (allocates and copies)
        return _bitshuffle_py_decoder(comp)

    def decode(
        buf: bytes, shape: tuple[int, ...], dtype: np.dtype, out: NDArray[Any] | None = None
    ) -> NDArray[Any]:
        # header: uint64 BE uncompressed bytes, uint32 BE block size in bytes
        nbytes, block_bytes = struct.unpack(">QI", buf[:12])
        if out is None:
            out = np.empty(shape, dtype=dtype)
        if nbytes != out.nbytes or not out.flags.c_contiguous:
            raise ValueError(f"chunk holds {nbytes} bytes, expected {out.nbytes}")
        clib.one_thread()
        src = np.frombuffer(buf, dtype=np.uint8)
        used = cfunc(
            src.ctypes.data + 12,
            out.ctypes.data,
            out.size,
            dtype.itemsize,
            block_bytes // dtype.itemsize,
        )
        if used != src.size - 12:
            raise ValueError(f"bitshuffle decoder returned {used} for {src.size - 12} bytes")
        return out

    return decode


def _bitshuffle_py_decoder(comp: int) -> Decoder | None:  # pragma: no cover - fallback
    import bitshuffle

    func = bitshuffle.decompress_lz4 if comp == 2 else getattr(bitshuffle, "decompress_zstd", None)
    if func is None:
        return None

    def decode(
        buf: bytes, shape: tuple[int, ...], dtype: np.dtype, out: NDArray[Any] | None = None
    ) -> NDArray[Any]:
        block_bytes = struct.unpack(">I", buf[8:12])[0]
        arr = np.frombuffer(buf, dtype=np.uint8, offset=12)
        got = func(arr, shape, dtype, block_bytes // dtype.itemsize)
        if out is None:
            return got
        out[...] = got
        return out

    return decode


def _lz4_decoder() -> Decoder | None:
    try:
        import lz4.block as lz4block
    except ImportError:
        return None

    def decode(buf: bytes, shape: tuple[int, ...], dtype: np.dtype) -> NDArray[Any]:
        total, block = struct.unpack(">QI", buf[:12])
        out = bytearray(total)
        pos, done = 12, 0
        while done < total:
            size = min(block, total - done)
            csize = struct.unpack(">I", buf[pos : pos + 4])[0]
            pos += 4
            piece = buf[pos : pos + csize]
            if csize == size:  # stored uncompressed
                out[done : done + size] = piece
            else:
                out[done : done + size] = lz4block.decompress(piece, uncompressed_size=size)
            pos += csize
            done += size
        return np.frombuffer(out, dtype=dtype).reshape(shape)

    return decode


def _blosc_decoder() -> Decoder | None:
    try:
        import blosc2
    except ImportError:
        return None

    def decode(buf: bytes, shape: tuple[int, ...], dtype: np.dtype) -> NDArray[Any]:
        return np.frombuffer(blosc2.decompress(buf), dtype=dtype).reshape(shape)

    return decode


def _gzip_decoder(shuffled: bool) -> Decoder:
    def decode(buf: bytes, shape: tuple[int, ...], dtype: np.dtype) -> NDArray[Any]:
        raw = zlib.decompress(buf)
        if shuffled and dtype.itemsize > 1:
            b = np.frombuffer(raw, dtype=np.uint8).reshape(dtype.itemsize, -1)
            return np.ascontiguousarray(b.T).view(dtype).reshape(shape)
        return np.frombuffer(raw, dtype=dtype).reshape(shape)

    return decode


def _choose_decoder(filters: list[tuple[int, tuple[int, ...]]]) -> tuple[str, Decoder | None]:
    ids = [f[0] for f in filters]
    if ids == [32008]:
        dec = _bitshuffle_decoder(filters[0][1])
        comp = filters[0][1][4] if len(filters[0][1]) > 4 else 0
        return {2: "bitshuffle-lz4", 3: "bitshuffle-zstd"}.get(comp, "bitshuffle"), dec
    if ids == [1]:
        return "gzip", _gzip_decoder(False)
    if ids == [2, 1]:
        return "shuffle-gzip", _gzip_decoder(True)
    if ids == [32004]:
        return "lz4", _lz4_decoder()
    if ids == [32001]:
        return "blosc", _blosc_decoder()
    return "+".join(FILTER_NAMES.get(i, str(i)) for i in ids), None


class ChunkReader:
    """Read frames of a chunked 3-D dataset, decoding compressed chunks without h5py's lock.

    :meth:`read` may be called from several threads at once (for different frames):
    reading the compressed bytes is serialised by h5py, decoding runs in parallel.

    Parameters
    ----------
    dataset : h5py.Dataset
        A 3-D ``(nframes, ny, nx)`` dataset.

    Attributes
    ----------
    method : str
        ``"h5py"`` (uncompressed, or a pipeline decoded by HDF5) or ``"chunks:<codec>"``.
    """

    def __init__(self, dataset: h5py.Dataset) -> None:
        ensure_plugins()
        self.dataset = dataset
        self.dtype = dataset.dtype
        self.filters = dataset_filters(dataset) if dataset.chunks else []
        self.codec = "none"
        self._decode: Decoder | None = None
        if self.filters and dataset.dtype.kind in "iuf":
            self.codec, self._decode = _choose_decoder(self.filters)
            if self._decode is None:
                logger.debug(
                    "%s: no parallel decoder for %s; using h5py's filter pipeline",
                    dataset.name,
                    self.codec,
                )
        self.method = f"chunks:{self.codec}" if self._decode is not None else "h5py"
        # decoders that can write into the caller's buffer (C-contiguous whole chunks)
        self._direct = self.codec.startswith("bitshuffle-") and _bshuf_c().lz4 is not None
        self.chunks = tuple(dataset.chunks) if dataset.chunks else None

    @property
    def parallel(self) -> bool:
        """True if chunks are decoded outside h5py (worth several threads)."""
        return self._decode is not None

    def read(self, out: NDArray[Any], start: int, stop: int) -> None:
        """Fill ``out[: stop - start]`` with frames ``[start, stop)``."""
        k = stop - start
        if self._decode is None or self.chunks is None:
            self.dataset.read_direct(out, np.s_[start:stop], np.s_[0:k])
            return
        shape = self.dataset.shape
        cz, cy, cx = self.chunks
        dsid = self.dataset.id
        z_first = (start // cz) * cz
        for z0, y0, x0 in product(
            range(z_first, stop, cz), range(0, shape[1], cy), range(0, shape[2], cx)
        ):
            mask, buf = dsid.read_direct_chunk((z0, y0, x0))
            # intersection of the chunk with the requested frames (and the dataset edge)
            a, b = max(z0, start), min(z0 + cz, stop)
            y1, x1 = min(y0 + cy, shape[1]), min(x0 + cx, shape[2])
            target = out[a - start : b - start, y0:y1, x0:x1]
            if mask or buf is None:  # a filter was skipped for this chunk: let HDF5 do it
                self.dataset.read_direct(
                    out, np.s_[a:b, y0:y1, x0:x1], np.s_[a - start : b - start, y0:y1, x0:x1]
                )
                continue
            whole = a == z0 and b == z0 + cz and target.shape[1:] == (cy, cx)
            try:
                if (
                    whole
                    and self._direct
                    and target.dtype == self.dtype
                    and target.flags.c_contiguous
                ):
                    # decode straight into the caller's buffer (contiguous: whole frames)
                    self._decode(buf, (cz, cy, cx), self.dtype, out=target)
                else:
                    chunk = self._decode(buf, (cz, cy, cx), self.dtype)
                    target[...] = chunk[a - z0 : b - z0, : y1 - y0, : x1 - x0]
            except ValueError as exc:  # let HDF5 decode it (and report a corrupt chunk)
                logger.debug("%s: chunk %s: %s", self.dataset.name, (z0, y0, x0), exc)
                self.dataset.read_direct(
                    out, np.s_[a:b, y0:y1, x0:x1], np.s_[a - start : b - start, y0:y1, x0:x1]
                )
