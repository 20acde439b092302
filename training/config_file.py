"""A training command's YAML config read into its dataclass, or one ConfigError (exit code 5) that names the file and
the key: a file that cannot be read, an unknown key (with the known ones closest to it), a value of the wrong type,
a value the dataclass refuses. The message for unknown keys and the type check are the pipeline config's
(`midog.config.unknown_keys_message`, `midog.config.typed_value`)."""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Mapping, TypeVar

import yaml

from midog.config import annotation_text, typed_value, unknown_keys_message
from midog.config_file import read_config_file
from midog.errors import ConfigError, InputError, first_line

T = TypeVar("T")


def read_training_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping a training config file holds ({} for an empty file): `midog.config_file.read_config_file`."""
    return read_config_file(path, "training config", "settings")


def parse_set_pairs(pairs: list[str]) -> dict[str, Any]:
    """The `--set KEY=VALUE` pairs of a training command; values are read as YAML, so `0.5`, `true`, `null` and
    `[1, 2]` mean what they say. A dotted key (`augment.hed_sigma=0.2`) sets one value of a nested section."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--set expects key=value, got '{pair}'")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def add_set_option(parser: argparse.ArgumentParser) -> None:
    """`--set KEY=VALUE`, repeatable: any value of the training config, over the file's (`parse_set_pairs`)."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any config value over the file's, e.g. --set input_size=112 or "
                             "--set augment.hed_sigma=0.1 (repeatable; values read as YAML)")


def load_training_config(path: str | os.PathLike[str] | None, cls: type[T],
                         overrides: Mapping[str, Any] | None = None) -> T:
    """`cls` from the YAML at `path` (partial is fine; None: the defaults) with `overrides` over it: a dotted key
    replaces one value of a nested section and keeps the section's others."""
    source = f"training config {path}" if path else "training config"
    values = dict(read_training_yaml(path) if path else {})
    for key, value in (overrides or {}).items():
        values = with_value(values, key.split("."), value, source)
    return config_from_values(values, cls, source)


def with_value(values: Mapping[str, Any], keys: list[str], value: Any, source: str) -> dict[str, Any]:
    """A copy of `values` with `value` at the nested path `keys` (sections along it are copied, not changed)."""
    head, *rest = keys
    if not rest:
        return {**values, head: value}
    section = values.get(head) or {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"{source}: '{head}' is {section!r:.80}, not a section, so '{'.'.join(keys)}' cannot be set")
    return {**values, head: with_value(section, rest, value, source)}


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
