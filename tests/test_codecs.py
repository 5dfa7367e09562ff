"""Compressed detector stacks: every codec reads back exactly, in parallel and serially."""

from __future__ import annotations

import logging

import h5py
import numpy as np
import pytest

from nxrefine_bs.errors import SettingsError
from nxrefine_bs.nexus.codecs import (
    CODECS,
    ChunkReader,
    compression_options,
    dataset_filters,
)
from nxrefine_bs.reduce.framestream import DataSource, FrameStream

SHAPE = (9, 61, 47)


def _frames(seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    frames = rng.poisson(4.0, SHAPE).astype(np.int32)
    frames[:, 20:23, :] = -1  # a module gap
    frames[4, 30, 30] = 2_000_000  # a Bragg peak
    return frames


def _write(path, frames, codec, chunks=(1, SHAPE[1], SHAPE[2])):
    with h5py.File(path, "w") as f:
        opts = compression_options(codec)
        f.create_dataset("entry/data/data", data=frames, chunks=chunks, **opts)
    return DataSource(path, "f1", path, "/entry/data/data", False)


@pytest.mark.parametrize("codec", ["bslz4", "lz4", "zstd", "blosc", "gzip", "lzf", "bszstd"])
@pytest.mark.parametrize("readers", [0, 2])
def test_codec_reads_back_exactly(tmp_path, codec, readers):
    frames = _frames()
    src = _write(tmp_path / f"{codec}.h5", frames, codec)
    with h5py.File(src.data_file, "r") as f:
        assert dataset_filters(f["entry/data/data"]), f"{codec} wrote no filter"
    with FrameStream(src, readers=readers) as stream:
        got = np.concatenate([b.copy() for _, b in stream.blocks(1, 8)])
        np.testing.assert_array_equal(got, frames[1:8])
        np.testing.assert_array_equal(stream.read(6, 9), frames[6:9])


def test_bitshuffle_lz4_is_decoded_outside_h5py(tmp_path):
    """bslz4 chunks go through read_direct_chunk + the bitshuffle codec, not h5py's filter."""
    src = _write(tmp_path / "b.h5", _frames(), "bslz4")
    with h5py.File(src.data_file, "r") as f:
        reader = ChunkReader(f["entry/data/data"])
        assert reader.parallel and reader.method == "chunks:bitshuffle-lz4"
    with FrameStream(src) as stream:
        assert stream.reader.parallel


@pytest.mark.parametrize("codec", ["bslz4", "gzip"])
def test_tiled_and_deep_chunks_with_partial_edges(tmp_path, codec, caplog):
    """Chunks that tile the frame (with partial edge chunks) and span several frames,
    decoded by the chunk decoder itself (no chunk handed back to HDF5's pipeline)."""
    frames = _frames(5)
    src = _write(tmp_path / "t.h5", frames, codec, chunks=(4, 16, 20))
    with (
        caplog.at_level(logging.DEBUG, logger="nxrefine_bs.nexus.codecs"),
        FrameStream(src, readers=2) as stream,
    ):
        assert stream.block_frames == 4
        got = {s: b.copy() for s, b in stream.blocks(2, 9)}
    assert sorted(got) == [2, 4, 8]
    np.testing.assert_array_equal(np.concatenate([got[s] for s in sorted(got)]), frames[2:9])
    assert not [r for r in caplog.records if ": chunk (" in r.getMessage()]


def test_shuffle_gzip_and_float_data(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.normal(size=SHAPE).astype(np.float32)
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset(
            "d", data=frames, chunks=(1,) + SHAPE[1:], compression="gzip", shuffle=True
        )
    with h5py.File(path, "r") as f:
        reader = ChunkReader(f["d"])
        assert reader.method == "chunks:shuffle-gzip"
        out = np.empty_like(frames)
        reader.read(out, 0, SHAPE[0])
    np.testing.assert_array_equal(out, frames)


def test_unknown_codec_is_refused():
    with pytest.raises(SettingsError, match="unknown compression 'snappy'"):
        compression_options("snappy")
    assert compression_options(None) == {} and "bslz4" in CODECS


def test_early_break_stops_the_readers(tmp_path):
    src = _write(tmp_path / "b.h5", _frames(), "bslz4")
    with FrameStream(src, readers=2) as stream:
        for start, block in stream.blocks(0, 9):
            assert block.shape == (1,) + SHAPE[1:]
            if start == 2:
                break
        # the stream is still usable after an abandoned iteration
        np.testing.assert_array_equal(
            np.concatenate([b.copy() for _, b in stream.blocks(0, 9)]), _frames()
        )


# --------------------------------------------------------------------------- end to end
def test_steps_on_a_bslz4_scan_equal_the_raw_scan(tmp_path):
    """max, prepare and transform read a bitshuffle-LZ4 scan and give the raw scan's results."""
    from nxrefine_bs.reduce import mask3d, maximum, transform
    from nxrefine_bs.simulation.scan import make_simulated_scan

    scans = {
        codec: make_simulated_scan(
            tmp_path / str(codec), n_frames=24, seed=4, write_truth_orientation=True,
            compression=codec,
        )
        for codec in (None, "bslz4")
    }
    with h5py.File(scans["bslz4"].scan_dir / "f1.h5", "r") as f:
        assert "32008" in f["entry/data/data"]._filters  # really compressed
    grid = {"qh": (-3, 0.1, 3), "qk": (-3, 0.1, 3), "ql": (-3, 0.1, 3)}
    out = {}
    for codec, sim in scans.items():
        mx = maximum.run(sim.scan_file, "f1", first=0, last=24)
        mask3d.run(sim.scan_file, "f1", first=0, last=24)
        tr = transform.run(sim.scan_file, "f1", first=0, last=24, mask=True, **grid)
        with h5py.File(sim.scan_file, "r") as f:
            mask = f["f1/data/data_mask"][()]
        with h5py.File(tr["file"], "r") as f:
            v = f["entry/data/v"][()]
        out[codec] = (mx["maximum"], mask, v, tr["pixels"])
    assert out[None][0] == out["bslz4"][0]
    np.testing.assert_array_equal(out[None][1], out["bslz4"][1])
    assert out[None][1].any()
    np.testing.assert_array_equal(out[None][2], out["bslz4"][2])
    assert out[None][3] == out["bslz4"][3] > 0


def test_simulated_detector_writes_bslz4(tmp_path):
    from nxrefine_bs.devices.frames import FrameFile

    frames = _frames()
    ff = FrameFile(tmp_path / "f1.h5", SHAPE[1:], compression="bslz4")
    for i, fr in enumerate(frames):
        ff.append(fr, {"phi": 0.1 * i})
    ff.close()
    with h5py.File(tmp_path / "f1.h5", "r") as f:
        ds = f["entry/data/data"]
        assert "32008" in ds._filters
    src = DataSource(tmp_path / "f1.h5", "f1", tmp_path / "f1.h5", "/entry/data/data", False)
    with FrameStream(src) as stream:
        assert stream.reader.method == "chunks:bitshuffle-lz4"
        np.testing.assert_array_equal(stream.read(0, SHAPE[0]), frames)


def test_corrupt_bslz4_chunk_is_an_error_not_garbage(tmp_path):
    """A chunk the C decoder rejects goes to HDF5, which reports it: never silent garbage."""
    frames = _frames()
    src = _write(tmp_path / "c.h5", frames, "bslz4")
    with h5py.File(src.data_file, "r+") as f:
        ds = f["entry/data/data"]
        _, good = ds.id.read_direct_chunk((2, 0, 0))
        bad = good[:12] + bytes(len(good) - 12)  # right header, zeroed payload
        ds.id.write_direct_chunk((2, 0, 0), bad)
    with h5py.File(src.data_file, "r") as f:
        reader = ChunkReader(f["entry/data/data"])
        out = np.empty((1,) + SHAPE[1:], dtype=np.int32)
        reader.read(out, 1, 2)  # an intact chunk, decoded straight into out
        np.testing.assert_array_equal(out[0], frames[1])
        with pytest.raises(OSError):
            reader.read(out, 2, 3)
