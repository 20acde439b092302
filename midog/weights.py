"""Find shipped weights (`/opt/ml/model` overrides `weights/`), read model cards, check sha256.

A checkpoint `NAME.pt` has its model card beside it as `NAME.json`; the card's `sha256` is checked at load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from midog.config_file import read_config_file
from midog.errors import WeightsError

DEFAULT_PIXEL_SIZE_UM = 0.25
"""µm per pixel a checkpoint was trained at when it does not say (MIDOG's and AMi-Br's 0.25 µm/px)."""

REPO_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
MODEL_DIR = Path("/opt/ml/model")


WEIGHTS_DIR_VARIABLE = "MIDOG_WEIGHTS_DIR"

log = logging.getLogger(__name__)


def given_weights_dir() -> Path | None:
    """The folder the user named in $MIDOG_WEIGHTS_DIR (None when unset or empty); WeightsError when it is not a
    folder: a misspelt path must stop the run, not quietly give the next folder's weights."""
    value = os.environ.get(WEIGHTS_DIR_VARIABLE)
    if not value:
        return None
    folder = Path(value)
    if not folder.is_dir():
        raise WeightsError(f"{WEIGHTS_DIR_VARIABLE}={value}: {'not a folder' if folder.exists() else 'no such folder'}"
                           f" (unset it to use {MODEL_DIR} and the shipped weights)")
    return folder


def weights_dirs() -> list[Path]:
    """Folders searched for checkpoints, first match wins: $MIDOG_WEIGHTS_DIR, /opt/ml/model, the repo's weights/."""
    given = given_weights_dir()
    return ([given] if given is not None else []) + [MODEL_DIR, REPO_WEIGHTS_DIR]


def require_in_given_dir(checkpoints: Mapping[str, str | Sequence[str]]) -> None:
    """A run of process.py takes every checkpoint it names by bare file name from $MIDOG_WEIGHTS_DIR when that is
    set: WeightsError naming the first one the folder lacks, where `find_weights` would fall back to /opt/ml/model or
    weights/ (which libraries and training tools may want; a submission must not). `checkpoints` maps each stage
    section the run loads to its `weights` value; a checkpoint given as a path is taken as it is."""
    folder = given_weights_dir()
    if folder is None:
        return
    for section, names in checkpoints.items():
        for name in checkpoint_names(names):
            if not _is_path(name) and not (folder / name).is_file():
                raise WeightsError(f"weights '{name}' not found in {WEIGHTS_DIR_VARIABLE}={folder} ({section}.weights):"
                                   f" copy it there, or unset {WEIGHTS_DIR_VARIABLE} to use {MODEL_DIR} and the "
                                   f"shipped weights")


PIPELINE_CONFIG_NAME = "pipeline.yaml"
"""A partial pipeline config shipped with a set of weights (thresholds tuned for those weights)."""


STAGE_SECTIONS = ("proposals", "verifier", "atypical")
"""Config sections with a checkpoint of their own (`<section>.weights`)."""


def checkpoint_names(value: str | Sequence[str]) -> list[str]:
    """A stage's `weights` (one file name, or a list for an ensemble) as a list."""
    return [value] if isinstance(value, str) else list(value)


def _pipeline_file(folder: Path) -> dict[str, Any]:
    path = folder / PIPELINE_CONFIG_NAME
    return read_config_file(path) if path.is_file() else {}


def claimed_checkpoints(chosen: Mapping[str, str | Sequence[str]], defaults: Mapping[str, str | Sequence[str]]
                        ) -> dict[str, str | Sequence[str]]:
    """The checkpoints a run loads: `chosen` (the config without any pipeline.yaml), where a stage the user left at
    its default may be renamed by a weights folder's `pipeline.yaml` whose `<stage>.weights` lie in that folder
    (the first such folder in `weights_dirs()` order), e.g. a fold ensemble shipped in /opt/ml/model."""
    result = dict(chosen)
    claimed: set[str] = set()
    for folder in weights_dirs():
        for section, part in _pipeline_file(folder).items():
            if section not in chosen or section in claimed or \
                    checkpoint_names(chosen[section]) != checkpoint_names(defaults[section]):
                continue
            names = part.get("weights") if isinstance(part, Mapping) else None
            if names and all((folder / name).is_file() for name in checkpoint_names(names)):
                result[section] = names
                claimed.add(section)
    return result


