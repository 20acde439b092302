"""A training command's YAML config read into its dataclass, or one ConfigError (exit code 5) that names the file and
the key: a file that cannot be read, an unknown key (with the known ones closest to it), a value of the wrong type,
a value the dataclass refuses. The message for unknown keys and the type check are the pipeline config's
(`midog.config.unknown_keys_message`, `midog.config.typed_value`)."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, TypeVar

from midog.config import annotation_text, typed_value, unknown_keys_message
from midog.config_file import read_config_file
from midog.errors import ConfigError, first_line

T = TypeVar("T")


def read_training_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping a training config file holds ({} for an empty file): `midog.config_file.read_config_file`."""
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


def checked_value(value: Any, annotation: Any, key: str, source: str) -> Any:
    """`value`, or ConfigError when it is not of its field's annotated type (`midog.config.typed_value`: text such
    as `1e-3`, which YAML 1.1 reads as a string, becomes the number of a float field)."""
    value, typed = typed_value(value, annotation)
    if not typed:
        raise ConfigError(f"{source}: {key} is {value!r:.80}; expected {annotation_text(annotation)}")
    return value


def _nested_dataclass(f: dataclasses.Field) -> type | None:
    factory = f.default_factory
    return factory if isinstance(factory, type) and dataclasses.is_dataclass(factory) else None
