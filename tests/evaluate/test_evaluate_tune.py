"""Threshold tuning: the best-F1 detection threshold and the best-balanced-accuracy Track 2 threshold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluate_factory import container_folder, payload, point, truth
from midog.config import load_config
from midog.evaluate import track1, track2
from midog.evaluate.__main__ import main
from midog.evaluate.tune import tune_classification, tune_detection, write_thresholds

GT1 = {"a.tiff": truth([(0, 0), (100, 0)])}
# Candidates: TP 0.9, FP 0.7, TP 0.6, FP 0.3 (names do not matter for tuning).
# F1 at p >= 0.9: 2/3; >= 0.7: 1/2; >= 0.6: 4/5; >= 0.3: 2/3.
PRED1 = {"a.tiff": payload([point(0, 0, 0.9), point(400, 0, 0.7, name="non-mitotic figure"),
                            point(100, 0, 0.6, name="non-mitotic figure"), point(800, 0, 0.3)])}
GT2 = [{"image": "s.tiff", "labels": ["atypical", "atypical", "normal", "normal", "normal"],
        "tumordomains": [0] * 5}]
# P(atypical): A 0.8, A 0.4, N 0.35, N 0.1, N 0.6 -> best balanced accuracy 5/6 for t in (0.35, 0.4]: the rule
# picks the midpoint, 0.375 (`best_balanced_threshold`). PRED2 writes it as
# process.py does and the final container reads it (P(atypical) on every page, classes at 0.5); PRED2_STATED as
# the container read it before 2025-07-27 (1 - P(atypical) on "normal" pages).
PRED2 = {"s.tiff": [{"class": "atypical" if p >= 0.5 else "normal", "confidence": p}
                    for p in (0.8, 0.4, 0.35, 0.1, 0.6)]}
PRED2_STATED = {"s.tiff": [{"class": "atypical", "confidence": 0.8}, {"class": "normal", "confidence": 0.6},
                           {"class": "normal", "confidence": 0.65}, {"class": "normal", "confidence": 0.9},
                           {"class": "atypical", "confidence": 0.6}]}


def test_detection_threshold_maximises_f1_over_all_candidates() -> None:
    tuned = tune_detection(track1.evaluate(PRED1, GT1))
    assert tuned.key == "verifier.threshold"
    assert tuned.threshold == 0.6 and tuned.value == pytest.approx(4 / 5, abs=1e-6)


def test_no_candidate_anywhere_is_a_clear_error() -> None:
    from midog.evaluate import PredictionError

    with pytest.raises(PredictionError, match="no predicted point in any image"):
        tune_detection(track1.evaluate({"a.tiff": payload([])}, GT1))


def test_track2_threshold_maximises_balanced_accuracy() -> None:
    tuned = tune_classification(track2.evaluate(PRED2, GT2))
    assert tuned.key == "atypical.threshold"
    assert tuned.threshold == pytest.approx(0.375) and tuned.value == pytest.approx((1 + 2 / 3) / 2)
    old = tune_classification(track2.evaluate(PRED2_STATED, GT2, track2.PRE_2025_07_27))
    assert old.threshold == pytest.approx(0.375) and old.value == tuned.value


def test_track2_ground_truth_of_one_class_is_a_clear_error() -> None:
    from midog.evaluate import GroundTruthError

    gt = [{"image": "s.tiff", "labels": ["normal"] * 3, "tumordomains": [0] * 3}]
    outputs = {"s.tiff": [{"class": "normal", "confidence": p} for p in (0.1, 0.2, 0.3)]}
    with pytest.raises(GroundTruthError, match="every page of the ground truth is normal"):
        tune_classification(track2.evaluate(outputs, gt))


def test_thresholds_are_written_into_the_config(tmp_path: Path) -> None:
    config = tmp_path / "pipeline.yaml"
    config.write_text("proposals:\n  confidence: 0.25\n")
    write_thresholds(config, [tune_detection(track1.evaluate(PRED1, GT1)),
                              tune_classification(track2.evaluate(PRED2, GT2))])
    loaded = load_config(config)
    assert loaded.verifier.threshold == 0.6
    assert loaded.atypical.threshold == pytest.approx(0.375)
    assert loaded.proposals.confidence == 0.25


def test_cli_tune(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "gt1.json").write_text(json.dumps(GT1))
    (tmp_path / "gt2.json").write_text(json.dumps(GT2))
    p1 = container_folder(tmp_path / "p1", PRED1)
    p2 = container_folder(tmp_path / "p2", PRED2, track=2)
    config = tmp_path / "tuned.yaml"
    assert main(["tune", "--track1-ground-truth", str(tmp_path / "gt1.json"), "--track1-predictions", str(p1),
                 "--track2-ground-truth", str(tmp_path / "gt2.json"), "--track2-predictions", str(p2),
                 "--config", str(config)]) == 0
    assert "verifier.threshold = 0.600000" in capsys.readouterr().out
    assert load_config(config).verifier.threshold == 0.6
    assert main(["tune", "--config", str(config)]) == 2


def test_tuned_f1_is_the_official_f1_once_the_points_are_renamed_at_the_threshold() -> None:
    import numpy as np

    rng = np.random.default_rng(3)
    gt, pred = {}, {}
    for i in range(6):
        truth_um = rng.uniform(0, 400, (int(rng.integers(0, 8)), 2))
        cand = np.r_[truth_um + rng.normal(0, 4, truth_um.shape), rng.uniform(0, 400, (10, 2))]
        gt[f"{i}.tiff"] = truth([tuple(t) for t in truth_um.tolist()])
        probs = rng.uniform(size=len(cand))
        pred[f"{i}.tiff"] = payload([point(x, y, float(p)) for (x, y), p in zip(cand.tolist(), probs)])
    tuned = tune_detection(track1.evaluate(pred, gt))
    renamed = {k: payload([{**p, "name": "mitotic figure" if p["probability"] >= tuned.threshold
                            else "non-mitotic figure"} for p in v["points"]]) for k, v in pred.items()}
    assert track1.score(renamed, gt, with_froc=False)["f1_score"] == pytest.approx(tuned.value, abs=1e-12)


def test_p_atypical_outputs_read_the_pre_2025_07_27_way_are_flagged(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert track2.evaluate(PRED2, GT2).looks_like_p_atypical()
    assert not track2.evaluate(PRED2_STATED, GT2).looks_like_p_atypical()        # stated-class confidences
    (tmp_path / "gt2.json").write_text(json.dumps(GT2))
    folder = container_folder(tmp_path / "p2", PRED2, track=2)
    args = ["tune", "--track2-ground-truth", str(tmp_path / "gt2.json"), "--track2-predictions", str(folder),
            "--config", str(tmp_path / "c.yaml"), "--dry-run"]
    assert main(args + ["--confidence", "pre-2025-07-27"]) == 0
    assert "drop that option" in capsys.readouterr().err
    assert main(args) == 0  # the default reading is the final container's: P(atypical), no warning
    captured = capsys.readouterr()
    assert captured.err == "" and "atypical.threshold = 0.375000" in captured.out
    assert main(args + ["--confidence", "p_atypical"]) == 0
    assert capsys.readouterr().out == captured.out
