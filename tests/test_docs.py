"""The user guide stays true: its tutorials run verbatim and its references are complete.

* The first-experiment tutorial (``docs/tutorials/first-experiment.md``) is run as a reader
  follows it, in a temporary directory with ``HOME`` and the server settings pointed into
  it: its ``bash`` blocks in order (``cd`` carries over from block to block, as the
  tutorial says), and every ``{code-block} python`` with a ``:caption: NAME.py`` is saved
  as ``NAME.py`` in the current directory when the reader reaches it
  (``docs/_scripts/tutorial_runner.py``, which the figure build uses too). ``nxrefine-bs``
  commands run through the console script's entry point in this process (as
  ``tests/test_readme.py`` does); ``python NAME.py`` runs in a real subprocess.
* The demo tutorial runs the same way with the README test's small preset appended to
  ``nxrefine-bs demo`` (slow: the demo itself is proven by ``tests/test_demo.py``).
* The generated reference tables (``docs/_scripts/reference_tables.py``) name every
  reduction parameter and every setting with its default, and the CLI reference parser
  (``docs/_scripts/cli_parser.py``) gives every option a default.

Building the HTML itself (``sphinx-build -W``) is a separate step of ``.ci/run``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import h5py
import pytest
from test_readme import DEMO_PRESET

DOCS = Path(__file__).resolve().parents[1] / "docs"
sys.path.insert(0, str(DOCS / "_scripts"))

import cli_parser  # noqa: E402  (docs/_scripts, the guide's build scripts)
import reference_tables  # noqa: E402
from tutorial_runner import run_tutorial, tutorial_steps, words  # noqa: E402

FIRST_EXPERIMENT = DOCS / "tutorials" / "first-experiment.md"
DEMO_TUTORIAL = DOCS / "tutorials" / "demo.md"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def reader(tmp_path, monkeypatch):
    """``(work, home)``: an empty directory to start from and the reader's HOME."""
    home = tmp_path / "home"
    home.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NXREFINE_BS_SETTINGS", str(tmp_path / "settings" / "settings.ini"))
    monkeypatch.delenv("NXREFINE_BS_EXPERIMENT", raising=False)
    monkeypatch.chdir(work)
    return work, home


def test_tutorial_blocks_are_found():
    steps = tutorial_steps(FIRST_EXPERIMENT.read_text())
    files = [s[1] for s in steps if s[0] == "file"]
    commands = [c for s in steps if s[0] == "bash" for c in s[1]]
    assert files == ["powder.py", "acquire.py"]
    assert len(commands) >= 15
    for word in ("experiment new", "configuration new", "calibrate", "sample new", "scan new",
                 "python acquire.py", "max", "find", "refine", "transform", "combine",
                 "plot-slice"):  # fmt: skip
        assert any(f"{word} " in c or c.endswith(word) for c in commands), word


def test_first_experiment_tutorial_runs_verbatim(reader):
    work, home = reader
    ran = run_tutorial(FIRST_EXPERIMENT.read_text(), home)
    assert len(ran) >= 15
    exp = work / "analysis" / "first" / "nxrefine"
    assert Path.cwd() == exp
    for png in ("hk0.png", "h0l.png", "calibration/calibration_cake.png"):
        assert (exp / png).read_bytes()[:8] == PNG, png
    with h5py.File(exp / "configurations" / "pilatus.nxs", "r") as f:
        assert "calibration" in f["f1/instrument"]
        assert abs(float(f["f1/instrument/detector/distance"][()]) - 200.0) < 1.0
    with h5py.File(exp / "demo" / "xtal1" / "demo_300K.nxs", "r") as f:
        assert f["f1/acquisition/status"][()].decode() == "success"
        assert f["f1/data/data"].shape[0] == 60
        assert f["f1/peaks/x"].shape[0] >= 10  # the tutorial says "about thirty"
        done = set(f["f1/nxworkflow"]) | set(f["entry/nxworkflow"])
        assert {"nxmax", "nxfind", "nxrefine", "nxtransform", "nxcombine"} <= done
        assert abs(float(f["entry/sample/unitcell_a"][()]) - 5.43) < 0.03
    assert (exp / "demo" / "xtal1" / "300K" / "transform.nxs").is_file()


