"""Reading a YAML config file into a mapping: the one reader of pipeline configs (`midog.config`), of the
`pipeline.yaml` beside a set of weights (`midog.weights`) and of the training configs (`training.config_file`).

It sits below `midog.config` and `midog.weights` so that `midog.config` can import `midog.weights` (whose
`pipeline.yaml` files it layers into a run's configuration) without `midog.weights` importing it back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import yaml

from midog.errors import ConfigError, first_line


def read_config_file(path: str | Path, what: str = "config", entries: str = "sections") -> dict[str, Any]:
    """A partial config file as a mapping ({} for an empty one); ConfigError naming `what` and the file when it
    cannot be read or holds anything but a mapping of `entries` (the pipeline's and the training configs' reader)."""
    try:
        values = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read {what} {path}: {first_line(err)}") from None
    if not isinstance(values, (Mapping, type(None))):
        raise ConfigError(f"{what} {path} must hold a mapping of {entries}, not {type(values).__name__}")
    return dict(values or {})
