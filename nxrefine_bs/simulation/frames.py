"""Seeded, physically correct synthetic rotation frames.

:class:`RotationSimulator` predicts where every allowed reflection of a
:class:`~nxrefine_bs.simulation.crystal.SimCrystal` crosses the Ewald sphere during a
continuous rotation (``Geometry.predict``), and renders each frame as the expected
counts of

* Bragg peaks: kinematic ``|F|^2`` x Lorentz x polarization, a pixel-integrated
  Gaussian spot in x and y and a frame-integrated Gaussian in the rotation direction;
* a smooth radial background (air and Compton scattering) x polarization;
* optional diffuse scattering from short-range order, modulated in (H, K, L);
* at a ``temperature`` with a :class:`~nxrefine_bs.simulation.thermal.ThermalModel`:
  Debye-Waller factors and thermal expansion of the crystal, thermal diffuse scattering
  around the reciprocal-lattice points and CDW superlattice reflections below ``Tc``;

all scaled by a drifting incident-flux monitor, then Poisson noise, with detector gaps
set to -1 as a Pilatus does.  Every frame is generated from its own seed, so any frame
can be produced independently and deterministically.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import h5py
import numba
import numpy as np
from numpy.typing import NDArray
from scipy.special import ndtr
from tqdm import tqdm

from ..errors import NXRefineBSError
from ..geometry import Geometry, all_hkl
from ..nexus.codecs import compression_options
from .crystal import SimCrystal
from .thermal import ThermalModel

logger = logging.getLogger(__name__)

__all__ = ["DetectorModel", "RotationSimulator", "PeakTable"]


@dataclass(frozen=True)
class DetectorModel:
    """Shape, pixel size and gap mask of a detector.

    Parameters
    ----------
    name : str
        pyFAI detector name (or a free description for synthetic detectors).
    shape : tuple of int
        ``(ny, nx)``.
    pixel_size : float
        mm.
    mask : ndarray of int8
        1 where pixels are gaps or dead.
    """

    name: str
    shape: tuple[int, int]
    pixel_size: float
    mask: NDArray[np.int8] = field(repr=False)

    @classmethod
    def from_pyfai(cls, name: str) -> DetectorModel:
        """Detector from its pyFAI name, e.g. ``"Pilatus CdTe 2M"``."""
        import pyFAI.detectors  # heavy: pyFAI, only for detectors named by pyFAI

        try:
            det = pyFAI.detectors.detector_factory(name)
        except Exception as exc:  # pyFAI raises RuntimeError/KeyError
            raise NXRefineBSError(f"unknown pyFAI detector {name!r}: {exc}") from exc
        mask = det.calc_mask()
        if mask is None:
            mask = np.zeros(det.shape, dtype=np.int8)
        return cls(name, tuple(det.shape), float(det.pixel1) * 1000.0, mask.astype(np.int8))

    @classmethod
    def synthetic(
        cls,
        shape: tuple[int, int],
        *,
        pixel_size: float = 0.172,
        modules: tuple[int, int] = (2, 2),
        gap: tuple[int, int] = (3, 3),
    ) -> DetectorModel:
        """A small modular detector (for tests) with gaps between ``modules``."""
        ny, nx = shape
        mask = np.zeros(shape, dtype=np.int8)
        for k in range(1, modules[0]):
            y0 = k * ny // modules[0] - gap[0] // 2
            mask[y0 : y0 + gap[0], :] = 1
        for k in range(1, modules[1]):
            x0 = k * nx // modules[1] - gap[1] // 2
            mask[:, x0 : x0 + gap[1]] = 1
        return cls(f"synthetic {ny}x{nx}", (ny, nx), pixel_size, mask)


@dataclass(frozen=True)
class PeakTable:
    """The injected Bragg peaks (ground truth) of one simulated rotation."""

    hkl: NDArray[np.float64]
    x: NDArray[np.float64]
    y: NDArray[np.float64]
    z: NDArray[np.float64]
    intensity: NDArray[np.float64]
    peak_max: NDArray[np.float64]
    two_theta: NDArray[np.float64]

    def __len__(self) -> int:
        return len(self.x)

    def select(self, keep: NDArray[np.bool_]) -> PeakTable:
        """A table with only the rows where ``keep`` is True."""
        return PeakTable(
            *(
                getattr(self, f)[keep]
                for f in ("hkl", "x", "y", "z", "intensity", "peak_max", "two_theta")
            )
        )


@numba.njit(cache=True, nogil=True)
def _smooth_image(
    background: NDArray[np.float32],
    q: NDArray[np.float32],
    m: NDArray[np.float64],
    b: NDArray[np.float64],
    allowed: NDArray[np.bool_],
    scale: float,
    diffuse: float,
    tds: float,
    kappa2: float,
    dw: float,
    out: NDArray[np.float64],
) -> None:  # pragma: no cover - compiled
    """Background, short-range-order diffuse and thermal diffuse counts of every pixel.

    ``q`` holds the pixels' scattering vectors (lab frame, 1/Angstrom) or nothing (no
    diffuse terms); ``m`` turns them into fractional ``hkl``.  Short-range order:
    ``diffuse (3 - sum cos 2 pi h_i) / 6 exp(-2 |q|^2)``.  TDS around the nearest
    reciprocal-lattice point ``G`` if ``allowed``: ``tds |q|^2 exp(-dw s^2) kappa^2 /
    (|B (h - G)|^2 + kappa^2)`` with ``s^2 = |q|^2 / 4``.  Everything times ``scale``.
    """
    two_pi = 2.0 * np.pi
    for i in range(background.size):
        value = background[i] * scale
        if q.shape[0] > 0:
            qx, qy, qz = q[i, 0], q[i, 1], q[i, 2]
            q2 = qx * qx + qy * qy + qz * qz
            h = m[0, 0] * qx + m[0, 1] * qy + m[0, 2] * qz
            k = m[1, 0] * qx + m[1, 1] * qy + m[1, 2] * qz
            l = m[2, 0] * qx + m[2, 1] * qy + m[2, 2] * qz  # noqa: E741
            if diffuse > 0:
                sro = (3.0 - np.cos(two_pi * h) - np.cos(two_pi * k) - np.cos(two_pi * l)) / 6.0
                value += diffuse * scale * sro * np.exp(-2.0 * q2)
            if tds > 0:
                hn, kn, ln = np.floor(h + 0.5), np.floor(k + 0.5), np.floor(l + 0.5)
                if allowed[int(hn) % 6, int(kn) % 6, int(ln) % 6]:
                    dh, dk, dl = h - hn, k - kn, l - ln
                    dx = b[0, 0] * dh + b[0, 1] * dk + b[0, 2] * dl
                    dy = b[1, 0] * dh + b[1, 1] * dk + b[1, 2] * dl
                    dz = b[2, 0] * dh + b[2, 1] * dk + b[2, 2] * dl
                    dq2 = dx * dx + dy * dy + dz * dz
                    envelope = q2 * np.exp(-dw * q2 / 4.0)
                    value += tds * scale * envelope * kappa2 / (dq2 + kappa2)
        out[i] = value


class RotationSimulator:
    """Render the frames of one continuous rotation of a crystal.

    Parameters
    ----------
    geometry : Geometry
        Diffractometer geometry (its ``shape`` and ``pixel_size`` must match ``detector``).
    crystal : SimCrystal
        The sample.
    detector : DetectorModel
        Detector shape, pixel size and gaps.
    n_frames : int
        Number of frames in the rotation.
    seed : int
        Seed for noise and monitor drift.
    max_intensity : float
        Integrated counts of the strongest reflection (before monitor scaling).
    background : float
        Mean background counts per pixel at low angle.
    diffuse : float
        Peak diffuse-scattering counts per pixel (0 disables it).
    sigma_xy, sigma_frames : float
        Gaussian widths of a spot on the detector (pixels) and along the rotation (frames).
    monitor_mean, monitor_drift : float
        Mean incident-flux monitor counts per frame and the relative drift amplitude.
    polarization : float
        Horizontal polarization fraction of the beam.
    temperature : float, optional
        Sample temperature (K).  It changes the frames only together with ``thermal``.
    thermal : ThermalModel, optional
        How the crystal changes with temperature (Debye-Waller, expansion, thermal
        diffuse scattering, CDW superlattice); without it ``temperature`` is recorded
        only.
    """

    def __init__(
        self,
        geometry: Geometry,
        crystal: SimCrystal,
        detector: DetectorModel,
        n_frames: int,
        *,
        seed: int = 0,
        max_intensity: float = 2.0e6,
        background: float = 2.0,
        diffuse: float = 0.0,
        sigma_xy: float = 1.0,
        sigma_frames: float = 0.8,
        monitor_mean: float = 50000.0,
        monitor_drift: float = 0.03,
        polarization: float = 0.99,
        temperature: float | None = None,
        thermal: ThermalModel | None = None,
    ) -> None:
        if tuple(geometry.shape) != tuple(detector.shape):
            raise NXRefineBSError(
                f"geometry shape {geometry.shape} does not match detector {detector.name} "
                f"shape {detector.shape}"
            )
        if n_frames < 1:
            raise NXRefineBSError(f"n_frames must be >= 1, got {n_frames}")
        self.geometry = geometry
        self.temperature = None if temperature is None else float(temperature)
        self.thermal = thermal if self.temperature is not None else None
        reference_crystal = crystal
        if self.thermal is not None and self.temperature is not None:
            crystal = replace(
                crystal,
                cell=self.thermal.cell(crystal.cell, self.temperature),
                b_iso=self.thermal.b_iso(crystal.b_iso, self.temperature),
            )
        self.crystal = crystal
        self._reference_crystal = reference_crystal
        self.detector = detector
        self.n_frames = int(n_frames)
        self.seed = int(seed)
        self.max_intensity = float(max_intensity)
        self.background = float(background)
        self.diffuse = float(diffuse)
        self.sigma_xy = float(sigma_xy)
        self.sigma_frames = float(sigma_frames)
        self.monitor_mean = float(monitor_mean)
        self.monitor_drift = float(monitor_drift)
        self.polarization = float(polarization)
        self._peaks: PeakTable | None = None
        self._background_image: NDArray[np.float32] | None = None
        self._q_pixels: NDArray[np.float32] | None = None
        self._allowed_table: NDArray[np.bool_] | None = None
        self._monitor = self._make_monitor()

    # ------------------------------------------------------------------ monitor
    def _make_monitor(self) -> NDArray[np.float64]:
        rng = np.random.default_rng([self.seed, 7919])
        i = np.arange(self.n_frames)
        phase = rng.uniform(0, 2 * np.pi)
        period = max(50.0, self.n_frames / 3.0)
        smooth = 1.0 + self.monitor_drift * np.sin(2 * np.pi * i / period + phase)
        smooth *= 1.0 - 0.5 * self.monitor_drift * i / max(1, self.n_frames)
        return rng.poisson(self.monitor_mean * smooth).astype(np.float64)

    @property
    def monitor(self) -> NDArray[np.float64]:
        """Per-frame incident-flux monitor counts (drifting, with counting noise)."""
        return self._monitor

    @property
    def phi(self) -> NDArray[np.float64]:
        """Rotation angle (degrees) at the centre of each frame."""
        return self.geometry.phi(np.arange(self.n_frames))

    # ------------------------------------------------------------------ peaks
    def _polarization_factor(self, s: NDArray[np.float64]) -> NDArray[np.float64]:
        sh = s / np.linalg.norm(s, axis=-1, keepdims=True)
        p = self.polarization
        return p * (1 - sh[..., 1] ** 2) + (1 - p) * (1 - sh[..., 2] ** 2)

    @property
    def peaks(self) -> PeakTable:
        """Ground truth: every reflection that lands on the detector within the scan."""
        if self._peaks is None:
            self._peaks = self._compute_peaks()
        return self._peaks

    def _compute_peaks(self) -> PeakTable:
        g = self.geometry
        cr = self.crystal
        d_min = 1.0 / (g.q_max() * 1.001)
        hkl = all_hkl(d_min, cr.B).astype(np.float64)
        hkl = hkl[cr.allowed(hkl)]
        f2 = cr.intensity(hkl)
        keep = f2 > 1e-6 * f2.max() if len(f2) else np.zeros(0, bool)
        sat_hkl, sat_f2 = self._satellites(hkl, f2)
        hkl, f2 = np.concatenate([hkl[keep], sat_hkl]), np.concatenate([f2[keep], sat_f2])
        f2_of = dict(zip(map(tuple, np.round(hkl * 12).astype(np.int64)), f2, strict=True))
        pred = g.predict(hkl, cr.UB)
        margin = 4 * self.sigma_frames
        on = (
            pred["on_detector"]
            & (pred["frame"] > -margin)
            & (pred["frame"] < self.n_frames - 1 + margin)
        )
        hkl_on = pred["hkl"][on]
        x, y, z = pred["x"][on], pred["y"][on], pred["frame"][on]
        # Lorentz factor: inverse rate at which the reciprocal point crosses the sphere.
        gc = hkl_on @ cr.UB.T
        phi = pred["phi"][on]
        m = g.goniometer_base[0]
        a = m[0] * gc[:, 0] + m[1] * gc[:, 1]
        b = -m[0] * gc[:, 1] + m[1] * gc[:, 0]
        rate = np.abs(-a * np.sin(np.radians(phi)) + b * np.cos(np.radians(phi)))
        lorentz = np.linalg.norm(gc, axis=1) / np.maximum(rate, 1e-3 * np.linalg.norm(gc, axis=1))
        lorentz = np.minimum(lorentz, 50.0)
        pol = self._polarization_factor(g.pixel_vectors(x, y))
        keys = map(tuple, np.round(hkl_on * 12).astype(np.int64))
        f2_on = np.fromiter((f2_of[k] for k in keys), dtype=np.float64, count=len(hkl_on))
        weight = f2_on * lorentz * pol
        # The strongest Bragg reflection of the crystal at the reference temperature has
        # max_intensity, so Debye-Waller factors change absolute intensities.
        bragg = np.all(hkl_on == np.rint(hkl_on), axis=1)
        ref = self._reference_crystal.intensity(hkl_on[bragg]) * lorentz[bragg] * pol[bragg]
        scale = self.max_intensity / ref.max() if len(ref) else 1.0
        intensity = weight * scale
        frame_index = np.clip(np.round(z).astype(int), 0, self.n_frames - 1)
        intensity_at_monitor = intensity * self._monitor[frame_index] / self.monitor_mean
        # Expected maximum pixel value: integrated counts x peak fractions in x, y, z.
        px = ndtr(0.5 / self.sigma_xy) - ndtr(-0.5 / self.sigma_xy)
        pz = ndtr(0.5 / self.sigma_frames) - ndtr(-0.5 / self.sigma_frames)
        peak_max = intensity_at_monitor * px * px * pz
        ny, nx = self.detector.shape
        xi = np.clip(np.round(x).astype(int), 0, nx - 1)
        yi = np.clip(np.round(y).astype(int), 0, ny - 1)
        peak_max = np.where(self.detector.mask[yi, xi] > 0, 0.0, peak_max)
        order = np.argsort(z, kind="stable")
        table = PeakTable(
            hkl_on[order],
            x[order],
            y[order],
            z[order],
            intensity_at_monitor[order],
            peak_max[order],
            pred["two_theta"][on][order],
        )
        logger.debug("simulated %d Bragg reflections on %d frames", len(table), self.n_frames)
        return table

    def _satellites(
        self, hkl: NDArray[np.float64], f2: NDArray[np.float64]
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """CDW satellites of the allowed reflections ``hkl`` and their ``|F|^2``."""
        if self.thermal is None or self.temperature is None:
            return np.zeros((0, 3)), np.zeros(0)
        positions, parent = self.thermal.satellites(hkl, self.temperature)
        if len(positions) == 0:
            return np.zeros((0, 3)), np.zeros(0)
        b = self.crystal.B
        s2_sat = np.sum((positions @ b.T) ** 2, axis=1) / 4.0
        s2_par = np.sum((hkl[parent] @ b.T) ** 2, axis=1) / 4.0
        dw = np.exp(-2.0 * self.crystal.b_iso * (s2_sat - s2_par))
        sat_f2 = f2[parent] * dw * self.thermal.satellite_factor(s2_sat, self.temperature)
        keep = sat_f2 > 1e-6 * f2.max()
        return positions[keep], sat_f2[keep]

    @property
    def order_parameter(self) -> float:
        """CDW order parameter at this simulator's temperature (0 without a CDW)."""
        if self.thermal is None or self.temperature is None:
            return 0.0
        return self.thermal.order_parameter(self.temperature)

    def _allowed(self) -> NDArray[np.bool_]:
        """Allowed reflections by ``(h, k, l) mod 6`` (centring absences have period 6)."""
        if self._allowed_table is None:
            grid = np.stack(np.meshgrid(*[np.arange(6)] * 3, indexing="ij"), -1).reshape(-1, 3)
            self._allowed_table = self.crystal.allowed(grid).reshape(6, 6, 6)
        return self._allowed_table

    # ------------------------------------------------------------------ frames
    def _ensure_pixel_cache(self) -> None:
        if self._background_image is not None:
            return
        g = self.geometry
        ny, nx = self.detector.shape
        yy, xx = np.mgrid[0:ny, 0:nx]
        s = g.pixel_vectors(xx, yy)
        tth = np.degrees(np.arccos(s[..., 0] / np.linalg.norm(s, axis=-1)))
        radial = 1.0 + 2.0 * np.exp(-tth / 4.0)
        # Solid angle of a flat pixel relative to the beam-centre pixel.
        cos_inc = np.abs(np.einsum("...i,i->...", s, g.Dinv @ g.O.T[:, 2]))
        solid = cos_inc * g.distance**2 / np.einsum("...i,...i->...", s, s) ** 1.5
        bg = self.background / 3.0 * radial * self._polarization_factor(s) * solid
        self._background_image = bg.astype(np.float32)
        if self.diffuse > 0 or self._tds_on:
            self._q_pixels = g.pixel_q_lab(xx, yy).reshape(-1, 3).astype(np.float32)

    @property
    def _tds_on(self) -> bool:
        return self.thermal is not None and self.thermal.tds > 0

    def expected(self, index: int) -> NDArray[np.float64]:
        """Expected (noise-free) counts of frame ``index``."""
        if not 0 <= index < self.n_frames:
            raise IndexError(f"frame {index} outside 0..{self.n_frames - 1}")
        self._ensure_pixel_cache()
        assert self._background_image is not None
        scale = float(self._monitor[index] / self.monitor_mean)
        img = np.empty(self.detector.shape, dtype=np.float64)
        g = self.geometry
        m = np.linalg.inv(self.crystal.UB) @ g.goniometer(g.phi(index)).T
        tds = 0.0
        if self._tds_on:
            assert self.thermal is not None and self.temperature is not None
            tds = self.thermal.tds * self.thermal.displacement_ratio(self.temperature)
        q = self._q_pixels if self._q_pixels is not None else np.zeros((0, 3), np.float32)
        _smooth_image(
            self._background_image.ravel(),
            q,
            np.ascontiguousarray(m),
            np.ascontiguousarray(self.crystal.B),
            self._allowed(),
            scale,
            self.diffuse,
            tds,
            self.thermal.tds_width**2 if self.thermal is not None else 1.0,
            2.0 * self.crystal.b_iso + 20.0,
            img.ravel(),
        )
        self._add_peaks(img, index)
        return img

    def _add_peaks(self, img: NDArray[np.float64], index: int) -> None:
        p = self.peaks
        reach = 5.0 * self.sigma_frames + 1.0
        lo, hi = np.searchsorted(p.z, [index - reach, index + reach])
        if hi <= lo:
            return
        ny, nx = img.shape
        half = int(math.ceil(5.0 * self.sigma_xy)) + 1
        sz, sxy = self.sigma_frames, self.sigma_xy
        for k in range(lo, hi):
            wz = ndtr((index + 0.5 - p.z[k]) / sz) - ndtr((index - 0.5 - p.z[k]) / sz)
            if wz < 1e-9:
                continue
            x0, y0 = int(round(p.x[k])), int(round(p.y[k]))
            xa, xb = max(0, x0 - half), min(nx, x0 + half + 1)
            ya, yb = max(0, y0 - half), min(ny, y0 + half + 1)
            if xa >= xb or ya >= yb:
                continue
            jx = np.arange(xa, xb)
            jy = np.arange(ya, yb)
            wx = ndtr((jx + 0.5 - p.x[k]) / sxy) - ndtr((jx - 0.5 - p.x[k]) / sxy)
            wy = ndtr((jy + 0.5 - p.y[k]) / sxy) - ndtr((jy - 0.5 - p.y[k]) / sxy)
            img[ya:yb, xa:xb] += p.intensity[k] * wz * np.outer(wy, wx)

    def frame(self, index: int) -> NDArray[np.int32]:
        """Counts of frame ``index`` (int32, Poisson noise, gaps = -1)."""
        rng = np.random.default_rng([self.seed, 104729, index])
        counts = rng.poisson(self.expected(index)).astype(np.int32)
        counts[self.detector.mask > 0] = -1
        return counts

    def frames(self, start: int = 0, stop: int | None = None) -> NDArray[np.int32]:
        """A block of frames ``[start, stop)`` as a 3-D int32 array."""
        stop = self.n_frames if stop is None else stop
        return np.stack([self.frame(i) for i in range(start, stop)])

    def write_stack(
        self,
        path: str | Path,
        *,
        dataset: str = "/entry/data/data",
        progress: bool = False,
        overwrite: bool = False,
        compression: str | None = None,
    ) -> Path:
        """Write all frames to an HDF5 stack (one frame per chunk), as a detector would.

        Refuses to overwrite an existing file unless ``overwrite`` is True.
        ``compression`` is a codec name (e.g. ``"bslz4"``) of
        :func:`nxrefine_bs.nexus.codecs.compression_options`; None writes raw frames.
        """
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; refusing to overwrite detector data")
        ny, nx = self.detector.shape
        with h5py.File(path, "w", libver="latest") as f:
            ds = f.create_dataset(
                dataset,
                shape=(self.n_frames, ny, nx),
                dtype=np.int32,
                chunks=(1, ny, nx),
                **compression_options(compression),
            )
            grp = f[dataset].parent
            grp.attrs["NX_class"] = "NXdata"
            grp.attrs["signal"] = dataset.rsplit("/", 1)[-1]
            f[dataset.split("/")[1]].attrs["NX_class"] = "NXentry"
            for i in tqdm(range(self.n_frames), disable=not progress, desc=path.name, unit="frame"):
                ds[i] = self.frame(i)
        return path
