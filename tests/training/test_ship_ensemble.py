"""Shipping a CV run's fold models as an ensemble that process.py's atypical stage serves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from midog.atypical import load_atypical
from midog.classifier import build_classifier, load_classifier
from midog.config import load_config
from midog.weights import sha256_of
from training.ship_ensemble import ship_ensemble


def test_ship_ensemble_cards_and_config_serve_the_mean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    run = tmp_path / "run"
    for k, threshold in enumerate((0.3, 0.5)):
        torch.manual_seed(k)
        clf = build_classifier("test_vit", 32, positive="atypical", threshold=threshold,
                               model_kwargs={"img_size": 32, "depth": 1})
        clf.save(run / f"fold{k}" / "best.pt", meta={"fold": k, "val": {"balanced_accuracy": 0.7 + k / 10}})
    (run / "cv_summary.json").write_text(json.dumps({"cv": {"balanced_accuracy": {"mean": 0.75, "std": 0.07}}}))

    config_path = ship_ensemble(run, tmp_path / "weights", "atyp", half=True)
    card = json.loads((tmp_path / "weights" / "atyp_ensemble.json").read_text())
    assert [m["file"] for m in card["members"]] == ["atyp_fold0.pt", "atyp_fold1.pt"]
    assert card["members"][1]["sha256"] == sha256_of(tmp_path / "weights" / "atyp_fold1.pt")
    assert card["threshold"] == pytest.approx(0.4) and card["cross_validation"]["balanced_accuracy"]["mean"] == 0.75
    member = json.loads((tmp_path / "weights" / "atyp_fold0.json").read_text())
    assert member["fold"] == 0 and member["validation"]["balanced_accuracy"] == pytest.approx(0.7)

    monkeypatch.setenv("MIDOG_WEIGHTS_DIR", str(tmp_path / "weights"))
    config = load_config(config_path, environ={})
    stage = load_atypical(config.atypical)
    x = np.random.default_rng(0).integers(0, 256, (4, 40, 40, 3), dtype=np.uint8)
    members = [load_classifier(tmp_path / "weights" / f"atyp_fold{k}.pt").predict_proba(x, tta=True)
               for k in range(2)]
    np.testing.assert_allclose(stage.predict_proba(x), np.mean(members, axis=0), atol=1e-6)
    assert stage.threshold == pytest.approx(0.4)


def test_ship_ensemble_follows_the_runs_ship_epoch(tmp_path: Path):
    run = tmp_path / "run"
    for k in range(2):
        for name, threshold in (("best.pt", 0.2), ("final.pt", 0.6)):
            build_classifier("test_resnet", 32, positive="atypical", threshold=threshold).save(
                run / f"fold{k}" / name, meta={"fold": k})
    (run / "cv_summary.json").write_text(json.dumps({"ship_epoch": "last"}))
    ship_ensemble(run, tmp_path / "last", "atyp")
    assert json.loads((tmp_path / "last" / "atyp_ensemble.json").read_text())["threshold"] == pytest.approx(0.6)
    ship_ensemble(run, tmp_path / "best", "atyp", checkpoint="best")
    assert json.loads((tmp_path / "best" / "atyp_ensemble.json").read_text())["threshold"] == pytest.approx(0.2)
