"""Set-up sub-commands: ``settings``, ``experiment``, ``configuration``, ``sample``, ``scan``.

::

    nxrefine-bs settings init|show|edit|path
    nxrefine-bs experiment new NAME --analysis-home DIR [--beamline sim]
    nxrefine-bs configuration new NAME [-x EXPERIMENT] [--detector ...] [--position ...]
    nxrefine-bs configuration show NAME
    nxrefine-bs sample new SAMPLE LABEL [-x EXPERIMENT]
    nxrefine-bs scan new SAMPLE LABEL [SCAN] -c CONFIGURATION [--temperature T]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import SettingsError
from ..experiment import Experiment, scan_directory_name
from ..nexus.scanfile import create_scan_file
from ..nexus.template import Position, create_configuration, read_configuration
from ..settings import (
    EXPERIMENT_SECTIONS,
    SECTIONS,
    experiment_settings_path,
    format_value,
    init_server_settings,
    load_server_settings,
    read_settings,
    server_settings_path,
    update_settings,
)

__all__ = ["register"]

logger = logging.getLogger(__name__)


def _assignment(text: str) -> tuple[str, str]:
    name, eq, value = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not eq or not dot or not section or not key:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not section.key=value (e.g. nxreduce.threshold=20000)"
        )
    return f"{section}.{key}", value.strip()


def _position(text: str) -> Any:
    parts = [p.strip() for p in text.split(",")]
    if not 1 <= len(parts) <= 5:
        raise argparse.ArgumentTypeError(
            f"position {text!r} must be chi[,omega[,theta[,x[,y]]]] (1 to 5 numbers)"
        )
    try:
        values = [float(p) if p else 0.0 for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"position {text!r} must be comma-separated numbers chi,omega,theta,x,y"
        ) from None
    return Position(*values)


def _experiment_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-x",
        "--experiment",
        type=Path,
        default=Path("."),
        metavar="DIR",
        help="experiment directory (default: the current directory)",
    )


def _print_settings(values: dict[str, dict[str, Any]], path: Path) -> None:
    print(f"# {path}")
    for section, items in values.items():
        print(f"[{section}]")
        for key, value in items.items():
            print(f"{key} = {format_value(value)}".rstrip())
        print()


# --------------------------------------------------------------------------- settings


def enclosing_experiment(start: Path | None = None) -> Path | None:
    """The experiment directory holding ``start`` (default: the current directory).

    An experiment directory is one with ``tasks/settings.ini``; ``start`` may be the
    experiment itself or any directory below it (a sample or label directory).
    """
    here = Path(os.path.abspath(start if start is not None else Path.cwd()))
    for directory in (here, *here.parents):
        if experiment_settings_path(directory).is_file():
            return directory
    return None


def _settings_file(args: argparse.Namespace) -> tuple[Path, tuple[str, ...]]:
    """The file ``settings show/edit`` act on.

    ``--experiment``, ``--file`` and ``--server`` say it; otherwise the experiment that
    holds the current directory, if any (its settings override the server's), else the
    server file.  ``[server]`` keys exist only in the server file, so an edit of those
    alone goes there.
    """
    if getattr(args, "experiment", None) is not None:
        return Experiment.open(args.experiment).settings_file, EXPERIMENT_SECTIONS
    if args.file is not None or getattr(args, "server", False):
        return (args.file if args.file is not None else server_settings_path()), SECTIONS
    names = [name for name, _ in getattr(args, "set", None) or ()]
    server_only = bool(names) and all(name.partition(".")[0] == "server" for name in names)
    experiment = None if server_only else enclosing_experiment()
    if experiment is not None:
        print(
            f"experiment settings of {experiment} (use --server for the server file)",
            file=sys.stderr,
        )
        return Experiment.open(experiment).settings_file, EXPERIMENT_SECTIONS
    return server_settings_path(), SECTIONS


def _settings_init(args: argparse.Namespace) -> int:
    path = args.file if args.file is not None else server_settings_path()
    values: dict[str, dict[str, Any]] = {}
    for name, value in args.set or ():
        section, _, key = name.partition(".")
        values.setdefault(section, {})[key] = value
    init_server_settings(path, values=values, overwrite=args.force)
    print(path)
    return 0


def _settings_show(args: argparse.Namespace) -> int:
    path, sections = _settings_file(args)
    if sections == SECTIONS:
        values = load_server_settings(path)
    else:
        values = read_settings(path, sections)
    _print_settings(values, path)
    return 0


def _settings_edit(args: argparse.Namespace) -> int:
    path, sections = _settings_file(args)
    if not path.is_file():
        if sections == SECTIONS:
            load_server_settings(path)  # raises the "how to create it" error
        raise SettingsError(f"settings file {path} does not exist")
    update_settings(path, dict(args.set), sections)
    for name, value in args.set:
        logger.info("%s: %s = %s", path, name, value)
    print(path)
    return 0


def _settings_path(args: argparse.Namespace) -> int:
    print(server_settings_path())
    return 0


def _register_settings(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "settings",
        help="create, show or edit settings files",
        description="Server settings live in $NXREFINE_BS_SETTINGS (a file or a directory "
        "holding settings.ini) or ~/.config/nxrefine-bs/settings.ini; each experiment "
        "has a copy in tasks/settings.ini.",
    )
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    p = sub.add_parser("init", help="create the server settings file with defaults")
    p.add_argument("--file", type=Path, help="settings file (default: the server file)")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.add_argument(
        "--set",
        type=_assignment,
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="initial value (repeatable)",
    )
    p.set_defaults(func=_settings_init)

    for action, func, text in (
        ("show", _settings_show, "print the settings, validated, with defaults filled in"),
        ("edit", _settings_edit, "change settings values (validated)"),
    ):
        p = sub.add_parser(action, help=text, description=text)
        where = p.add_mutually_exclusive_group()
        where.add_argument("--file", type=Path, help="this settings file")
        where.add_argument(
            "-x", "--experiment", type=Path, metavar="DIR", help="use this experiment's file"
        )
        where.add_argument(
            "--server",
            action="store_true",
            help="use the server file even inside an experiment directory",
        )
        p.epilog = (
            "Default: the tasks/settings.ini of the experiment holding the current "
            "directory, else the server file ([server] keys always go to the server file)."
        )
        if action == "edit":
            p.add_argument(
                "--set",
                type=_assignment,
                action="append",
                required=True,
                metavar="SECTION.KEY=VALUE",
                help="new value, e.g. nxreduce.threshold=20000 (repeatable)",
            )
        p.set_defaults(func=func)

    p = sub.add_parser("path", help="print where the server settings file is looked for")
    p.set_defaults(func=_settings_path)


# --------------------------------------------------------------------------- experiment


def _server_instrument() -> dict[str, Any]:
    path = server_settings_path()
    if not path.is_file():
        return {}
    return load_server_settings(path)["instrument"]


def _experiment_new(args: argparse.Namespace) -> int:
    from ..beamlines import get_beamline

    server = _server_instrument()
    home = args.analysis_home or server.get("analysis_home")
    if not home:
        raise SettingsError(
            "no analysis home: pass --analysis-home DIR or set instrument.analysis_home "
            "with 'nxrefine-bs settings edit'"
        )
    analysis_path = args.analysis_path
    if analysis_path is None:
        analysis_path = server.get("analysis_path") or "nxrefine"
    beamline = args.beamline or server.get("instrument") or "sim"
    beamline_cls = get_beamline(beamline)
    experiment = Experiment.create(
        Path(home),
        args.name,
        analysis_path=analysis_path,
        settings_source=args.settings,
        beamline=beamline_cls.name,
        source=args.source or server.get("source") or beamline_cls.source_name or None,
        raw_home=args.raw_home,
        raw_path=args.raw_path,
        exist_ok=args.exist_ok,
    )
    print(experiment.directory)
    return 0


def _register_experiment(subparsers: Any) -> None:
    parser = subparsers.add_parser("experiment", help="create experiment directories")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser(
        "new",
        help="create <analysis-home>/<name>[/<analysis-path>] with tasks/, configurations/...",
        description="Create an experiment directory; its tasks/settings.ini is a copy of "
        "the server settings (without [server]).",
    )
    p.add_argument("name", help="experiment name")
    p.add_argument("--analysis-home", type=Path, help="root of the analysis tree")
    p.add_argument(
        "--analysis-path", help="sub-directory inside the experiment (default nxrefine; '' none)"
    )
    p.add_argument("--beamline", help="beamline name (default: server setting, else sim)")
    p.add_argument("--source", help="facility name")
    p.add_argument("--raw-home", type=Path, help="root of the raw-data tree")
    p.add_argument("--raw-path", help="raw sub-path inside the experiment")
    p.add_argument("--settings", type=Path, help="settings file to copy (default: server file)")
    p.add_argument("--exist-ok", action="store_true", help="accept an existing experiment")
    p.set_defaults(func=_experiment_new)


# --------------------------------------------------------------------------- configuration


def _configuration_new(args: argparse.Namespace) -> int:
    experiment = Experiment.open(args.experiment)
    settings = experiment.settings()
    defaults = settings["nxrefine"]
    instrument = settings["instrument"]
    positions = args.position or [
        Position(
            defaults["chi"], defaults["omega"], defaults["theta"], defaults["x"], defaults["y"]
        )
    ]
    beam_center = args.beam_center or (None, None)
    path = create_configuration(
        experiment.configuration_file(args.name),
        detector=args.detector,
        wavelength=_pick(args.wavelength, defaults["wavelength"]),
        distance=_pick(args.distance, defaults["distance"]),
        detector_orientation=_pick(args.orientation, defaults["detector_orientation"]),
        phi_start=_pick(args.phi_start, defaults["phi"]),
        phi_step=_pick(args.phi_step, defaults["phi_step"]),
        phi_end=_pick(args.phi_end, defaults["phi_end"]),
        frame_rate=_pick(args.frame_rate, defaults["frame_rate"]),
        positions=positions,
        beam_center_x=beam_center[0],
        beam_center_y=beam_center[1],
        overwrite=args.overwrite,
        instrument_name=instrument.get("instrument") or "",
        facility=instrument.get("source") or "",
    )
    print(path)
    return 0


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


def _configuration_show(args: argparse.Namespace) -> int:
    path = Path(args.name)
    if path.suffix != ".nxs" or not path.exists():
        path = Experiment.open(args.experiment).configuration_file(args.name)
    info = read_configuration(path)
    print(f"# {info.path}")
    print(f"detector = {info.detector} {info.shape[0]}x{info.shape[1]}, {info.pixel_size:g} mm")
    print(f"wavelength = {info.wavelength:g} Angstrom")
    print(f"distance = {info.distance:g} mm")
    print(f"detector_orientation = {info.detector_orientation}")
    print(f"beam_center = {info.beam_center_x:g}, {info.beam_center_y:g}")
    print(
        f"phi = {info.phi_start:g} -> {info.phi_end:g} step {info.phi_step:g} "
        f"({info.nframes} frames, {info.frame_time:g} s each)"
    )
    for name, pos in zip(info.entries, info.positions, strict=True):
        print(
            f"{name}: chi={pos.chi:g} omega={pos.omega:g} theta={pos.theta:g} "
            f"x={pos.x:g} y={pos.y:g}"
        )
    return 0


def _register_configuration(subparsers: Any) -> None:
    parser = subparsers.add_parser("configuration", help="instrument configuration templates")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser(
        "new",
        help="write configurations/<name>.nxs from a pyFAI detector",
        description="Write a configuration template; unset values come from the "
        "experiment's [nxrefine] settings.",
    )
    p.add_argument("name", help="configuration name")
    _experiment_option(p)
    p.add_argument("--detector", default="Pilatus CdTe 2M", help="pyFAI detector name")
    p.add_argument("--wavelength", type=float, help="Angstrom")
    p.add_argument("--distance", type=float, help="sample-detector distance (mm)")
    p.add_argument("--orientation", help="detector orientation, e.g. '-y +z -x'")
    p.add_argument("--phi-start", type=float, help="deg")
    p.add_argument("--phi-end", type=float, help="deg")
    p.add_argument("--phi-step", type=float, help="deg per frame")
    p.add_argument("--frame-rate", type=float, help="frames per second")
    p.add_argument(
        "--position",
        type=_position,
        action="append",
        metavar="CHI,OMEGA,THETA,X,Y",
        help="one rotation entry per option (angles in deg, detector x/y in mm)",
    )
    p.add_argument(
        "--beam-center", type=float, nargs=2, metavar=("X", "Y"), help="pixels (default centre)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.set_defaults(func=_configuration_new)

    p = sub.add_parser("show", help="summarise a configuration file")
    p.add_argument("name", help="configuration name or .nxs file")
    _experiment_option(p)
    p.set_defaults(func=_configuration_show)


# --------------------------------------------------------------------------- sample, scan


def _sample_new(args: argparse.Namespace) -> int:
    path = Experiment.open(args.experiment).new_sample(args.sample, args.label)
    print(path)
    return 0


def _scan_new(args: argparse.Namespace) -> int:
    from ..beamlines import get_beamline

    experiment = Experiment.open(args.experiment)
    scan = args.scan
    if scan is None:
        if args.temperature is None:
            raise SettingsError("give a SCAN name or --temperature to derive it from")
        scan = scan_directory_name(args.temperature, args.units)
    config = Path(args.configuration)
    if not (config.suffix == ".nxs" and config.exists()):
        config = experiment.configuration_file(args.configuration)
    parent = None
    if args.parent is not None:  # relative to the current directory, as any path given
        parent = Path(os.path.abspath(args.parent.expanduser()))
        if not parent.is_file():
            raise SettingsError(f"parent scan file {parent} does not exist")
    experiment.new_sample(args.sample, args.label)
    paths = experiment.scan_paths(args.sample, args.label, scan)
    data_directory = None
    if experiment.beamline_name:
        data_directory = get_beamline(experiment.beamline_name)().scan_data_directory(paths)
    path = create_scan_file(
        config,
        experiment.directory,
        args.sample,
        args.label,
        scan,
        temperature=args.temperature,
        temperature_units=args.units,
        parent=parent,
        overwrite=args.overwrite,
        data_directory=data_directory,
    )
    print(path)
    return 0


def _register_sample_scan(subparsers: Any) -> None:
    parser = subparsers.add_parser("sample", help="sample directories")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("new", help="create <experiment>/<sample>/<label>")
    p.add_argument("sample", help="sample name, e.g. TiSe2")
    p.add_argument("label", help="crystal label, e.g. xtal1")
    _experiment_option(p)
    p.set_defaults(func=_sample_new)

    parser = subparsers.add_parser("scan", help="scan files")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser(
        "new",
        help="create <sample>/<label>/<sample>_<scan>.nxs from a configuration",
        description="Create a scan file and its scan directory. The scan directory's "
        "contents (raw data) are never touched.",
    )
    p.add_argument("sample", help="sample name")
    p.add_argument("label", help="crystal label")
    p.add_argument("scan", nargs="?", help="scan name (default: from --temperature, e.g. 300K)")
    _experiment_option(p)
    p.add_argument("-c", "--configuration", required=True, help="configuration name or .nxs file")
    p.add_argument("--temperature", type=float, help="sample temperature")
    p.add_argument("--units", default="K", help="temperature units (default K)")
    p.add_argument(
        "--parent", type=Path, help="parent scan file (a path relative to the current directory)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing scan file")
    p.set_defaults(func=_scan_new)


def register(subparsers: Any) -> None:
    """Add the set-up sub-commands to ``subparsers`` (an argparse sub-parsers action)."""
    _register_settings(subparsers)
    _register_experiment(subparsers)
    _register_configuration(subparsers)
    _register_sample_scan(subparsers)
