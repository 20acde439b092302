"""training.ship_amibr_weights: weights copied with cards that load, checksum and carry the measured numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from roi_factory import tiny_detector, tiny_verifier

from midog.classifier import load_classifier
from midog.errors import InputError
from midog.proposals import load_detector
from midog.weights import sha256_of
from training import ship_amibr_weights as ship

RESULTS = ("epoch,time,train/box_loss,metrics/precision(B),metrics/recall(B),metrics/mAP50(B),metrics/mAP50-95(B)\n"
           "1,10,3.0,0.5,0.6,0.55,0.20\n2,20,2.0,0.7,0.8,0.80,0.25\n3,30,1.9,0.9,0.7,0.82,0.21\n")


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    run = tmp_path / "run"
    tiny_detector(run / "weights" / "best.pt")
    (run / "args.yaml").write_text(yaml.safe_dump({"model": "last.pt", "imgsz": 512, "epochs": 3, "lr0": 0.001}))
    (run / "results.csv").write_text(RESULTS)
    verifier = tiny_verifier(tmp_path / "v" / "verifier.pt")
    (tmp_path / "v" / "verifier.json").write_text(json.dumps({"architecture": "test_resnet", "sha256": "old"}))
    counts = {s: {"slides": 1, "amibr_crops": 2, "canvases": 3, "figures": 4} for s in ("train", "val", "test")}
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "manifest.json").write_text(json.dumps({"seed": 0, "counts": counts}))
    report = {"tuned": {"threshold": 0.61},
              "val_at_tuned": {k: 1 for k in ("images", "f1", "precision", "recall", "AP", "froc_auc",
                                              "true_positives", "false_positives", "false_negatives")},
              "figures": {"val": 4, "test": 4}}
    report["test_at_tuned"] = dict(report["val_at_tuned"], f1=0.5)
    (tmp_path / "report.json").write_text(json.dumps(report))
    return {"run": run, "verifier": verifier, "set": tmp_path / "set", "report": tmp_path / "report.json",
            "out": tmp_path / "weights"}


def test_cards_load_and_carry_the_numbers(inputs):
    args = ["--set", str(inputs["set"]), "--detector-run", str(inputs["run"]), "--verifier", str(inputs["verifier"]),
            "--out", str(inputs["out"]), "--chain-report", str(inputs["report"])]
    assert ship.main(args) == 0
    detector, verifier = inputs["out"] / "detector.pt", inputs["out"] / "verifier.pt"
    det_card = json.loads(detector.with_suffix(".json").read_text())
    ver_card = json.loads(verifier.with_suffix(".json").read_text())
    assert det_card["sha256"] == sha256_of(detector) and ver_card["sha256"] == sha256_of(verifier)
    assert det_card["architecture"] == "yolo11n" and det_card["parameters"] > 0
    # best epoch by ultralytics' fitness (0.1 mAP50 + 0.9 mAP50-95): epoch 2, not the highest mAP50
    assert det_card["validation_metrics"]["epoch"] == 2 and det_card["validation_metrics"]["mAP50"] == 0.8
    for card in (det_card, ver_card):
        assert card["chain_evaluation"]["tuned_verifier_threshold"] == 0.61
        assert card["chain_evaluation"]["test"]["f1"] == 0.5
        assert card["limits"] and "by slide" in card["data"]["split"]
    load_detector(detector, torch.device("cpu"))  # checksum verified, loads
    assert load_classifier(verifier).arch == "test_resnet"
    assert ship.main(args) == 0  # shipping again (e.g. with a new report) keeps the checkpoints' sha256
    assert json.loads(detector.with_suffix(".json").read_text())["sha256"] == det_card["sha256"]



@pytest.mark.parametrize("broken, text, message", [
    ("manifest", None, "--set manifest not found: {manifest}"),
    ("manifest", "{not json", "--set manifest {manifest} is not valid JSON"),
    ("manifest", "[]", "--set manifest {manifest} must hold a JSON object, not list"),
    ("manifest", '{"seed": 0}', "{manifest} lacks counts: not the JSON training.amibr_detection writes"),
    ("report", "{not json", "--chain-report {report} is not valid JSON"),
    ("report", '{"tuned": {}}', "{report} lacks val_at_tuned, test_at_tuned, figures"),
    ("results", None, "detector run results not found: {results}"),
])
def test_a_bad_input_is_one_line_and_exit_code_2(inputs, capsys: pytest.CaptureFixture[str], broken: str,
                                                 text: str | None, message: str) -> None:
    files = {"manifest": inputs["set"] / "manifest.json", "report": inputs["report"],
             "results": inputs["run"] / "results.csv"}
    if text is None:
        files[broken].unlink()
    else:
        files[broken].write_text(text)
    args = ["--set", str(inputs["set"]), "--detector-run", str(inputs["run"]), "--verifier", str(inputs["verifier"]),
            "--out", str(inputs["out"]), "--chain-report", str(inputs["report"])]
    assert ship.main(args) == InputError.exit_code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "unexpected" not in err, err
    assert message.format(**files) in err
    assert not inputs["out"].exists()  # nothing written
