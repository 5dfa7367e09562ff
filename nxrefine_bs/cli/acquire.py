"""``nxrefine-bs`` acquisition sub-commands: ``demo``, ``writer`` (0MQ) and ``replay``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from ..errors import NXRefineBSError
from .output import add_json_option, print_json, print_results

logger = logging.getLogger(__name__)

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the acquisition sub-commands."""
    p = subparsers.add_parser(
        "demo",
        help="run a simulated temperature series end to end",
        description="Create an experiment in DIR/demo, run a multi-rotation temperature series "
        "on the simulated beamline, write the NeXus scan files, reduce them and archive "
        "everything in an embedded Tiled catalog.",
    )
    p.add_argument("directory", type=Path, metavar="DIR")
    p.add_argument("--detector", default="Pilatus 300K", help="pyFAI detector name")
    p.add_argument(
        "--temperatures",
        default="300,100",
        help="comma-separated temperatures in K (default 300,100)",
    )
    p.add_argument(
        "--omegas",
        default="0,15,-15",
        help="comma-separated omega of each rotation (default 0,15,-15)",
    )
    p.add_argument("--phi", default="-5,175,1", metavar="START,END,STEP", help="rotation range")
    p.add_argument(
        "--grid-step", type=float, default=0.1, help="HKL grid step (r.l.u., default 0.1)"
    )
    p.add_argument("--no-reduce", action="store_true", help="acquire only")
    p.add_argument("--no-tiled", action="store_true", help="do not archive in Tiled")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--overwrite", action="store_true", help="replace a previous demo in DIR")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulation (default 0)")
    add_json_option(p)
    p.set_defaults(func=_cmd_demo)

    p = subparsers.add_parser(
        "replay",
        help="regenerate scan files from runs archived in Tiled",
        description="Re-drive the NeXus writer (and optionally reduction) with archived runs.",
    )
    p.add_argument("catalog", help="experiment directory (embedded catalog) or Tiled URL")
    p.add_argument("--uid", action="append", default=[], help="run uid (repeatable)")
    p.add_argument("--scan-id", type=int, action="append", default=[], help="scan id")
    p.add_argument("--sample", help="replay every run of this sample")
    p.add_argument("--scan", help="with --sample: only this scan (e.g. 300K)")
    p.add_argument("--into", type=Path, help="write into this experiment directory instead")
    p.add_argument("--reduce", default="", metavar="STEPS", help="also run these steps")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replay into entries that hold reduction results: regenerate only what the "
        "writer owns (data links, frame numbers, phi, monitors, logs, acquisition) and "
        "keep the rest (refined geometry, monitor_weight, masks, peaks, nxworkflow)",
    )
    p.add_argument("--api-key", help="Tiled server API key (default: $TILED_API_KEY)")
    p.set_defaults(func=_cmd_replay)


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise NXRefineBSError(f"--{what} expects comma-separated numbers, got {text!r}") from None


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    phi = _floats(args.phi, "phi")
    if len(phi) != 3:
        raise NXRefineBSError(f"--phi expects START,END,STEP, got {args.phi!r}")
    result = run_demo(
        args.directory,
        detector=args.detector,
        temperatures=_floats(args.temperatures, "temperatures"),
        omegas=_floats(args.omegas, "omegas"),
        phi_start=phi[0],
        phi_end=phi[1],
        phi_step=phi[2],
        grid_step=args.grid_step,
        reduce=not args.no_reduce,
        tiled=not args.no_tiled,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        seed=args.seed,
    )
    if args.json:
        print_json(result.as_dict())
        return 0
    home = result.experiment_dir
    _print_demo_summary(result)
    print(f"experiment:  {home}")
    for path in result.scan_files:
        print(f"scan file:   {path.relative_to(home)}")
    failed = result.as_dict()["steps_failed"]
    if failed:
        print(f"failed steps: {', '.join(failed)} (see 'nxrefine-bs workflow status {home}')")
    if result.processed:
        where = home / "tiled"
        print(f"tiled:       {len(result.processed)} processed scans registered in {where}")
    print(f"done in {result.seconds:.0f} s; see 'nxrefine-bs workflow status {home}'")
    return 0


def _print_demo_summary(result: Any) -> None:
    """One row per temperature: what the reduction found."""
    if not result.summary:
        return
    rows = []
    for t in result.summary:
        cell = "-" if t.a is None else f"{t.a:.4f} ± {t.a_error:.4f}"
        rows.append(
            {
                "T": f"{t.temperature:g}",
                "peaks": t.peaks,
                "indexed": None if t.indexed_fraction is None else f"{t.indexed_fraction:.0%}",
                "a": cell,
                "sl": None if t.superlattice is None else f"{t.superlattice:.2%}",
                "eta": f"{t.order_parameter:.2f}",
                "png": None if t.png is None else str(t.png.relative_to(result.experiment_dir)),
            }
        )
    print_results(
        rows,
        [
            ("T", "T (K)"),
            ("peaks", "peaks"),
            ("indexed", "indexed"),
            ("a", "a (Å) ± error"),
            ("sl", "superlattice / Bragg"),
            ("eta", "CDW order (sim)"),
            ("png", "HK0 plot"),
        ],
        title="Temperature series: superlattice reflections appear below Tc = 200 K",
    )


def _cmd_replay(args: argparse.Namespace) -> int:
    from ..callbacks.nexus_writer import NeXusScanWriter
    from ..tiled.catalog import close_catalog, open_catalog
    from ..tiled.replay import replay_runs, select_runs

    client = open_catalog(args.catalog, api_key=args.api_key)
    try:
        query = None
        if args.sample:
            query = {"sample": args.sample}
            if args.scan:
                query["scan"] = args.scan
        runs = select_runs(client, uids=args.uid, scan_ids=args.scan_id, query=query)
        writer = NeXusScanWriter()
        callbacks: list[Any] = [writer]
        reduction = None
        steps = [s for s in args.reduce.split(",") if s]
        if steps:
            from ..callbacks.reduction import PostScanReduction

            reduction = PostScanReduction(steps)
            callbacks.append(reduction)
        try:
            uids = replay_runs(runs, callbacks, experiment_dir=args.into, overwrite=args.overwrite)
        finally:
            writer.close()
        if reduction is not None:
            reduction.wait()
            reduction.close()
        print(f"replayed {len(uids)} run(s)")
    finally:
        close_catalog(client)
    return 0
