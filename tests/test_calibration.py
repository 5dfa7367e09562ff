"""Powder calibration with pyFAI: accuracy on simulated images, I/O, errors, CLI."""

from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from nxrefine_bs.calibration import (
    CalibrationResult,
    calibrant_names,
    calibrate_powder,
    load_image,
    nxrefine_to_poni,
    poni_to_nxrefine,
    read_poni,
    save_plots,
    simulate_powder_image,
    write_calibration,
    write_poni,
)
from nxrefine_bs.calibration.powder import get_detector
from nxrefine_bs.errors import CalibrationError, NXRefineBSError


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_template(path: Path, detector: str = "Pilatus 1M", entries=("f1", "f2")) -> Path:
    """Minimal configuration-like NeXus file written with h5py."""
    det = get_detector(detector)
    with h5py.File(path, "w") as f:
        for name in ("entry", *entries):
            e = f.create_group(name)
            e.attrs["NX_class"] = "NXentry"
            inst = e.create_group("instrument")
            inst.attrs["NX_class"] = "NXinstrument"
            mono = inst.create_group("monochromator")
            mono.attrs["NX_class"] = "NXmonochromator"
            mono["wavelength"] = np.float32(0.5)
            d = inst.create_group("detector")
            d.attrs["NX_class"] = "NXdetector"
            d["description"] = det.name
            d["distance"] = 300.0
            d["shape"] = np.array(det.shape, dtype=np.int32)
            d["pixel_size"] = det.pixel1 * 1e3
            for key in ("yaw", "pitch", "roll"):
                d[key] = 0.0
    return path


def _truth(distance, xc, yc, yaw, pitch):
    return {"distance": distance, "beam_center_x": xc, "beam_center_y": yc, "yaw": yaw,
            "pitch": pitch, "roll": 0.0}  # fmt: skip


def simulate(detector, truth, calibrant="CeO2", wavelength=0.5, seed=1):
    det = get_detector(detector)
    poni = nxrefine_to_poni(**truth, pixel1=det.pixel1, pixel2=det.pixel2)
    return simulate_powder_image(
        det,
        calibrant,
        wavelength=wavelength,
        distance_m=poni["dist"],
        poni1=poni["poni1"],
        poni2=poni["poni2"],
        rot1=poni["rot1"],
        rot2=poni["rot2"],
        rot3=poni["rot3"],
        seed=seed,
        background=20.0,
    )


# ---------------------------------------------------------------------------------------
# Geometry conversion
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("orientation", ["-y +z -x", "-y -z +x"])
@pytest.mark.parametrize("rots", [(0.0, 0.0), (0.03, -0.02), (-0.05, 0.04)])
def test_conversion_gives_the_same_two_theta_as_pyfai(rots, orientation):
    """The nxrefine-bs Geometry made from a PONI sees every pixel at pyFAI's 2-theta."""
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    from nxrefine_bs.geometry import Geometry

    det = get_detector("Pilatus 1M")
    ai = AzimuthalIntegrator(
        dist=0.25, poni1=0.09, poni2=0.08, rot1=rots[0], rot2=rots[1], rot3=0.01, detector=det
    )
    nx = poni_to_nxrefine(
        0.25, 0.09, 0.08, rots[0], rots[1], 0.01, det.pixel1, det.pixel2, orientation
    )
    geom = Geometry(
        shape=det.max_shape,
        pixel_size=det.pixel2 * 1e3,
        detector_orientation=orientation,
        **nx,
    )
    ny, nx_ = det.max_shape
    yy, xx = np.mgrid[0:ny:37, 0:nx_:41]
    expected = np.degrees(ai.twoThetaArray()[yy, xx])
    np.testing.assert_allclose(geom.two_theta(xx, yy), expected, atol=1e-5)  # pyFAI: float32
    # On an untilted detector the direct beam sits half a pixel from Fit2D's centre,
    # which counts pixel i from its corner rather than its centre.
    if rots == (0.0, 0.0):
        assert nx["beam_center_x"] == pytest.approx(ai.getFit2D()["centerX"] - 0.5, abs=1e-9)
    back = nxrefine_to_poni(
        **nx, pixel1=det.pixel1, pixel2=det.pixel2, detector_orientation=orientation
    )
    for key, value in {"dist": 0.25, "poni1": 0.09, "poni2": 0.08}.items():
        assert back[key] == pytest.approx(value, abs=1e-12)


