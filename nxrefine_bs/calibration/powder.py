"""Automatic powder calibration of the detector geometry with pyFAI.

The detector geometry of nxrefine-bs is described, like NXRefine's, by a direct-beam
distance (mm), a beam centre (pixels) and three tilt angles ``yaw``, ``pitch`` and
``roll`` (degrees), interpreted by :class:`nxrefine_bs.geometry.Geometry` together with
the configuration's detector orientation.  pyFAI describes the same detector by a PONI
geometry: a distance ``dist`` from the sample to the detector plane along its normal,
the point of normal incidence ``(poni1, poni2)`` (metres from the detector origin) and
rotations ``rot1``, ``rot2``, ``rot3`` (radians).  :func:`poni_to_nxrefine` and
:func:`nxrefine_to_poni` convert between the two exactly (via
:mod:`nxrefine_bs.pyfai_geometry`): the ``Geometry`` made from a calibration gives every
pixel the 2-theta pyFAI gives it, so the reduction steps (which use ``Geometry``) see the
calibrated detector.  Beam centres count pixel ``i`` from its centre (Fit2D's
``centerX`` counts from its corner, half a pixel more), and the tilts follow
``Geometry``'s ``Dinv = Rx(roll) Ry(pitch) Rz(yaw)``, not pyFAI's rotation order.

``rot3`` (``roll``) is a rotation about the incident beam: it leaves every pixel's
scattering angle 2-theta unchanged, so powder rings cannot determine it.
:func:`calibrate_powder` therefore keeps ``roll`` at its initial value.

The calibration itself is fully automatic: ring positions are predicted from the
nominal geometry and the calibrant d-spacings, points are picked along each predicted
ring (background-subtracted centroids in short azimuthal sectors of a band of
``search_size`` pixels about the ring), the geometry is refined with pyFAI's
:class:`~pyFAI.geometryRefinement.GeometryRefinement` (least squares in 2-theta, the
wavelength fixed by default) and the cycle is repeated with more rings and the refined
geometry until all rings on the detector (at most ``max_rings``) are used.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..errors import CalibrationError
from ..geometry import HC_KEV_ANGSTROM

if TYPE_CHECKING:  # pragma: no cover
    from pyFAI.calibrant import Calibrant
    from pyFAI.detectors import Detector
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

__all__ = [
    "CalibrationResult",
    "POLARIZATION_FACTOR",
    "calibrant_names",
    "calibrate_powder",
    "get_calibrant",
    "get_detector",
    "load_image",
    "nxrefine_to_poni",
    "poni_to_nxrefine",
    "read_poni",
    "write_poni",
    "write_calibration",
    "save_plots",
]

logger = logging.getLogger(__name__)

POLARIZATION_FACTOR = 0.99
"""Polarization factor of the ``instrument/detector/polarization`` array (horizontal beam)."""

_FABIO_SUFFIXES = {".tif", ".tiff", ".cbf", ".edf", ".img", ".mccd", ".mar3450", ".sfrm"}
_HDF5_SUFFIXES = {".h5", ".hdf5", ".hdf", ".nxs", ".nx5", ".nx"}


# --------------------------------------------------------------------------------------
# pyFAI objects
# --------------------------------------------------------------------------------------
def get_detector(detector: str | Detector) -> Detector:
    """Return a pyFAI detector from its name (or the instance itself).

    Raises
    ------
    CalibrationError
        If pyFAI knows no detector of that name.
    """
    from pyFAI.detectors import Detector, detector_factory

    if isinstance(detector, Detector):
        return detector
    try:
        return detector_factory(str(detector))
    except Exception as exc:
        raise CalibrationError(
            f"unknown pyFAI detector {detector!r}; use a name such as 'Pilatus CdTe 2M', "
            "'Pilatus 1M' or 'Eiger 4M' (see pyFAI.detectors.ALL_DETECTORS)"
        ) from exc


def calibrant_names() -> list[str]:
    """Sorted names of the calibrants pyFAI knows."""
    from pyFAI.calibrant import CALIBRANT_FACTORY

    return sorted(CALIBRANT_FACTORY.keys(), key=str.lower)


def get_calibrant(calibrant: str | Calibrant, wavelength: float | None = None) -> Calibrant:
    """Return a fresh pyFAI calibrant, optionally set to ``wavelength`` (Angstrom).

    Parameters
    ----------
    calibrant : str or pyFAI.calibrant.Calibrant
        A pyFAI calibrant name (``"CeO2"``, ``"LaB6"``, ``"Si"``...), the path of a
        d-spacing file, or a calibrant instance (which is copied).
    wavelength : float, optional
        Wavelength in Angstrom.

    Raises
    ------
    CalibrationError
        If the calibrant is unknown.
    """
    import copy

    from pyFAI.calibrant import CALIBRANT_FACTORY, Calibrant

    if isinstance(calibrant, Calibrant):
        cal = copy.copy(calibrant)
    elif str(calibrant) in CALIBRANT_FACTORY:
        cal = CALIBRANT_FACTORY(str(calibrant))
    elif os.path.isfile(str(calibrant)):
        cal = Calibrant(filename=str(calibrant))
    else:
        names = calibrant_names()
        examples = [n for n in ("CeO2", "LaB6", "Si", "Al2O3", "AgBh", "Ni") if n in names]
        raise CalibrationError(
            f"unknown calibrant {calibrant!r}; pyFAI knows {len(names)} calibrants, e.g. "
            f"{', '.join(examples)} (nxrefine_bs.calibration.calibrant_names() lists them all)"
        )
    if wavelength:
        cal.wavelength = float(wavelength) * 1e-10
    return cal


# --------------------------------------------------------------------------------------
# PONI <-> NXRefine conversion
# --------------------------------------------------------------------------------------
DEFAULT_ORIENTATION = "-y +z -x"
"""NXRefine's default detector orientation."""


