"""Sphinx configuration of the nxrefine-bs user guide.

Build it with ``sphinx-build -W --keep-going -b html docs docs/_build/html`` (the
``docs`` extra installs everything it needs).  Generated parts follow the code:

* ``_scripts/reference_tables.py`` writes the reduction-parameter and settings tables
  (from :data:`nxrefine_bs.reduce.parameters.STEP_PARAMETERS` and
  :data:`nxrefine_bs.settings_schema.SCHEMA`) into ``_generated/``;
* ``_scripts/make_figures.py`` runs a small seeded simulation and draws the figures
  into ``_generated/`` (cached: it reruns only when its inputs changed);
* the CLI reference is generated from :func:`nxrefine_bs.cli.build_parser` by
  sphinx-argparse, the API reference from docstrings by autodoc and numpydoc.

No network is needed: no intersphinx, and the link check ignores external links.
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_scripts"))

project = "nxrefine-bs"
author = "nxrefine-bs developers"
copyright = "2026, nxrefine-bs developers"  # noqa: A001

try:
    from nxrefine_bs import __version__ as release
except ImportError:  # pragma: no cover - the package is installed for the build
    release = "unknown"
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "numpydoc",
    "sphinxarg.ext",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "_scripts", "Thumbs.db", ".DS_Store", "_generated/*.md"]
templates_path: list[str] = []

myst_enable_extensions = ["colon_fence", "deflist", "dollarmath", "attrs_inline"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"nxrefine-bs {release}"
html_static_path: list[str] = []

autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
autodoc_member_order = "bysource"
autodoc_typehints = "none"
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
numpydoc_validation_checks: set[str] = set()

# Only links inside the guide are checked; CI has no network.
linkcheck_ignore = [r"https?://.*", r"mailto:.*"]
linkcheck_anchors = True


def _generate(app) -> None:  # noqa: ANN001 - sphinx application
    """Write the generated tables and figures before the sources are read."""
    import make_figures
    import reference_tables

    out = DOCS / "_generated"
    reference_tables.write_all(out)
    make_figures.main(out)


def setup(app):  # noqa: ANN001, ANN201 - sphinx hook
    app.connect("builder-inited", _generate)
    return {"parallel_read_safe": True}