def test_roll_does_not_change_two_theta():
    """rot3 is a rotation about the beam: the reason it is not refined."""
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    det = get_detector("Pilatus 100k")
    kw = {"dist": 0.2, "poni1": 0.02, "poni2": 0.04, "rot1": 0.03, "rot2": -0.02, "detector": det}
    t0 = AzimuthalIntegrator(rot3=0.0, **kw).twoThetaArray()
    t1 = AzimuthalIntegrator(rot3=0.3, **kw).twoThetaArray()
    np.testing.assert_allclose(t0, t1, atol=1e-12)


# ---------------------------------------------------------------------------------------
# Refinement from a nominal geometry (zero-hint accuracy: test_calibration_search.py)
# ---------------------------------------------------------------------------------------
def test_refine_wavelength():
    det = get_detector("Pilatus 1M")
    truth = _truth(250.0, 500.0, 480.0, 1.0, -1.0)
    image = simulate(det, truth, "CeO2", 0.5)
    result = calibrate_powder(
        image, det, "CeO2", wavelength=0.5005, distance=250.0, beam_center_x=503,
        beam_center_y=478, yaw=1.0, pitch=-1.0, fix_wavelength=False,
    )  # fmt: skip
    assert result.wavelength_angstrom == pytest.approx(0.5, abs=5e-4)
    assert abs(result.distance - 250.0) < 1.0


def test_calibrated_template_gives_the_reduction_the_true_two_theta(tmp_path):
    """Calibrate, write into a template, read it back as a Geometry: pyFAI's 2-theta."""
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    from nxrefine_bs.nexus.geometry_io import read_geometry

    det = get_detector("Pilatus 1M")
    truth = _truth(220.0, 470.3, 530.8, 1.2, -0.7)
    image = simulate("Pilatus 1M", truth)
    result = calibrate_powder(
        image, det, "CeO2", wavelength=0.5, distance=222.0, beam_center_x=466.0,
        beam_center_y=534.0, yaw=0.5, pitch=0.0,
    )  # fmt: skip
    template = make_template(tmp_path / "config.nxs")
    write_calibration(template, result, image, "CeO2")
    with h5py.File(template, "r") as f:
        geom = read_geometry(f["f1"]).replace(shape=det.shape)
    poni = nxrefine_to_poni(**truth, pixel1=det.pixel1, pixel2=det.pixel2)
    true_ai = AzimuthalIntegrator(detector=det, wavelength=0.5e-10, **poni)
    ny, nx = det.shape
    yy, xx = np.mgrid[0:ny:29, 0:nx:31]
    expected = np.degrees(true_ai.twoThetaArray()[yy, xx])
    np.testing.assert_allclose(geom.two_theta(xx, yy), expected, atol=2e-3)


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------
NOMINAL = {"wavelength": 0.5, "distance": 200.0, "beam_center_x": 500.0, "beam_center_y": 500.0}


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "powder.tif"
    bad.write_text("this is not a TIFF")
    with pytest.raises(CalibrationError, match="powder.tif"):
        calibrate_powder(bad, "Pilatus 1M", **NOMINAL)
    with pytest.raises(CalibrationError, match="does not exist"):
        load_image(tmp_path / "missing.cbf")


def test_unknown_calibrant_lists_valid_names():
    image = np.zeros(get_detector("Pilatus 1M").shape)
    with pytest.raises(CalibrationError) as info:
        calibrate_powder(image, "Pilatus 1M", "Unobtainium", **NOMINAL)
    assert "Unobtainium" in str(info.value)
    assert "CeO2" in str(info.value) and "LaB6" in str(info.value)
    assert "CeO2" in calibrant_names()
    assert isinstance(info.value, NXRefineBSError)


def test_noise_image_finds_no_rings():
    shape = get_detector("Pilatus 1M").shape
    image = np.random.default_rng(3).poisson(50, shape).astype(np.float64)
    with pytest.raises(CalibrationError, match=r"found no ring pattern.*wavelength"):
        calibrate_powder(image, "Pilatus 1M", wavelength=0.5)
    # a nominal geometry is tried as well, and finds no ring either
    with pytest.raises(CalibrationError, match=r"nominal start.*found [01] ring\(s\)"):
        calibrate_powder(image, "Pilatus 1M", **NOMINAL)


