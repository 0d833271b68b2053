"""Config dataclasses: help text and validation on every field, YAML in and out, strict keys.

Every trainer's settings are a dataclass deriving from `Config`, fields declared with `param`:

    @dataclass
    class GRPOConfig(Config):
        lr: float = param(3e-4, "AdamW learning rate", range=(0, 1))
        objective: str = param("kl", "training objective", choices=("kl", "pg_detached"))

`__post_init__` checks each field against its declared type, then its range/choices, and raises
`ConfigError` naming the class.field, the bad value and what is allowed (`GRPOConfig.lr='fast' is
not a float`); subclasses add cross-field rules in `check()`. `from_dict`/`from_yaml` reject
unknown keys (a typo must not silently fall back to a default) and build nested configs;
`from_settings` builds one from a notebook's parameters, None meaning the field's default (so a
notebook re-declares no default); `to_yaml` writes what a run actually used.

Types, as YAML and notebooks hand them over:
    float        ints and numeric strings ('3e-4', which YAML reads as a string) become floats;
                 NaN and inf are refused (a range check cannot catch NaN: every comparison is False)
    int          integers only: bool is not an int, and neither is 2.5 nor 3.0 (an integral float
                 is refused too, so a computed count that drifted to a float is caught, not rounded)
    bool, str    exactly those (a path object becomes its str, so the config still writes as YAML)
    X | None     None, or an X
    dict[K, V]   every key a K and every value a V, e.g. `dict[str, float]` for reward weights and
                 dataset ratios (a bare `dict` checks only that it is a mapping)
    tuple[...]   a list becomes a tuple; items are checked when the annotation names their type
    a Config     an instance, or a dict of its fields
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .cli import UserError

_MISSING = dataclasses.MISSING


class ConfigError(UserError):
    """A config value or key is invalid; the message names it and says what is allowed (a user's
    mistake: a command reports it in one line, cli.py)."""


def param(default: Any = _MISSING, help: str = "", *, range: tuple[float | None, float | None] | None = None,
          choices: typing.Sequence[Any] | None = None, default_factory: Any = _MISSING) -> Any:
    """A dataclass field with help text and optional validation.

    range: (low, high) inclusive, None for an open end; choices: the allowed values."""
    metadata = {"help": help, "range": range, "choices": tuple(choices) if choices is not None else None}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _check_field(cls_name: str, f: dataclasses.Field, value: Any) -> None:
    low_high, choices = f.metadata.get("range"), f.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{cls_name}.{f.name}={value!r} is not allowed; choose one of {list(choices)}")
    if low_high is not None and value is not None:
        low, high = low_high
        if (low is not None and value < low) or (high is not None and value > high):
            raise ConfigError(f"{cls_name}.{f.name}={value!r} is out of range; allowed: "
                              f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]")


class _Mismatch(Exception):
    """A value that is not of the declared type: what was expected, and where inside the field."""

    def __init__(self, value: Any, expected: str, at: str = "", note: str = ""):
        super().__init__(expected)
        self.value, self.expected, self.at, self.note = value, expected, at, note


def _conform(value: Any, annotation: Any) -> Any:
    """`value` as the declared `annotation` (module docstring: YAML-friendly conversions, strict
    otherwise); raises _Mismatch."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return _conform_union(value, args)
    if isinstance(annotation, type) and issubclass(annotation, Config):
        if isinstance(value, dict):
            return annotation.from_dict(value)  # its own ConfigError names the inner field
        if isinstance(value, annotation):
            return value
        raise _Mismatch(value, f"a {annotation.__name__} (or a dict of its fields)")
    if annotation is float:
        return _conform_float(value)
    if annotation is int:
        return _conform_int(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch(value, "a bool (true or false)")
    if annotation is str:
        if isinstance(value, os.PathLike):
            return os.fspath(value)  # safe_dump cannot write a Path
        if isinstance(value, str):
            return value
        raise _Mismatch(value, "a str")
    if annotation is dict or origin is dict:
        return _conform_dict(value, args)
    if annotation is tuple or origin is tuple:
        return _conform_tuple(tuple(value) if isinstance(value, list) else value, args)
    if isinstance(annotation, type) and annotation is not object and not isinstance(value, annotation):
        raise _Mismatch(value, f"a {annotation.__name__}")
    return value  # Any, or a typing construct without a rule here


def _conform_union(value: Any, args: tuple) -> Any:
    if value is None and type(None) in args:
        return None
    options = [a for a in args if a is not type(None)]
    misses = []
    for option in options:
        try:
            return _conform(value, option)
        except _Mismatch as miss:
            misses.append(miss)
    first = misses[0]
    if first.at:  # the value had the right shape and failed inside (a dict entry): that is the news
        raise first
    expected = " or ".join(m.expected for m in misses) + (" or None" if type(None) in args else "")
    raise _Mismatch(value, expected, note=first.note)


def _conform_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        raise _Mismatch(value, "a float")
    try:
        number = float(value)
    except ValueError:
        raise _Mismatch(value, "a float") from None
    if not math.isfinite(number):
        raise _Mismatch(value, "a finite float", note=" (NaN and inf are not allowed)")
    return number


def _conform_int(value: Any) -> int:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)  # numpy ints too, as plain ints so the config writes as YAML
    if isinstance(value, float) and value.is_integer():
        raise _Mismatch(value, "an int", note=f" (write {int(value)}, without a decimal point)")
    raise _Mismatch(value, "an int")


