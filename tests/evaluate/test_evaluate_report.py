"""Reports: metrics.json, summary.md and readable PNG figures, overlays when images are given."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from evaluate_factory import container_folder, payload, point, truth
from midog.evaluate import track1, track2
from midog.evaluate.__main__ import main
from midog.evaluate.report import write_track1_report, write_track2_report

GT1 = {"roi_a.tiff": truth([(50, 50), (150, 60)], domain=0, roi="hotspot"),
       "roi_b.tiff": truth([(20, 20)], domain=1, roi="random")}
PRED1 = {"roi_a.tiff": payload([point(52, 50, 0.9), point(100, 150, 0.7), point(150, 62, 0.4, "non-mitotic figure")]),
         "roi_b.tiff": payload([point(180, 180, 0.6)])}


def _png(path: Path) -> np.ndarray:
    import matplotlib.image

    assert path.is_file() and path.stat().st_size > 5000, path
    return matplotlib.image.imread(path)


def test_track1_report_with_overlay(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    pixels = np.full((200, 200, 3), 230, dtype=np.uint8)
    tifffile.imwrite(images / "roi_a.tiff", pixels)  # roi_b has no image: no overlay for it
    written = write_track1_report(track1.evaluate(PRED1, GT1), tmp_path / "report", images, spacing_um=1.0)
    names = {p.name for p in written}
    assert {"metrics.json", "summary.md", "froc.png", "precision_recall.png", "f1_threshold.png",
            "per_domain.png", "overlay_roi_a.png"} == names
    for p in written:
        if p.suffix == ".png":
            assert _png(p).ndim == 3
    overlay = _png(tmp_path / "report" / "overlay_roi_a.png")
    # Red (FP), lime (TP) and yellow (FN) markers are drawn on the grey image.
    rgb = overlay[..., :3]
    assert np.any((rgb[..., 0] > 0.9) & (rgb[..., 1] < 0.2) & (rgb[..., 2] < 0.2))
    assert np.any((rgb[..., 0] > 0.9) & (rgb[..., 1] > 0.9) & (rgb[..., 2] < 0.2))
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "| overall |" in summary and "verifier.threshold" in summary and "domain 1" in summary
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["aggregates"]["tumor_1_recall"] == 0.0


def test_track2_report(tmp_path: Path) -> None:
    gt = [{"image": "s.tiff", "labels": ["atypical", "normal", "normal", "atypical"], "tumordomains": [0, 0, 1, 1]}]
    pred = {"s.tiff": [{"class": "atypical", "confidence": 0.9}, {"class": "normal", "confidence": 0.7},
                       {"class": "atypical", "confidence": 0.55}, {"class": "normal", "confidence": 0.6}]}
    written = write_track2_report(track2.evaluate(pred, gt), tmp_path / "r2")
    assert {p.name for p in written} == {"metrics.json", "summary.md", "roc.png", "confusion_matrix.png",
                                         "per_domain.png"}
    for p in written:
        if p.suffix == ".png":
            _png(p)
    assert "atypical.threshold" in (tmp_path / "r2" / "summary.md").read_text()


def test_cli_report(tmp_path: Path) -> None:
    (tmp_path / "gt.json").write_text(json.dumps(GT1))
    folder = container_folder(tmp_path / "pred", PRED1)
    assert main(["track1", "--ground-truth", str(tmp_path / "gt.json"), "--predictions", str(folder),
                 "--report", str(tmp_path / "rep"), "--no-froc"]) == 0
    assert "froc_auc" not in json.loads((tmp_path / "rep" / "metrics.json").read_text())["aggregates"]
    assert (tmp_path / "rep" / "froc.png").is_file()


@pytest.mark.parametrize("bad", ["not json", "[]"])
def test_report_is_not_written_for_bad_input(tmp_path: Path, bad: str) -> None:
    (tmp_path / "gt.json").write_text(json.dumps(GT1))
    folder = container_folder(tmp_path / "pred", PRED1)
    (folder / "job-0" / "output" / "mitotic-figures.json").write_text(bad)
    assert main(["track1", "--ground-truth", str(tmp_path / "gt.json"), "--predictions", str(folder),
                 "--report", str(tmp_path / "rep")]) == 2
    assert not (tmp_path / "rep").exists()


def test_overlay_uses_the_image_spacing_unless_overridden(tmp_path: Path) -> None:
    from midog.evaluate.report import _read_downscaled

    path = tmp_path / "roi.tiff"
    # 0.25 µm/px in the resolution tags (40000 px per cm), 3400 px wide: downscaled by 3 to fit 1600 px.
    tifffile.imwrite(path, np.zeros((100, 3400, 3), dtype=np.uint8), resolution=(40000, 40000), resolutionunit=3)
    pixels, to_px = _read_downscaled(path, None)
    assert pixels.shape == (34, 1134, 3)
    assert to_px(np.array([[0.3, 0.015, 0.0]])) == pytest.approx(np.array([[400.0, 20.0]]))
    _, to_px_override = _read_downscaled(path, 1.0)
    assert to_px_override(np.array([[0.3, 0.015, 0.0]])) == pytest.approx(np.array([[100.0, 5.0]]))


def test_track1_report_for_a_detector_that_predicted_nothing(tmp_path: Path) -> None:
    evaluation = track1.evaluate({"a.tiff": payload([])}, {"a.tiff": truth([(0, 0)])})
    written = write_track1_report(evaluation, tmp_path / "report")
    assert (tmp_path / "report" / "precision_recall.png").is_file() and (tmp_path / "report" / "f1_threshold.png").is_file()
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["aggregates"]["recall"] == 0.0
    assert len(written) >= 4
