"""2-D pixel masks: editing, import, detector gaps, NeXus I/O, previews, CLI."""

from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from nxrefine_bs.calibration import (
    MaskError,
    PixelMask,
    read_pixel_mask,
    save_mask_preview,
    write_pixel_mask,
)
from nxrefine_bs.calibration.powder import get_detector
from nxrefine_bs.errors import CalibrationError


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_template(path: Path, shape=(40, 50), entries=("f1", "f2"), description=None) -> Path:
    with h5py.File(path, "w") as f:
        for name in ("entry", *entries):
            e = f.create_group(name)
            e.attrs["NX_class"] = "NXentry"
            d = e.create_group("instrument/detector")
            d.attrs["NX_class"] = "NXdetector"
            d["shape"] = np.array(shape, dtype=np.int32)
            if description:
                d["description"] = description
    return path


def test_rectangle_inclusive_any_order_and_clipped():
    m = PixelMask((10, 12))
    m.add_rectangle(5, 4, 2, 1)  # corners in any order
    assert m.array.dtype == np.int8
    assert m.count == 4 * 4
    assert m.array[1:5, 2:6].all()
    m.add_rectangle(10, 8, 50, 50)  # clipped
    assert m.array[8:, 10:].all()
    assert m.count == 16 + 2 * 2
    m.add_rectangle(100, 100, 200, 200)  # off the detector: no change
    assert m.count == 20


def test_circle():
    m = PixelMask((21, 21)).add_circle(10, 10, 3)
    yy, xx = np.mgrid[:21, :21]
    expected = (xx - 10) ** 2 + (yy - 10) ** 2 <= 9
    np.testing.assert_array_equal(m.array.astype(bool), expected)
    m.add_circle(0, 0, 2)  # partly off the detector
    assert m.array[0, 0] == 1 and m.array[2, 0] == 1 and m.array[2, 2] == 0
    with pytest.raises(MaskError):
        m.add_circle(1, 1, -1)


def test_negative_pixels_and_array():
    img = np.ones((4, 4))
    img[0, 0] = -1
    img[1, 1] = np.nan
    m = PixelMask((4, 4)).add_negative_pixels(img)
    assert m.count == 2
    m.add_array(np.eye(4))
    assert m.count == 4
    with pytest.raises(MaskError, match="shape"):
        m.add_array(np.zeros((3, 3)))


def test_detector_gaps():
    det = get_detector("Pilatus 1M")
    m = PixelMask(det.shape).add_rectangle(0, 0, 9, 9)
    m.combine_with_detector_gaps("Pilatus 1M")
    gaps = det.mask.astype(bool)
    assert m.array[gaps].all()
    assert m.array[:10, :10].all()
    assert m.count == int((gaps | (np.arange(det.shape[0])[:, None] < 10)
                           & (np.arange(det.shape[1])[None, :] < 10)).sum())  # fmt: skip
    with pytest.raises(MaskError, match="shape"):
        PixelMask((10, 10)).combine_with_detector_gaps("Pilatus 1M")
    assert PixelMask.for_detector("Pilatus 1M").count == int(gaps.sum())


def test_import_mask_image(tmp_path):
    import fabio

    data = np.zeros((30, 40), dtype=np.int32)
    data[5:8, 10:20] = 3
    fabio.edfimage.EdfImage(data=data).write(str(tmp_path / "m.edf"))
    fabio.tifimage.TifImage(data=data.astype(np.uint8)).write(str(tmp_path / "m.tif"))
    m = PixelMask((30, 40)).add_rectangle(0, 0, 1, 1)
    m.import_mask_image(tmp_path / "m.edf")  # replaces
    assert m.count == 30
    m.add_rectangle(0, 0, 1, 1).import_mask_image(tmp_path / "m.tif", replace=False)
    assert m.count == 34
    with pytest.raises(MaskError, match=r"\(30, 40\).*\(20, 20\)"):
        PixelMask((20, 20)).import_mask_image(tmp_path / "m.edf")
    with pytest.raises(MaskError, match="nothing.edf"):
        PixelMask((30, 40)).import_mask_image(tmp_path / "nothing.edf")
    assert issubclass(MaskError, CalibrationError) and issubclass(MaskError, ValueError)