def test_shape_mismatch():
    with pytest.raises(CalibrationError, match="shape"):
        calibrate_powder(np.zeros((10, 10)), "Pilatus 1M", **NOMINAL)


def test_bad_inputs_leave_template_unchanged(tmp_path):
    template = make_template(tmp_path / "config.nxs")
    before = _digest(template)
    det = get_detector("Pilatus 1M")
    image = np.random.default_rng(0).poisson(50, det.shape).astype(np.float64)
    bad = tmp_path / "bad.cbf"
    bad.write_bytes(b"\x00garbage")
    from nxrefine_bs.cli.calibration import register  # noqa: F401 - imports cleanly

    calls = [
        lambda: calibrate_powder(bad, det, **NOMINAL),
        lambda: calibrate_powder(image, det, "NoSuchCalibrant", **NOMINAL),
        lambda: calibrate_powder(image, det, **NOMINAL),
    ]
    for call in calls:
        with pytest.raises(CalibrationError):
            call()
        assert _digest(template) == before
    # a result with a wrong shape or a wrong entry must not touch the file either
    result = _fake_result(det)
    with pytest.raises(CalibrationError, match="shape"):
        write_calibration(template, result, np.zeros((5, 5)), "CeO2")
    with pytest.raises(CalibrationError, match="f9"):
        write_calibration(template, result, image, "CeO2", entries=["f1", "f9"])
    assert _digest(template) == before


def _fake_result(det) -> CalibrationResult:
    poni = nxrefine_to_poni(300.0, 490.0, 520.0, 0.5, -0.3, 0.0, det.pixel1, det.pixel2)
    return CalibrationResult(
        detector=det.name, pixel1=det.pixel1, pixel2=det.pixel2, shape=tuple(det.shape),
        wavelength=0.5e-10, calibrant="CeO2", n_rings=3, n_points=300, rms_residual=0.001,
        **poni,
    )  # fmt: skip


def test_atomic_write_on_failure(tmp_path, monkeypatch):
    """An error in the middle of writing leaves the original file byte-identical."""
    import nxrefine_bs.calibration.nexus_io as nexus_io

    template = make_template(tmp_path / "config.nxs")
    before = _digest(template)
    det = get_detector("Pilatus 1M")
    real = nexus_io.write_field

    def failing_write(group, name, *args, **kwargs):
        if name == "roll" and group.name.startswith("/f2"):  # after f1 was fully written
            raise RuntimeError("disk full")
        return real(group, name, *args, **kwargs)

    monkeypatch.setattr(nexus_io, "write_field", failing_write)
    with pytest.raises(RuntimeError, match="disk full"):
        write_calibration(template, _fake_result(det), np.ones(det.shape), "CeO2")
    assert _digest(template) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.nxs"]


# ---------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------
def test_write_calibration_layout(tmp_path):
    from nexusformat.nexus import nxload

    template = make_template(tmp_path / "config.nxs", entries=("f1", "f2", "f3"))
    det = get_detector("Pilatus 1M")
    result = _fake_result(det)
    image = np.random.default_rng(0).poisson(10, det.shape).astype(np.float32)
    written = write_calibration(template, result, image, "CeO2")
    assert written == ["f1", "f2", "f3"]
    with h5py.File(template, "r") as f:
        for e in written:
            cal = f[e]["instrument/calibration"]
            assert cal.attrs["NX_class"] == "NXdata"
            assert cal.attrs["signal"] == "data"
            np.testing.assert_array_equal(cal["data"][()], image)
            assert cal["calibrant"][()].decode() == "CeO2"
            ref = cal["refinement"]
            assert ref.attrs["NX_class"] == "NXprocess"
            assert ref["program"][()].decode() == "pyFAI"
            pars = ref["parameters"]
            assert pars.attrs["NX_class"] == "NXparameters"
            for key in ("Detector", "PixelSize1", "PixelSize2", "Distance", "Poni1", "Poni2",
                        "Rot1", "Rot2", "Rot3", "Wavelength"):  # fmt: skip
                assert key in pars
            assert pars["Distance"][()] == pytest.approx(result.dist)
            assert pars["Wavelength"][()] == pytest.approx(0.5e-10)
            d = f[e]["instrument/detector"]
            assert d["distance"][()] == pytest.approx(300.0)
            assert d["distance"].attrs["units"] == "mm"
            assert d["beam_center_x"][()] == pytest.approx(490.0)
            assert d["beam_center_y"][()] == pytest.approx(520.0)
            assert d["yaw"][()] == pytest.approx(0.5)
            assert d["pitch"][()] == pytest.approx(-0.3)
            assert d["roll"][()] == pytest.approx(0.0)
            pol = d["polarization"][()]
            assert pol.shape == det.shape
            assert 0.5 < pol.min() <= pol.max() <= 1.0 + 1e-6
            assert f[e]["instrument/monochromator/energy"][()] == pytest.approx(24.797, rel=1e-3)
        # untouched entry
        assert "calibration" not in f["entry/instrument"]
        # the image is stored once
        assert f["f1/instrument/calibration/data"].id == f["f2/instrument/calibration/data"].id
    root = nxload(str(template))
    assert root["f2/instrument/detector/distance"].nxvalue == pytest.approx(300.0)

    only = make_template(tmp_path / "scan.nxs")
    assert write_calibration(only, result, image, entries="f2") == ["f2"]
    with h5py.File(only, "r") as f:
        assert "calibration" not in f["f1/instrument"]
        assert "calibration" in f["f2/instrument"]


