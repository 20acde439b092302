"""Track 2 output semantics: what `atypical.confidence` writes, and how the official reading scores it."""

from __future__ import annotations

import logging

import pytest
from sklearn.metrics import roc_auc_score

from midog.evaluate.track2 import PRE_2025_07_27, score
from midog.outputs import track2_classification

P_ATYPICAL = [0.9, 0.2, 0.55, 0.4, 0.05]
LABELS = ["atypical", "normal", "normal", "atypical", "normal"]
GT = [{"image": "s.tiff", "labels": LABELS, "tumordomains": [0] * len(LABELS)}]


def test_p_atypical_writes_the_probability_on_every_page() -> None:
    pages = track2_classification(P_ATYPICAL, threshold=0.5)
    assert [p["class"] for p in pages] == ["atypical", "normal", "atypical", "normal", "normal"]
    assert [p["confidence"] for p in pages] == P_ATYPICAL
    assert all(type(p["confidence"]) is float for p in pages)


def test_stated_class_writes_the_confidence_in_the_class_with_a_deprecation_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="midog.outputs"):
        pages = track2_classification(P_ATYPICAL, threshold=0.5, confidence="stated_class")
    assert [p["confidence"] for p in pages] == pytest.approx([0.9, 0.8, 0.55, 0.6, 0.95])
    assert [p["class"] for p in pages] == [p["class"] for p in track2_classification(P_ATYPICAL, 0.5)]
    assert len(caplog.records) == 1 and "\n" not in caplog.records[0].getMessage()
    assert "stated_class is deprecated" in caplog.records[0].getMessage()


def test_the_default_output_makes_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="midog.outputs"):
        track2_classification(P_ATYPICAL, threshold=0.5)
    assert caplog.records == []


def test_each_semantics_scored_with_its_reading_gives_the_true_roc_auc() -> None:
    true_auc = roc_auc_score([label == "atypical" for label in LABELS], P_ATYPICAL)
    plain = score({"s.tiff": track2_classification(P_ATYPICAL, 0.5)}, GT)  # the final official reading
    stated = score({"s.tiff": track2_classification(P_ATYPICAL, 0.5, "stated_class")}, GT, PRE_2025_07_27)
    misread = score({"s.tiff": track2_classification(P_ATYPICAL, 0.5, "stated_class")}, GT)  # stated_class today
    assert plain["overall_roc_auc"] == pytest.approx(true_auc)
    assert stated["overall_roc_auc"] == pytest.approx(true_auc)
    assert misread["overall_roc_auc"] != pytest.approx(true_auc)
    assert stated["overall_balanced_accuracy"] == plain["overall_balanced_accuracy"] == misread[
        "overall_balanced_accuracy"]


def test_unknown_semantics_is_refused() -> None:
    with pytest.raises(ValueError, match="confidence must be one of"):
        track2_classification(P_ATYPICAL, 0.5, confidence="probability")
