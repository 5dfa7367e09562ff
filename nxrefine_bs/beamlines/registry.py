"""Find beamline classes: built-ins plus entry points in group ``nxrefine_bs.beamlines``.

A third-party package registers a beamline in its ``pyproject.toml``::

    [project.entry-points."nxrefine_bs.beamlines"]
    mybeamline = "mypackage.beamline:MyBeamline"

A plugin that fails to import, or is not a :class:`BeamLine` subclass, is logged
and skipped.  Names are matched case-insensitively, against both the class's
``name`` and the entry-point name.
"""

from __future__ import annotations

import importlib.metadata
import logging

from ..errors import BeamlineNotFoundError
from .base import BeamLine

__all__ = ["ENTRY_POINT_GROUP", "available_beamlines", "get_beamline"]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "nxrefine_bs.beamlines"


def _builtins() -> dict[str, type[BeamLine]]:
    from .qm2 import QM2Beamline
    from .sim import SimBeamline

    return {cls.name: cls for cls in (SimBeamline, QM2Beamline)}


def _discover() -> tuple[dict[str, type[BeamLine]], dict[str, str]]:
    """Registered classes by ``name`` and a map of lower-case aliases to names."""
    classes = _builtins()
    aliases: dict[str, str] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception as exc:  # a broken plugin must not break the others
            logger.warning("cannot load beamline plugin %r (%s): %s", ep.name, ep.value, exc)
            continue
        if not (isinstance(cls, type) and issubclass(cls, BeamLine)) or not cls.name:
            logger.warning(
                "beamline plugin %r (%s) is not a BeamLine subclass with a name; ignored",
                ep.name,
                ep.value,
            )
            continue
        if cls.name in classes and classes[cls.name] is not cls:
            logger.warning(
                "beamline %r from plugin %r replaces %s",
                cls.name,
                ep.name,
                classes[cls.name].__qualname__,
            )
        classes[cls.name] = cls
        aliases[ep.name.lower()] = cls.name
    for name in classes:
        aliases[name.lower()] = name
    return classes, aliases


def available_beamlines() -> dict[str, type[BeamLine]]:
    """All registered beamline classes, keyed by ``name`` and sorted.

    Examples
    --------
    >>> "sim" in available_beamlines() and "QM2" in available_beamlines()
    True
    """
    classes, _ = _discover()
    return dict(sorted(classes.items(), key=lambda item: item[0].lower()))


def get_beamline(name: str) -> type[BeamLine]:
    """Return the beamline class registered as ``name`` (case-insensitive).

    Raises
    ------
    BeamlineNotFoundError
        If no beamline has that name; the message lists the registered ones.

    Examples
    --------
    >>> get_beamline("qm2").name
    'QM2'
    """
    classes, aliases = _discover()
    key = aliases.get(str(name).strip().lower())
    if key is None:
        names = ", ".join(sorted(classes, key=str.lower))
        raise BeamlineNotFoundError(
            f"no beamline called {name!r}; registered beamlines: {names} "
            f"(plugins register under the entry-point group {ENTRY_POINT_GROUP!r})"
        )
    return classes[key]