def _base_geometry(pixel1: float, pixel2: float, detector_orientation: str) -> Any:
    from ..geometry import Geometry

    if not math.isclose(pixel1, pixel2, rel_tol=1e-6):
        raise CalibrationError(
            f"pixels of {pixel1 * 1e6:g} x {pixel2 * 1e6:g} um are not square; nxrefine-bs "
            "geometry needs square pixels"
        )
    return Geometry(pixel_size=pixel2 * 1e3, detector_orientation=detector_orientation)


def poni_to_nxrefine(
    dist: float,
    poni1: float,
    poni2: float,
    rot1: float,
    rot2: float,
    rot3: float,
    pixel1: float,
    pixel2: float,
    detector_orientation: str = DEFAULT_ORIENTATION,
) -> dict[str, float]:
    """Convert a pyFAI PONI geometry to nxrefine-bs detector parameters.

    The conversion is exact: the :class:`~nxrefine_bs.geometry.Geometry` built from the
    result gives every pixel the same 2-theta as pyFAI does for the PONI (see
    :func:`nxrefine_bs.pyfai_geometry.geometry_from_poni`).

    Parameters
    ----------
    dist, poni1, poni2 : float
        PONI distance and point of normal incidence in metres.
    rot1, rot2, rot3 : float
        pyFAI rotations in radians.
    pixel1, pixel2 : float
        Pixel size along the slow (y) and fast (x) axes in metres (must be equal).
    detector_orientation : str
        The detector orientation of the configuration (default ``"-y +z -x"``).

    Returns
    -------
    dict
        ``distance`` (mm, along the beam to the detector plane), ``beam_center_x``,
        ``beam_center_y`` (pixels; the centre of pixel ``i`` is ``i``) and ``yaw``,
        ``pitch``, ``roll`` (degrees, :class:`~nxrefine_bs.geometry.Geometry` tilts).
    """
    from ..pyfai_geometry import geometry_from_poni

    g = geometry_from_poni(
        dist, poni1, poni2, rot1, rot2, rot3,
        base=_base_geometry(pixel1, pixel2, detector_orientation),
    )  # fmt: skip
    return {
        key: float(getattr(g, key))
        for key in ("distance", "beam_center_x", "beam_center_y", "yaw", "pitch", "roll")
    }


def nxrefine_to_poni(
    distance: float,
    beam_center_x: float,
    beam_center_y: float,
    yaw: float,
    pitch: float,
    roll: float,
    pixel1: float,
    pixel2: float,
    detector_orientation: str = DEFAULT_ORIENTATION,
) -> dict[str, float]:
    """Convert nxrefine-bs detector parameters to a pyFAI PONI geometry.

    The exact inverse of :func:`poni_to_nxrefine`.

    Parameters
    ----------
    distance : float
        Sample-to-detector distance along the incident beam (mm).
    beam_center_x, beam_center_y : float
        Direct-beam position on the detector in pixels (the centre of pixel ``i`` is ``i``).
    yaw, pitch, roll : float
        Detector tilts in degrees (:class:`~nxrefine_bs.geometry.Geometry` convention).
    pixel1, pixel2 : float
        Pixel size along the slow (y) and fast (x) axes in metres (must be equal).
    detector_orientation : str
        The detector orientation of the configuration.

    Returns
    -------
    dict
        ``dist``, ``poni1``, ``poni2`` (m) and ``rot1``, ``rot2``, ``rot3`` (rad).
    """
    from ..pyfai_geometry import poni_parameters

    g = _base_geometry(pixel1, pixel2, detector_orientation).replace(
        distance=distance,
        beam_center_x=beam_center_x,
        beam_center_y=beam_center_y,
        yaw=yaw,
        pitch=pitch,
        roll=roll,
    )
    par = poni_parameters(g)
    return {key: float(par[key]) for key in ("dist", "poni1", "poni2", "rot1", "rot2", "rot3")}


