"""Track 1 metrics on hand-computed cases: F1 with the official epsilon, AP edge cases, FROC, groups, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from evaluate_factory import payload, point, truth
from tests.official_reference import official_froc
from midog.evaluate import GroundTruthError, PredictionError
from midog.evaluate.track1 import EPS, evaluate, precision_recall_f1, score


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


def test_tumor_roitype_f1_has_eps_only_in_the_denominator() -> None:
    # The final container's tumour x ROI type table: F1 = 2tp / (2tp + fp + fn + eps), so 0 when tp = 0, while
    # the overall, per-domain and per-ROI-type F1 stay (2tp + eps) / (2tp + fp + fn + eps).
    gt = {"a.tiff": truth([(i * 100, 0) for i in range(8)], domain=2, roi="challenging"),
          "b.tiff": truth([(0, 0)], domain=2, roi="random")}
    predictions = {"a.tiff": payload([point(0, 0)] + [point(i * 100, 500) for i in range(7)]),  # TP 1, FP 7, FN 7
                   "b.tiff": payload([point(300, 300)])}  # TP 0, FP 1, FN 1
    agg = score(predictions, gt)
    table = agg["tumor_roitype"]
    assert table["2_challenging_f1"] == 0.12499999218750048 == 2 / 16.000001
    assert agg["roi_type_challenging_f1"] == (2 + EPS) / (16 + EPS)
    assert table["2_random_f1"] == 0.0
    assert agg["roi_type_random_f1"] == EPS / (2 + EPS)
    for roi in ("challenging", "random"):  # precision and recall keep the overall formulas there
        assert table[f"2_{roi}_precision"] == agg[f"roi_type_{roi}_precision"]
        assert table[f"2_{roi}_recall"] == agg[f"roi_type_{roi}_recall"]


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


def froc_of(predictions: dict, gt: dict) -> tuple[float, float]:
    """(ours, the container's) overall FROC AUC for image name -> payload."""
    ev = evaluate(predictions, gt)
    truths = [gt[name]["annotations"] for name in predictions]
    detections = [[[*p["point"], int(p["name"] == "mitotic figure"), p["probability"]] for p in pay["points"]]
                  for pay in predictions.values()]
    return ev.aggregates["froc_auc"], official_froc(truths, detections)


def test_froc_of_a_perfect_detector_is_the_full_range_less_the_epsilon() -> None:
    ev = evaluate({"a.tiff": payload([point(0, 0, 0.9), point(100, 0, 0.9)])}, {"a.tiff": truth([(0, 0), (100, 0)])})
    assert ev.froc.auc == pytest.approx(8 * 2 / (2 + EPS))  # sensitivity 2 / (2 + 1e-6) from 0 FP/image on


def test_froc_reads_the_sensitivity_of_the_highest_threshold_when_all_share_zero_false_positives() -> None:
    # No false positive anywhere, so every threshold sits at 0 FP/image; argsort leaves them in threshold order
    # and np.interp holds the last one (t = 0.99, one figure of two found) beyond 0: half the range, as there.
    predictions = {"a.tiff": payload([point(0, 0, 0.99), point(100, 0, 0.5)])}
    gt = {"a.tiff": truth([(0, 0), (100, 0)])}
    ours, official = froc_of(predictions, gt)
    assert ours == official == pytest.approx(4 / (1 + EPS))
    froc = evaluate(predictions, gt).froc
    assert froc.thresholds[0] == 0.5 and froc.thresholds[-1] == 0.99  # the group's own probability range


def test_froc_without_any_detection_is_nan_as_in_the_container() -> None:
    ev = evaluate({"a.tiff": payload([])}, {"a.tiff": truth([(0, 0)])})
    assert math.isnan(ev.froc.auc) and math.isnan(ev.aggregates["froc_auc"])
    assert math.isnan(ev.aggregates["roi_type_random_froc_auc"])  # a ROI type without images


def test_froc_has_no_origin_point_so_a_curve_starting_above_zero_false_positives_reads_zero_before_it() -> None:
    # Image a: TP at 0.9. Image b: FP at 0.95, TP at 0.3. The curve starts at 0.5 FP/image (sensitivity 0 at
    # t = 0.95, 0.5 at t in (0.3, 0.9], 1 at t = 0.3): np.interp reads 0 left of it, and among the thresholds tied
    # at 0.5 FP/image the one argsort leaves last sets the value right of it.
    gt = {"a.tiff": truth([(0, 0)]), "b.tiff": truth([(0, 0)])}
    predictions = {"a.tiff": payload([point(0, 0, 0.9)]),
                   "b.tiff": payload([point(400, 0, 0.95), point(0, 0, 0.3)])}
    ours, official = froc_of(predictions, gt)
    assert ours == official
    froc = evaluate(predictions, gt).froc
    assert len(froc.thresholds) == 40 and froc.thresholds[0] == 0.3 and froc.thresholds[-1] == 0.95
    assert set(froc.fp_per_image) == {0.5} and froc.sensitivity[0] == pytest.approx(1.0)
    assert froc.sensitivity[-1] == 0.0 and np.all(froc.grid_sensitivity[froc.grid < 0.5] == 0)


def test_froc_beyond_eight_false_positives_per_image() -> None:
    # Ten FPs above the only TP: FP/image is 10 at every threshold, so the curve lies right of the 0-8 window.
    points = [point(1000 + 50 * i, 0, 0.9) for i in range(10)] + [point(0, 0, 0.1)]
    ours, official = froc_of({"a.tiff": payload(points)}, {"a.tiff": truth([(0, 0)])})
    assert ours == official == 0.0


def test_froc_with_all_probabilities_equal_uses_one_threshold() -> None:
    ev = evaluate({"a.tiff": payload([point(0, 0, 0.5), point(300, 0, 0.5)])}, {"a.tiff": truth([(0, 0)])})
    assert list(ev.froc.thresholds) == [0.5]
    assert ev.froc.auc == froc_of({"a.tiff": payload([point(0, 0, 0.5), point(300, 0, 0.5)])},
                                  {"a.tiff": truth([(0, 0)])})[1]


@pytest.mark.parametrize("seed", range(12))
def test_froc_equals_the_containers_on_random_sets(seed: int) -> None:
    rng = np.random.default_rng(seed)
    gt, predictions = {}, {}
    for i in range(int(rng.integers(1, 5))):
        figures = rng.uniform(0, 400, size=(int(rng.integers(0, 6)), 2))
        gt[f"{i}.tiff"] = truth([tuple(f) for f in figures], domain=int(rng.integers(0, 2)))
        near = figures[rng.random(len(figures)) < 0.7] + rng.normal(0, 4, size=(1, 2))
        far = rng.uniform(0, 400, size=(int(rng.integers(0, 8)), 2))
        spots = np.concatenate([near.reshape(-1, 2), far])
        levels = rng.choice([0.2, 0.5, 0.8], size=len(spots)) if seed % 3 == 0 else rng.random(len(spots))
        predictions[f"{i}.tiff"] = payload([point(x, y, float(p), name="mitotic figure" if p > 0.4 else
                                                  "non-mitotic figure") for (x, y), p in zip(spots, levels)])
    ours, official = froc_of(predictions, gt)
    assert ours == official or (math.isnan(ours) and math.isnan(official))


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


@pytest.mark.parametrize("xy_um, message", [((10_001, 5), "pixel coordinates"), ((5, 10_001), "pixel coordinates"),
                                            ((-8, 0), "below -7.5"), ((0, -8), "below -7.5")])
def test_points_outside_the_containers_millimetre_range_are_rejected(xy_um: tuple, message: str) -> None:
    gt = {"a.tiff": truth([(0, 0)])}
    with pytest.raises(PredictionError, match=message):
        score({"a.tiff": payload([point(*xy_um)])}, gt)
    assert score({"a.tiff": payload([point(*xy_um)])}, gt, check_coordinates=False)["f1_score"] < 1e-6
    # the edges themselves are accepted, as in the container
    assert score({"a.tiff": payload([point(-7.5, 10_000)])}, gt)["precision"] == 0.0


def test_empty_prediction_set_is_an_error() -> None:
    with pytest.raises(PredictionError, match="no predictions"):
        score({}, {"a.tiff": truth([])})


def test_aggregates_are_plain_json_numbers() -> None:
    agg = score({"a.tiff": payload([point(0, 0)])}, {"a.tiff": truth([(0, 0)], domain=2)})
    flat = {k: v for k, v in agg.items() if not isinstance(v, dict)} | agg["tumor_roitype"]
    assert all(type(v) in (float, int) for v in flat.values())
    # NaN only where the container writes it: the FROC of the ROI types without images
    assert {k for k, v in flat.items() if not math.isfinite(v)} == {"roi_type_random_froc_auc",
                                                                    "roi_type_challenging_froc_auc"}


def test_api_accepts_a_bare_list_of_points() -> None:
    gt = {"a.tiff": truth([(0, 0)])}
    bare, full = score({"a.tiff": [point(0, 0)]}, gt), score({"a.tiff": payload([point(0, 0)])}, gt)
    assert json.dumps(bare) == json.dumps(full)


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
