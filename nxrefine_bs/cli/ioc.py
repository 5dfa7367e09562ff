"""``nxrefine-bs ioc``: run the simulated beamline IOC (Channel Access)."""

from __future__ import annotations

import argparse
import logging

from ..errors import NXRefineBSError

logger = logging.getLogger(__name__)

__all__ = ["register"]


def _shape(text: str) -> tuple[int, int]:
    try:
        ny, nx = (int(v) for v in text.lower().replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"shape must be NY,NX (e.g. 48,64), got {text!r}"
        ) from None
    if ny < 8 or nx < 8 or ny * nx > 4096 * 4096:
        raise argparse.ArgumentTypeError(f"shape {ny}x{nx} out of range (8..4096 per side)")
    return ny, nx


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``ioc`` sub-command."""
    p = subparsers.add_parser(
        "ioc",
        help="run the simulated beamline IOC (motors, temperature, monitors, areaDetector)",
        description="Serve a simulated beamline over Channel Access: motor records phi, chi, "
        "omega, a temperature controller (TC:), monitors (MCS1:, MCS2:) and an areaDetector "
        "driver (DET:cam1:) with an NDFileHDF5 plugin (DET:HDF1:) writing simulated frames. "
        "Interfaces come from EPICS_CAS_INTF_ADDR_LIST (default 127.0.0.1), the port from "
        "EPICS_CA_SERVER_PORT.",
    )
    p.add_argument("--prefix", default="SIM:", help="PV prefix (default SIM:)")
    p.add_argument(
        "--detector", default="small", help="'small' (synthetic, --shape) or a pyFAI detector name"
    )
    p.add_argument("--shape", type=_shape, default=(48, 64), help="shape NY,NX of 'small'")
    p.add_argument("--seed", type=int, default=0, help="crystal and noise seed")
    p.add_argument("--temperature", type=float, default=300.0, help="initial temperature (K)")
    p.add_argument(
        "--time-constant", type=float, default=0.5, help="temperature lag time constant (s)"
    )
    p.add_argument(
        "--watch-pid",
        type=int,
        default=None,
        help="stop when the process with this id exits (tests and benchmarks pass theirs)",
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..ioc import IOCConfig, run_ioc

    if args.time_constant <= 0:
        raise NXRefineBSError(f"--time-constant must be positive, got {args.time_constant}")
    config = IOCConfig(
        prefix=args.prefix,
        detector=args.detector,
        shape=args.shape,
        seed=args.seed,
        temperature=args.temperature,
        temperature_time_constant=args.time_constant,
    )
    run_ioc(config, watch_pid=args.watch_pid)
    return 0