def _conform_dict(value: Any, args: tuple) -> dict:
    if not isinstance(value, dict):
        raise _Mismatch(value, "a dict" if not args else f"a dict of {_name(args[0])} -> {_name(args[1])}")
    if not args:
        return value
    kind = f"a dict of {_name(args[0])} -> {_name(args[1])}"
    out = {}
    for k, v in value.items():
        try:
            key = _conform(k, args[0])
        except _Mismatch as miss:
            raise _Mismatch(k, f"{miss.expected} (the keys of {kind})", " key", miss.note) from None
        try:
            out[key] = _conform(v, args[1])
        except _Mismatch as miss:
            raise _Mismatch(miss.value, miss.expected, f"[{k!r}]{miss.at}", miss.note) from None
    return out


def _conform_tuple(value: Any, args: tuple) -> tuple:
    if not isinstance(value, tuple):
        raise _Mismatch(value, "a tuple (or a list)")
    if not args:
        return value
    kinds = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
    if len(kinds) != len(value):
        raise _Mismatch(value, f"a tuple of {len(kinds)} items")
    items = []
    for i, (item, kind) in enumerate(zip(value, kinds)):
        try:
            items.append(_conform(item, kind))
        except _Mismatch as miss:
            raise _Mismatch(miss.value, miss.expected, f"[{i}]{miss.at}", miss.note) from None
    return tuple(items)


def _name(annotation: Any) -> str:
    return getattr(annotation, "__name__", str(annotation))


@dataclasses.dataclass
class Config:
    """Base class: validation on construction, strict dict/YAML round-trips, help text."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            given = getattr(self, f.name)
            try:
                value = _conform(given, hints.get(f.name, Any))
            except _Mismatch as miss:  # before the range check, which would compare a str with a number
                raise ConfigError(f"{type(self).__name__}.{f.name}{miss.at}={miss.value!r} is not {miss.expected}"
                                  f"{miss.note}") from None
            object.__setattr__(self, f.name, value)
            _check_field(type(self).__name__, f, value)
        self.check()

    def check(self) -> None:
        """Cross-field rules; override and raise ConfigError."""

    # -- construction
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Config":
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in values if k not in names]
        if unknown:
            hints = {k: difflib.get_close_matches(k, names, n=1) for k in unknown}
            said = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
            raise ConfigError(f"unknown {cls.__name__} key(s): {said}; valid keys: {names}")
        return cls(**values)

    @classmethod
    def from_settings(cls, settings: dict[str, Any], *overrides: dict[str, Any]) -> "Config":
        """The config of a notebook's parameters, each default living here, in the dataclass.

        `settings`: field -> value, None standing for the field's own default (a notebook declares
        `lr = None` and a run spec or `-p lr=3e-4` sets it). Then each mapping in `overrides` (a
        notebook's `extra`, a trainer's `trainer_extra` entry) sets fields explicitly, later ones
        winning. None loses nothing as "the default": every field that may be None defaults to
        None (tests/test_notebooks.py checks the trainers' configs). Unknown names are a
        ConfigError naming the closest field, as in `from_dict`."""
        values = {k: v for k, v in settings.items() if v is not None}
        for mapping in overrides:
            values.update(mapping)
        return cls.from_dict(values)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Config":
        """The config of a YAML file of fields; a broken or misshapen file is a ConfigError naming it."""
        from .safe_files import FileError, read_mapping

        try:
            values = read_mapping(path, f"a {cls.__name__} file")
        except FileError as error:
            raise ConfigError(str(error)) from None
        return cls.from_dict(values)

    def replace(self, **overrides: Any) -> "Config":
        """A validated copy with some fields changed (unknown names are an error)."""
        return type(self).from_dict({**self.to_dict(shallow=True), **overrides})

    # -- output
    def to_dict(self, shallow: bool = False) -> dict[str, Any]:
        if shallow:
            return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return _plain(dataclasses.asdict(self))

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The declared default of each field that has one, as a saved config.yaml holds it."""
        values = {}
        for f in dataclasses.fields(cls):
            if f.default is not _MISSING:
                values[f.name] = f.default
            elif f.default_factory is not _MISSING:
                values[f.name] = f.default_factory()
        return yaml.safe_load(yaml.safe_dump(_plain(values), sort_keys=False))

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def help(cls) -> str:
        """One line per field: name, default, help, constraints."""
        lines = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not _MISSING else (
                f.default_factory() if f.default_factory is not _MISSING else "<required>")
            rule = f.metadata.get("choices") or f.metadata.get("range") or ""
            lines.append(f"{f.name} = {default!r}: {f.metadata.get('help', '')}" + (f" {list(rule)}" if rule else ""))
        return "\n".join(lines)


def _plain(value: Any) -> Any:
    """Tuples -> lists and so on, so safe_dump writes plain YAML."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
