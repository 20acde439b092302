"""The official MIDOG 2025 output formats, and atomic writing (a reader never sees a partial file)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

from midog.config import CHOICES
from midog.errors import OutputError

_log = logging.getLogger(__name__)

TRACK1_FILENAME = "mitotic-figures.json"
TRACK1_ATYPICAL_FILENAME = "atypical-mitotic-figures.json"
TRACK2_FILENAME = "multiple-mitotic-figure-classification.json"

MITOTIC_FIGURE = "mitotic figure"
NON_MITOTIC_FIGURE = "non-mitotic figure"
ATYPICAL = "atypical"
NORMAL = "normal"


def write_json_atomic(path: str | os.PathLike[str], payload: Any) -> Path:
    """Write JSON to a temporary file in the same folder, then rename it into place."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as err:
        raise OutputError(f"cannot write to output folder {path.parent}: {err.strerror}") from None
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=4)
            handle.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):  # a full disk, a folder where the file should go
            raise OutputError(f"cannot write {path}: {err.strerror or err}") from None
        raise
    return path


CONFIDENCE_SEMANTICS = CHOICES["atypical.confidence"]


def check_confidence_semantics(confidence: str) -> None:
    if confidence not in CONFIDENCE_SEMANTICS:
        raise ValueError(f"confidence must be one of {CONFIDENCE_SEMANTICS}, got {confidence!r}")


def check_output_folder(folder: str | os.PathLike[str]) -> None:
    """Create `folder` if needed and make sure a file can be written there (OutputError otherwise), before a run
    spends minutes on a result it could not save. Leaves nothing in the folder."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise OutputError(f"cannot write to output folder {folder}: {err.strerror}") from None


def discard_previous_outputs(folder: str | os.PathLike[str], names: Sequence[str]) -> None:
    """Remove result files an earlier run left in `folder`, so that a run that fails leaves none behind: a stale
    file would read as this run's result. (Grand-challenge's output folders start empty.) A folder where a result
    file belongs is an OutputError before any work."""
    for name in names:
        path = Path(folder) / name
        if path.is_dir():  # found now, not after the whole run: no result could be written there
            raise OutputError(f"cannot write {path}: a folder of that name is in the way")
        try:
            if path.is_file():
                path.unlink()
                _log.warning("removed %s left by an earlier run", path)
        except OSError as err:
            raise OutputError(f"cannot remove {path} left by an earlier run: {err.strerror}") from None


STATED_CLASS_DEPRECATED = (
    "atypical.confidence: stated_class is deprecated: it writes 1 - P(atypical) on 'normal' pages, which the "
    "official Track 2 evaluation reads as P(atypical) since 2025-07-27 (scrambling ROC AUC); use p_atypical")


def track2_classification(probabilities: Sequence[float], threshold: float,
                          confidence: str = "p_atypical") -> list[dict[str, Any]]:
    """One {"class", "confidence"} per page, the confidence a JSON float.

    `confidence="p_atypical"` writes P(atypical) for every page, as the MIDOG 2025 reference container does and as
    the official evaluation container reads it since 2025-07-27 (commit 2d1b108). `"stated_class"` (deprecated,
    one warning line per call) writes the confidence in the stated class (1 - P(atypical) for "normal" pages), the
    reading of the evaluation container's versions before that: the final one scores such output with a
    scrambled ROC AUC (docs/evaluation.md).
    """
    check_confidence_semantics(confidence)
    if confidence == "stated_class":
        _log.warning(STATED_CLASS_DEPRECATED)
    entries = []
    for p in probabilities:
        atypical = p >= threshold
        value = p if atypical or confidence == "p_atypical" else 1.0 - p
        entries.append({"class": ATYPICAL if atypical else NORMAL, "confidence": float(value)})
    return entries


def multiple_points(points: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The grand-challenge "Multiple points" object. Each point: {"name", "point": [x_mm, y_mm, 0], "probability"}."""
    return {
        "name": "Points of interest",
        "type": "Multiple points",
        "points": [
            {
                "name": p["name"],
                "point": [float(p["point"][0]), float(p["point"][1]), float(p["point"][2]) if len(p["point"]) > 2 else 0.0],
                "probability": float(p["probability"]),
            }
            for p in points
        ],
        "version": {"major": 1, "minor": 0},
    }


def track1_outputs(detections: Sequence[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(mitotic-figures.json, atypical-mitotic-figures.json) payloads of `midog.pipeline.Detection`s, whose points
    are already in millimetres. Every candidate goes into the first (the official AP/FROC need the rejected ones
    too); mitotic figures only into the second, with P(atypical)."""
    figures = multiple_points([
        {"name": d.label, "point": [d.x_mm, d.y_mm, 0.0], "probability": d.probability} for d in detections
    ])
    atypical = multiple_points([
        {"name": f"{ATYPICAL if d.atypical else NORMAL} {MITOTIC_FIGURE}", "point": [d.x_mm, d.y_mm, 0.0],
         "probability": d.atypical_probability}
        for d in detections if d.label == MITOTIC_FIGURE and d.atypical_probability is not None
    ])
    return figures, atypical