# --------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CalibrationResult:
    """Refined detector geometry from a powder calibration.

    The primary parameters are pyFAI's (SI units, radians); the NXRefine parameters
    (``distance``, ``beam_center_x``/``_y``, ``yaw``/``pitch``/``roll``) are derived
    properties, see :func:`poni_to_nxrefine`.

    Attributes
    ----------
    detector : str
        pyFAI detector name.
    pixel1, pixel2 : float
        Pixel size along y (slow) and x (fast), metres.
    shape : tuple of int
        Detector shape ``(ny, nx)``.
    wavelength : float
        Wavelength in metres (pyFAI convention); see :attr:`wavelength_angstrom`.
    dist, poni1, poni2 : float
        PONI distance and point of normal incidence, metres.
    rot1, rot2, rot3 : float
        pyFAI rotations, radians.
    calibrant : str
        Calibrant name.
    n_rings, n_points : int
        Number of rings and of control points used in the final refinement.
    rms_residual : float
        Root-mean-square 2-theta residual of the control points, degrees.
    rings : tuple of int
        Indices (in the calibrant's reflection list) of the rings used.
    control_points : numpy.ndarray or None
        ``(n, 3)`` array of ``(row, column, ring index)``, pixel-centre coordinates
        (the centre of pixel ``i`` is ``i``), as pyFAI's control points.
    """

    detector: str
    pixel1: float
    pixel2: float
    shape: tuple[int, int]
    wavelength: float
    dist: float
    poni1: float
    poni2: float
    rot1: float
    rot2: float
    rot3: float
    calibrant: str = ""
    n_rings: int = 0
    n_points: int = 0
    rms_residual: float = float("nan")
    rings: tuple[int, ...] = ()
    control_points: NDArray[np.float64] | None = field(default=None, repr=False, compare=False)
    pyfai_detector: Any = field(default=None, repr=False, compare=False)
    detector_orientation: str = DEFAULT_ORIENTATION

    # ---- NXRefine view ---------------------------------------------------------------
    def _nx(self) -> dict[str, float]:
        return poni_to_nxrefine(
            self.dist, self.poni1, self.poni2, self.rot1, self.rot2, self.rot3,
            self.pixel1, self.pixel2, self.detector_orientation,
        )  # fmt: skip

    @property
    def distance(self) -> float:
        """Sample-to-detector distance along the beam, mm."""
        return self._nx()["distance"]

    @property
    def beam_center_x(self) -> float:
        """Direct-beam x position, pixels (centre of pixel ``i`` at ``i``)."""
        return self._nx()["beam_center_x"]

    @property
    def beam_center_y(self) -> float:
        """Direct-beam y position, pixels (centre of pixel ``i`` at ``i``)."""
        return self._nx()["beam_center_y"]

    @property
    def yaw(self) -> float:
        """Detector yaw, degrees (``Geometry`` convention)."""
        return self._nx()["yaw"]

    @property
    def pitch(self) -> float:
        """Detector pitch, degrees (``Geometry`` convention)."""
        return self._nx()["pitch"]

    @property
    def roll(self) -> float:
        """Detector roll, degrees (``Geometry`` convention)."""
        return self._nx()["roll"]

    @property
    def wavelength_angstrom(self) -> float:
        """Wavelength in Angstrom."""
        return self.wavelength * 1e10

    @property
    def energy(self) -> float:
        """Photon energy in keV."""
        return HC_KEV_ANGSTROM / self.wavelength_angstrom

    def nxrefine_parameters(self) -> dict[str, float]:
        """NXRefine detector parameters (distance, beam centre, tilts) plus wavelength/energy."""
        out = self._nx()
        out["wavelength"] = self.wavelength_angstrom
        out["energy"] = self.energy
        return out

    def poni_parameters(self) -> dict[str, Any]:
        """pyFAI parameters as written in ``refinement/parameters`` (SI units)."""
        return {
            "Detector": self.detector,
            "PixelSize1": self.pixel1,
            "PixelSize2": self.pixel2,
            "Distance": self.dist,
            "Poni1": self.poni1,
            "Poni2": self.poni2,
            "Rot1": self.rot1,
            "Rot2": self.rot2,
            "Rot3": self.rot3,
            "Wavelength": self.wavelength,
        }

    def pyfai_detector_instance(self) -> Detector:
        """The pyFAI detector (rebuilt from name and pixel size if needed)."""
        if self.pyfai_detector is not None:
            return self.pyfai_detector
        try:
            return get_detector(self.detector)
        except CalibrationError:
            from pyFAI.detectors import Detector

            det = Detector(pixel1=self.pixel1, pixel2=self.pixel2, max_shape=self.shape)
            return det

    def integrator(self) -> AzimuthalIntegrator:
        """A pyFAI azimuthal integrator with this geometry."""
        from pyFAI.integrator.azimuthal import AzimuthalIntegrator

        return AzimuthalIntegrator(
            dist=self.dist, poni1=self.poni1, poni2=self.poni2,
            rot1=self.rot1, rot2=self.rot2, rot3=self.rot3,
            detector=self.pyfai_detector_instance(), wavelength=self.wavelength,
        )  # fmt: skip

    def summary(self) -> str:
        """One-paragraph human-readable summary."""
        return (
            f"{self.detector}, {self.calibrant or 'no calibrant'}, "
            f"lambda={self.wavelength_angstrom:.5f} A: distance={self.distance:.3f} mm, "
            f"beam centre=({self.beam_center_x:.2f}, {self.beam_center_y:.2f}) px, "
            f"yaw={self.yaw:.4f} pitch={self.pitch:.4f} roll={self.roll:.4f} deg; "
            f"{self.n_rings} rings, {self.n_points} points, "
            f"rms={self.rms_residual:.5f} deg 2-theta"
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain-data dictionary (no arrays) including the NXRefine parameters."""
        skip = ("control_points", "pyfai_detector")
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        out["shape"] = list(self.shape)
        out["rings"] = list(self.rings)
        out.update(self.nxrefine_parameters())
        return out


def _result_from_geometry(
    geo: Any,
    detector: Detector,
    *,
    calibrant: str = "",
    rings: Sequence[int] = (),
    points: NDArray[np.float64] | None = None,
    rms: float = float("nan"),
    detector_orientation: str = DEFAULT_ORIENTATION,
) -> CalibrationResult:
    return CalibrationResult(
        detector_orientation=detector_orientation,
        detector=str(detector.name),
        pixel1=float(detector.pixel1),
        pixel2=float(detector.pixel2),
        shape=tuple(int(s) for s in (detector.shape or detector.max_shape)),
        wavelength=float(geo.wavelength),
        dist=float(geo.dist),
        poni1=float(geo.poni1),
        poni2=float(geo.poni2),
        rot1=float(geo.rot1),
        rot2=float(geo.rot2),
        rot3=float(geo.rot3),
        calibrant=calibrant,
        n_rings=len(rings),
        n_points=0 if points is None else len(points),
        rms_residual=rms,
        rings=tuple(int(r) for r in rings),
        control_points=points,
        pyfai_detector=detector,
    )


# --------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------
def _first_image_dataset(h5file: Any) -> str | None:
    import h5py

    found: list[str] = []

    def visit(name: str, obj: Any) -> Any:
        if isinstance(obj, h5py.Dataset) and obj.dtype.kind in "iuf":
            shape = tuple(s for s in obj.shape)
            if len(shape) == 2 or (len(shape) == 3 and shape[0] == 1):
                found.append(name)
                return True
        return None

    h5file.visititems(visit)
    return found[0] if found else None


def load_image(path: str | os.PathLike[str]) -> NDArray[np.float64]:
    """Read a 2-D detector image.

    Parameters
    ----------
    path : str or path-like
        A file fabio can read (TIFF, CBF, EDF, ...), or an HDF5/NeXus file: either
        ``file.h5#/path/to/dataset`` or ``file.h5`` (the first 2-D numeric dataset, or a
        3-D one holding a single frame, is used).  A 3-D dataset named explicitly is
        summed over its first axis.

    Returns
    -------
    numpy.ndarray
        The image as ``float64``.

    Raises
    ------
    CalibrationError
        If the file is missing or cannot be read as an image; the message names it.
    """
    text = os.fspath(path)
    filename, _, dataset = text.partition("#")
    p = Path(filename)
    if not p.is_file():
        raise CalibrationError(f"powder image {filename!r} does not exist")
    try:
        import h5py

        is_hdf5 = h5py.is_hdf5(p)
    except OSError:
        is_hdf5 = False
    try:
        if is_hdf5 or p.suffix.lower() in _HDF5_SUFFIXES:
            import h5py

            with h5py.File(p, "r") as f:
                name = dataset or _first_image_dataset(f)
                if not name:
                    raise CalibrationError(
                        f"powder image {filename!r} holds no 2-D dataset; name one as "
                        f"'{filename}#/path/to/dataset'"
                    )
                obj = f.get(name)
                if not isinstance(obj, h5py.Dataset):
                    raise CalibrationError(f"powder image {filename!r} has no dataset {name!r}")
                data = np.asarray(obj[()], dtype=np.float64)
            if data.ndim == 3:
                data = data.sum(axis=0)
        else:
            import fabio

            with fabio.open(str(p)) as img:
                data = np.asarray(img.data, dtype=np.float64)
    except CalibrationError:
        raise
    except Exception as exc:
        raise CalibrationError(
            f"cannot read powder image {filename!r} ({type(exc).__name__}: {exc}); "
            "use a TIFF, CBF, EDF or HDF5 file"
        ) from exc
    if data.ndim != 2:
        raise CalibrationError(
            f"powder image {text!r} has shape {data.shape}; a 2-D image is needed"
        )
    return data


# --------------------------------------------------------------------------------------
# Ring point picking
# --------------------------------------------------------------------------------------
@dataclass
class _PixelTable:
    """Valid pixels sorted by 2-theta, for fast ring-band selection."""

    tth: NDArray[np.float64]
    chi: NDArray[np.float64]
    intensity: NDArray[np.float64]
    row: NDArray[np.float64]
    col: NDArray[np.float64]

    @classmethod
    def build(
        cls,
        geo: Any,
        image: NDArray,
        valid: NDArray[np.bool_],
        tth: NDArray[np.float64],
        plans: Sequence[_RingPlan],
    ) -> _PixelTable:
        """Table of the valid pixels inside the bands of ``plans``."""
        from pyFAI import units

        shape = image.shape
        edges = np.array([[p.tth - p.half_width, p.tth + p.half_width] for p in plans]).ravel()
        inside = (np.searchsorted(edges, tth.ravel()) % 2 == 1) & valid.ravel()
        flat = np.flatnonzero(inside)
        t = tth.ravel()[flat]
        order = np.argsort(t, kind="stable")
        flat = flat[order]
        chi = geo.center_array(shape, unit=units.CHI_RAD, scale=False)
        row, col = np.divmod(flat, shape[1])
        return cls(
            tth=t[order],
            chi=chi.ravel()[flat],
            intensity=image.ravel()[flat].astype(np.float64),
            row=row.astype(np.float64),
            col=col.astype(np.float64),
        )

    def band(self, lo: float, hi: float) -> slice:
        i0, i1 = np.searchsorted(self.tth, [lo, hi])
        return slice(int(i0), int(i1))


def _ring_points(
    table: _PixelTable,
    tth0: float,
    half_width: float,
    window: float,
    n_sectors: int,
    snr: float,
) -> tuple[NDArray[np.float64], int]:
    """Pick points on one ring.

    Pixels within ``half_width`` (rad) of the predicted 2-theta are split into
    ``n_sectors`` azimuthal sectors.  In each sector the background is the median and
    the noise the spread between the 16th and 50th percentiles.  The brightest pixel
    must stand ``snr`` noise levels above the background, away from the band edges, and
    the summed excess of the pixels within ``window`` (rad) of it must be significant at
    ``snr`` standard deviations as well.  The point is the background-subtracted,
    intensity-weighted centroid of those pixels.

    Returns the ``(n, 2)`` array of (row, column) points and the number of sectors that
    held enough pixels to be searched.
    """
    sl = table.band(tth0 - half_width, tth0 + half_width)
    if sl.stop - sl.start < 10:
        return np.empty((0, 2)), 0
    t = table.tth[sl]
    inten = table.intensity[sl]
    sector = np.floor((table.chi[sl] + np.pi) / (2 * np.pi) * n_sectors).astype(np.int64)
    np.clip(sector, 0, n_sectors - 1, out=sector)
    order = np.lexsort((inten, sector))
    counts = np.bincount(sector, minlength=n_sectors)
    starts = np.cumsum(counts) - counts
    ok = counts >= 8
    searched = int(ok.sum())
    if not searched:
        return np.empty((0, 2)), 0
    s_ok = np.flatnonzero(ok)
    c_ok = counts[s_ok]
    st_ok = starts[s_ok]
    sorted_i = inten[order]
    bkg = sorted_i[st_ok + c_ok // 2]
    low = sorted_i[st_ok + (c_ok * 16) // 100]
    sigma = np.maximum(bkg - low, 1e-9 + 1e-4 * np.abs(bkg))
    peak_pos = order[st_ok + c_ok - 1]
    height = inten[peak_pos] - bkg
    t_peak = t[peak_pos]
    good = (height > snr * sigma) & (np.abs(t_peak - tth0) < 0.8 * half_width)

    # per-pixel lookup of its sector's statistics
    bkg_s = np.zeros(n_sectors)
    sig_s = np.full(n_sectors, np.inf)
    tpk_s = np.full(n_sectors, np.nan)
    bkg_s[s_ok[good]] = bkg[good]
    sig_s[s_ok[good]] = sigma[good]
    tpk_s[s_ok[good]] = t_peak[good]
    near = np.abs(t - tpk_s[sector]) < window
    excess = np.where(near, inten - bkg_s[sector], 0.0)
    total = np.bincount(sector, weights=excess, minlength=n_sectors)
    n_near = np.bincount(sector, weights=near.astype(np.float64), minlength=n_sectors)
    w = np.clip(excess, 0.0, None)
    wsum = np.bincount(sector, weights=w, minlength=n_sectors)
    rows = np.bincount(sector, weights=w * table.row[sl], minlength=n_sectors)
    cols = np.bincount(sector, weights=w * table.col[sl], minlength=n_sectors)
    keep = (wsum > 0) & (total > snr * sig_s * np.sqrt(np.maximum(n_near, 1.0)))
    pts = np.column_stack([rows[keep] / wsum[keep], cols[keep] / wsum[keep]])
    return pts, searched


def _ring_list(calibrant: Calibrant) -> list[tuple[int, float]]:
    """(index, 2-theta rad) of the calibrant reflections, sorted, without None."""
    out = [(i, float(t)) for i, t in enumerate(calibrant.get_2th()) if t is not None]
    out.sort(key=lambda it: it[1])
    return out


@dataclass
class _RingPlan:
    index: int
    tth: float
    half_width: float
    window: float
    n_sectors: int


def _plan_rings(
    rings: list[tuple[int, float]],
    tmin: float,
    tmax: float,
    distance_m: float,
    pixel: float,
    search_size: float,
    sector_px: float,
) -> list[_RingPlan]:
    """Rings on the detector that are resolved from their neighbours."""
    values = np.array([t for _, t in rings])
    plans = []
    for k, (idx, t0) in enumerate(rings):
        px = pixel * math.cos(t0) ** 2 / distance_m  # 2-theta per pixel, normal incidence
        gaps = []
        if k > 0:
            gaps.append(t0 - values[k - 1])
        if k + 1 < len(values):
            gaps.append(values[k + 1] - t0)
        gap = min(gaps) if gaps else np.inf
        half = min(search_size * px, 0.45 * gap)
        if half < 2.0 * px:  # unresolved from a neighbour
            continue
        if not tmin < t0 < tmax:  # ring not on the detector
            continue
        radius_px = distance_m * math.tan(t0) / pixel
        n_sec = int(np.clip(round(2 * math.pi * radius_px / sector_px), 8, 720))
        plans.append(_RingPlan(idx, t0, half, min(half, 3.0 * px), n_sec))
    return plans


def _validate_inputs(
    image: NDArray | str | os.PathLike[str],
    detector: str | Detector,
    mask: ArrayLike | None,
) -> tuple[NDArray[np.float64], Detector, NDArray[np.bool_], str]:
    source = "<array>"
    if isinstance(image, str | os.PathLike):
        source = os.fspath(image)
        image = load_image(image)
    img = np.asarray(image, dtype=np.float64)
    det = get_detector(detector)
    shape = tuple(det.shape or det.max_shape or img.shape)
    if img.ndim != 2:
        raise CalibrationError(f"powder image {source} has shape {img.shape}; 2-D needed")
    if img.shape != shape:
        raise CalibrationError(
            f"powder image {source} has shape {img.shape} but detector {det.name!r} has "
            f"shape {shape}; choose the matching detector"
        )
    valid = np.isfinite(img) & (img >= 0)
    if det.mask is not None:
        valid &= ~np.asarray(det.mask, dtype=bool)
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != img.shape:
            raise CalibrationError(
                f"pixel mask shape {m.shape} does not match image shape {img.shape}"
            )
        valid &= m == 0
    return img, det, valid, source


def _residuals(refiner: Any, points: NDArray[np.float64]) -> NDArray[np.float64]:
    """2-theta residuals (rad) of control points ``(row, col, ring)`` for the refiner."""
    calc = refiner.calc_2th(points[:, 2].astype(np.int32))
    return refiner.tth(points[:, 0], points[:, 1]) - calc


def _refine_with_rejection(
    refiner: Any, points: NDArray[np.float64], fixed: list[str], rounds: int = 4
) -> tuple[NDArray[np.float64], float]:
    """Refine, drop points beyond 5 robust standard deviations, refine again.

    Returns the points kept and their rms 2-theta residual in degrees.
    """
    refiner.data = points
    for _ in range(rounds):
        refiner.refine3(fix=fixed)
        resid = _residuals(refiner, points)
        scale = 1.4826 * np.median(np.abs(resid - np.median(resid)))
        good = np.abs(resid) <= max(5 * scale, 1e-9)
        if good.all() or good.sum() < 10:
            break
        points = points[good]
        refiner.data = points
    else:
        refiner.refine3(fix=fixed)
        resid = _residuals(refiner, points)
    return points, float(np.degrees(np.sqrt(np.mean(resid**2))))


def calibrate_powder(
    image: NDArray | str | os.PathLike[str],
    detector: str | Detector,
    calibrant: str | Calibrant = "CeO2",
    *,
    wavelength: float,
    distance: float,
    beam_center_x: float,
    beam_center_y: float,
    yaw: float = 0.0,
    pitch: float = 0.0,
    roll: float = 0.0,
    fix_wavelength: bool = True,
    max_rings: int = 20,
    search_size: float = 10.0,
    mask: ArrayLike | None = None,
    snr: float = 5.0,
    min_rings: int = 2,
    max_iterations: int = 12,
    detector_orientation: str = DEFAULT_ORIENTATION,
) -> CalibrationResult:
    """Calibrate the detector geometry from a powder image, without user interaction.

    Parameters
    ----------
    image : numpy.ndarray or path
        Powder image, or a file for :func:`load_image`.  Negative and non-finite pixels
        are ignored, as are the detector's masked pixels.
    detector : str or pyFAI.detectors.Detector
        pyFAI detector name (e.g. ``"Pilatus CdTe 2M"``) or instance; its shape must
        match the image.
    calibrant : str or pyFAI.calibrant.Calibrant
        Calibrant name (default ``"CeO2"``), d-spacing file or instance.
    wavelength : float
        Wavelength in Angstrom.
    distance : float
        Nominal sample-to-detector distance along the beam, mm.
    beam_center_x, beam_center_y : float
        Nominal direct-beam position, pixels (Fit2D convention, see module docstring).
    yaw, pitch, roll : float
        Nominal tilts, degrees (= pyFAI ``rot1``, ``rot2``, ``rot3``).  ``roll`` is not
        refined: it does not change the 2-theta of any pixel.
    fix_wavelength : bool
        Keep the wavelength fixed (default).  If ``False`` it is refined in a last stage.
    max_rings : int
        Use at most this many (resolved) rings, from low angle up.
    search_size : float
        Half-width in pixels of the band about each predicted ring searched for points.
        It must exceed the error of the nominal ring positions.
    mask : array_like, optional
        Extra pixel mask (nonzero = masked) of the image shape.
    snr : float
        Minimum peak height over the local background, in noise standard deviations.
    min_rings : int
        Fewest rings with points needed for a refinement (at least 2).
    max_iterations : int
        Maximum number of pick-and-refine cycles.
    detector_orientation : str
        Detector orientation of the configuration, for the nominal and refined
        ``distance``/beam centre/tilts (default ``"-y +z -x"``).

    Returns
    -------
    CalibrationResult

    Raises
    ------
    CalibrationError
        If the image cannot be read or does not match the detector, the calibrant is
        unknown, or fewer than ``min_rings`` rings are found.
    """
    from pyFAI import units
    from pyFAI.geometryRefinement import GeometryRefinement

    img, det, valid, source = _validate_inputs(image, detector, mask)
    cal = get_calibrant(calibrant, wavelength)
    cal_name = cal.name if hasattr(cal, "name") and cal.name else str(calibrant)
    if not valid.any():
        raise CalibrationError(f"powder image {source} has no valid (unmasked) pixel")
    min_rings = max(2, int(min_rings))
    start = nxrefine_to_poni(
        distance,
        beam_center_x,
        beam_center_y,
        yaw,
        pitch,
        roll,
        det.pixel1,
        det.pixel2,
        detector_orientation,
    )
    pixel = math.sqrt(det.pixel1 * det.pixel2)
    rings_all = _ring_list(cal)
    if not rings_all:
        raise CalibrationError(
            f"calibrant {cal_name} has no reflection at wavelength {wavelength} A"
        )

    def hint() -> str:
        return (
            f"check the wavelength ({wavelength} A), distance ({distance} mm), beam centre "
            f"({beam_center_x}, {beam_center_y}) px and calibrant ({cal_name}), "
            f"or increase search_size ({search_size} px)"
        )

    refiner = GeometryRefinement(
        data=[[0.0, 0.0, 0]],
        calibrant=cal,
        detector=det,
        wavelength=wavelength * 1e-10,
        **start,
    )
    fixed = ["wavelength", "rot3"]
    n_use = min(3, max_rings)
    used: list[int] = []
    points = np.empty((0, 3))
    rms = float("nan")
    previous = None
    for iteration in range(max_iterations):
        tth = refiner.center_array(img.shape, unit=units.TTH_RAD, scale=False)
        on_detector = tth[valid]
        plans = _plan_rings(
            rings_all,
            float(on_detector.min()),
            float(on_detector.max()),
            refiner.dist,
            pixel,
            search_size,
            8.0,
        )
        if not plans:
            raise CalibrationError(
                f"no ring of {cal_name} falls on the detector for powder image {source}; " + hint()
            )
        plans = plans[:max_rings]
        table = _PixelTable.build(refiner, img, valid, tth, plans)
        picked: list[NDArray] = []
        used = []
        tried = 0
        for plan in plans:
            if len(used) >= n_use:
                break
            tried += 1
            pts, searched = _ring_points(
                table, plan.tth, plan.half_width, plan.window, plan.n_sectors, snr
            )
            if len(pts) >= max(6, 0.15 * searched):
                used.append(plan.index)
                picked.append(np.column_stack([pts, np.full(len(pts), plan.index)]))
        if len(used) < min_rings:
            raise CalibrationError(
                f"found {len(used)} ring(s) with enough points in powder image {source} "
                f"(at least {min_rings} needed, {tried} searched); " + hint()
            )
        points = np.concatenate(picked)
        refiner.data = points
        points, rms = _refine_with_rejection(refiner, points, fixed)
        params = np.array([refiner.dist, refiner.poni1, refiner.poni2, refiner.rot1, refiner.rot2])
        logger.info(
            "calibration cycle %d: %d rings, %d points, rms %.5f deg",
            iteration + 1, len(used), len(points), rms,
        )  # fmt: skip
        all_used = len(used) >= min(max_rings, len(plans)) or n_use >= len(plans)
        # converged: shifts below ~1e-5 of the distance, 0.02 pixel and 0.001 degree
        tol = [1e-5 * refiner.dist, 0.02 * pixel, 0.02 * pixel, 2e-5, 2e-5]
        converged = previous is not None and bool(np.all(np.abs(params - previous) < tol))
        previous = params
        if all_used and converged:
            break
        n_use = len(plans) if all_used else min(len(plans), max(n_use + 2, 2 * n_use))

    if not fix_wavelength:
        points, rms = _refine_with_rejection(refiner, points, ["rot3"])
    result = _result_from_geometry(
        refiner,
        det,
        calibrant=cal_name,
        rings=sorted(set(used)),
        points=points,
        rms=rms,
        detector_orientation=detector_orientation,
    )
    logger.info("powder calibration: %s", result.summary())
    return result


# --------------------------------------------------------------------------------------
# PONI files
# --------------------------------------------------------------------------------------
def read_poni(path: str | os.PathLike[str]) -> CalibrationResult:
    """Read a pyFAI ``.poni`` file into a :class:`CalibrationResult`.

    Raises
    ------
    CalibrationError
        If the file is missing or is not a valid PONI file.
    """
    from pyFAI.io.ponifile import PoniFile

    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"PONI file {os.fspath(path)!r} does not exist")
    try:
        poni = PoniFile(str(p))
        det = poni.detector
        if det is None or det.pixel1 is None:
            raise ValueError("no detector or pixel size")
        geo = poni
        result = CalibrationResult(
            detector=str(det.name),
            pixel1=float(det.pixel1),
            pixel2=float(det.pixel2),
            shape=tuple(int(s) for s in (det.shape or det.max_shape or (0, 0))),
            wavelength=float(geo.wavelength) if geo.wavelength else float("nan"),
            dist=float(geo.dist),
            poni1=float(geo.poni1),
            poni2=float(geo.poni2),
            rot1=float(geo.rot1),
            rot2=float(geo.rot2),
            rot3=float(geo.rot3),
            pyfai_detector=det,
        )
    except Exception as exc:
        raise CalibrationError(
            f"cannot read PONI file {os.fspath(path)!r} ({type(exc).__name__}: {exc})"
        ) from exc
    return result


def write_poni(result: CalibrationResult, path: str | os.PathLike[str]) -> Path:
    """Write ``result`` as a pyFAI ``.poni`` file (replacing any existing file)."""
    from pyFAI.io.ponifile import PoniFile

    p = Path(path)
    ai = result.integrator()
    poni = PoniFile(ai)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as fd:
            poni.write(fd)
        os.replace(tmp, p)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise CalibrationError(f"cannot write PONI file {os.fspath(p)!r}: {exc}") from exc
    return p


# --------------------------------------------------------------------------------------
# NeXus output
# --------------------------------------------------------------------------------------
def entry_names(h5file: Any) -> list[str]:
    """Names of the ``fN`` entries of an open file, in numeric order."""
    import re

    names = [n for n in h5file if re.fullmatch(r"f\d+", n)]
    return sorted(names, key=lambda n: int(n[1:]))


def resolve_entries(
    filename: str | os.PathLike[str], entries: Sequence[str] | str | None
) -> list[str]:
    """Check ``filename`` and return the entries to update (all ``fN`` when None).

    Each must exist and hold ``instrument/detector``.

    Raises
    ------
    CalibrationError
        If the file cannot be read or an entry is missing.
    """
    import h5py

    path = os.fspath(filename)
    if not os.path.isfile(path):
        raise CalibrationError(f"NeXus file {path!r} does not exist")
    try:
        with h5py.File(path, "r") as f:
            available = entry_names(f)
            if entries is None:
                wanted = available
            else:
                wanted = [entries] if isinstance(entries, str) else list(entries)
            if not wanted:
                raise CalibrationError(
                    f"NeXus file {path!r} has no f1, f2... entry; give entries explicitly"
                )
            for e in wanted:
                grp = f.get(e)
                if not isinstance(grp, h5py.Group):
                    raise CalibrationError(
                        f"NeXus file {path!r} has no entry {e!r} (entries: "
                        f"{', '.join(available) or 'none'})"
                    )
                if not isinstance(grp.get("instrument/detector"), h5py.Group):
                    raise CalibrationError(
                        f"entry {e!r} of {path!r} has no instrument/detector group"
                    )
    except CalibrationError:
        raise
    except OSError as exc:
        raise CalibrationError(f"cannot open NeXus file {path!r}: {exc}") from exc
    return wanted


@contextlib.contextmanager
def atomic_h5_update(filename: str | os.PathLike[str]) -> Iterator[Any]:
    """Open a copy of ``filename`` for writing; replace the original only on success.

    The copy lives next to the original (so relative external links stay valid) and
    replaces it with :func:`os.replace`; on any error it is deleted and the original is
    left byte-identical.
    """
    import shutil
    import tempfile

    import h5py

    path = Path(filename)
    fd, tmpname = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmpname)
    try:
        shutil.copy2(path, tmp)
        with h5py.File(tmp, "r+") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_calibration(
    filename: str | os.PathLike[str],
    result: CalibrationResult,
    image: ArrayLike,
    calibrant: str | None = None,
    entries: Sequence[str] | str | None = None,
) -> list[str]:
    """Store a powder calibration in a configuration template or scan file.

    For each entry ``fN`` this writes ``fN/instrument/calibration`` (NXdata of the
    powder image with ``x_pixel``/``y_pixel`` axes, a ``calibrant`` field and a
    ``refinement`` NXprocess with ``program='pyFAI'``, ``version`` and a ``parameters``
    NXparameters group holding ``Detector``, ``PixelSize1``, ``PixelSize2``,
    ``Distance``, ``Poni1``, ``Poni2``, ``Rot1``, ``Rot2``, ``Rot3``, ``Wavelength`` in
    pyFAI's SI units), and updates ``instrument/detector/{distance, beam_center_x,
    beam_center_y, yaw, pitch, roll, polarization}`` and
    ``instrument/monochromator/{wavelength, energy}``.  The polarization array is
    pyFAI's polarization correction with factor :data:`POLARIZATION_FACTOR`.  The
    image is stored once and hard-linked into the other entries.

    The update is atomic: on any error the file is left untouched.

    Parameters
    ----------
    filename : path
        Configuration template or scan file.
    result : CalibrationResult
        The refined geometry.
    image : array_like
        The powder image (detector shape).
    calibrant : str, optional
        Calibrant name; defaults to ``result.calibrant``.
    entries : str or sequence of str, optional
        Entries to update; ``None`` means every ``fN`` entry.

    Returns
    -------
    list of str
        The entries written.

    Raises
    ------
    CalibrationError
        If the file or an entry is missing, or the image shape does not match.
    """
    import h5py
    import pyFAI

    from ..nexus.h5tools import nx_group, write_field

    path = os.fspath(filename)
    img = np.asarray(image)
    if img.ndim != 2 or (result.shape and tuple(img.shape) != tuple(result.shape)):
        raise CalibrationError(
            f"calibration image shape {img.shape} does not match the detector shape "
            f"{tuple(result.shape)} of the calibration"
        )
    wanted = resolve_entries(path, entries)
    with h5py.File(path, "r") as f:
        for e in wanted:
            shape = f[e].get("instrument/detector/shape")
            if isinstance(shape, h5py.Dataset):
                s = tuple(int(v) for v in np.ravel(shape[()]))
                if len(s) == 2 and s != tuple(img.shape):
                    raise CalibrationError(
                        f"entry {e!r} of {path!r} has detector shape {s} but the calibration "
                        f"image has shape {img.shape}"
                    )
    cal_name = calibrant if calibrant is not None else result.calibrant
    ai = result.integrator()
    polarization = np.asarray(
        ai.polarization(shape=img.shape, factor=POLARIZATION_FACTOR), dtype=np.float32
    )
    nx = result.nxrefine_parameters()
    first_image = None
    with atomic_h5_update(path) as f:
        for e in wanted:
            inst = f[e]["instrument"]
            if "calibration" in inst:
                del inst["calibration"]
            calg = nx_group(inst, "calibration", "NXdata")
            calg.attrs["signal"] = "data"
            calg.attrs["axes"] = ["y_pixel", "x_pixel"]
            if first_image is None:
                first_image = calg.create_dataset(
                    "data", data=img, compression="gzip", compression_opts=4,
                    chunks=True,
                )  # fmt: skip
            else:
                calg["data"] = first_image
            write_field(calg, "x_pixel", np.arange(img.shape[1], dtype=np.float64))
            write_field(calg, "y_pixel", np.arange(img.shape[0], dtype=np.float64))
            write_field(calg, "calibrant", str(cal_name))
            proc = nx_group(calg, "refinement", "NXprocess")
            write_field(proc, "program", "pyFAI")
            write_field(proc, "version", str(pyFAI.version))
            write_field(proc, "sequence_index", 1)
            write_field(
                proc,
                "note",
                f"{result.n_rings} rings, {result.n_points} points, "
                f"rms {result.rms_residual:.6f} deg",
            )
            pars = nx_group(proc, "parameters", "NXparameters")
            for key, value in result.poni_parameters().items():
                write_field(pars, key, value)
            det = inst["detector"]
            write_field(det, "distance", nx["distance"], units="mm")
            write_field(det, "beam_center_x", nx["beam_center_x"], units="pixel")
            write_field(det, "beam_center_y", nx["beam_center_y"], units="pixel")
            write_field(det, "yaw", nx["yaw"], units="degree")
            write_field(det, "pitch", nx["pitch"], units="degree")
            write_field(det, "roll", nx["roll"], units="degree")
            write_field(det, "polarization", polarization, compression="gzip")
            mono = nx_group(inst, "monochromator", "NXmonochromator")
            write_field(mono, "wavelength", np.float32(nx["wavelength"]), units="Angstrom")
            write_field(mono, "energy", np.float32(nx["energy"]), units="keV")
    logger.info("wrote powder calibration to %s entries %s", path, ", ".join(wanted))
    return wanted


# --------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------
def _display_image(image: NDArray, valid: NDArray[np.bool_] | None = None) -> NDArray:
    img = np.asarray(image, dtype=np.float64)
    ok = np.isfinite(img) & (img > 0)
    if valid is not None:
        ok &= valid
    out = np.full(img.shape, np.nan)
    out[ok] = np.log10(img[ok])
    return out


def save_plots(
    result: CalibrationResult,
    image: ArrayLike,
    outdir: str | os.PathLike[str],
    *,
    prefix: str = "calibration",
) -> dict[str, Path]:
    """Save a cake plot and a ring-overlay plot of a calibration as PNG files.

    Matplotlib's object-oriented API is used with the Agg canvas, so nothing global
    (backend, pyplot state) is touched.

    Parameters
    ----------
    result : CalibrationResult
        The refined geometry.
    image : array_like
        The powder image.
    outdir : path
        Output directory (created if needed).
    prefix : str
        File-name prefix.

    Returns
    -------
    dict
        ``{"cake": path, "rings": path}``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from pyFAI import units

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    img = np.asarray(image, dtype=np.float64)
    ai = result.integrator()
    det = ai.detector
    mask = ~(np.isfinite(img) & (img >= 0))
    if det.mask is not None and det.mask.shape == img.shape:
        mask |= det.mask.astype(bool)
    cal = get_calibrant(result.calibrant or "CeO2", result.wavelength_angstrom)
    ring_tth = [math.degrees(t) for t in cal.get_2th() if t is not None]

    # cake
    cake = ai.integrate2d(
        np.where(mask, 0.0, img), 1000, 360, unit="2th_deg", mask=mask.astype(np.int8),
        correctSolidAngle=False,
    )  # fmt: skip
    fig = Figure(figsize=(9, 5.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    radial, azim = np.asarray(cake.radial), np.asarray(cake.azimuthal)
    ax.imshow(
        _display_image(cake.intensity),
        origin="lower", aspect="auto", cmap="viridis",
        extent=(radial[0], radial[-1], azim[0], azim[-1]),
    )  # fmt: skip
    for t in ring_tth:
        if radial[0] <= t <= radial[-1]:
            ax.axvline(t, color="r", lw=0.5, alpha=0.6)
    ax.set_xlabel("2θ (deg)")
    ax.set_ylabel("χ (deg)")
    ax.set_title(f"{result.calibrant}: cake (red: calibrant rings)")
    cake_path = out / f"{prefix}_cake.png"
    fig.savefig(cake_path)

    # ring overlay
    fig = Figure(figsize=(8, 8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(_display_image(img, ~mask), origin="lower", cmap="gray_r", interpolation="nearest")
    tth = np.degrees(ai.center_array(img.shape, unit=units.TTH_RAD, scale=False))
    levels = [t for t in ring_tth if np.nanmin(tth) < t < np.nanmax(tth)]
    if levels:
        ax.contour(tth, levels=levels, colors="r", linewidths=0.6)
    pts = result.control_points
    if pts is not None and len(pts):
        ax.plot(pts[:, 1], pts[:, 0], ".", color="tab:cyan", ms=1.5)
    ax.plot([result.beam_center_x - 0.5], [result.beam_center_y - 0.5], "r+", ms=12)
    ax.set_xlabel("x (pixel)")
    ax.set_ylabel("y (pixel)")
    ax.set_title(
        f"distance {result.distance:.2f} mm, centre ({result.beam_center_x:.2f}, "
        f"{result.beam_center_y:.2f}), rms {result.rms_residual:.4f}°"
    )
    rings_path = out / f"{prefix}_rings.png"
    fig.savefig(rings_path)
    return {"cake": cake_path, "rings": rings_path}
