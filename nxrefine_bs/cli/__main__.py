"""``python -m nxrefine_bs.cli``: the ``nxrefine-bs`` command."""

from . import main

raise SystemExit(main())
