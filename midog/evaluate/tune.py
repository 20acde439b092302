"""Pick the pipeline's decision thresholds on a validation set and write them into a pipeline config.

- Track 1: `verifier.threshold`, the `probability` above which a candidate is named "mitotic figure". Every
  candidate the pipeline wrote counts, whatever its name, so the sweep sees the ones below the current threshold
  too. F1 is the official one (7.5 µm matching, eps = 1e-6), summed over all validation images.
  Ties go to the highest threshold (fewer positives). The chosen value is the probability at which the best
  operating point starts; a candidate with exactly that probability is kept (`>=`), as in the pipeline.
- Track 2: `atypical.threshold`, the P(atypical) above which a page is called atypical, chosen for the highest
  balanced accuracy by the rule training uses too (`midog.evaluate.track2.best_balanced_threshold`: the midpoint
  between two consecutive distinct P, ties to the lowest). P(atypical) is read from each output the way the
  official evaluator reads it (`confidence` on every page since 2025-07-27; `--confidence pre-2025-07-27` for the
  earlier reading). Ground truth of one class only has no balanced accuracy to maximise: a GroundTruthError.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from midog.config import write_config_values
from midog.evaluate.io import GroundTruthError, PredictionError
from midog.evaluate.track1 import Track1Evaluation
from midog.evaluate.track2 import Track2Evaluation, best_balanced_threshold

TRACK1_KEY = "verifier.threshold"
TRACK2_KEY = "atypical.threshold"


@dataclass(frozen=True)
class TunedThreshold:
    key: str
    threshold: float
    value: float
    """The metric at that threshold: F1 (Track 1) or balanced accuracy (Track 2)."""
    metric: str


def tune_detection(evaluation: Track1Evaluation) -> TunedThreshold:
    if len(evaluation.curve.thresholds) == 0:
        raise PredictionError("no predicted point in any image: there is no threshold to choose (is the detector "
                              "trained, and its proposals.confidence reachable?)")
    threshold, f1 = evaluation.curve.best()
    return TunedThreshold(TRACK1_KEY, threshold, f1, "f1")


def tune_classification(evaluation: Track2Evaluation) -> TunedThreshold:
    labels = evaluation.y_true
    if labels.min() == labels.max():
        raise GroundTruthError(f"every page of the ground truth is {'atypical' if labels[0] else 'normal'}: "
                               "the atypical threshold needs both classes to balance")
    threshold, value = best_balanced_threshold(labels, evaluation.y_score)
    return TunedThreshold(TRACK2_KEY, threshold, value, "balanced_accuracy")


def write_thresholds(config_path: str | Path, tuned: list[TunedThreshold]) -> dict[str, Any]:
    """Write the tuned values into the YAML at `config_path` (created if absent), keeping its other values."""
    values = {t.key: t.threshold for t in tuned}
    write_config_values(config_path, values)
    return values
