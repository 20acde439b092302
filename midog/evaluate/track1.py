"""Track 1 (mitotic figure detection) metrics, as the official MIDOG 2025 evaluation container computes them.

Official definitions (DeepMicroscopy/MIDOG25_T1_evaluation_docker, evaluate.py):
- Matching: evalutils' `score_detection` with radius 7.5 µm (7.5e-3 mm), on the points named "mitotic figure"
  (their z set to 0) against the ground-truth points. For each ground-truth point in file order, the nearest
  prediction within the radius that is still free becomes its true positive; no optimal assignment.
- Precision tp/(tp+fp+eps), recall tp/(tp+fn+eps), F1 (2tp+eps)/(2tp+fp+fn+eps), eps = 1e-6, from counts summed
  over the images of a group (overall, per tumour domain, per ROI type). The per tumour × ROI type table
  (`tumor_roitype`, added for the final test set) computes its F1 as 2tp/(2tp+fp+fn+eps) instead: 0 when tp = 0.
- AP: torchmetrics `MeanAveragePrecision` (xyxy, bbox, max detections [1, 10, 1e6], recall thresholds
  0, 0.01, ..., 1.00), `map_50`, on boxes x±0.01125 mm, y±0.01125 mm around *every* point (both names) scored by
  its `probability`, all with one label. Float32 tensors, images added in job order: the final container
  (8577851, 2025-08-12) scores the jobs one after another in predictions.json order.
- FROC AUC: `calc_froc_score` of the container's final version (the published test `metrics.json` predates it);
  see `froc_curve`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from sklearn.neighbors import BallTree

from midog.evaluate.io import GroundTruthError, Job, PredictionError, is_number
from midog.outputs import MITOTIC_FIGURE, NON_MITOTIC_FIGURE

MATCH_RADIUS_MM = 7.5e-3
BOX_HALF_SIZE_MM = 0.01125
"""Half the side of the box around each point for AP: two boxes at IoU 0.5 have centres ~7.5 µm apart."""
EPS = 1e-6
ROI_TYPES = ("hotspot", "challenging", "random")
VALID_NAMES = (MITOTIC_FIGURE, NON_MITOTIC_FIGURE)
FROC_MAX_FP_PER_IMAGE = 8.0
FROC_THRESHOLDS = 40
FROC_POINTS = 50
MAX_SWEEP_THRESHOLDS = 2000
MIN_COORDINATE_MM = -MATCH_RADIUS_MM
MAX_COORDINATE_MM = 10.0
"""The container's final version rejects a point with x or y outside [-7.5 µm, 10 mm] (pixel coordinates)."""


# ---- data ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageTruth:
    name: str
    points: np.ndarray
    """(n, 3) annotations in mm, as given."""
    tumor_domain: Any
    roi_type: str


@dataclass(frozen=True)
class ImagePrediction:
    pk: str
    points: np.ndarray
    """(m, 3) x, y, z in mm, as given."""
    mitotic: np.ndarray
    """(m,) bool: named "mitotic figure"."""
    probability: np.ndarray
    """(m,) float64."""

    def rows(self) -> list[list[Any]]:
        """The official per-image `pred` list: [x, y, z, class (1 = mitotic figure), probability]."""
        return [[*map(float, p), int(c), float(s)] for p, c, s in zip(self.points, self.mitotic, self.probability)]


@dataclass(frozen=True)
class DetectionScore:
    true_positives: int
    false_negatives: int
    false_positives: int
    matched_predictions: np.ndarray = field(repr=False)
    """(m,) bool over the scored predictions."""
    matched_truth: np.ndarray = field(repr=False)
    """(n,) bool over the ground-truth points."""

    def as_dict(self) -> dict[str, int]:
        return {"true_positives": self.true_positives, "false_negatives": self.false_negatives,
                "false_positives": self.false_positives}


# ---- parsing -------------------------------------------------------------------------------------------------

