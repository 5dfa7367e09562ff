"""Run a tutorial of the guide as a reader follows it.

Used by ``tests/test_docs.py`` (the tutorial stays true) and by ``make_figures.py`` (the
guide shows the PNGs the tutorial's own commands make).

The tutorial's ``bash`` blocks run in document order from one starting directory; ``cd``
carries over from block to block, as the tutorials say. A ``{code-block} python`` with a
``:caption: NAME.py`` is saved as ``NAME.py`` in the current directory when the reader
reaches it. ``nxrefine-bs`` commands run through the console script's entry point
(:func:`nxrefine_bs.cli.main`) in this process, ``python NAME.py`` in a subprocess.

Command line (a fresh ``HOME`` and server settings under WORKDIR)::

    python docs/_scripts/tutorial_runner.py docs/tutorials/first-experiment.md WORKDIR
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

BLOCK = re.compile(
    r"^```bash\n(?P<bash>.*?)^```"
    r"|^```\{code-block\} python\n:caption: (?P<name>[\w.-]+\.py)\n\n?(?P<code>.*?)^```",
    flags=re.S | re.M,
)
"""A ``bash`` block, or a Python file to save (``{code-block} python`` with a caption)."""


class TutorialError(RuntimeError):
    """A tutorial command failed; the message names it, the directory and its output."""


def tutorial_steps(text: str) -> list[tuple]:
    """``("bash", [commands])`` and ``("file", name, code)`` items in document order.

    Continuation lines (``\\`` at the end) are joined and blank lines dropped.
    """
    steps: list[tuple] = []
    for match in BLOCK.finditer(text):
        if match["bash"] is not None:
            joined = re.sub(r"\\\n\s*", " ", match["bash"])
            steps.append(("bash", [c.strip() for c in joined.splitlines() if c.strip()]))
        else:
            steps.append(("file", match["name"], match["code"]))
    return steps


def words(command: str, home: Path) -> list[list[str]]:
    """Split a command line into the argv lists joined by ``&&``; comments dropped, ``~``
    expanded to ``home``."""
    tokens = shlex.split(command, comments=True)
    tokens = [str(home) + t[1:] if t == "~" or t.startswith("~/") else t for t in tokens]
    argvs: list[list[str]] = [[]]
    for token in tokens:
        if token == "&&":
            argvs.append([])
        else:
            argvs[-1].append(token)
    return [a for a in argvs if a]


def run_tutorial(
    text: str, home: Path, *, extra_args: dict[str, Sequence[str]] | None = None
) -> list[str]:
    """Run a tutorial from the current directory; return the commands run.

    The current directory is where the tutorial's ``cd`` commands leave it.

    Parameters
    ----------
    text : str
        The tutorial's Markdown.
    home : Path
        The reader's home directory (``~``).
    extra_args : dict, optional
        ``{sub-command: arguments}`` appended to ``nxrefine-bs <sub-command>`` (e.g. a
        smaller demo).

    Raises
    ------
    TutorialError
        If a command is not one the runner knows or exits with a non-zero status.
    """
    from nxrefine_bs.cli import main

    ran: list[str] = []
    for step in tutorial_steps(text):
        if step[0] == "file":
            Path(step[1]).write_text(step[2])
            continue
        for command in step[1]:
            for argv in words(command, home):
                if argv[0] == "cd":
                    os.chdir(Path(argv[1]).expanduser())
                elif argv[0] == "python":
                    result = subprocess.run(
                        [sys.executable, *argv[1:]],
                        capture_output=True,
                        text=True,
                        timeout=600,
                        env={**os.environ, "HOME": str(home)},
                        check=False,
                    )
                    if result.returncode != 0:
                        raise TutorialError(f"{command!r} in {Path.cwd()}: {result.stderr[-3000:]}")
                elif argv[0] == "nxrefine-bs":
                    argv = [*argv, *(extra_args or {}).get(argv[1], ())]
                    out, err = io.StringIO(), io.StringIO()
                    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                        code = main(argv[1:])
                    if code != 0:
                        raise TutorialError(
                            f"{command!r} in {Path.cwd()} failed ({code}): "
                            f"{err.getvalue()[-3000:]}{out.getvalue()[-1000:]}"
                        )
                else:
                    raise TutorialError(f"tutorial command {command!r} is not handled")
            ran.append(command)
    return ran


def run_in(tutorial: Path, workdir: Path) -> Path:
    """Run ``tutorial`` from ``workdir`` with a fresh HOME and server settings there.

    Returns the directory the tutorial ends in.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    home = workdir / "home"
    home.mkdir(exist_ok=True)
    start = workdir / "work"
    start.mkdir(exist_ok=True)
    os.environ["HOME"] = str(home)
    os.environ["NXREFINE_BS_SETTINGS"] = str(workdir / "settings" / "settings.ini")
    os.environ.pop("NXREFINE_BS_EXPERIMENT", None)
    os.chdir(start)
    run_tutorial(tutorial.read_text(), home)
    return Path.cwd()


if __name__ == "__main__":  # pragma: no cover
    print(run_in(Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()))
