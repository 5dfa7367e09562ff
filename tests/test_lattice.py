"""Tests of nxrefine_bs.reduce.lattice: cells, space groups, absences and NeXus I/O."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from nxrefine_bs.errors import NXRefineBSError
from nxrefine_bs.geometry import b_matrix
from nxrefine_bs.nexus.h5tools import nx_group, write_field
from nxrefine_bs.reduce.lattice import (
    Lattice,
    LatticeError,
    minimal_space_group,
    read_lattice,
    write_lattice,
)


@pytest.mark.parametrize(
    ("symbol", "kwargs", "system", "laue", "centring", "free"),
    [
        ("Fm-3m", {"a": 5.431}, "cubic", "m-3m", "F", ("a",)),
        (225, {"a": 5.431}, "cubic", "m-3m", "F", ("a",)),
        ("I4/mmm", {"a": 4.0, "c": 6.5}, "tetragonal", "4/mmm", "I", ("a", "c")),
        ("Pnma", {"a": 5.1, "b": 6.3, "c": 7.7}, "orthorhombic", "mmm", "P", ("a", "b", "c")),
        ("P6_3/mmc", {"a": 3.2, "c": 5.2}, "hexagonal", "6/mmm", "P", ("a", "c")),
        ("R-3m", {"a": 5.0, "c": 14.0}, "hexagonal", "-3m", "R", ("a", "c")),
        ("R-3m:R", {"a": 5.0, "alpha": 80.0}, "rhombohedral", "-3m", "P", ("a", "alpha")),
        (
            "P21/c",
            {"a": 5.5, "b": 6.2, "c": 7.1, "beta": 103.5},
            "monoclinic",
            "2/m",
            "P",
            ("a", "b", "c", "beta"),
        ),
        (
            "P-1",
            {"a": 6.1, "b": 7.3, "c": 8.2, "alpha": 80, "beta": 95, "gamma": 110},
            "triclinic",
            "-1",
            "P",
            ("a", "b", "c", "alpha", "beta", "gamma"),
        ),
    ],
)
def test_from_space_group(symbol, kwargs, system, laue, centring, free):
    lat = Lattice.from_space_group(symbol, **kwargs)
    assert lat.crystal_system == system
    assert lat.laue_group == laue
    assert lat.centring == centring
    assert lat.free_parameters == free
    np.testing.assert_allclose(lat.B, b_matrix(*lat.cell))
    # constrain() keeps only the free parameters and rebuilds the others
    perturbed = np.array(lat.cell) + np.array([0.01, 0.02, 0.03, 0.1, 0.2, 0.3])
    new = lat.constrain(perturbed)
    Lattice(*new, space_group=lat.space_group)  # consistent by construction
    for name, val in zip(("a", "b", "c", "alpha", "beta", "gamma"), new, strict=True):
        if name in free:
            assert val == pytest.approx(
                perturbed[("a", "b", "c", "alpha", "beta", "gamma").index(name)]
            )
    # and the free-parameter vector round-trips
    assert lat.with_cell(lat.free_values) == lat


def test_inconsistent_cells_raise_clear_errors():
    with pytest.raises(LatticeError, match="cubic.*b must be 5"):
        Lattice(5.0, 5.1, 5.0, space_group="Fm-3m")
    with pytest.raises(LatticeError, match="gamma must be 120"):
        Lattice(3.2, 3.2, 5.2, 90, 90, 90, space_group="P6/mmm")
    with pytest.raises(LatticeError, match="b-unique"):
        Lattice(5, 6, 7, 90, 90, 100, space_group="P 1 1 21")
    with pytest.raises(LatticeError, match="unknown space group"):
        Lattice(5, 5, 5, space_group="Xx9")
    with pytest.raises(LatticeError, match="impossible unit cell"):
        Lattice(5, 5, 5, 10, 10, 170)
    with pytest.raises(LatticeError, match="missing c"):
        Lattice.from_space_group("P4/mmm", a=4.0)
    # LatticeError is a ValueError and an NXRefineBSError
    with pytest.raises(ValueError):
        Lattice(5.0, 5.1, 5.0, space_group="Pm-3m")
    assert issubclass(LatticeError, NXRefineBSError)


def test_systematic_absences():
    f = Lattice.from_space_group("Fm-3m", a=5.43)
    hkl = np.array([[1, 1, 1], [2, 0, 0], [1, 0, 0], [1, 1, 0], [0, 0, 0]])
    assert f.is_allowed(hkl).tolist() == [True, True, False, False, False]
    assert f.is_allowed([2, 2, 0]) is True
    i = Lattice.from_space_group("I4/mmm", a=4, c=6.5)
    assert i.is_allowed(np.array([[1, 1, 0], [1, 0, 0], [1, 0, 1]])).tolist() == [True, False, True]
    p21c = Lattice.from_space_group("P21/c", a=5.5, b=6.2, c=7.1, beta=103.5)
    # 0k0: k = 2n; h0l: l = 2n
    assert p21c.is_allowed(np.array([[0, 1, 0], [0, 2, 0], [1, 0, 1], [1, 0, 2]])).tolist() == [
        False,
        True,
        False,
        True,
    ]


def test_allowed_reflections():
    lat = Lattice.from_space_group("Fm-3m", a=5.431)
    hkl = lat.allowed_reflections(1.0)
    d = lat.d_spacing(hkl)
    assert np.all(d >= 1.0 - 1e-12)
    assert np.all(np.diff(d) <= 1e-9)  # sorted by decreasing d
    assert np.all(lat.is_allowed(hkl))
    # all 8 members of {111} and 6 of {200} are there; nothing forbidden
    assert len(hkl[np.all(np.abs(hkl) == 1, axis=1)]) == 8
    assert tuple(np.abs(hkl[0])) == (1, 1, 1)
    # brute-force count of allowed indices with d >= 1
    r = np.arange(-6, 7)
    grid = np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    grid = grid[np.any(grid != 0, axis=1)]
    grid = grid[(lat.d_spacing(grid) >= 1.0) & lat.is_allowed(grid)]
    assert len(grid) == len(hkl)
    unique = lat.allowed_reflections(1.0, unique=True)
    assert 0 < len(unique) < len(hkl)


def test_cartesian_rotations_are_symmetries():
    lat = Lattice.from_space_group("P6/mmm", a=3.2, c=5.2)
    rots = lat.cartesian_rotations()
    assert len(rots) == 12
    np.testing.assert_allclose(
        np.einsum("nij,nkj->nik", rots, rots), np.broadcast_to(np.eye(3), rots.shape), atol=1e-12
    )
    np.testing.assert_allclose(np.linalg.det(rots), 1.0)


def test_from_cif(tmp_path):
    cif = tmp_path / "si.cif"
    cif.write_text(
        "data_si\n"
        "_cell_length_a 5.4310(2)\n_cell_length_b 5.4310(2)\n_cell_length_c 5.4310(2)\n"
        "_cell_angle_alpha 90\n_cell_angle_beta 90\n_cell_angle_gamma 90\n"
        "_symmetry_space_group_name_H-M 'F d -3 m'\n"
    )
    lat = Lattice.from_cif(cif)
    assert lat.a == pytest.approx(5.431)
    assert lat.space_group_number == 227
    assert lat.crystal_system == "cubic"
    bad = tmp_path / "bad.cif"
    bad.write_text("data_x\n_cell_length_a 5\n")
    with pytest.raises(LatticeError, match="no block"):
        Lattice.from_cif(bad)


def test_write_read_roundtrip(tmp_path):
    lat = Lattice.from_space_group("P21/c", a=5.5, b=6.2, c=7.1, beta=103.5)
    path = tmp_path / "s.nxs"
    with h5py.File(path, "w") as f:
        sample = nx_group(nx_group(f, "entry", "NXentry"), "sample", "NXsample")
        write_lattice(sample, lat)
    with h5py.File(path, "r") as f:
        s = f["entry/sample"]
        assert s["unit_cell_group"][()].decode() == "monoclinic"
        assert s["lattice_centring"][()].decode() == "P"
        assert s["laue_group"][()].decode() == "2/m"
        assert s["unitcell_beta"].attrs["units"] == "degree"
        assert read_lattice(s) == lat
        assert read_lattice(f["entry"]) == lat  # an entry holding the sample works too


def test_read_lattice_without_space_group(tmp_path):
    path = tmp_path / "s.nxs"
    with h5py.File(path, "w") as f:
        s = nx_group(nx_group(f, "entry", "NXentry"), "sample", "NXsample")
        for name, v in zip(
            ("a", "b", "c", "alpha", "beta", "gamma"), (5.43, 5.43, 5.43, 90, 90, 90), strict=True
        ):
            write_field(s, f"unitcell_{name}", float(v))
        write_field(s, "lattice_centring", "F")
    with h5py.File(path, "r") as f:
        lat = read_lattice(f["entry/sample"])
    assert lat.space_group == "F 2 2 2"  # NXRefine's choice for F
    assert minimal_space_group("cubic", "F") == "F 2 3"
    assert minimal_space_group("tetragonal", "I") == "I 4"
    assert minimal_space_group(None, None) == "P 1"
    with pytest.raises(LatticeError):
        minimal_space_group("tetragonal", "F")


def test_read_lattice_errors_name_the_file(tmp_path):
    path = tmp_path / "s.nxs"
    with h5py.File(path, "w") as f:
        s = nx_group(nx_group(f, "entry", "NXentry"), "sample", "NXsample")
        write_field(s, "space_group", "Fm-3m")
    with h5py.File(path, "r") as f, pytest.raises(LatticeError, match=r"s\.nxs.*no unit cell"):
        read_lattice(f["entry/sample"])
    with h5py.File(path, "a") as f:
        s = f["entry/sample"]
        for name, v in zip(
            ("a", "b", "c", "alpha", "beta", "gamma"), (5.4, 5.5, 5.4, 90, 90, 90), strict=True
        ):
            write_field(s, f"unitcell_{name}", float(v))
    with (
        h5py.File(path, "r") as f,
        pytest.raises(LatticeError, match=r"s\.nxs:/entry/sample.*inconsistent"),
    ):
        read_lattice(f["entry/sample"])