def parse_ground_truth(ground_truth: Mapping[str, Any]) -> dict[str, ImageTruth]:
    """The official ground truth: image name → {"annotations": [[x, y, z], ...] (mm), "tumor domain", "roi type"}."""
    if not isinstance(ground_truth, Mapping):
        raise GroundTruthError("Track 1 ground truth must map image names to {annotations, tumor domain, roi type}")
    truths = {}
    for name, entry in ground_truth.items():
        if not isinstance(entry, Mapping):
            raise GroundTruthError(f"ground truth for {name} is not a dictionary")
        for key in ("annotations", "tumor domain", "roi type"):
            if key not in entry:
                raise GroundTruthError(f"ground truth for {name}: field '{key}' is missing")
        if entry["roi type"] not in ROI_TYPES:
            raise GroundTruthError(f"ground truth for {name}: invalid roi type {entry['roi type']!r}; "
                                   f"valid values are {list(ROI_TYPES)}")
        points = entry["annotations"]
        if not isinstance(points, list) or not all(
                isinstance(p, list) and len(p) == 3 and all(is_number(v) for v in p) for p in points):
            raise GroundTruthError(f"ground truth for {name}: field 'annotations' must be a list of [x, y, z] in mm")
        truths[name] = ImageTruth(name=name, points=np.asarray(points, dtype=np.float64).reshape(-1, 3),
                                  tumor_domain=entry["tumor domain"], roi_type=entry["roi type"])
    return truths


def parse_points(payload: Any, pk: str, check_coordinates: bool = True) -> ImagePrediction:
    """One job's "Multiple points" output, validated like the official container.

    Rejected, with the job and the field named: no `points`, a point that is not a dictionary, a missing
    `name`/`probability`/`point`, a name other than "mitotic figure"/"non-mitotic figure", a probability that is not
    a finite number, a point with fewer than three coordinates (the container would crash on it), and, unless
    `check_coordinates` is off, an x or y below -7.5 µm or above 10 mm (the container's final version fails the
    whole evaluation on it: such points are almost always pixel coordinates; its first version, which produced the
    published test metrics.json, did not check).
    """
    points = payload.get("points") if isinstance(payload, Mapping) else None
    if not isinstance(points, list):
        raise PredictionError(f"job {pk}: field 'points' is missing; results must be a dictionary with a 'points' list")
    coords, mitotic, probability = [], [], []
    for i, point in enumerate(points):
        where = f"job {pk}: points[{i}]"
        if not isinstance(point, Mapping):
            raise PredictionError(f"{where} is not a dictionary")
        for key in ("name", "probability", "point"):
            if key not in point:
                raise PredictionError(f"{where}: field '{key}' is missing")
        if point["name"] not in VALID_NAMES:
            raise PredictionError(f"{where}: field 'name' is {point['name']!r}; valid values are {list(VALID_NAMES)}")
        if not is_number(point["probability"]):
            raise PredictionError(f"{where}: field 'probability' must be a float, got {point['probability']!r}")
        xyz = point["point"]
        # The container keeps point[0:3] and needs all three; anything after z is ignored, as there.
        if not isinstance(xyz, list) or len(xyz) < 3 or not all(is_number(v) for v in xyz[:3]):
            raise PredictionError(f"{where}: field 'point' must be [x, y, z] in mm, got {xyz!r}")
        if check_coordinates:
            _check_millimetres(xyz, where)
        coords.append(xyz[:3])
        mitotic.append(point["name"] == MITOTIC_FIGURE)
        probability.append(float(point["probability"]))
    return ImagePrediction(pk=pk, points=np.asarray(coords, dtype=np.float64).reshape(-1, 3),
                           mitotic=np.asarray(mitotic, dtype=bool), probability=np.asarray(probability))


COORDINATE_CHECK_HINT = ("--no-coordinate-check accepts such points, as the container's first version did (the "
                         "published test vectors need it)")


def _check_millimetres(xyz: list, where: str) -> None:
    if xyz[0] < MIN_COORDINATE_MM or xyz[1] < MIN_COORDINATE_MM:
        raise PredictionError(f"{where}: invalid point coordinates {xyz[:3]} (below -7.5 µm); "
                              f"{COORDINATE_CHECK_HINT}")
    if xyz[0] > MAX_COORDINATE_MM or xyz[1] > MAX_COORDINATE_MM:
        raise PredictionError(f"{where}: invalid point coordinates {xyz[:3]}: beyond 10 mm, are these pixel "
                              f"coordinates? The output must be in millimetres; {COORDINATE_CHECK_HINT}")


# ---- matching ------------------------------------------------------------------------------------------------

def _flatten_z(points: np.ndarray) -> np.ndarray:
    flat = np.array(points, dtype=np.float64).reshape(-1, 3)
    flat[:, 2] = 0.0
    return flat


