"""training.evaluate_chain: ground truth from a built set, threshold tuning on val, scoring on test."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml

from midog import progress
from midog.config import load_config
from midog.outputs import MITOTIC_FIGURE, NON_MITOTIC_FIGURE
from tests.training.test_amibr_detection import _cfg, _write_amibr
from training import amibr_detection as ad
from training import evaluate_chain as ec


@pytest.fixture(scope="module")
def detection(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("amibr")
    _write_amibr(root, {f"MIDOG21/{i:03d}.tiff": 3 for i in range(10)}, np.random.default_rng(2))
    out = tmp_path_factory.mktemp("built")
    ad.build(root, out, seed=0, cfg=_cfg())
    return out / "detection"


def _oracle(detection: Path, rng: np.random.Generator):
    """Every true figure found with P 0.9 (2 µm off), plus false candidates with P 0.4 and 0.95 on some images."""
    truth = {**ec.load_split(detection, "val").ground_truth, **ec.load_split(detection, "test").ground_truth}

    def predict(image: Path) -> dict:
        points = [{"name": MITOTIC_FIGURE, "point": [x + 0.002, y, 0.0], "probability": 0.9}
                  for x, y, _ in truth[image.name]["annotations"]]
        points += [{"name": NON_MITOTIC_FIGURE, "point": [0.001, 0.001 + 0.01 * k, 0.0], "probability": 0.4}
                   for k in range(3)]
        return {"name": "Points of interest", "type": "Multiple points", "points": points}

    return predict


def test_ground_truth_is_in_millimetres(detection):
    split = ec.load_split(detection, "test")
    assert split.images and all(p.name in split.ground_truth for p in split.images)
    entry = split.ground_truth[split.images[0].name]
    assert entry["tumor domain"] == "MIDOG21" and entry["roi type"] == "hotspot"
    coords = np.array(entry["annotations"])
    assert coords[:, :2].max() <= 256 * 0.25e-3 and coords[:, 2].max() == 0.0


def test_tuning_on_val_and_scoring_on_test(detection, tmp_path):
    config_path = tmp_path / "pipeline.yaml"
    report = ec.evaluate_chain(detection, _oracle(detection, np.random.default_rng(0)), config_path)
    # the false candidates (P 0.4) sit below the true ones (P 0.9): the best threshold drops them all
    assert 0.4 < report["tuned"]["threshold"] <= 0.9
    assert report["test_at_tuned"]["f1"] == pytest.approx(1.0, abs=1e-6)
    assert report["test_at_tuned"]["false_positives"] == 0
    assert report["test_at_tuned"]["true_positives"] == report["figures"]["test"]
    assert "detector_only" not in report  # the oracle gives no detector confidence
    written = yaml.safe_load(config_path.read_text())
    assert written == {"verifier": {"threshold": report["tuned"]["threshold"]}}
    assert load_config(config_path).verifier.threshold == report["tuned"]["threshold"]


def test_relabel_names_by_threshold():
    payload = {"x.tif": {"points": [{"name": MITOTIC_FIGURE, "point": [0, 0, 0], "probability": 0.3},
                                    {"name": NON_MITOTIC_FIGURE, "point": [1, 0, 0], "probability": 0.7}]}}
    names = [p["name"] for p in ec.relabel(payload, 0.5)["x.tif"]["points"]]
    assert names == [NON_MITOTIC_FIGURE, MITOTIC_FIGURE]


def test_roi_tiff_carries_the_spacing(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    path = ec.write_roi_tiff(rgb, tmp_path / "roi.tif")
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        np.testing.assert_array_equal(page.asarray(), rgb)
        x_res = page.tags["XResolution"].value
        assert page.tags["ResolutionUnit"].value == 3  # centimetre
        assert 1e4 / (x_res[0] / x_res[1]) == pytest.approx(0.25, rel=1e-6)  # µm per pixel


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    from roi_factory import tiny_detector, tiny_verifier

    folder = tmp_path_factory.mktemp("weights")
    tiny_detector(folder / "detector.pt", class_bias=4.0)
    tiny_verifier(folder / "verifier.pt")
    return folder


def test_the_pipeline_chain_runs_on_canvases(detection, tiny_weights, tmp_path, monkeypatch):
    """The real chain (tiny random models) on two val and two test canvases: a complete report and config."""
    monkeypatch.setenv("MIDOG_WEIGHTS_DIR", str(tiny_weights))
    predictor = ec.pipeline_predictor(load_config(), tmp_path)
    report = ec.evaluate_chain(detection, predictor, tmp_path / "tuned.yaml", limit=2)
    assert report["test_at_tuned"]["images"] == 2
    assert report["test_as_predicted"]["true_positives"] + report["test_as_predicted"]["false_negatives"] \
        == report["figures"]["test"]
    assert 0.0 <= report["tuned"]["threshold"] <= 1.0
    assert report["detector_only"]["test"]["images"] == 2  # the detector's own scores, kept beside
    assert load_config(tmp_path / "tuned.yaml").verifier.threshold == report["tuned"]["threshold"]
    assert not list(tmp_path.glob("*.tif"))  # the temporary TIFFs are gone


def test_false_positive_mining_keeps_only_far_candidates(detection, tiny_weights, tmp_path, monkeypatch):
    import shutil

    from PIL import Image

    out = tmp_path / "set"
    shutil.copytree(detection, out / "detection")
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0)  # every count on a line of its own
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log, not a terminal
    crop_config = Path(__file__).resolve().parents[2] / "training" / "configs" / "amibr_canvas_crops.yaml"
    counts = ad.mine_false_positives(out, tiny_weights / "detector.pt", splits=("val",), confidence=0.01,
                                     crop_config=crop_config)
    canvases = len(ad.read_annotations(out / "detection", "val"))
    bar = sys.stderr.getvalue().splitlines()
    assert re.match(rf"false positives: 100%\|#+\| {canvases}/{canvases} \[.*(canvas/s|s/canvas)\]$", bar[-1]), bar
    crops = sorted((out / "verifier" / "val" / ad.FALSE_POSITIVE_DIR).glob("*.png"))
    assert counts == {"val": len(crops)} and crops, "a biased tiny detector proposes something"
    assert all(min(Image.open(p).size) >= 1 for p in crops)
    # the same count, recomputed: the pipeline's merged candidates more than 30 px from every labelled figure
    from midog.config import resolve_config
    from midog.roi_io import ArrayRoi, PhysicalTransform
    from midog.pipeline import Track1Detector

    config = resolve_config(crop_config, overrides={"proposals.weights": str(tiny_weights / "detector.pt"),
                                                    "proposals.confidence": 0.01, "runtime.device": "cpu"})
    chain = Track1Detector.from_config(config, with_verifier=False, with_atypical=False)
    far = 0
    for path, centres in ad.read_annotations(out / "detection", "val").items():
        image = ArrayRoi(np.array(Image.open(path).convert("RGB")), PhysicalTransform((0.00025, 0.00025)))
        middle = chain.candidates(image)[0].centres
        far += sum(np.hypot(*(centres - m).T).min() > 30 for m in middle)
    assert far == len(crops)
    assert all(Image.open(p).size == (64, 64) for p in crops)  # resized as the crop config says


@pytest.mark.parametrize("crops, refusal", [
    # the shipped verifiers cut two crop sets (20 and 28 µm): mining names none, and says so
    ("context_px: [15, 31]", r"false positives \(--crop-config\) cuts one crop set"),
    # a canvas is a patchwork of other images' crops, with no one stain to normalise with
    ("context_px: 15\n  stain_normalization: macenko", r"composed canvases.*stain_normalization must be none"),
])
def test_mining_refuses_crop_settings_it_cannot_cut_before_writing(detection, tiny_weights, tmp_path, crops: str,
                                                                   refusal: str):
    import shutil

    from midog.errors import ConfigError

    out = tmp_path / "set"
    shutil.copytree(detection, out / "detection")
    config = tmp_path / "crops.yaml"
    config.write_text(f"verifier:\n  crop_size: 80\n  {crops}\n")
    with pytest.raises(ConfigError, match=refusal):
        ad.mine_false_positives(out, tiny_weights / "detector.pt", splits=("val",), crop_config=config)
    assert not (out / "verifier").exists()
