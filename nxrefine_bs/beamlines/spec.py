"""A small reader of SPEC data files (the text logs written by the SPEC control program).

Only what a beamline import needs is read:

* ``#S n command`` starts scan ``n``;
* ``#D date`` gives the date of the file (before the first scan) or of a scan;
* ``#O<k> names...`` (file header) name the motors, ``#P<k> values...`` (in a scan)
  give their positions at the start of the scan, in the same order;
* ``#L labels`` names the data columns (labels are separated by two spaces, as SPEC
  writes them, so a label may hold single spaces);
* ``#T`` / ``#M`` give the counting time or monitor preset;
* lines not starting with ``#`` inside a scan are data rows of numbers.

Other ``#`` lines (``#C`` comments, ``#G``, ``#Q``, ``#N``, ``#@``...) and blank lines
are kept as raw header text or ignored; lines starting with ``@`` (MCA data) are skipped.
Malformed content raises :class:`SpecFileError` naming the file and line.

Examples
--------
>>> import tempfile, pathlib
>>> text = '''#F demo
... #D Tue Oct 10 12:00:00 2023
... #O0 phi  chi  th
...
... #S 1  flyangle phi 0 1 2 0.1
... #D Tue Oct 10 12:01:00 2023
... #P0 0 90 1.5
... #L phi  flyc1
... 0 1000
... 0.5 1010
... '''
>>> with tempfile.TemporaryDirectory() as d:
...     path = pathlib.Path(d) / "demo"
...     _ = path.write_text(text)
...     spec = read_spec(path)
>>> scan = spec.scan(1)
>>> scan.command, scan.positioners["chi"], scan.column("flyc1").tolist()
('flyangle phi 0 1 2 0.1', 90.0, [1000.0, 1010.0])
>>> scan.start_time
'2023-10-10T12:01:00'
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from ..errors import MetadataError

__all__ = ["SpecFileError", "SpecScan", "SpecFile", "read_spec", "parse_spec_date"]

logger = logging.getLogger(__name__)

SPEC_DATE_FORMAT = "%a %b %d %H:%M:%S %Y"
"""How SPEC writes ``#D`` dates, e.g. ``Tue Oct 10 12:00:00 2023``."""

_CONTROL = re.compile(r"^#([A-Za-z@]+)(\d*)(?:\s+(.*))?$")


class SpecFileError(MetadataError):
    """A SPEC file is missing, unreadable or malformed (the message names file and line)."""


def parse_spec_date(text: str) -> datetime | None:
    """Parse a SPEC ``#D`` date (``Tue Oct 10 12:00:00 2023``); None if it is not one.

    Extra white space (SPEC pads single-digit days) is accepted, and so is ISO 8601.

    Examples
    --------
    >>> parse_spec_date("Mon Oct  2 09:05:00 2023").isoformat()
    '2023-10-02T09:05:00'
    >>> parse_spec_date("yesterday") is None
    True
    """
    clean = " ".join(str(text).split())
    try:
        return datetime.strptime(clean, SPEC_DATE_FORMAT)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(clean)
    except ValueError:
        return None


