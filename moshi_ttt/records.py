"""Typed records in and out of plain data (YAML/JSON): one library, pydantic, for every boundary.

A record is a standard ``@dataclass`` (configs, results, manifests), owned by the module that
writes it. ``load(cls, data)`` validates a mapping into it (types, literals, nesting, unknown keys),
``dump(obj)`` gives the JSON-able mapping back. Errors are ``ConfigValueError`` naming the dotted
key and the value (``optim.lr: expected a number, got 'fast'``); the dataclass's own
``__post_init__`` range checks run as usual and are reported under the record's name.

Strictness: unknown keys are errors (set ``__pydantic_config__ = ConfigDict(extra="forbid")`` on a
record, or use :data:`FORBID`); numbers may come as YAML 1.1 strings such as ``1e-3`` (PyYAML
reads them so) but no other string becomes a number, and no number becomes a bool.

This module imports nothing from the package except :mod:`moshi_ttt.errors`, so every layer can use it.
"""

from __future__ import annotations

import functools
from typing import Any, TypeVar

from pydantic import ConfigDict, TypeAdapter, ValidationError

from .errors import ConfigValueError

T = TypeVar("T")

#: The config every record uses: unknown keys are errors; no silent str->int/bool coercion.
FORBID = ConfigDict(extra="forbid", strict=False, coerce_numbers_to_str=False)


@functools.cache
def _adapter(cls: Any) -> TypeAdapter:
    return TypeAdapter(cls)


def _where(loc: tuple[Any, ...], prefix: str) -> str:
    parts = [f"[{p}]" if isinstance(p, int) else str(p) for p in loc
             if not (isinstance(p, str) and p.startswith(("function-", "lax-", "json-")))]
    key = ""
    for p in parts:
        key += p if p.startswith("[") or not key else "." + p
    return prefix + key if key else (prefix.rstrip(".") or "config")


def _message(err: dict[str, Any], prefix: str) -> str:
    key = _where(tuple(err.get("loc", ())), prefix)
    kind, value = err.get("type", ""), err.get("input")
    if kind == "extra_forbidden":
        return f"{key}: unknown key"
    if kind == "missing":
        return f"{key}: required, missing"
    if kind in ("float_parsing", "float_type"):
        return f"{key}: expected a number, got {value!r}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"{key}: expected an integer, got {value!r}"
    if kind in ("bool_parsing", "bool_type"):
        return f"{key}: expected true/false, got {value!r}"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"{key}: expected one of {expected}, got {value!r}"
    if kind in ("value_error", "assertion_error"):
        msg = str(err.get("ctx", {}).get("error", err.get("msg", "")))
        return f"{key}: {msg}"
    return f"{key}: {err.get('msg', 'invalid value')}, got {value!r}"


def load(cls: type[T], data: Any, prefix: str = "") -> T:
    """Validate ``data`` (a mapping, or an instance) into record ``cls``.

    Raises ``ConfigValueError`` whose message names every offending dotted key (with ``prefix``,
    e.g. ``"train."``) and its value.
    """
    if isinstance(cls, type) and isinstance(data, cls):
        return data
    try:
        return _adapter(cls).validate_python(data)
    except ValidationError as e:
        msgs = [_message(err, prefix) for err in e.errors(include_url=False)]
        raise ConfigValueError("; ".join(dict.fromkeys(msgs))) from None
    except (TypeError, ValueError) as e:  # a record's own __post_init__ outside pydantic's wrapping
        raise ConfigValueError(f"{prefix.rstrip('.') or getattr(cls, '__name__', 'config')}: {e}") from e


def dump(obj: Any) -> Any:
    """The JSON-able form of a record (mappings, lists, numbers, strings, None)."""
    return _adapter(type(obj)).dump_python(obj, mode="json")
