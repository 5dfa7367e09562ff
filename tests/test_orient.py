"""Tests of nxrefine_bs.reduce.orient: angles, HKL, two-peak and automatic indexing."""

from __future__ import annotations

import numpy as np
import pytest

from nxrefine_bs.errors import IndexingError
from nxrefine_bs.geometry import random_rotation
from nxrefine_bs.reduce.lattice import Lattice
from nxrefine_bs.reduce.orient import (
    auto_index,
    calculate_angles,
    calculate_hkl,
    fit_rotation,
    hkl_difference,
    misorientation,
    orient_two_peaks,
    peak_vectors,
    reduce_basis,
)
from nxrefine_bs.simulation.crystal import SimCrystal
from nxrefine_bs.simulation.peaks import (
    FULL_ROTATION_FRAMES,
    PILATUS_2M_ROTATION,
    TEST_SYSTEMS,
    garbage_peaks,
    predicted_peaks,
)

# The shared Pilatus-2M-like set-up and crystals (nxrefine_bs.simulation.peaks).
GEOM = PILATUS_2M_ROTATION
N_FRAMES = FULL_ROTATION_FRAMES
SYSTEMS = TEST_SYSTEMS


def make_peaks(
    cell,
    centring="P",
    *,
    seed=0,
    geometry=GEOM,
    n_frames=N_FRAMES,
    noise_xy=0.2,
    noise_z=0.1,
    garbage=0.0,
    max_peaks=600,
    U=None,
):
    """Peak list (x, y, z, true hkl; NaN hkl for garbage) of a random crystal."""
    rng = np.random.default_rng(seed)
    crystal = SimCrystal(cell, random_rotation(rng) if U is None else U, centring)
    x, y, z, h = predicted_peaks(
        crystal,
        rng,
        geometry=geometry,
        n_frames=n_frames,
        noise_xy=noise_xy,
        noise_z=noise_z,
        max_peaks=max_peaks,
    )
    n_bad = int(round(garbage * len(x) / (1 - garbage)))
    if n_bad:
        gx, gy, gz = garbage_peaks(n_bad, rng, geometry=geometry, n_frames=n_frames)
        x, y, z = np.concatenate([x, gx]), np.concatenate([y, gy]), np.concatenate([z, gz])
        h = np.concatenate([h, np.full((n_bad, 3), np.nan)])
    return crystal, x, y, z, h


def test_angles_and_hkl_match_prediction():
    crystal, x, y, z, h = make_peaks(SYSTEMS["cubic"][0], "F", noise_xy=0, noise_z=0)
    hkl = calculate_hkl(GEOM, x, y, z, crystal.UB)
    np.testing.assert_allclose(hkl, h, atol=1e-6)
    assert np.all(hkl_difference(hkl, crystal.B) < 1e-6)
    tth, az = calculate_angles(GEOM, x, y)
    q = np.linalg.norm(h @ crystal.B.T, axis=1)
    np.testing.assert_allclose(np.sin(np.radians(tth / 2)), q * GEOM.wavelength / 2, atol=1e-9)
    assert np.all((az >= -180) & (az <= 180))
    # peak vectors are the crystal-frame vectors U B h
    np.testing.assert_allclose(peak_vectors(GEOM, x, y, z), h @ crystal.UB.T, atol=1e-9)


def test_orient_two_peaks_and_kabsch():
    crystal, x, y, z, h = make_peaks(SYSTEMS["monoclinic"][0], noise_xy=0, noise_z=0)
    q = peak_vectors(GEOM, x, y, z)
    u = orient_two_peaks(q[0], q[5], h[0], h[5], crystal.B)
    assert misorientation(u, crystal.U) < 1e-6
    assert misorientation(fit_rotation(q, h, crystal.B), crystal.U) < 1e-6
    with pytest.raises(IndexingError, match="parallel"):
        orient_two_peaks(q[0], 2 * q[0], h[0], h[5], crystal.B)


def test_misorientation_modulo_symmetry():
    lat = Lattice.from_space_group("Fm-3m", a=5.43)
    u = random_rotation(np.random.default_rng(3))
    for r in lat.cartesian_rotations():
        assert misorientation(u, u @ r, lat) < 1e-6
    assert misorientation(u, u @ lat.cartesian_rotations()[1]) > 10


def test_reduce_basis():
    a = np.diag([4.0, 5.0, 6.0])
    m = np.array([[1, 3, -2], [0, 1, 4], [0, 0, 1]])  # unimodular
    red = reduce_basis(m @ a)
    np.testing.assert_allclose(sorted(np.linalg.norm(red, axis=1)), [4, 5, 6])
    assert np.linalg.det(red) > 0


@pytest.mark.parametrize("system", list(SYSTEMS))
def test_auto_index_with_garbage(system):
    cell, centring, sg = SYSTEMS[system]
    crystal, x, y, z, h = make_peaks(cell, centring, seed=11, garbage=0.15)
    lat = Lattice(*cell, space_group=sg)
    res = auto_index(peak_vectors(GEOM, x, y, z), lat)
    # Before refinement: within a few hundredths of a degree, modulo the lattice symmetry.
    assert misorientation(res.U, crystal.U, lat) < 0.05
    assert res.indexed_fraction > 0.75
    np.testing.assert_allclose(res.observed_cell[:3], cell[:3], rtol=2e-3)
    assert res.n_forbidden == 0


def test_auto_index_tolerates_wrong_distance():
    cell, centring, sg = SYSTEMS["tetragonal"]
    crystal, x, y, z, _ = make_peaks(cell, centring, seed=5)
    g = GEOM.replace(distance=GEOM.distance + 8.0, beam_center_x=GEOM.beam_center_x + 1.5)
    lat = Lattice(*cell, space_group=sg)
    res = auto_index(peak_vectors(g, x, y, z), lat)
    assert misorientation(res.U, crystal.U, lat) < 0.2
    assert res.scale != pytest.approx(1.0, abs=1e-3)  # the scale error was absorbed


def test_too_few_peaks():
    cell, centring, sg = SYSTEMS["cubic"]
    _, x, y, z, _ = make_peaks(cell, centring, max_peaks=8)
    with pytest.raises(IndexingError, match="only 8 usable peaks"):
        auto_index(peak_vectors(GEOM, x, y, z), Lattice(*cell, space_group=sg))


def test_wrong_cell_is_rejected():
    cell, centring, _ = SYSTEMS["tetragonal"]
    _, x, y, z, _ = make_peaks(cell, centring, seed=2)
    wrong = Lattice.from_space_group("I4/mmm", a=4.0, c=7.3)
    with pytest.raises(IndexingError, match="no cell matching"):
        auto_index(peak_vectors(GEOM, x, y, z), wrong)


def test_wrong_centring_is_rejected():
    # A primitive cubic crystal declared face-centred: most reflections are "forbidden".
    cell = (5.431, 5.431, 5.431, 90, 90, 90)
    _, x, y, z, _ = make_peaks(cell, "P", seed=4)
    with pytest.raises(IndexingError, match="systematically absent"):
        auto_index(peak_vectors(GEOM, x, y, z), Lattice(*cell, space_group="Fm-3m"))


def test_pure_garbage_is_rejected():
    rng = np.random.default_rng(0)
    ny, nx = GEOM.shape
    x, y, z = rng.uniform(0, nx, 300), rng.uniform(0, ny, 300), rng.uniform(0, N_FRAMES, 300)
    with pytest.raises(IndexingError):
        auto_index(peak_vectors(GEOM, x, y, z), Lattice.from_space_group("Pmmm", 5.1, 6.3, 7.7))
