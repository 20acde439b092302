"""The AMi-Br detection canvases: geometry, labels, split, on generated crops and on a few real ones."""

from __future__ import annotations

import csv
import io
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from scipy import ndimage

from midog import progress
from tests.conftest import shared_path
from training import amibr_detection as ad


def _cfg(**kw) -> ad.AmibrDetectionConfig:
    base = dict(canvas_size=256, uses_per_crop={"train": 2, "val": 1, "test": 1},
                verifier_per_crop={"train": 2, "val": 1, "test": 1})
    base.update(kw)
    return ad.AmibrDetectionConfig(**base)


def _marked_crop(rng: np.random.Generator, figures: list[tuple[float, float]]) -> np.ndarray:
    """Grey-noise crop with a pure red 4 × 4 dot centred on each figure (continuous coordinates)."""
    image = rng.integers(60, 200, size=(128, 128, 3), dtype=np.uint8)
    image[..., 0] = np.minimum(image[..., 0], 200)
    for x, y in figures:
        xi, yi = int(round(x)), int(round(y))
        image[yi - 2:yi + 2, xi - 2:xi + 2] = (255, 0, 0)
    return image


def _write_amibr(root: Path, slides: dict[str, int], rng: np.random.Generator) -> None:
    """A fake AMi-Br folder: `slides` maps dataset/slide → crop count; two crops of each slide are neighbours."""
    rows = []
    uid = 0
    for key, n in slides.items():
        dataset, slide = key.split("/")
        for k in range(n):
            x, y = 1000 + 300 * k, 2000
            if k == 1:
                x = 1000 + 40  # 40 px right of crop 0: each is visible in the other
            rows.append({"slide": slide, "dataset": dataset, "dataset_uid": f"{dataset}_{uid}.png",
                         "final_label": "Normal" if uid % 3 else "Atypical", "x": x, "y": y})
            uid += 1
    by_slide = defaultdict(list)
    for row in rows:
        by_slide[(row["dataset"], row["slide"])].append(row)
    for row in rows:
        others = [(64 + o["x"] - row["x"], 64 + o["y"] - row["y"]) for o in by_slide[(row["dataset"], row["slide"])]]
        inside = [(x, y) for x, y in others if 2 <= x < 126 and 2 <= y < 126]
        folder = root / row["final_label"]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_marked_crop(rng, inside)).save(folder / row["dataset_uid"])
    with (root / "amibr_train_split.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def fake_amibr(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("amibr")
    slides = {f"MIDOG21/{i:03d}.tiff": 4 for i in range(10)} | {f"TUPAC16/{i:02d}.svs": 5 for i in range(5)}
    _write_amibr(root, slides, np.random.default_rng(1))
    return root


@pytest.fixture(scope="module")
def built(fake_amibr, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("built")
    return out, ad.build(fake_amibr, out, seed=0, cfg=_cfg())


def test_neighbours_are_found_from_coordinates(fake_amibr):
    crops = ad.read_amibr(fake_amibr)
    first = [c for c in crops if c.slide == "MIDOG21/000.tiff"]
    np.testing.assert_allclose(first[0].figures, [[64, 64], [104, 64]])
    np.testing.assert_allclose(first[1].figures, [[64, 64], [24, 64]])
    np.testing.assert_allclose(first[2].figures, [[64, 64]])


@pytest.mark.parametrize("k", range(4))
@pytest.mark.parametrize("flip", [False, True])
def test_dihedral_moves_points_with_pixels(k, flip):
    image = np.zeros((128, 128, 3), dtype=np.uint8)
    image[20, 90] = 255  # pixel (x=90, y=20): its centre is the continuous point (90.5, 20.5)
    out, points = ad.dihedral(image, np.array([[90.5, 20.5], [64.0, 64.0]]), k, flip)
    y, x = np.argwhere(out[..., 0] == 255)[0]
    np.testing.assert_allclose(points[0], [x + 0.5, y + 0.5])
    np.testing.assert_allclose(points[1], [64.0, 64.0])  # the crop centre stays the centre


def test_layout_covers_the_canvas_once():
    cfg = _cfg()
    for seed in range(20):
        rects = ad.brick_layout(256, np.random.default_rng(seed), cfg)
        cover = np.zeros((256, 256), dtype=int)
        for r in rects:
            assert cfg.min_side <= r.w and cfg.min_side <= r.h
            cover[r.y:r.y + r.h, r.x:r.x + r.w] += 1
        assert (cover == 1).all()


def test_positive_offsets_spread_the_figure_over_the_window():
    rng = np.random.default_rng(0)
    places = np.array([64 - ad.positive_offset(np.array([64.0, 64.0]), 60, 40, 128, 12, rng)[0] for _ in range(2000)])
    assert places.min() == 12 and places.max() == 48  # anywhere from margin to width - margin
    assert np.histogram(places, bins=4)[0].min() > 300  # roughly uniform, not centred


def test_negative_offset_keeps_clear_of_every_figure():
    rng = np.random.default_rng(0)
    figures = np.array([[64.0, 64.0], [20.0, 100.0]])
    for _ in range(200):
        ox, oy = ad.negative_offset(figures, 30, 80, 128, 24, rng)
        for fx, fy in figures:
            outside_x = fx <= ox - 24 or fx >= ox + 30 + 24
            outside_y = fy <= oy - 24 or fy >= oy + 80 + 24
            assert outside_x or outside_y
    assert ad.negative_offset(figures, 60, 60, 128, 24, rng) is None


def test_canvas_figures_sit_on_the_red_dots(built):
    out, _ = built
    annotations = ad.read_annotations(out / "detection", "train")
    checked = 0
    for path, centres in annotations.items():
        image = np.asarray(Image.open(path))
        red = (image[..., 0] == 255) & (image[..., 1] == 0)
        assert len(centres) > 0
        for x, y in centres:
            window = red[max(0, int(y) - 3):int(y) + 3, max(0, int(x) - 3):int(x) + 3]
            assert window.any(), f"no marked figure at ({x}, {y}) in {path.name}"
            checked += 1
        # every whole marked dot on the canvas is labelled (no visible figure is left unlabelled)
        components, n = ndimage.label(red)
        for index in range(1, n + 1):
            ys, xs = np.nonzero(components == index)
            if len(xs) == 16:
                assert np.min(np.hypot(centres[:, 0] - xs.mean() - 0.5, centres[:, 1] - ys.mean() - 0.5)) <= 1.5
    assert checked > 20


def test_labels_are_boxes_inside_the_canvas_in_ultralytics_format(built):
    out, manifest = built
    det = out / "detection"
    data = yaml.safe_load((det / "data.yaml").read_text())
    assert data["names"] == {0: "mitotic figure"} and (Path(data["path"]) / data["val"]).is_dir()
    annotations = ad.read_annotations(det, "train")
    for image_path, centres in annotations.items():
        label = det / "labels" / "train" / (image_path.stem + ".txt")
        rows = np.loadtxt(label, ndmin=2)
        assert rows.shape == (len(centres), 5) and (rows[:, 0] == 0).all()
        x1, x2 = rows[:, 1] - rows[:, 3] / 2, rows[:, 1] + rows[:, 3] / 2
        y1, y2 = rows[:, 2] - rows[:, 4] / 2, rows[:, 2] + rows[:, 4] / 2
        assert (x1 >= -1e-6).all() and (x2 <= 1 + 1e-6).all() and (y1 >= -1e-6).all() and (y2 <= 1 + 1e-6).all()
        inner = (centres[:, 0] > 25) & (centres[:, 0] < 231) & (centres[:, 1] > 25) & (centres[:, 1] < 231)
        np.testing.assert_allclose(rows[inner, 1:3] * 256, centres[inner], atol=1e-3)
        np.testing.assert_allclose(rows[inner, 3:] * 256, 50, atol=1e-3)
    assert manifest["counts"]["train"]["figures"] >= 2 * manifest["counts"]["train"]["amibr_crops"]


def test_ultralytics_reads_the_labels(built):
    from ultralytics.data.utils import verify_image_label

    out, _ = built
    det = out / "detection"
    image = next((det / "images" / "val").glob("*.png"))
    label = det / "labels" / "val" / (image.stem + ".txt")
    _, boxes, shape, _, _, missing, found, _, corrupt, message = verify_image_label(
        (str(image), str(label), "", False, 1, 0, 0, False))
    assert (missing, found, corrupt, message) == (0, 1, 0, "")
    assert shape == (256, 256) and len(boxes) == len(np.loadtxt(label, ndmin=2))


def test_no_slide_in_two_splits_and_datasets_stratified(built, fake_amibr):
    out, _ = built
    with (out / "slides.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len({r["slide"] for r in rows}) == len(rows) == 15
    for dataset in ("MIDOG21", "TUPAC16"):
        assert {r["split"] for r in rows if r["dataset"] == dataset} == {"train", "val", "test"}
    split_of = {r["slide"]: r["split"] for r in rows}
    data = yaml.safe_load((out / "detection" / "annotations.json").read_text())
    for name, entry in data["images"].items():
        assert name.split("/")[1] == split_of[entry["slide"]]


def test_verifier_crops(built):
    out, manifest = built
    pos = sorted((out / "verifier" / "train" / ad.POSITIVE_DIR).glob("*.png"))
    neg = sorted((out / "verifier" / "train" / ad.NEGATIVE_DIR).glob("*.png"))
    assert len(pos) == manifest["counts"]["train"]["verifier_positive"] > 0 and len(neg) > 0
    for path in pos:
        image = np.asarray(Image.open(path))
        assert image.shape == (50, 50, 3)
        red = (image[..., 0] == 255) & (image[..., 1] == 0)
        ys, xs = np.nonzero(red)
        assert len(xs) and np.hypot(xs.mean() + 0.5 - 25, ys.mean() + 0.5 - 25).min() <= 6 * 1.5
    for path in neg:
        image = np.asarray(Image.open(path))
        red = (image[..., 0] == 255) & (image[..., 1] == 0)
        if red.any():  # a figure may show at the edge, never near the centre
            ys, xs = np.nonzero(red)
            assert np.hypot(xs + 0.5 - 25, ys + 0.5 - 25).min() >= 34 - 3


def test_building_shows_a_bar_of_the_slides_only_when_asked(fake_amibr, tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0)  # every count on a line of its own
    crops = ad.read_amibr(fake_amibr)
    subset = [c for c in crops if c.slide in sorted({c.slide for c in crops})[:3]]
    for wanted in (True, False):
        stderr = io.StringIO()  # a log, not a terminal
        monkeypatch.setattr(sys, "stderr", stderr)
        ad.build(fake_amibr, tmp_path / str(wanted), seed=0, cfg=_cfg(), crops=subset, progress=wanted)
        if wanted:
            lines = stderr.getvalue().splitlines()
            assert lines and all(line.startswith("canvases: ") for line in lines), lines
            assert re.match(r"canvases: 100%\|#+\| 3/3 \[.*(slide/s|s/slide)\]$", lines[-1]), lines
        else:
            assert stderr.getvalue() == ""


def test_real_amibr_crops(tmp_path):
    root = shared_path("amibr")
    crops = ad.read_amibr(root)
    assert len(crops) == 2894 and len({c.slide for c in crops}) == 146
    split = ad.split_slides(crops, [0.7, 0.1, 0.2], seed=0)
    assert set(split.values()) == {"train", "val", "test"}
    subset = [c for c in crops if c.slide in sorted(split)[:2]]
    manifest = ad.build(root, tmp_path, seed=0, cfg=_cfg(), crops=subset)
    assert sum(c["amibr_crops"] for c in manifest["counts"].values()) == len(subset)
    annotations = ad.read_annotations(tmp_path / "detection", "train") | \
        ad.read_annotations(tmp_path / "detection", "val") | ad.read_annotations(tmp_path / "detection", "test")
    assert sum(len(c) for c in annotations.values()) >= len(subset)
    image = np.asarray(Image.open(next(iter(annotations))))
    assert image.shape == (256, 256, 3) and image.std() > 10  # real tissue, not a blank canvas


@pytest.mark.parametrize("content, message", [("{broken", "is not valid JSON"), ("[1, 2]", "must hold a JSON object")])
def test_a_broken_annotations_file_is_one_input_error(tmp_path: Path, content: str, message: str):
    from midog.errors import InputError
    from training.evaluate_chain import load_split
    (tmp_path / "annotations.json").write_text(content)
    for read in (ad.read_annotations, load_split):
        with pytest.raises(InputError, match=f"detection set annotations {re.escape(str(tmp_path))}.* {message}"):
            read(tmp_path, "test")
