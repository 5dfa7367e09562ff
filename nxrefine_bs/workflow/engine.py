"""Database engines: one lazily created engine per URL and process, retries, the schema.

* :func:`get_engine` -- the process's engine for a URL (created on first use, so an
  object holding only the URL costs nothing to send to a Dask worker);
  :func:`dispose_engines` closes their pooled connections.
* :func:`with_retry` -- re-run a transaction that met a locked SQLite database.
* :func:`ensure_schema` -- create the tables once per URL and process, safely when
  several processes open a fresh database at the same moment: PostgreSQL takes a
  transaction-level advisory lock around ``CREATE TABLE``, SQLite an immediate (write)
  transaction.

SQLite connections use WAL journaling and a busy timeout, and every transaction
starts with ``BEGIN IMMEDIATE`` so a writer never has to upgrade a read lock.  WAL
needs a local file system: workers on several hosts need a server database
(``postgresql+psycopg://...``).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import create_engine, event, insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from ..errors import WorkflowError
from .schema import SCHEMA_VERSION, Base, MetaRow

logger = logging.getLogger(__name__)

__all__ = ["dispose_engines", "ensure_schema", "get_engine", "is_locked", "with_retry"]

T = TypeVar("T")

ADVISORY_LOCK_ID = 0x6E78_7266  # "nxrf": serialises schema creation on PostgreSQL

_lock = threading.Lock()
_engines: dict[tuple[int, str, float], Engine] = {}
_schema_ready: set[tuple[int, str]] = set()


def is_locked(exc: OperationalError) -> bool:
    """True if an error says the (SQLite) database was locked or busy."""
    text = str(exc.orig if exc.orig is not None else exc).lower()
    return "locked" in text or "busy" in text


def normalise_url(url: str) -> str:
    """``postgresql://`` -> ``postgresql+psycopg://`` (the driver this project installs)."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def _make_engine(url: str, busy_timeout: float) -> Engine:
    if not url.startswith("sqlite"):
        # Small pools: every worker process holds its own engine.
        return create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=4)
    engine = create_engine(url, connect_args={"timeout": busy_timeout, "check_same_thread": False})
    memory = ":memory:" in url or url in ("sqlite://", "sqlite:///")

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy emit BEGIN itself (pysqlite's implicit BEGIN is DEFERRED).
        dbapi_connection.isolation_level = None
        cur = dbapi_connection.cursor()
        cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        if not memory:
            cur.execute("PRAGMA journal_mode = WAL")
            cur.execute("PRAGMA synchronous = NORMAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def get_engine(url: str, busy_timeout: float = 30.0) -> Engine:
    """The engine of this process for ``url`` (created on first call).

    Engines are never shared across a ``fork``: the process id is part of the key.
    """
    key = (os.getpid(), url, float(busy_timeout))
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            try:
                engine = _make_engine(url, busy_timeout)
            except Exception as exc:  # bad URL, driver missing
                raise WorkflowError(
                    f"cannot open workflow database {url}: {exc}; check [server] database "
                    "(a SQLAlchemy URL) and that its driver is installed"
                ) from exc
            _engines[key] = engine
        return engine


def dispose_engines(url: str | None = None) -> None:
    """Close the pooled connections of this process's engines (of ``url`` only if given)."""
    with _lock:
        for key, engine in list(_engines.items()):
            if key[0] == os.getpid() and (url is None or key[1] == url):
                engine.dispose()


def with_retry(fn: Callable[[], T], *, url: str, retries: int = 10) -> T:
    """Call ``fn``; retry with back-off while SQLite reports a locked database."""
    delay = 0.02
    for attempt in range(retries + 1):
        try:
            return fn()
        except OperationalError as exc:
            if not is_locked(exc):
                raise
            if attempt == retries:
                raise WorkflowError(
                    f"workflow database {url} stayed locked after {retries} retries; "
                    "is another process holding it open?"
                ) from exc
            logger.debug("database locked, retry %d: %s", attempt + 1, exc)
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 1.0)
    raise AssertionError("unreachable")  # pragma: no cover


def ensure_schema(engine: Engine, url: str, retries: int = 10) -> None:
    """Create the workflow tables if needed, once per process; check the schema version.

    Raises
    ------
    WorkflowError
        If the database holds another schema version.
    """
    key = (os.getpid(), url)
    if key in _schema_ready:
        return

    def create() -> str | None:
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK_ID})")
            Base.metadata.create_all(conn, checkfirst=True)
            version = conn.execute(
                select(MetaRow.value).where(MetaRow.key == "schema_version")
            ).scalar()
            if version is None:
                conn.execute(insert(MetaRow).values(key="schema_version", value=SCHEMA_VERSION))
            return version

    version = with_retry(create, url=url, retries=retries)
    if version is not None and version != SCHEMA_VERSION:
        raise WorkflowError(
            f"workflow database {url} has schema version {version}, this program writes "
            f"{SCHEMA_VERSION}; use a new database (or delete a local tasks/workflow.db) "
            "and rebuild it with 'nxrefine-bs workflow sync'"
        )
    _schema_ready.add(key)
