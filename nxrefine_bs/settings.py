"""Layered INI settings: server file, experiment file, scan file, explicit values.

One table, :data:`SCHEMA` (in :mod:`nxrefine_bs.settings_schema`, re-exported here),
lists every setting with its section, type, default and meaning; it drives parsing,
defaults, validation and writing.  NXRefine's own settings files (0.1.1 and main) are
read as they are: bare keys are empty values, keys and sections nxrefine-bs does not
use are kept when a file is rewritten and warned about once, and 0.1.1's ``first`` /
``last`` are ``first_frame`` / ``last_frame``.

Two files hold settings:

* the **server** file, ``$NXREFINE_BS_SETTINGS`` (a file, or a directory holding
  ``settings.ini``) or else ``~/.config/nxrefine-bs/settings.ini``, with sections
  ``[server]``, ``[instrument]``, ``[nxrefine]`` and ``[nxreduce]``;
* the **experiment** file, ``<experiment>/tasks/settings.ini``, a copy of the server
  file made when the experiment is created, without ``[server]``.

Reduction parameters (the ``[nxreduce]`` keys) are resolved by
:func:`nxrefine_bs.nexus.nxreduce.resolve_parameters` from, highest priority first:
explicit values, the scan file's ``/entry/nxreduce``, its parent's, the experiment
file, the server file and the schema default (:func:`resolve_parameters` here does the
INI part; this module reads no HDF5).

Examples
--------
>>> spec = get_spec("nxreduce", "mask_h1")
>>> spec.parse("51")
51
>>> format_value(True)
'True'
"""

from __future__ import annotations

import configparser
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .errors import SettingsError
from .settings_schema import (
    _BY_KEY,
    EXPERIMENT_SECTIONS,
    FILE_ONLY_PARAMETERS,
    REDUCE_KEYS,
    SCHEMA,
    SECTIONS,
    SERVER_SECTIONS,
    SettingSpec,
    default_settings,
    format_value,
    get_spec,
)

__all__ = [
    "ENV_VAR",
    "SCHEMA",
    "SECTIONS",
    "SERVER_SECTIONS",
    "EXPERIMENT_SECTIONS",
    "REDUCE_KEYS",
    "FILE_ONLY_PARAMETERS",
    "SettingSpec",
    "get_spec",
    "default_settings",
    "format_value",
    "server_settings_path",
    "experiment_settings_path",
    "read_settings",
    "write_settings",
    "init_server_settings",
    "load_server_settings",
    "load_experiment_settings",
    "copy_to_experiment",
    "update_settings",
    "resolve_parameters",
    "parameter_spec",
    "read_extra_settings",
    "NXREFINE_ALIASES",
]

logger = logging.getLogger(__name__)

ENV_VAR = "NXREFINE_BS_SETTINGS"
"""Environment variable naming the server settings file (or its directory)."""

SETTINGS_FILENAME = "settings.ini"

# --------------------------------------------------------------------------- locations


def server_settings_path() -> Path:
    """Path of the server settings file.

    ``$NXREFINE_BS_SETTINGS`` (read at call time) names either the file or a directory
    holding ``settings.ini``; without it, ``~/.config/nxrefine-bs/settings.ini``.
    """
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        path = Path(env).expanduser()
        if path.is_dir() or env.endswith(("/", os.sep)):
            return path / SETTINGS_FILENAME
        return path
    return Path.home() / ".config" / "nxrefine-bs" / SETTINGS_FILENAME


def experiment_settings_path(experiment_dir: str | os.PathLike[str]) -> Path:
    """Path of an experiment's settings file, ``<experiment>/tasks/settings.ini``."""
    return Path(experiment_dir) / "tasks" / SETTINGS_FILENAME


# --------------------------------------------------------------------------- read / write


