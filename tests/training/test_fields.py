"""training.fields on generated fields in the MITOS-ATYPIA-14 layout, and the real CSV when it is present."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from midog.errors import InputError
from tests.conftest import shared_path
from training.fields import (FIELD_SPACING_UM, best_threshold, blob_predictions, darkest_blobs, floor_report,
                             load_field_index, main, open_field, score_fields, slide_folds)

WIDTH, HEIGHT = 160, 128
BACKGROUND = 225
BLOB = 40
BLOB_RADIUS = 5

# frame → planted blob centres (x, y) in pixels, each > 31 px from the others and > 20 px from the border.
FIELDS = {
    "A1_a.jpg": [(30, 30), (120, 90)],
    "A1_b.jpg": [(80, 60)],
    "B2_a.jpg": [(25, 100), (70, 40), (130, 30)],
    "C3_a.jpg": [(100, 64)],
}


def field_pixels(blobs: list[tuple[int, int]], darkness: list[int] | None = None) -> np.ndarray:
    """Light grey field with dark discs (RGB uint8)."""
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    grey = np.full((HEIGHT, WIDTH), BACKGROUND, dtype=np.uint8)
    for i, (x, y) in enumerate(blobs):
        grey[(xx - x) ** 2 + (yy - y) ** 2 <= BLOB_RADIUS ** 2] = BLOB if darkness is None else darkness[i]
    return np.repeat(grey[..., None], 3, axis=2)


def write_fields(root: Path, fields: dict[str, list[tuple[int, int]]] = FIELDS) -> Path:
    (root / "frames").mkdir(parents=True)
    rows = []
    for name, blobs in fields.items():
        Image.fromarray(field_pixels(blobs)).save(root / "frames" / name, quality=100)
        rows += [(name, name.split("_")[0], float(x), float(y)) for x, y in blobs]
    pd.DataFrame(rows, columns=["frame", "slide", "x", "y"]).to_csv(root / "mitoses.csv", index=False)
    return root


@pytest.fixture
def fields_root(tmp_path: Path) -> Path:
    return write_fields(tmp_path / "fields")


# ---- index ---------------------------------------------------------------------------------------------------

def test_index_reads_frames_and_mitoses(fields_root: Path) -> None:
    index = load_field_index(fields_root)
    assert index.frames["frame"].tolist() == sorted(FIELDS)
    assert index.frames["slide"].tolist() == ["A1", "A1", "B2", "C3"]
    assert (index.frames["width"] == WIDTH).all() and (index.frames["height"] == HEIGHT).all()
    assert len(index.mitoses) == 7
    assert index.mitoses[index.mitoses.frame == "B2_a.jpg"][["x", "y"]].to_numpy().tolist() == [
        [25, 100], [70, 40], [130, 30]]
    assert index.spacing_um == FIELD_SPACING_UM


def test_open_field_gives_pixels_and_anisotropic_spacing(fields_root: Path) -> None:
    roi = open_field(fields_root / "frames" / "A1_b.jpg")
    assert roi.pixels.shape == (HEIGHT, WIDTH, 3) and roi.pixels.dtype == np.uint8
    assert roi.transform.spacing_mm == pytest.approx((0.2273e-3, 0.2275e-3))
    assert roi.transform.to_mm(np.array([[1000.0, 1000.0]]))[0] == pytest.approx([0.2273, 0.2275])


def test_missing_csv_is_one_clear_line(fields_root: Path) -> None:
    (fields_root / "mitoses.csv").unlink()
    with pytest.raises(InputError, match=r"^no mitoses.csv in .*fields$"):
        load_field_index(fields_root)


def test_missing_frames_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no frames/ folder"):
        load_field_index(tmp_path)


def test_csv_frame_without_file(fields_root: Path) -> None:
    (fields_root / "frames" / "C3_a.jpg").unlink()
    with pytest.raises(InputError, match="frame C3_a.jpg has no file in frames/"):
        load_field_index(fields_root)


@pytest.mark.parametrize("x, y", [(WIDTH + 1.0, 10.0), (10.0, -2.0)])
def test_mitosis_outside_its_frame(fields_root: Path, x: float, y: float) -> None:
    csv = fields_root / "mitoses.csv"
    table = pd.read_csv(csv)
    table.loc[1, ["x", "y"]] = [x, y]
    table.to_csv(csv, index=False)
    with pytest.raises(InputError, match=rf"mitosis \({x:g}, {y:g}\) lies outside frame A1_a.jpg \(160 x 128 px\)"):
        load_field_index(fields_root)


# ---- folds ---------------------------------------------------------------------------------------------------

def test_folds_balance_mitoses_largest_slide_first(tmp_path: Path) -> None:
    counts = {"S1": 5, "S2": 3, "S3": 2, "S4": 2, "S5": 1}
    fields = {f"{s}_x.jpg": [(20 + 35 * (i % 4), 20 + 35 * (i // 4)) for i in range(n)] for s, n in counts.items()}
    index = load_field_index(write_fields(tmp_path / "f", fields))
    folds = slide_folds(index, 3)
    # S1 → 0 (5); S2 → 1 (3); S3 → 2 (2); S4 → 2 (4); S5 → 1 (4)
    assert folds == {"S1": 0, "S2": 1, "S3": 2, "S4": 2, "S5": 1}
    loads = [sum(counts[s] for s, f in folds.items() if f == k) for k in range(3)]
    assert loads == [5, 4, 4]
    assert slide_folds(index, 3) == folds
    with pytest.raises(InputError, match="cannot make 6 folds of 5 slides"):
        slide_folds(index, 6)


# ---- darkest blobs -------------------------------------------------------------------------------------------

def test_blobs_found_exactly_on_array_and_after_jpeg(fields_root: Path) -> None:
    blobs = FIELDS["B2_a.jpg"]
    points, scores = darkest_blobs(field_pixels(blobs))
    assert sorted(map(tuple, points[:3].astype(int).tolist())) == sorted(blobs)
    assert (scores[:3] > scores[3:].max()).all() and (np.diff(scores) <= 0).all()
    jpeg_points, _ = darkest_blobs(open_field(fields_root / "frames" / "B2_a.jpg").pixels)
    for x, y in blobs:
        assert np.abs(jpeg_points[:3] - [x, y]).max(axis=1).min() <= 1


def test_blob_ranking_and_score_scale() -> None:
    points, scores = darkest_blobs(field_pixels([(40, 40), (110, 80)], darkness=[100, 20]))
    assert points[:2].tolist() == [[110, 80], [40, 40]]
    assert 0 < scores[1] < scores[0] <= 1


def test_plateau_gives_one_point_at_its_centre_with_scaled_darkness() -> None:
    points, scores = darkest_blobs(np.full((80, 100, 3), 200, dtype=np.uint8))
    assert points.tolist() == [[49, 39]]  # nearest the centroid (49.5, 39.5), then raster order
    assert scores == pytest.approx([55 / 255], abs=1e-5)


def test_blobs_closer_than_the_window_give_one_point() -> None:
    points, _ = darkest_blobs(field_pixels([(60, 64), (72, 64)], darkness=[120, 30]))
    near = points[np.abs(points - [66, 64]).max(axis=1) <= 15]
    assert len(near) == 1 and np.abs(near[0] - [72, 64]).max() <= 1


# ---- scoring -------------------------------------------------------------------------------------------------

def test_perfect_predictions_score_one(fields_root: Path) -> None:
    index = load_field_index(fields_root)
    predictions = {f: (p, np.ones(len(p))) for f, p in index.truth_mm().items()}
    result = score_fields(predictions, index)
    assert set(result["groups"]) == {"A1", "B2", "C3"}
    assert result["overall"]["f1"] == 1.0 and result["overall"]["AP"] == pytest.approx(1.0)
    assert (result["overall"]["tp"], result["overall"]["fp"], result["overall"]["fn"]) == (7, 0, 0)
    assert result["groups"]["B2"]["tp"] == 3 and result["groups"]["A1"]["frames"] == 2


def test_counts_with_anisotropic_spacing(fields_root: Path) -> None:
    index = load_field_index(fields_root, spacing_um=(0.25, 0.5))
    # A1_b truth (80, 60) px → (0.020, 0.030) mm; C3_a truth (100, 64) px → (0.025, 0.032) mm.
    predictions = {
        "A1_b.jpg": (np.array([[0.020, 0.037]]), np.array([0.9])),  # 7 µm off in y: TP
        "C3_a.jpg": (np.array([[0.025, 0.016], [0.025, 0.032]]),  # y with the x spacing: FP; exact but low: kept
                     np.array([0.8, 0.3])),                         # only below 0.5
    }
    result = score_fields(predictions, index, {"val": ["A1_b.jpg", "C3_a.jpg"]}, threshold=0.5)
    group = result["groups"]["val"]
    assert (group["tp"], group["fp"], group["fn"]) == (1, 1, 1)
    assert group["f1"] == pytest.approx(0.5)
    assert group["best_f1"] == pytest.approx(0.8) and group["best_threshold"] == 0.3
    assert best_threshold(predictions, index, ["A1_b.jpg", "C3_a.jpg"]) == pytest.approx((0.3, 0.8))
    overall = result["overall"]
    assert (overall["frames"], overall["tp"], overall["fn"]) == (2, 1, 1)


def test_predictions_for_unknown_frame_are_refused(fields_root: Path) -> None:
    index = load_field_index(fields_root)
    with pytest.raises(InputError, match="not in the index: Z9_a.jpg"):
        score_fields({"Z9_a.jpg": (np.zeros((0, 2)), np.zeros(0))}, index)


def test_floor_finds_every_planted_blob(fields_root: Path) -> None:
    index = load_field_index(fields_root)
    floor = floor_report(index, blob_predictions(index))
    assert floor["best_f1"] == 1.0
    assert all(g["f1"] == 1.0 for g in floor["groups"].values())


def test_cli_writes_the_report(fields_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.json"
    assert main(["--root", str(fields_root), "--report", str(out), "--folds", "2"]) == 0
    report = json.loads(out.read_text())
    assert report["slides"]["A1"] == {"fold": 0, "frames": 2, "mitoses": 3}
    assert report["darkest_blob_floor"]["best_f1"] == 1.0
    assert "overall" in capsys.readouterr().out


def test_cli_bad_root_is_one_line_and_no_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.json"
    assert main(["--root", str(tmp_path / "nowhere"), "--report", str(out)]) == InputError.exit_code
    assert capsys.readouterr().err.strip().count("\n") == 0 and not out.exists()


# ---- real data -----------------------------------------------------------------------------------------------

def test_real_csv_counts_and_folds() -> None:
    index = load_field_index(shared_path("mitos-atypia-14"))
    expected = {"H03": (63, 133), "H04": (103, 264), "H10": (19, 25), "H11": (17, 20), "H12": (2, 2),
                "H15": (22, 25), "H17": (27, 34)}
    frames = index.frames["slide"].value_counts().to_dict()
    mitoses = index.mitoses["slide"].value_counts().to_dict()
    assert {s: (frames[s], mitoses[s]) for s in frames} == expected
    assert len(index.mitoses) == 503 and len(index.frames) == 253
    folds = slide_folds(index, 3)
    assert sorted(folds) == sorted(expected) and set(folds.values()) == {0, 1, 2}
    assert [s for s, f in folds.items() if f == 0] == ["H04"] and folds["H03"] == 1
