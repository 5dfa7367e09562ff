"""SPEC data files, read with :mod:`silx.io.specfile` and corrected where silx goes wrong.

silx parses the file: scans (keyed ``"<number>.<order>"``: ``"4.2"`` is the second
``#S 4``, as SPEC restarts its numbering after a ``newfile``), ``#L`` labels, data,
control lines, MCA lines and ``\\`` continuations.  This module adds only:

* the line of every ``#S`` (for messages), from one light pass over the ``#`` lines;
* positioners paired group by group (``#O<k>`` names with ``#P<k>`` values), names
  split at two or more spaces, using the ``#O`` lines in effect for the scan.  silx
  pairs all ``#O`` names with all ``#P`` values in one list, finds a file header only
  where ``#F`` starts one, and splits names at single spaces where a whole line has
  them: it goes wrong for a header restarted at ``#E`` (``lmn40.spe``) and for
  6-ID-D's single-spaced names (``user6idd.dat``);
* a scan number that appears more than once is never resolved silently;
* checks of the data rows (:meth:`SpecScan.check_data`), which silx skips silently
  when malformed.

Errors are :class:`~nxrefine_bs.errors.SpecFileError` naming the file, the scan and
the line.  Beamline mappings (e.g. QM2's rotations, monitors and temperatures) live
in :mod:`nxrefine_bs.beamlines`.

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
...     with SpecFile(path) as spec:
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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from numpy.typing import NDArray
from silx.io.specfile import SfError
from silx.io.specfile import SpecFile as SilxSpecFile

from .errors import SpecFileError

__all__ = ["SpecFile", "SpecScan"]

logger = logging.getLogger(__name__)

_KEY = re.compile(r"^\s*(-?\d+)(?:\.(\d+))?\s*$")
_GROUP = re.compile(rb"^#([OP])(\d+)(?:[ \t](.*))?$")


@dataclass
class _Block:
    """What the light pass records about one ``#S`` line."""

    line: int
    start: int
    end: int = -1
    motors: dict[int, str] | None = None  # the #O<k> text in effect at the first #P line
    p_lines: dict[int, int] = field(default_factory=dict)


def _index(path: Path) -> list[_Block]:
    """One pass over the ``#`` lines: ``#S`` lines, their byte ranges and the ``#O`` in effect.

    The ``#O`` lines in effect for a scan are the last block of ``#O`` lines seen
    before its first ``#P`` line (a block starts at an ``#O`` line that follows a
    ``#S``: a new file header, or ``#O`` lines inside the scan as Sardana writes them).
    """
    blocks: list[_Block] = []
    groups: dict[int, str] = {}
    new_group = False
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            if raw.startswith(b"#S"):  # as silx counts scans ("#S", "#S3": malformed ones)
                if blocks:
                    blocks[-1].end = start
                blocks.append(_Block(lineno, start))
                new_group = True
            elif raw.startswith((b"#O", b"#P")) and (m := _GROUP.match(raw.rstrip(b"\r\n"))):
                k = int(m.group(2))
                if m.group(1) == b"O":
                    if new_group:
                        groups, new_group = {}, False
                    groups[k] = (m.group(3) or b"").decode("utf-8", "replace")
                elif blocks:
                    if blocks[-1].motors is None:
                        blocks[-1].motors = dict(groups)
                    blocks[-1].p_lines.setdefault(k, lineno)
    if blocks:
        blocks[-1].end = offset
    return blocks


def _positioners(path: Path, key: str, block: _Block, header: dict[str, str]) -> dict[str, float]:
    """Pair ``#P<k>`` values with the names of the ``#O<k>`` line in effect, group by group.

    Names are split at two or more spaces (they may hold single spaces).  A line
    written with single spaces only is split at those if that matches the count.
    """
    out: dict[str, float] = {}
    groups = block.motors or {}
    for k in sorted(int(tag[1:]) for tag in header if re.fullmatch(r"P\d+", tag)):
        text = header[f"P{k}"]
        at = f"{path}, line {block.p_lines.get(k, block.line)} (scan {key})"
        try:
            values = [float(v) for v in text.split()]
        except ValueError:
            message = f"{at}: '#P{k} {text}' holds a value that is not a number"
            raise SpecFileError(message) from None
        if k not in groups:
            if values:
                raise SpecFileError(f"{at}: '#P{k}' has no matching '#O{k}' motor names")
            continue
        names = [part for part in re.split(r"\s{2,}|\t", groups[k].strip()) if part]
        single = groups[k].split()
        if len(names) != len(values) == len(single) and not re.search(r"\S\s{2,}\S", groups[k]):
            names = single  # written with single spaces (6-ID-D)
        if len(values) > len(names):
            raise SpecFileError(
                f"{at}: '#P{k}' has {len(values)} positions but '#O{k}' names {len(names)} motors"
            )
        out.update(zip(names, values, strict=False))
    return out


