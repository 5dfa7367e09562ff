"""The one locked, crash-consistent write path for shared NeXus files (scan files, parents).

Two guarantees, for every writer (the NeXus writer callback, reduction steps,
calibration, masks, settings):

* **Mutual exclusion that NeXpy and NXRefine understand.**  :func:`locked` takes the
  same ``<file>.lock`` file that nexusformat's :class:`~nexusformat.nexus.lock.NXLock`
  uses (created with ``O_CREAT | O_EXCL``, holding ``pid@host``, in nexusformat's lock
  directory if one is configured), so NXRefine/NeXpy writers wait for us and we wait
  for them.  A lock left by a process that died on this host is recognised as stale at
  once (NXLock alone would wait for its 8-hour expiry).
* **Copy-on-write updates.**  :func:`atomic_update` lets the caller modify an in-memory
  image of the file, writes the image to a temporary file in the same directory,
  flushes it to disk and renames it over the original.  A crash (kill -9) or a full
  disk at any instant leaves
  either the old or the new content, never a truncated HDF5 file; readers holding the
  old file open never block the update (they keep reading the old inode).

Only small files are updated this way: scan files hold links, per-frame scalars and
peak tables (kB-MB); frames and transforms live in their own files.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
from nexusformat.nexus.lock import NXLock

from ..errors import ScanFileError

__all__ = [
    "LOCK_TIMEOUT",
    "ScanFileLock",
    "locked",
    "atomic_update",
    "ensure_free_space",
    "fsync_path",
    "remove_stale_temporaries",
    "removing_on_error",
]

logger = logging.getLogger(__name__)

LOCK_TIMEOUT = 60.0
"""Default seconds :func:`locked` waits for another holder before giving up."""

FREE_SPACE_MARGIN = 1024**2
"""Bytes kept free on top of what an update needs (HDF5 metadata, other writers)."""

_TMP_TAG = ".nxrbs-tmp"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ScanFileLock(NXLock):
    """nexusformat's ``NXLock`` with prompt polling and dead-holder detection.

    Parameters
    ----------
    filename : path-like
        File to protect (it need not exist).
    timeout : float or None
        Seconds to wait; ``None`` waits forever (logging who holds the lock every 30 s).
    """

    def __init__(self, filename: str | os.PathLike[str], timeout: float | None = LOCK_TIMEOUT):
        super().__init__(filename, timeout=0 if timeout is None else timeout, expiry=28800)
        self.wait_forever = timeout is None
        self.timeout_s = timeout
        # Threads of one process must not share a lock file: make the owner unique.
        self.addr = f"{os.getpid()}@{socket.gethostname()}"

    def holder(self) -> str:
        """The ``pid@host`` written in the lock file ('' if none or unreadable)."""
        try:
            return self.lock_file.read_text(errors="replace").strip()
        except OSError:
            return ""

    def holder_is_dead(self) -> bool:
        """True if the lock file names a process of this host that no longer exists."""
        pid, _, host = self.holder().partition("@")
        if not pid.isdigit() or host != socket.gethostname():
            return False
        return int(pid) != os.getpid() and not _pid_alive(int(pid))

    def acquire(
        self,
        timeout: float | None = None,
        check_interval: float | None = None,
        expiry: float | None = None,
    ) -> None:
        """Take the lock, waiting for other holders (see the class docstring)."""
        del timeout, check_interval, expiry
        start = time.monotonic()
        next_report = start + 30.0
        poll = 0.005
        while True:
            try:
                fd = os.open(self.lock_file, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666)
            except FileExistsError:
                pass
            except OSError as exc:
                raise ScanFileError(
                    f"cannot create the lock file {self.lock_file}: {exc}; check that its "
                    "directory is writable"
                ) from exc
            else:
                try:
                    os.write(fd, self.addr.encode())
                except OSError as exc:
                    os.close(fd)
                    with contextlib.suppress(OSError):
                        os.unlink(self.lock_file)
                    raise ScanFileError(
                        f"cannot write the lock file {self.lock_file}: {exc}"
                    ) from exc
                self.fd = fd
                return
            if self.holder_is_dead() or self.is_stale(self.expiry):
                logger.warning(
                    "removing stale lock %s (holder %s is gone)", self.lock_file, self.holder()
                )
                with contextlib.suppress(OSError):
                    os.unlink(self.lock_file)
                continue
            now = time.monotonic()
            if not self.wait_forever and now - start > float(self.timeout_s or 0):
                raise ScanFileError(
                    f"timed out after {self.timeout_s:g} s waiting for the lock on "
                    f"{self.filename} (held by {self.holder() or 'unknown'}, lock file "
                    f"{self.lock_file}); close the file in NeXpy/NXRefine or, if no process "
                    "holds it, delete the lock file"
                )
            if now > next_report:
                logger.warning(
                    "still waiting for the lock on %s held by %s",
                    self.filename,
                    self.holder() or "unknown",
                )
                next_report = now + 30.0
            time.sleep(poll)
            poll = min(poll * 2, 0.1)


_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


def _thread_lock(path: Path) -> threading.Lock:
    key = str(path.resolve())
    with _thread_locks_guard:
        return _thread_locks.setdefault(key, threading.Lock())


@contextlib.contextmanager
def locked(
    path: str | os.PathLike[str], *, timeout: float | None = LOCK_TIMEOUT
) -> Iterator[Path]:
    """Hold the NXLock-compatible lock on ``path`` in this block.

    Parameters
    ----------
    path : path-like
        The file to protect (it need not exist).
    timeout : float or None
        Seconds to wait for the lock; ``None`` waits as long as it takes.

    Raises
    ------
    ScanFileError
        If the lock is not obtained in time (the message names the holder).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as d:
    ...     with locked(pathlib.Path(d) / "a.nxs") as p:
    ...         p.with_name("a.nxs.lock").exists()
    True
    """
    path = Path(path)
    tlock = _thread_lock(path)
    if not tlock.acquire(timeout=-1 if timeout is None else timeout):
        raise ScanFileError(f"timed out after {timeout:g} s waiting for the lock on {path}")
    try:
        lock = ScanFileLock(path, timeout=timeout)
        lock.acquire()
        try:
            yield path
        finally:
            lock.release()
    finally:
        tlock.release()


def fsync_path(path: Path) -> None:
    """Flush a file (or directory entry) to disk."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems refuse fsync on directories
        if exc.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def ensure_free_space(directory: Path, needed: int, what: str) -> None:
    """Refuse up front when ``directory`` lacks ``needed`` bytes (plus a margin).

    Raises
    ------
    ScanFileError
        With the sizes and what to do.
    """
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return
    if free < needed + FREE_SPACE_MARGIN:
        raise ScanFileError(
            f"not enough disk space to {what}: {free / 1e6:.1f} MB free in {directory}, "
            f"{(needed + FREE_SPACE_MARGIN) / 1e6:.1f} MB needed; free some space and retry "
            "(nothing was changed)"
        )


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete temporary copies of ``path`` left by processes that died mid-update."""
    removed = []
    for tmp in path.parent.glob(f".{path.name}.*{_TMP_TAG}"):
        pid = tmp.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
    return removed


@contextlib.contextmanager
def atomic_update(
    path: str | os.PathLike[str],
    *,
    create: bool = False,
    timeout: float | None = LOCK_TIMEOUT,
    extra_bytes: int = 0,
) -> Iterator[h5py.File]:
    """Modify an HDF5 file copy-on-write, under its lock.

    Parameters
    ----------
    path : path-like
        The file to update.
    create : bool
        Create the file if it does not exist (otherwise that is an error).
    timeout : float or None
        Seconds to wait for the lock (``None``: as long as it takes).
    extra_bytes : int
        Bytes the update is expected to add (checked against free space up front).

    Yields
    ------
    h5py.File
        The temporary copy, open for writing; it replaces ``path`` when the block ends
        without an exception.

    Raises
    ------
    ScanFileError
        If the file is missing, the disk lacks space, or writing fails (the original is
        then unchanged and the temporary copy removed).
    """
    path = Path(path)
    with locked(path, timeout=timeout):
        exists = path.exists()
        if not exists and not create:
            raise ScanFileError(f"scan file {path} does not exist")
        remove_stale_temporaries(path)
        size = path.stat().st_size if exists else 0
        ensure_free_space(path.parent, 2 * size + extra_bytes, f"update {path}")
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}{_TMP_TAG}")
        try:
            if exists:
                shutil.copyfile(path, tmp)
            # HDF5 works on an in-memory image (the core driver, no backing store): it
            # never writes to disk itself, so a full disk shows up as a plain OSError in
            # the write below, never inside HDF5 (where it can leave the library in a
            # state that crashes the process later).  The image's file name is the
            # temporary's, in the same directory, so relative links come out right.
            f = h5py.File(tmp, "r+" if exists else "w", driver="core", backing_store=False)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise _write_error(path, exc) from exc
        try:
            try:
                yield f
                f.flush()
                image = f.id.get_file_image()
            finally:
                f.close()
            with open(tmp, "wb") as out:
                out.write(image)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
            fsync_path(path.parent)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise _write_error(path, exc) from exc
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise


@contextlib.contextmanager
def removing_on_error(*paths: str | os.PathLike[str]) -> Iterator[None]:
    """Delete ``paths`` (temporary outputs) if the block raises, then re-raise.

    Reduction steps write their outputs to ``<name>.part`` and rename them when complete;
    this makes sure a failure (a full disk, an interrupt) leaves no partial file behind.
    """
    try:
        yield
    except BaseException:
        for p in paths:
            with contextlib.suppress(OSError):
                Path(p).unlink()
        raise


def _write_error(path: Path, exc: OSError) -> ScanFileError:
    if exc.errno == errno.ENOSPC or "No space" in str(exc):
        return ScanFileError(
            f"disk full while updating {path}; the file keeps its previous content. "
            "Free some space and rerun the step (or 'nxrefine-bs repair')."
        )
    return ScanFileError(f"cannot update {path}: {exc}; the file keeps its previous content")
