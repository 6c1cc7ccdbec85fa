"""Config dataclasses from a TOML file, the environment and the command line.

``from_toml`` reads a file, ``from_env`` reads ``PREFIX<FIELD>`` variables over it and
``add_config_flags`` makes one flag per field. A field whose default is itself a config
dataclass (``ServeConfig.session``) contributes its fields under their own names, so names
are unique across the nesting; in a file it is a table (``[session]``).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import tomllib
from collections.abc import Callable, Iterator
from enum import Enum
from typing import Any, TypeVar

T = TypeVar("T")
_UNSET = object()


class ConfigFileError(ValueError):
    """A config file that cannot be read, or a setting in it that does not fit its config."""


def _leaves(config: Any) -> Iterator[tuple[dataclasses.Field, Any]]:
    """(field, value) of every field of a config instance, nested configs flattened."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value)
        else:
            yield f, value


def _build(cls: type[T], value_of: Callable[[dataclasses.Field, Any], Any]) -> T:
    """``cls`` with each leaf field set to ``value_of(field, default)`` unless that is _UNSET."""
    default, values = cls(), {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            values[f.name] = _build(type(value), value_of)
        elif (given := value_of(f, value)) is not _UNSET:
            values[f.name] = given
    return cls(**values)


def add_config_flags(parser: argparse.ArgumentParser, defaults: Any, env_prefix: str = "",
                     help: dict[str, str] | None = None) -> None:
    """One flag per leaf field of the config instance ``defaults`` (``--redis-url`` for
    ``redis_url``; ``--x/--no-x`` for booleans), defaulting to its values (e.g. built by
    ``from_env`` with ``env_prefix``, which the help then names). The help shows the built-in
    default, never a value from the environment (tokens, URLs with passwords)."""
    for f, default in _leaves(defaults):
        flag = f"--{f.name.replace('_', '-')}"
        value = f.default.value if isinstance(f.default, Enum) else f.default
        shown = str(value).replace("%", "%%") if value != "" else "''"
        text = " ".join(filter(None, [(help or {}).get(f.name), f"(default: {shown}"
                                      + (f"; env {env_prefix}{f.name.upper()})" if env_prefix else ")")]))
        if isinstance(f.default, bool):
            parser.add_argument(flag, dest=f.name, default=default, action=argparse.BooleanOptionalAction, help=text)
        else:
            parser.add_argument(flag, dest=f.name, default=default, type=type(f.default), help=text)


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The config dataclass ``cls`` from flags added by ``add_config_flags``."""
    return _build(cls, lambda f, _: getattr(args, f.name))


def from_toml(cls: type[T], path: str) -> dict[str, Any]:
    """The settings of TOML file ``path`` for config dataclass ``cls``, by leaf field name (for
    ``from_env``'s ``base``): ``cls``'s own fields at the top, a table per nested config.
    Raises ``ConfigFileError`` naming the key of an unknown setting or a value of the wrong type."""
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigFileError(f"{path}: {e}") from None
    values: dict[str, Any] = {}
    _read_table(path, table, cls(), "", values)
    return values


def _read_table(path: str, table: dict[str, Any], config: Any, where: str, values: dict[str, Any]) -> None:
    fields = {f.name: f for f in dataclasses.fields(config)}
    for key, value in table.items():
        name = f"{where}{key}"
        if key not in fields:
            tables = [n for n, f in fields.items() if dataclasses.is_dataclass(v := getattr(config, n))
                      and any(g.name == key for g, _ in _leaves(v))]
            close = difflib.get_close_matches(key, fields, n=1)
            hint = (f" (it belongs in [{where}{tables[0]}])" if tables
                    else f" (did you mean {close[0]}?)" if close else "")
            raise ConfigFileError(f"{path}: {name}: no such setting{hint}")
        default = getattr(config, key)
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ConfigFileError(f"{path}: {name} is a table of settings ([{name}]), got {value!r}")
            _read_table(path, value, default, f"{name}.", values)
        else:
            values[key] = _setting(path, name, value, default)


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _setting(path: str, name: str, value: Any, default: Any) -> Any:
    """``value`` as the type of ``default``, or ``ConfigFileError``."""
    if isinstance(default, Enum):
        choices = [m.value for m in type(default)]
        if value not in choices:
            raise ConfigFileError(f"{path}: {name} must be one of {choices}, got {value!r}")
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(default, bool) and isinstance(value, bool)
    elif isinstance(default, float):
        ok, value = isinstance(value, (int, float)), float(value) if isinstance(value, (int, float)) else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        kind = _KINDS.get(type(default), type(default).__name__)
        raise ConfigFileError(f"{path}: {name} must be {kind}, got {value!r}")
    return value


def from_env(cls: type[T], prefix: str = "KVSTORE_", env: dict[str, str] | None = None,
             base: dict[str, Any] | None = None, **overrides: Any) -> T:
    """A config dataclass from its defaults, then ``base`` (``from_toml``), then
    ``PREFIX<FIELD>`` variables, then ``overrides`` (by leaf field name)."""
    env = os.environ if env is None else env
    base = base or {}
    if unknown := set(overrides) - {f.name for f, _ in _leaves(cls())}:
        raise TypeError(f"{cls.__name__} has no field(s) {sorted(unknown)}")

    def value_of(f: dataclasses.Field, default: Any) -> Any:
        if f.name in overrides:
            return overrides[f.name]
        raw = env.get(prefix + f.name.upper())
        if raw is None:
            return base.get(f.name, _UNSET)
        try:
            if isinstance(default, bool):
                return raw.strip().lower() in ("1", "true", "yes", "on")
            if isinstance(default, (int, float)) and not isinstance(default, Enum):
                return type(default)(raw)
            return raw
        except ValueError:
            raise ValueError(f"{prefix}{f.name.upper()}={raw!r} is not a valid {type(default).__name__}") from None
    return _build(cls, value_of)
