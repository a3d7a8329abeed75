"""Typed records in and out of plain data (YAML/JSON): one library, pydantic, for every boundary.

A record is a standard ``@dataclass`` (configs, results, manifests), owned by the module that
writes it. ``load(cls, data)`` validates a mapping into it (types, literals, nesting, unknown keys),
``dump(obj)`` gives the JSON-able mapping back. Errors are ``ConfigValueError`` naming the dotted
key and the value (``optim.lr: expected a number, got 'fast'``); a record's own ``__post_init__``
checks run as usual, and when they raise :class:`FieldValueError` the message names the dotted key
of the field too.

Strictness is that of a config file, whatever the source: data is validated in pydantic's strict
JSON mode, so an integer field takes an integer only (not ``2.5``, ``true`` or ``"3"``), a flag takes
``true``/``false`` only (not ``1``), a number takes an integer or a float (never a string: the YAML
reader below reads ``1e-3`` as the number YAML 1.2 says it is), a section takes a mapping. Python
values are written as JSON first (nested records, paths and numpy scalars as their plain form).
Unknown keys are errors in every dataclass a record reaches: :func:`load` gives each one without a
``__pydantic_config__`` of its own the :data:`FORBID` config (a record may set its own to opt out);
keys a record lists in its ``LEGACY_KEYS`` class variable (written by earlier versions) are dropped.

Config files come in through the same module: :func:`read_yaml` reads a YAML mapping and applies the
``--set key=value`` overrides (:func:`apply_overrides`, dotted keys, YAML values), so that every
command reads "a config file plus dotted overrides" the same way.

This module imports nothing from the package except :mod:`moshi_ttt.errors`, so every layer can use it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import types
import typing
from pathlib import Path, PurePath
from typing import Any, Literal, TypeVar

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError

from .errors import ConfigValueError

T = TypeVar("T")

#: The config every record gets unless it sets its own: unknown keys are errors.
FORBID = ConfigDict(extra="forbid")


class FieldValueError(ConfigValueError):
    """A record's own check (``__post_init__``) refuses the value of one field.

    ``str()`` reads ``Record.key=value: reason`` (what direct construction shows); :func:`load`
    re-words it as ``dotted.key: reason, got value`` with the key's full path. ``key`` may itself be
    dotted (``"loss.text_weight"``) when the check belongs to an enclosing record. Given a message
    alone (``key`` empty) it is a plain ``ConfigValueError``: what :func:`load` raises as ``error``.
    """

    def __init__(self, record: str, key: str = "", value: Any = None, reason: str = "") -> None:
        super().__init__(f"{record}.{key}={value!r}: {reason}" if key else record)
        self.key, self.value, self.reason = key, value, reason or record


# ----------------------------------------------------------------------------- type walking
def _args(tp: Any) -> tuple[Any, ...]:
    return typing.get_args(tp)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _non_none(tp: Any) -> list[Any]:
    return [a for a in _args(tp) if a is not type(None)]


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _forbid_unknown_keys(tp: Any, seen: set[int] | None = None) -> None:
    """Give every dataclass reachable from ``tp`` the :data:`FORBID` config unless it has its own.

    Done before the first adapter is built (pydantic reads the config when it builds the schema), so
    that a nested record (``ttt``, ``loss``) refuses unknown keys without importing this module.
    """
    seen = set() if seen is None else seen
    if id(tp) in seen:
        return
    seen.add(id(tp))
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not hasattr(tp, "__pydantic_config__"):  # its own, or one it inherits, is kept
            tp.__pydantic_config__ = FORBID  # type: ignore[attr-defined]
        for hint in _hints(tp).values():
            _forbid_unknown_keys(hint, seen)
    for a in _args(tp):
        _forbid_unknown_keys(a, seen)


@functools.cache
def _adapter(cls: Any) -> TypeAdapter:
    _forbid_unknown_keys(cls)
    return TypeAdapter(cls)


def _describe(tp: Any) -> str:
    """What a value of type ``tp`` looks like in a config file, for an error message."""
    if tp is bool:
        return "true/false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str or (isinstance(tp, type) and issubclass(tp, PurePath)):
        return "a string"
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return f"one of {list(_args(tp))}"
    if _is_union(tp):
        return " or ".join(dict.fromkeys(_describe(a) for a in _args(tp)))
    if origin in (list, tuple, set, frozenset) or tp in (list, tuple):
        inner = _args(tp)
        return f"a list of {_describe(inner[0]).removeprefix('a ').removeprefix('an ')}s" \
            if len(inner) >= 1 and inner[0] in (int, float, str) else "a list"
    if origin is dict or tp is dict or dataclasses.is_dataclass(tp):
        return "a mapping"
    return "a valid value"


def _walk(root: Any, loc: tuple[Any, ...]) -> tuple[str, Any, Any, int]:
    """Follow pydantic's error location through the types: ``(dotted key, type there, enclosing
    dataclass, loc entries consumed)``. Union member tags (``'list[int]'``) are not keys: the walk
    stops at a union of several types and reports the union (the value matched none of them)."""
    key, tp, owner = "", root, None
    for n, part in enumerate(loc):
        while _is_union(tp) and len(_non_none(tp)) == 1:  # X | None: pydantic adds no tag
            tp = _non_none(tp)[0]
        if _is_union(tp):
            return key, tp, owner, n
        origin = typing.get_origin(tp)
        if dataclasses.is_dataclass(tp) and isinstance(part, str):
            owner, tp = tp, _hints(tp).get(part, Any)
            key += ("." if key else "") + part
        elif isinstance(part, int) and (origin in (list, tuple) or tp in (list, tuple)):
            inner = _args(tp)
            tp = inner[0] if inner and (origin is list or (len(inner) == 2 and inner[1] is Ellipsis)) else \
                inner[part] if part < len(inner) else Any
            key += f"[{part}]"
        elif origin is dict:
            tp = _args(tp)[1] if len(_args(tp)) == 2 else Any
            key += ("." if key else "") + str(part)
        else:  # Any, or a tag we do not model: keep the raw location
            tp = Any
            key += f"[{part}]" if isinstance(part, int) else ("." if key else "") + str(part)
    return key, tp, owner, len(loc)


def _message(root: Any, err: dict[str, Any], prefix: str) -> str:
    loc = tuple(err.get("loc", ()))
    key, tp, owner, used = _walk(root, loc)
    full = prefix + key if key else (prefix.rstrip(".") or "")
    where = full or getattr(root, "__name__", "config")
    kind, value = err.get("type", ""), err.get("input")
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        name = getattr(owner, "__name__", "config")
        known = ", ".join(f.name for f in dataclasses.fields(owner) if f.init) if owner is not None else ""
        return f"{where}: unknown {name} key" + (f"; known: {known}" if known else "")
    if kind in ("missing", "missing_argument"):
        return f"{where}: required, missing"
    if kind in ("value_error", "assertion_error"):
        exc = err.get("ctx", {}).get("error")
        if isinstance(exc, FieldValueError) and exc.key:
            dotted = ".".join(p for p in (full, exc.key) if p)
            return f"{dotted}: {exc.reason}, got {exc.value!r}"
        what = exc if exc is not None else err.get("msg", "invalid value")
        return f"{full}: {what}" if full else str(what)
    if used < len(loc):  # the value matched no member of a union: say what each would take
        return f"{where}: expected {_describe(tp)}" + (f", got {value!r}" if used == len(loc) - 1 else "")
    if kind == "literal_error":
        return f"{where}: expected one of {list(_args(tp)) if typing.get_origin(tp) is Literal else '?'}, " \
               f"got {value!r}"
    if tp is not Any and (kind.endswith(("_type", "_parsing")) or kind == "int_from_float"):
        return f"{where}: expected {_describe(tp)}, got {value!r}"
    return f"{where}: {err.get('msg', 'invalid value')}, got {value!r}"  # a constraint or a custom error


# ----------------------------------------------------------------------------- load / dump
def _drop_legacy(tp: Any, data: Any) -> Any:
    """``data`` without the keys a record lists in ``LEGACY_KEYS`` (a ``ClassVar``: keys that
    earlier versions wrote and that mean nothing now), at every depth, so that old files still load
    while a misspelt key stays an error."""
    while _is_union(tp) and len(_non_none(tp)) == 1:
        tp = _non_none(tp)[0]
    if dataclasses.is_dataclass(tp) and isinstance(data, dict):
        legacy, hints = getattr(tp, "LEGACY_KEYS", ()), _hints(tp)
        return {k: _drop_legacy(hints.get(k, Any), v) for k, v in data.items() if k not in legacy}
    origin, args = typing.get_origin(tp), _args(tp)
    if origin is list and args and isinstance(data, list):
        return [_drop_legacy(args[0], v) for v in data]
    if origin is dict and len(args) == 2 and isinstance(data, dict):
        return {k: _drop_legacy(args[1], v) for k, v in data.items()}
    return data


def _plain(obj: Any) -> Any:
    """``json.dumps`` fallback: records nested in the data (an instance given in place of a
    section), paths, tuples' elements are written as their plain form."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dump(obj)
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "item"):  # a numpy or torch scalar
        return obj.item()
    raise TypeError(f"not plain data: {obj!r}")


