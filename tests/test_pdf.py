"""3D-ΔPDF step: Laue symmetrisation, Laplace/Matérn fill, FFT and the analytic ΔPDF.

The analytic test builds S(HKL) from a seeded real-space crystal with known pair
correlations (binary occupancy with A-B dimers along a and pairs of identical planes along
c), writes it in ``combine``'s layout and runs the step: the strongest ΔPDF features must
sit at the correlated neighbour vectors with the signs and ratios of the measured
correlations, uncorrelated lattice vectors must carry nothing, and the punched Bragg
positions no residual peaks.
"""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest

from nxrefine_bs.callbacks.reduction import PostScanReduction
from nxrefine_bs.cli import main
from nxrefine_bs.errors import FileExistsNXError, ReductionError
from nxrefine_bs.geometry import b_matrix
from nxrefine_bs.nexus.h5tools import nx_group, write_external_link, write_field
from nxrefine_bs.nexus.provenance import process_done, read_process, record_process
from nxrefine_bs.plans.reduction import pdf as pdf_plan
from nxrefine_bs.plans.reduction import reduce_scan
from nxrefine_bs.reduce import pdf
from nxrefine_bs.reduce.fill import fill_holes, fill_mask
from nxrefine_bs.reduce.grid import GridAxis, QGrid
from nxrefine_bs.reduce.lattice import Lattice, write_lattice
from nxrefine_bs.reduce.laue import LAUE_GROUPS, laue_group, symmetrize, symmetrize_at
from nxrefine_bs.reduce.pdffft import pdf_fft, taper_floor, taper_slab
from nxrefine_bs.reduce.steps import STEPS
from nxrefine_bs.testing import closing_run_engine

CELL = (8.0, 10.0, 12.0, 90.0, 90.0, 90.0)
HALF, STEP, SUPERCELL = 2.0, 0.05, 20  # grid -2..2 step 0.05 (81^3); supercell 20^3


# ----------------------------------------------------------------------------- helpers
def centred_grid(n: int | tuple[int, int, int], step=0.1) -> QGrid:
    ns = (n, n, n) if isinstance(n, int) else n
    steps = (step, step, step) if np.isscalar(step) else step
    return QGrid(
        *(
            GridAxis(name, -(m - 1) / 2 * s, s, m)
            for name, m, s in zip("hkl", ns, steps, strict=True)
        )
    )