def test_poni_roundtrip(tmp_path):
    det = get_detector("Pilatus 1M")
    result = _fake_result(det)
    path = write_poni(result, tmp_path / "cal.poni")
    text = path.read_text()
    assert "Distance" in text and "Pilatus" in text
    back = read_poni(path)
    for key in ("dist", "poni1", "poni2", "rot1", "rot2", "rot3", "wavelength"):
        assert getattr(back, key) == pytest.approx(getattr(result, key), rel=1e-9, abs=1e-15)
    assert back.distance == pytest.approx(300.0)
    assert back.beam_center_x == pytest.approx(490.0)
    write_poni(result, path)  # overwrites, does not append
    assert path.read_text().count("Distance") == text.count("Distance")
    with pytest.raises(CalibrationError, match="missing.poni"):
        read_poni(tmp_path / "missing.poni")


def test_load_image_formats(tmp_path):
    import fabio

    data = np.arange(30 * 40, dtype=np.int32).reshape(30, 40)
    for cls, name in ((fabio.edfimage.EdfImage, "a.edf"), (fabio.tifimage.TifImage, "a.tif"),
                      (fabio.cbfimage.CbfImage, "a.cbf")):  # fmt: skip
        cls(data=data).write(str(tmp_path / name))
        np.testing.assert_array_equal(load_image(tmp_path / name), data)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["meta/x"] = np.arange(5)
        f["entry/data/data"] = data[None]
        f["other/image"] = data * 2
    np.testing.assert_array_equal(load_image(tmp_path / "a.h5"), data)
    np.testing.assert_array_equal(load_image(f"{tmp_path / 'a.h5'}#/other/image"), data * 2)
    with pytest.raises(CalibrationError, match="nothing"):
        load_image(f"{tmp_path / 'a.h5'}#/nothing")