def weights_pipeline_values(checkpoints: Mapping[str, str | Sequence[str]],
                            defaults: Mapping[str, str | Sequence[str]] | None = None) -> dict[str, Any]:
    """The parts of the weights folders' `pipeline.yaml` files that belong to the checkpoints actually loaded.

    `checkpoints` maps each stage section to its `weights` value, `defaults` to the shipped names (default.yaml's).
    A stage's section is taken from the `pipeline.yaml` beside that stage's checkpoint (an ensemble's first) when it
    was tuned for that checkpoint: the section names it in `weights`, or names none and the checkpoint is the
    stage's default name. Every section without a checkpoint of its own (tiling, merging, ...) comes from the one
    beside the detector, whose proposals they shape. So a folder that overrides one checkpoint brings the values
    tuned for it, the stages it does not override keep theirs, and values tuned for one checkpoint never reach
    another.
    """
    defaults = defaults or checkpoints
    values: dict[str, Any] = {}
    for section, names in checkpoints.items():
        first = (checkpoint_names(names) or [""])[0]
        try:
            folder = find_weights(first).parent if first else None
        except WeightsError:
            continue  # the stage reports its missing checkpoint when it loads
        if folder is None:
            continue
        pipeline = _pipeline_file(folder)
        part = pipeline.get(section)
        if part is not None:
            tuned_for = part.get("weights", defaults.get(section)) if isinstance(part, Mapping) else None
            if tuned_for is not None and checkpoint_names(tuned_for) == checkpoint_names(names):
                values[section] = part
        if section == "proposals":
            values.update({key: value for key, value in pipeline.items() if key not in checkpoints})
    return values


def find_weights(name: str | os.PathLike[str]) -> Path:
    """Resolve a checkpoint to a file: a bare file name is looked up in `weights_dirs()` (first match wins); a path
    with a folder in it (absolute, or relative to the working directory) is taken as it is."""
    candidate = Path(name)
    if _is_path(name):
        if candidate.is_file():
            return candidate
        raise WeightsError(f"weights file not found: {candidate}")
    for folder in weights_dirs():
        if (folder / candidate).is_file():
            return folder / candidate
    searched = ", ".join(str(d) for d in weights_dirs())
    raise WeightsError(f"weights '{name}' not found in {searched}")


def _is_path(name: str | os.PathLike[str]) -> bool:
    """A checkpoint named with a folder in it ("runs/x.pt", "./x.pt", "/abs/x.pt"), not a bare file name."""
    return Path(name).is_absolute() or bool(os.path.dirname(os.fspath(name)))


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


def verify_checksum(checkpoint: str | os.PathLike[str]) -> str | None:
    """Raise WeightsError when the model card beside `checkpoint` names a different sha256; else the checked
    sha256 (None when there is no card or it names none), so the caller need not hash the file again."""
    card = read_model_card(checkpoint)
    if card is None or "sha256" not in card:
        return None
    actual = sha256_of(checkpoint)
    if actual != card["sha256"]:
        raise WeightsError(
            f"checksum mismatch for {checkpoint}: model card says {card['sha256'][:12]}…, file is {actual[:12]}…"
        )
    return actual


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


@dataclass(frozen=True)
class LoadedCheckpoint:
    """One checkpoint a run loaded, as its log and run record name it."""

    stage: str
    """The config section that loaded it: proposals, verifier or atypical."""
    path: Path
    sha256: str
    card_checked: bool
    """The model card beside it named this sha256, and the load checked the file against it; False: no card, or a
    card without a sha256, and `sha256` was computed from the file for the record."""
    architecture: str | None = None
    """The model card's `architecture`, when it has one."""

    @classmethod
    def of(cls, stage: str, path: str | os.PathLike[str]) -> "LoadedCheckpoint":
        """Describe a checkpoint after its stage has loaded it (so a card's sha256 has been checked already)."""
        path = Path(path)
        card = read_model_card(path) or {}
        checked = isinstance(card.get("sha256"), str)
        architecture = card.get("architecture")
        return cls(stage, path.resolve(), card["sha256"] if checked else sha256_of(path), checked,
                   str(architecture) if architecture is not None else None)

    def describe(self) -> str:
        """One log line's worth: stage, path, sha256 prefix and where the hash comes from, architecture."""
        source = "checked against its model card" if self.card_checked else "no sha256 on a model card"
        arch = f", {self.architecture}" if self.architecture else ""
        return f"{self.stage}: {self.path} (sha256 {self.sha256[:12]}, {source}{arch})"

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "path": str(self.path), "sha256": self.sha256, "card_checked": self.card_checked,
                "architecture": self.architecture}


def find_stage_weights(names: str | Sequence[str]) -> list[Path]:
    """The files of a stage's `weights` value (one name, or an ensemble's list), each found by `find_weights`."""
    return [find_weights(name) for name in checkpoint_names(names)]


def stage_checkpoints(stage: str, names: str | Sequence[str]) -> list[LoadedCheckpoint]:
    """`LoadedCheckpoint`s of a stage's `weights` value (one name, or a fold ensemble's list), once it has loaded."""
    return [LoadedCheckpoint.of(stage, path) for path in find_stage_weights(names)]


def log_loaded(checkpoints: Sequence[LoadedCheckpoint], thresholds: Mapping[str, float]) -> None:
    """Log (INFO) the checkpoints a run loaded and the decision thresholds in force, so a run's log names its
    weights."""
    for checkpoint in checkpoints:
        log.info("loaded %s", checkpoint.describe())
    log.info("thresholds in force: %s", ", ".join(f"{stage} {value:.4g}" for stage, value in thresholds.items()))
