"""Find shipped weights (`/opt/ml/model` overrides `weights/`), read model cards, check sha256.

A checkpoint `NAME.pt` has its model card beside it as `NAME.json`; the card's `sha256` is checked at load.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from midog.config import read_config_file
from midog.errors import WeightsError

REPO_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
MODEL_DIR = Path("/opt/ml/model")


def weights_dirs() -> list[Path]:
    """Folders searched for checkpoints, first match wins: $MIDOG_WEIGHTS_DIR, /opt/ml/model, the repo's weights/."""
    dirs = []
    if os.environ.get("MIDOG_WEIGHTS_DIR"):
        dirs.append(Path(os.environ["MIDOG_WEIGHTS_DIR"]))
    dirs += [MODEL_DIR, REPO_WEIGHTS_DIR]
    return dirs


PIPELINE_CONFIG_NAME = "pipeline.yaml"
"""A partial pipeline config shipped with a set of weights (thresholds tuned for those weights)."""


STAGE_SECTIONS = ("proposals", "verifier", "atypical")
"""Config sections with a checkpoint of their own (`<section>.weights`)."""


def weights_pipeline_values(checkpoints: Mapping[str, str | Sequence[str]]) -> dict[str, Any]:
    """The parts of the weights folders' `pipeline.yaml` files that belong to the checkpoints actually loaded.

    `checkpoints` maps each stage section to its `weights` value. A stage's section is taken from the
    `pipeline.yaml` beside that stage's checkpoint (an ensemble's first), and every section without a checkpoint of
    its own (tiling, merging, ...) from the one beside the detector, whose proposals they shape. So a folder that
    overrides one checkpoint brings the values tuned for it, the stages it does not override keep theirs, and
    values tuned for one checkpoint never reach another.
    """
    values: dict[str, Any] = {}
    for section, names in checkpoints.items():
        name = names if isinstance(names, str) else (list(names) or [""])[0]
        try:
            folder = find_weights(name).parent if name else None
        except WeightsError:
            continue  # the stage reports its missing checkpoint when it loads
        if folder is None or not (folder / PIPELINE_CONFIG_NAME).is_file():
            continue
        for key, part in read_config_file(folder / PIPELINE_CONFIG_NAME).items():
            if key == section or (section == "proposals" and key not in checkpoints):
                values[key] = part
    return values


def find_weights(name: str | os.PathLike[str]) -> Path:
    """Resolve a checkpoint to a file: a bare file name is looked up in `weights_dirs()` (first match wins); a path
    with a folder in it (absolute, or relative to the working directory) is taken as it is."""
    candidate = Path(name)
    if candidate.is_absolute() or len(candidate.parts) > 1:
        if candidate.is_file():
            return candidate
        raise WeightsError(f"weights file not found: {candidate}")
    for folder in weights_dirs():
        if (folder / candidate).is_file():
            return folder / candidate
    searched = ", ".join(str(d) for d in weights_dirs())
    raise WeightsError(f"weights '{name}' not found in {searched}")


def sha256_of(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_card_path(checkpoint: str | os.PathLike[str]) -> Path:
    return Path(checkpoint).with_suffix(".json")


def read_model_card(checkpoint: str | os.PathLike[str]) -> dict[str, Any] | None:
    path = model_card_path(checkpoint)
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WeightsError(f"model card {path} is not valid JSON: {err}") from None
    if not isinstance(card, dict):
        raise WeightsError(f"model card {path} must be a JSON object")
    if "sha256" in card and not isinstance(card["sha256"], str):
        raise WeightsError(f"model card {path}: 'sha256' must be a string, got {card['sha256']!r:.40}")
    return card


def verify_checksum(checkpoint: str | os.PathLike[str]) -> None:
    """Raise WeightsError when the model card beside `checkpoint` names a different sha256."""
    card = read_model_card(checkpoint)
    if card is None or "sha256" not in card:
        return
    actual = sha256_of(checkpoint)
    if actual != card["sha256"]:
        raise WeightsError(
            f"checksum mismatch for {checkpoint}: model card says {card['sha256'][:12]}…, file is {actual[:12]}…"
        )


def write_model_card(checkpoint: str | os.PathLike[str], card: dict[str, Any]) -> Path:
    """Write the card beside the checkpoint, with the checkpoint's sha256 filled in."""
    card = {**card, "file": Path(checkpoint).name, "sha256": sha256_of(checkpoint)}
    path = model_card_path(checkpoint)
    path.write_text(json.dumps(card, indent=2) + "\n")
    return path


def plain(value: Any) -> Any:
    """`value` as JSON gives it back (tuples → lists, paths and other objects → strings): the form model cards and
    checkpoint metadata store, so a card or a `weights_only` checkpoint never holds a Python-only type."""
    return json.loads(json.dumps(value, default=str))