def _find(names: Iterable[str], name: str) -> str | None:
    """``name`` among ``names``: an exact match, else a case-insensitive one, else None."""
    names = list(names)
    if name in names:
        return name
    return next((n for n in names if n.lower() == name.lower()), None)


@dataclass
class SpecScan:
    """One ``#S`` block of a SPEC file, as silx reads it (positioners corrected).

    Attributes
    ----------
    key : str
        ``"<number>.<order>"`` as silx names it (``"4.2"``: the second ``#S 4``).
    number, order : int
        Scan number and its occurrence (1, 2...).
    command : str
        The scan command (the rest of the ``#S`` line, white space collapsed).
    line : int
        Line number (1-based) of the ``#S`` line.
    path : Path
        The SPEC file.
    date : str or None
        The scan's ``#D`` text (else that of its file header).
    labels : list of str
        Column labels of ``#L`` (as silx splits them).
    data : numpy.ndarray
        ``(rows, columns)`` float64 data (silx's data, transposed).
    positioners : dict
        Motor name -> position at the start of the scan (``#O<k>``/``#P<k>``).
    header : dict
        The scan's control lines as silx gives them (``{"T": "...", "G0": ...}``).
    """

    key: str
    number: int
    order: int
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
    def count_time(self) -> float | None:
        """``#T`` counting time (seconds per point), or None without ``#T``.

        Raises
        ------
        SpecFileError
            If ``#T`` does not start with a number.
        """
        words = self.header.get("T", "").split()
        if not words:
            return None
        try:
            return float(words[0])
        except ValueError:
            raise SpecFileError(
                f"{self.where}: '#T' must start with a counting time, got {self.header['T']!r}"
            ) from None

    @property
    def start_time(self) -> str | None:
        """The ``#D`` date as ISO 8601 (no time zone: SPEC writes local time), or None.

        Extra white space (SPEC pads single-digit days) is accepted; a date in another
        form (Sardana writes epoch seconds) gives None.
        """
        try:
            when = datetime.strptime(" ".join((self.date or "").split()), "%a %b %d %H:%M:%S %Y")
        except ValueError:
            return None
        return when.isoformat()

    def has_column(self, name: str) -> bool:
        """True if a column is called ``name`` (case-insensitive)."""
        return _find(self.labels, name) is not None

    def column(self, name: str) -> NDArray[np.float64]:
        """Values of column ``name`` (exact match first, then case-insensitive).

        Raises
        ------
        SpecFileError
            If the scan has no such column (the message lists the columns), or its
            data rows hold fewer columns than ``#L`` names.
        """
        label = _find(self.labels, name)
        if label is None:
            raise SpecFileError(
                f"{self.where} has no column {name!r}; columns: {', '.join(self.labels) or 'none'}"
            )
        index = self.labels.index(label)
        if self.nrows and index >= self.data.shape[1]:
            raise SpecFileError(
                f"{self.where}: column {name!r} is number {index + 1} of '#L' but the data "
                f"rows hold {self.data.shape[1]} values"
            )
        return self.data[:, index].copy() if self.nrows else np.zeros(0)

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
        motor = _find(self.positioners, name)
        if motor is None:
            raise SpecFileError(
                f"{self.where} has no position for motor {name!r} (#O/#P lines); motors: "
                f"{', '.join(self.positioners) or 'none'}"
            )
        return self.positioners[motor]

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
            block = f.read(end - start).decode("utf-8", "replace").split("\n")
        ncol, rows, continued = len(self.labels), 0, False
        for lineno, raw in enumerate(block, start=self.line):
            line = raw.strip()
            was_continued, continued = continued, line.endswith("\\")
            if not line or was_continued or line.startswith(("#", "@")):
                continue
            tokens = line.split()
            bad = next((t for t in tokens if not _is_number(t)), None)
            if not ncol:
                problem = "comes before any '#L' column labels"
            elif bad is not None:
                problem = f"holds {bad!r}, which is not a number"
            elif len(tokens) != ncol:
                problem = f"has {len(tokens)} values but '#L' names {ncol} columns"
            else:
                rows += 1
                continue
            where = f"{self.path}, line {lineno}: data row of scan {self.key}"
            raise SpecFileError(f"{where} {problem}")
        if rows != self.nrows:
            raise SpecFileError(
                f"{self.where}: {rows} data rows in the file but {self.nrows} read; "
                "is the scan block malformed?"
            )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


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
        if not self.path.is_file():
            problem = "is not a regular file" if self.path.exists() else "does not exist"
            raise SpecFileError(f"SPEC file {self.path} {problem}")
        try:
            self._blocks = _index(self.path)
        except OSError as exc:
            raise SpecFileError(f"cannot read SPEC file {self.path}: {exc}") from exc
        try:
            self._silx: Any = SilxSpecFile(str(self.path))
        except SfError as exc:
            raise SpecFileError(
                f"{self.path} is not a SPEC file silx can read ({exc}); it needs '#S' scan "
                f"lines, and it has {len(self._blocks)}"
            ) from None
        self._keys: list[str] = list(self._silx.keys())
        if len(self._keys) != len(self._blocks):
            self.close()
            raise SpecFileError(
                f"{self.path}: silx finds {len(self._keys)} scans but the file has "
                f"{len(self._blocks)} '#S' lines; the file is malformed"
            )
        self._cache: dict[int, SpecScan] = {}
        logger.debug("opened %s: %d scans", self.path, len(self._keys))

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
        return (self._scan_at(i) for i in range(len(self._keys)))

    def __contains__(self, key: object) -> bool:
        try:
            self._resolve(key)
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

    def _resolve(self, key: object) -> int:
        match = _KEY.match(str(key))
        if match is None:
            raise SpecFileError(
                f"{self.path}: {key!r} is not a scan key; use a number (7) or number.order ('7.2')"
            )
        number, order = int(match.group(1)), match.group(2)
        hits = [i for i, n in enumerate(self.numbers) if n == number]
        if order is not None:
            hits = [i for i in hits if self._keys[i] == f"{number}.{int(order)}"]
        elif len(hits) > 1:
            where = ", ".join(f"'{self._keys[i]}' (line {self._blocks[i].line})" for i in hits)
            raise SpecFileError(
                f"{self.path} has scan {number} {len(hits)} times: {where}; "
                "address one as number.order"
            )
        if hits:
            return hits[0]
        numbers = sorted(set(self.numbers))
        span = f"scans {numbers[0]}..{numbers[-1]}" if numbers else "no scans"
        raise SpecFileError(f"{self.path} has no scan {key} (it has {span})")

    def scan(self, key: str | int) -> SpecScan:
        """Scan ``key``: ``"4.2"``, or ``4`` / ``"4"`` if scan 4 appears once.

        Raises
        ------
        SpecFileError
            If there is no such scan, the number is repeated (the message lists the
            keys and lines), the file was closed before the scan was read, or silx
            cannot read the scan.
        """
        return self._scan_at(self._resolve(key))

    def _scan_at(self, index: int) -> SpecScan:
        if index in self._cache:
            return self._cache[index]
        block, key = self._blocks[index], self._keys[index]
        where = f"{self.path}, scan {key} (line {block.line})"
        if self._silx is None:
            raise SpecFileError(f"{where}: the file was closed before the scan was read")
        try:
            silx_scan = self._silx[index]
            header = dict(silx_scan.scan_header_dict)
            labels = list(silx_scan.labels)
            data = np.asarray(silx_scan.data, dtype=np.float64)
            file_date = silx_scan.file_header_dict.get("D")
        except (SfError, IndexError, KeyError, ValueError) as exc:
            raise SpecFileError(f"{where}: silx cannot read the scan: {exc}") from None
        number, _, command = header.get("S", "").strip().partition(" ")
        if not number.lstrip("-").isdigit():
            raise SpecFileError(
                f"{self.path}, line {block.line}: '#S' must be followed by a scan number, "
                f"got '#S {header.get('S', '')}'"
            )
        scan = SpecScan(
            key=key,
            number=int(silx_scan.number),
            order=int(silx_scan.order),
            command=" ".join(command.split()),
            line=block.line,
            path=self.path,
            date=(header.get("D") or file_date or "").strip() or None,
            labels=labels,
            data=data.T.copy() if data.ndim == 2 else data.reshape(-1, 1),
            positioners=_positioners(self.path, key, block, header),
            header=header,
            _span=(block.start, block.end),
        )
        self._cache[index] = scan
        return scan
