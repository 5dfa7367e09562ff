"""A real ``tiled serve`` on 127.0.0.1 for the tests, started as a subprocess.

:class:`TiledServer` runs the ``tiled`` command line of the virtual environment on a
free port with a persistent SQLite catalog in a temporary directory (so a killed and
restarted server keeps what it had), waits for it by polling its HTTP endpoint, and
always kills it at the end.  Two flavours:

* ``exporter=False``: a stock ``tiled serve catalog CATALOG --init -w DATA -w duckdb:///..
  -r READ --api-key K`` (no ``application/json-seq`` exporter: ``documents()`` gets 406);
* ``exporter=True``: ``tiled serve config CONFIG`` with the same catalog plus, verbatim,
  the ``media_types`` entry that ``nxrefine-bs replay`` tells users to add
  (:data:`nxrefine_bs.tiled.replay.SERVER_CONFIG_HINT`), so the replay test proves it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
import pytest

from nxrefine_bs.tiled.replay import SERVER_CONFIG_HINT

API_KEY = "nxrefinebstestkey0123"
START_TIMEOUT = 120.0
"""Seconds a server may take to answer (a loaded 2-core CI machine is slow to import)."""


def wait_until(condition: Callable[[], object], timeout: float, what: str, poll: float = 0.1):
    """Poll ``condition`` until it returns something true; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tiled_command() -> list[str]:
    exe = Path(sys.executable).with_name("tiled")
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "tiled"]


class TiledServer:
    """One ``tiled serve`` subprocess (see the module docstring).

    Parameters
    ----------
    directory : Path
        Holds the catalog (``catalog.db``, ``data/``, ``tables.duckdb``), the config
        file and the server log.
    readable : sequence of Path
        Directories the server may read detector files from (the experiment).
    exporter : bool
        Register the json-seq exporter (served from a config file).
    """

    def __init__(self, directory: Path, readable: Sequence[Path], *, exporter: bool) -> None:
        self.directory = directory
        self.readable = [Path(p).absolute() for p in readable]
        self.exporter = exporter
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.api_key = API_KEY
        self.proc: subprocess.Popen[bytes] | None = None
        self._initialised = False
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "data").mkdir(exist_ok=True)

    def _command(self) -> list[str]:
        d = self.directory
        if self.exporter:
            config = d / "config.yml"
            readable = "".join(f"\n        - {p}" for p in self.readable)
            config.write_text(
                f"""\
authentication:
  single_user_api_key: {self.api_key}
trees:
  - path: /
    tree: catalog
    args:
      uri: sqlite:///{d / "catalog.db"}
      init_if_not_exists: true
      writable_storage:
        - {d / "data"}
        - duckdb:///{d / "tables.duckdb"}
      readable_storage:{readable}
{SERVER_CONFIG_HINT}
""",
                encoding="utf-8",
            )
            return [*_tiled_command(), "serve", "config", str(config),
                    "--host", "127.0.0.1", "--port", str(self.port)]  # fmt: skip
        cmd = [*_tiled_command(), "serve", "catalog", str(d / "catalog.db")]
        if not self._initialised:
            cmd.append("--init")
        cmd += ["-w", str(d / "data"), "-w", f"duckdb:///{d / 'tables.duckdb'}"]
        for p in self.readable:
            cmd += ["-r", str(p)]
        cmd += ["--api-key", self.api_key, "--host", "127.0.0.1", "--port", str(self.port)]
        return cmd

    def start(self) -> TiledServer:
        """Start the server and wait until it answers on its port."""
        log = open(self.directory / "server.log", "ab")  # noqa: SIM115 (owned by Popen)
        env = {**os.environ, "TILED_SINGLE_USER_API_KEY": self.api_key}
        self.proc = subprocess.Popen(
            self._command(), stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )  # fmt: skip
        log.close()
        self._initialised = True
        wait_until(self._answers, START_TIMEOUT, f"tiled serve on port {self.port}", poll=0.2)
        return self

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            pytest.fail(
                f"tiled serve exited with {self.proc.returncode}:\n"
                + (self.directory / "server.log").read_text(errors="replace")[-3000:]
            )
        try:
            response = httpx.get(f"{self.uri}/api/v1/", timeout=2.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    def kill(self) -> None:
        """kill -9 the server (and its children) and wait for it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc = None

    def client(self):
        """A Tiled client of the server's root."""
        from tiled.client import from_uri

        return from_uri(self.uri, api_key=self.api_key)


def start_server(directory: Path, readable: Sequence[Path], *, exporter: bool) -> TiledServer:
    """Start a :class:`TiledServer` (the caller must :meth:`~TiledServer.kill` it)."""
    return TiledServer(directory, readable, exporter=exporter).start()