def read_settings(
    path: str | os.PathLike[str],
    sections: Iterable[str] = SECTIONS,
    *,
    fill_defaults: bool = True,
) -> dict[str, dict[str, Any]]:
    """Read and validate a settings file.

    Parameters
    ----------
    path : path-like
        The INI file.
    sections : iterable of str
        Sections allowed in this file; any other section is an error.
    fill_defaults : bool
        If True, keys missing from the file get their schema defaults; otherwise
        only keys present in the file are returned.

    Returns
    -------
    dict
        ``{section: {key: value}}`` with typed values.

    Raises
    ------
    SettingsError
        If the file is missing or unreadable, or holds an unknown section or key or a
        value of the wrong type; the message names the file, section and key.
    """
    path = Path(path)
    allowed = tuple(sections)
    parser = _read_parser(path)
    out = default_settings(allowed) if fill_defaults else {s: {} for s in allowed}
    canonical: set[tuple[str, str]] = set()
    for section in parser.sections():
        if section not in allowed:
            _warn_once(path, section, None, _unknown_reason(section, None, allowed))
            continue
        items = parser.items(section)
        # canonical keys first, so that they win over NXRefine 0.1.1 aliases
        items.sort(key=lambda kv: (section, kv[0]) in NXREFINE_ALIASES)
        for key, text in items:
            name = NXREFINE_ALIASES.get((section, key), key)
            if (section, name) not in _BY_KEY:
                _warn_once(path, section, key, _unknown_reason(section, key, allowed))
                continue
            if name != key:
                if (section, name) in canonical:
                    continue
                logger.debug("%s: [%s] %s read as NXRefine's %s", path, section, key, name)
            spec = _BY_KEY[(section, name)]
            text = "" if text is None else text  # a bare key (NXRefine) is an empty value
            if not text.strip() and not spec.optional and spec.type is not str:
                _warn_once(path, section, key, "is empty; the default applies")
                continue
            try:
                out[section][name] = spec.parse(text)
            except ValueError as exc:
                raise SettingsError(
                    f"{path}: [{section}] {key} = {text!r} is invalid ({exc}); "
                    f"expected {spec.type_name}"
                ) from None
            canonical.add((section, name))
    return out


NXREFINE_ALIASES: dict[tuple[str, str], str] = {
    ("nxreduce", "first"): "first_frame",
    ("nxreduce", "last"): "last_frame",
}
"""NXRefine 0.1.1 names of settings that have another name here (``first``/``last``)."""

_WARNED: set[tuple[str, str, str | None]] = set()


def _warn_once(path: Path, section: str, key: str | None, reason: str) -> None:
    """Log a warning about ``[section] key`` of ``path`` once per process."""
    token = (str(Path(path).absolute()), section, key)
    if token in _WARNED:
        return
    _WARNED.add(token)
    what = f"[{section}]" if key is None else f"[{section}] {key}"
    logger.warning("%s: %s %s", path, what, reason)


def _unknown_reason(section: str, key: str | None, allowed: tuple[str, ...]) -> str:
    if key is None:
        where = "here" if section in SECTIONS else "by nxrefine-bs"
        return f"is not used {where}; it is kept in the file (sections used: {', '.join(allowed)})"
    valid = ", ".join(s.key for s in SCHEMA if s.section == section)
    return f"is not used by nxrefine-bs; it is kept in the file (keys used: {valid})"


