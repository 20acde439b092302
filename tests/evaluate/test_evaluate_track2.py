"""Track 2 metrics with the official definitions, on hand-computed cases, and malformed outputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from midog.evaluate import GroundTruthError, PredictionError
from midog.evaluate.track2 import (PRE_2025_07_27, balanced_accuracy_curve, best_balanced_threshold, evaluate,
                                   score, threshold_candidates)


def entry(cls: str, confidence: float) -> dict:
    return {"class": cls, "confidence": confidence}


GT = [{"image": "s1.tiff", "labels": ["atypical", "normal", "atypical", "normal"], "tumordomains": [0, 0, 1, 1]},
      {"image": "s2.tiff", "labels": ["normal", "atypical"], "tumordomains": [1, 1]}]


def test_hand_computed_aggregates() -> None:
    predictions = {
        # truth:      A                         N                        A                        N
        "s1.tiff": [entry("atypical", 0.9), entry("atypical", 0.6), entry("normal", 0.7), entry("normal", 0.8)],
        # truth:      N                         A
        "s2.tiff": [entry("normal", 0.55), entry("atypical", 0.51)],
    }
    agg = score(predictions, GT)
    # Pages: TP (A->a), FP (N->a), FN (A->n), TN, TN, TP.  TP 2, FN 1, TN 2, FP 1.
    assert agg["overall_sensitivity"] == 2 / 3
    assert agg["overall_specificity"] == 2 / 3
    assert agg["overall_balanced_accuracy"] == pytest.approx(2 / 3)
    assert agg["overall_accuracy"] == 4 / 6
    # P(atypical) as the final container reads it: the confidence, whatever the class:
    # A 0.9, N 0.6, A 0.7, N 0.8, N 0.55, A 0.51. Positive > negative pairs: 0.9 beats 3, 0.7 beats 2 (0.6, 0.55),
    # 0.51 none -> 5 of 9.
    assert agg["overall_roc_auc"] == 5 / 9
    d0, d1 = agg["domain_0"], agg["domain_1"]
    assert d0 == {"sensitivity": 1.0, "specificity": 0.0, "balanced_accuracy": 0.5, "accuracy": 0.5,
                  "roc_auc": 1.0}
    # Domain 1: A->n (FN), N->n, N->n, A->a (TP); scores A 0.7, N 0.8, N 0.55, A 0.51 -> 1 of 4 pairs.
    assert d1["sensitivity"] == 0.5 and d1["specificity"] == 1.0 and d1["balanced_accuracy"] == 0.75
    assert d1["accuracy"] == 0.75 and d1["roc_auc"] == 1 / 4
    assert list(agg) == ["overall_sensitivity", "overall_specificity", "overall_balanced_accuracy",
                         "overall_roc_auc", "overall_accuracy", "domain_0", "domain_1"]
    # The container before 2025-07-27: confidence for "atypical", 1 - confidence for "normal":
    # A 0.9, N 0.6, A 0.3, N 0.2, N 0.45, A 0.51 -> 0.9 beats 3, 0.3 beats 1 (0.2), 0.51 beats 2 -> 6 of 9.
    old = score(predictions, GT, confidence=PRE_2025_07_27)
    assert old["overall_roc_auc"] == pytest.approx(6 / 9) and old["domain_1"]["roc_auc"] == pytest.approx(3 / 4)
    assert {k: v for k, v in old.items() if k != "overall_roc_auc" and not k.startswith("domain_")} == {
        k: v for k, v in agg.items() if k != "overall_roc_auc" and not k.startswith("domain_")}


def test_confidence_is_read_as_p_atypical_on_every_page_by_default() -> None:
    # The final container (2025-07-27 on) reads `confidence` as P(atypical) on every page: 0.1 on a "normal" page
    # is very normal. Its earlier versions read it as the confidence in the stated class (P(atypical) = 0.9).
    gt = [{"image": "s.tiff", "labels": ["atypical", "normal"], "tumordomains": [0, 0]}]
    as_p_atypical = {"s.tiff": [entry("atypical", 0.8), entry("normal", 0.1)]}
    as_class_confidence = {"s.tiff": [entry("atypical", 0.8), entry("normal", 0.9)]}
    assert score(as_p_atypical, gt)["overall_roc_auc"] == 1.0
    assert score(as_class_confidence, gt)["overall_roc_auc"] == 0.0
    assert score(as_p_atypical, gt, confidence="p_atypical") == score(as_p_atypical, gt)
    assert score(as_p_atypical, gt, confidence=PRE_2025_07_27)["overall_roc_auc"] == 0.0
    assert score(as_class_confidence, gt, confidence=PRE_2025_07_27)["overall_roc_auc"] == 1.0
    assert score(as_class_confidence, gt)["overall_balanced_accuracy"] == 1.0  # the classes themselves are right


def test_the_old_reading_has_no_ambiguous_name() -> None:
    gt = [{"image": "s.tiff", "labels": ["atypical", "normal"], "tumordomains": [0, 0]}]
    with pytest.raises(ValueError, match="pre-2025-07-27"):
        score({"s.tiff": [entry("atypical", 0.8), entry("normal", 0.1)]}, gt, confidence="stated_class")


def test_domain_with_one_class_has_undefined_roc_auc() -> None:
    gt = [{"image": "s.tiff", "labels": ["normal", "atypical", "normal"], "tumordomains": [6, 1, 1]}]
    agg = score({"s.tiff": [entry("normal", 0.8), entry("atypical", 0.7), entry("normal", 0.6)]}, gt)
    assert math.isnan(agg["domain_6"]["roc_auc"])
    assert agg["domain_6"]["sensitivity"] == 0.0 and agg["domain_6"]["specificity"] == 1.0


@pytest.mark.parametrize("output, field", [
    ([entry("atypical", 1), entry("normal", 0.5)], "'confidence' must be a float"),
    ([entry("atypical", "0.7"), entry("normal", 0.5)], "'confidence' must be a float"),
    ([entry("atypical", float("nan")), entry("normal", 0.5)], "'confidence' must be a float"),
    ([{"class": "atypical"}, entry("normal", 0.5)], "'confidence' is missing"),
    ([{"confidence": 0.5}, entry("normal", 0.5)], "'class' is missing"),
    ([entry("Atypical", 0.7), entry("normal", 0.5)], "'class'"),
    ([entry("atypical", 0.7)], "results length does not match GT length"),
    ([entry("atypical", 0.7), entry("normal", 0.5), entry("normal", 0.5)], "result length=3, GT length=2"),
    ({"class": "atypical", "confidence": 0.7}, "must be a list"),
    ([entry("atypical", 0.7), "normal"], "entry 1 is not a dictionary"),
])
def test_malformed_outputs_name_the_job_and_the_field(output: object, field: str) -> None:
    gt = [{"image": "stack_9.tiff", "labels": ["atypical", "normal"], "tumordomains": [0, 0]}]
    with pytest.raises(PredictionError, match=field) as info:
        score({"stack_9.tiff": output}, gt)
    assert "job stack_9.tiff" in str(info.value)


def test_unknown_image_and_bad_ground_truth() -> None:
    with pytest.raises(PredictionError, match="no GT for this image: other.tiff"):
        score({"other.tiff": [entry("normal", 0.5)]}, GT)
    with pytest.raises(GroundTruthError, match="one tumour domain per label"):
        score({"s.tiff": [entry("normal", 0.5)]}, [{"image": "s.tiff", "labels": ["normal"], "tumordomains": []}])
    with pytest.raises(GroundTruthError, match="must be a list"):
        score({"s.tiff": [entry("normal", 0.5)]}, {"s.tiff": ["normal"]})


def test_evaluation_exposes_pages_in_job_order() -> None:
    ev = evaluate({"s2.tiff": [entry("normal", 0.55), entry("atypical", 0.51)]}, GT)
    assert ev.y_true.tolist() == [0, 1] and ev.y_pred.tolist() == [0, 1]
    assert ev.y_score.tolist() == [0.55, 0.51]
    old = evaluate({"s2.tiff": [entry("normal", 0.55), entry("atypical", 0.51)]}, GT, PRE_2025_07_27)
    assert old.y_score.tolist() == pytest.approx([0.45, 0.51])


def test_best_threshold_hand_computed() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.6, 0.5, 0.9])
    # candidates 0, .15, .25, .4, .55, .75, 1 -> balanced accuracy .5, .625, .75, .875, .625, .75, .5
    thresholds, values = balanced_accuracy_curve(labels, scores)
    assert thresholds == pytest.approx([0, 0.15, 0.25, 0.4, 0.55, 0.75, 1])
    assert values == pytest.approx([0.5, 0.625, 0.75, 0.875, 0.625, 0.75, 0.5])
    threshold, value = best_balanced_threshold(labels, scores)
    assert threshold == pytest.approx(0.4) and value == 0.875  # both atypical called, one false alarm (0.6)


def test_ties_go_to_the_lowest_threshold() -> None:
    labels, scores = np.array([0, 1, 0, 1]), np.array([0.1, 0.2, 0.3, 0.4])
    thresholds, values = balanced_accuracy_curve(labels, scores)
    assert values.tolist() == [0.5, 0.75, 0.5, 0.75, 0.5]  # at .15 and at .35
    assert best_balanced_threshold(labels, scores) == (pytest.approx(0.15), 0.75)
    # 1/3 + 2/3 and 2/3 + 1/3 may round apart as floats; compared in counts, they tie
    labels, scores = np.array([1, 1, 1, 0, 0, 0]), np.array([0.9, 0.2, 0.6, 0.5, 0.1, 0.8])
    assert best_balanced_threshold(labels, scores) == (pytest.approx(0.15), pytest.approx(2 / 3))


def test_a_threshold_never_sits_on_a_score() -> None:
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(200), 2)  # many ties
    labels = (rng.random(200) < scores).astype(int)
    threshold, value = best_balanced_threshold(labels, scores)
    assert threshold not in set(scores.tolist())
    called = scores >= threshold
    assert value == pytest.approx((called[labels == 1].mean() + (~called[labels == 0]).mean()) / 2)
    saturated = np.array([0.0, 0.2, 1.0, 1.0])  # float32 sigmoids reach 0 and 1
    assert threshold_candidates(saturated).tolist() == [0.0, 0.1, 0.6, np.nextafter(1.0, 2.0)]
    assert best_balanced_threshold(np.array([0, 0, 1, 1]), saturated) == (0.6, 1.0)


def test_one_distinct_score_calls_everything_positive() -> None:
    assert best_balanced_threshold(np.array([0, 1, 1]), np.full(3, 0.7)) == (0.0, 0.5)


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1], []])
def test_one_class_has_no_balanced_threshold(labels: list[int]) -> None:
    with pytest.raises(ValueError, match="needs both classes"):
        best_balanced_threshold(np.array(labels), np.linspace(0, 1, len(labels)))


def test_labels_and_scores_must_pair_up() -> None:
    with pytest.raises(ValueError, match="3 labels but 2 scores"):
        best_balanced_threshold(np.array([0, 1, 1]), np.array([0.1, 0.2]))
