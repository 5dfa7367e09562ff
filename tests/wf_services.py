"""Real services for the workflow tests: a PostgreSQL server and a Dask cluster on 127.0.0.1.

Both are started as subprocesses in temporary directories and always cleaned up.

PostgreSQL refuses to run as root; when the tests run as root the server runs as an
unprivileged user (``postgres`` if it exists, else ``nobody``) through ``runuser``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent


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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unavailable(reason: str) -> None:
    """Skip with ``reason`` -- or fail under CI, where the service must exist."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: the CI script must provide it)")
    pytest.skip(reason)


# --------------------------------------------------------------------------- PostgreSQL


def find_pg_bin() -> Path | None:
    """Directory holding ``initdb`` and ``pg_ctl``: PATH, /usr/lib/postgresql/*/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True):
        return Path(candidate).parent
    return None


class PostgresServer:
    """A throw-away PostgreSQL server on 127.0.0.1 (trust authentication)."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="nxrbs-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            if runuser is None:
                shutil.rmtree(self.root, ignore_errors=True)
                _unavailable("running as root and runuser is missing: PostgreSQL cannot start")
            user = "postgres"
            try:
                pwd.getpwnam(user)
            except KeyError:
                user = "nobody"
            os.chown(self.root, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
            self.prefix = [runuser, "-u", user, "--"]
        self._databases = 0

    def _run(self, *args: str) -> None:
        subprocess.run(
            [*self.prefix, *args], check=True, capture_output=True, timeout=120, cwd=self.root
        )

    def start(self) -> None:
        self._run(
            str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
            "--no-sync", "-E", "UTF8",
        )  # fmt: skip
        options = (
            f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off "
            "-c max_connections=200 -c synchronous_commit=off"
        )
        self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", options,
            "-l", str(self.root / "log"), "-w", "-t", "60", "start",
        )  # fmt: skip

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        self._databases += 1
        name = f"nxrbs_{os.getpid()}_{self._databases}"
        with psycopg.connect(self.url().replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def connections(self, database: str) -> int:
        """Open client connections to ``database`` (not counting this query's)."""
        import psycopg

        with psycopg.connect(self.url().replace("+psycopg", ""), autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (database,)
            ).fetchone()
        return int(row[0])


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    bindir = find_pg_bin()
    if bindir is None:
        _unavailable(
            "PostgreSQL server binaries (initdb) not found on PATH or in "
            "/usr/lib/postgresql/*/bin; install the 'postgresql' OS package"
        )
    server = PostgresServer(bindir)
    try:
        server.start()
    except subprocess.CalledProcessError as exc:
        log = server.root / "log"
        text = log.read_text() if log.exists() else ""
        server.stop()
        _unavailable(f"PostgreSQL did not start: {exc.stderr!r} {text[-500:]}")
    try:
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------- Dask


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(TESTS_DIR), env.get("PYTHONPATH", "")) if p
    )
    env["DASK_DISTRIBUTED__WORKER__DAEMON"] = "False"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


class DaskCluster:
    """``dask scheduler`` plus ``dask worker`` processes (no nanny) on 127.0.0.1."""

    def __init__(self, root: Path, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.env = dict(env or {})
        self.scheduler_file = root / "scheduler.json"
        self.scheduler: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}
        self.address = ""
        self._count = 0

    def start(self, n_workers: int = 2) -> None:
        with open(self.root / "scheduler.log", "w") as log:
            self.scheduler = subprocess.Popen(
                [
                    sys.executable, "-m", "distributed.cli.dask_scheduler", "--host",
                    "127.0.0.1", "--port", "0", "--no-dashboard", "--scheduler-file",
                    str(self.scheduler_file),
                ],
                env=_env(self.env), stdout=subprocess.DEVNULL, stderr=log,
            )  # fmt: skip
        wait_until(self.scheduler_file.exists, 60, "the Dask scheduler file")
        import json

        self.address = wait_until(
            lambda: json.loads(self.scheduler_file.read_text() or "{}").get("address"),
            30,
            "the scheduler address",
        )
        for _ in range(n_workers):
            self.add_worker()
        self.wait_workers(n_workers)

    def add_worker(self) -> str:
        self._count += 1
        name = f"w{self._count}"
        with open(self.root / f"{name}.log", "w") as log:
            self.workers[name] = subprocess.Popen(
                [
                    sys.executable, "-m", "distributed.cli.dask_worker", self.address,
                    "--nthreads", "1", "--no-nanny", "--no-dashboard", "--name", name,
                    "--resources", "reduce_memory=1", "--death-timeout", "60",
                    "--local-directory", str(self.root / "scratch"),
                ],
                env=_env(self.env), stdout=subprocess.DEVNULL, stderr=log,
            )  # fmt: skip
        return name

    def client(self):
        from distributed import Client

        return Client(self.address, timeout="30s")

    def n_workers(self) -> int:
        with self.client() as c:
            return len(c.scheduler_info()["workers"])

    def wait_workers(self, n: int) -> None:
        with self.client() as c:
            c.wait_for_workers(n, timeout=120)

    def ensure_workers(self, n: int = 2) -> None:
        alive = {k: p for k, p in self.workers.items() if p.poll() is None}
        for name in set(self.workers) - set(alive):
            self.workers[name].wait()  # reap a worker a test killed
        self.workers = alive
        while len(self.workers) < n:
            self.add_worker()
        self.wait_workers(n)

    def scheduler_fds(self) -> int:
        assert self.scheduler is not None
        return len(os.listdir(f"/proc/{self.scheduler.pid}/fd"))

    def stop(self) -> None:
        procs = [*self.workers.values(), self.scheduler]
        for p in procs:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            if p is None:
                continue
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


def python_client(
    script: str, *, wait: bool = True, timeout: float = 120, env: dict[str, str] | None = None
):
    """Run ``script`` in a new Python process (tests dir importable); its Popen."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        env=_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if wait:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"client failed ({proc.returncode}):\n{out}\n{err}"
    return proc