@dataclass
class SpecScan:
    """One ``#S`` block of a SPEC file.

    Attributes
    ----------
    number : int
        The scan number of ``#S``.
    command : str
        The scan command (the rest of the ``#S`` line).
    line : int
        Line number (1-based) of the ``#S`` line.
    date : str or None
        The scan's ``#D`` text (else the file's).
    labels : list of str
        Column labels of ``#L``.
    data : numpy.ndarray
        ``(rows, columns)`` float64 data.
    positioners : dict
        Motor name -> position at the start of the scan (``#O``/``#P``).
    count_time : float or None
        ``#T`` counting time (seconds per point), if given.
    comments : list of str
        ``#C`` lines of the scan.
    header : dict
        Other control lines, ``{"G0": "...", ...}`` (last one wins).
    """

    number: int
    command: str
    line: int
    date: str | None = None
    labels: list[str] = field(default_factory=list)
    data: NDArray[np.float64] = field(default_factory=lambda: np.zeros((0, 0)))
    positioners: dict[str, float] = field(default_factory=dict)
    count_time: float | None = None
    comments: list[str] = field(default_factory=list)
    header: dict[str, str] = field(default_factory=dict)
    path: Path | None = None

    @property
    def nrows(self) -> int:
        """Number of data rows."""
        return int(self.data.shape[0])

    @property
    def where(self) -> str:
        """``'<file>, scan <n> (line <k>)'`` for messages."""
        return f"{self.path}, scan {self.number} (line {self.line})"

    def has_column(self, name: str) -> bool:
        """True if a column is called ``name`` (case-insensitive)."""
        return self._column_index(name) is not None

    def _column_index(self, name: str) -> int | None:
        if name in self.labels:
            return self.labels.index(name)
        lower = [label.lower() for label in self.labels]
        return lower.index(name.lower()) if name.lower() in lower else None

    def column(self, name: str) -> NDArray[np.float64]:
        """Values of column ``name`` (exact match first, then case-insensitive).

        Raises
        ------
        SpecFileError
            If the scan has no such column (the message lists the columns).
        """
        index = self._column_index(name)
        if index is None:
            raise SpecFileError(
                f"{self.where} has no column {name!r}; columns: {', '.join(self.labels) or 'none'}"
            )
        return self.data[:, index].copy()

    def positioner(self, name: str) -> float:
        """Position of motor ``name`` at the start of the scan (case-insensitive).

        Raises
        ------
        SpecFileError
            If the motor is not in ``#O``/``#P``.
        """
        if name in self.positioners:
            return self.positioners[name]
        for key, value in self.positioners.items():
            if key.lower() == name.lower():
                return value
        raise SpecFileError(
            f"{self.where} has no position for motor {name!r} (#O/#P lines); motors: "
            f"{', '.join(self.positioners) or 'none'}"
        )

    @property
    def datetime(self) -> datetime | None:
        """The ``#D`` date parsed, or None."""
        return parse_spec_date(self.date) if self.date else None

    @property
    def start_time(self) -> str | None:
        """The ``#D`` date as ISO 8601 (no time zone: SPEC writes local time), or None."""
        when = self.datetime
        return when.isoformat() if when is not None else None


@dataclass
class SpecFile:
    """A parsed SPEC file: header date, motor names and scans by number."""

    path: Path
    date: str | None = None
    motors: list[str] = field(default_factory=list)
    scans: dict[int, SpecScan] = field(default_factory=dict)

    def __contains__(self, number: object) -> bool:
        return number in self.scans

    def scan(self, number: int) -> SpecScan:
        """Scan ``number``.

        Raises
        ------
        SpecFileError
            If the file has no such scan (the message gives the range it has).
        """
        try:
            return self.scans[int(number)]
        except KeyError:
            have = sorted(self.scans)
            span = f"scans {have[0]}..{have[-1]}" if have else "no scans"
            raise SpecFileError(f"{self.path} has no scan {number} (it has {span})") from None


def _split_labels(text: str) -> list[str]:
    text = text.strip()
    if not text:
        return []
    parts = [p.strip() for p in re.split(r"\s{2,}|\t", text) if p.strip()]
    return parts


def _numbers(text: str, path: Path, lineno: int, what: str) -> list[float]:
    out = []
    for token in text.split():
        try:
            out.append(float(token))
        except ValueError:
            raise SpecFileError(
                f"{path}, line {lineno}: {what} holds {token!r}, which is not a number"
            ) from None
    return out


