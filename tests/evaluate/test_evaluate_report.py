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


# ---- per-domain and overlay figures: undefined values read n/a, counts and labels shown, legends off the data ----

def _texts(ax: object) -> list[str]:
    return [t.get_text() for t in ax.texts]  # type: ignore[attr-defined]


def _overlaps(a: object, b: object) -> bool:
    return bool(a.overlaps(b))  # type: ignore[attr-defined]


def _legend_outside_axes(fig: object, ax: object) -> bool:
    fig.canvas.draw()  # type: ignore[attr-defined]
    legend = ax.get_legend()  # type: ignore[attr-defined]
    assert legend is not None
    return not _overlaps(legend.get_window_extent(), ax.get_window_extent())  # type: ignore[attr-defined]


def test_track1_domain_without_ground_truth_reads_na_with_counts() -> None:
    from midog.evaluate.report import track1_group_rows, track1_groups_figure

    gt = {**GT1, "roi_c.tiff": truth([], domain=2, roi="hotspot")}  # domain 2: no ground truth
    pred = {**PRED1, "roi_c.tiff": payload([point(30, 30, 0.8), point(90, 90, 0.8)])}
    evaluation = track1.evaluate(pred, gt)
    domains, rois = track1_group_rows(evaluation)
    by_name = {row.name: row for row in domains}
    assert set(by_name) == {"domain 0", "domain 1", "domain 2"}
    undefined = {m: v for m, v in by_name["domain 2"].values.items() if m != "precision"}
    assert all(v is None for v in undefined.values())  # not 0.00: undefined without ground truth
    assert by_name["domain 2"].values["precision"] == pytest.approx(0.0, abs=1e-5)  # two false positives: 0, real
    assert by_name["domain 2"].counts == "GT 0, det 2, TP 0"
    assert by_name["domain 0"].counts == "GT 2, det 2, TP 1"
    assert by_name["domain 0"].values["recall"] == pytest.approx(0.5, abs=1e-5)
    assert by_name["domain 1"].values["recall"] == pytest.approx(0.0, abs=1e-5)  # defined, just zero
    assert [row.name for row in rois] == ["hotspot", "random"]

    fig = track1_groups_figure(evaluation)
    ax = fig.axes[0]
    assert ax.get_ylabel() == "score"
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert "domain 2\nGT 0, det 2, TP 0" in ticks and "domain 0\nGT 2, det 2, TP 1" in ticks
    assert _texts(ax).count("n/a") == 3  # F1, recall and AP of domain 2
    drawn = sum(v is not None for row in domains for v in row.values.values())
    assert len(ax.patches) == drawn  # no zero-height bars for the undefined values
    assert _legend_outside_axes(fig, fig.axes[-1])


def test_track2_domain_without_atypical_pages_reads_na() -> None:
    from midog.evaluate.report import track2_domain_figure, track2_domain_rows

    gt = [{"image": "s.tiff", "labels": ["atypical", "normal", "normal", "normal"], "tumordomains": [0, 0, 1, 1]}]
    pred = {"s.tiff": [{"class": "atypical", "confidence": 0.9}, {"class": "normal", "confidence": 0.2},
                       {"class": "atypical", "confidence": 0.55}, {"class": "normal", "confidence": 0.4}]}
    evaluation = track2.evaluate(pred, gt)
    rows = {row.name: row for row in track2_domain_rows(evaluation)}
    assert rows["domain 1"].values == {"balanced_accuracy": None, "sensitivity": None, "specificity": 0.5,
                                       "roc_auc": None}
    assert rows["domain 1"].counts == "2 pages, 0 atypical"
    assert rows["domain 0"].values["balanced_accuracy"] == 1.0
    fig = track2_domain_figure(evaluation)
    ax = fig.axes[0]
    assert ax.get_ylabel() == "score"
    assert "domain 1\n2 pages, 0 atypical" in [t.get_text() for t in ax.get_xticklabels()]
    assert _texts(ax).count("n/a") == 3
    assert len(ax.patches) == 5
    assert _legend_outside_axes(fig, ax)


def test_overlay_legend_sits_outside_the_image(tmp_path: Path) -> None:
    from midog.evaluate.report import overlay_figure

    image = tmp_path / "roi_a.tiff"
    tifffile.imwrite(image, np.full((200, 200, 3), 230, dtype=np.uint8))
    # Points in the upper-right corner, where the legend used to sit.
    gt = {"roi_a.tiff": truth([(190, 10), (170, 30)])}
    pred = {"roi_a.tiff": payload([point(190, 11, 0.9), point(185, 25, 0.8),
                                   point(160, 10, 0.3, "non-mitotic figure")])}
    result = track1.evaluate(pred, gt).images[0]
    fig = overlay_figure(result, image, spacing_um=1.0)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["non-mitotic candidates (1)", "TP (1)", "FP (1)", "FN (1)"]
    assert _legend_outside_axes(fig, ax)


def _table(summary: str) -> dict[str, list[str]]:
    """summary.md's table: each row's cells by its group label."""
    rows = [line.strip("|").split("|") for line in summary.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [cell.strip() for cell in cells[1:]] for cells in rows[1:]}


def test_track1_summary_reads_na_where_the_figure_does(tmp_path: Path) -> None:
    gt = {**GT1, "roi_c.tiff": truth([], domain=2, roi="hotspot")}  # domain 2: no ground truth, two detections
    pred = {**PRED1, "roi_c.tiff": payload([point(30, 30, 0.8), point(90, 90, 0.8)])}
    evaluation = track1.evaluate(pred, gt)
    assert evaluation.aggregates["tumor_2_AP"] == -1  # the official value the table used to print
    write_track1_report(evaluation, tmp_path / "report")
    table = _table((tmp_path / "report" / "summary.md").read_text())
    # F1 | precision | recall | AP | FROC AUC: precision is 0 (two false positives), a real figure
    assert table["domain 2"] == ["n/a", "0.0000", "n/a", "n/a", "n/a"]
    assert table["domain 1"][2] == "0.0000"  # recall: defined, just zero
    assert table["domain 0"][2] == "0.5000" and table["overall"][2] == "0.3333"  # recall: 1 of 2, 1 of 3


def test_track2_summary_reads_na_where_the_figure_does(tmp_path: Path) -> None:
    gt = [{"image": "s.tiff", "labels": ["atypical", "normal", "normal", "normal"], "tumordomains": [0, 0, 1, 1]}]
    pred = {"s.tiff": [{"class": "atypical", "confidence": 0.9}, {"class": "normal", "confidence": 0.2},
                       {"class": "atypical", "confidence": 0.55}, {"class": "normal", "confidence": 0.4}]}
    evaluation = track2.evaluate(pred, gt)
    assert evaluation.aggregates["domain_1"]["sensitivity"] == 0.0  # the official value the table used to print
    write_track2_report(evaluation, tmp_path / "r2")
    table = _table((tmp_path / "r2" / "summary.md").read_text())
    # balanced accuracy | sensitivity | specificity | accuracy | ROC AUC: domain 1 has no atypical page
    assert table["domain 1"] == ["n/a", "n/a", "0.5000", "0.5000", "n/a"]
    assert table["domain 0"] == ["1.0000", "1.0000", "1.0000", "1.0000", "1.0000"]
    assert table["overall"][1] == "1.0000"
