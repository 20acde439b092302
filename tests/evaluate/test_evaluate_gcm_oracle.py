"""The matching against grand-challenge-metrics 0.6.0 (what evalutils 0.6.0 installs, the official containers'
`score_detection`), as an oracle on randomised cases: many points, duplicates, ties, points exactly on the radius."""

from __future__ import annotations

import numpy as np
import pytest
from grand_challenge_metrics.scorers import score_detection as official_score_detection

from evaluate_factory import payload, truth
from midog.evaluate.track1 import (MATCH_RADIUS_MM, ImagePrediction, ThresholdSweep, _flatten_z, evaluate,
                                   score_detection)

GRID_UM = 1.5
"""Points on multiples of 1.5 (exact in binary) lie exactly 7.5 apart along an axis (5 steps) or on a 3-4-5
triangle (4.5, 6): exactly on a radius of 7.5, and equidistant from many others."""
RADIUS_UM = 7.5


def official_counts(t: np.ndarray, p: np.ndarray, radius: float) -> tuple[int, int, int]:
    return tuple(official_score_detection(ground_truth=t.tolist(), predictions=p.tolist(), radius=radius))


def grid_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Truth and predictions on a small 1.5-unit grid (in µm, scored with a 7.5 radius): dense ties."""
    side = int(rng.integers(2, 25))
    n, m = int(rng.integers(0, 40)), int(rng.integers(0, 60))
    t = np.c_[rng.integers(0, side, (n, 2)) * GRID_UM, np.zeros(n)]
    p = np.c_[rng.integers(0, side, (m, 2)) * GRID_UM, np.zeros(m)]
    return t, p


def float_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Truth and predictions in mm with real-valued coordinates, some predictions duplicated or put exactly on a
    truth point (scored with the official 7.5e-3 mm radius)."""
    n, m = int(rng.integers(0, 30)), int(rng.integers(0, 50))
    t = np.c_[rng.uniform(0, 0.2, (n, 2)), np.zeros(n)]
    p = np.c_[rng.uniform(0, 0.2, (m, 2)), np.zeros(m)]
    if m and n:
        p[: m // 4] = t[rng.integers(0, n, m // 4)]
    if m > 1:
        p[m - m // 4:] = p[rng.integers(0, m, m // 4)]
    return t, p


def test_the_grid_cases_reach_exactly_the_radius() -> None:
    t, p = np.array([[0.0, 0.0, 0.0]]), np.array([[7.5, 0.0, 0.0], [4.5, 6.0, 0.0], [7.5 + 1e-9, 0.0, 0.0]])
    assert official_counts(t, p[:1], RADIUS_UM) == official_counts(t, p[1:2], RADIUS_UM) == (1, 0, 0)
    assert official_counts(t, p[2:], RADIUS_UM) == (0, 1, 1)
    for i in range(3):
        assert score_detection(t, p[i:i + 1], RADIUS_UM).as_dict() == dict(zip(
            ("true_positives", "false_negatives", "false_positives"), official_counts(t, p[i:i + 1], RADIUS_UM)))


@pytest.mark.parametrize("kind", ["grid", "float"])
def test_score_detection_equals_grand_challenge_metrics(kind: str) -> None:
    rng = np.random.default_rng(2025)
    make, radius = (grid_case, RADIUS_UM) if kind == "grid" else (float_case, MATCH_RADIUS_MM)
    on_radius = 0
    for _ in range(600):
        t, p = make(rng)
        ours = score_detection(t, p, radius)
        assert (ours.true_positives, ours.false_negatives, ours.false_positives) == official_counts(t, p, radius)
        assert ours.matched_predictions.sum() == ours.matched_truth.sum() == ours.true_positives
        if len(t) and len(p):
            on_radius += int(np.any(np.linalg.norm(t[:, None] - p[None], axis=2) == radius))
    if kind == "grid":
        assert on_radius > 100  # the cases do test the boundary


@pytest.mark.parametrize("kind", ["grid", "float"])
def test_threshold_sweep_equals_grand_challenge_metrics_on_the_kept_points(kind: str) -> None:
    # What FROC and `tune` use: at every threshold, the counts score_detection gives on the points kept, in file
    # order (as the container's calc_froc_score calls it), ties and all.
    rng = np.random.default_rng(7)
    make, radius = (grid_case, RADIUS_UM) if kind == "grid" else (float_case, MATCH_RADIUS_MM)
    for _ in range(300):
        t, p = make(rng)
        probability = rng.integers(0, 6, len(p)) / 5.0  # shared probabilities too
        sweep = ThresholdSweep(t, ImagePrediction("job", p, np.ones(len(p), dtype=bool), probability), radius)
        levels = np.unique(probability)
        thresholds = np.r_[levels, (levels[1:] + levels[:-1]) / 2, -1.0, 2.0] if len(levels) else np.r_[0.5]
        for threshold in thresholds:
            kept = _flatten_z(p[probability >= threshold])
            assert sweep.counts(threshold) == official_counts(t, kept, radius), threshold


def test_per_image_counts_of_an_evaluation_equal_grand_challenge_metrics() -> None:
    # Through the whole reading: only points named "mitotic figure" are scored, their z set to 0.
    rng = np.random.default_rng(11)
    gt, predictions, expected = {}, {}, {}
    for i in range(40):
        t_um, p_um = grid_case(rng)
        names = rng.choice(["mitotic figure", "non-mitotic figure"], len(p_um), p=[0.7, 0.3])
        z = rng.uniform(-1, 1, len(p_um))
        gt[f"{i}.tiff"] = truth([tuple(x) for x in t_um[:, :2].tolist()])
        predictions[f"{i}.tiff"] = payload([
            {"name": str(name), "point": [x * 1e-3, y * 1e-3, float(zz)], "probability": 0.9}
            for (x, y, _), name, zz in zip(p_um.tolist(), names, z)])
        mitotic = [[x * 1e-3, y * 1e-3, 0.0] for (x, y, _), name in zip(p_um.tolist(), names)
                   if name == "mitotic figure"]
        expected[f"{i}.tiff"] = official_score_detection(ground_truth=gt[f"{i}.tiff"]["annotations"],
                                                         predictions=mitotic, radius=MATCH_RADIUS_MM)._asdict()
    results = evaluate(predictions, gt, with_froc=False).metrics()["results"]
    assert {r["image"]: r["metrics"] for r in results} == expected
