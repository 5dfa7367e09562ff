"""Draw the user guide's figures from a small seeded simulation (run by ``docs/conf.py``).

Everything is made here, at build time, from the code of this checkout:

* the first-experiment tutorial (``docs/tutorials/first-experiment.md``) is run verbatim
  (``tutorial_runner.py``, in a subprocess): its calibration cake and its ``hk0.png`` and
  ``h0l.png`` are the ones the guide shows, so a reader following it gets the same PNGs;
* meanwhile a small demo (:func:`nxrefine_bs.demo.run_demo`: one rotation of 90 frames at
  100 K on the simulated Pilatus 300K, reduced to a 0.1 r.l.u. grid) gives the demo's own
  ``transform_hk0.png``, its H0L plane (``nxrefine-bs plot-slice``), the frame with the
  peaks found by ``find``, the radial sum of ``max`` and the tree of a real scan file
  (``scanfile_tree.md``);
* the geometry figure is drawn from :class:`nxrefine_bs.geometry.Geometry` itself (the
  detector corners, the beam centre and the reciprocal axes are computed, not sketched).

The results are cached: a stamp holds a hash of this script and of the package's
sources, and nothing is redone while it matches and every output exists.  Run it by
hand with ``python docs/_scripts/make_figures.py [OUTDIR] [--force]``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

DOCS = Path(__file__).resolve().parents[1]
PACKAGE = DOCS.parent / "nxrefine_bs"

FIGURES = (
    "frame_peaks.png",
    "radial_sum.png",
    "demo_hk0.png",
    "demo_h0l.png",
    "calibration_cake.png",
    "tutorial_hk0.png",
    "tutorial_h0l.png",
    "geometry.png",
    "scanfile_tree.md",
)
"""Every output, in ``_generated/``."""

DEMO = {
    "temperatures": (100.0,),
    "omegas": (0.0,),
    "phi_start": 0.0,
    "phi_end": 90.0,
    "phi_step": 1.0,
    "grid_step": 0.1,
    "tiled": False,
    "progress": False,
    "seed": 0,
}
"""The figures' demo: one rotation, 90 frames (about a minute on a loaded 2-core machine)."""


