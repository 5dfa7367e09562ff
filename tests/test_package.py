"""Package-level contracts: lazy callbacks, light imports, py.typed, one error hierarchy."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import nxrefine_bs
from nxrefine_bs import errors

PACKAGE = Path(nxrefine_bs.__file__).parent

# Error classes still defined outside errors.py, and why.
ERRORS_ELSEWHERE = {
    # internal retry marker of the task runner (an OSError the workflow retries); never
    # raised to users
    ("workflow/task.py", "TransientIOError"),
}


def test_callbacks_export_lazily_without_heavy_imports():
    code = (
        "import sys\n"
        "import nxrefine_bs.callbacks as cb\n"
        "heavy = ('bluesky', 'h5py', 'event_model', 'ophyd_async')\n"
        "heavy = [m for m in heavy if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "from nxrefine_bs.callbacks import NeXusScanWriter, PostScanReduction, FrameProgress\n"
        "from nxrefine_bs.callbacks import NonCritical, BeamlineRunEngine\n"
        "from nxrefine_bs.callbacks.nexus_writer import NeXusScanWriter as W\n"
        "assert NeXusScanWriter is W\n"
        "assert set(cb.__all__) <= set(dir(cb))\n"
        "try:\n"
        "    cb.Nothing\n"
        "except AttributeError as exc:\n"
        "    assert 'Nothing' in str(exc)\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_py_typed_is_shipped():
    assert (PACKAGE / "py.typed").is_file()
    pyproject = (PACKAGE.parent / "pyproject.toml").read_text()
    assert 'nxrefine_bs = ["py.typed"]' in pyproject


def _exception_classes(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            names = [
                b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases
            ]
            if any(n.endswith(("Error", "Exception")) for n in names):
                out.append(node.name)
    return out


def test_every_error_class_lives_in_errors_py():
    found = set()
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "errors.py":
            continue
        found.update((rel, name) for name in _exception_classes(path))
    assert found == ERRORS_ELSEWHERE
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.NXRefineBSError) and cls.__module__ == errors.__name__


# Heavy or optional dependencies that importing the package must not load: each is
# imported inside the functions that use it, with a "# heavy: ..." comment
# (docs/architecture.md, "Imports").
HEAVY = (
    "matplotlib",
    "tiled",
    "bluesky_tiled_plugins",
    "dask",
    "distributed",
    "zmq",
    "pyFAI",
    "silx",
    "caproto",
    "aioca",
    "IPython",
    "xrayutilities",
    "spec2nexus",
    "scipy.signal",  # ~1 s to import
)

# What most users import, the modules that keep a heavy import local, and (through
# build_parser, which imports every command module) what `nxrefine-bs --help` loads.
LIGHT_MODULES = (
    "nxrefine_bs",
    "nxrefine_bs.cli",
    "nxrefine_bs.settings",
    "nxrefine_bs.experiment",
    "nxrefine_bs.geometry",
    "nxrefine_bs.pyfai_geometry",
    "nxrefine_bs.plots",
    "nxrefine_bs.nexus.scanfile",
    "nxrefine_bs.nexus.geometry_io",
    "nxrefine_bs.reduce.steps",
    "nxrefine_bs.calibration",
    "nxrefine_bs.callbacks",
    "nxrefine_bs.callbacks.nexus_writer",
    "nxrefine_bs.tiled",
    "nxrefine_bs.workflow.executor",
    "nxrefine_bs.workflow.queue",
)


def _modules_after(modules: tuple[str, ...], then: str = "") -> set[str]:
    """``sys.modules`` of a fresh interpreter after importing ``modules`` (and running ``then``)."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {list(modules)!r}:\n"
        "    importlib.import_module(name)\n"
        f"{then}"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_light_imports():
    loaded = _modules_after(
        LIGHT_MODULES, "from nxrefine_bs.cli import build_parser\nbuild_parser()\n"
    )
    assert {"nxrefine_bs", "numpy"} <= loaded  # the check sees what was imported
    assert sorted(loaded & set(HEAVY)) == []


def test_session_imports_no_optional_subsystem():
    # A session needs bluesky, ophyd and h5py, but Tiled, Dask, 0MQ, pyFAI and
    # matplotlib only when they are used (a catalog, the Dask executor, a remote
    # writer, a detector mask, a plot).
    loaded = _modules_after(("nxrefine_bs.session", "nxrefine_bs.demo"))
    assert {"bluesky", "ophyd_async", "h5py"} <= loaded
    optional = {"matplotlib", "tiled", "bluesky_tiled_plugins", "dask", "distributed", "zmq"}
    assert sorted(loaded & (optional | {"pyFAI", "scipy.signal"})) == []