def test_save_plots(tmp_path):
    det = get_detector("Pilatus 1M")
    image = simulate(det, _truth(300.0, 490.0, 520.0, 0.5, -0.3))
    result = _fake_result(det)  # the true geometry of the simulated image
    paths = save_plots(result, image, tmp_path / "plots")
    for key in ("cake", "rings"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_import_has_no_side_effects():
    import subprocess
    import sys

    code = (
        "import sys, nxrefine_bs.calibration, nxrefine_bs.cli.calibration;"
        "print(sorted(m for m in ('pyFAI', 'matplotlib', 'matplotlib.pyplot') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------
def _run_cli(argv):
    try:
        from nxrefine_bs.cli import COMMAND_MODULES, main
    except ImportError:  # pragma: no cover - CLI package not yet present
        pytest.skip("nxrefine_bs.cli.main not available")
    import nxrefine_bs.cli as cli

    if "nxrefine_bs.cli.calibration" not in COMMAND_MODULES:
        mods = [*COMMAND_MODULES, "nxrefine_bs.cli.calibration"]
        old = cli.COMMAND_MODULES
        cli.COMMAND_MODULES = mods
        try:
            return main(argv)
        finally:
            cli.COMMAND_MODULES = old
    return main(argv)


def test_cli_calibrate(tmp_path, capsys):
    import fabio

    det = get_detector("Pilatus 1M")
    truth = _truth(300.0, 510.0, 490.0, 1.0, -0.5)
    image = simulate(det, truth)
    fabio.cbfimage.CbfImage(data=image.astype(np.int32)).write(str(tmp_path / "ceo2.cbf"))
    template = make_template(tmp_path / "config.nxs")
    code = _run_cli([
        "calibrate", str(tmp_path / "ceo2.cbf"), str(template), "--calibrant", "CeO2",
        "--beam-center", "505", "493", "--yaw", "0.5", "--pitch", "0",
        "--poni-out", str(tmp_path / "out.poni"), "--plots", str(tmp_path / "plots"),
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "wrote calibration" in out
    with h5py.File(template, "r") as f:
        for e in ("f1", "f2"):
            assert f[e]["instrument/detector/distance"][()] == pytest.approx(300.0, rel=1e-3)
            assert f[e]["instrument/detector/beam_center_x"][()] == pytest.approx(510.0, abs=0.2)
    assert read_poni(tmp_path / "out.poni").distance == pytest.approx(300.0, rel=1e-3)
    assert (tmp_path / "plots" / "calibration_cake.png").exists()

    # PONI import without refinement, one entry
    template2 = make_template(tmp_path / "config2.nxs")
    code = _run_cli([
        "calibrate", str(tmp_path / "ceo2.cbf"), str(template2), "--entries", "f2",
        "--poni-in", str(tmp_path / "out.poni"), "--no-refine",
    ])  # fmt: skip
    assert code == 0
    with h5py.File(template2, "r") as f:
        assert "calibration" not in f["f1/instrument"]
        assert f["f2/instrument/detector/distance"][()] == pytest.approx(300.0, rel=1e-3)


def test_cli_calibrate_errors_keep_file(tmp_path, capsys):
    template = make_template(tmp_path / "config.nxs")
    before = _digest(template)
    bad = tmp_path / "bad.tif"
    bad.write_text("nope")
    code = _run_cli(["calibrate", str(bad), str(template)])
    err = capsys.readouterr().err
    assert code == 2
    assert "bad.tif" in err
    assert _digest(template) == before


def test_cli_calibrate_into_configuration_template(tmp_path, capsys):
    """End to end with a template written by nxrefine_bs.nexus.template (when present)."""
    template_mod = pytest.importorskip("nxrefine_bs.nexus.template")
    import fabio

    from nxrefine_bs.nexus.h5tools import read_field

    conf = template_mod.create_configuration(
        tmp_path / "pilatus.nxs", detector="Pilatus 1M", wavelength=0.5, distance=300.0,
        positions=[template_mod.Position(), template_mod.Position(chi=-45.0)],
    )  # fmt: skip
    with h5py.File(conf, "r") as f:
        xc0 = float(read_field(f["f1/instrument/detector"], "beam_center_x"))
        yc0 = float(read_field(f["f1/instrument/detector"], "beam_center_y"))
    det = get_detector("Pilatus 1M")
    truth = _truth(303.0, xc0 + 4.0, yc0 - 3.0, 0.7, -0.4)
    image = simulate(det, truth)
    fabio.edfimage.EdfImage(data=image).write(str(tmp_path / "ceo2.edf"))
    assert _run_cli(["calibrate", str(tmp_path / "ceo2.edf"), str(conf)]) == 0, capsys.readouterr()
    with h5py.File(conf, "r") as f:
        for e in ("f1", "f2"):
            d = f[e]["instrument/detector"]
            assert d["distance"][()] == pytest.approx(303.0, rel=1e-3)
            assert d["beam_center_x"][()] == pytest.approx(xc0 + 4.0, abs=0.2)
            assert d["beam_center_y"][()] == pytest.approx(yc0 - 3.0, abs=0.2)
            assert d["yaw"][()] == pytest.approx(0.7, abs=0.05)
            assert d["pitch"][()] == pytest.approx(-0.4, abs=0.05)
            assert f[e]["instrument/calibration/refinement/program"][()] == b"pyFAI"
