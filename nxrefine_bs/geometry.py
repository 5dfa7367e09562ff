"""Diffractometer geometry: detector pixels, goniometer rotations and reciprocal space.

Conventions (those of NXRefine; see ``docs/geometry.md``):

* Lab frame: +X along the incident beam, +Z up, +Y completing a right-handed set.
* Goniometer: ``G(phi) = Ry(theta) . Rz(omega) . Rx(chi) . Rz(phi)``; the frame index
  ``z`` maps to ``phi = phi_start + phi_step * z``.
* Detector orientation matrix ``O`` from a string of three signed lab axes, one per
  detector axis (x pixel, y pixel, normal): row *i* holds +-1 in the column of the lab
  axis parallel to detector axis *i*.  Default ``"-y +z -x"``.
* Detector tilt: ``Dinv = Rx(roll) . Ry(pitch) . Rz(yaw)``.
* Pixel ``(x, y)`` -> sample-to-pixel vector
  ``s = Dinv . O^T . p [x - xc, y - yc, 0] + [L, 0, 0] - G(phi) . [xs, ys, zs]``,
  scattering vector ``g_lab = (s_hat - x_hat) / lambda`` in 1/Angstrom *without* 2 pi,
  ``g_crystal = G(phi)^-1 . g_lab`` and ``hkl = (U B)^-1 . g_crystal``.
* ``B`` is the Busing-Levy matrix: ``B . hkl`` is the reciprocal-lattice vector in
  1/Angstrom (no 2 pi), with a* along x and b* in the xy plane.

All angles are in degrees, lengths in mm (detector) or Angstrom (crystal).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .errors import GeometryError

__all__ = [
    "rotation_x",
    "rotation_y",
    "rotation_z",
    "orientation_matrix",
    "b_matrix",
    "reciprocal_parameters",
    "cell_volume",
    "random_rotation",
    "Geometry",
    "GeometryError",
    "RUN_GEOMETRY_KEYS",
]

RUN_GEOMETRY_KEYS: tuple[str, ...] = (
    "wavelength",
    "distance",
    "pixel_size",
    "shape",
    "beam_center_x",
    "beam_center_y",
    "yaw",
    "pitch",
    "roll",
    "detector_orientation",
    "chi",
    "omega",
    "theta",
    "phi_start",
    "phi_step",
)
"""``Geometry`` fields recorded in a run's start document (``nxrefine.geometry``)."""

HC_KEV_ANGSTROM = 12.398419739640717
"""h*c in keV*Angstrom: energy (keV) = HC_KEV_ANGSTROM / wavelength (Angstrom)."""


def _rot(angle: ArrayLike, axis: int) -> NDArray[np.float64]:
    """Right-handed rotation(s) about lab axis ``axis`` by ``angle`` degrees.

    Returns an array of shape ``angle.shape + (3, 3)``.
    """
    a = np.radians(np.asarray(angle, dtype=np.float64))
    c, s = np.cos(a), np.sin(a)
    out = np.zeros(a.shape + (3, 3))
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    out[..., axis, axis] = 1.0
    out[..., i, i] = c
    out[..., j, j] = c
    out[..., i, j] = -s
    out[..., j, i] = s
    return out


def rotation_x(angle: ArrayLike) -> NDArray[np.float64]:
    """Rotation matrix about +X by ``angle`` degrees (right-handed)."""
    return _rot(angle, 0)


def rotation_y(angle: ArrayLike) -> NDArray[np.float64]:
    """Rotation matrix about +Y by ``angle`` degrees (right-handed)."""
    return _rot(angle, 1)


def rotation_z(angle: ArrayLike) -> NDArray[np.float64]:
    """Rotation matrix about +Z by ``angle`` degrees (right-handed)."""
    return _rot(angle, 2)