def _greedy(hits: Iterable[Sequence[int]], n_predictions: int) -> tuple[np.ndarray, np.ndarray]:
    """evalutils' assignment: each target, in order, takes its nearest still-free prediction."""
    taken = np.zeros(n_predictions, dtype=bool)
    truth_hit = []
    for target_hits in hits:
        for idx in target_hits:
            if not taken[idx]:
                taken[idx] = True
                truth_hit.append(True)
                break
        else:
            truth_hit.append(False)
    return taken, np.asarray(truth_hit, dtype=bool)


def _ties_between_distinct_points(hits: Sequence[np.ndarray], distances: Sequence[np.ndarray],
                                  points: np.ndarray) -> bool:
    """Whether some target has two points at different places at exactly the same distance (sorted hit lists).
    Points at the same place may tie freely: swapping them changes no count."""
    for idx, dist in zip(hits, distances):
        same = np.flatnonzero(dist[1:] == dist[:-1])
        if len(same) and np.any(points[idx[same]] != points[idx[same + 1]]):
            return True
    return False


def score_detection(truth: np.ndarray, predictions: np.ndarray, radius: float = MATCH_RADIUS_MM) -> DetectionScore:
    """TP/FN/FP exactly as evalutils.scorers.score_detection (BallTree, sorted radius query, greedy per target)."""
    truth = np.asarray(truth, dtype=np.float64).reshape(-1, 3)
    predictions = np.asarray(predictions, dtype=np.float64).reshape(-1, 3)
    n, m = len(truth), len(predictions)
    if n == 0 or m == 0:
        return DetectionScore(0, n, m, np.zeros(m, dtype=bool), np.zeros(n, dtype=bool))
    hits = BallTree(predictions).query_radius(truth, r=radius, return_distance=True, sort_results=True)[0]
    taken, truth_hit = _greedy(hits, m)
    tp = int(truth_hit.sum())
    return DetectionScore(tp, n - tp, m - tp, taken, truth_hit)


class ThresholdSweep:
    """Counts at any probability threshold for one image, from a single radius query over all its points.

    Keeping the points with probability >= t keeps each target's hit list in distance order, so the greedy
    assignment on the kept points is the one `score_detection` would make on them, unless two different points
    lie at exactly the same distance from a target: BallTree orders such ties by its own tree, which changes with
    the points kept. Without such ties, only the points within reach of a target can change the true positives, so
    the assignment is computed once per distinct probability among them and every other threshold is a lookup.
    With them (points on a common grid, e.g. integer pixels), every distinct probability is scored with
    `score_detection` on the kept points, as the container does (tests/evaluate compares both with
    grand-challenge-metrics).
    """

    def __init__(self, truth: np.ndarray, prediction: ImagePrediction, radius: float = MATCH_RADIUS_MM):
        self.n_truth = len(truth)
        self.probabilities = np.sort(prediction.probability)
        """Every point's probability, ascending."""
        self._levels = np.zeros(0)
        """Ascending probabilities at which the true positives are computed (any kept above count)."""
        self._tp_by_kept_levels = np.zeros(1, dtype=np.int64)
        """TP when the k highest levels are kept, k = 0..len(levels)."""
        if self.n_truth == 0 or len(prediction.probability) == 0:
            return
        points = _flatten_z(prediction.points)
        hits, distances = BallTree(points).query_radius(truth, r=radius, return_distance=True, sort_results=True)
        hits = list(hits)
        reachable = np.unique(np.concatenate(hits)).astype(np.int64)
        if len(reachable) == 0:
            return
        probability = prediction.probability
        tps = [0]
        if _ties_between_distinct_points(hits, distances, points):
            self._levels = np.unique(probability)
            for level in self._levels[::-1]:
                tps.append(score_detection(truth, points[probability >= level], radius).true_positives)
        else:
            self._levels = np.unique(probability[reachable])
            for level in self._levels[::-1]:
                keep = probability >= level
                tps.append(int(_greedy(([i for i in h if keep[i]] for h in hits), len(keep))[1].sum()))
        self._tp_by_kept_levels = np.asarray(tps, dtype=np.int64)

    def counts_many(self, thresholds: np.ndarray) -> np.ndarray:
        """(len(thresholds), 3) array of TP, FN, FP when the points with probability >= t are kept."""
        t = np.asarray(thresholds, dtype=np.float64).reshape(-1)
        kept = len(self.probabilities) - np.searchsorted(self.probabilities, t, side="left")
        levels_kept = len(self._levels) - np.searchsorted(self._levels, t, side="left")
        tp = self._tp_by_kept_levels[levels_kept]
        return np.stack([tp, self.n_truth - tp, kept - tp], axis=1)

    def counts(self, threshold: float) -> tuple[int, int, int]:
        tp, fn, fp = self.counts_many(np.array([threshold]))[0]
        return int(tp), int(fn), int(fp)


