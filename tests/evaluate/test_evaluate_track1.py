"""Track 1 metrics on hand-computed cases: F1 with the official epsilon, AP edge cases, FROC, groups, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evaluate_factory import payload, point, truth
from midog.evaluate import GroundTruthError, PredictionError
from midog.evaluate.track1 import EPS, evaluate, froc_curve, precision_recall_f1, score


def test_official_formulas_with_epsilon() -> None:
    p, r, f1 = precision_recall_f1(3, 1, 2)
    assert p == 3 / (4 + EPS) and r == 3 / (5 + EPS) and f1 == (6 + EPS) / (6 + 1 + 2 + EPS)
    assert precision_recall_f1(0, 0, 0) == (0.0, 0.0, 1.0)  # an empty group scores F1 = 1, as in the container


def test_only_points_named_mitotic_figure_count_for_f1_but_all_count_for_ap() -> None:
    gt = {"a.tiff": truth([(0, 0)])}
    agg = score({"a.tiff": payload([point(0, 0, 0.9, name="non-mitotic figure")])}, gt)
    assert agg["f1_score"] == pytest.approx(EPS / (1 + EPS))
    assert agg["recall"] == 0.0
    assert agg["AP"] == pytest.approx(1.0)


def test_ap_counts_a_point_7_micrometres_off_but_not_8() -> None:
    # Boxes are 22.5 µm squares: 7 µm apart IoU = 15.5/29.5 > 0.5, 8 µm apart IoU = 14.5/30.5 < 0.5.
    gt = {"a.tiff": truth([(0, 0)])}
    assert score({"a.tiff": payload([point(7, 0)])}, gt)["AP"] == pytest.approx(1.0)
    assert score({"a.tiff": payload([point(8, 0)])}, gt)["AP"] == pytest.approx(0.0)


def test_ap_ranks_by_probability() -> None:
    gt = {"a.tiff": truth([(0, 0)])}
    # A false positive ranked above the only true positive: precision 0.5 at every recall level.
    ranked_wrong = payload([point(500, 500, 0.9), point(0, 0, 0.8)])
    assert score({"a.tiff": ranked_wrong}, gt)["AP"] == pytest.approx(0.5)
    ranked_right = payload([point(500, 500, 0.7), point(0, 0, 0.8)])
    assert score({"a.tiff": ranked_right}, gt)["AP"] == pytest.approx(1.0)


def test_group_without_truth_gets_ap_minus_one_and_absent_roi_types_are_reported() -> None:
    gt = {"a.tiff": truth([], domain=3, roi="random"), "b.tiff": truth([(0, 0)], domain=4, roi="hotspot")}
    agg = score({"a.tiff": payload([point(0, 0)]), "b.tiff": payload([point(0, 0)])}, gt)
    assert agg["tumor_3_AP"] == -1.0 and agg["tumor_3_precision"] == 0.0
    assert agg["tumor_4_f1"] == pytest.approx(1.0)
    assert agg["roi_type_challenging_f1"] == 1.0 and agg["roi_type_challenging_AP"] == -1.0  # no image at all
    assert agg["tumor_roitype"]["4_hotspot_positives"] == 1
    assert "3_hotspot_f1" not in agg["tumor_roitype"]


def test_counts_are_summed_over_images_of_a_group() -> None:
    gt = {"a.tiff": truth([(0, 0), (100, 0)], domain=0), "b.tiff": truth([(0, 0)], domain=0),
          "c.tiff": truth([(0, 0)], domain=1, roi="challenging")}
    predictions = {"a.tiff": payload([point(0, 0), point(300, 0)]),  # TP, FP; FN
                   "b.tiff": payload([point(1, 1)]),  # TP
                   "c.tiff": payload([point(50, 0), point(0, 2, name="non-mitotic figure")])}  # FP; FN
    ev = evaluate(predictions, gt)
    agg = ev.aggregates
    tp, fp, fn = 2, 2, 2
    assert agg["precision"] == tp / (tp + fp + EPS) and agg["recall"] == tp / (tp + fn + EPS)
    assert agg["tumor_0_precision"] == 2 / (3 + EPS) and agg["tumor_0_recall"] == 2 / (3 + EPS)
    assert agg["tumor_1_f1"] == EPS / (2 + EPS)
    assert agg["roi_type_hotspot_f1"] == (4 + EPS) / (4 + 1 + 1 + EPS)
    results = ev.metrics()["results"]
    assert [r["metrics"] for r in results] == [
        {"true_positives": 1, "false_negatives": 1, "false_positives": 1},
        {"true_positives": 1, "false_negatives": 0, "false_positives": 0},
        {"true_positives": 0, "false_negatives": 1, "false_positives": 1}]
    assert results[2]["pred"][1] == [0.0, 0.002, 0.0, 0, 0.9]


def test_froc_of_a_perfect_detector_is_the_full_range() -> None:
    ev = evaluate({"a.tiff": payload([point(0, 0, 0.99), point(100, 0, 0.5)])}, {"a.tiff": truth([(0, 0), (100, 0)])})
    assert ev.froc.auc == pytest.approx(8.0)


def test_froc_without_any_detection_is_zero() -> None:
    ev = evaluate({"a.tiff": payload([])}, {"a.tiff": truth([(0, 0)])})
    assert ev.froc.auc == 0.0 and ev.aggregates["froc_auc"] == 0.0


def test_froc_curve_points_by_hand() -> None:
    # Image a: TP at 0.9. Image b: FP at 0.95, TP at 0.3. Two images, two truths.
    gt = {"a.tiff": truth([(0, 0)]), "b.tiff": truth([(0, 0)])}
    ev = evaluate({"a.tiff": payload([point(0, 0, 0.9)]),
                   "b.tiff": payload([point(400, 0, 0.95), point(0, 0, 0.3)])}, gt)
    froc = ev.froc
    assert len(froc.thresholds) == 40 and len(froc.grid) == 50 and froc.grid[-1] == 8.0
    by_threshold = {round(t, 4): (s, f) for t, s, f in zip(froc.thresholds, froc.sensitivity, froc.fp_per_image)}
    t = froc.thresholds
    assert by_threshold[round(t[t > 0.95].min(), 4)] == (0.0, 0.0)
    assert by_threshold[round(t[(t <= 0.95) & (t > 0.9)].min(), 4)] == (0.0, 0.5)
    assert by_threshold[round(t[(t <= 0.9) & (t > 0.3)].min(), 4)] == (0.5, 0.5)
    assert by_threshold[round(t[t <= 0.3].max(), 4)] == (1.0, 0.5)
    # The curve: origin, then sensitivity 1 at 0.5 FP/image, flat to 8 -> about 8 - 0.25.
    expected = np.trapezoid(np.interp(froc.grid, [0, 0.5], [0, 1]), froc.grid)
    assert froc.auc == pytest.approx(expected) and abs(froc.auc - 7.75) < 0.01


def test_froc_beyond_eight_false_positives_per_image() -> None:
    # Ten FPs above the only TP: sensitivity reaches 1 at 10 FP/image, so at 8 it is 0.8 on the straight line.
    points = [point(1000 + 50 * i, 0, 0.9) for i in range(10)] + [point(0, 0, 0.1)]
    ev = evaluate({"a.tiff": payload(points)}, {"a.tiff": truth([(0, 0)])})
    assert ev.froc.auc == pytest.approx(0.5 * 8 * 0.8)
    # Fewer evaluation points change the grid, not this straight-line area.
    assert froc_curve([ev.images[0].sweep], n_points=9).auc == pytest.approx(3.2)


@pytest.mark.parametrize("bad, field", [
    ({"name": "mitosis", "point": [0, 0, 0], "probability": 0.5}, "'name'"),
    ({"point": [0, 0, 0], "probability": 0.5}, "'name'"),
    ({"name": "mitotic figure", "point": [0, 0, 0]}, "'probability'"),
    ({"name": "mitotic figure", "point": [0, 0, 0], "probability": "0.5"}, "'probability'"),
    ({"name": "mitotic figure", "point": [0, 0, 0], "probability": None}, "'probability'"),
    ({"name": "mitotic figure", "point": [0, 0, 0], "probability": True}, "'probability'"),
    ({"name": "mitotic figure", "point": [0, 0, 0], "probability": float("nan")}, "'probability'"),
    ({"name": "mitotic figure", "probability": 0.5}, "'point'"),
    ({"name": "mitotic figure", "point": [0.1, 0.2], "probability": 0.5}, "'point'"),
    ({"name": "mitotic figure", "point": [0.1, "y", 0], "probability": 0.5}, "'point'"),
    ("mitotic figure at 0,0", "not a dictionary"),
])
def test_malformed_points_name_the_job_and_the_field(bad: object, field: str) -> None:
    with pytest.raises(PredictionError, match=field) as info:
        score({"roi-7.tiff": payload([point(0, 0), bad])}, {"roi-7.tiff": truth([(0, 0)])})
    assert "job roi-7.tiff" in str(info.value) and "points[1]" in str(info.value)
    assert "\n" not in str(info.value)


def test_output_without_points_is_rejected() -> None:
    with pytest.raises(PredictionError, match="job a.tiff: field 'points'"):
        score({"a.tiff": {"type": "Multiple points"}}, {"a.tiff": truth([])})


def test_coordinates_after_z_are_ignored_like_the_container() -> None:
    extra = {"name": "mitotic figure", "point": [0.0, 0.0, 0.0, 7.0], "probability": 0.9}
    ev = evaluate({"a.tiff": payload([extra])}, {"a.tiff": truth([(0, 0)])})
    assert ev.metrics()["results"][0]["pred"] == [[0.0, 0.0, 0.0, 1, 0.9]]


def test_duplicate_images_are_rejected(tmp_path) -> None:
    from evaluate_factory import container_folder
    from midog.evaluate.io import load_jobs
    from midog.evaluate.track1 import evaluate_jobs

    folder = container_folder(tmp_path, {"a.tiff": payload([]), "b.tiff": payload([])})
    jobs = load_jobs(folder, 1, {"a.tiff", "b.tiff"})
    with pytest.raises(PredictionError, match="job job-1: image a.tiff was already scored"):
        evaluate_jobs([jobs[0], type(jobs[1])(pk="job-1", image="a.tiff", payload=jobs[1].payload)],
                      {"a.tiff": truth([]), "b.tiff": truth([])})


def test_integer_probability_is_accepted_like_the_container() -> None:
    assert score({"a.tiff": payload([point(0, 0, probability=1)])}, {"a.tiff": truth([(0, 0)])})["recall"] > 0.99


def test_image_without_ground_truth_and_duplicates_are_rejected() -> None:
    with pytest.raises(PredictionError, match="b.tiff not found"):
        score({"b.tiff": payload([])}, {"a.tiff": truth([])})


@pytest.mark.parametrize("entry, field", [
    ({"annotations": [], "tumor domain": 0, "roi type": "boring"}, "roi type"),
    ({"annotations": [], "roi type": "random"}, "'tumor domain'"),
    ({"tumor domain": 0, "roi type": "random"}, "'annotations'"),
    ({"annotations": [[0, 0]], "tumor domain": 0, "roi type": "random"}, "'annotations'"),
])
def test_bad_ground_truth(entry: dict, field: str) -> None:
    with pytest.raises(GroundTruthError, match=field):
        score({"a.tiff": payload([])}, {"a.tiff": entry})


def test_empty_prediction_set_is_an_error() -> None:
    with pytest.raises(PredictionError, match="no predictions"):
        score({}, {"a.tiff": truth([])})


def test_aggregates_are_plain_json_numbers() -> None:
    agg = score({"a.tiff": payload([point(0, 0)])}, {"a.tiff": truth([(0, 0)], domain=2)})
    flat = [v for v in agg.values() if not isinstance(v, dict)] + list(agg["tumor_roitype"].values())
    assert all(type(v) in (float, int) and math.isfinite(v) for v in flat)


def test_api_accepts_a_bare_list_of_points() -> None:
    gt = {"a.tiff": truth([(0, 0)])}
    assert score({"a.tiff": [point(0, 0)]}, gt) == score({"a.tiff": payload([point(0, 0)])}, gt)


def _random_images(rng: np.random.Generator, ties: bool) -> list:
    from midog.evaluate.track1 import ImagePrediction, ImageTruth

    images = []
    for i in range(int(rng.integers(1, 5))):
        n_truth, n_pred = int(rng.integers(0, 5)), int(rng.integers(0, 8))
        truth_xy = rng.uniform(0, 0.1, (n_truth, 2))
        anchor = truth_xy[rng.integers(0, n_truth, n_pred)] if n_truth else rng.uniform(0, 0.1, (n_pred, 2))
        pred_xy = np.where(rng.uniform(size=(n_pred, 1)) < 0.6, anchor + rng.normal(0, 0.006, (n_pred, 2)),
                           rng.uniform(0, 0.1, (n_pred, 2)))
        probs = rng.choice([0.3, 0.5, 0.9], n_pred) if ties else rng.uniform(0, 1, n_pred)
        images.append((ImageTruth(str(i), np.c_[truth_xy, np.zeros(n_truth)], 0, "hotspot"),
                       ImagePrediction(str(i), np.c_[pred_xy, np.zeros(n_pred)], np.ones(n_pred, bool), probs)))
    return images


def test_numpy_ap_equals_torchmetrics_to_the_last_bit() -> None:
    from midog.evaluate.track1 import average_precision

    rng = np.random.default_rng(7)
    for case in range(40):
        images = _random_images(rng, ties=case % 2 == 0)
        assert average_precision(images, "numpy") == average_precision(images, "torchmetrics"), case


def test_numpy_ap_equals_torchmetrics_at_the_iou_boundary() -> None:
    from midog.evaluate.track1 import average_precision

    gt = {"a.tiff": truth([(0, 0), (100, 0)]), "b.tiff": truth([(0, 0)])}
    # 7.5 µm apart is IoU ~0.5; several predictions compete for one truth with equal scores.
    ev = evaluate({"a.tiff": payload([point(7.5, 0, 0.5), point(-7.5, 0, 0.5), point(100, 7.5, 0.5)]),
                   "b.tiff": payload([point(0, 7.5, 0.5), point(7.49, 0, 0.4)])}, gt)
    pairs = [(r.truth, r.prediction) for r in ev.images]
    assert average_precision(pairs, "numpy") == average_precision(pairs, "torchmetrics")
    assert average_precision(pairs[:0], "numpy") == -1.0
