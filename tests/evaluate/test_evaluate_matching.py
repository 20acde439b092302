"""Hand-computed cases for the official 7.5 µm one-to-one matching (evalutils' score_detection)."""

from __future__ import annotations

import numpy as np
import pytest

from evaluate_factory import UM, payload, point
from midog.evaluate.track1 import ThresholdSweep, parse_points, score_detection


def pts(*xy_um: tuple[float, float], z: float = 0.0) -> np.ndarray:
    return np.array([[x * UM, y * UM, z] for x, y in xy_um]).reshape(-1, 3)


def counts(truth: np.ndarray, predictions: np.ndarray) -> tuple[int, int, int]:
    s = score_detection(truth, predictions)
    return s.true_positives, s.false_negatives, s.false_positives


def test_empty_predictions_are_all_false_negatives() -> None:
    assert counts(pts((0, 0), (100, 0)), pts()) == (0, 2, 0)


def test_empty_truth_makes_every_prediction_a_false_positive() -> None:
    assert counts(pts(), pts((0, 0), (5, 5), (50, 50))) == (0, 0, 3)


def test_both_empty() -> None:
    assert counts(pts(), pts()) == (0, 0, 0)


def test_radius_is_7_5_micrometres() -> None:
    assert counts(pts((0, 0)), pts((7.4, 0))) == (1, 0, 0)
    assert counts(pts((0, 0)), pts((7.6, 0))) == (0, 1, 1)
    assert counts(pts((0, 0)), pts((5.0, 5.0))) == (1, 0, 0)  # 7.07 µm on the diagonal
    assert counts(pts((0, 0)), pts((5.5, 5.5))) == (0, 1, 1)  # 7.78 µm


def test_one_prediction_between_two_truths_counts_once() -> None:
    # 5 µm from both truths: the first truth takes it, the second is missed.
    s = score_detection(pts((0, 0), (10, 0)), pts((5, 0)))
    assert (s.true_positives, s.false_negatives, s.false_positives) == (1, 1, 0)
    assert s.matched_truth.tolist() == [True, False]


def test_matching_is_greedy_per_truth_not_optimal() -> None:
    # Truth A at 0, B at 12 µm; P at 6 µm (6 from both), Q at -7 µm (7 from A only).
    # A (first) takes its nearest, P; B then has nothing left. An optimal assignment would find two pairs.
    s = score_detection(pts((0, 0), (12, 0)), pts((6, 0), (-7, 0)))
    assert (s.true_positives, s.false_negatives, s.false_positives) == (1, 1, 1)
    assert s.matched_predictions.tolist() == [True, False]
    # With the truths listed the other way round, B takes P and A takes Q.
    assert counts(pts((12, 0), (0, 0)), pts((6, 0), (-7, 0))) == (2, 0, 0)


def test_two_predictions_on_one_truth_give_one_false_positive() -> None:
    assert counts(pts((0, 0)), pts((3, 0), (-3, 0))) == (1, 0, 1)
    s = score_detection(pts((0, 0)), pts((4, 0), (1, 0)))
    assert s.matched_predictions.tolist() == [False, True]  # the nearer one is the true positive


def test_two_truths_equidistant_from_one_prediction() -> None:
    assert counts(pts((-4, 0), (4, 0)), pts((0, 0))) == (1, 1, 0)


def test_prediction_z_is_ignored() -> None:
    prediction = parse_points(payload([point(1, 0, z=0.5)]), "job")
    flat = prediction.points.copy()
    flat[:, 2] = 0
    assert counts(pts((0, 0)), flat) == (1, 0, 0)


def test_threshold_sweep_agrees_with_score_detection_on_every_subset() -> None:
    rng = np.random.default_rng(0)
    truth = rng.uniform(0, 0.2, size=(30, 2))
    truth = np.c_[truth, np.zeros(30)]
    cand = np.r_[truth[:, :2] + rng.normal(0, 0.004, size=(30, 2)), rng.uniform(0, 0.2, size=(40, 2))]
    probs = rng.uniform(0, 1, len(cand))
    prediction = parse_points(payload([{"name": "mitotic figure", "point": [x, y, 0.0], "probability": p}
                                       for (x, y), p in zip(cand.tolist(), probs.tolist())]), "job")
    sweep = ThresholdSweep(truth, prediction)
    for t in (0.0, 0.2, 0.5, 0.77, 0.95, 1.0):
        keep = probs >= t
        expected = counts(truth, np.c_[cand[keep], np.zeros(keep.sum())])
        assert sweep.counts(t) == expected, t


@pytest.mark.parametrize("n_truth", [0, 3])
def test_threshold_sweep_with_no_candidates(n_truth: int) -> None:
    prediction = parse_points(payload([]), "job")
    assert ThresholdSweep(pts(*[(i * 100, 0) for i in range(n_truth)]), prediction).counts(0.5) == (0, n_truth, 0)