def read_spec(path: str | os.PathLike[str]) -> SpecFile:
    """Read a SPEC data file.

    Parameters
    ----------
    path : path-like
        The SPEC file.

    Returns
    -------
    SpecFile
        Its scans by number.  If a scan number appears twice (SPEC restarted its
        numbering), the later scan is kept and a warning is logged.

    Raises
    ------
    SpecFileError
        If the file is missing or unreadable, or a line is malformed: a ``#S`` line
        without an integer number, data before the first ``#S`` or before ``#L``,
        a data row whose column count differs from ``#L``, a non-numeric value in a
        data row or ``#P`` line, or more ``#P`` values than ``#O`` motor names.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise SpecFileError(f"SPEC file {path} does not exist") from None
    except OSError as exc:
        raise SpecFileError(f"cannot read SPEC file {path}: {exc}") from exc
    spec = SpecFile(path=path)
    motor_groups: dict[int, list[str]] = {}
    scan: SpecScan | None = None
    rows: list[list[float]] = []
    found_any = False

    def finish() -> None:
        nonlocal scan, rows
        if scan is None:
            return
        ncol = len(scan.labels)
        scan.data = np.asarray(rows, dtype=np.float64).reshape(len(rows), ncol)
        if scan.number in spec.scans:
            logger.warning(
                "%s: scan %d appears again at line %d; using the later one",
                path,
                scan.number,
                scan.line,
            )
        spec.scans[scan.number] = scan
        scan, rows = None, []

    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("@"):
            continue
        if line.startswith("#"):
            found_any = True
            match = _CONTROL.match(line)
            if match is None:
                logger.debug("%s, line %d: ignoring %r", path, lineno, line)
                continue
            key, index_text, rest = match.group(1), match.group(2), (match.group(3) or "")
            if key == "S":
                finish()
                head, _, command = rest.strip().partition(" ")
                try:
                    number = int(head)
                except ValueError:
                    raise SpecFileError(
                        f"{path}, line {lineno}: '#S' must be followed by a scan number, "
                        f"got {line!r}"
                    ) from None
                scan = SpecScan(
                    number=number, command=" ".join(command.split()), line=lineno, path=path
                )
                scan.date = spec.date
                continue
            if key == "O" and index_text:
                if scan is not None:
                    finish()
                motor_groups[int(index_text)] = _split_labels(rest)
                spec.motors = [m for k in sorted(motor_groups) for m in motor_groups[k]]
                continue
            if scan is None:
                if key == "D":
                    spec.date = rest.strip()
                continue
            if key == "D":
                scan.date = rest.strip()
            elif key == "L":
                if rows:
                    raise SpecFileError(
                        f"{path}, line {lineno}: '#L' after data rows of scan {scan.number}"
                    )
                scan.labels = _split_labels(rest)
            elif key == "P" and index_text:
                group = int(index_text)
                values = _numbers(rest, path, lineno, f"#P{group}")
                names = motor_groups.get(group)
                if names is None:
                    raise SpecFileError(
                        f"{path}, line {lineno}: '#P{group}' has no matching '#O{group}' "
                        "motor names in the file header"
                    )
                if len(values) > len(names):
                    raise SpecFileError(
                        f"{path}, line {lineno}: '#P{group}' has {len(values)} positions "
                        f"but '#O{group}' names {len(names)} motors"
                    )
                scan.positioners.update(zip(names, values, strict=False))
            elif key == "T":
                values = rest.split()
                try:
                    scan.count_time = float(values[0]) if values else None
                except ValueError:
                    raise SpecFileError(
                        f"{path}, line {lineno}: '#T' must start with a counting time, got {rest!r}"
                    ) from None
            elif key == "C":
                scan.comments.append(rest.strip())
            else:
                scan.header[f"{key}{index_text}"] = rest.strip()
            continue
        # a data row
        if scan is None:
            raise SpecFileError(
                f"{path}, line {lineno}: data {line[:40]!r} before the first '#S' scan line; "
                "is this a SPEC file?"
            )
        if not scan.labels:
            raise SpecFileError(
                f"{path}, line {lineno}: data row in scan {scan.number} before its "
                "'#L' column labels"
            )
        values = _numbers(line, path, lineno, f"data row of scan {scan.number}")
        if len(values) != len(scan.labels):
            raise SpecFileError(
                f"{path}, line {lineno}: data row of scan {scan.number} has {len(values)} "
                f"values but '#L' names {len(scan.labels)} columns"
            )
        rows.append(values)
    finish()
    if not found_any:
        raise SpecFileError(f"{path} is not a SPEC file: it has no '#' control lines")
    logger.debug("read %d scans from %s", len(spec.scans), path)
    return spec