def _read_parser(path: Path) -> configparser.ConfigParser:
    parser = _parser()
    try:
        with open(path, encoding="utf-8") as fh:
            parser.read_file(fh)
    except FileNotFoundError:
        raise SettingsError(f"settings file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"cannot read settings file {path}: {exc}") from exc
    except configparser.Error as exc:
        msg = " ".join(str(exc).split())
        raise SettingsError(f"settings file {path} is not a valid INI file: {msg}") from exc
    return parser


def read_extra_settings(
    path: str | os.PathLike[str], sections: Iterable[str] = SECTIONS
) -> dict[str, dict[str, str | None]]:
    """Entries of a settings file that nxrefine-bs does not use, as raw text.

    These are kept when the file is rewritten (NXRefine's ``[server]`` keys
    ``concurrent``, ``run_command``, ``template``, ``cctw``, its ``[nodes]`` and
    ``[setup]`` sections, 0.1.1's ``first``/``last``/``qmin``/``qmax``...).  A bare key
    has the value None.

    Parameters
    ----------
    path : path-like
        The INI file.
    sections : iterable of str
        Sections nxrefine-bs uses in this file; every other section is extra.
    """
    parser = _read_parser(Path(path))
    allowed = tuple(sections)
    out: dict[str, dict[str, str | None]] = {}
    for section in parser.sections():
        for key, text in parser.items(section):
            if section in allowed and (section, key) in _BY_KEY:
                continue
            out.setdefault(section, {})[key] = text
    return out


def _parser() -> configparser.ConfigParser:
    # allow_no_value: NXRefine writes an empty setting as a bare ``key`` line.
    parser = configparser.ConfigParser(
        interpolation=None, inline_comment_prefixes=None, allow_no_value=True
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keep case
    return parser


def write_settings(
    path: str | os.PathLike[str],
    values: Mapping[str, Mapping[str, Any]],
    sections: Iterable[str] = SECTIONS,
    *,
    extra: Mapping[str, Mapping[str, str | None]] | None = None,
) -> Path:
    """Write a complete, commented settings file.

    Keys missing from ``values`` get their schema defaults; every value is validated
    first, so a bad value never reaches the file.  The file is written atomically.
    Entries nxrefine-bs does not use (``extra``, see :func:`read_extra_settings`) are
    written back unchanged, bare keys as bare keys, so NXRefine still finds them.

    Parameters
    ----------
    path : path-like
        Destination file (parent directories are created).
    values : mapping
        ``{section: {key: value}}``; sections not in ``sections`` are ignored.
    sections : iterable of str
        Sections to write, in order.
    extra : mapping, optional
        ``{section: {key: raw text or None}}`` kept from the file being replaced.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    sections = tuple(sections)
    extra = extra or {}
    merged = default_settings(sections)
    for section, items in values.items():
        if section not in sections:
            continue
        for key, value in items.items():
            spec = get_spec(section, key)
            try:
                merged[section][key] = spec.parse(value)
            except ValueError as exc:
                raise SettingsError(
                    f"[{section}] {key} = {value!r} is invalid ({exc}); expected {spec.type_name}"
                ) from None
    lines = ["# nxrefine-bs settings", ""]
    for section in sections:
        lines.append(f"[{section}]")
        for spec in SCHEMA:
            if spec.section == section:
                lines.append(f"# {spec.doc} ({spec.type_name})")
                text = format_value(merged[section][spec.key])
                lines.append(f"{spec.key} = {text}".rstrip())
        lines.extend(_extra_lines(extra.get(section, {})))
        lines.append("")
    for section, items in extra.items():
        if section not in sections:
            lines.append(f"[{section}]")
            lines.extend(_extra_lines(items))
            lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, path)
    logger.debug("wrote settings file %s", path)
    return path


def _extra_lines(items: Mapping[str, str | None]) -> list[str]:
    """INI lines of kept entries (a bare key for None)."""
    lines = []
    for key, text in items.items():
        if any(c in str(key) for c in "[]=:\n") or (text is not None and "\n" in text):
            raise SettingsError(f"cannot keep setting {key!r} = {text!r}: not a single INI line")
        lines.append(str(key) if text is None else f"{key} = {text}".rstrip())
    return lines


def init_server_settings(
    path: str | os.PathLike[str] | None = None,
    *,
    values: Mapping[str, Mapping[str, Any]] | None = None,
    overwrite: bool = False,
) -> Path:
    """Create the server settings file with defaults (plus ``values``).

    Parameters
    ----------
    path : path-like, optional
        Defaults to :func:`server_settings_path`.
    values : mapping, optional
        ``{section: {key: value}}`` overriding defaults.
    overwrite : bool
        Replace an existing file.

    Raises
    ------
    SettingsError
        If the file exists and ``overwrite`` is False.
    """
    path = Path(path) if path is not None else server_settings_path()
    if path.exists() and not overwrite:
        raise SettingsError(
            f"settings file {path} already exists; edit it with 'nxrefine-bs settings edit' "
            "or pass --force to replace it"
        )
    return write_settings(path, values or {}, SECTIONS)


def _missing_server_file(path: Path) -> SettingsError:
    return SettingsError(
        f"server settings file {path} does not exist; create it with "
        f"'nxrefine-bs settings init' (or point ${ENV_VAR} at an existing file)"
    )


def load_server_settings(path: str | os.PathLike[str] | None = None) -> dict[str, dict[str, Any]]:
    """Read the server settings file (all four sections, defaults filled in).

    Raises
    ------
    SettingsError
        If the file does not exist (the message says how to create it) or is invalid.
    """
    path = Path(path) if path is not None else server_settings_path()
    if not path.is_file():
        raise _missing_server_file(path)
    return read_settings(path, SECTIONS)


def load_experiment_settings(experiment_dir: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Read ``<experiment>/tasks/settings.ini`` (defaults filled in).

    Raises
    ------
    SettingsError
        If the file is missing or invalid.
    """
    path = experiment_settings_path(experiment_dir)
    if not path.is_file():
        raise SettingsError(
            f"experiment settings file {path} does not exist; is {experiment_dir} an "
            "experiment directory made by 'nxrefine-bs experiment new'?"
        )
    return read_settings(path, EXPERIMENT_SECTIONS)


def copy_to_experiment(
    experiment_dir: str | os.PathLike[str],
    *,
    source: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Write ``<experiment>/tasks/settings.ini`` from the server file, without ``[server]``.

    Parameters
    ----------
    experiment_dir : path-like
        The experiment directory.
    source : path-like, optional
        Server settings file to copy.  If None, the default server file is used when it
        exists and the schema defaults otherwise.
    overrides : mapping, optional
        ``{section: {key: value}}`` applied on top (e.g. the ``[instrument]`` values).

    Returns
    -------
    Path
        The experiment settings file.
    """
    extra: dict[str, dict[str, str | None]] = {}
    if source is not None:
        values = read_settings(source, SECTIONS)
        extra = read_extra_settings(source, SECTIONS)
    else:
        default = server_settings_path()
        if default.is_file():
            values = read_settings(default, SECTIONS)
            extra = read_extra_settings(default, SECTIONS)
        else:
            logger.info("no server settings file at %s; using built-in defaults", default)
            values = default_settings()
    for section, items in (overrides or {}).items():
        values.setdefault(section, {}).update(items)
    # NXRefine drops the server-only sections when it makes an experiment's copy.
    extra = {k: v for k, v in extra.items() if k not in SERVER_ONLY_SECTIONS}
    return write_settings(
        experiment_settings_path(experiment_dir), values, EXPERIMENT_SECTIONS, extra=extra
    )


SERVER_ONLY_SECTIONS: tuple[str, ...] = ("server", "nodes", "setup")
"""Sections of a server file that an experiment's copy leaves out (as NXRefine does)."""


def update_settings(
    path: str | os.PathLike[str],
    assignments: Mapping[str, Any],
    sections: Iterable[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Change some values of an existing settings file, validating each.

    Parameters
    ----------
    path : path-like
        The settings file (server or experiment).
    assignments : mapping
        ``{"section.key": value}``; values may be text.
    sections : iterable of str, optional
        Sections allowed in the file; by default ``[server]`` is allowed only if the
        file already has it.

    Returns
    -------
    dict
        The new settings.

    Raises
    ------
    SettingsError
        On an unknown section/key, a bad value, or a section not allowed in this file.
    """
    path = Path(path)
    if sections is None:
        sections = SECTIONS if _has_section(path, "server") else EXPERIMENT_SECTIONS
    sections = tuple(sections)
    values = read_settings(path, sections)
    extra = read_extra_settings(path, sections)
    for name, value in assignments.items():
        section, dot, key = name.partition(".")
        if not dot or not section or not key:
            raise SettingsError(f"setting {name!r} must be written as section.key")
        spec = get_spec(section, key)
        if section not in sections:
            raise SettingsError(f"{path}: section [{section}] does not belong in this file")
        try:
            values[section][key] = spec.parse(value)
        except ValueError as exc:
            raise SettingsError(
                f"{path}: [{section}] {key} = {value!r} is invalid ({exc}); "
                f"expected {spec.type_name}"
            ) from None
        for (sec, alias), canonical in NXREFINE_ALIASES.items():
            if sec == section and canonical == key:  # the old name would contradict it
                extra.get(section, {}).pop(alias, None)
    write_settings(path, values, sections, extra=extra)
    return values


def _has_section(path: Path, section: str) -> bool:
    parser = _parser()
    try:
        parser.read(path, encoding="utf-8")
    except (configparser.Error, OSError, UnicodeDecodeError):
        return False
    return parser.has_section(section)


# --------------------------------------------------------------------------- parameters


def parameter_spec(key: str) -> SettingSpec:
    """The spec of reduction parameter ``key`` (an ``[nxreduce]`` key, ``qmin`` or ``qmax``).

    Raises
    ------
    SettingsError
        If ``key`` is not a reduction parameter (the message lists the valid ones).
    """
    if key in FILE_ONLY_PARAMETERS:
        return FILE_ONLY_PARAMETERS[key]
    if key not in REDUCE_KEYS:
        raise SettingsError(
            f"unknown reduction parameter {key!r}; valid: "
            + ", ".join(REDUCE_KEYS + tuple(FILE_ONLY_PARAMETERS))
        )
    return _BY_KEY[("nxreduce", key)]


_parameter_spec = parameter_spec


def resolve_parameters(
    keys: Iterable[str] | None = None,
    *,
    explicit: Mapping[str, Any] | None = None,
    file_layers: Iterable[tuple[str, Mapping[str, Any]]] = (),
    experiment_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Resolve reduction parameters from every settings layer.

    Precedence, highest first: ``explicit`` values that are not None; ``file_layers``
    in order (the scan file's and its parent's stored parameters, read by
    :func:`nxrefine_bs.nexus.nxreduce.resolve_parameters`, which is what reduction
    steps call); the experiment's ``tasks/settings.ini [nxreduce]``; the server
    settings file; the schema default.  Missing settings files are skipped; invalid
    ones raise.

    Parameters
    ----------
    keys : iterable of str, optional
        Parameters wanted (default: every ``[nxreduce]`` key).
    explicit : mapping, optional
        Values given by the caller (CLI options, plan arguments).
    file_layers : iterable of (name, mapping)
        Parameters stored in scan files, highest priority first.
    experiment_dir : path-like, optional
        The experiment directory.

    Returns
    -------
    dict
        ``{key: value}`` for every requested key.

    Raises
    ------
    SettingsError
        On an unknown key, an invalid value in any layer, or an unreadable file.

    Examples
    --------
    >>> resolve_parameters(["threshold"], explicit={"threshold": "1000"})
    {'threshold': 1000.0}
    """
    keys = tuple(keys) if keys is not None else REDUCE_KEYS
    specs = {key: _parameter_spec(key) for key in keys}
    layers: list[tuple[str, Mapping[str, Any]]] = []

    if explicit:
        parsed = {}
        for key, value in explicit.items():
            if value is None:
                continue
            spec = _parameter_spec(key)
            try:
                parsed[key] = spec.parse(value)
            except ValueError as exc:
                raise SettingsError(
                    f"parameter {key} = {value!r} is invalid ({exc}); expected {spec.type_name}"
                ) from None
        layers.append(("explicit", parsed))

    layers.extend(file_layers)

    if experiment_dir is not None:
        path = experiment_settings_path(experiment_dir)
        if path.is_file():
            values = read_settings(path, EXPERIMENT_SECTIONS, fill_defaults=False)
            layers.append((str(path), values["nxreduce"]))

    server = server_settings_path()
    if server.is_file():
        values = read_settings(server, SECTIONS, fill_defaults=False)
        layers.append((str(server), values["nxreduce"]))

    out: dict[str, Any] = {}
    for key, spec in specs.items():
        for name, layer in layers:
            if key in layer and layer[key] is not None:
                out[key] = layer[key]
                logger.debug("parameter %s = %r from %s", key, layer[key], name)
                break
        else:
            out[key] = spec.default
    return out
