"""Typed TOML configs: dataclasses in, unknown keys and wrong types out, errors naming the key.
Shared by the agent's and the cloud's configs."""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

from agent.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (JetPack 6)
    import tomli as tomllib

T = TypeVar("T")


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as err:
        raise ConfigError(f"config file not found: {path} (pass --config PATH, or set the variable it names)") from err
    except OSError as err:
        raise ConfigError(f"cannot read the config file {path}: {err.strerror or err}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from err


def build(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Make `cls` (a dataclass) from a TOML table, recursing into nested dataclasses."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key '{where}{unknown[0]}' (known: {', '.join(sorted(fields))})")
    values = {name: _coerce(hints[name], data[name], f"{where}{name}") for name in fields if name in data}
    try:
        obj = cls(**values)
    except TypeError as err:  # a required key is missing
        missing = [n for n, f in fields.items() if n not in data and _required(f)]
        raise ConfigError(f"missing key {where}{missing[0] if missing else '?'}") from err
    check = getattr(obj, "check", None)
    if check is not None:
        check()
    return obj


def _required(f: dataclasses.Field[Any]) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        return value
    if origin in (list, tuple, dict):
        return _container(origin, typing.get_args(tp), value, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a table")
        return build(typing.cast(type, tp), value, f"{key}.")
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: must be a path (string)")
        return Path(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{key}: must be {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _container(origin: Any, args: tuple[Any, ...], value: Any, key: str) -> Any:
    """A list (of args[0]) or a table of names to args[1]."""
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a table")
        return {k: _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if not isinstance(value, list):
        raise ConfigError(f"{key}: must be a list")
    return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]


def positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{key}: must be > 0, got {value!r}")