def load(cls: type[T], data: Any, prefix: str = "", error: type[ConfigValueError] = ConfigValueError,
         strict: bool = True) -> T:
    """Validate ``data`` (a mapping, or an instance) into record ``cls``.

    Raises ``error`` (a ``ConfigValueError``) whose message names every offending dotted key (with
    ``prefix``, e.g. ``"train."``) and its value, ``"; "``-separated. ``strict=False`` validates the
    Python data in pydantic's lax mode instead (``"3"`` or ``3.0`` for an integer, ``1`` for a flag):
    for data no person wrote, e.g. results computed in floats, never for configs.
    """
    if isinstance(cls, type) and isinstance(data, cls):
        return data
    data = _drop_legacy(cls, data)
    try:
        if not strict:
            return _adapter(cls).validate_python(data)
        try:
            text = json.dumps(data, default=_plain, allow_nan=True)
        except (TypeError, ValueError) as e:
            raise error(f"{prefix.rstrip('.') or getattr(cls, '__name__', 'config')}: {e}") from None
        return _adapter(cls).validate_json(text, strict=True)
    except ValidationError as e:
        msgs = list(dict.fromkeys(_message(cls, err, prefix) for err in e.errors(include_url=False)))
        # A value that fits no member of a union gives one error per member; keep the one with the value.
        msgs = [m for m in msgs if not any(o != m and o.startswith(m) for o in msgs)]
        raise error("; ".join(msgs)) from None


