"""Set up a complete beamline session: RunEngine, devices, writer, reduction, Tiled.

Used by the IPython profile (``profiles/profile_sim``) and by ``nxrefine-bs demo``, so
both wire the callbacks the same way:

* :class:`~nxrefine_bs.callbacks.nexus_writer.NeXusScanWriter` (critical: raises);
* :class:`~nxrefine_bs.callbacks.reduction.PostScanReduction` (non-critical, optional);
* bluesky-tiled-plugins' ``TiledWriter`` into the experiment's embedded Tiled catalog
  (or the server named in settings), optional;
* a frame progress bar, optional.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bluesky import RunEngine

from .callbacks.nexus_writer import NeXusScanWriter
from .callbacks.progress import FrameProgress
from .callbacks.reduction import DEFAULT_STEPS, PostScanReduction
from .geometry import Geometry
from .simulation.crystal import SimCrystal
from .simulation.frames import DetectorModel

logger = logging.getLogger(__name__)

__all__ = ["BeamlineSession", "start_session"]


@dataclass
class BeamlineSession:
    """Everything a simulated-beamline session holds."""

    experiment_dir: Path
    RE: RunEngine
    devices: Any
    writer: NeXusScanWriter
    reduction: PostScanReduction | None = None
    tiled: Any | None = None
    progress: FrameProgress | None = None
    tokens: list[int] = field(default_factory=list)

    def close(self) -> None:
        """Wait for queued reduction, unsubscribe callbacks and close the catalog."""
        if self.reduction is not None:
            self.reduction.close()
        for token in self.tokens:
            self.RE.unsubscribe(token)
        self.tokens.clear()
        if self.progress is not None:
            self.progress.close()
        if self.tiled is not None:
            from .tiled.catalog import close_catalog

            close_catalog(self.tiled)
            self.tiled = None


def start_session(
    experiment_dir: str | Path,
    *,
    detector: str | DetectorModel = "small",
    geometry: Geometry | None = None,
    crystal: SimCrystal | None = None,
    seed: int = 0,
    reduce_steps: Sequence[str] = DEFAULT_STEPS,
    reduce_params: dict[str, Any] | None = None,
    tiled: bool | str = True,
    progress: bool = True,
    simulator_kwargs: dict[str, Any] | None = None,
    RE: RunEngine | None = None,
) -> BeamlineSession:
    """Create a RunEngine with the simulated beamline and every nxrefine-bs callback.

    Parameters
    ----------
    experiment_dir : path-like
        An existing experiment directory (``nxrefine-bs experiment new``).
    detector, geometry, crystal, seed
        Passed to :func:`nxrefine_bs.devices.make_sim_beamline`.
    reduce_steps : sequence of str
        Post-scan reduction steps (empty: no post-scan reduction).
    reduce_params : dict, optional
        Explicit parameters for the post-scan steps.
    tiled : bool or str
        True: archive runs in the experiment's embedded Tiled catalog; a string: a
        Tiled URI; False: no archive.
    progress : bool
        Show a frame progress bar.
    simulator_kwargs : dict, optional
        Extra :class:`~nxrefine_bs.simulation.frames.RotationSimulator` options.
    RE : RunEngine, optional
        Use an existing RunEngine (e.g. the one an IPython profile made).
    """
    from .devices import make_sim_beamline

    experiment_dir = Path(experiment_dir).absolute()
    RE = RE if RE is not None else RunEngine({})
    writer = NeXusScanWriter()
    session = BeamlineSession(experiment_dir, RE, None, writer)
    session.tokens.append(RE.subscribe(writer))
    if reduce_steps:
        session.reduction = PostScanReduction(reduce_steps, params=reduce_params)
        session.tokens.append(RE.subscribe(session.reduction))
    if tiled:
        from .tiled.catalog import archive_callback, open_catalog

        session.tiled = open_catalog(tiled if isinstance(tiled, str) else experiment_dir)
        session.tokens.append(RE.subscribe(archive_callback(session.tiled)))
    if progress:
        session.progress = FrameProgress()
        session.tokens.append(RE.subscribe(session.progress))
    session.devices = make_sim_beamline(
        experiment_dir,
        detector=detector,
        geometry=geometry,
        crystal=crystal,
        seed=seed,
        simulator_kwargs=simulator_kwargs,
    )
    logger.info("beamline session ready in %s", experiment_dir)
    return session