def inputs_hash() -> str:
    """Hash of the scripts, the tutorial they run and every source file of the package."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(Path(__file__).with_name("tutorial_runner.py").read_bytes())
    digest.update((DOCS / "tutorials" / "first-experiment.md").read_bytes())
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(str(path.relative_to(PACKAGE)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _figure(width: float = 6.0, height: float = 4.0):  # noqa: ANN202 - matplotlib figure
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def frame_with_peaks(scan_file: Path, png: Path) -> None:
    """The frame holding the most found peaks, with the peaks of nearby frames circled."""
    import h5py

    with h5py.File(scan_file, "r") as f:
        peaks = f["f1/peaks"]
        x, y, z = (peaks[k][()] for k in ("x", "y", "z"))
        counts = np.bincount(np.rint(z).astype(int))
        frame = int(np.argmax(counts))
        image = f["f1/data/data"][frame].astype(float)
    near = np.abs(z - frame) <= 3
    fig = _figure(6.0, 6.0)
    ax = fig.add_subplot()
    shown = np.log10(np.clip(image, 1, None))
    ax.imshow(shown, origin="lower", cmap="viridis", vmax=np.percentile(shown, 99.95))
    ax.scatter(x[near], y[near], s=160, facecolors="none", edgecolors="red", linewidths=1.2)
    ax.set_title(f"f1 frame {frame}: peaks found by 'find' within 3 frames (red)")
    ax.set_xlabel("x_pixel")
    ax.set_ylabel("y_pixel")
    fig.savefig(png)


def radial_sum(scan_file: Path, png: Path) -> None:
    """``f1/frame_sums/radial_sum`` against Q, with the transmission annulus of ``max``."""
    import h5py

    with h5py.File(scan_file, "r") as f:
        group = f["f1/frame_sums/radial_sum"]
        q, counts = group["Q"][()], group["radial_sum"][()]
        qmin = float(f["entry/nxreduce/qmin"][()])
        qmax = float(f["entry/nxreduce/qmax"][()])
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(q, counts, lw=1)
    ax.axvspan(qmin, qmax, color="orange", alpha=0.2, label="qmin..qmax (transmission annulus)")
    ax.set_yscale("log")
    ax.set_xlabel("Q (1/Å, no 2π)")
    ax.set_ylabel("radial sum (counts)")
    ax.set_title("f1/frame_sums/radial_sum")
    ax.legend()
    fig.savefig(png)


def scanfile_tree(scan_file: Path, out: Path) -> None:
    """A Markdown table of every group and field of a scan file, as h5py sees it."""
    import h5py

    rows: list[str] = []

    def text(value: object) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    def walk(group: h5py.Group, prefix: str) -> None:
        for name in group:
            path = f"{prefix}/{name}"
            link = group.get(name, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                rows.append(f"| `{path}` | external link | `{link.filename}#{link.path}` | |")
                continue
            if isinstance(link, h5py.SoftLink):
                rows.append(f"| `{path}` | soft link | `{link.path}` | |")
                continue
            obj = group[name]
            if isinstance(obj, h5py.Group):
                if "target" in obj.attrs and text(obj.attrs["target"]) != path:
                    rows.append(f"| `{path}` | link | `{text(obj.attrs['target'])}` | |")
                    continue
                rows.append(f"| `{path}/` | {text(obj.attrs.get('NX_class', ''))} | | |")
                walk(obj, path)
            else:
                units = text(obj.attrs.get("units", ""))
                shape = "scalar" if obj.shape == () else "×".join(str(n) for n in obj.shape)
                kind = "str" if obj.dtype.kind in "OSU" else str(obj.dtype)
                rows.append(f"| `{path}` | {kind} | {shape} | {units} |")

    with h5py.File(scan_file, "r") as f:
        walk(f, "")
    header = [
        "<!-- generated by docs/_scripts/make_figures.py from a demo scan file; do not edit -->",
        "",
        "| path | NX_class, type or link | shape / target | units |",
        "|---|---|---|---|",
    ]
    out.write_text("\n".join(header + rows) + "\n")


def geometry_figure(png: Path) -> None:
    """Lab frame, goniometer chain, detector with tilts and pixel centres, B and U."""
    from nxrefine_bs.geometry import Geometry, b_matrix, rotation_x, rotation_z

    g = Geometry(
        wavelength=0.3, distance=100.0, pixel_size=10.0, shape=(8, 10),
        beam_center_x=4.5, beam_center_y=3.0, yaw=8.0, pitch=0.0, roll=0.0, chi=-90.0,
    )  # fmt: skip
    fig = _figure(11.0, 5.2)
    ax = fig.add_subplot(1, 2, 1, projection="3d")
    ax.set_title("lab frame, goniometer and detector")
    for vec, name, colour in (((60, 0, 0), "x (beam)", "k"), ((0, 60, 0), "y", "g"),
                              ((0, 0, 60), "z (up)", "b")):  # fmt: skip
        ax.quiver(0, 0, 0, *vec, color=colour, arrow_length_ratio=0.1)
        ax.text(*(1.1 * np.array(vec)), name, color=colour)
    ax.plot([-60, 0], [0, 0], [0, 0], "m--", lw=1)
    ax.text(-60, 0, 5, "incident beam", color="m")
    ny, nx = g.shape
    corners = np.array([[-0.5, -0.5], [nx - 0.5, -0.5], [nx - 0.5, ny - 0.5], [-0.5, ny - 0.5],
                        [-0.5, -0.5]])  # fmt: skip
    edge = g.pixel_vectors(corners[:, 0], corners[:, 1])
    ax.plot(edge[:, 0], edge[:, 1], edge[:, 2], "k-")
    yy, xx = np.mgrid[0:ny, 0:nx]
    centres = g.pixel_vectors(xx.ravel(), yy.ravel())
    ax.scatter(centres[:, 0], centres[:, 1], centres[:, 2], s=3, c="grey")
    origin = g.pixel_vectors(0.0, 0.0)
    for target, name in (((1.5, 0.0), "pixel x"), ((0.0, 1.5), "pixel y")):
        tip = g.pixel_vectors(*target)
        ax.quiver(*origin, *(tip - origin) * 2, color="r", arrow_length_ratio=0.2)
        ax.text(*(origin + (tip - origin) * 2.3), name, color="r")
    centre = g.pixel_vectors(g.beam_center_x, g.beam_center_y)
    ax.scatter(*centre, c="m", s=20)
    ax.text(*(centre + np.array([0, 0, -15])), "beam centre", color="m")
    ax.text(0, -40, -45, "G(φ) = Ry(θ)·Rz(ω)·Rx(χ)·Rz(φ)\nχ = −90° puts φ along +y", fontsize=8)
    ax.text(g.distance, 45, 45, f"distance L along +x\n'-y +z -x', yaw {g.yaw:g}°", fontsize=8)
    ax.set_xlabel("x (mm)")
    ax.set_ylabel("y (mm)")
    ax.set_zlabel("z (mm)")
    ax.view_init(elev=20, azim=-130)

    bx = fig.add_subplot(1, 2, 2, projection="3d")
    bx.set_title("B (Busing–Levy) and U·B, hexagonal cell")
    b = b_matrix(3.54, 3.54, 6.01, 90.0, 90.0, 120.0)
    u = rotation_z(25.0) @ rotation_x(15.0)
    for matrix, style, tag in ((b, "-", ""), (u @ b, "--", "U·")):
        for column, name, colour in zip(matrix.T, ("a*", "b*", "c*"), "rgb",
                                        strict=True):  # fmt: skip
            bx.quiver(0, 0, 0, *column, color=colour, linestyle=style, arrow_length_ratio=0.1)
            bx.text(*(1.08 * column), tag + name, color=colour)
    bx.text2D(0.02, 0.02, "B: a* along x, b* in the xy plane (1/Å, no 2π)\n"
              "dashed: U·B, the crystal at φ = 0", transform=bx.transAxes, fontsize=8)  # fmt: skip
    lim = float(np.abs(b).max()) * 1.1
    bx.set_xlim(-lim, lim)
    bx.set_ylim(-lim, lim)
    bx.set_zlim(-lim, lim)
    bx.set_xlabel("x")
    bx.set_ylabel("y")
    bx.set_zlabel("z")
    fig.savefig(png)


def _stamp(outdir: Path) -> Path:
    return outdir / "figures.stamp"


def up_to_date(outdir: Path) -> bool:
    """True if every output exists and was made from the current inputs."""
    stamp = _stamp(outdir)
    return (
        stamp.exists()
        and stamp.read_text().strip() == inputs_hash()
        and all((outdir / name).exists() for name in FIGURES)
    )


def main(outdir: str | os.PathLike[str], *, force: bool = False) -> bool:
    """Make every figure in ``outdir`` unless they are up to date; True if (re)made."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    if not force and up_to_date(outdir):
        logger.info("figures up to date in %s", outdir)
        return False
    t0 = time.perf_counter()
    quiet = {name: logging.getLogger(name) for name in ("", "pyFAI", "silx", "nxrefine_bs")}
    levels = {name: log.level for name, log in quiet.items()}
    for log in quiet.values():  # the simulation's INFO chatter is not the build's
        log.setLevel(logging.WARNING)
    try:
        _make_all(outdir)
    finally:
        for name, log in quiet.items():
            log.setLevel(levels[name])
    _stamp(outdir).write_text(inputs_hash() + "\n")
    print(f"make_figures: {len(FIGURES)} outputs in {outdir} ({time.perf_counter() - t0:.0f} s)")
    return True