def dump(obj: Any) -> Any:
    """The JSON-able form of a record (mappings, lists, numbers, strings, None)."""
    return _adapter(type(obj)).dump_python(obj, mode="json")


def check_range(record: str, key: str, value: float, low: float = -math.inf, high: float = math.inf,
                low_in: bool = True, high_in: bool = True,
                error: type[FieldValueError] = FieldValueError) -> None:
    """Raise ``error`` (a :class:`FieldValueError`) unless ``value`` is a finite number in the
    interval; the bounds' brackets in the message say whether they are included."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (number and (value >= low if low_in else value > low) and (value <= high if high_in else value < high)):
        interval = f"{'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"
        raise error(record, key, value, f"must be a finite number in {interval}")


# ----------------------------------------------------------------------------- YAML files and --set overrides
class _YAMLLoader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, which reads ``1e-3`` (no dot) as a string; YAML 1.2 and every user
    mean a number. Records take no string for a number, so the reader resolves it."""


_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    """A YAML document (or a ``--set`` value) as plain data, numbers as YAML 1.2 reads them."""
    return yaml.load(text, Loader=_YAMLLoader)  # noqa: S506 - a SafeLoader subclass


def apply_overrides(data: dict[str, Any], overrides: list[str],
                    error: type[ConfigValueError] = ConfigValueError) -> dict[str, Any]:
    """``["optim.lr=1e-3", "ttt.layers=[1,2]"]``: values parsed as YAML scalars/lists."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise error(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = parse_yaml(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise error(f"--set {item!r}: the value is not valid YAML ({' '.join(str(e).split())})") from e
        node = data
        parts = key.strip().split(".")
        if not all(parts):
            raise error(f"--set {item!r}: empty key component")
        for i, p in enumerate(parts[:-1]):
            child = node.get(p)
            if p in node and not isinstance(child, dict):
                # A null or scalar section would be replaced by the override alone: the rest of
                # what the user wrote (or meant to write) there would silently vanish.
                where = ".".join(parts[:i + 1])
                raise error(f"--set {item!r}: '{where}' is {child!r} in the config, not a mapping; "
                            f"fix or remove the '{where}:' section first")
            node[p] = dict(child) if isinstance(child, dict) else {}
            node = node[p]
        node[parts[-1]] = value
    return data


def read_yaml(path: str | Path | None, overrides: list[str] | None = None,
              error: type[ConfigValueError] = ConfigValueError) -> dict[str, Any]:
    """A YAML mapping from ``path`` (None: empty) with ``--set`` overrides applied; errors name the file."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise error(f"config file not found: {path}")
        try:
            data = parse_yaml(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise error(f"{path}: not valid YAML ({' '.join(str(e).split())})") from e
        if not isinstance(data, dict):
            raise error(f"{path}: the top level must be a mapping")
    return apply_overrides(data, overrides or [], error)