def orientation_matrix(spec: str | ArrayLike) -> NDArray[np.float64]:
    """Detector orientation matrix ``O`` from ``"-y +z -x"``-style text or a 3x3 array.

    Parameters
    ----------
    spec : str or array_like
        Three signed lab axes (``x``, ``y``, ``z``), one per detector axis (pixel x,
        pixel y, detector normal), or a 3x3 matrix.

    Returns
    -------
    numpy.ndarray
        Orthogonal 3x3 matrix whose row *i* is the lab direction of detector axis *i*.

    Examples
    --------
    >>> orientation_matrix("-y +z -x").astype(int).tolist()
    [[0, -1, 0], [0, 0, 1], [-1, 0, 0]]
    """
    if not isinstance(spec, str):
        m = np.asarray(spec, dtype=np.float64)
        if m.shape != (3, 3) or not np.allclose(m @ m.T, np.eye(3), atol=1e-6):
            raise GeometryError(
                f"detector orientation matrix must be an orthogonal 3x3 matrix, got {m.tolist()}"
            )
        return m
    tokens = spec.split()
    if len(tokens) != 3:
        raise GeometryError(
            f"detector orientation {spec!r} must name three signed axes, e.g. '-y +z -x'"
        )
    m = np.zeros((3, 3))
    for row, tok in enumerate(tokens):
        tok = tok.strip().lower()
        sign = -1.0 if tok.startswith("-") else 1.0
        name = tok.lstrip("+-")
        if name not in ("x", "y", "z"):
            raise GeometryError(
                f"detector orientation {spec!r}: {tok!r} is not one of +x, -x, +y, -y, +z, -z"
            )
        m[row, "xyz".index(name)] = sign
    if abs(abs(np.linalg.det(m)) - 1.0) > 1e-9:
        raise GeometryError(f"detector orientation {spec!r} repeats an axis")
    return m


def b_matrix(
    a: float, b: float, c: float, alpha: float, beta: float, gamma: float
) -> NDArray[np.float64]:
    """Busing-Levy B matrix (1/Angstrom, no 2 pi) of a unit cell.

    ``B @ [h, k, l]`` is the reciprocal-lattice vector in the crystal Cartesian frame
    (a* along x, b* in the xy plane).

    Examples
    --------
    >>> import numpy as np
    >>> np.allclose(b_matrix(4, 4, 4, 90, 90, 90), np.eye(3) / 4)
    True
    """
    ast, bst, cst, alst, best, gast = reciprocal_parameters(a, b, c, alpha, beta, gamma)
    alr = math.radians(alpha)
    best_r, gast_r = math.radians(best), math.radians(gast)
    return np.array(
        [
            [ast, bst * math.cos(gast_r), cst * math.cos(best_r)],
            [0.0, bst * math.sin(gast_r), -cst * math.sin(best_r) * math.cos(alr)],
            [0.0, 0.0, 1.0 / c],
        ]
    )


def cell_volume(a: float, b: float, c: float, alpha: float, beta: float, gamma: float) -> float:
    """Unit-cell volume in cubic Angstrom; raises :class:`GeometryError` if impossible."""
    ca, cb, cg = (math.cos(math.radians(x)) for x in (alpha, beta, gamma))
    v2 = 1 - ca * ca - cb * cb - cg * cg + 2 * ca * cb * cg
    if min(a, b, c) <= 0 or v2 <= 0:
        raise GeometryError(
            f"impossible unit cell a={a} b={b} c={c} alpha={alpha} beta={beta} gamma={gamma}"
        )
    return a * b * c * math.sqrt(v2)


def reciprocal_parameters(
    a: float, b: float, c: float, alpha: float, beta: float, gamma: float
) -> tuple[float, float, float, float, float, float]:
    """Reciprocal cell ``(a*, b*, c*, alpha*, beta*, gamma*)``, lengths in 1/Angstrom (no 2 pi)."""
    v = cell_volume(a, b, c, alpha, beta, gamma)
    al, be, ga = (math.radians(x) for x in (alpha, beta, gamma))
    ast = b * c * math.sin(al) / v
    bst = a * c * math.sin(be) / v
    cst = a * b * math.sin(ga) / v

    def _angle(x: float, y: float, z: float) -> float:
        return math.degrees(
            math.acos(
                np.clip(
                    (math.cos(y) * math.cos(z) - math.cos(x)) / (math.sin(y) * math.sin(z)), -1, 1
                )
            )
        )

    return ast, bst, cst, _angle(al, be, ga), _angle(be, al, ga), _angle(ga, al, be)


def random_rotation(rng: np.random.Generator) -> NDArray[np.float64]:
    """A uniformly distributed random rotation matrix (for simulations and tests)."""
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


