"""Reading what the official evaluation containers read: ground truth, and predictions in their folder layout.

The grand-challenge evaluation container gets `predictions.json` (one entry per algorithm job: its `pk`, its inputs
and outputs) and, for each job, the job's output file at `<pk>/output/<relative_path>`. We read that layout, and
also a plain folder of `<image>.json` files (what `process.py` writes when run case by case).

Every failure is an `EvaluationError` with one line that names the job (its pk, or the file) and the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from midog.cli import read_json_file
from midog.errors import InputError

TRACK1_INPUT_SLUG = "histopathology-region-of-interest-cropout"
TRACK1_OUTPUT_SLUG = "mitotic-figures"
TRACK2_INPUT_SLUG = "stacked-histopathology-roi-cropouts"
TRACK2_OUTPUT_SLUG = "multiple-mitotic-figure-classification"
IMAGE_SUFFIXES = (".tiff", ".tif", ".mha")


class EvaluationError(InputError):
    """Ground truth or predictions that the official evaluation would reject (or crash on)."""


class GroundTruthError(EvaluationError):
    """The ground-truth file is missing, unreadable, or not in the official format."""


class PredictionError(EvaluationError):
    """A job's prediction file is missing or malformed. The message names the job and the field."""


@dataclass(frozen=True)
class Job:
    """One algorithm job: `pk` names it in messages, `image` keys the ground truth, `payload` is its output JSON."""

    pk: str
    image: str
    payload: Any


def read_ground_truth_json(path: Path) -> Any:
    """The official ground-truth file's JSON value (Track 1: an object by image; Track 2: a list), or a one-line
    GroundTruthError; its format is checked by the track's own parser."""
    return read_json_file(path, "ground truth", object, error=GroundTruthError)


def is_number(value: Any) -> bool:
    """A JSON number that the official scorers can use: int or float, not bool, finite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _interface_value(values: Any, slug: str, pk: str, field: str) -> dict[str, Any]:
    if not isinstance(values, list):
        raise PredictionError(f"job {pk}: field '{field}' must be a list")
    for value in values:
        interface = value.get("interface") if isinstance(value, dict) else None
        if isinstance(interface, dict) and interface.get("slug") == slug:
            return value
    raise PredictionError(f"job {pk}: no '{slug}' interface in field '{field}'")


def _container_jobs(folder: Path, input_slug: str, output_slug: str) -> Iterator[Job]:
    jobs_json = read_json_file(folder / "predictions.json", "predictions.json", list, error=PredictionError)
    for index, job in enumerate(jobs_json):
        if not isinstance(job, dict) or not isinstance(job.get("pk"), str):
            raise PredictionError(f"predictions.json entry {index}: field 'pk' is missing")
        pk = job["pk"]
        image = _interface_value(job.get("inputs"), input_slug, pk, "inputs").get("image")
        if not isinstance(image, dict) or not isinstance(image.get("name"), str):
            raise PredictionError(f"job {pk}: field 'inputs[{input_slug}].image.name' is missing")
        output = _interface_value(job.get("outputs"), output_slug, pk, "outputs")
        relative = (output.get("interface") or {}).get("relative_path")
        if not isinstance(relative, str):
            raise PredictionError(f"job {pk}: field 'outputs[{output_slug}].interface.relative_path' is missing")
        payload = read_json_file(folder / pk / "output" / relative, f"job {pk} output", object,
                                 error=PredictionError)
        yield Job(pk=pk, image=image["name"], payload=payload)


def image_key(name: str, known: set[str] | dict[str, Any]) -> str | None:
    """The ground-truth key for a file or image name: exact, or the same stem with an image suffix."""
    if name in known:
        return name
    stem = name[: -len(".json")] if name.endswith(".json") else name
    if stem in known:
        return stem
    for suffix in IMAGE_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    for suffix in ("",) + IMAGE_SUFFIXES:
        if stem + suffix in known:
            return stem + suffix
    return None


def _plain_jobs(folder: Path, known_images: set[str]) -> Iterator[Job]:
    files = sorted(p for p in folder.glob("*.json") if not p.name.startswith("."))
    if not files:
        raise PredictionError(f"{folder}: no predictions.json and no <image>.json files")
    for path in files:
        image = image_key(path.name, known_images)
        if image is None and path.name == "metrics.json":
            continue  # the evaluation's own output, written into the folder by an earlier run
        if image is None:
            raise PredictionError(f"job {path.name}: no ground truth for an image named like '{path.stem}'")
        payload = read_json_file(path, f"job {path.name}", object, error=PredictionError)
        yield Job(pk=path.name, image=image, payload=payload)


def iter_jobs(folder: str | Path, track: int, known_images: set[str]) -> Iterator[Job]:
    """Jobs from `folder` one at a time, in predictions.json order (or file-name order for a plain folder), each
    read only when the previous one has been taken.

    The final official containers (Track 1 since 8577851, 2025-08-12) score the jobs one after another in
    predictions.json order, so `track1.evaluate_jobs(iter_jobs(...))` fails on the first bad job in that order,
    whether its output file is missing or malformed, as they do. The order also decides AP ties between images
    (pycocotools breaks equal scores by image order).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise PredictionError(f"predictions folder {folder} does not exist")
    if (folder / "predictions.json").is_file():
        if track == 1:
            return _container_jobs(folder, TRACK1_INPUT_SLUG, TRACK1_OUTPUT_SLUG)
        return _container_jobs(folder, TRACK2_INPUT_SLUG, TRACK2_OUTPUT_SLUG)
    return _plain_jobs(folder, known_images)


def load_jobs(folder: str | Path, track: int, known_images: set[str]) -> list[Job]:
    """Every job from `folder`, in predictions.json order (or file-name order for a plain folder); see `iter_jobs`,
    which the command line uses so that a bad job is found in the containers' order."""
    return list(iter_jobs(folder, track, known_images))
