"""Every command of the README's ``bash`` blocks works verbatim.

The blocks are read from ``README.md`` and run in order in a temporary directory, each
block starting there (as the README says), with ``HOME`` and the server settings pointed
into it.  ``nxrefine-bs`` commands run through the console script's entry point
(``nxrefine_bs.cli:main``) in this process, so the whole README costs one import; the
command the issue found failing in a shell (``--position -90,0``) also runs through
``bash`` and the installed ``nxrefine-bs`` script.  ``cd`` changes the directory for the
rest of its block; ``~`` is expanded as the shell does.

Skipped, with the reason: :data:`SKIPPED_COMMANDS` (installers, the test suite itself,
interactive and long-running programs) and :data:`SKIPPED_BLOCKS` (blocks that need
servers on the network).  The demo runs with :data:`DEMO_PRESET` appended (one rotation
of 90 frames at 100 K instead of 2 x 3 x 180 frames): the README states what the full
demo costs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import h5py
import pytest

from nxrefine_bs.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"

SKIPPED_COMMANDS: dict[str, str] = {
    "pip install": "installs the package; CI installs it before running the tests",
    "pytest": "the test suite itself (it would run this test again)",
    "ipython": "starts an interactive IPython session; the profile is tested by "
    "tests/test_profile.py",
    "NXREFINE_BS_EXPERIMENT=": "starts an interactive IPython session (see above)",
    "EPICS_CA_ADDR_LIST=": "starts an interactive IPython session on EPICS devices; the "
    "profile is tested against the simulated IOC by tests/test_epics.py",
    "nxrefine-bs proxy": "a 0MQ proxy server that runs until stopped; the out-of-process "
    "writer is tested through a real proxy by tests/test_faults.py",
    "nxrefine-bs writer": "a document server that runs until stopped (see above)",
    "nxrefine-bs ioc": "a Channel Access server that runs until stopped; tests/test_epics.py "
    "starts it on a private port",
    "nxrefine-bs replay http": "needs a running Tiled server with its API key; replay from "
    "a served catalog is tested by tests/test_replay.py",
}
"""Command prefix -> why the command is not run here."""

SKIPPED_BLOCKS: dict[str, str] = {
    "server.dask_scheduler": "points the server settings at a Dask scheduler and a "
    "PostgreSQL server on the network (tcp://scheduler:8786, dbhost); the cluster path is "
    "tested with a local cluster in tests/test_workflow_cluster.py",
}
"""Text in a block -> why that block is not run here."""

DEMO_PRESET = ["--temperatures", "100", "--omegas", "0", "--phi", "0,90,1", "--no-progress"]
"""Appended to ``nxrefine-bs demo``: a small run (see the module docstring)."""

SHELL_COMMANDS = ("nxrefine-bs configuration new",)
"""Commands also run through bash and the installed console script."""


def readme_blocks(text: str) -> list[list[str]]:
    """The commands of every ``bash`` block: continuation lines joined, blanks dropped."""
    blocks = []
    for body in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        joined = re.sub(r"\\\n\s*", " ", body)
        blocks.append([line.strip() for line in joined.splitlines() if line.strip()])
    return blocks


def skip_reason(command: str) -> str | None:
    """Why ``command`` is not run, or None."""
    for prefix, reason in SKIPPED_COMMANDS.items():
        if command.startswith(prefix):
            return reason
    return None


def words(command: str, home: Path) -> list[list[str]]:
    """Split a command line into the argv lists joined by ``&&``; comments dropped."""
    tokens = shlex.split(command, comments=True)
    tokens = [str(home) + t[1:] if t == "~" or t.startswith("~/") else t for t in tokens]
    argvs: list[list[str]] = [[]]
    for token in tokens:
        if token == "&&":
            argvs.append([])
        else:
            argvs[-1].append(token)
    return [a for a in argvs if a]


def test_readme_blocks_are_found():
    blocks = readme_blocks(README.read_text())
    commands = [c for block in blocks for c in block]
    assert len(blocks) >= 8 and len(commands) >= 25
    assert "nxrefine-bs demo demo-output" in commands
    assert any("--position -90,0" in c for c in commands)
    assert not any("EXPERIMENT_DIR" in c for c in commands)  # no placeholders


def test_every_readme_command_works(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    home.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NXREFINE_BS_SETTINGS", str(tmp_path / "settings" / "settings.ini"))
    monkeypatch.delenv("NXREFINE_BS_EXPERIMENT", raising=False)
    ran, skipped = [], []
    for block in readme_blocks(README.read_text()):
        block_reason = next(
            (r for key, r in SKIPPED_BLOCKS.items() if key in "\n".join(block)), None
        )
        monkeypatch.chdir(work)
        for command in block:
            reason = block_reason or skip_reason(command)
            if reason:
                skipped.append((command, reason))
                continue
            for argv in words(command, home):
                if argv[0] == "cd":
                    os.chdir(Path(argv[1]).expanduser())
                    continue
                assert argv[0] == "nxrefine-bs", f"README command {command!r} is not handled"
                if argv[1] == "demo":
                    argv = [*argv, *DEMO_PRESET]
                code = main(argv[1:])
                out, err = capsys.readouterr()
                assert code == 0, f"{command!r} in {Path.cwd()} failed ({code}): {err}{out}"
                if command.startswith(SHELL_COMMANDS):
                    _run_in_bash(command, home)
                ran.append(command)
    assert len(ran) >= 20, ran
    assert {c for c, _ in skipped} <= {c for c in _all_commands() if c not in ran}
    _check_results(work, home)


def _all_commands() -> list[str]:
    return [c for block in readme_blocks(README.read_text()) for c in block]


def _run_in_bash(command: str, home: Path) -> None:
    """Run ``command`` again through bash and the installed script (with --overwrite)."""
    script = shutil.which("nxrefine-bs")
    if script is None:  # pragma: no cover - the package is always installed for tests
        pytest.fail("the nxrefine-bs console script is not installed")
    result = subprocess.run(
        ["bash", "-e", "-c", f"{command} --overwrite"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HOME": str(home)},
        check=False,
    )
    assert result.returncode == 0, f"bash: {command}: {result.stderr}"


def _check_results(work: Path, home: Path) -> None:
    """What the README's commands should have left behind."""
    exp = home / "analysis" / "myexp" / "nxrefine"
    config = exp / "configurations" / "pilatus.nxs"
    with h5py.File(config, "r") as f:
        chis = sorted(float(f[e]["instrument/goniometer/chi"][()]) for e in ("f1", "f2", "f3"))
        omegas = sorted(float(f[e]["instrument/goniometer/omega"][()]) for e in ("f1", "f2", "f3"))
    assert chis == [-90.0] * 3 and omegas == [-15.0, 0.0, 15.0]
    assert (exp / "TiSe2" / "xtal1" / "TiSe2_300K.nxs").is_file()
    demo = work / "demo-output" / "demo" / "nxrefine"
    assert "threshold = 20000" in (demo / "tasks" / "settings.ini").read_text()
    assert (demo / "hk0.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (demo / "demo" / "xtal1" / "100K" / "transform.nxs").is_file()


def test_demo_summary_as_json(tmp_path, monkeypatch, capsys):
    """``--phi -5,...`` (a negative first value) works, and ``--json`` is complete JSON."""
    monkeypatch.setenv("NXREFINE_BS_SETTINGS", str(tmp_path / "settings.ini"))
    argv = ["demo", str(tmp_path), "--temperatures", "300", "--omegas", "0", "--phi", "-5,0,1",
            "--no-reduce", "--no-tiled", "--no-progress", "--json"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["scan_files"] == [str(tmp_path / "demo/nxrefine/demo/xtal1/demo_300K.nxs")]
    with h5py.File(result["scan_files"][0], "r") as f:
        assert f["f1/data/data"].shape[0] == 5