def test_write_and_read_all_entries(tmp_path):
    from nexusformat.nexus import nxload

    path = make_template(tmp_path / "config.nxs", entries=("f1", "f2", "f3"))
    assert read_pixel_mask(path, "f1") is None
    m = PixelMask((40, 50)).add_rectangle(3, 4, 10, 12)
    assert write_pixel_mask(path, m) == ["f1", "f2", "f3"]
    for e in ("f1", "f2", "f3"):
        back = read_pixel_mask(path, e)
        np.testing.assert_array_equal(back.array, m.array)
    with h5py.File(path, "r") as f:
        assert f["f2/instrument/detector/pixel_mask"].dtype == np.int8
        assert "pixel_mask" not in f["entry/instrument/detector"]
    assert nxload(str(path))["f3/instrument/detector/pixel_mask"].nxvalue.sum() == m.count

    # one entry only; plain arrays accepted
    m2 = np.zeros((40, 50), dtype=bool)
    m2[0, 0] = True
    assert write_pixel_mask(path, m2, entries="f2") == ["f2"]
    assert read_pixel_mask(path, "f2").count == 1
    assert read_pixel_mask(path, "f1").count == m.count


def test_write_errors_leave_file_untouched(tmp_path):
    path = make_template(tmp_path / "config.nxs")
    before = _digest(path)
    with pytest.raises(MaskError, match="f7"):
        write_pixel_mask(path, PixelMask((40, 50)), entries=["f1", "f7"])
    with pytest.raises(MaskError, match=r"\(40, 50\)"):
        write_pixel_mask(path, PixelMask((10, 10)))
    with pytest.raises(MaskError, match="does not exist"):
        write_pixel_mask(tmp_path / "missing.nxs", PixelMask((10, 10)))
    with pytest.raises(MaskError, match="f9"):
        read_pixel_mask(path, "f9")
    assert _digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.nxs"]


def test_preview(tmp_path):
    m = PixelMask((30, 40)).add_circle(20, 15, 5)
    img = np.random.default_rng(0).poisson(10, (30, 40)).astype(float)
    out = save_mask_preview(m, img, tmp_path / "sub" / "mask.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert save_mask_preview(m.array, None, tmp_path / "m2.png").exists()
    with pytest.raises(MaskError):
        save_mask_preview(m, np.zeros((3, 3)), tmp_path / "bad.png")


# ---------------------------------------------------------------------------------------
# CLI handlers (through nxrefine_bs.cli.main when the calibration module is registered)
# ---------------------------------------------------------------------------------------
def _main(argv):
    import nxrefine_bs.cli as cli

    if "nxrefine_bs.cli.calibration" in cli.COMMAND_MODULES:
        return cli.main(argv)
    old = cli.COMMAND_MODULES
    cli.COMMAND_MODULES = [*old, "nxrefine_bs.cli.calibration"]
    try:
        return cli.main(argv)
    finally:
        cli.COMMAND_MODULES = old


def test_cli_mask(tmp_path, capsys):
    import fabio

    det = get_detector("Pilatus 100k")
    path = make_template(tmp_path / "config.nxs", shape=det.shape, description=det.name)
    assert _main(["mask", "add-rect", str(path), "0", "0", "9", "4"]) == 0
    assert read_pixel_mask(path, "f2").count == 50
    assert _main(["mask", "add-circle", str(path), "100", "100", "2", "--entries", "f1"]) == 0
    assert read_pixel_mask(path, "f1").count == 50 + 13
    assert read_pixel_mask(path, "f2").count == 50
    data = np.zeros(det.shape, dtype=np.int32)
    data[:, :3] = 1
    fabio.edfimage.EdfImage(data=data).write(str(tmp_path / "m.edf"))
    png = tmp_path / "preview.png"
    assert _main(["mask", "import", str(path), str(tmp_path / "m.edf"), "--png", str(png)]) == 0
    assert read_pixel_mask(path, "f1").count == det.shape[0] * 3
    assert png.exists()
    capsys.readouterr()
    assert _main(["mask", "show", str(path), "--entry", "f2"]) == 0
    assert f"{det.shape[0] * 3} masked" in capsys.readouterr().out

    before = _digest(path)
    wrong = tmp_path / "wrong.edf"
    fabio.edfimage.EdfImage(data=np.zeros((5, 5), np.int32)).write(str(wrong))
    assert _main(["mask", "import", str(path), str(wrong)]) == 2
    assert "wrong.edf" in capsys.readouterr().err
    assert _digest(path) == before
