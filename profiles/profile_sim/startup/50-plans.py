"""nxrefine-bs simulated beamline profile, part 3: plans.

Rotation plans (:mod:`nxrefine_bs.plans.rotation`), reduction plans
(:mod:`nxrefine_bs.plans.reduction`) and the usual Bluesky plan modules, plus ``SCAN``:
the keyword arguments every rotation plan of this session shares (experiment directory
and configuration template)::

    RE(rotation_scan(bl, **SCAN, sample="demo", label="xtal1", scan="300K", phi_end=10))
    RE(multi_rotation_scan(bl, **SCAN, sample="demo", label="xtal1", scan="300K",
                           rotations=[{"omega": 0}, {"omega": 15}], phi_end=10))
    RE(temperature_series(bl, [300, 100], **SCAN, sample="demo", label="xtal1",
                          phi_end=10))
    RE(reduce_scan(writer.last_scan_file, ["max", "find"]))
"""

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
}
