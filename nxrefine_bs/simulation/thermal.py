"""Temperature in the simulation: Debye-Waller factors, thermal diffuse scattering and a
charge-density-wave (CDW) superlattice.

:class:`ThermalModel` describes how a :class:`~nxrefine_bs.simulation.crystal.SimCrystal`
changes with temperature ``T``:

* **Debye-Waller factor.**  The mean-square displacement of an atom vibrating as a
  quantum oscillator of (Einstein) temperature ``theta`` is
  ``<u^2>(T) ∝ coth(theta / 2T)``: proportional to ``T`` when hot, the zero-point value
  when cold.  The isotropic ``B = 8 pi^2 <u^2>`` of the crystal applies at
  ``reference_temperature`` and scales with that ratio; Bragg intensities carry
  ``exp(-2 B s^2)`` with ``s = sin(theta)/lambda``.
* **Thermal diffuse scattering (TDS).**  The intensity the Debye-Waller factor removes
  from the Bragg peaks reappears as one-phonon scattering around every allowed
  reciprocal-lattice point ``G``: ``∝ <u^2>(T) |Q|^2 f(Q)^2 exp(-2 B s^2) / (|q|^2 +
  kappa^2)`` with ``q = Q - G`` (acoustic phonons), so it grows with ``T``.
* **Thermal expansion.**  Cell lengths scale by ``1 + expansion (T - reference)``.
* **CDW superlattice.**  Below ``cdw_tc`` a periodic lattice distortion of amplitude
  ``cdw_amplitude * eta(T)`` with wave vectors ``cdw_vectors`` (``(1/2, 0, 1/2)``-type,
  as in 1T-TiSe2 below about 200 K) produces satellite reflections at ``G ± q``.  The
  order parameter is ``eta(T) = (1 - T/Tc)^beta`` (zero above ``Tc``); to first order
  a satellite has ``|F|^2 = |F(G)|^2 (pi |Q| u)^2 exp(-2 B s^2)`` with ``|Q| = 2 s``
  in 1/Angstrom (no ``2 pi``), so satellite intensities follow ``eta^2``.

Examples
--------
>>> model = ThermalModel(cdw_tc=200.0)
>>> model.order_parameter(250.0), round(model.order_parameter(100.0), 3)
(0.0, 0.785)
>>> round(model.b_iso(0.5, 100.0), 3) < 0.5 < round(model.b_iso(0.5, 400.0), 3)
True
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from ..errors import NXRefineBSError

logger = logging.getLogger(__name__)

__all__ = ["ThermalModel", "CDW_VECTORS"]

CDW_VECTORS: tuple[tuple[float, float, float], ...] = (
    (0.5, 0.0, 0.5),
    (0.0, 0.5, 0.5),
    (0.5, 0.5, 0.0),
)
"""The three ``(1/2, 0, 1/2)``-type wave vectors (domains) of the simulated CDW."""


@dataclass(frozen=True)
class ThermalModel:
    """How the simulated crystal changes with temperature (see the module docstring).

    Parameters
    ----------
    reference_temperature : float
        Temperature (K) at which the crystal's ``b_iso`` and ``cell`` apply.
    einstein_temperature : float
        ``theta`` (K) of ``<u^2> ∝ coth(theta / 2T)``.
    expansion : float
        Linear thermal-expansion coefficient (1/K).
    tds : float
        Thermal diffuse scattering: counts per pixel next to a Bragg peak at ``|Q| =
        1/Angstrom`` and the reference temperature (0 disables it).
    tds_width : float
        ``kappa`` (1/Angstrom, no ``2 pi``): the TDS cloud's half width.
    cdw_tc : float or None
        CDW transition temperature (K); None: no CDW.
    cdw_beta : float
        Critical exponent of the order parameter.
    cdw_amplitude : float
        Displacement amplitude (Angstrom) of the fully ordered CDW.
    cdw_vectors : tuple of 3-tuples
        CDW wave vectors in reciprocal-lattice units; satellites sit at ``G ± q``.
    """

    reference_temperature: float = 300.0
    einstein_temperature: float = 250.0
    expansion: float = 0.0
    tds: float = 0.0
    tds_width: float = 0.03
    cdw_tc: float | None = None
    cdw_beta: float = 0.35
    cdw_amplitude: float = 0.08
    cdw_vectors: tuple[tuple[float, float, float], ...] = CDW_VECTORS

    def __post_init__(self) -> None:
        for name in ("reference_temperature", "einstein_temperature", "tds_width"):
            if not getattr(self, name) > 0:
                raise NXRefineBSError(f"ThermalModel.{name} must be > 0, got {getattr(self, name)}")
        if self.tds < 0 or self.cdw_amplitude < 0 or self.cdw_beta <= 0:
            raise NXRefineBSError(
                "ThermalModel: tds and cdw_amplitude must be >= 0 and cdw_beta > 0"
            )
        if self.cdw_tc is not None and not self.cdw_tc > 0:
            raise NXRefineBSError(f"ThermalModel.cdw_tc must be > 0 K, got {self.cdw_tc}")
        vectors = np.asarray(self.cdw_vectors, dtype=np.float64).reshape(-1, 3)
        if np.any(np.all(np.isclose(vectors, np.round(vectors)), axis=1)):
            raise NXRefineBSError(
                "ThermalModel.cdw_vectors must be incommensurate with the lattice "
                "(not integer), e.g. (0.5, 0, 0.5)"
            )

    # ------------------------------------------------------------------ scalars
    @staticmethod
    def _check_temperature(temperature: float) -> float:
        t = float(temperature)
        if not (math.isfinite(t) and t > 0):
            raise NXRefineBSError(f"temperature must be a finite number > 0 K, got {temperature}")
        return t

    def displacement_ratio(self, temperature: float) -> float:
        """``<u^2>(T) / <u^2>(reference)`` of the Einstein model."""
        t = self._check_temperature(temperature)

        def coth_term(x: float) -> float:
            return 1.0 / math.tanh(self.einstein_temperature / (2.0 * x))

        return coth_term(t) / coth_term(self.reference_temperature)

    def b_iso(self, b_reference: float, temperature: float) -> float:
        """Isotropic B (square Angstrom) at ``temperature`` from its reference value."""
        return float(b_reference) * self.displacement_ratio(temperature)

    def cell(
        self, cell: tuple[float, float, float, float, float, float], temperature: float
    ) -> tuple[float, float, float, float, float, float]:
        """The unit cell at ``temperature`` (lengths expanded, angles unchanged)."""
        t = self._check_temperature(temperature)
        f = 1.0 + self.expansion * (t - self.reference_temperature)
        a, b, c, alpha, beta, gamma = (float(v) for v in cell)
        return (a * f, b * f, c * f, alpha, beta, gamma)

    def order_parameter(self, temperature: float) -> float:
        """CDW order parameter ``eta(T)`` in [0, 1]: ``(1 - T/Tc)^beta`` below ``Tc``."""
        t = self._check_temperature(temperature)
        if self.cdw_tc is None or t >= self.cdw_tc:
            return 0.0
        return float((1.0 - t / self.cdw_tc) ** self.cdw_beta)

    # ------------------------------------------------------------------ satellites
    def satellites(
        self, hkl: NDArray[np.float64], temperature: float
    ) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
        """Satellite positions ``G ± q`` of the parent reflections ``hkl``.

        Returns
        -------
        positions : ndarray, shape (m, 3)
            Fractional Miller indices of the satellites (none above ``Tc``).
        parent : ndarray of int, shape (m,)
            Row of ``hkl`` each satellite belongs to.
        """
        hkl = np.atleast_2d(np.asarray(hkl, dtype=np.float64))
        if self.order_parameter(temperature) <= 0.0 or len(hkl) == 0:
            return np.zeros((0, 3)), np.zeros(0, dtype=np.int64)
        q = np.asarray(self.cdw_vectors, dtype=np.float64).reshape(-1, 3)
        q = np.concatenate([q, -q])
        positions = (hkl[:, None, :] + q[None, :, :]).reshape(-1, 3)
        parent = np.repeat(np.arange(len(hkl)), len(q))
        # A satellite reachable from two parents is one reflection: keep the first.
        _, first = np.unique(np.round(positions * 12).astype(np.int64), axis=0, return_index=True)
        first = np.sort(first)
        return positions[first], parent[first]

    def satellite_factor(self, s2: NDArray[np.float64], temperature: float) -> NDArray[np.float64]:
        """``(pi |Q| u)^2`` of satellites at ``s^2 = (sin(theta)/lambda)^2``."""
        u = self.cdw_amplitude * self.order_parameter(temperature)
        q = 2.0 * np.sqrt(np.asarray(s2, dtype=np.float64))
        return (np.pi * q * u) ** 2
