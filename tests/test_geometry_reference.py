"""Outside references for the rotation geometry of :mod:`nxrefine_bs.geometry`.

Two independent checks, so that a sign or handedness error in the goniometer, the
UB convention or the detector orientation fails a test (the simulator and the reduction
both use :class:`~nxrefine_bs.geometry.Geometry`, so they cannot catch it themselves):

1. **Reflections worked by hand.**  Simple cells, wavelengths and goniometer angles
   for which the Ewald construction can be done on paper; the arithmetic is in the
   comments of each test.
2. **xrayutilities** (``QConversion`` and ``HXRD``), an independent, published
   implementation of diffractometer angle -> HKL conversion, set up for the same
   diffractometer.

Convention mapping (also in ``docs/geometry.md``):

================================  ==============================================
nxrefine-bs (NXRefine)            xrayutilities
================================  ==============================================
lab frame: +x beam, +z up         ``r_i = [1, 0, 0]`` (primary beam along +x)
``G = Ry(theta) Rz(omega)``       sample circles, outermost first:
``Rx(chi) Rz(phi)``               ``["y+", "z+", "x+", "z+"]`` with angles
                                  ``(theta, omega, chi, phi)``
right-handed rotations            ``"a+"`` circles (right-handed about +a)
detector ``"-y +z -x"``,          ``init_area("z+", "y-", cch1=beam_center_y,
distance L, pixel p               cch2=beam_center_x, distance=L, pwidth=p)``;
                                  one detector circle ``["z+"]`` at angle 0
                                  (channel 1 = frame rows = pixel y, up;
                                  channel 2 = pixel x, along -y)
``UB`` (1/Angstrom, no 2 pi)      ``UB_xu = 2 pi UB`` (Q includes 2 pi)
``B`` Busing-Levy, a* along x     ``xu.materials.Crystal.B / (2 pi)`` (same)
``hkl = (UB)^-1 G^T q``           ``QConversion.area(theta, omega, chi, phi, 0,
                                  UB=2 pi UB)``
================================  ==============================================

Detector tilts (yaw/pitch/roll) and the sample offset are kept at zero here: the
detector part is checked against pyFAI in ``test_calibration``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from nxrefine_bs.geometry import Geometry, all_hkl, b_matrix, random_rotation, rotation_z

xu = pytest.importorskip("xrayutilities")

SQ3 = math.sqrt(3.0)

# Worked examples: lambda = 1 A, cubic a = 4 A, so (400) has |g| = 4/a = 1 1/A and
# Bragg's law sin(theta_B) = lambda |g| / 2 = 1/2 gives 2-theta = 60 deg.  Detector
# "-y +z -x" at L = 50 mm, 0.1 mm pixels, beam centre (1000, 1000): a ray leaving at
# 2-theta = 60 deg meets the plane x = L at a lateral distance L tan(60) = 86.6025 mm
# = 866.025 pixels from the centre.
HAND = Geometry(
    wavelength=1.0,
    distance=50.0,
    pixel_size=0.1,
    shape=(2001, 2001),
    beam_center_x=1000.0,
    beam_center_y=1000.0,
    phi_start=0.0,
    phi_step=0.1,
)
UB_CUBIC = np.eye(3) / 4.0
OFF = 50.0 * SQ3 / 0.1  # 866.025 pixels


def _phis(pred: dict, hkl: tuple[int, int, int]) -> list[float]:
    sel = np.all(pred["hkl"] == np.array(hkl, float), axis=1)
    return sorted(float(p) for p in pred["phi"][sel])


def test_400_on_phi_axis_only_hand_computed():
    """All angles 0: G = Rz(phi).  (400): g_crystal = (1, 0, 0) 1/A.

    g_lab = Rz(phi) (1,0,0) = (cos phi, sin phi, 0).  k_out = k_in + g with
    k_in = (1, 0, 0) 1/A; |k_out|^2 = 2 + 2 cos phi must be 1, so cos phi = -1/2:
    phi = 120 or 240 deg.  At phi = 120: k_out = (1/2, +sqrt(3)/2, 0), towards lab +y,
    i.e. towards *smaller* pixel x (detector x runs along -y):
    x = 1000 - 866.025 = 133.975, y = 1000.  At phi = 240: x = 1866.025.
    A left-handed Rz would swap the two pixels.
    """
    pred = HAND.predict([[4, 0, 0]], UB_CUBIC)
    order = np.argsort(pred["phi"])
    np.testing.assert_allclose(pred["phi"][order], [120.0, 240.0], atol=1e-9)
    np.testing.assert_allclose(pred["x"][order], [1000 - OFF, 1000 + OFF], atol=1e-6)
    np.testing.assert_allclose(pred["y"][order], [1000.0, 1000.0], atol=1e-6)
    np.testing.assert_allclose(pred["two_theta"], 60.0, atol=1e-9)
    # and back: the pixel at phi = 120 deg is (4, 0, 0)
    hkl = HAND.pixel_to_hkl(1000 - OFF, 1000.0, HAND.frame(120.0), UB_CUBIC)
    np.testing.assert_allclose(hkl, [4, 0, 0], atol=1e-9)
    # (0 4 0): Rz(phi) (0,1,0) = (-sin phi, cos phi, 0); -sin phi = -1/2 -> phi = 30 or
    # 150; at phi = 30 k_out = (1/2, cos 30, 0): towards +y again -> x = 133.975.
    pred = HAND.predict([[0, 4, 0]], UB_CUBIC)
    order = np.argsort(pred["phi"])
    np.testing.assert_allclose(pred["phi"][order], [30.0, 150.0], atol=1e-9)
    np.testing.assert_allclose(pred["x"][order], [1000 - OFF, 1000 + OFF], atol=1e-6)


def test_chi_tilts_the_phi_axis_right_handed():
    """chi = 90: G = Rx(90) Rz(phi); Rx(90) maps (x, y, z) -> (x, -z, y).

    (400) at phi = 120: Rz gives (-1/2, sqrt(3)/2, 0), Rx(90) gives (-1/2, 0, sqrt(3)/2);
    k_out = (1/2, 0, sqrt(3)/2) points *up* (+z), i.e. pixel y = 1000 + 866.025
    (detector y runs along +z), x = 1000.  chi = -90 sends it down.
    """
    g = HAND.replace(chi=90.0)
    pred = g.predict([[4, 0, 0]], UB_CUBIC)
    i = int(np.argmin(np.abs(pred["phi"] - 120.0)))
    assert pred["phi"][i] == pytest.approx(120.0, abs=1e-9)
    assert pred["x"][i] == pytest.approx(1000.0, abs=1e-6)
    assert pred["y"][i] == pytest.approx(1000.0 + OFF, abs=1e-6)
    np.testing.assert_allclose(
        g.pixel_to_hkl(1000.0, 1000.0 + OFF, g.frame(120.0), UB_CUBIC), [4, 0, 0], atol=1e-9
    )
    down = HAND.replace(chi=-90.0).predict([[4, 0, 0]], UB_CUBIC)
    j = int(np.argmin(np.abs(down["phi"] - 120.0)))
    assert down["y"][j] == pytest.approx(1000.0 - OFF, abs=1e-6)


def test_theta_is_a_right_handed_rotation_about_y():
    """theta = -30: G = Ry(-30) Rz(phi); Ry(t) = [[c, 0, s], [0, 1, 0], [-s, 0, c]].

    (004): g_crystal = (0, 0, 1) is on the phi axis, so phi does not move it.
    Ry(-30) (0, 0, 1) = (sin(-30), 0, cos 30) = (-1/2, 0, sqrt(3)/2);
    k_out = (1, 0, 0) + g = (1/2, 0, sqrt(3)/2): unit length, so (004) diffracts at
    *every* phi, up: pixel (1000, 1866.025).  With theta = +30, k_out = (3/2, 0, ...)
    is off the Ewald sphere and that pixel is not (004).
    """
    g = HAND.replace(theta=-30.0)
    for phi in (0.0, 45.0, 200.0):
        np.testing.assert_allclose(
            g.pixel_to_hkl(1000.0, 1000.0 + OFF, g.frame(phi), UB_CUBIC), [0, 0, 4], atol=1e-9
        )
    wrong = HAND.replace(theta=30.0).pixel_to_hkl(1000.0, 1000.0 + OFF, 0.0, UB_CUBIC)
    assert np.max(np.abs(wrong - [0, 0, 4])) > 1.0


def test_omega_and_u_rotate_the_crystal_about_z():
    """omega = 30 (chi = 0): G = Rz(30) Rz(phi) = Rz(phi + 30), so (400) needs
    phi + 30 = 120 or 240: phi = 90 or 210.  A crystal turned by U = Rz(30) with
    omega = 0 is the same thing: g_lab = Rz(phi) Rz(30) (1, 0, 0)."""
    expected = [90.0, 210.0]
    assert _phis(HAND.replace(omega=30.0).predict([[4, 0, 0]], UB_CUBIC), (4, 0, 0)) == (
        pytest.approx(expected, abs=1e-9)
    )
    ub = rotation_z(30.0) @ UB_CUBIC
    assert _phis(HAND.predict([[4, 0, 0]], ub), (4, 0, 0)) == pytest.approx(expected, abs=1e-9)


def test_b_matrix_hexagonal_by_hand_and_right_handed():
    """Hexagonal a = b = 3, c = 5 A, gamma = 120.

    a* = b* = 1 / (a sin 120) = 2 / (3 sqrt 3) = 0.384900; gamma* = 60; c* = 1/5.
    Busing-Levy: a* along x, b* in the xy plane at 60 deg, so
    B = [[a*, b* cos 60, 0], [0, b* sin 60, 0], [0, 0, 1/5]]
      = [[0.384900, 0.192450, 0], [0, 1/3, 0], [0, 0, 0.2]].
    The direct axes are the rows of B^-1 (a_i . b*_j = delta_ij): c must be (0, 0, 5)
    and a x b . c = V = 3 * 3 * sin(120) * 5 = 38.97 > 0 (right-handed).
    """
    ast = 2.0 / (3.0 * SQ3)
    expected = np.array([[ast, ast / 2, 0.0], [0.0, 1.0 / 3.0, 0.0], [0.0, 0.0, 0.2]])
    b = b_matrix(3, 3, 5, 90, 90, 120)
    np.testing.assert_allclose(b, expected, atol=1e-12)
    direct = np.linalg.inv(b)
    np.testing.assert_allclose(direct[2], [0, 0, 5], atol=1e-12)
    vol = np.dot(np.cross(direct[0], direct[1]), direct[2])
    assert vol == pytest.approx(3 * 3 * math.sin(math.radians(120)) * 5, rel=1e-12)
    # d(100) of a hexagonal cell is a sqrt(3)/2
    assert 1.0 / np.linalg.norm(b @ [1, 0, 0]) == pytest.approx(3 * SQ3 / 2, rel=1e-12)


# ----------------------------------------------------------------------- xrayutilities
SHAPE = (48, 64)
XU_GEOM = Geometry(
    wavelength=0.5,
    distance=150.0,
    pixel_size=1.0,
    shape=SHAPE,
    beam_center_x=20.3,
    beam_center_y=30.7,
    chi=-72.0,
    omega=14.0,
    theta=9.0,
    phi_start=-5.0,
    phi_step=0.1,
)
TRICLINIC = (5.0, 6.0, 7.0, 80.0, 95.0, 105.0)


def _ub(seed: int = 3) -> np.ndarray:
    return random_rotation(np.random.default_rng(seed)) @ b_matrix(*TRICLINIC)


def _qconv(geom: Geometry, sample_axes=("y+", "z+", "x+", "z+"), nch=None, cch=None):
    """xrayutilities QConversion of the same diffractometer (see the module docstring)."""
    qc = xu.experiment.QConversion(list(sample_axes), ["z+"], [1, 0, 0], wl=geom.wavelength)
    ny, nx = nch if nch is not None else geom.shape
    cy, cx = cch if cch is not None else (geom.beam_center_y, geom.beam_center_x)
    qc.init_area(
        "z+",
        "y-",
        cch1=cy,
        cch2=cx,
        Nch1=ny,
        Nch2=nx,
        distance=geom.distance,
        pwidth1=geom.pixel_size,
        pwidth2=geom.pixel_size,
    )
    return qc


def _xu_hkl(qc, geom: Geometry, phi: float, ub: np.ndarray) -> np.ndarray:
    h, k, l_ = qc.area(geom.theta, geom.omega, geom.chi, phi, 0.0, UB=2 * np.pi * ub)
    return np.stack([h, k, l_], axis=-1).reshape(SHAPE + (3,))


ANGLES = [
    {"chi": 0.0, "omega": 0.0, "theta": 0.0},
    {"chi": -90.0, "omega": 0.0, "theta": 0.0},  # NXRefine's usual set-up (phi axis vertical)
    {"chi": -72.0, "omega": 14.0, "theta": 9.0},
    {"chi": 35.0, "omega": -120.0, "theta": -25.0},
]


@pytest.mark.parametrize(
    "angles", ANGLES, ids=lambda a: "chi{chi:g}_om{omega:g}_th{theta:g}".format(**a)
)
def test_pixel_to_hkl_equals_xrayutilities_qconversion(angles):
    """Every pixel of the detector at three phi values, triclinic cell, random U."""
    geom = XU_GEOM.replace(**angles)
    ub = _ub()
    qc = _qconv(geom)
    yy, xx = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]]
    for phi in (-3.0, 47.5, 211.0):
        ours = geom.pixel_to_hkl(xx, yy, geom.frame(phi), ub)
        theirs = _xu_hkl(qc, geom, phi, ub)
        assert np.abs(ours).max() > 0.5  # a non-trivial region of reciprocal space
        np.testing.assert_allclose(ours, theirs, atol=1e-10, rtol=0)


def test_hxrd_ang2hkl_with_xrayutilities_b_matrix():
    """``HXRD.Ang2HKL`` with xrayutilities' own B of the triclinic cell and our U.

    Also checks that xrayutilities' ``Crystal.B`` is our ``b_matrix`` times 2 pi
    (the same Busing-Levy convention).
    """
    geom = XU_GEOM
    u = random_rotation(np.random.default_rng(11))
    crystal = xu.materials.Crystal("triclinic", xu.materials.SGLattice(1, *TRICLINIC))
    np.testing.assert_allclose(crystal.B, 2 * np.pi * b_matrix(*TRICLINIC), atol=1e-12)
    hxrd = xu.HXRD([1, 0, 0], [0, 0, 1], wl=geom.wavelength, qconv=_qconv(geom))
    yy, xx = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]]
    phi = 77.0
    h, k, l_ = hxrd.Ang2HKL(
        geom.theta, geom.omega, geom.chi, phi, 0.0, U=u, mat=crystal, dettype="area"
    )
    theirs = np.stack([h, k, l_], axis=-1).reshape(SHAPE + (3,))
    ours = geom.pixel_to_hkl(xx, yy, geom.frame(phi), u @ b_matrix(*TRICLINIC))
    np.testing.assert_allclose(ours, theirs, atol=1e-10, rtol=0)


def test_predicted_reflections_are_integer_hkl_in_xrayutilities():
    """``Geometry.predict`` puts reflection hkl at (x, y, phi); xrayutilities, asked for
    the HKL of a one-pixel detector centred exactly there, must return hkl."""
    geom = XU_GEOM
    ub = _ub(5)
    pred = geom.predict(all_hkl(1.2, b_matrix(*TRICLINIC)), ub)
    on = np.nonzero(pred["on_detector"])[0]
    assert len(on) >= 5
    for i in on[:40]:
        qc = _qconv(
            geom,
            nch=(1, 1),
            cch=(geom.beam_center_y - pred["y"][i], geom.beam_center_x - pred["x"][i]),
        )
        h, k, l_ = qc.area(geom.theta, geom.omega, geom.chi, pred["phi"][i], 0.0, UB=2 * np.pi * ub)
        np.testing.assert_allclose(
            [h.ravel()[0], k.ravel()[0], l_.ravel()[0]], pred["hkl"][i], atol=1e-8
        )


@pytest.mark.parametrize(
    "mirrored",
    [
        ("y+", "z+", "x+", "z-"),
        ("y+", "z+", "x-", "z+"),
        ("y+", "z-", "x+", "z+"),
        ("y-", "z+", "x+", "z+"),
    ],
    ids=["phi", "chi", "omega", "theta"],
)
def test_a_reversed_circle_is_detected(mirrored):
    """The comparison is sensitive: reversing any one circle in the reference moves the
    HKL of the detector by much more than the tolerance used above."""
    geom = XU_GEOM
    ub = _ub()
    yy, xx = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]]
    ours = geom.pixel_to_hkl(xx, yy, geom.frame(47.5), ub)
    theirs = _xu_hkl(_qconv(geom, sample_axes=mirrored), geom, 47.5, ub)
    assert np.abs(ours - theirs).max() > 0.05
