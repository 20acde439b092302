"""A training command's YAML config read into its dataclass, or one ConfigError (exit code 5) that names the file and
the key: a file that cannot be read, an unknown key (with the known ones closest to it), a value of the wrong type,
a value the dataclass refuses."""
from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Any, Iterable, Mapping, TypeVar

from midog.config import as_float, read_config_file
from midog.errors import ConfigError, first_line

T = TypeVar("T")

SIMPLE_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "list": (list, tuple),
    "tuple": (list, tuple), "dict": (dict,), "None": (type(None),)}
"""What a value of each annotation may be (YAML gives lists for tuples, and ints for floats); an annotation made
of other names is not checked."""


def read_training_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping a training config file holds ({} for an empty file): `midog.config.read_config_file`."""
    return read_config_file(path, "training config", "settings")


def load_training_config(path: str | os.PathLike[str] | None, cls: type[T],
                         overrides: Mapping[str, Any] | None = None) -> T:
    """`cls` from the YAML at `path` (partial is fine; None: the defaults) with `overrides` over it."""
    values = {**(read_training_yaml(path) if path else {}), **(overrides or {})}
    return config_from_values(values, cls, f"training config {path}" if path else "training config")


def config_from_values(values: Mapping[str, Any], cls: type[T], source: str, prefix: str = "") -> T:
    """`cls(**values)`, nested dataclass fields built from their mappings; `source` names the values in errors."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{source}: '{prefix.rstrip('.')}' must be a mapping of settings, not {values!r:.80}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = [key for key in values if key not in fields]
    if unknown:
        raise ConfigError(f"{source}: {unknown_keys_message(unknown, fields, prefix)}")
    kwargs = {}
    for name, value in values.items():
        nested = _nested_dataclass(fields[name])
        if nested is not None and not isinstance(value, nested):
            kwargs[name] = config_from_values(value or {}, nested, source, f"{prefix}{name}.")
        elif nested is None:
            kwargs[name] = checked_value(value, fields[name].type, f"{prefix}{name}", source)
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:  # the dataclass's own checks (__post_init__)
        raise ConfigError(f"{source}: {first_line(err)}") from None


def unknown_keys_message(unknown: Iterable[str], known: Iterable[str], prefix: str = "", what: str = "key") -> str:
    """"unknown key 'epoch' (did you mean 'epochs'?)", one entry per key."""
    known = list(known)
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), known, n=3)
        hint = f" (did you mean {' or '.join(repr(prefix + name) for name in close)}?)" if close else ""
        parts.append(f"'{prefix}{key}'{hint}")
    return f"unknown {what}{'s' if len(parts) > 1 else ''} {', '.join(parts)}"


def checked_value(value: Any, annotation: Any, key: str, source: str) -> Any:
    """`value`, or ConfigError when it is not of its field's annotated type (text such as `1e-3`, which YAML 1.1
    reads as a string, becomes the number of a float field)."""
    names = [part.strip().split("[")[0] for part in _annotation_text(annotation).split("|")]
    if not all(name in SIMPLE_TYPES for name in names):
        return value
    if isinstance(value, str) and "float" in names and "str" not in names:
        value = as_float(value)
    if not any(isinstance(value, SIMPLE_TYPES[name]) and not (isinstance(value, bool) and name in ("int", "float"))
               for name in names):
        raise ConfigError(f"{source}: {key} is {value!r:.80}; expected {_annotation_text(annotation)}")
    return value


def _annotation_text(annotation: Any) -> str:
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))


def _nested_dataclass(f: dataclasses.Field) -> type | None:
    factory = f.default_factory
    return factory if isinstance(factory, type) and dataclasses.is_dataclass(factory) else None
