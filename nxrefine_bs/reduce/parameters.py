"""One typed parameter model per reduction step.

:data:`STEP_PARAMETERS` lists, for every step of :mod:`nxrefine_bs.reduce.steps`, the
keyword parameters its function accepts besides ``overwrite`` and ``progress``.  The
same table drives

* the Python API: every step function's keyword arguments are exactly these names
  (``tests/test_parameters.py`` checks it), so a misspelled keyword is a ``TypeError``;
* the registry (:func:`nxrefine_bs.reduce.steps.run_step`), the plans
  (:mod:`nxrefine_bs.plans.reduction`) and the workflow queue, which reject an unknown
  name with a :class:`ParameterError` listing the valid ones;
* the settings layers: a parameter with a ``setting`` is filled from that
  ``[nxreduce]`` key (scan file, parent, experiment, server) when not given;
* the command line: one option per parameter (``cli/reduce.py``).

Adding a parameter to a step is one :class:`Parameter` line in its tuple (plus the
keyword in the step function).

Frame range (NXRefine's convention, everywhere)
-----------------------------------------------
``first`` and ``last`` select the frames ``first <= z < last`` (``last`` excluded, as
NXRefine's ``nxmax`` and ``nxfind`` loop over ``range(first, last)``).  They default to
the settings ``first_frame`` (10) and ``last_frame`` (3640); an empty ``last_frame``
means ``nframes - 10``, NXRefine's run-time default.  Values beyond the stack are
clipped; negative values count from the end.  Steps record the range they used as
``first``/``last`` with the same meaning.

Examples
--------
>>> validate_parameters("find", {"threshold": "500"})
{'threshold': 500.0}
>>> validate_parameters("find", {"threshhold": 500})
Traceback (most recent call last):
...
nxrefine_bs.errors.ParameterError: unknown parameter 'threshhold' for step \
'find'; valid: threshold, first, last, min_voxels, min_spread, min_pixels, swmr
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ParameterError
from ..settings_schema import parse_bool, parse_float, parse_int

__all__ = [
    "Parameter",
    "ParameterError",
    "STEP_PARAMETERS",
    "CONTROL",
    "DEFAULT_LAST_MARGIN",
    "parameters_of",
    "parameter_names",
    "validate_parameters",
    "split_parameters",
    "resolve_frame_range",
    "settings_values",
]

logger = logging.getLogger(__name__)

CONTROL: tuple[str, ...] = ("overwrite", "progress")
"""Keywords every step function takes that are not parameters of the reduction."""

DEFAULT_LAST_MARGIN = 10
"""An empty ``last_frame`` setting means ``nframes - DEFAULT_LAST_MARGIN`` (NXRefine)."""


# --------------------------------------------------------------------------- value parsers


def _str(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode()
    if not isinstance(value, str):
        raise ValueError(f"expected text, got {value!r}")
    return value.strip()


def _grid(value: Any) -> tuple[float, float, float]:
    """``MIN,STEP,MAX`` (text or a 3-sequence) as three floats."""
    items = value.split(",") if isinstance(value, str) else value
    try:
        lo, step, hi = (parse_float(v) for v in items)
    except (TypeError, ValueError):
        raise ValueError(f"expected MIN,STEP,MAX, got {value!r}") from None
    if step <= 0 or hi <= lo:
        raise ValueError(f"expected MIN < MAX and STEP > 0, got {value!r}")
    return lo, step, hi


def _names(value: Any) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    try:
        return tuple(_str(v) for v in items if _str(v))
    except (TypeError, ValueError):
        raise ValueError(f"expected names separated by commas, got {value!r}") from None


def _any(value: Any) -> Any:
    return value


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "int": parse_int,
    "float": parse_float,
    "bool": parse_bool,
    "str": _str,
    "grid": _grid,
    "names": _names,
    "any": _any,
}


@dataclass(frozen=True)
class Parameter:
    """One keyword parameter of a reduction step.

    Parameters
    ----------
    name : str
        Keyword name in the step function, the plans and ``--set NAME=VALUE``; the
        command-line option is ``--name-with-dashes``.
    kind : str
        ``int``, ``float``, ``bool``, ``str``, ``grid`` (``MIN,STEP,MAX``), ``names``
        (comma-separated names) or ``any`` (Python API only, e.g. a Lattice object).
    doc : str
        One-line meaning (used as the option's help).
    setting : str, optional
        ``[nxreduce]`` settings key the value comes from when not given.
    flags : tuple of str
        Extra short command-line flags (NXRefine's, e.g. ``-t`` for threshold).
    cli : bool
        False for parameters that only make sense from Python.
    """

    name: str
    kind: str
    doc: str
    setting: str | None = None
    flags: tuple[str, ...] = ()
    cli: bool = True

    def __post_init__(self) -> None:
        if self.kind not in _PARSERS:
            raise ValueError(f"parameter {self.name}: unknown kind {self.kind!r}")

    @property
    def option(self) -> str:
        """The long command-line option, e.g. ``--polar-max``."""
        return "--" + self.name.replace("_", "-")

    def parse(self, value: Any) -> Any:
        """Convert ``value`` (text or Python) to this parameter's type; None stays None.

        Raises
        ------
        ValueError
            With a short reason if the value does not fit.
        """
        if value is None:
            return None
        return _PARSERS[self.kind](value)


def _p(name: str, kind: str, doc: str, **kw: Any) -> Parameter:
    return Parameter(name, kind, doc, **kw)


FIRST = _p("first", "int", "first frame used", setting="first_frame", flags=("-f",))
LAST = _p(
    "last",
    "int",
    "frames first <= z < last are used (empty setting: nframes - 10)",
    setting="last_frame",
    flags=("-l",),
)
SWMR = _p("swmr", "bool", "open the files in SWMR-read mode (data still being written)")
MASK = _p("mask", "bool", "use the 3-D mask (masked transform / combine)", flags=("-M",))

STEP_PARAMETERS: dict[str, tuple[Parameter, ...]] = {
    "max": (
        FIRST,
        LAST,
        _p("qmin", "float", "inner radius of the transmission annulus (1/A)", setting="qmin"),
        _p("qmax", "float", "outer radius of the transmission annulus (1/A)", setting="qmax"),
        _p("polarization", "float", "beam polarization factor", setting="polarization"),
        _p("monitor", "str", "monitor channel or group, e.g. MCS1 or monitor1", setting="monitor"),
        _p("norm", "float", "monitor normalisation", setting="norm"),
        SWMR,
    ),
    "find": (
        _p("threshold", "float", "peak threshold (counts)", setting="threshold", flags=("-t",)),
        FIRST,
        LAST,
        _p(
            "min_voxels",
            "int",
            "fewest voxels above threshold in a peak (1: any size)",
            setting="min_voxels",
        ),
        _p("min_spread", "float", "zinger test at the brightest voxel (0: off; see peaks.py)"),
        _p(
            "min_pixels",
            "int",
            "NXRefine's minimum peak separation (pixels); recorded only",
            setting="min_pixels",
            flags=("-P",),
        ),
        SWMR,
    ),
    "refine": (
        _p("polar_max", "float", "largest 2-theta used (deg)", setting="polar_max", flags=("-p",)),
        _p(
            "hkl_tolerance",
            "float",
            "indexing tolerance (1/A)",
            setting="hkl_tolerance",
            flags=("-T",),
        ),
        _p("refine_geometry", "bool", "also refine distance, beam centre, yaw and pitch"),
        _p("lattice", "any", "refine the cell (True/False) or use this Lattice", cli=False),
        _p("parameters", "names", "explicit list of refined parameters"),
        _p("min_indexed", "float", "smallest acceptable indexed fraction"),
        _p("max_forbidden", "float", "largest acceptable fraction of forbidden reflections"),
        _p("max_cell_change", "float", "largest acceptable relative change of a cell length"),
    ),
    "prepare": (
        _p("t1", "float", "threshold of the frame-difference test (counts)", setting="mask_t1"),
        _p("h1", "int", "box size of the frame-difference test (pixels)", setting="mask_h1"),
        _p("t2", "float", "threshold of the dilation", setting="mask_t2"),
        _p("h2", "int", "box size of the dilation (pixels)", setting="mask_h2"),
        FIRST,
        LAST,
    ),
    "transform": (
        _p("qh", "grid", "H axis MIN,STEP,MAX in r.l.u. (default: from the data)"),
        _p("qk", "grid", "K axis MIN,STEP,MAX in r.l.u. (default: from the data)"),
        _p("ql", "grid", "L axis MIN,STEP,MAX in r.l.u. (default: from the data)"),
        MASK,
        FIRST,
        LAST,
        _p("norm", "float", "monitor normalisation", setting="norm"),
        _p("monitor", "str", "monitor channel or group", setting="monitor"),
        _p(
            "polarization",
            "float",
            "polarization factor if the entry has no array",
            setting="polarization",
        ),
        _p("nthreads", "int", "threads of the transform kernel (setting threads; 0: one per "
           "core)", setting="threads", flags=("--threads",)),  # fmt: skip
        _p("block_frames", "int", "frames per kernel block"),
        _p("compression", "str", "compression of the output file (see nexus.codecs)"),
    ),
    "combine": (MASK,),
    "pdf": (
        _p("mask", "bool", "use the masked combined transform (nxmasked_pdf)", flags=("-M",)),
        _p("laue", "str", "Laue group overriding the sample's space group, e.g. m-3m"),
        _p("radius", "float", "punch radius (1/A)", setting="radius", flags=("-r",)),
        _p("taper_qmax", "float", "taper radius qmax (1/A; default: sphere inside the grid)",
           flags=("-Q",)),
        _p("method", "str", "fill: laplace or matern"),
        _p("order", "int", "Matern order m (1 or 2)"),
        _p("epsilon", "float", "Matern epsilon (A)"),
        _p("nthreads", "int", "threads for symmetrisation and FFTs"),
    ),
}
"""Every step's parameters, in command-line order."""


def parameters_of(step: str) -> tuple[Parameter, ...]:
    """The parameters of ``step``.

    Raises
    ------
    ParameterError
        If the step has no parameter model (the message lists the steps that do).
    """
    try:
        return STEP_PARAMETERS[step]
    except KeyError:
        raise ParameterError(
            f"no parameter model for step {step!r}; steps: {', '.join(STEP_PARAMETERS)}"
        ) from None


def parameter_names(step: str) -> tuple[str, ...]:
    """Names of ``step``'s parameters, in order."""
    return tuple(p.name for p in parameters_of(step))


def validate_parameters(step: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """Check names and convert values of parameters given to ``step``.

    None values are dropped (they mean "not given").

    Raises
    ------
    ParameterError
        On an unknown name (listing the valid ones) or a value of the wrong type.
    """
    specs = {p.name: p for p in parameters_of(step)}
    out: dict[str, Any] = {}
    for name, value in values.items():
        spec = specs.get(name)
        if spec is None:
            raise ParameterError(
                f"unknown parameter {name!r} for step {step!r}; valid: "
                + (", ".join(specs) or "none")
            )
        try:
            parsed = spec.parse(value)
        except ValueError as exc:
            raise ParameterError(
                f"parameter {name} = {value!r} of step {step!r} is invalid ({exc}); "
                f"expected {spec.kind}"
            ) from None
        if parsed is not None:
            out[name] = parsed
    return out


def split_parameters(steps: Sequence[str], values: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Share parameters given for several steps out to each step.

    ``values`` maps a parameter name to a value (given to every step that has it) or
    a step name to a mapping of that step's own parameters.

    Returns
    -------
    dict
        ``{step: {name: value}}`` for every step in ``steps``, validated.

    Raises
    ------
    ParameterError
        If a name belongs to none of ``steps`` (the message lists the valid ones), or a
        nested mapping names a step not in ``steps``.
    """
    steps = list(steps)
    shared: dict[str, Any] = {}
    nested: dict[str, Mapping[str, Any]] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            if key not in steps:
                raise ParameterError(
                    f"parameters given for step {key!r}, which is not run; steps: "
                    + ", ".join(steps)
                )
            nested[key] = value
        else:
            shared[key] = value
    valid = _union(steps)
    unknown = [k for k in shared if k not in valid]
    if unknown:
        raise ParameterError(
            f"unknown parameter {unknown[0]!r} for steps {', '.join(steps)}; valid: "
            + (", ".join(valid) or "none")
        )
    out: dict[str, dict[str, Any]] = {}
    for step in steps:
        names = parameter_names(step)
        mine = {k: v for k, v in shared.items() if k in names}
        mine.update(nested.get(step, {}))
        out[step] = validate_parameters(step, mine)
    return out


def _union(steps: Iterable[str]) -> list[str]:
    seen: list[str] = []
    for step in steps:
        for name in parameter_names(step):
            if name not in seen:
                seen.append(name)
    return seen


def resolve_frame_range(first: int | None, last: int | None, nframes: int) -> tuple[int, int]:
    """The frames ``[lo, hi)`` used for ``first``/``last`` on a stack of ``nframes``.

    ``first`` None is 0; ``last`` None is ``nframes - 10`` (NXRefine's default, at
    least ``lo``); negative values count from the end; both are clipped to the stack.
    The range may be empty (``lo == hi``); callers decide whether that is an error.
    """
    lo = 0 if first is None else int(first)
    hi = max(nframes - DEFAULT_LAST_MARGIN, 0) if last is None else int(last)
    if lo < 0:
        lo += nframes
    if hi < 0:
        hi += nframes
    lo = min(max(lo, 0), nframes)
    hi = min(max(hi, 0), nframes)
    return lo, max(lo, hi)


def settings_values(step: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """``{settings key: value}`` for the parameters of ``step`` that have a setting.

    Steps use it to record the values they used in ``/entry/nxreduce`` (NXRefine's
    ``write_parameters``); None values and parameters without a setting are left out.
    """
    specs = {p.name: p for p in parameters_of(step)}
    out: dict[str, Any] = {}
    for name, value in values.items():
        spec = specs.get(name)
        if spec is None:
            raise ParameterError(f"step {step!r} has no parameter {name!r}")
        if spec.setting and value is not None:
            out[spec.setting] = value
    return out