def dimer_crystal(seed=3, n_conf=16, fbar=1.0, df=0.5, q0=2.5):
    """S(HKL) on the -2..2 grid and the measured pair correlations of the configurations.

    Sites of a 20^3 supercell hold f = fbar + df * s with s = +-1: along a, sites pair up
    into (+, -) dimers (random phase and sign); along c, planes pair up into identical
    copies.  Hence <s(0) s(a)> = -1/2, <s(0) s(c)> = +1/2, <s(0) s(a + c)> = -1/4 and no
    correlation along b.  Intensity = <|FFT f|^2> times a Gaussian form factor.
    """
    rng = np.random.default_rng(seed)
    L = SUPERCELL
    inten = np.zeros((L, L, L))
    corr = np.zeros((L, L, L))
    for _ in range(n_conf):
        s = np.empty((L, L, L))  # [x, y, z] along a, b, c
        for y in range(L):
            psi = rng.integers(2)
            for q in range(L // 2):
                phase = rng.integers(2)
                signs = rng.choice([-1.0, 1.0], L // 2)
                row = np.empty(L)
                row[(2 * np.arange(L // 2) + phase) % L] = signs
                row[(2 * np.arange(L // 2) + 1 + phase) % L] = -signs
                s[:, y, (2 * q + psi) % L] = row
                s[:, y, (2 * q + 1 + psi) % L] = row
        inten += np.abs(np.fft.fftn(fbar + df * s)) ** 2
        corr += np.real(np.fft.ifftn(np.abs(np.fft.fftn(s)) ** 2)) / L**3
    inten /= n_conf
    corr /= n_conf
    n = int(round(2 * HALF / STEP)) + 1
    h = np.linspace(-HALF, HALF, n)
    m = np.rint(h * L).astype(int) % L
    data = inten[np.ix_(m, m, m)]  # [h, k, l]
    hh, kk, ll = np.meshgrid(h, h, h, indexing="ij")
    q2 = (2 * np.pi) ** 2 * ((hh / CELL[0]) ** 2 + (kk / CELL[1]) ** 2 + (ll / CELL[2]) ** 2)
    data *= np.exp(-q2 / q0**2)
    return np.ascontiguousarray(data.transpose(2, 1, 0), dtype=np.float32), corr


def write_combined(tmp_path, data, lattice, *, weights=None, mask=False, record=True):
    """A scan file + ``300K/transform.nxs`` in combine's layout (v, n, data, Ql/Qk/Qh)."""
    scan_dir = tmp_path / "300K"
    scan_dir.mkdir(exist_ok=True)
    group = "masked_transform" if mask else "transform"
    target = scan_dir / f"{group}.nxs"
    n = np.ones_like(data) if weights is None else weights
    vals = np.linspace(-HALF, HALF, data.shape[0])
    with h5py.File(target, "w") as f:
        d = nx_group(nx_group(f, "entry", "NXentry"), "data", "NXdata")
        d.attrs["signal"] = "data"
        d.attrs["axes"] = ["Ql", "Qk", "Qh"]
        for a in "lkh":
            d[f"Q{a}"] = vals
        d["v"] = data * n
        d["n"] = n
        d["data"] = np.divide(data * n, n, out=np.zeros_like(data), where=n > 0)
    scan_file = tmp_path / "sample_300K.nxs"
    with h5py.File(scan_file, "a") as f:
        e = nx_group(f, "entry", "NXentry")
        s = nx_group(e, "sample", "NXsample")
        write_field(s, "name", "sample")
        write_field(s, "temperature", 300.0)
        write_lattice(s, lattice)
        g = nx_group(e, group, "NXdata")
        write_external_link(g, "data", target, "/entry/data/data")
        write_external_link(g, "weights", target, "/entry/data/n")
        if record:
            record_process(e, "nxmasked_combine" if mask else "nxcombine")
    return scan_file


def value_at(pdf_array, step, r):
    """ΔPDF at lattice vector ``r`` (in cells) on the PDF of a grid with ``step``."""
    c = np.array(pdf_array.shape) // 2
    u = int(round(pdf_array.shape[0] * step))  # voxels per lattice unit
    return float(pdf_array[c[0] + r[2] * u, c[1] + r[1] * u, c[2] + r[0] * u])


# ----------------------------------------------------------------------------- Laue
EXPECTED_ORDER = {
    "-1": 2,
    "2/m": 4,
    "mmm": 8,
    "4/m": 8,
    "4/mmm": 16,
    "-3": 6,
    "-3m": 12,
    "-3m1": 12,
    "-31m": 12,
    "6/m": 12,
    "6/mmm": 24,
    "m-3": 24,
    "m-3m": 48,
}


@pytest.mark.parametrize("laue", list(LAUE_GROUPS))
def test_laue_groups_from_gemmi_are_groups_and_isometries(laue):
    group = laue_group(laue=laue)
    ops = group.operators
    assert group.order == EXPECTED_ORDER[laue]
    assert np.array_equal(ops[0], np.eye(3, dtype=int))
    assert any(np.array_equal(o, -np.eye(3, dtype=int)) for o in ops)
    keys = {o.tobytes() for o in ops}
    assert all((a @ b).tobytes() in keys for a in ops for b in ops)  # closed
    hexagonal = laue in ("-3", "-3m", "-3m1", "-31m", "6/m", "6/mmm")
    cell = (4.0, 4.0, 7.0, 90, 90, 120) if hexagonal else (4.0, 4.0, 4.0, 90, 90, 90)
    metric = b_matrix(*cell).T @ b_matrix(*cell)
    for o in ops:  # every operator keeps |Q| of every reflection: exact, not approximated
        np.testing.assert_allclose(o.T @ metric @ o, metric, atol=1e-12)


def test_space_group_setting_decides_trigonal_operators():
    assert laue_group("P -3 m 1").name == laue_group("P -3 1 m").name == "-3m"
    a = {o.tobytes() for o in laue_group("P -3 m 1").operators}
    b = {o.tobytes() for o in laue_group("P -3 1 m").operators}
    assert a != b  # -3m1 and -31m are different groups of matrices
    assert laue_group("P 63/m m c").order == 24
    with pytest.raises(ReductionError, match="unknown Laue group"):
        laue_group("P 1", laue="6/mmmm")


def _brute_force(v, n, group, grid):
    """Reference: apply each operator to the (h, k, l) coordinates of every voxel."""
    hh, kk, ll = np.meshgrid(*(ax.values for ax in grid.axes), indexing="ij")
    hkl = np.stack([hh, kk, ll], axis=-1)  # [h, k, l, 3]
    vt, nt = v.transpose(2, 1, 0), n.transpose(2, 1, 0)
    sv = np.zeros(hh.shape)
    sn = np.zeros(hh.shape)
    for op in group.operators:
        img = hkl @ op.T
        idx = [
            np.rint((img[..., i] - ax.start) / ax.step).astype(int)
            for i, ax in enumerate(grid.axes)
        ]
        ok = np.ones(hh.shape, bool)
        for i, ax in zip(idx, grid.axes, strict=True):
            ok &= (i >= 0) & (i < ax.n)
        ih, ik, il = (np.where(ok, i, 0) for i in idx)
        sv += np.where(ok, vt[ih, ik, il], 0)
        sn += np.where(ok, nt[ih, ik, il], 0)
    out = np.divide(sv, sn, out=np.zeros_like(sv), where=sn > 0)
    return out.transpose(2, 1, 0)


@pytest.mark.parametrize(
    "space_group, shape",
    [
        ("P -3 m 1", (9, 15, 15)),
        ("P m -3 m", (13, 13, 13)),
        ("P 4/m m m", (7, 11, 11)),
        ("P 6/m", (5, 13, 13)),
        ("P 1 2/m 1", (11, 9, 7)),
    ],
)
def test_symmetrize_is_exact(space_group, shape):
    group = laue_group(space_group)
    grid = centred_grid(shape[::-1])  # (nh, nk, nl) from the [l, k, h] shape
    rng = np.random.default_rng(1)
    n = rng.uniform(0.5, 2.0, shape).astype(np.float32) * (rng.random(shape) > 0.2)
    v = (rng.uniform(0, 10, shape) * n).astype(np.float32)
    s, total = symmetrize(v, n, group, grid, nthreads=2, weights_out=True)
    ref = _brute_force(v.astype(np.float64), n.astype(np.float64), group, grid)
    np.testing.assert_allclose(s, ref, rtol=2e-6, atol=1e-6)
    assert total is not None and total.shape == shape
    # invariance: every operator maps the result onto itself where both voxels are inside
    again, _ = symmetrize(s, (s != 0).astype(np.float32), group, grid)
    np.testing.assert_allclose(again, s, rtol=2e-6, atol=1e-6)


def test_hexagonal_orbit_is_exact():
    """-3m1: a reflection at 100 spreads to its six true equivalents (not to 110)."""
    grid = centred_grid(21)
    v = np.zeros(grid.shape, np.float32)
    c = 10
    v[c, c, c + 10] = 1.0  # (h, k, l) = (1, 0, 0)
    s, _ = symmetrize(v, np.ones_like(v), laue_group("P -3 m 1"), grid)
    hits = {
        tuple(int(round((i - c) / 10)) for i in (ih, ik, il)) for il, ik, ih in np.argwhere(s > 0)
    }
    assert hits == {(1, 0, 0), (0, 1, 0), (-1, 1, 0), (-1, 0, 0), (0, -1, 0), (1, -1, 0)}
    np.testing.assert_allclose(s[s > 0], 1 / 6, rtol=1e-6)


def test_symmetrize_checks_the_grid():
    group = laue_group("P 4/m m m")
    v = np.ones((11, 11, 11), np.float32)
    off = QGrid(
        GridAxis("h", -0.9, 0.1, 11), GridAxis("k", -1, 0.1, 11), GridAxis("l", -1, 0.1, 11)
    )
    with pytest.raises(ReductionError, match="centred on 0 .* axis h"):
        symmetrize(v, None, group, off)
    with pytest.raises(ReductionError, match="maps k onto h but the axes differ"):
        symmetrize(v, None, group, centred_grid(11, step=(0.1, 0.2, 0.1)))
    with pytest.raises(ReductionError, match="odd point"):
        symmetrize(
            np.ones((4, 10, 10), np.float32), None, laue_group("P 6/m"), centred_grid((10, 10, 4))
        )
    with pytest.raises(ReductionError, match="does not match the grid"):
        symmetrize(v[:-1], None, group, centred_grid(11))


def test_symmetrize_at_averages_orbits():
    grid = centred_grid(9)
    group = laue_group("P m m m")
    flat = np.array([np.ravel_multi_index(i, grid.shape) for i in [(4, 4, 6), (4, 4, 2)]])
    out = symmetrize_at(np.array([1.0, 3.0]), flat, group, grid)
    np.testing.assert_allclose(out, [2.0, 2.0])
    with pytest.raises(ReductionError, match="not closed"):
        symmetrize_at(np.array([1.0]), flat[:1], group, grid)


@pytest.mark.parametrize("laue", ["m-3m", "4/mmm", "2/m", "-1", "6/mmm", "-3"])
def test_symmetrize_at_equals_the_dense_symmetrisation(laue):
    grid = centred_grid(21)
    group = laue_group(laue=laue)
    rng = np.random.default_rng(2)
    seed = (rng.random(grid.shape) < 0.05).astype(np.float32)
    closed = symmetrize(seed, np.ones_like(seed), group, grid)[0] > 0  # a symmetric set
    vals = rng.random(grid.shape).astype(np.float32) * closed
    dense, _ = symmetrize(vals, closed.astype(np.float32), group, grid)
    flat = np.flatnonzero(closed)
    sparse = symmetrize_at(vals.reshape(-1)[flat], flat, group, grid)
    np.testing.assert_allclose(sparse, dense.reshape(-1)[flat], rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- fill
def _sphere(r):
    d = np.arange(-r, r + 1)
    return np.add.reduce(np.meshgrid(d**2, d**2, d**2, indexing="ij")) <= r * r


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.5, 1.0, 2.0)])
def test_laplace_fill_restores_a_harmonic_function(spacing):
    n = 41
    ll, kk, hh = np.meshgrid(*[np.arange(n, dtype=float) - 20] * 3, indexing="ij")
    x, y, z = ll * spacing[0], kk * spacing[1], hh * spacing[2]
    truth = x * x - y * y + x * y * z + 3 * z - 2 * x * z  # discretely harmonic too
    # isolated holes (one shared factorisation) and two overlapping ones (grouped solve)
    centres = np.array([[22, 22, 20], [8, 30, 8], [31, 9, 30], [10, 10, 25], [13, 10, 25]])
    vol = truth.copy()
    result, voxels = fill_holes(vol, centres, _sphere(4), spacing=spacing)
    assert (result.shared, result.factorisations, result.grouped, result.groups) == (3, 1, 2, 1)
    vol.reshape(-1)[voxels] = 1e6  # forget the hole values
    fill_holes(vol, centres, _sphere(4), spacing=spacing)
    np.testing.assert_allclose(vol, truth, atol=1e-8 * np.abs(truth).max())
    # holes clipped by the volume's edge (zero-flux there; two clipped alike, one centred
    # outside the volume) agree with one global sparse solve of the same holes
    edges = np.array([[0, 30, 20], [0, 33, 33], [40, 3, 3], [-2, 12, 36]])
    both = np.vstack([centres, edges])
    ours = truth.copy()
    result, voxels = fill_holes(ours, both, _sphere(4), spacing=spacing)
    assert (result.shared, result.factorisations) == (7, 4)
    ref = truth.copy()
    ref.reshape(-1)[voxels] = 0.0
    assert fill_mask(ref, voxels, spacing=spacing) == voxels.size
    np.testing.assert_allclose(ours, ref, atol=1e-8 * np.abs(truth).max())
    assert ours[0, 30, 20] != truth[0, 30, 20]  # the edge holes were really filled


def test_matern_fill_is_exact_for_its_own_solutions():
    n = 35
    ll, kk, hh = np.meshgrid(*[np.arange(n, dtype=float) - 17] * 3, indexing="ij")
    spacing = (0.5, 1.0, 1.5)
    x, y, z = ll * spacing[0], kk * spacing[1], hh * spacing[2]
    centres = np.array([[17, 17, 17], [6, 28, 6]])  # isolated, interior: shared solve
    # m = 1: exp(kappa x) solves (eps^2 - L) u = 0 when eps^2 = 2 (cosh(kappa d) - 1) / d^2
    kappa = 0.4
    eps = math.sqrt(2 * (math.cosh(kappa * spacing[0]) - 1)) / spacing[0]
    truth = np.exp(kappa * x)
    vol = truth.copy()
    _, voxels = fill_holes(vol, centres, _sphere(3), spacing=spacing, epsilon=eps)
    vol.reshape(-1)[voxels] = 0
    fill_holes(vol, centres, _sphere(3), spacing=spacing, epsilon=eps)
    np.testing.assert_allclose(vol, truth, rtol=1e-9)
    # m = 2, eps = 0: a biharmonic (not harmonic) polynomial is restored exactly
    truth = x**3 + x * y * y + z**3 - 7 * x * z * z + x * x * y * y - y**4 / 3
    vol = truth.copy()
    vol.reshape(-1)[voxels] = 0
    res, _ = fill_holes(vol, centres, _sphere(3), spacing=spacing, m=2)
    assert res.shared == 2
    np.testing.assert_allclose(vol, truth, atol=1e-7 * np.abs(truth).max())
    # ... which the Laplace fill does not
    lap = truth.copy()
    lap.reshape(-1)[voxels] = 0
    fill_holes(lap, centres, _sphere(3), spacing=spacing)
    assert np.abs(lap - truth).max() > 1e-3 * np.abs(truth).max()


# ----------------------------------------------------------------------------- FFT
def test_pdf_fft_matches_the_shifted_numpy_transform():
    grid = centred_grid((9, 11, 13), step=(0.1, 0.2, 0.1))
    cell = (4.0, 5.0, 6.0, 90.0, 100.0, 90.0)
    x = np.random.default_rng(0).normal(size=grid.shape).astype(np.float32)
    floor = taper_floor(grid, cell, 1.5)
    w = taper_slab(grid, cell, 1.5, floor, 0, grid.shape[0])
    assert w.max() == 1.0 and floor == pytest.approx(w.min())
    ref = (
        np.fft.fftshift(np.fft.fftn(np.fft.ifftshift((x * w)[:-1, :-1, :-1]))).real
        / w[:-1, :-1, :-1].size
    )
    np.testing.assert_allclose(pdf_fft(x, grid, cell, 1.5, floor, nthreads=2), ref, atol=1e-6)


# ----------------------------------------------------------------------------- the step
@pytest.fixture(scope="module")
def dimer():
    return dimer_crystal()


def test_pdf_recovers_known_pair_correlations(tmp_path, dimer):
    data, corr = dimer
    # the model's correlations (measured on its own configurations)
    assert corr[1, 0, 0] == pytest.approx(-0.5, abs=0.03)
    assert corr[0, 0, 1] == pytest.approx(0.5, abs=0.03)
    assert corr[1, 0, 1] == pytest.approx(-0.25, abs=0.03)
    assert abs(corr[0, 1, 0]) < 0.03 and abs(corr[2, 0, 0]) < 0.03
    lattice = Lattice(*CELL, space_group="P m m m")
    scan_file = write_combined(tmp_path, data, lattice)
    res = pdf.run(scan_file, radius=0.1)
    assert res["status"] == "done" and res["laue"] == "mmm" and res["off_grid"] == 0
    assert res["reflections"] == 5**3  # every hkl of -2..2 (P m m m has no absences)
    with h5py.File(tmp_path / "300K" / "pdf.nxs", "r") as f:
        grp = f["entry/pdf"]
        delta = grp["pdf"][()]
        assert grp["x"].attrs["units"] == "angstrom"
        np.testing.assert_allclose(grp.attrs["angles"], [90, 90, 90])
        x, z = grp["x"][()], grp["z"][()]
    assert delta.shape == (80, 80, 80)
    assert x[40 + 4] == pytest.approx(CELL[0]) and z[40 + 4] == pytest.approx(CELL[2])
    with h5py.File(tmp_path / "300K" / "total_pdf.nxs", "r") as f:
        total = f["entry/pdf/pdf"][()]

    ref = value_at(delta, STEP, (0, 0, 1))
    # signs and sizes follow the correlations: -1/2 along a, +1/2 along c, -1/4 along a+c
    for r in [(1, 0, 0), (-1, 0, 0), (0, 0, 1), (0, 0, -1), (1, 0, 1), (1, 0, -1)]:
        expect = corr[r[0] % SUPERCELL, r[1] % SUPERCELL, r[2] % SUPERCELL] / corr[0, 0, 1]
        assert value_at(delta, STEP, r) / ref == pytest.approx(expect, abs=0.08), r
    # uncorrelated lattice vectors carry nothing, although the total PDF (Bragg peaks
    # included) has large positive Patterson peaks there
    for r in [(0, 1, 0), (2, 0, 0), (0, 0, 2), (1, 1, 0), (0, 1, 1), (1, 1, 1), (3, 0, 0)]:
        assert abs(value_at(delta, STEP, r)) < 0.05 * ref, r
        assert value_at(total, STEP, r) > 3 * ref, r
    # the strongest features reported are the four a and c neighbours, with their signs
    top = res["peaks"][:4]
    assert sorted(tuple(round(v, 6) + 0.0 for v in p["xyz"]) for p in top) == [
        (-8.0, 0.0, 0.0),
        (0.0, 0.0, -12.0),
        (0.0, 0.0, 12.0),
        (8.0, 0.0, 0.0),
    ]
    for p in top:
        assert (p["value"] < 0) == (p["xyz"][0] != 0)

    # punched Bragg positions: no residual peak in the filled volume
    with h5py.File(tmp_path / "300K" / "symm_transform.nxs", "r") as f:
        grp = f["entry/data"]
        sym, filled, punched = grp["data"][()], grp["fill"][()], grp["punch"][()]
        assert grp["data_weights"][()].min() >= 1.0
    bragg = np.arange(0, 81, 20)  # integer hkl
    at_bragg = np.ix_(bragg, bragg, bragg)
    assert np.all(punched[at_bragg] == 0)
    assert np.all(sym[at_bragg] > 1e3 * np.median(sym))  # the Bragg peaks were there
    shell = np.stack(
        [filled[np.ix_(bragg, bragg, np.clip(bragg + d, 0, 80))] for d in (-4, 4)]
    )  # voxels just outside the holes along h
    assert np.all(filled[at_bragg] <= shell.max(axis=0) + 1e-3)
    assert np.all(filled[at_bragg] < 1e-3 * sym[at_bragg])

    # scan-file layout and provenance
    with h5py.File(scan_file, "r") as f:
        e = f["entry"]
        assert process_done(e, "nxpdf")
        for group, name, path in [
            ("symm_transform", "data", "/entry/data/data"),
            ("symm_transform", "fill", "/entry/data/fill"),
            ("total_pdf", "pdf", "/entry/pdf/pdf"),
            ("pdf", "pdf", "/entry/pdf/pdf"),
        ]:
            link = e[group].get(name, getlink=True)
            assert link.path == path and not link.filename.startswith("/")
        assert e["pdf/pdf"].shape == (80, 80, 80)
        assert e["symm_transform/Qh"].attrs["scaling_factor"] == pytest.approx(2 * np.pi / 8)
        record = read_process(e, "nxpdf")
    assert record["parameters"]["laue"] == "mmm"
    assert record["parameters"]["radius"] == 0.1
    assert record["parameters"]["cell"] == list(CELL)


def test_pdf_requires_combine_and_refuses_overwrite(tmp_path, dimer):
    data, _ = dimer
    lattice = Lattice(*CELL, space_group="P m m m")
    scan_file = write_combined(tmp_path, data, lattice, record=False)
    with pytest.raises(ReductionError, match="nxcombine not done"):
        pdf.run(scan_file)
    with h5py.File(scan_file, "a") as f:
        record_process(f["entry"], "nxcombine")
    (tmp_path / "300K" / "pdf.nxs").write_bytes(b"")
    with pytest.raises(FileExistsNXError, match="overwrite"):
        pdf.run(scan_file)
    with pytest.raises(ReductionError, match="fill method"):
        pdf.run(scan_file, method="kriging", overwrite=True)
    with pytest.raises(ReductionError, match="order 1 and epsilon 0"):
        pdf.run(scan_file, order=2, overwrite=True)
    with pytest.raises(ReductionError, match="order must be 1 or 2"):
        pdf.run(scan_file, method="matern", order=3, overwrite=True)
    with pytest.raises(ReductionError, match="4/mmm is not a symmetry of the cell"):
        pdf.run(scan_file, laue="4/mmm", overwrite=True, radius=0.1)  # a = 8 but b = 10
    assert not (tmp_path / "300K" / "total_pdf.nxs").exists()


def test_pdf_failure_leaves_no_partial_output(tmp_path, dimer, monkeypatch):
    data, _ = dimer
    scan_file = write_combined(tmp_path, data, Lattice(*CELL, space_group="P m m m"))
    before = scan_file.read_bytes()

    def disk_full(*args, **kwargs):  # fault injection after two output files were written
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pdf, "fill_holes", disk_full)
    with pytest.raises(OSError, match="No space"):
        pdf.run(scan_file, radius=0.1)
    assert sorted(p.name for p in (tmp_path / "300K").iterdir()) == ["transform.nxs"]
    assert scan_file.read_bytes() == before
    monkeypatch.undo()
    assert pdf.run(scan_file, radius=0.1)["status"] == "done"


def test_pdf_masked_variant_with_matern(tmp_path, dimer):
    data, _ = dimer
    lattice = Lattice(*CELL, space_group="P m m m")
    weights = np.ones_like(data)
    weights[:, :, :5] = 0  # a region without data
    scan_file = write_combined(tmp_path, data, lattice, weights=weights, mask=True)
    res = pdf.run(scan_file, mask=True, radius=0.1, method="matern", order=2)
    assert res["status"] == "done"
    files = {p.name for p in (tmp_path / "300K").iterdir()}
    assert {"masked_symm_transform.nxs", "masked_total_pdf.nxs", "masked_pdf.nxs"} <= files
    with h5py.File(scan_file, "r") as f:
        e = f["entry"]
        assert process_done(e, "nxmasked_pdf") and not process_done(e, "nxpdf")
        for group in ("symm_masked_transform", "total_masked_pdf", "masked_pdf"):
            assert group in e
        sym = e["symm_masked_transform/data"][()]
        assert read_process(e, "nxmasked_pdf")["parameters"]["order"] == 2
    # mmm symmetrisation filled the missing h < -1.75 planes from their mirror images
    np.testing.assert_allclose(sym[:, :, :5], sym[:, :, :-6:-1], rtol=1e-5)
    assert np.all(sym[:, :, :5] > 0)


def test_pdf_through_registry_cli_and_plan(tmp_path, dimer, capsys):
    step = STEPS["pdf"]
    assert step.process == "nxpdf" and step.requires == ("combine",) and not step.per_entry
    assert PostScanReduction(("combine", "pdf")).steps == ("combine", "pdf")
    data, _ = dimer
    scan_file = write_combined(tmp_path, data, Lattice(*CELL, space_group="P m m m"))
    assert main(["pdf", str(scan_file), "-r", "0.1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "pdf" in out and "done" in out
    with h5py.File(scan_file, "r") as f:
        assert read_process(f["entry"], "nxpdf")["parameters"]["radius"] == 0.1
    with closing_run_engine(call_returns_result=True) as RE:
        summary = RE(pdf_plan(scan_file)).plan_result
        assert summary["pdf:entry"]["status"] == "skipped"
        plan = reduce_scan(scan_file, ["pdf"], overwrite=True, laue="-1", radius=0.12)
        summary = RE(plan).plan_result
    assert summary["pdf:entry"]["laue"] == "-1"
    with h5py.File(scan_file, "r") as f:
        assert read_process(f["entry"], "nxpdf")["parameters"]["radius"] == 0.12


def test_pdf_on_the_simulators_combined_scan(tmp_path):
    """End to end on the project's simulator: transform -> combine -> pdf."""
    from nxrefine_bs.reduce import combine, transform
    from nxrefine_bs.simulation.scan import make_simulated_scan

    sim = make_simulated_scan(tmp_path, n_frames=40, write_truth_orientation=True, omegas=(0, 15))
    grid = {"qh": (-3, 0.1, 3), "qk": (-3, 0.1, 3), "ql": (-3, 0.1, 3)}
    for entry in ("f1", "f2"):
        transform.run(sim.scan_file, entry, **grid)
    combine.run(sim.scan_file)
    res = pdf.run(sim.scan_file)
    assert res["status"] == "done" and res["reflections"] > 0
    with h5py.File(sim.scan_file, "r") as f:
        e = f["entry"]
        assert process_done(e, "nxpdf")
        delta = e["pdf/pdf"][()]
        sym = e["symm_transform/data"][()]
        punched = e["symm_transform/punch"][()]
        filled = e["symm_transform/fill"][()]
    assert delta.shape == (60, 60, 60) and np.all(np.isfinite(delta))
    holes = punched != filled
    assert holes.any() and np.all(punched[holes] == 0)
    # the Bragg peaks of the simulated crystal sat in the holes; the fill is far below
    assert sym[holes].max() > 20 * filled[holes].max()
    assert (sim.scan_dir / "pdf.nxs").is_file()


def test_pdf_as_a_workflow_task(tmp_path, dimer):
    """The workflow runs pdf from the registry, and blocks it until combine is done."""
    from nxrefine_bs.workflow.executor import run_scan_steps

    data, _ = dimer
    label_dir = tmp_path / "exp" / "sample" / "xtal1"
    label_dir.mkdir(parents=True)
    lattice = Lattice(*CELL, space_group="P m m m")
    scan_file = write_combined(label_dir, data, lattice, record=False)
    blocked = run_scan_steps(scan_file, steps=["pdf"], db=tmp_path / "exp").outcomes
    assert [o.step for o in blocked] == ["pdf"]
    assert blocked[0].status.name != "DONE" and "combine" in (blocked[0].message or "")
    assert not (label_dir / "300K" / "pdf.nxs").exists()
    with h5py.File(scan_file, "a") as f:
        record_process(f["entry"], "nxcombine")
    done = run_scan_steps(
        scan_file, steps=["pdf"], db=tmp_path / "exp", params={"pdf": {"radius": 0.1}}
    ).outcomes
    assert done[0].status.name == "DONE" and done[0].result["laue"] == "mmm"
    assert (label_dir / "300K" / "pdf.nxs").is_file()