@pytest.mark.slow
def test_demo_tutorial_runs(reader):
    work, home = reader
    ran = run_tutorial(DEMO_TUTORIAL.read_text(), home, extra_args={"demo": DEMO_PRESET})
    assert ran[0] == "nxrefine-bs demo demo-output"
    assert (work / "demo-output" / "demo" / "nxrefine" / "h0l.png").read_bytes()[:8] == PNG


# ----------------------------------------------------------------------- generated reference


def _row(markdown: str, name: str) -> list[str]:
    rows = [line for line in markdown.splitlines() if line.startswith(f"| `{name}` |")]
    assert rows, f"{name} missing from the table"
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


def test_every_reduction_parameter_has_a_row_with_default_and_units():
    from nxrefine_bs.reduce.parameters import STEP_PARAMETERS
    from nxrefine_bs.settings_schema import get_spec

    tables = reference_tables
    text = tables.parameters_markdown()
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    assert [s.split("`")[1] for s in sections] == list(STEP_PARAMETERS)
    for section, (step, params) in zip(sections, STEP_PARAMETERS.items(), strict=True):
        for p in params:
            cells = _row(section, p.name)
            assert len(cells) == 7, cells
            assert cells[3], f"{step}.{p.name}: no default"
            if p.setting and p.setting not in ("qmin", "qmax"):
                assert str(get_spec("nxreduce", p.setting).default) in cells[3] or cells[3] in (
                    "*(none)*",
                    "*(empty)*",
                ), (step, p.name, cells)
    assert _row(sections[0], "qmin")[5] == "1/Å"
    assert _row(text.split("## `refine`")[1], "polar_max")[5] == "deg"
    assert _row(text.split("## `find`")[1], "threshold")[3] == "`50000.0`"


def test_every_setting_has_a_row():
    from nxrefine_bs.settings_schema import SCHEMA

    tables = reference_tables
    text = tables.settings_markdown()
    for spec in SCHEMA:
        section = text.split(f"### `[{spec.section}]`")[1].split("###")[0]
        cells = _row(section, spec.key)
        assert cells[1] == spec.type_name
    assert _row(text.split("### `[nxrefine]`")[1], "distance")[3] == "mm"


def test_every_cli_option_shows_its_default():
    cli = cli_parser
    parser = cli.build_documented_parser()
    options = 0
    for command, sub in cli._subparsers(parser):
        for action in sub._actions:
            if not action.option_strings or isinstance(
                action, argparse._HelpAction | argparse._VersionAction
            ):
                continue
            options += 1
            shown = action.default not in (None, argparse.SUPPRESS)  # sphinx-argparse prints it
            text = (action.help or "").lower()
            assert shown or "default" in text or "required" in text, (command, action.dest)
    assert options > 150
    find = dict(cli._subparsers(parser))[("find",)]
    threshold = next(a for a in find._actions if a.dest == "threshold")
    assert "Default: 50000.0 from nxreduce.threshold; units: counts." in threshold.help


# ----------------------------------------------------------------------- how-to guides

HOWTO_COMMAND = re.compile(r"^\s*\$ (nxrefine-bs .*?)(?<!\\)$", flags=re.M | re.S)


def howto_commands() -> list[tuple[str, str]]:
    """``(page, command)`` for every ``$ nxrefine-bs ...`` line of the how-to guides.

    Continuation lines are joined; commands with a ``...`` placeholder are left out.
    """
    out = []
    for page in sorted((DOCS / "howto").glob("*.md")):
        text = re.sub(r"\\\n\s*", " ", page.read_text())
        for match in HOWTO_COMMAND.finditer(text):
            command = match[1].strip()
            if "..." not in command:
                out.append((page.name, command))
    return out


def test_howto_commands_parse():
    """The how-to guides need servers, beamlines or data, so their commands are not run;
    each is parsed by the real ``nxrefine-bs`` parser, so a renamed or removed option fails.
    """
    from nxrefine_bs.cli import build_parser

    commands = howto_commands()
    assert len(commands) >= 25
    pages = {page for page, _ in commands}
    assert {"writer.md", "tiled.md", "dask.md", "calibrate.md", "repair.md"} <= pages
    parser = build_parser()
    for page, command in commands:
        argv = words(command, Path("/home/reader"))
        assert len(argv) == 1, f"{page}: {command!r} chains commands"
        try:
            parser.parse_args(argv[0][1:])
        except SystemExit:
            pytest.fail(f"{page}: {command!r} does not parse")
