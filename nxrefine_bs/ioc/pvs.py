"""Small building blocks of the simulated IOC: typed PVs with write hooks.

caproto's ``ChannelData`` classes are used directly (a flat ``pvdb`` dictionary); a
:class:`PV` wraps one and can call an ``async`` hook on every client write.  The hook
runs inside the write, so a put with completion (``ca_put_callback``) finishes only
when the hook returns - how the motor record's ``VAL`` and the areaDetector
``Acquire``/``Capture`` PVs behave.  Values the IOC itself writes never call hooks.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from caproto import (
    ChannelChar,
    ChannelData,
    ChannelDouble,
    ChannelEnum,
    ChannelInteger,
    ChannelString,
    ChannelType,
)

logger = logging.getLogger(__name__)

__all__ = ["PV", "PVDict", "WriteHook"]

WriteHook = Callable[[Any], Awaitable[Any]]
"""``async hook(value) -> value or None``: called on a client write before it is stored."""

LONG_STRING = 1024
"""Length of the char-waveform strings (paths, XML), as areaDetector's ``FilePath``."""


def _hooked(base: type[ChannelData]) -> type[ChannelData]:
    class Hooked(base):  # type: ignore[valid-type, misc, unused-ignore]  # caproto is untyped
        def __init__(self, *args: Any, hook: WriteHook | None = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.hook = hook

        async def verify_value(self, data: Any) -> Any:
            data = await super().verify_value(data)
            if self.hook is not None:
                result = await self.hook(data)
                if result is not None:
                    data = result
            return data

    Hooked.__name__ = f"Hooked{base.__name__}"
    return Hooked


class _LongString(_hooked(ChannelChar)):  # type: ignore[misc]
    """A char-waveform string that also takes the empty string (a lone NUL over CA),
    which caproto's conversion rejects."""

    async def write_from_dbr(
        self, data: Any, data_type: Any, metadata: Any, *, flags: int = 0
    ) -> Any:
        if data_type == ChannelType.CHAR and len(data) and not any(data):
            return await self.write("", flags=flags)
        return await super().write_from_dbr(data, data_type, metadata, flags=flags)


_DOUBLE = _hooked(ChannelDouble)
_INT = _hooked(ChannelInteger)
_ENUM = _hooked(ChannelEnum)
_CHAR = _LongString


class PV:
    """One process variable of the IOC.

    Parameters
    ----------
    channel : ChannelData
        The caproto channel (value, metadata, subscriptions).
    """

    def __init__(self, channel: ChannelData) -> None:
        self.channel = channel

    @property
    def value(self) -> Any:
        """Current value."""
        return self.channel.value

    async def put(self, value: Any) -> None:
        """Write ``value`` as the IOC (no hook), publishing it to monitors."""
        await self.channel.write(value, verify_value=False)

    def on_write(self, hook: WriteHook) -> None:
        """Call ``hook`` on every client write."""
        self.channel.hook = hook


class PVDict:
    """The IOC's PVs by full name, with typed constructors.

    Parameters
    ----------
    prefix : str
        Prefix of every PV made through this dictionary (``"SIM:"``).
    """

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.pvdb: dict[str, ChannelData] = {}

    def sub(self, prefix: str) -> PVDict:
        """A view adding ``prefix`` to this dictionary's prefix (same ``pvdb``)."""
        view = PVDict(self.prefix + prefix)
        view.pvdb = self.pvdb
        return view

    def _add(self, suffix: str, channel: ChannelData) -> PV:
        name = self.prefix + suffix
        if name in self.pvdb:
            raise ValueError(f"PV {name} defined twice")
        self.pvdb[name] = channel
        return PV(channel)

    def double(self, suffix: str, value: float = 0.0, *, units: str = "", precision: int = 4) -> PV:
        """A ``DBR_DOUBLE`` PV."""
        return self._add(suffix, _DOUBLE(value=float(value), units=units, precision=precision))

    def integer(self, suffix: str, value: int = 0) -> PV:
        """A ``DBR_LONG`` PV."""
        return self._add(suffix, _INT(value=int(value)))

    def enum(self, suffix: str, choices: Sequence[str], value: str | None = None) -> PV:
        """A ``DBR_ENUM`` PV (bools are enums of two choices, as in EPICS databases)."""
        return self._add(
            suffix, _ENUM(value=value if value is not None else choices[0], enum_strings=choices)
        )

    def boolean(
        self, suffix: str, value: bool = False, choices: Sequence[str] = ("No", "Yes")
    ) -> PV:
        """A two-state enum PV."""
        return self.enum(suffix, choices, choices[int(bool(value))])

    def string(self, suffix: str, value: str = "") -> PV:
        """A long string (char waveform), as areaDetector's path and XML PVs."""
        return self._add(suffix, _CHAR(value=value, max_length=LONG_STRING))

    def string40(self, suffix: str, value: str = "") -> PV:
        """A ``DBR_STRING`` PV (at most 40 characters), as stringin records and ``.EGU``."""
        return self._add(suffix, ChannelString(value=value))

    def rw(self, kind: str, suffix: str, *args: Any, **kwargs: Any) -> tuple[PV, PV]:
        """A setpoint ``suffix`` and its readback ``suffix_RBV``; writes copy to the readback."""
        make = getattr(self, kind)
        setpoint = make(suffix, *args, **kwargs)
        readback = make(f"{suffix}_RBV", *args, **kwargs)

        async def copy(value: Any) -> None:
            await readback.put(value)

        setpoint.on_write(copy)
        return setpoint, readback
