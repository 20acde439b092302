"""The official evaluation containers' own test vectors from ../shared (skipped when absent)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from sklearn.metrics import roc_auc_score

from conftest import shared_path
from midog.evaluate.__main__ import main
from midog.evaluate.io import load_jobs
from midog.evaluate.track1 import evaluate_jobs as evaluate_track1
from midog.evaluate.track2 import PRE_2025_07_27
from midog.evaluate.track2 import evaluate_jobs as evaluate_track2


def _track1_folder() -> Path:
    return shared_path("grand-challenge", "track1-evaluation")


@pytest.mark.parametrize("ap_backend", ["numpy", "torchmetrics"])
def test_track1_reproduces_every_aggregate_of_the_official_metrics_json(ap_backend: str) -> None:
    root = _track1_folder()
    gt = json.loads((root / "ground_truth" / "ground_truth.json").read_text())
    expected = json.loads((root / "test" / "output" / "metrics.json").read_text())
    # the published file predates the container's coordinate check (job 007.tiff has a point at 130 mm)
    ev = evaluate_track1(load_jobs(root / "test" / "input", 1, set(gt)), gt, ap_backend=ap_backend,
                         check_coordinates=False)
    assert expected["aggregates"], "the official file has aggregates"
    for key, value in expected["aggregates"].items():
        assert ev.aggregates[key] == pytest.approx(value, abs=1e-6, rel=0), key
    mine = {r["image"]: r for r in ev.metrics()["results"]}
    for result in expected["results"]:
        assert mine[result["image"]] == result


def test_track1_cli_writes_the_official_metrics(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _track1_folder()
    out = tmp_path / "metrics.json"
    args = ["track1", "--ground-truth", str(root / "ground_truth" / "ground_truth.json"),
            "--predictions", str(root / "test" / "input"), "--output", str(out)]
    assert main(args) == 2 and not out.exists()  # the final container's check: 007.tiff has a point at 130 mm
    assert "are these pixel coordinates" in capsys.readouterr().err
    assert main(args + ["--no-coordinate-check"]) == 0
    written = json.loads(out.read_text())["aggregates"]
    expected = json.loads((root / "test" / "output" / "metrics.json").read_text())["aggregates"]
    assert all(abs(written[k] - v) <= 1e-6 for k, v in expected.items())
    assert 0 < written["froc_auc"] <= 8
    assert "f1_score" in capsys.readouterr().out


def test_track2_official_vectors_by_hand_count() -> None:
    root = shared_path("grand-challenge", "track2-evaluation")
    gt = json.loads((root / "ground_truth" / "ground_truth.json").read_text())
    jobs = load_jobs(root / "test" / "input", 2, {g["image"] for g in gt})
    ev = evaluate_track2(jobs, gt)
    # Independent count from the raw files.
    labels = {g["image"]: g["labels"] for g in gt}
    domains = {g["image"]: g["tumordomains"] for g in gt}
    y, p, s, s_old, d = [], [], [], [], []
    for job in json.loads((root / "test" / "input" / "predictions.json").read_text()):
        image = job["inputs"][0]["image"]["name"]
        out = json.loads((root / "test" / "input" / job["pk"] / "output" /
                          "multiple-mitotic-figure-classification.json").read_text())
        for truth, domain, e in zip(labels[image], domains[image], out):
            y.append(truth == "atypical")
            p.append(e["class"] == "atypical")
            s.append(e["confidence"])  # the final container (2025-07-27 on): P(atypical) on every page
            s_old.append(e["confidence"] if e["class"] == "atypical" else 1 - e["confidence"])
            d.append(domain)
    tp = sum(a and b for a, b in zip(y, p))
    tn = sum(not a and not b for a, b in zip(y, p))
    assert (tp, tn, len(y)) == (5, 17, 33)  # 6 atypical, 27 normal pages in the three scored stacks
    agg = ev.aggregates
    assert agg["overall_sensitivity"] == 5 / 6 and agg["overall_specificity"] == 17 / 27
    assert agg["overall_balanced_accuracy"] == (5 / 6 + 17 / 27) / 2 and agg["overall_accuracy"] == 22 / 33
    assert agg["overall_roc_auc"] == roc_auc_score(y, s) == pytest.approx(0.660494, abs=1e-6)
    old = evaluate_track2(jobs, gt, PRE_2025_07_27).aggregates
    assert old["overall_roc_auc"] == pytest.approx(roc_auc_score(y, s_old)) == pytest.approx(0.728395, abs=1e-6)
    assert old["overall_balanced_accuracy"] == agg["overall_balanced_accuracy"]
    assert set(agg) - {k for k in agg if not k.startswith("domain_")} == {"domain_1", "domain_6"}
    assert math.isnan(agg["domain_6"]["roc_auc"]) and agg["domain_6"]["accuracy"] == 1.0
