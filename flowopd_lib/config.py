"""Config dataclasses: help text and validation on every field, YAML in and out, strict keys.

Every trainer's settings are a dataclass deriving from `Config`, fields declared with `param`:

    @dataclass
    class GRPOConfig(Config):
        lr: float = param(3e-4, "AdamW learning rate", range=(0, 1))
        objective: str = param("kl", "training objective", choices=("kl", "pg_detached"))

`__post_init__` checks each field's declared range/choices and raises `ConfigError` naming the
field, the bad value and what is allowed; subclasses add cross-field rules in `check()`.
`from_dict`/`from_yaml` reject unknown keys (a typo must not silently fall back to a default)
and build nested configs; `to_yaml` writes what a run actually used.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

_MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A config value or key is invalid; the message names it and says what is allowed."""


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


def _coerce(value: Any, annotation: Any) -> Any:
    """YAML-friendly conversions: nested dicts -> configs, ints/strings like '3e-4' -> floats,
    lists -> tuples where the field is a tuple."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, options[0]) if len(options) == 1 else value
    if isinstance(annotation, type) and issubclass(annotation, Config) and isinstance(value, dict):
        return annotation.from_dict(value)
    if annotation is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            return value  # validation names the bad value
    if (annotation is tuple or origin is tuple) and isinstance(value, list):
        return tuple(value)
    return value


@dataclasses.dataclass
class Config:
    """Base class: validation on construction, strict dict/YAML round-trips, help text."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _coerce(getattr(self, f.name), hints.get(f.name, Any))
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
    def from_yaml(cls, path: str | Path) -> "Config":
        values = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of {cls.__name__} fields, got {type(values).__name__}")
        return cls.from_dict(values)

    def replace(self, **overrides: Any) -> "Config":
        """A validated copy with some fields changed (unknown names are an error)."""
        return type(self).from_dict({**self.to_dict(shallow=True), **overrides})

    # -- output
    def to_dict(self, shallow: bool = False) -> dict[str, Any]:
        if shallow:
            return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return _plain(dataclasses.asdict(self))

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
