"""SPEC data files read with :mod:`silx.io.specfile`, plus what beamline imports need.

silx does the parsing (scans, ``#L`` labels, data, ``#O``/``#P`` motors, MCA lines,
``\\`` continuation lines).  This module adds only:

* scans addressed as silx does, ``"<number>.<order>"`` (``"4.2"`` is the second
  ``#S 4``; SPEC restarts its numbering after a ``newfile``), or by a number that
  appears once; a repeated number is never silently resolved;
* the line of every ``#S`` (for messages) from one light pass over the ``#`` lines;
* positioners paired group by group (``#O<k>`` names with ``#P<k>`` values), using the
  ``#O`` lines in effect for the scan (a file may restart its header mid-way);
* the ``#D`` date, ``#T`` counting time and checks of the data rows of a scan
  (:meth:`SpecScan.check_data`) for imports that must not accept what silx skips.

Errors are :class:`SpecFileError` naming the file, the scan and the line.

Examples
--------
>>> import tempfile, pathlib
>>> text = '''#F demo
... #D Tue Oct 10 12:00:00 2023
... #O0 phi  chi  Two Theta
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
...     with read_spec(path) as spec:
...         scan = spec.scan(1)
>>> scan.key, scan.command, scan.positioners["Two Theta"], scan.column("flyc1").tolist()
('1.1', 'flyangle phi 0 1 2 0.1', 1.5, [1000.0, 1010.0])
>>> scan.start_time
'2023-10-10T12:01:00'
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..errors import SpecFileError

__all__ = ["SpecFileError", "SpecScan", "SpecFile", "read_spec", "parse_spec_date"]

logger = logging.getLogger(__name__)

SPEC_DATE_FORMAT = "%a %b %d %H:%M:%S %Y"
"""How SPEC writes ``#D`` dates, e.g. ``Tue Oct 10 12:00:00 2023``."""

_KEY = re.compile(r"^\s*(-?\d+)(?:\.(\d+))?\s*$")
_GROUP = re.compile(rb"^#([OP])(\d+)(?:[ \t](.*))?$")


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


def split_names(text: str) -> list[str]:
    """Split ``#O``/``#L`` text as SPEC writes it: names separated by two or more spaces.

    Examples
    --------
    >>> split_names("phi  Two Theta   th ")
    ['phi', 'Two Theta', 'th']
    """
    return [part for part in re.split(r"\s{2,}|\t", text.strip()) if part]


# --------------------------------------------------------------------------- index


@dataclass
class _Entry:
    """What the light pass records about one ``#S`` line."""

    line: int
    offset: int
    end: int = -1
    file_date: str | None = None
    motor_groups: dict[int, str] | None = None
    p_lines: dict[int, int] = field(default_factory=dict)


def _index(path: Path) -> list[_Entry]:
    """One pass over the ``#`` lines: ``#S`` lines, their byte ranges, header dates and motors.

    The ``#O`` lines in effect for a scan are the last block of ``#O`` lines seen
    before its first ``#P`` line (a block starts at an ``#O`` line that follows a
    ``#S``: a new file header, or ``#O`` lines inside the scan as Sardana writes them).
    """
    entries: list[_Entry] = []
    groups: dict[int, str] = {}
    scan_since_o = False
    header_date: str | None = None
    in_scan_header = False
    current: _Entry | None = None
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            if not raw.startswith(b"#"):
                if raw.strip():
                    in_scan_header = False
                continue
            line = raw.rstrip(b"\r\n")
            tag = line[1:2]
            if tag == b"S" and line[2:3] in (b" ", b"\t"):
                if current is not None:
                    current.end = start
                current = _Entry(lineno, start, file_date=header_date)
                entries.append(current)
                scan_since_o = True
                in_scan_header = True
            elif tag in (b"L", b"E", b"F"):
                in_scan_header = False  # the scan's data, or a new file header, begins
            elif tag == b"D" and line[2:3] in (b" ", b"\t", b""):
                if not in_scan_header:
                    header_date = line[2:].decode("utf-8", "replace").strip() or None
            elif tag in (b"O", b"P"):
                match = _GROUP.match(line)
                if match is None:
                    continue
                k = int(match.group(2))
                if tag == b"O":
                    if scan_since_o:
                        groups, scan_since_o = {}, False
                    groups[k] = (match.group(3) or b"").decode("utf-8", "replace")
                elif current is not None:
                    if current.motor_groups is None:
                        current.motor_groups = dict(groups)
                    current.p_lines.setdefault(k, lineno)
    if current is not None:
        current.end = offset
    return entries