# ---- metrics -------------------------------------------------------------------------------------------------

def precision_recall_f1(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    """The official formulas, eps = 1e-6 (an empty group gets F1 = 1)."""
    return tp / (tp + fp + EPS), tp / (tp + fn + EPS), (2 * tp + EPS) / ((2 * tp) + fp + fn + EPS)


def tumor_roitype_f1(tp: int, fp: int, fn: int) -> float:
    """The F1 of the container's `tumor_roitype` table: 2tp/(2tp+fp+fn+eps), eps only in the denominator, so 0
    when tp = 0 (the overall, per-domain and per-ROI-type F1 of `precision_recall_f1` give eps/(fp+fn+eps) then)."""
    return 2 * tp / ((2 * tp) + fp + fn + EPS)


def average_precision(images: Sequence[tuple[ImageTruth, ImagePrediction]], backend: str = "numpy") -> float:
    """The official AP: torchmetrics' map_50 with the container's settings, -1 for a group without ground truth.

    backend "torchmetrics" runs torchmetrics + pycocotools as the container does; "numpy" (default) is the same
    computation for this one-class, IoU 0.5, all-areas case in vectorised form, ~100x faster on a full test set
    (pycocotools evaluates 10 IoU thresholds and 4 area ranges we never read). tests/evaluate checks that both give
    the same number to the last bit on many random cases.
    """
    if backend == "numpy":
        return _coco_ap50(images)
    if backend != "torchmetrics":
        raise ValueError(f"unknown AP backend {backend!r}")
    return _torchmetrics_ap50(images)


def _boxes_xywh(points: np.ndarray) -> np.ndarray:
    """What torchmetrics hands pycocotools: float32 xyxy boxes (from Python floats), converted to xywh in float32."""
    b = BOX_HALF_SIZE_MM
    x, y = points[:, 0], points[:, 1]
    xyxy = np.stack([x - b, y - b, x + b, y + b], axis=1).astype(np.float32)
    return np.stack([xyxy[:, 0], xyxy[:, 1], xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]],
                    axis=1).astype(np.float64)


