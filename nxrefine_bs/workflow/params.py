"""Job parameters: ``STEP.NAME=VALUE`` strings -> typed keyword arguments of the steps.

:func:`parse_param` is the one place that turns a command-line string into a step
parameter.  Steps with a parameter model
(:data:`nxrefine_bs.reduce.parameters.STEP_PARAMETERS`) are parsed by it, exactly as
their command-line options are (``transform.qh=-5,0.05,5`` -> ``(-5.0, 0.05, 5.0)``).
Other steps (a test registry, a plug-in) fall back to the step function's signature:
``Sequence[float]`` takes ``MIN,STEP,MAX``; ``int``, ``float`` and ``bool`` are
converted; anything else stays a string.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import WorkflowError
from ..reduce import parameters
from ..reduce.steps import STEPS, Step

logger = logging.getLogger(__name__)

__all__ = ["parse_param", "parse_params", "step_parameter_names"]

_RESERVED = {"scan_file", "entry", "overwrite", "progress"}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _model(step: Step) -> Any:
    """The parameter-model module if it describes ``step`` (a registry step), else None."""
    if STEPS.get(step.name) != step:
        return None
    return parameters if step.name in parameters.STEP_PARAMETERS else None


def step_parameter_names(step: Step) -> dict[str, Any]:
    """Named keyword parameters of a step (not ``scan_file``, ``entry``...)."""
    model = _model(step)
    if model is not None:
        return {p.name: p for p in model.parameters_of(step.name)}
    sig = inspect.signature(step.load())
    return {
        name: p
        for name, p in sig.parameters.items()
        if name not in _RESERVED
        and p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    }


def _kind(param: inspect.Parameter) -> str:
    """``grid``, ``bool``, ``int``, ``float`` or ``str`` from an annotation or default."""
    ann = param.annotation
    text = ann if isinstance(ann, str) else getattr(ann, "__name__", repr(ann))
    text = str(text).replace(" ", "")
    if "Sequence[float]" in text or "tuple[float" in text or "list[float]" in text:
        return "grid"
    for name in ("bool", "int", "float"):
        if text == name or text.startswith(name + "|") or text.endswith("|" + name):
            return name
    default = param.default
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, int):
        return "int"
    if isinstance(default, float):
        return "float"
    return "str"


def parse_param(step: str | Step, name: str, text: str) -> Any:
    """Convert ``text`` to the type of parameter ``name`` of ``step``.

    Raises
    ------
    WorkflowError
        Unknown step or parameter, or a value of the wrong form.
    """
    obj = step if isinstance(step, Step) else STEPS.get(step)
    if obj is None:
        raise WorkflowError(f"--param {step}.{name}: unknown step; choose from {', '.join(STEPS)}")
    model = _model(obj)
    if model is not None:
        try:
            return model.validate_parameters(obj.name, {name: text})[name]
        except model.ParameterError as exc:
            raise WorkflowError(f"--param {obj.name}.{name}={text}: {exc}") from None
    params = step_parameter_names(obj)
    if name not in params:
        raise WorkflowError(
            f"--param {obj.name}.{name}={text}: {obj.name} has no parameter {name!r}; "
            f"it takes {', '.join(sorted(params)) or 'none'}"
        )
    kind = _kind(params[name])
    value = str(text).strip()
    where = f"--param {obj.name}.{name}={text}"
    try:
        if kind == "grid":
            parts = [float(v) for v in value.split(",")]
            if len(parts) != 3:
                raise ValueError
            lo, step_size, hi = parts
            if step_size <= 0 or hi <= lo:
                raise WorkflowError(f"{where}: need MIN < MAX and STEP > 0")
            return [lo, step_size, hi]
        if kind == "bool":
            low = value.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
    except ValueError:
        form = {"grid": "MIN,STEP,MAX", "bool": "true or false"}.get(kind, f"a {kind}")
        raise WorkflowError(f"{where}: expected {form}") from None
    return value


def parse_params(items: Iterable[str], steps: Iterable[str] | None = None) -> dict[str, Any]:
    """``["transform.qh=-5,0.05,5", "threshold=3"]`` -> ``{step: {name: value}}``.

    A name without a step applies to every chosen step (default: all) that takes it.
    """
    chosen = [STEPS[s] for s in (steps or STEPS) if s in STEPS]
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise WorkflowError(f"--param {item!r}: expected STEP.NAME=VALUE or NAME=VALUE")
        step, dot, name = key.partition(".")
        if dot:
            out.setdefault(step, {})[name] = parse_param(step, name, value)
            continue
        takers = [s for s in chosen if key in step_parameter_names(s)]
        if not takers:
            raise WorkflowError(
                f"--param {item!r}: no chosen step takes {key!r}; write STEP.{key}=VALUE"
            )
        for s in takers:
            out.setdefault(s.name, {})[key] = parse_param(s, key, value)
    return out


def step_params(params: Mapping[str, Any] | None, step: str) -> dict[str, Any]:
    """Parameters for one step: common scalars under ``params[step]`` (a mapping)."""
    common: dict[str, Any] = {}
    nested: dict[str, Any] = {}
    for key, value in (params or {}).items():
        if isinstance(value, Mapping):
            if key == step:
                nested.update(value)
        elif value is not None:
            common[key] = value
    return {**common, **nested}
