"""Track 2 (atypical vs normal) metrics, as the official MIDOG 2025 evaluation container computes them.

Official definitions (DeepMicroscopy/MIDOG25_T2_evaluation_docker, evaluate.py):
- Each job's output is a list with one {"class": "normal"|"atypical", "confidence": float} per stack page, as many
  entries as the ground truth has labels; the confidence must be a JSON float (an int is rejected).
- The predicted class is the `class` field. The score for ROC AUC is `confidence`, read as P(atypical) on every
  page: the container's final version (commit 2d1b108, 2025-07-27, "confidence is now only the confidence for
  atypical"), which scored the challenge. Its versions before that read `confidence` as the confidence in the
  *stated* class (P(atypical) = `1 - confidence` on "normal" pages); `confidence="pre-2025-07-27"` reproduces them.
  Balanced accuracy, the ranking metric, only uses the class and is the same either way.
- Overall: sensitivity TP/(TP+FN), specificity TN/(TN+FP), balanced accuracy their mean, accuracy, and ROC AUC
  (sklearn) over all pages. Per tumour domain ("domain_<d>"): the same with sklearn's recall_score (0 when a class
  is absent), accuracy_score and roc_auc_score (NaN when one class only).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

from midog.evaluate.io import GroundTruthError, Job, PredictionError
from midog.outputs import ATYPICAL, NORMAL

CLASS_IDS = {NORMAL: 0, ATYPICAL: 1}
P_ATYPICAL = "p_atypical"
"""`confidence` is P(atypical) on every page: the final container (2025-07-27 on), the default."""
PRE_2025_07_27 = "pre-2025-07-27"
"""`confidence` is the confidence in the stated class: the container before commit 2d1b108 (2025-07-27)."""
CONFIDENCE_READINGS = (P_ATYPICAL, PRE_2025_07_27)


@dataclass(frozen=True)
class StackTruth:
    image: str
    labels: np.ndarray
    """(n,) 1 = atypical."""
    domains: list[Any]


@dataclass(frozen=True)
class StackResult:
    pk: str
    truth: StackTruth
    predicted: np.ndarray
    """(n,) 1 = atypical, from the `class` field."""
    confidence: np.ndarray
    score: np.ndarray
    """(n,) P(atypical) as the container (in the chosen version) derives it."""


def parse_ground_truth(ground_truth: Any) -> dict[str, StackTruth]:
    """The official ground truth: a list of {"image", "labels": ["normal"|"atypical", ...], "tumordomains": [...]}."""
    if not isinstance(ground_truth, list):
        raise GroundTruthError("Track 2 ground truth must be a list of {image, labels, tumordomains}")
    truths = {}
    for index, entry in enumerate(ground_truth):
        if not isinstance(entry, Mapping):
            raise GroundTruthError(f"ground truth entry {index} is not a dictionary")
        for key in ("image", "labels", "tumordomains"):
            if key not in entry:
                raise GroundTruthError(f"ground truth entry {index}: field '{key}' is missing")
        labels, domains = entry["labels"], entry["tumordomains"]
        if not isinstance(labels, list) or any(label not in CLASS_IDS for label in labels):
            raise GroundTruthError(f"ground truth for {entry['image']}: labels must be 'normal' or 'atypical'")
        if not isinstance(domains, list) or len(domains) != len(labels):
            raise GroundTruthError(f"ground truth for {entry['image']}: one tumour domain per label is required")
        truths[entry["image"]] = StackTruth(entry["image"], np.array([CLASS_IDS[x] for x in labels], dtype=np.int64),
                                            list(domains))
    return truths


def check_reading(confidence: str) -> None:
    if confidence not in CONFIDENCE_READINGS:
        raise ValueError(f"confidence must be one of {CONFIDENCE_READINGS}, got {confidence!r}")


def parse_stack(payload: Any, truth: StackTruth, pk: str, confidence: str = P_ATYPICAL) -> StackResult:
    """One job's classification list, validated like the official container (job and field named).

    `confidence="p_atypical"` reads every page's confidence as P(atypical), as the final container does (and as
    process.py writes it); `"pre-2025-07-27"` as the confidence in the stated class, as the container did before.
    """
    check_reading(confidence)
    if not isinstance(payload, list):
        raise PredictionError(f"job {pk}: output must be a list of {{'class', 'confidence'}} dictionaries")
    if len(payload) != len(truth.labels):
        raise PredictionError(f"job {pk}: results length does not match GT length "
                              f"(result length={len(payload)}, GT length={len(truth.labels)})")
    predicted, confidences = [], []
    for i, entry in enumerate(payload):
        where = f"job {pk}: entry {i}"
        if not isinstance(entry, Mapping):
            raise PredictionError(f"{where} is not a dictionary")
        for key in ("class", "confidence"):
            if key not in entry:
                raise PredictionError(f"{where}: field '{key}' is missing")
        if entry["class"] not in CLASS_IDS:
            raise PredictionError(f"{where}: field 'class' is {entry['class']!r}; it must be 'normal' or 'atypical'")
        value = entry["confidence"]
        if not isinstance(value, float) or not np.isfinite(value):
            raise PredictionError(f"{where}: field 'confidence' must be a float, got {value!r}")
        predicted.append(CLASS_IDS[entry["class"]])
        confidences.append(value)
    predicted_arr = np.array(predicted, dtype=np.int64)
    confidence_arr = np.array(confidences, dtype=np.float64)
    stated = confidence == PRE_2025_07_27
    score = np.where((predicted_arr == 1) | (not stated), confidence_arr, 1 - confidence_arr)
    return StackResult(pk, truth, predicted_arr, confidence_arr, score)


@dataclass
class Track2Evaluation:
    stacks: list[StackResult]
    aggregates: dict[str, Any]

    @property
    def y_true(self) -> np.ndarray:
        return np.concatenate([s.truth.labels for s in self.stacks])

    @property
    def y_pred(self) -> np.ndarray:
        return np.concatenate([s.predicted for s in self.stacks])

    @property
    def y_score(self) -> np.ndarray:
        return np.concatenate([s.score for s in self.stacks])

    @property
    def domains(self) -> np.ndarray:
        return np.concatenate([np.asarray(s.truth.domains) for s in self.stacks])

    @property
    def confidences(self) -> np.ndarray:
        """The `confidence` fields as written, before any reading."""
        return np.concatenate([s.confidence for s in self.stacks])

    def looks_like_p_atypical(self) -> bool:
        """Whether the confidences look written as P(atypical) on every page (the final container's reading and
        process.py's output) rather than as the confidence in the stated class: every "normal" confidence below
        every "atypical" one, and most "normal" ones under 0.5 (a stated-class "normal" confidence is
        1 - P(atypical) > 1 - threshold). Read with "pre-2025-07-27", such outputs get a scrambled ROC AUC."""
        normal = self.confidences[self.y_pred == 0]
        atypical = self.confidences[self.y_pred == 1]
        return bool(len(normal) and len(atypical) and normal.max() < atypical.min() and np.median(normal) < 0.5)

    def metrics(self) -> dict[str, Any]:
        """The official metrics.json (the container empties `results`)."""
        return {"results": {}, "aggregates": self.aggregates}


def _ratio(num: int, den: int) -> float:
    if den == 0:
        return float("nan")  # the container divides by zero here; we report NaN instead of crashing
    return float(num / den)


def aggregate(y_true: np.ndarray, y_pred: np.ndarray, y_score: np.ndarray, domains: np.ndarray) -> dict[str, Any]:
    from sklearn.exceptions import UndefinedMetricWarning
    from sklearn.metrics import accuracy_score, recall_score, roc_auc_score

    tp = int(np.sum((y_pred == 1) & (y_true == 1)))
    fp = int(np.sum((y_pred == 1) & (y_true == 0)))
    fn = int(np.sum((y_pred == 0) & (y_true == 1)))
    tn = int(np.sum((y_pred == 0) & (y_true == 0)))
    sensitivity, specificity = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        out: dict[str, Any] = {
            "overall_sensitivity": sensitivity,
            "overall_specificity": specificity,
            "overall_balanced_accuracy": float((specificity + sensitivity) / 2),
            "overall_roc_auc": float(roc_auc_score(y_true, y_score)),
            "overall_accuracy": _ratio(tp + tn, tp + fn + fp + tn),
        }
        for domain in np.sort(np.unique(domains)):
            mask = domains == domain
            sens = float(recall_score(y_true=y_true[mask], y_pred=y_pred[mask]))
            spec = float(recall_score(y_true=y_true[mask], y_pred=y_pred[mask], pos_label=0))
            out[f"domain_{domain}"] = {
                "sensitivity": sens,
                "specificity": spec,
                "balanced_accuracy": (sens + spec) / 2,
                "accuracy": float(accuracy_score(y_true=y_true[mask], y_pred=y_pred[mask])),
                "roc_auc": float(roc_auc_score(y_true=y_true[mask], y_score=y_score[mask])),
            }
    return out


def evaluate_jobs(jobs: Iterable[Job], ground_truth: Any, confidence: str = P_ATYPICAL) -> Track2Evaluation:
    """Score jobs one after another in their order, like the container's final version: the first bad job (in
    predictions.json order when `jobs` is `midog.evaluate.io.iter_jobs`) is the one an error names."""
    check_reading(confidence)
    truths = parse_ground_truth(ground_truth)
    stacks = []
    seen: dict[str, str] = {}
    for job in jobs:
        if job.image not in truths:
            raise PredictionError(f"job {job.pk}: no GT for this image: {job.image}")
        if job.image in seen:
            raise PredictionError(f"job {job.pk}: image {job.image} was already scored (job {seen[job.image]})")
        seen[job.image] = job.pk
        stacks.append(parse_stack(job.payload, truths[job.image], job.pk, confidence))
    if not stacks:
        raise PredictionError("no predictions to evaluate")
    evaluation = Track2Evaluation(stacks, {})
    evaluation.aggregates = aggregate(evaluation.y_true, evaluation.y_pred, evaluation.y_score, evaluation.domains)
    return evaluation


def evaluate(predictions: Mapping[str, Any], ground_truth: Any, confidence: str = P_ATYPICAL) -> Track2Evaluation:
    jobs = [Job(pk=str(k), image=str(k), payload=v) for k, v in predictions.items()]
    return evaluate_jobs(jobs, ground_truth, confidence)


def score(predictions: Mapping[str, Any], ground_truth: Any, confidence: str = P_ATYPICAL) -> dict[str, Any]:
    """Official Track 2 aggregates for `predictions` (stack image name → list of {"class", "confidence"}), with
    `confidence` read as P(atypical) (the final container) or, with "pre-2025-07-27", as the earlier one did."""
    return evaluate(predictions, ground_truth, confidence).aggregates


def threshold_candidates(scores: np.ndarray) -> np.ndarray:
    """One threshold per distinct decision `score >= t` can take on `scores`, ascending (float64): the midpoint of
    every two consecutive distinct scores, so that no threshold sits on a score, plus the two trivial decisions:
    0 (every score positive; the lowest score itself if that is <= 0) and 1 (none; just above the highest score
    if that is >= 1)."""
    values = np.unique(np.asarray(scores, dtype=np.float64))
    if len(values) == 0:
        return values
    low, high = min(0.0, values[0]), max(1.0, np.nextafter(values[-1], np.inf))
    return np.concatenate([[low], (values[1:] + values[:-1]) / 2, [high]])


def _counts(y_true: np.ndarray, scores: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(true positives, true negatives) at each threshold (positive when score >= t), and the class sizes."""
    labels, values = np.asarray(y_true) == 1, np.asarray(scores, dtype=np.float64)
    if labels.shape != values.shape:
        raise ValueError(f"{labels.size} labels but {values.size} scores")
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        raise ValueError(f"balanced accuracy needs both classes, got {positives} positive and {negatives} negative "
                         "samples: no threshold can be chosen on them")
    tp = positives - np.searchsorted(np.sort(values[labels]), thresholds, side="left")
    tn = np.searchsorted(np.sort(values[~labels]), thresholds, side="left")
    return tp, tn, positives, negatives