def _bbox_iou(dt: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """pycocotools' bbIou (maskApi.c) in float64: (len(dt), len(gt))."""
    w = np.minimum((dt[:, 2] + dt[:, 0])[:, None], (gt[:, 2] + gt[:, 0])[None]) - np.maximum(
        dt[:, 0][:, None], gt[:, 0][None])
    h = np.minimum((dt[:, 3] + dt[:, 1])[:, None], (gt[:, 3] + gt[:, 1])[None]) - np.maximum(
        dt[:, 1][:, None], gt[:, 1][None])
    inter = w * h
    union = ((dt[:, 2] * dt[:, 3])[:, None] + (gt[:, 2] * gt[:, 3])[None]) - inter
    return np.where((w > 0) & (h > 0), inter / union, 0.0)


def _coco_ap50(images: Sequence[tuple[ImageTruth, ImagePrediction]]) -> float:
    """COCOeval.evaluateImg + accumulate + summarize for one category, IoU 0.5, area "all", every detection."""
    if not images:
        return -1.0
    scores, matched = [], []
    n_truth = 0
    for truth, pred in images:
        n_truth += len(truth.points)
        if len(pred.points) == 0:
            continue
        score = pred.probability.astype(np.float32).astype(np.float64)
        order = np.argsort(-score, kind="mergesort")
        hit = np.zeros(len(order), dtype=bool)
        if len(truth.points):
            ious = _bbox_iou(_boxes_xywh(pred.points)[order], _boxes_xywh(truth.points))
            taken = np.zeros(len(truth.points), dtype=bool)
            for d in range(len(order)):
                best_iou, best = 0.5, -1  # min(0.5, 1 - 1e-10)
                for g in np.flatnonzero(~taken & (ious[d] >= 0.5)):
                    if ious[d, g] >= best_iou:  # pycocotools: the last truth with the highest IoU wins
                        best_iou, best = ious[d, g], g
                if best >= 0:
                    taken[best] = hit[d] = True
        scores.append(score[order])
        matched.append(hit)
    if n_truth == 0:
        return -1.0
    recall_thresholds = np.array(np.arange(0, 1.01, 0.01).tolist(), dtype=np.float64)
    q = np.zeros(len(recall_thresholds))
    if scores:
        all_scores = np.concatenate(scores)
        hits = np.concatenate(matched)[np.argsort(-all_scores, kind="mergesort")]
        tp = np.cumsum(hits).astype(np.float64)
        fp = np.cumsum(~hits).astype(np.float64)
        recall = tp / n_truth
        precision = tp / (fp + tp + np.spacing(1))
        precision = np.maximum.accumulate(precision[::-1])[::-1]
        index = np.searchsorted(recall, recall_thresholds, side="left")
        valid = index < len(precision)
        q[valid] = precision[index[valid]]
    return float(np.float32(np.mean(q)))


def _torchmetrics_ap50(images: Sequence[tuple[ImageTruth, ImagePrediction]]) -> float:
    import torch
    from torchmetrics.detection.mean_ap import MeanAveragePrecision

    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", max_detection_thresholds=[1, 10, 1e6],
                                  rec_thresholds=np.arange(0, 1.01, 0.01).tolist())
    b = BOX_HALF_SIZE_MM
    for truth, pred in images:
        # The official code builds the tensors from Python lists with torch.Tensor (float32); we do the same.
        preds = [{"boxes": torch.Tensor([[x - b, y - b, x + b, y + b] for x, y, _ in pred.points.tolist()]),
                  "labels": torch.IntTensor([1] * len(pred.points)),
                  "scores": torch.Tensor(pred.probability.tolist())}]
        target = [{"boxes": torch.Tensor([[x - b, y - b, x + b, y + b] for x, y, _ in truth.points.tolist()]),
                   "labels": torch.IntTensor([1] * len(truth.points))}]
        metric.update(preds, target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics warns when compute() follows no update (an empty group)
        return float(metric.compute()["map_50"].tolist())


def _summed_counts(sweeps: Sequence[ThresholdSweep], thresholds: np.ndarray) -> np.ndarray:
    """(len(thresholds), 3) TP, FN, FP summed over the images."""
    total = np.zeros((len(thresholds), 3), dtype=np.int64)
    for sweep in sweeps:
        total += sweep.counts_many(thresholds)
    return total


@dataclass(frozen=True)
class FrocCurve:
    thresholds: np.ndarray
    """Probability thresholds, ascending; a point counts when probability >= threshold (empty without points)."""
    sensitivity: np.ndarray
    fp_per_image: np.ndarray
    grid: np.ndarray
    """FP/image evaluation points, 0..FROC_MAX_FP_PER_IMAGE."""
    grid_sensitivity: np.ndarray
    auc: float
    """NaN when the group has no predicted point at all, as in the container."""


def froc_curve(sweeps: Sequence[ThresholdSweep], n_thresholds: int = FROC_THRESHOLDS,
               n_points: int = FROC_POINTS, max_fp_per_image: float = FROC_MAX_FP_PER_IMAGE) -> FrocCurve:
    """The container's `calc_froc_score`, over all points (both names) ranked by probability.

    - Thresholds: `n_thresholds` evenly spaced from the lowest to the highest probability of the group's points
      (one threshold when they are all equal); no point at all gives NaN.
    - At each, the points with probability >= t are matched within 7.5 µm like the F1 counts: sensitivity
      = TP / (TP + FN + 1e-6) over the group, FP per image = the images' mean FP count.
    - The (FP/image, sensitivity) pairs are ordered by FP/image with numpy's default argsort (ties stay in
      whatever order it leaves them, as there), read by `np.interp` at `n_points` evenly spaced FP/image values in
      [0, max_fp_per_image] (0 left of the curve, its last sensitivity right of it; no origin is added) and
      integrated with the trapezoidal rule: at most 8 (7.999996 with the epsilon) for a detector that finds every
      figure before its first false positive.
    """
    grid = np.linspace(0.0, max_fp_per_image, n_points)
    probabilities = [s.probabilities for s in sweeps if len(s.probabilities)]
    if not probabilities:
        empty = np.zeros(0)
        return FrocCurve(empty, empty, empty, grid, np.full(n_points, np.nan), float("nan"))
    lowest = min(float(p[0]) for p in probabilities)
    highest = max(float(p[-1]) for p in probabilities)
    thresholds = np.array([lowest]) if lowest == highest else np.linspace(lowest, highest, n_thresholds)
    tp, fn, fp = _summed_counts(sweeps, thresholds).T
    sensitivity = tp / (tp + fn + EPS)
    fp_per_image = fp / len(sweeps)
    order = np.argsort(fp_per_image)
    grid_sensitivity = np.interp(grid, fp_per_image[order], sensitivity[order], left=0,
                                 right=sensitivity[order][-1])
    return FrocCurve(thresholds, sensitivity, fp_per_image, grid, grid_sensitivity,
                     float(np.trapezoid(grid_sensitivity, grid)))


@dataclass(frozen=True)
class ThresholdCurve:
    """Precision, recall and F1 when the points with probability >= threshold count as mitotic figures."""

    thresholds: np.ndarray
    """Ascending."""
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray

    def best(self) -> tuple[float, float]:
        """(threshold, F1) with the highest F1; among equal F1, the highest threshold."""
        best_f1 = self.f1.max()
        index = int(np.flatnonzero(self.f1 == best_f1)[-1])
        return float(self.thresholds[index]), float(best_f1)


def sweep_thresholds(probabilities: np.ndarray, limit: int = MAX_SWEEP_THRESHOLDS) -> np.ndarray:
    """Where counts can change: every distinct probability, or `limit` of them at evenly spaced quantiles."""
    unique = np.unique(probabilities)
    if len(unique) > limit:
        unique = np.unique(np.quantile(probabilities, np.linspace(0, 1, limit), method="inverted_cdf"))
    return unique


def threshold_curve(sweeps: Sequence[ThresholdSweep], thresholds: np.ndarray) -> ThresholdCurve:
    tp, fn, fp = _summed_counts(sweeps, thresholds).T
    precision, recall, f1 = precision_recall_f1(tp, fp, fn)
    return ThresholdCurve(np.asarray(thresholds, dtype=np.float64), tp, fp, fn, precision, recall, f1)


# ---- evaluation ----------------------------------------------------------------------------------------------

@dataclass
class ImageResult:
    truth: ImageTruth
    prediction: ImagePrediction
    score: DetectionScore
    """On the points named "mitotic figure"."""
    sweep: ThresholdSweep = field(repr=False)

    def official(self) -> dict[str, Any]:
        """The container's per-image result (its `gt` is emptied before writing, as the container does)."""
        return {"image": self.truth.name, "gt": [], "tumor_domain": self.truth.tumor_domain,
                "pred": self.prediction.rows(), "metrics": self.score.as_dict(), "roi_type": self.truth.roi_type}


def _domain_key(domain: Any) -> str:
    return str(domain)


@dataclass
class Track1Evaluation:
    images: list[ImageResult]
    aggregates: dict[str, Any]
    froc: FrocCurve
    curve: ThresholdCurve

    def metrics(self) -> dict[str, Any]:
        """The official metrics.json: per-image results and the aggregates."""
        return {"results": [r.official() for r in self.images], "aggregates": self.aggregates}


def _group_metrics(images: Sequence[ImageResult], with_froc: bool, ap_backend: str) -> dict[str, float]:
    tp = sum(r.score.true_positives for r in images)
    fp = sum(r.score.false_positives for r in images)
    fn = sum(r.score.false_negatives for r in images)
    precision, recall, f1 = precision_recall_f1(tp, fp, fn)
    values = {"precision": precision, "recall": recall, "f1": f1,
              "AP": average_precision([(r.truth, r.prediction) for r in images], ap_backend),
              "positives": tp + fn, "tumor_roitype_f1": tumor_roitype_f1(tp, fp, fn)}
    if with_froc:
        values["froc_auc"] = froc_curve([r.sweep for r in images]).auc
    return values


def aggregate(images: Sequence[ImageResult], with_froc: bool = True, ap_backend: str = "numpy") -> dict[str, Any]:
    """Official aggregate keys, in the container's order, plus froc_auc and the tumour × ROI table it later added."""
    overall = _group_metrics(images, with_froc, ap_backend)
    out: dict[str, Any] = {"precision": overall["precision"], "recall": overall["recall"], "f1_score": overall["f1"]}
    if with_froc:
        out["froc_auc"] = overall["froc_auc"]
    out["AP"] = overall["AP"]
    domains = sorted({r.truth.tumor_domain for r in images}, key=lambda d: (str(type(d)), d))
    for domain in domains:
        group = _group_metrics([r for r in images if r.truth.tumor_domain == domain], with_froc, ap_backend)
        key = f"tumor_{_domain_key(domain)}"
        for name in ("precision", "recall", "f1", "AP") + (("froc_auc",) if with_froc else ()):
            out[f"{key}_{name}"] = group[name]
    table: dict[str, Any] = {}
    for roi_type in ROI_TYPES:
        for domain in domains:
            subset = [r for r in images if r.truth.tumor_domain == domain and r.truth.roi_type == roi_type]
            if not subset:
                continue
            group = _group_metrics(subset, with_froc, ap_backend)
            group["f1"] = group["tumor_roitype_f1"]  # this table's own F1 formula
            for name in ("f1", "precision", "recall", "positives", "AP") + (("froc_auc",) if with_froc else ()):
                table[f"{_domain_key(domain)}_{roi_type}_{name}"] = group[name]
    out["tumor_roitype"] = table
    for roi_type in ROI_TYPES:  # every ROI type, present or not, as the container does
        group = _group_metrics([r for r in images if r.truth.roi_type == roi_type], with_froc, ap_backend)
        for name in ("precision", "recall", "f1", "AP") + (("froc_auc",) if with_froc else ()):
            out[f"roi_type_{roi_type}_{name}"] = group[name]
    return out


def evaluate_jobs(jobs: Iterable[Job], ground_truth: Mapping[str, Any], with_froc: bool = True,
                  ap_backend: str = "numpy", check_coordinates: bool = True) -> Track1Evaluation:
    """Score jobs one after another in their order against the ground truth, like the container's final version:
    the first bad job (in predictions.json order with `midog.evaluate.io.iter_jobs`) is the one an error names,
    and the order decides AP ties between images. See `score` for the API."""
    truths = parse_ground_truth(ground_truth)
    images = []
    seen: dict[str, str] = {}
    for job in jobs:
        if job.image not in truths:
            raise PredictionError(f"job {job.pk}: ground truth for processed image {job.image} not found")
        if job.image in seen:
            raise PredictionError(f"job {job.pk}: image {job.image} was already scored (job {seen[job.image]})")
        seen[job.image] = job.pk
        truth = truths[job.image]
        prediction = parse_points(job.payload, job.pk, check_coordinates)
        score = score_detection(truth.points, _flatten_z(prediction.points[prediction.mitotic]))
        images.append(ImageResult(truth, prediction, score, ThresholdSweep(truth.points, prediction)))
    if not images:
        raise PredictionError("no predictions to evaluate")
    sweeps = [r.sweep for r in images]
    froc = froc_curve(sweeps)
    curve = threshold_curve(sweeps, sweep_thresholds(np.concatenate([r.prediction.probability for r in images])))
    return Track1Evaluation(images, aggregate(images, with_froc, ap_backend), froc, curve)


def jobs_from_mapping(predictions: Mapping[str, Any]) -> list[Job]:
    """image name → "Multiple points" payload (or just its list of points), in the mapping's order."""
    return [Job(pk=str(name), image=str(name), payload={"points": payload} if isinstance(payload, list) else payload)
            for name, payload in predictions.items()]


def evaluate(predictions: Mapping[str, Any], ground_truth: Mapping[str, Any], with_froc: bool = True,
             ap_backend: str = "numpy", check_coordinates: bool = True) -> Track1Evaluation:
    return evaluate_jobs(jobs_from_mapping(predictions), ground_truth, with_froc, ap_backend, check_coordinates)


def score(predictions: Mapping[str, Any], ground_truth: Mapping[str, Any], with_froc: bool = True,
          ap_backend: str = "numpy", check_coordinates: bool = True) -> dict[str, Any]:
    """Official Track 1 aggregates for `predictions` (image name → points or "Multiple points" dict).

    `ground_truth` is the official format (image name → annotations, tumour domain, ROI type). Images are added to
    AP in the mapping's order (it decides score ties between images, as the job order does in the container).
    """
    return evaluate(predictions, ground_truth, with_froc, ap_backend, check_coordinates).aggregates