def _make_all(outdir: Path) -> None:
    """Run the first-experiment tutorial (a subprocess) and the small demo side by side in
    a temporary directory; keep their pictures and draw the rest."""
    from nxrefine_bs.cli import main as nxrefine_bs
    from nxrefine_bs.demo import run_demo

    old_settings = os.environ.get("NXREFINE_BS_SETTINGS")
    with tempfile.TemporaryDirectory(prefix="nxrbs-docs-") as tmp:
        work = Path(tmp)
        tutorial = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("tutorial_runner.py")),
             str(DOCS / "tutorials" / "first-experiment.md"), str(work / "tutorial")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        os.environ["NXREFINE_BS_SETTINGS"] = str(work / "settings.ini")
        try:
            result = run_demo(work / "demo", **DEMO)
            failed = result.as_dict()["steps_failed"]
            if failed or not result.plots:
                raise RuntimeError(f"the figures' demo run failed: steps {failed or 'none'} "
                                   f"failed, {len(result.plots)} plots; run it by hand with "
                                   "'python docs/_scripts/make_figures.py --force'")
            scan_file = result.scan_files[0]
            frame_with_peaks(scan_file, outdir / "frame_peaks.png")
            radial_sum(scan_file, outdir / "radial_sum.png")
            scanfile_tree(scan_file, outdir / "scanfile_tree.md")
            shutil.copyfile(result.plots[0], outdir / "demo_hk0.png")  # the demo's own PNG
            transform = scan_file.parent / "100K" / "transform.nxs"
            with contextlib.redirect_stdout(io.StringIO()):
                code = nxrefine_bs(["plot-slice", str(transform), "--axis", "k", "--value", "0",
                                    "--png", str(outdir / "demo_h0l.png")])  # fmt: skip
            if code != 0:
                raise RuntimeError(f"nxrefine-bs plot-slice failed ({code}) on {transform}")
        finally:
            if old_settings is None:
                os.environ.pop("NXREFINE_BS_SETTINGS", None)
            else:
                os.environ["NXREFINE_BS_SETTINGS"] = old_settings
            out, err = tutorial.communicate(timeout=900)
        if tutorial.returncode != 0:
            raise RuntimeError(f"the first-experiment tutorial failed:\n{err[-3000:]}")
        exp = Path(out.strip().splitlines()[-1])
        for source, name in (("calibration/calibration_cake.png", "calibration_cake.png"),
                             ("hk0.png", "tutorial_hk0.png"), ("h0l.png", "tutorial_h0l.png")):
            shutil.copyfile(exp / source, outdir / name)  # fmt: skip
    geometry_figure(outdir / "geometry.png")


if __name__ == "__main__":  # pragma: no cover
    args = [a for a in sys.argv[1:] if a != "--force"]
    main(args[0] if args else DOCS / "_generated", force="--force" in sys.argv)