# --------------------------------------------------------------------------- scans


@dataclass
class SpecScan:
    """One ``#S`` block of a SPEC file, as silx reads it.

    Attributes
    ----------
    key : str
        ``"<number>.<order>"`` as silx names it (``"4.2"``: the second ``#S 4``).
    number, order, index : int
        Scan number, its occurrence (1, 2...) and the position of the scan in the file.
    command : str
        The scan command (the rest of the ``#S`` line).
    line : int
        Line number (1-based) of the ``#S`` line.
    date : str or None
        The scan's ``#D`` text (else that of the file header in effect).
    labels : list of str
        Column labels of ``#L`` (as silx splits them).
    data : numpy.ndarray
        ``(rows, columns)`` float64 data (silx's data, transposed).
    positioners : dict
        Motor name -> position at the start of the scan: ``#P<k>`` values paired with
        the names of ``#O<k>`` in effect for the scan.
    header : dict
        The scan's control lines as silx gives them (``{"T": "...", "G0": ...}``).
    path : Path
        The SPEC file.
    """

    key: str
    number: int
    order: int
    index: int
    command: str
    line: int
    path: Path
    date: str | None = None
    labels: list[str] = field(default_factory=list)
    data: NDArray[np.float64] = field(default_factory=lambda: np.zeros((0, 0)))
    positioners: dict[str, float] = field(default_factory=dict)
    header: dict[str, str] = field(default_factory=dict)
    _span: tuple[int, int] = (0, 0)

    @property
    def nrows(self) -> int:
        """Number of data rows."""
        return int(self.data.shape[0])

    @property
    def where(self) -> str:
        """``'<file>, scan <key> (line <k>)'`` for messages."""
        return f"{self.path}, scan {self.key} (line {self.line})"

    @property
    def comments(self) -> list[str]:
        """The ``#C`` lines of the scan."""
        text = self.header.get("C")
        return text.splitlines() if text else []

    @property
    def count_time(self) -> float | None:
        """``#T`` counting time (seconds per point), or None without ``#T``.

        Raises
        ------
        SpecFileError
            If ``#T`` does not start with a number.
        """
        text = self.header.get("T")
        if text is None or not text.split():
            return None
        try:
            return float(text.split()[0])
        except ValueError:
            raise SpecFileError(
                f"{self.where}: '#T' must start with a counting time, got {text!r}"
            ) from None

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
            If the scan has no such column (the message lists the columns), or its
            data rows hold fewer columns than ``#L`` names.
        """
        index = self._column_index(name)
        if index is None:
            raise SpecFileError(
                f"{self.where} has no column {name!r}; columns: {', '.join(self.labels) or 'none'}"
            )
        if self.nrows and index >= self.data.shape[1]:
            raise SpecFileError(
                f"{self.where}: column {name!r} is number {index + 1} of '#L' but the data "
                f"rows hold {self.data.shape[1]} values"
            )
        if not self.nrows:
            return np.zeros(0)
        return self.data[:, index].copy()

    def columns(self) -> dict[str, NDArray[np.float64]]:
        """Every column by label (labels without data in the rows are left out)."""
        if not self.nrows:
            return {label: np.zeros(0) for label in self.labels}
        ncol = self.data.shape[1]
        return {label: self.data[:, i].copy() for i, label in enumerate(self.labels[:ncol])}

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

    def check_data(self) -> None:
        """Check every data row of the scan against ``#L`` (silx skips bad rows silently).

        A data row is a non-blank line that does not start with ``#`` or ``@`` and
        does not continue a line ending in ``\\``.  Each must hold one number per
        ``#L`` label, and silx must have read them all.

        Raises
        ------
        SpecFileError
            Naming the file, line and scan of the first bad row.
        """
        start, end = self._span
        with open(self.path, "rb") as f:
            f.seek(start)
            block = f.read(end - start).decode("utf-8", "replace").splitlines()
        ncol = len(self.labels)
        rows = 0
        continued = False
        for lineno, raw in enumerate(block, start=self.line):
            line = raw.strip()
            was_continued, continued = continued, line.endswith("\\")
            if not line or was_continued or line.startswith(("#", "@")):
                continue
            if not ncol:
                raise SpecFileError(
                    f"{self.path}, line {lineno}: data row in scan {self.key} (line {self.line}) "
                    "before any '#L' column labels"
                )
            tokens = line.split()
            for token in tokens:
                try:
                    float(token)
                except ValueError:
                    raise SpecFileError(
                        f"{self.path}, line {lineno}: data row of scan {self.key} holds "
                        f"{token!r}, which is not a number"
                    ) from None
            if len(tokens) != ncol:
                raise SpecFileError(
                    f"{self.path}, line {lineno}: data row of scan {self.key} has "
                    f"{len(tokens)} values but '#L' names {ncol} columns"
                )
            rows += 1
        if rows != self.nrows:
            raise SpecFileError(
                f"{self.where}: {rows} data rows in the file but {self.nrows} read; "
                "is the scan block malformed?"
            )


def _positioners(path: Path, key: str, entry: _Entry, header: dict[str, str]) -> dict[str, float]:
    """Pair ``#P<k>`` values with the names of the ``#O<k>`` line in effect, group by group.

    Names are split at two or more spaces (they may hold single spaces).  A line
    written with single spaces only is split at those if that matches the count.
    """
    out: dict[str, float] = {}
    groups = entry.motor_groups or {}
    for tag in sorted((t for t in header if re.fullmatch(r"P\d+", t)), key=lambda t: int(t[1:])):
        k = int(tag[1:])
        where = f"{path}, line {entry.p_lines.get(k, entry.line)} (scan {key})"
        try:
            values = [float(v) for v in header[tag].split()]
        except ValueError:
            raise SpecFileError(
                f"{where}: '#P{k} {header[tag]}' holds a value that is not a number"
            ) from None
        if k not in groups:
            if values:
                raise SpecFileError(
                    f"{where}: '#P{k}' has no matching '#O{k}' motor names in the file header"
                )
            continue
        names = split_names(groups[k])
        single = groups[k].split()
        if len(names) != len(values) == len(single) and not re.search(r"\S\s{2,}\S", groups[k]):
            names = single  # written with single spaces (e.g. 6-ID-D)
        if len(values) > len(names):
            raise SpecFileError(
                f"{where}: '#P{k}' has {len(values)} positions but '#O{k}' names "
                f"{len(names)} motors"
            )
        out.update(zip(names, values, strict=False))
    return out


class SpecFile:
    """An open SPEC file: scans by key (``"4.2"``) or by a number that appears once.

    Scans are read from silx when first asked for and then kept.  Use as a context
    manager, or call :meth:`close` (scans already read stay usable).

    Parameters
    ----------
    path : path-like
        The SPEC file.

    Raises
    ------
    SpecFileError
        If the file is missing, not a regular file or not a SPEC file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise SpecFileError(f"SPEC file {self.path} does not exist")
        if not self.path.is_file():
            raise SpecFileError(f"SPEC file {self.path} is not a regular file")
        try:
            self._entries = _index(self.path)
        except OSError as exc:
            raise SpecFileError(f"cannot read SPEC file {self.path}: {exc}") from exc
        self._silx: Any = self._open_silx()
        keys = list(self._silx.keys())
        if len(keys) != len(self._entries):
            self.close()
            raise SpecFileError(
                f"{self.path}: silx finds {len(keys)} scans but the file has "
                f"{len(self._entries)} '#S' lines; the file is malformed"
            )
        self._keys = keys
        self._by_key = {key: i for i, key in enumerate(keys)}
        self._cache: dict[int, SpecScan] = {}
        logger.debug("opened %s: %d scans", self.path, len(keys))

    def _open_silx(self) -> Any:
        from silx.io.specfile import SfError
        from silx.io.specfile import SpecFile as SilxSpecFile

        try:
            return SilxSpecFile(str(self.path))
        except SfError as exc:
            raise SpecFileError(
                f"{self.path} is not a SPEC file silx can read ({exc}); it needs '#S' scan "
                f"lines, and it has {len(self._entries)}"
            ) from None

    # -- container protocol -------------------------------------------------

    def __enter__(self) -> SpecFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release silx's handle (scans already read stay usable)."""
        if self._silx is not None:
            self._silx.close()
            self._silx = None

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[SpecScan]:
        for i in range(len(self._keys)):
            yield self._scan_at(i)

    def __contains__(self, key: object) -> bool:
        try:
            self._resolve(key)  # type: ignore[arg-type]
        except SpecFileError:
            return False
        return True

    def keys(self) -> list[str]:
        """Scan keys ``"<number>.<order>"`` in file order (as silx lists them)."""
        return list(self._keys)

    @property
    def numbers(self) -> list[int]:
        """Scan numbers in file order (repeated numbers repeated)."""
        return [int(key.split(".")[0]) for key in self._keys]

    def _resolve(self, key: str | int) -> int:
        match = _KEY.match(str(key))
        if match is None:
            raise SpecFileError(
                f"{self.path}: {key!r} is not a scan key; use a number (7) or number.order ('7.2')"
            )
        number, order = match.group(1), match.group(2)
        if order is not None:
            index = self._by_key.get(f"{int(number)}.{int(order)}")
            if index is not None:
                return index
        else:
            hits = [i for i, k in enumerate(self._keys) if k.split(".")[0] == str(int(number))]
            if len(hits) == 1:
                return hits[0]
            if hits:
                where = ", ".join(f"'{self._keys[i]}' (line {self._entries[i].line})" for i in hits)
                raise SpecFileError(
                    f"{self.path} has scan {number} {len(hits)} times: {where}; "
                    "address one as number.order"
                )
        numbers = sorted(set(self.numbers))
        span = f"scans {numbers[0]}..{numbers[-1]}" if numbers else "no scans"
        raise SpecFileError(f"{self.path} has no scan {key} (it has {span})")

    def scan(self, key: str | int) -> SpecScan:
        """Scan ``key``: ``"4.2"``, or ``4`` / ``"4"`` if scan 4 appears once.

        Raises
        ------
        SpecFileError
            If there is no such scan, the number is repeated (the message lists the
            keys and lines), or silx cannot read the scan.
        """
        return self._scan_at(self._resolve(key))

    def _scan_at(self, index: int) -> SpecScan:
        if index in self._cache:
            return self._cache[index]
        from silx.io.specfile import SfError

        if self._silx is None:
            self._silx = self._open_silx()
        entry = self._entries[index]
        key = self._keys[index]
        where = f"{self.path}, scan {key} (line {entry.line})"
        try:
            silx_scan = self._silx[index]
            header = dict(silx_scan.scan_header_dict)
            labels = list(silx_scan.labels)
            data = np.asarray(silx_scan.data, dtype=np.float64)
        except (SfError, IndexError, KeyError, ValueError) as exc:
            raise SpecFileError(f"{where}: silx cannot read the scan: {exc}") from None
        data = data.T.copy() if data.ndim == 2 else data.reshape(-1, 1)
        number_text, _, command = header.get("S", "").strip().partition(" ")
        if not number_text.lstrip("-").isdigit():
            raise SpecFileError(
                f"{self.path}, line {entry.line}: '#S' must be followed by a scan number, "
                f"got '#S {header.get('S', '')}'"
            )
        scan = SpecScan(
            key=key,
            number=int(silx_scan.number),
            order=int(silx_scan.order),
            index=index,
            command=" ".join(command.split()),
            line=entry.line,
            path=self.path,
            date=(header.get("D") or "").strip() or entry.file_date,
            labels=labels,
            data=data,
            positioners=_positioners(self.path, key, entry, header),
            header=header,
            _span=(entry.offset, entry.end),
        )
        self._cache[index] = scan
        return scan


def read_spec(path: str | os.PathLike[str]) -> SpecFile:
    """Open a SPEC data file with silx (see :class:`SpecFile`).

    Raises
    ------
    SpecFileError
        If the file is missing, unreadable or not a SPEC file.
    """
    return SpecFile(path)
