"""The whole Track 1 chain through process.py's main(), on generated ROIs with tiny random models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from output_checks import assert_multiple_points
from roi_factory import he_roi, tiny_track1_weights, track1_input

from midog.cli import main
from midog.config import load_config
from midog.outputs import TRACK1_ATYPICAL_FILENAME, TRACK1_FILENAME
from midog.merging import Candidates
from midog.pipeline import Track1Detector

SPACING_UM = (0.25, 0.3)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_track1_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(autouse=True)
def _tiny_weights(weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIDOG_WEIGHTS_DIR", str(weights))
    monkeypatch.setenv("MIDOG_ATYPICAL__TTA", "false")


@pytest.fixture(scope="module")
def roi() -> np.ndarray:
    return he_roi(1100, 900, seed=5, figures=[(300, 300), (450, 600)])


def run(input_dir: Path, output_dir: Path) -> tuple[int, dict, dict]:
    code = main(["--input", str(input_dir), "--output", str(output_dir)])
    if code:
        return code, {}, {}
    return (code, json.loads((output_dir / TRACK1_FILENAME).read_text()),
            json.loads((output_dir / TRACK1_ATYPICAL_FILENAME).read_text()))


def test_whole_chain_writes_official_points_in_millimetres(tmp_path: Path, roi: np.ndarray):
    track1_input(tmp_path / "in", roi, spacing_um=SPACING_UM)
    code, figures, atypical = run(tmp_path / "in", tmp_path / "out")
    assert code == 0
    assert_multiple_points(figures)
    assert_multiple_points(atypical)
    assert figures["points"], "the tiny detector is biased to propose something"
    assert {p["name"] for p in figures["points"]} <= {"mitotic figure", "non-mitotic figure"}

    # the same chain through the Python API: pixel centres → mm through the spacing (non-square here)
    result = Track1Detector.from_config(load_config()).detect(
        tmp_path / "in" / "images" / "histopathology-roi-cropout" / "roi.tif", progress=False)
    assert len(result.detections) == len(figures["points"])
    for detection, point in zip(result.detections, figures["points"]):
        assert point["point"][:2] == pytest.approx([detection.x * SPACING_UM[0] / 1000,
                                                    detection.y * SPACING_UM[1] / 1000])
        assert point["probability"] == pytest.approx(detection.verifier_probability)  # "verifier" mode
        assert point["name"] == ("mitotic figure" if detection.verifier_probability >= 0.5 else "non-mitotic figure")
        assert 0 <= detection.x <= 1100 and 0 <= detection.y <= 900

    accepted = [p for p in figures["points"] if p["name"] == "mitotic figure"]
    assert [p["point"] for p in atypical["points"]] == [p["point"] for p in accepted]
    assert {p["name"] for p in atypical["points"]} <= {"atypical mitotic figure", "normal mitotic figure"}
    assert set(result.timings) == {"proposals", "verification", "atypical"}  # proposals: tile, propose, merge


def test_white_image_gives_no_mitotic_figures(tmp_path: Path):
    track1_input(tmp_path / "in", np.full((700, 900, 3), 255, np.uint8))
    code, figures, atypical = run(tmp_path / "in", tmp_path / "out")
    assert code == 0
    assert figures["points"] == [] and atypical["points"] == []


def test_small_mha_roi_without_spacing_uses_the_fallback(tmp_path: Path, roi: np.ndarray,
                                                        caplog: pytest.LogCaptureFixture):
    track1_input(tmp_path / "in", roi[:300, :400], name="roi.mha", spacing_um=None)  # smaller than a tile, SimpleITK spacing 1.0
    code, figures, _ = run(tmp_path / "in", tmp_path / "out")
    assert code == 0
    assert "assuming 0.25 µm/px" in caplog.text
    for point in figures["points"]:
        assert 0 <= point["point"][0] <= 400 * 0.00025 and 0 <= point["point"][1] <= 300 * 0.00025


def test_product_probability_mode(tmp_path: Path, roi: np.ndarray, monkeypatch: pytest.MonkeyPatch):
    track1_input(tmp_path / "in", roi)
    monkeypatch.setenv("MIDOG_VERIFIER__PROBABILITY", "product")
    result = Track1Detector.from_config(load_config()).detect(
        tmp_path / "in" / "images" / "histopathology-roi-cropout" / "roi.tif", progress=False)
    assert result.detections
    threshold = load_config().verifier.threshold
    for d in result.detections:
        assert d.probability == pytest.approx(d.detector_confidence * d.verifier_probability)
        # the name follows the written probability, so a threshold tuned on the outputs means the same here
        assert d.is_mitotic_figure == (d.probability >= threshold)
    assert any(d.verifier_probability >= threshold > d.probability for d in result.detections)


def test_final_suppression_drops_the_less_probable_of_two_close_candidates(tmp_path: Path, roi: np.ndarray):
    track1_input(tmp_path / "in", roi, spacing_um=SPACING_UM)
    image = tmp_path / "in" / "images" / "histopathology-roi-cropout" / "roi.tif"

    def box(x: float, y: float) -> list[float]:
        return [x - 25, y - 25, x + 25, y + 25]

    # at 0.25 x 0.3 µm/px: a-b 24 px in x = 6.0 µm (one figure twice); a-c 26 px in y = 7.8 µm, which would be
    # 6.5 µm if the radius were read in x pixels; d far away. Product mode with detector confidences 1000x apart
    # orders them a > b > c whatever the tiny verifier says.
    centres = [(300, 300), (324, 300), (300, 326), (700, 600)]
    known = Candidates(np.array([box(x, y) for x, y in centres], np.float32),
                       np.array([0.9, 1e-3, 1e-6, 0.5], np.float32), np.zeros(4, np.int64))
    values = {"verifier.probability": "product"}
    everything = Track1Detector.from_config(load_config(overrides=values)).detect(image, progress=False,
                                                                                  candidates=known)
    assert {(round(d.x), round(d.y)) for d in everything.detections} == set(centres)
    order = [(round(d.x), round(d.y)) for d in everything.detections]
    assert order.index((300, 300)) < order.index((324, 300)) < order.index((300, 326))

    values["merging.final_radius_um"] = 7.5
    kept = Track1Detector.from_config(load_config(overrides=values)).detect(image, progress=False, candidates=known)
    assert {(round(d.x), round(d.y)) for d in kept.detections} == {(300, 300), (300, 326), (700, 600)}
    assert [d.probability for d in kept.detections] == [d.probability for d in everything.detections
                                                        if (round(d.x), round(d.y)) != (324, 300)]


def test_missing_weights_fail_cleanly_without_output(tmp_path: Path, roi: np.ndarray,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]):
    track1_input(tmp_path / "in", roi)
    monkeypatch.setenv("MIDOG_PROPOSALS__WEIGHTS", "absent.pt")
    code, _, _ = run(tmp_path / "in", tmp_path / "out")
    assert code == 3
    assert "absent.pt" in capsys.readouterr().err
    assert not (tmp_path / "out" / TRACK1_FILENAME).exists()


def test_two_images_are_refused(tmp_path: Path, roi: np.ndarray, capsys: pytest.CaptureFixture[str]):
    track1_input(tmp_path / "in", roi, name="a.tif")
    track1_input(tmp_path / "in", roi, name="b.tif")
    code, _, _ = run(tmp_path / "in", tmp_path / "out")
    assert code == 2
    assert "expected one image" in capsys.readouterr().err


def test_both_classifiers_look_for_foundation_weights_where_the_run_config_says(monkeypatch: pytest.MonkeyPatch,
                                                                                 tmp_path: Path):
    import midog.classifier

    config = load_config(overrides={"foundation": {"dir": str(tmp_path / "bases"), "hf_cache": str(tmp_path)}})
    seen = []
    real = midog.classifier.load_classifier

    def recording(path, device="cpu", foundation=None):
        seen.append(foundation)
        return real(path, device, foundation=foundation)

    monkeypatch.setattr("midog.verifier.load_classifier", recording)
    monkeypatch.setattr("midog.atypical.load_classifier", recording)
    Track1Detector.from_config(config, device="cpu")
    assert seen == [config.foundation, config.foundation]     # the verifier and the atypical classifier


def test_the_two_track1_outputs_are_written_both_or_neither(tmp_path: Path, roi: np.ndarray,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]):
    import midog.pipeline as pipeline
    from midog.errors import OutputError

    real_write = pipeline.write_json_atomic

    def disk_full_on_the_second(path: Path, payload: object) -> Path:
        if Path(path).name == TRACK1_ATYPICAL_FILENAME:
            raise OutputError(f"cannot write {path}: No space left on device")
        return real_write(path, payload)

    monkeypatch.setattr(pipeline, "write_json_atomic", disk_full_on_the_second)
    track1_input(tmp_path / "in", roi)
    assert main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]) == 4
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []  # the first file did not stay behind
