"""The one strict loader of typed configs: frozen dataclasses built from mappings (YAML recipes, JSON model configs).

Pretraining recipes (:mod:`onepeace.train.config`), fine-tuning recipes (:mod:`onepeace.finetune.config`) and the
model config of a checkpoint directory (:meth:`onepeace.config.OnePeaceConfig.from_dict`) are all read by
:func:`build_section`: unknown keys at any level are errors naming the dotted key and the allowed keys, values are
checked against the field annotations (lists become tuples, ints become floats where a float is declared, strings
become enum members), and the dataclass's own checks run last. No torch here.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from onepeace.errors import require


def build_section(cls: type, values: Any, where: str = "") -> Any:
    """Instantiate dataclass ``cls`` from a mapping; unknown keys and wrong types raise ``ValueError``.

    ``where`` is the dotted name of the section (``""`` for the top level) used in messages.
    """
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ValueError(f"{where or 'recipe'} must be a mapping, got {type(values).__name__}")
    allowed = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in values:
        if key not in allowed:
            raise ValueError(f"unknown key {_dotted(where, str(key))!r}; allowed keys: {', '.join(sorted(allowed))}")
    hints = typing.get_type_hints(cls)
    kwargs = {key: _coerce(hints[key], value, _dotted(where, key)) for key, value in values.items()}
    check_bounds(cls, kwargs, where)
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ValueError(f"{where or 'recipe'}: {exc}") from exc


def bounded(default: Any, low: float | None = None, high: float | None = None, **checks: Any) -> Any:
    """A dataclass field with a range that :func:`check_bounds` enforces: ``low <= value <= high``, and optionally
    ``multiple_of`` (an int), ``length`` (``(min, max)`` items of a tuple) and ``items`` (one ``(low, high)`` per
    position of each inner tuple, for a tuple of tuples)."""
    return dataclasses.field(default=default, metadata={"bounds": {"low": low, "high": high, **checks}})


def check_bounds(cls: type, values: Mapping[str, Any], where: str = "") -> None:
    """Raise ``ValueError`` naming the dotted key of the first value of ``values`` outside its :func:`bounded`
    range (fields without a range, and keys ``values`` lacks, are not checked)."""
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("bounds")
        if spec is not None and f.name in values:
            _check_bounded(_dotted(where, f.name), values[f.name], spec)


def _check_bounded(key: str, value: Any, spec: Mapping[str, Any]) -> None:
    if isinstance(value, tuple):
        low, high = spec.get("length", (None, None))
        if (low is not None and len(value) < low) or (high is not None and len(value) > high):
            raise ValueError(f"{key} must have {_span(low, high)} items, got {len(value)}")
        for i, item in enumerate(value):
            for j, (lo, hi) in enumerate(spec.get("items", ())):
                _check_number(f"{key}[{i}][{j}]", item[j], lo, hi)
        return
    _check_number(key, value, spec["low"], spec["high"])
    multiple = spec.get("multiple_of")
    if multiple and value % multiple:
        raise ValueError(f"{key} must be a multiple of {multiple}, got {value!r}")


def _check_number(key: str, value: Any, low: float | None, high: float | None) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{key} must be {_span(low, high)}, got {value!r}")


def _span(low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f"between {low:g} and {high:g}"
    return f">= {low:g}" if low is not None else f"<= {high:g}"


def _dotted(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; lists become tuples and ints become floats where declared."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return build_section(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise ValueError(f"{key} must be one of {', '.join(repr(a) for a in args)}; got {value!r}")
    if origin is tuple:
        return _coerce_tuple(args, value, key)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _coerce_enum(tp, value, key)
    if tp in (bool, int, float, str):
        return _coerce_scalar(tp, value, key)
    raise TypeError(f"{key}: unsupported annotation {tp!r}")


def _coerce_scalar(tp: type, value: Any, key: str) -> Any:
    is_bool = isinstance(value, bool)
    if tp is bool and is_bool:
        return value
    if tp is int and isinstance(value, int) and not is_bool:
        return value
    if tp is float and isinstance(value, int | float) and not is_bool:
        return float(value)
    if tp is str and isinstance(value, str):
        return value
    name = {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}[tp]
    raise ValueError(f"{key} must be {name}, got {value!r} ({type(value).__name__})")


def _coerce_enum(tp: type[enum.Enum], value: Any, key: str) -> enum.Enum:
    if isinstance(value, tp):
        return value
    try:
        return tp(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in tp)
        raise ValueError(f"{key} must be one of {allowed}; got {value!r}") from None


def _coerce_tuple(args: tuple, value: Any, key: str) -> tuple:
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise ValueError(f"{key} must be a list, got {value!r}")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise ValueError(f"{key} must have {len(args)} items, got {len(value)}")
    return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))


# ---------------------------------------------------------------------------------------------- YAML in and out
_EXP_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
"""Exponent floats YAML 1.1 reads as strings (``1e-4``, ``1.0e5``)."""


def _yaml_load(text: str, source: str) -> Any:
    """Safe YAML load that also reads ``1e-4`` (no dot) as a float, as people write learning rates."""
    yaml = require("yaml", "train")

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT, list("-+0123456789"))
    try:
        return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ValueError(f"{source}: not valid YAML ({exc})") from exc


def read_mapping(text: str, source: str = "recipe") -> dict[str, Any]:
    """The top-level mapping of YAML (or JSON) ``text``; empty text is ``{}``, anything else is a ``ValueError``."""
    raw = _yaml_load(text, source)
    if raw is not None and not isinstance(raw, dict):
        raise ValueError(f"{source}: the top level must be a mapping, got {type(raw).__name__}")
    return raw or {}


def load_config(cls: type, text: str, overrides: Sequence[str] = (), source: str = "config") -> Any:
    """Dataclass ``cls`` from YAML or JSON ``text`` with ``key.sub=value`` ``overrides`` applied, strictly."""
    return build_section(cls, apply_overrides(read_mapping(text, source), overrides))


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Copy of ``raw`` with each ``key.sub=value`` applied; values are parsed as YAML scalars (or flow lists)."""
    out = copy.deepcopy(dict(raw))
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ValueError(f"override {item!r} must look like key.sub=value")
        node = out
        for depth, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ValueError(f"override {item!r}: {'.'.join(parts[: depth + 1])} is not a section")
            node = node[part]
        node[parts[-1]] = _yaml_load(text, f"override {item!r}")
    return out
