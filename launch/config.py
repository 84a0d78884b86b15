"""TOML → typed dataclass configs, with dotted ``key=value`` overrides.

Every stage declares its config as a tree of dataclasses. :func:`load` reads a TOML file, applies
overrides such as ``output.samples_per_shard=500``, and builds the tree, checking every key and
type. Anything wrong is a :class:`ConfigError` whose message is one line naming the file, the key
and what was expected, so the CLI can print it without a traceback. :func:`save` writes the
resolved config back as TOML beside a stage's outputs, so every output says how it was made.
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import tomli_w

from mie.launch.errors import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A config problem, stated in one line: file, key, reason."""


def load(cls: type[T], path: str | os.PathLike | None, overrides: list[str] = ()) -> T:
    """Build a ``cls`` instance from the TOML file at ``path`` (or only defaults when None) and
    ``key=value`` overrides (dotted keys for nested tables; values are TOML literals, bare words
    are strings)."""
    source = str(path) if path is not None else "<defaults>"
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{source}: config file not found")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{source}: not valid TOML ({e})") from None
    for ov in overrides:
        _apply_override(data, ov, source)
    return from_dict(cls, data, source)


def from_dict(cls: type[T], data: dict[str, Any], source: str = "<dict>", prefix: str = "") -> T:
    """Build dataclass ``cls`` from a plain dict, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: key '{prefix.rstrip('.') or '<root>'}': expected a table, got {_tname(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key '{prefix}{unknown[0]}' (expected one of: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], source, key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key '{key}' ({_describe(hints[name])})")
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as e:
            raise ConfigError(f"{source}: {prefix}{e}") from None
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain TOML-ready data (None values are dropped, TOML has no null)."""
    def strip(v):
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if x is not None}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v
    return strip(dataclasses.asdict(cfg))


def dumps(cfg: Any) -> str:
    """The resolved config as TOML text."""
    return tomli_w.dumps(to_dict(cfg))


def save(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as TOML, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(dumps(cfg), encoding="utf-8")
    os.replace(tmp, path)


def _apply_override(data: dict, override: str, source: str) -> None:
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"{source}: override '{override}': expected key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # bare words are strings: out=runs/x, format=gmner
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{source}: override '{override}': '{'.'.join(parts[: i + 1])}' is not a table")
        node = nxt
    node[parts[-1]] = value


def _coerce(tp: Any, value: Any, source: str, key: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source, key + ".")
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, source, key)
            except ConfigError:
                pass
        raise ConfigError(f"{source}: key '{key}': expected {_describe(tp)}, got {_tname(value)} {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            choices = "|".join(str(a) for a in get_args(tp))
            raise ConfigError(f"{source}: key '{key}': expected one of {choices}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: key '{key}': expected {_describe(tp)}, got {_tname(value)} {value!r}")
        (arg,) = get_args(tp) or (Any,)
        return [_coerce(arg, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: key '{key}': expected {_describe(tp)}, got {_tname(value)} {value!r}")
        _, varg = get_args(tp) or (str, Any)
        return {str(k): _coerce(varg, v, source, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{source}: key '{key}': expected {tp.__name__}, got bool {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{source}: key '{key}': expected {_describe(tp)}, got {_tname(value)} {value!r}")


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return "a table"
    if origin is Literal:
        return "one of " + "|".join(str(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp) if a is not type(None))
    if origin is list:
        return f"a list of {_describe(get_args(tp)[0])}"
    if origin is dict:
        return f"a table of {_describe(get_args(tp)[1])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true|false"}.get(tp, str(tp))


def _tname(value: Any) -> str:
    return {bool: "bool", int: "integer", float: "number", str: "string", list: "list", dict: "table"}.get(
        type(value), type(value).__name__
    )