@dataclass(frozen=True)
class Geometry:
    """Complete diffractometer geometry of one rotation (one ``fN`` entry).

    Parameters
    ----------
    wavelength : float
        X-ray wavelength in Angstrom.
    distance : float
        Sample-to-detector distance in mm (along the beam, before tilts).
    pixel_size : float
        Pixel size in mm (square pixels).
    shape : tuple of int
        Detector shape ``(ny, nx)``.
    beam_center_x, beam_center_y : float
        Direct-beam position in pixels.
    yaw, pitch, roll : float
        Detector tilts in degrees.
    detector_orientation : str
        Signed lab axes of the detector axes, e.g. ``"-y +z -x"``.
    chi, omega, theta : float
        Goniometer angles in degrees.
    phi_start, phi_step : float
        Rotation angle of frame 0 and the step per frame, degrees.
    xs, ys, zs : float
        Sample offset from the goniometer centre in mm.
    """

    wavelength: float = 0.2
    distance: float = 500.0
    pixel_size: float = 0.172
    shape: tuple[int, int] = (1679, 1475)
    beam_center_x: float = 737.0
    beam_center_y: float = 839.0
    yaw: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0
    detector_orientation: str = "-y +z -x"
    chi: float = 0.0
    omega: float = 0.0
    theta: float = 0.0
    phi_start: float = -5.0
    phi_step: float = 0.1
    xs: float = 0.0
    ys: float = 0.0
    zs: float = 0.0
    _cache: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.wavelength <= 0 or self.distance <= 0 or self.pixel_size <= 0:
            raise GeometryError(
                "wavelength, distance and pixel_size must be positive, got "
                f"{self.wavelength}, {self.distance}, {self.pixel_size}"
            )
        if len(self.shape) != 2 or min(self.shape) <= 0:
            raise GeometryError(f"detector shape must be (ny, nx) > 0, got {self.shape}")
        object.__setattr__(self, "shape", (int(self.shape[0]), int(self.shape[1])))
        orientation_matrix(self.detector_orientation)  # validate early

    def replace(self, **changes: Any) -> Geometry:
        """Return a copy with some parameters changed."""
        return replace(self, **changes)

    # ------------------------------------------------------------------ matrices
    @property
    def energy(self) -> float:
        """Photon energy in keV."""
        return HC_KEV_ANGSTROM / self.wavelength

    @property
    def O(self) -> NDArray[np.float64]:  # noqa: E743 - the conventional name
        """Detector orientation matrix."""
        return orientation_matrix(self.detector_orientation)

    @property
    def Dinv(self) -> NDArray[np.float64]:
        """Detector tilt matrix ``Rx(roll) Ry(pitch) Rz(yaw)``."""
        return rotation_x(self.roll) @ rotation_y(self.pitch) @ rotation_z(self.yaw)

    @property
    def goniometer_base(self) -> NDArray[np.float64]:
        """``Ry(theta) Rz(omega) Rx(chi)``: the goniometer matrix without phi."""
        return rotation_y(self.theta) @ rotation_z(self.omega) @ rotation_x(self.chi)

    def goniometer(self, phi: ArrayLike) -> NDArray[np.float64]:
        """Goniometer matrix ``G(phi)`` for one or many phi values (degrees)."""
        return self.goniometer_base @ rotation_z(phi)

    def phi(self, frame: ArrayLike) -> NDArray[np.float64]:
        """Rotation angle (degrees) of a (fractional) frame index."""
        return self.phi_start + self.phi_step * np.asarray(frame, dtype=np.float64)

    def frame(self, phi: ArrayLike) -> NDArray[np.float64]:
        """Fractional frame index of a rotation angle (degrees)."""
        return (np.asarray(phi, dtype=np.float64) - self.phi_start) / self.phi_step

    @property
    def detector_axes(self) -> tuple[NDArray, NDArray, NDArray]:
        """Lab vectors ``(ex, ey, origin)``: mm per pixel along x and y, and the beam centre."""
        m = self.Dinv @ self.O.T * self.pixel_size
        return m[:, 0], m[:, 1], np.array([self.distance, 0.0, 0.0])

    # ------------------------------------------------------------------ pixels -> Q
    def pixel_vectors(self, x: ArrayLike, y: ArrayLike) -> NDArray[np.float64]:
        """Sample-to-pixel vectors in mm (lab frame, no sample offset), shape ``(..., 3)``."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        ex, ey, origin = self.detector_axes
        dx = (x - self.beam_center_x)[..., None]
        dy = (y - self.beam_center_y)[..., None]
        return dx * ex + dy * ey + origin

    def pixel_q_lab(self, x: ArrayLike, y: ArrayLike) -> NDArray[np.float64]:
        """Scattering vectors ``(s_hat - x_hat)/lambda`` (1/Angstrom); sample offset ignored."""
        s = self.pixel_vectors(x, y)
        s = s / np.linalg.norm(s, axis=-1, keepdims=True)
        s[..., 0] -= 1.0
        return s / self.wavelength

    def two_theta(self, x: ArrayLike, y: ArrayLike) -> NDArray[np.float64]:
        """Scattering angle 2-theta (degrees) of pixels."""
        s = self.pixel_vectors(x, y)
        cos2t = s[..., 0] / np.linalg.norm(s, axis=-1)
        return np.degrees(np.arccos(np.clip(cos2t, -1.0, 1.0)))

    def azimuth(self, x: ArrayLike, y: ArrayLike) -> NDArray[np.float64]:
        """Azimuthal angle (degrees) of pixels around the beam: ``atan2(-s_y, s_z)``."""
        s = self.pixel_vectors(x, y)
        return np.degrees(np.arctan2(-s[..., 1], s[..., 2]))

    def q_to_hkl(self, q_lab: ArrayLike, phi: ArrayLike, ub: ArrayLike) -> NDArray[np.float64]:
        """Miller indices of lab scattering vectors ``q_lab`` measured at angle ``phi``."""
        q_lab = np.asarray(q_lab, dtype=np.float64)
        ginv = np.swapaxes(self.goniometer(phi), -1, -2)
        qc = np.einsum("...ij,...j->...i", ginv, q_lab)
        return qc @ np.linalg.inv(np.asarray(ub, dtype=np.float64)).T

    def pixel_to_hkl(
        self, x: ArrayLike, y: ArrayLike, z: ArrayLike, ub: ArrayLike
    ) -> NDArray[np.float64]:
        """Miller indices of detector positions ``(x, y)`` at (fractional) frame ``z``.

        Includes the sample offset ``(xs, ys, zs)``.
        """
        x, y, z = np.broadcast_arrays(
            np.asarray(x, float), np.asarray(y, float), np.asarray(z, float)
        )
        phi = self.phi(z)
        g = self.goniometer(phi)
        s = self.pixel_vectors(x, y)
        if self.xs or self.ys or self.zs:
            s = s - np.einsum("...ij,j->...i", g, np.array([self.xs, self.ys, self.zs]))
        s = s / np.linalg.norm(s, axis=-1, keepdims=True)
        s[..., 0] -= 1.0
        q = s / self.wavelength
        qc = np.einsum("...ji,...j->...i", g, q)  # G^T q
        return qc @ np.linalg.inv(np.asarray(ub, dtype=np.float64)).T

    # ------------------------------------------------------------------ HKL -> pixels
    def predict(self, hkl: ArrayLike, ub: ArrayLike) -> dict[str, NDArray[Any]]:
        """Predict where reflections ``hkl`` cross the Ewald sphere and hit the detector.

        The sample offset is ignored.  Every reflection has up to two diffracting
        positions per full turn; both are returned.

        Parameters
        ----------
        hkl : array_like, shape (n, 3)
            Miller indices.
        ub : array_like, shape (3, 3)
            Orientation matrix ``U @ B``.

        Returns
        -------
        dict
            Arrays of equal length ``m``: ``hkl`` (m, 3), ``phi`` (degrees, in
            [phi_start, phi_start + 360)), ``frame`` (fractional), ``x``, ``y``
            (pixels, may lie off the detector), ``two_theta`` (degrees) and
            ``on_detector`` (bool, inside the detector shape and in front of it).
        """
        hkl = np.atleast_2d(np.asarray(hkl, dtype=np.float64))
        gc = hkl @ np.asarray(ub, dtype=np.float64).T
        g2 = np.einsum("ij,ij->i", gc, gc)
        m = self.goniometer_base[0]
        # (M Rz(phi) gc)_x = A cos(phi) + B sin(phi) + C must equal -lambda |g|^2 / 2
        A = m[0] * gc[:, 0] + m[1] * gc[:, 1]
        B = -m[0] * gc[:, 1] + m[1] * gc[:, 0]
        C = m[2] * gc[:, 2]
        target = -0.5 * self.wavelength * g2
        R = np.hypot(A, B)
        with np.errstate(invalid="ignore", divide="ignore"):
            cosarg = (target - C) / R
        ok = (R > 0) & (np.abs(cosarg) <= 1.0) & (g2 > 0)
        delta = np.arctan2(B, A)
        acos = np.arccos(np.clip(cosarg, -1.0, 1.0))
        phis, idx = [], []
        for sign in (1.0, -1.0):
            phi = np.degrees(delta + sign * acos)
            phi = (phi - self.phi_start) % 360.0 + self.phi_start
            phis.append(phi[ok])
            idx.append(np.nonzero(ok)[0])
        phi = np.concatenate(phis)
        sel = np.concatenate(idx)
        g_lab = np.einsum("nij,nj->ni", self.goniometer(phi), gc[sel])
        k_out = g_lab.copy()
        k_out[:, 0] += 1.0 / self.wavelength
        ex, ey, origin = self.detector_axes
        # Solve t*k = origin + dx*ex + dy*ey for (t, dx, dy).
        mat = np.empty((len(sel), 3, 3))
        mat[:, :, 0] = k_out
        mat[:, :, 1] = -ex
        mat[:, :, 2] = -ey
        det = np.linalg.det(mat)
        good = np.abs(det) > 1e-12
        sol = np.full((len(sel), 3), np.nan)
        if good.any():
            sol[good] = np.linalg.solve(
                mat[good], np.broadcast_to(origin, (good.sum(), 3))[..., None]
            )[..., 0]
        t, dx, dy = sol[:, 0], sol[:, 1], sol[:, 2]
        x = dx + self.beam_center_x
        y = dy + self.beam_center_y
        ny, nx = self.shape
        with np.errstate(invalid="ignore"):
            on = good & (t > 0) & (x >= 0) & (x <= nx - 1) & (y >= 0) & (y <= ny - 1)
        two_theta = np.degrees(np.arccos(np.clip(k_out[:, 0] * self.wavelength, -1.0, 1.0)))
        return {
            "hkl": hkl[sel],
            "phi": phi,
            "frame": self.frame(phi),
            "x": x,
            "y": y,
            "two_theta": two_theta,
            "on_detector": on,
        }

    # ------------------------------------------------------------------ limits
    def max_two_theta(self) -> float:
        """Largest 2-theta (degrees) reached by any detector corner."""
        ny, nx = self.shape
        xs = np.array([0, nx - 1, 0, nx - 1], float)
        ys = np.array([0, 0, ny - 1, ny - 1], float)
        return float(self.two_theta(xs, ys).max())

    def q_max(self) -> float:
        """Largest ``|Q| = 2 sin(theta)/lambda`` (1/Angstrom, no 2 pi) on the detector."""
        return 2.0 * math.sin(math.radians(self.max_two_theta() / 2)) / self.wavelength


def all_hkl(d_min: float, b: NDArray[np.float64]) -> NDArray[np.int64]:
    """Every Miller index (except 000) with d-spacing >= ``d_min`` for B matrix ``b``."""
    inv = np.linalg.inv(b)
    # |h_i| <= |row_i of B^-1| / d_min bounds the box.
    hmax = np.ceil(np.linalg.norm(inv, axis=1) / d_min).astype(int)
    r = [np.arange(-m, m + 1) for m in hmax]
    hkl = np.stack(np.meshgrid(*r, indexing="ij"), axis=-1).reshape(-1, 3)
    q = np.linalg.norm(hkl @ b.T, axis=1)
    keep = (q > 0) & (q <= 1.0 / d_min)
    return hkl[keep]


def as_vector(values: Sequence[float] | NDArray) -> NDArray[np.float64]:
    """Convert a 3-sequence into a float64 vector (helper for typed callers)."""
    v = np.asarray(values, dtype=np.float64)
    if v.shape != (3,):
        raise GeometryError(f"expected a 3-vector, got shape {v.shape}")
    return v
