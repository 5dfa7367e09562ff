"""3D-ΔPDF of a scan (``nxpdf`` / ``nxmasked_pdf``), without Julia.

From ``combine``'s output (``entry/transform`` -> ``<scan>/transform.nxs`` holding ``v``,
``n`` and ``data = v / n``), following NXRefine's ``nxpdf`` (inventory §5.10):

1. **Laue symmetrisation** of the signal ``v`` and the weights ``n`` with the operators of
   the sample's space group (or ``laue``), in the grid's own (H, K, L) frame
   (:mod:`nxrefine_bs.reduce.laue`) -> ``symm_transform.nxs`` ``/entry/data/data`` with
   ``data_weights = 1 / taper``;
2. **spherical Tukey taper** (:mod:`nxrefine_bs.reduce.pdffft`), radius ``qmax``
   (default: the largest sphere inside the grid);
3. **total PDF**, the FFT of the tapered volume -> ``total_pdf.nxs`` ``/entry/pdf/pdf``;
4. **punch and fill**: a sphere of ``radius`` (1/Angstrom) around every allowed
   reflection on the grid (every symmetry equivalent) is filled by discrete Laplace (or
   Matérn) interpolation (:mod:`nxrefine_bs.reduce.fill`), and the fill is
   re-symmetrised -> ``fill`` and ``punch`` (holes zeroed) in ``symm_transform.nxs``;
5. **3D-ΔPDF**, the FFT of the tapered filled volume -> ``pdf.nxs`` ``/entry/pdf/pdf``.

PDF axes ``x, y, z`` are in Angstrom along ``a, b, c``; the NXdata attribute ``angles``
holds the cell angles ``(gamma, beta, alpha)`` in the order of the axes ``[z, y, x]`` (as
the transforms hold the reciprocal angles).  The scan file gets ``entry/symm_transform``,
``entry/total_pdf`` and ``entry/pdf`` (``symm_masked_transform``, ``total_masked_pdf``,
``masked_pdf`` with ``mask=True``) linking those files, and the NXprocess ``nxpdf``
(``nxmasked_pdf``).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from numpy.typing import NDArray
from tqdm import tqdm

from ..errors import DataLinkError, FileExistsNXError, ReductionError
from ..geometry import reciprocal_parameters
from ..nexus.codecs import ensure_plugins
from ..nexus.h5tools import nx_group, read_field, write_external_link, write_field
from ..nexus.provenance import now_iso, process_done, record_process
from ..nexus.scanfile import open_scan_file, update_scan_file
from .fill import fill_holes
from .grid import GridAxis, QGrid
from .lattice import Lattice, read_lattice
from .laue import check_cell, laue_group, symmetrize, symmetrize_at
from .pdffft import inscribed_qmax, pdf_axes, pdf_fft, q_matrix, taper_floor, taper_slab

logger = logging.getLogger(__name__)

__all__ = ["run", "names", "punch_stencil", "reflection_centres"]

METHODS = ("laplace", "matern")
CHUNK = 64


def names(mask: bool) -> dict[str, str]:
    """Process, group and file names of the (masked) PDF step (NXRefine's)."""
    if mask:
        return {
            "process": "nxmasked_pdf",
            "requires": "nxmasked_combine",
            "source": "masked_transform",
            "symm": "symm_masked_transform",
            "total": "total_masked_pdf",
            "pdf": "masked_pdf",
            "symm_file": "masked_symm_transform.nxs",
            "total_file": "masked_total_pdf.nxs",
            "pdf_file": "masked_pdf.nxs",
        }
    return {
        "process": "nxpdf",
        "requires": "nxcombine",
        "source": "transform",
        "symm": "symm_transform",
        "total": "total_pdf",
        "pdf": "pdf",
        "symm_file": "symm_transform.nxs",
        "total_file": "total_pdf.nxs",
        "pdf_file": "pdf.nxs",
    }


# ----------------------------------------------------------------------------- punch
def punch_stencil(grid: QGrid, cell: Sequence[float], radius: float) -> NDArray[np.bool_]:
    """Voxels within ``radius`` (1/Angstrom) of a grid point, as an odd ``[l, k, h]`` box.

    The sphere is measured with the cell's metric, so it is a sphere in Q for any cell
    (an ellipsoid in voxels when the steps or reciprocal lengths differ).
    """
    if not radius > 0:
        raise ReductionError(f"punch radius must be positive (1/Angstrom), got {radius!r}")
    half = [
        int(math.floor(radius * length / (2 * math.pi * ax.step) + 1e-9))
        for ax, length in zip(grid.axes, cell[:3], strict=True)
    ]
    dh, dk, dl = (np.arange(-r, r + 1) for r in half)
    ll, kk, hh = np.meshgrid(dl, dk, dh, indexing="ij")
    dhkl = np.stack([hh * grid.h.step, kk * grid.k.step, ll * grid.l.step], axis=-1)
    q = dhkl @ q_matrix(cell).T
    return np.einsum("...i,...i->...", q, q) <= radius**2 * (1 + 1e-9)


def reflection_centres(
    grid: QGrid, lattice: Lattice, half: Sequence[int]
) -> tuple[NDArray[np.int64], NDArray[np.int64], int]:
    """Allowed reflections whose punch (half-widths ``half`` = ``(l, k, h)``) meets the grid.

    Returns
    -------
    hkl : ndarray (n, 3)
        The reflections, systematic absences of the space group removed; 000 is
        included (the average structure scatters there too; NXRefine leaves it).
    centres : ndarray (n, 3)
        Their nearest voxels ``(il, ik, ih)`` (possibly just outside the grid).
    off_grid : int
        How many do not fall exactly on a grid point.
    """
    ranges = []
    for ax, r in zip(grid.axes, half[::-1], strict=True):
        lo = math.ceil(ax.start - r * ax.step - 1e-9)
        hi = math.floor(ax.stop + r * ax.step + 1e-9)
        ranges.append(np.arange(lo, hi + 1))
    hh, kk, ll = np.meshgrid(*ranges, indexing="ij")
    hkl = np.stack([hh.ravel(), kk.ravel(), ll.ravel()], axis=1).astype(np.int64)
    origin = np.all(hkl == 0, axis=1)
    if len(hkl):
        hkl = hkl[origin | lattice.is_allowed(hkl)]
    frac = (hkl - grid.origin) / grid.steps
    idx = np.rint(frac).astype(np.int64)
    off = int(np.count_nonzero(np.any(np.abs(frac - idx) > 1e-6, axis=1)))
    return hkl, idx[:, ::-1].copy(), off


# ----------------------------------------------------------------------------- output
def _chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(min(CHUNK, s) for s in shape)


def _write_symm(path: Path, grid: QGrid, data: NDArray[np.float32], taper_of: Any) -> None:
    """``/entry/data/{data, data_weights, Ql, Qk, Qh}`` (weights = 1 / taper, slab-wise)."""
    with h5py.File(path, "w") as f:
        f.attrs["default"] = "entry"
        entry = nx_group(f, "entry", "NXentry")
        entry.attrs["default"] = "data"
        grp = nx_group(entry, "data", "NXdata")
        grp.attrs["signal"] = "data"
        grp.attrs["axes"] = ["Ql", "Qk", "Qh"]
        for ax in reversed(grid.axes):
            write_field(grp, f"Q{ax.name}", ax.values, attrs={"long_name": ax.name.upper()})
        grp.create_dataset("data", data=data, chunks=_chunks(data.shape))
        weights = grp.create_dataset(
            "data_weights", shape=data.shape, dtype=np.float32, chunks=_chunks(data.shape)
        )
        weights.attrs["long_name"] = "1 / taper"
        step = _chunks(data.shape)[0]
        for l0 in range(0, data.shape[0], step):
            l1 = min(data.shape[0], l0 + step)
            weights[l0:l1] = 1.0 / taper_of(l0, l1)


def _write_pdf(
    path: Path,
    pdf: NDArray[np.float32],
    axes: Sequence[NDArray[np.float64]],
    cell: Sequence[float],
    title: str,
) -> None:
    """``/entry/pdf/{pdf, x, y, z}`` with axes in Angstrom and the cell angles."""
    with h5py.File(path, "w") as f:
        f.attrs["default"] = "entry"
        entry = nx_group(f, "entry", "NXentry")
        entry.attrs["default"] = "pdf"
        grp = nx_group(entry, "pdf", "NXdata")
        _pdf_attrs(grp, axes, cell, title)
        grp.create_dataset("pdf", data=pdf, chunks=_chunks(pdf.shape))


def _pdf_attrs(
    grp: h5py.Group, axes: Sequence[NDArray[np.float64]], cell: Sequence[float], title: str
) -> None:
    grp.attrs["signal"] = "pdf"
    grp.attrs["axes"] = ["z", "y", "x"]
    grp.attrs["angles"] = np.array([cell[5], cell[4], cell[3]], dtype=np.float64)
    for name, vals, edge in zip(("x", "y", "z"), axes, ("a", "b", "c"), strict=True):
        write_field(
            grp,
            name,
            vals,
            units="angstrom",
            attrs={"long_name": f"{name} (Angstrom along {edge})"},
        )
    write_field(grp, "title", title)


def _link_symm(
    entry: h5py.Group, group: str, target: Path, grid: QGrid, cell: Sequence[float], title: str
) -> None:
    if group in entry:
        del entry[group]
    grp = nx_group(entry, group, "NXdata")
    for name in ("data", "data_weights", "fill", "punch"):
        write_external_link(grp, name, target, f"/entry/data/{name}")
    ast, bst, cst, alst, best, gast = reciprocal_parameters(*cell)
    scal = {"h": 2 * math.pi * ast, "k": 2 * math.pi * bst, "l": 2 * math.pi * cst}
    for ax in reversed(grid.axes):
        write_field(
            grp,
            f"Q{ax.name}",
            ax.values,
            attrs={
                "long_name": f"{ax.name.upper()} (r.l.u.)",
                "units": "rlu",
                "scaling_factor": scal[ax.name],
            },
        )
    grp.attrs["signal"] = "data"
    grp.attrs["axes"] = ["Ql", "Qk", "Qh"]
    grp.attrs["angles"] = np.array([gast, best, alst])
    write_field(grp, "title", title)


def _link_pdf(
    entry: h5py.Group,
    group: str,
    target: Path,
    axes: Sequence[NDArray[np.float64]],
    cell: Sequence[float],
    title: str,
) -> None:
    if group in entry:
        del entry[group]
    grp = nx_group(entry, group, "NXdata")
    write_external_link(grp, "pdf", target, "/entry/pdf/pdf")
    _pdf_attrs(grp, axes, cell, title)


# ----------------------------------------------------------------------------- step
def _linked_file(scan_file: Path, group: h5py.Group, name: str) -> Path:
    """The file that the (relative) external link ``group[name]`` points at."""
    link = group.get(name, getlink=True)
    if not isinstance(link, h5py.ExternalLink):
        raise DataLinkError(f"{scan_file}:{group.name}/{name} is not an external link")
    target = Path(link.filename)
    if not target.is_absolute():
        target = scan_file.parent / target
    if not target.is_file():
        raise DataLinkError(
            f"{scan_file}:{group.name}/{name} points at missing file {target}; "
            "check that the scan directory sits next to the scan file, or rerun combine"
        )
    return target


def _read_volume(
    path: Path, where: str
) -> tuple[QGrid, NDArray[np.float32], NDArray[np.float32] | None]:
    """Grid, signal and weights of a combined transform file (``v``/``n``, else ``data``)."""
    with h5py.File(path, "r") as fh:
        data = fh.get("entry/data")
        if not isinstance(data, h5py.Group):
            raise ReductionError(f"{path} ({where}) has no /entry/data; rerun combine")
        try:
            axes = []
            for name in ("h", "k", "l"):
                vals = np.asarray(data[f"Q{name}"][()], dtype=np.float64)
                step = float(vals[1] - vals[0]) if vals.size > 1 else 1.0
                axes.append(GridAxis(name, float(vals[0]), step, int(vals.size)))
        except (KeyError, IndexError) as exc:
            raise ReductionError(f"{path} ({where}) has no Qh/Qk/Ql axes ({exc})") from None
        grid = QGrid(*axes)
        if "v" in data and "n" in data:
            v = data["v"][()].astype(np.float32, copy=False)
            n = data["n"][()].astype(np.float32, copy=False)
        elif "data" in data:
            v = data["data"][()].astype(np.float32, copy=False)
            n = None
        else:
            raise ReductionError(f"{path} ({where}) holds neither v/n nor data under /entry/data")
    if v.shape != grid.shape:
        raise ReductionError(f"{path}: data shape {v.shape} differs from its axes {grid.shape}")
    return grid, v, n


def run(
    scan_file: str | os.PathLike[str],
    entry: str = "entry",
    *,
    mask: bool = False,
    laue: str | None = None,
    radius: float = 0.2,
    taper_qmax: float | None = None,
    method: str = "laplace",
    order: int = 1,
    epsilon: float = 0.0,
    nthreads: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Symmetrise, taper, punch-and-fill and Fourier transform a combined scan.

    Parameters
    ----------
    scan_file : path-like
        The scan file (``combine`` done).
    entry : str
        The common entry (``"entry"``).
    mask : bool
        Work on the masked transform (``nxmasked_combine`` -> ``nxmasked_pdf``).
    laue : str, optional
        Laue group overriding the sample's space group (one of
        :data:`nxrefine_bs.reduce.laue.LAUE_GROUPS`).
    radius : float
        Punch radius in 1/Angstrom (setting ``[nxreduce] radius``).
    taper_qmax : float, optional
        Taper radius ``qmax`` in 1/Angstrom (NXRefine's ``--Qmax``; default: the largest
        sphere inside the grid).
    method : {"laplace", "matern"}
        Fill by discrete Laplace interpolation, or by Matérn interpolation
        ``(epsilon^2 - L)^order u = 0``.
    order : int
        Matérn order (1 or 2); must be 1 for ``"laplace"``.
    epsilon : float
        Matérn ``epsilon`` in Angstrom (inverse of the Q units); 0 for ``"laplace"``.
    nthreads : int, optional
        Threads for symmetrisation and FFTs (default: the CPU count, at most 8).
    overwrite : bool
        Redo a completed step and replace its files.
    progress : bool
        Show a progress bar over the stages.

    Returns
    -------
    dict
        ``status``, ``files``, ``laue``, ``qmax``, ``reflections``, ``holes``, ``voxels``,
        stage times (``seconds``) and ``peaks`` (the strongest ΔPDF values).

    Raises
    ------
    ReductionError
        Combine not done, no lattice, a grid without the symmetry the Laue group needs,
        or bad parameters.
    FileExistsNXError
        Output files exist without a record of this step and ``overwrite`` is False.
    """
    scan_file = Path(scan_file)
    nm = names(mask)
    if method not in METHODS:
        raise ReductionError(f"pdf: unknown fill method {method!r}; choose one of {METHODS}")
    if method == "laplace" and (int(order) != 1 or float(epsilon) != 0.0):
        raise ReductionError(
            "pdf: the Laplace fill has order 1 and epsilon 0; use method='matern' for "
            f"order={order}, epsilon={epsilon}"
        )
    if int(order) not in (1, 2) or not float(epsilon) >= 0:
        raise ReductionError(
            f"pdf: Matérn order must be 1 or 2 and epsilon >= 0, got order={order}, "
            f"epsilon={epsilon}"
        )
    radius = float(0.2 if radius is None else radius)
    nthreads = int(nthreads or min(os.cpu_count() or 1, 8))
    start_time = now_iso()
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    where = f"{scan_file}:/{entry}"
    with open_scan_file(scan_file) as f:
        if entry not in f:
            raise ReductionError(f"{scan_file} has no entry {entry!r}")
        fe = f[entry]
        if process_done(fe, nm["process"]) and not overwrite:
            logger.info("%s: %s already done; use overwrite=True", where, nm["process"])
            return {"status": "skipped", "process": nm["process"]}
        if not process_done(fe, nm["requires"]) or nm["source"] not in fe:
            raise ReductionError(
                f"{where}: {nm['requires']} not done; run the "
                f"{'masked ' if mask else ''}combine step before pdf"
            )
        source = _linked_file(scan_file, fe[nm["source"]], "data")
        lattice = read_lattice(fe)
        sample = read_field(fe, "sample/name") or "sample"
        temp = read_field(fe, "sample/temperature")
    cell = lattice.cell
    group = laue_group(lattice.space_group, laue, crystal_system=lattice.crystal_system)
    check_cell(group, cell, what=where)
    out_dir = source.parent
    outs = {k: out_dir / nm[f"{k}_file"] for k in ("symm", "total", "pdf")}
    existing = [p for p in outs.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsNXError(
            f"{', '.join(map(str, existing))} exist(s) but {where} has no {nm['process']} "
            "record; rerun with overwrite=True to replace them"
        )
    label = f"{sample} {temp:g}K" if isinstance(temp, int | float) else str(sample)
    stages = tqdm(total=5, disable=not progress, desc="pdf", unit="stage")

    parts = {k: p.with_name(p.name + ".part") for k, p in outs.items()}
    ensure_plugins()  # combine may have compressed the transform
    try:
        # 1. symmetrise
        grid, v, n = _read_volume(source, where)
        if any(ax.n % 2 == 0 for ax in grid.axes):
            raise ReductionError(
                f"{source}: the PDF needs an odd number of points on every axis, centred on 0 "
                f"(grid {grid.describe()}); transform on a grid -X..X"
            )
        times["read"] = time.perf_counter() - t0
        t = time.perf_counter()
        volume, _ = symmetrize(
            v, n, group, grid, nthreads=nthreads, overwrite_input=True, what=str(source)
        )
        del v, n
        times["symmetrize"] = time.perf_counter() - t
        stages.update()

        # 2. taper, write the symmetrised volume
        qmax = float(inscribed_qmax(grid, cell) if taper_qmax is None else taper_qmax)
        if not qmax > 0:
            raise ReductionError(f"pdf: qmax must be positive (1/Angstrom), got {qmax}")
        floor = taper_floor(grid, cell, qmax)
        t = time.perf_counter()
        _write_symm(
            parts["symm"],
            grid,
            volume,
            lambda l0, l1: taper_slab(grid, cell, qmax, floor, l0, l1),
        )
        times["write_symm"] = time.perf_counter() - t
        stages.update()

        # 3. total PDF
        axes = pdf_axes(grid, cell)
        t = time.perf_counter()
        total = pdf_fft(volume, grid, cell, qmax, floor, nthreads=nthreads)
        times["fft_total"] = time.perf_counter() - t
        _write_pdf(parts["total"], total, axes, cell, f"{label} Total PDF")
        del total
        stages.update()

        # 4. punch and fill
        t = time.perf_counter()
        stencil = punch_stencil(grid, cell, radius)
        half = [s // 2 for s in stencil.shape]
        hkl, centres, off_grid = reflection_centres(grid, lattice, half)
        spacing = [
            ax.step * 2 * math.pi * r
            for ax, r in zip(grid.axes, reciprocal_parameters(*cell)[:3], strict=True)
        ][::-1]
        filled, voxels = fill_holes(
            volume, centres, stencil, m=int(order), epsilon=float(epsilon), spacing=spacing
        )
        symmetrised_fill = False
        if voxels.size and off_grid == 0:
            try:
                volume.reshape(-1)[voxels] = symmetrize_at(
                    volume.reshape(-1)[voxels], voxels, group, grid
                )
                symmetrised_fill = True
            except ReductionError as exc:
                logger.warning("%s: fill not re-symmetrised: %s", where, exc)
        times["punch_fill"] = time.perf_counter() - t
        with h5py.File(parts["symm"], "r+") as sf:
            grp = sf["entry/data"]
            grp.create_dataset("fill", data=volume, chunks=_chunks(volume.shape))
            punch = grp.create_dataset(
                "punch", shape=volume.shape, dtype=np.float32, chunks=_chunks(volume.shape)
            )
            flat = volume.reshape(-1)
            saved = flat[voxels].copy()
            flat[voxels] = 0
            punch[...] = volume
            flat[voxels] = saved
            del saved
        stages.update()

        # 5. 3D-ΔPDF
        t = time.perf_counter()
        delta = pdf_fft(volume, grid, cell, qmax, floor, nthreads=nthreads)
        times["fft_pdf"] = time.perf_counter() - t
        del volume
        peaks = _strongest(delta, axes)
        _write_pdf(parts["pdf"], delta, axes, cell, f"{label} 3D-ΔPDF")
        del delta
        stages.update()
        stages.close()
        for k, p in parts.items():
            os.replace(p, outs[k])
    except BaseException:
        for part in parts.values():  # no partial output after a failure
            part.unlink(missing_ok=True)
        raise
    times["total"] = time.perf_counter() - t0
    summary = {
        "status": "done",
        "files": {k: str(p) for k, p in outs.items()},
        "laue": group.name,
        "laue_operators": group.order,
        "qmax": qmax,
        "radius": radius,
        "reflections": int(len(hkl)),
        "off_grid": off_grid,
        "holes": {"shared": filled.shared, "grouped": filled.grouped, "groups": filled.groups},
        "voxels": filled.voxels,
        "fill_symmetrised": symmetrised_fill,
        "cell": list(cell),
        "seconds": {k: round(val, 3) for k, val in times.items()},
        "peaks": peaks,
    }
    with update_scan_file(scan_file) as f:
        fe = f[entry]
        _link_symm(fe, nm["symm"], outs["symm"], grid, cell, f"{label} Symmetrized Transform")
        _link_pdf(fe, nm["total"], outs["total"], axes, cell, f"{label} Total PDF")
        _link_pdf(fe, nm["pdf"], outs["pdf"], axes, cell, f"{label} 3D-ΔPDF")
        record_process(
            fe,
            nm["process"],
            parameters={
                "laue": group.name,
                "space_group": lattice.space_group,
                "radius": radius,
                "qmax": qmax,
                "method": method,
                "order": int(order),
                "epsilon": float(epsilon),
                "mask": bool(mask),
                "cell": list(cell),
            },
            start_time=start_time,
            summary=summary,
        )
    logger.info(
        "%s: %s with Laue %s, %d reflections punched (r=%g 1/A), qmax %.3g 1/A in %.1f s",
        where,
        nm["process"],
        group.name,
        len(hkl),
        radius,
        qmax,
        times["total"],
    )
    return summary


def _strongest(
    pdf: NDArray[np.float32], axes: Sequence[NDArray[np.float64]], count: int = 6
) -> list[dict[str, Any]]:
    """The ``count`` strongest local extrema of the ΔPDF other than the origin.

    Returns position ``xyz`` (Angstrom) and value of each, strongest first.
    """
    shape = np.array(pdf.shape)
    centre = shape // 2
    flat = np.abs(pdf).ravel()
    ncand = min(flat.size, 64 * count)
    cand = np.argpartition(flat, -ncand)[-ncand:]
    cand = cand[np.argsort(-flat[cand])]
    out: list[dict[str, Any]] = []
    for i in cand:
        pos = np.array(np.unravel_index(i, pdf.shape))
        if np.all(np.abs(pos - centre) <= 1):
            continue  # the origin peak
        lo, hi = np.maximum(pos - 1, 0), np.minimum(pos + 2, shape)
        box = np.abs(pdf[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]])
        if box.max() > flat[i]:
            continue  # the flank of a stronger feature
        iz, iy, ix = (int(v) for v in pos)
        out.append(
            {
                "xyz": [float(axes[0][ix]), float(axes[1][iy]), float(axes[2][iz])],
                "value": float(pdf[iz, iy, ix]),
            }
        )
        if len(out) == count:
            break
    return out
