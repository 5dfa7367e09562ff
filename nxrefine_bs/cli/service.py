"""``nxrefine-bs`` data-saving services: proxy, writer, zmq-keys, repair, archive."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

__all__ = ["register"]

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add the service sub-commands."""
    p = subparsers.add_parser(
        "proxy",
        help="0MQ document proxy between the RunEngine and writers (msgpack, 127.0.0.1)",
        description="Forward documents from Publisher(HOST:IN) to writers on HOST:OUT, keeping "
        "recent runs so a restarted writer catches up (requests on HOST:OUT+1).",
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--in-port", type=int, default=5577, help="publishers' port (default 5577)")
    p.add_argument("--out-port", type=int, default=5578, help="writers' port (default 5578)")
    p.add_argument("--curve", type=Path, help="CURVE key directory (nxrefine-bs zmq-keys)")
    p.set_defaults(func=_cmd_proxy)

    p = subparsers.add_parser(
        "writer",
        help="run the NeXus writer out of process (0MQ)",
        description="Write scan files from documents published through 'nxrefine-bs proxy'.",
    )
    p.add_argument(
        "--zmq", default="127.0.0.1:5578", metavar="HOST:PORT",
        help="proxy output address (default 127.0.0.1:5578)",
    )  # fmt: skip
    p.add_argument("--reduce", default="", metavar="STEPS", help="post-scan steps, e.g. max,find")
    p.add_argument("--curve", type=Path, help="CURVE key directory (nxrefine-bs zmq-keys)")
    p.set_defaults(func=_cmd_writer)

    p = subparsers.add_parser(
        "zmq-keys", help="create CURVE key pairs for an encrypted proxy/writer deployment"
    )
    p.add_argument("directory", type=Path)
    p.set_defaults(func=_cmd_keys)

    p = subparsers.add_parser(
        "repair",
        help="make scan files and detector files readable after a crash",
        description="Clear the open-for-write flag of detector files whose writer died and "
        "mark rotations that never finished as 'crash' with their readable frame count.",
    )
    p.add_argument("scan_files", nargs="+", type=Path)
    p.set_defaults(func=_cmd_repair)

    p = subparsers.add_parser(
        "archive",
        help="upload runs journaled while Tiled was unavailable",
    )
    p.add_argument("experiment", type=Path, help="experiment directory")
    p.add_argument(
        "--resume", action="store_true", help="upload the journaled runs (default: list them)"
    )
    p.add_argument("--tiled", help="Tiled URI (default: settings, or the embedded catalog)")
    p.add_argument("--api-key", help="Tiled API key")
    p.set_defaults(func=_cmd_archive)


def _service_logging() -> None:
    """Services log "listening on ..." and one line per run without ``-v``."""
    package = logging.getLogger("nxrefine_bs")
    package.setLevel(min(package.level or logging.INFO, logging.INFO))
    for handler in package.handlers:
        handler.setLevel(min(handler.level, logging.INFO))
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))


def _cmd_proxy(args: argparse.Namespace) -> int:
    from ..callbacks.remote import run_proxy

    _service_logging()
    run_proxy(args.host, args.in_port, args.out_port, curve=args.curve)
    return 0


def _cmd_writer(args: argparse.Namespace) -> int:
    from ..callbacks.remote import serve

    _service_logging()
    return serve(
        args.zmq, reduce_steps=[s for s in args.reduce.split(",") if s], curve=args.curve
    )


def _cmd_keys(args: argparse.Namespace) -> int:
    from ..callbacks.remote import make_keys

    directory = make_keys(args.directory)
    print(f"CURVE keys in {directory}: give server.key_secret to the proxy host and "
          "client.key_secret + server.key to RunEngine and writer hosts")  # fmt: skip
    return 0


def _cmd_repair(args: argparse.Namespace) -> int:
    from ..nexus.repair import repair_scan_file

    for scan_file in args.scan_files:
        report = repair_scan_file(scan_file)
        cleared = ", ".join(p.name for p in report.cleared) or "none"
        crashed = ", ".join(f"{e} ({n} frames)" for e, n in report.crashed.items()) or "none"
        line = f"{scan_file}: cleared open-for-write flags: {cleared}; marked crash: {crashed}"
        if report.set_aside:
            names = ", ".join(p.name for p in report.set_aside)
            line += f"; cut off at creation, no frame, renamed: {names}"
        print(line)
    return 0


def _cmd_archive(args: argparse.Namespace) -> int:
    from ..tiled.archive import journal_directory, pending_runs, resume_uploads

    journals = pending_runs(journal_directory(args.experiment))
    if not args.resume:
        print(f"{len(journals)} run(s) waiting for upload in {journal_directory(args.experiment)}")
        for path in journals:
            print(f"  {path.stem}")
        return 0
    from ..tiled.catalog import close_catalog, open_catalog

    target = args.tiled or args.experiment
    client = open_catalog(target, api_key=args.api_key)
    try:
        done = resume_uploads(client, journal_directory(args.experiment))
    finally:
        close_catalog(client)
    print(f"uploaded {len(done)} run(s)")
    return 0