def balanced_accuracy_curve(y_true: np.ndarray, p_atypical: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Balanced accuracy when pages with P(atypical) >= t are called atypical, at every `threshold_candidates` t
    (ascending). ValueError unless both classes are present."""
    thresholds = threshold_candidates(p_atypical)
    tp, tn, positives, negatives = _counts(y_true, p_atypical, thresholds)
    return thresholds, 0.5 * (tp / positives + tn / negatives)


def best_balanced_threshold(y_true: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """The threshold of highest balanced accuracy (positive when score >= t), and that accuracy: the one rule for
    choosing a classifier's threshold, in evaluation (`midog.evaluate.tune`) and in training.

    The threshold is one of `threshold_candidates`: the midpoint between the two consecutive distinct scores where
    the decision changes, never a score itself. Ties (equal balanced accuracy, compared exactly, in counts) go to
    the lowest threshold, the one with the most positive calls. A ValueError unless both classes are present.
    """
    thresholds = threshold_candidates(scores)
    tp, tn, positives, negatives = _counts(y_true, scores, thresholds)
    index = int(np.argmax(tp * negatives + tn * positives))  # balanced accuracy x 2PN, exact; argmax: the first
    return float(thresholds[index]), float(0.5 * (tp[index] / positives + tn[index] / negatives))
