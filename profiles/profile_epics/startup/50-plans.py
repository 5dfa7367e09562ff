"""nxrefine-bs EPICS beamline profile, part 3: the same plans as ``profile_sim``.

``SCAN`` holds the keyword arguments every rotation plan of this session shares:
experiment directory, configuration template and the frame period
(``NXREFINE_BS_FRAME_TIME``, default 0.1 s; real detectors have no default)::

    RE(temperature_series(bl, [300, 250], **SCAN, sample="demo", label="xtal1",
                          phi_start=0, phi_end=10, phi_step=0.5))
"""

import os

import bluesky.plan_stubs as bps  # noqa: F401
import bluesky.plans as bp  # noqa: F401
import bluesky.preprocessors as bpp  # noqa: F401

from nxrefine_bs.plans import (  # noqa: F401
    frame_count,
    multi_rotation_scan,
    rotation_scan,
    step_rotation_scan,
    temperature_series,
)
from nxrefine_bs.plans.reduction import (  # noqa: F401
    combine,
    find_maximum,
    find_peaks,
    prepare_mask,
    reduce_scan,
    refine_orientation,
    transform,
)

SCAN = {
    "experiment_dir": EXPERIMENT_DIR,  # noqa: F821  (00-base.py)
    "configuration": CONFIGURATION,  # noqa: F821
    "frame_time": float(os.environ.get("NXREFINE_BS_FRAME_TIME", "0.1")),
}
