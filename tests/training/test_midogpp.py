"""MIDOG++ → YOLO tiles: the real annotations (counts, split) and a full conversion of generated images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from midog.errors import InputError
from midogpp_factory import DARK, DISC_RADIUS, write_fake_midogpp
from tests.conftest import shared_path
from training.midogpp import (
    ConvertConfig,
    TileConfig,
    annotation_counts,
    clip_boxes,
    convert,
    load_midogpp,
    plan_tiles,
    split_counts,
    split_slides,
    tile_origins,
)
from training.prepare_midogpp import main as prepare_main

# ---------------------------------------------------------------------------------------------------- pure parts


def test_tile_origins_follow_the_pipeline_and_end_on_the_border() -> None:
    assert tile_origins(1100, 512, 0.2) == [0, 410, 588]
    assert tile_origins(512, 512, 0.2) == [0]
    assert tile_origins(300, 512, 0.2) == [0]
    assert tile_origins(513, 512, 0.2) == [0, 1]
    origins = tile_origins(7215, 512, 0.2)
    assert len(origins) == 18 and origins[0] == 0 and origins[-1] == 7215 - 512
    assert max(np.diff(origins)) == 410  # neighbours share int(0.2 * 512) = 102 px


def test_clip_boxes_keeps_boxes_at_least_half_visible() -> None:
    boxes = np.array([[100, 100, 150, 150],    # inside
                      [490, 100, 540, 150],    # 22 of 50 px inside the tile [0, 512): dropped
                      [480, 200, 530, 250],    # 32 of 50 px inside: kept, clipped to 512
                      [-27, 300, 23, 350],     # cut by the image border: 23 px in the image, all of it in the tile
                      [600, 600, 650, 650]])   # outside
    clipped, keep = clip_boxes(boxes, (1000, 1000), (0, 0, 512, 512), min_visible=0.5)
    assert keep.tolist() == [0, 2, 3]
    assert clipped.tolist() == [[100, 100, 150, 150], [480, 200, 512, 250], [0, 300, 23, 350]]
    shifted, keep = clip_boxes(boxes, (1000, 1000), (400, 100, 512, 512), min_visible=0.5)
    # window x 400-912, y 100-612: box 4 shows only 12 of its 50 rows → dropped
    assert keep.tolist() == [1, 2] and shifted.tolist() == [[90, 0, 140, 50], [80, 100, 130, 150]]


def test_split_counts_use_largest_remainder() -> None:
    assert split_counts(150, (0.7, 0.1, 0.2)) == [105, 15, 30]
    assert split_counts(55, (0.7, 0.1, 0.2)) == [39, 5, 11]
    assert split_counts(44, (0.7, 0.1, 0.2)) == [31, 4, 9]
    assert split_counts(7, (0.7, 0.1, 0.2)) == [5, 1, 1]
    assert split_counts(5, (0.7, 0.1, 0.2)) == [3, 1, 1]  # largest remainder alone would give [4, 0, 1]
    assert split_counts(2, (0.7, 0.1, 0.2)) == [1, 0, 1]  # too few to fill every split
    assert split_counts(10, (0.8, 0.2, 0.0)) == [8, 2, 0]


def test_yolo_lines_normalise_by_the_tile_and_drop_hard_negatives_in_one_class_mode() -> None:
    plans = plan_tiles(600, 400, np.array([[10, 20, 60, 70], [300, 300, 350, 350]]), np.array([1, 2]),
                       TileConfig(tile_size=512, overlap=0.2))
    first = plans[0]
    assert (first.x0, first.y0, first.width, first.height) == (0, 0, 512, 400)
    assert first.yolo_lines(2) == ["0 0.068359 0.112500 0.097656 0.125000",
                                   "1 0.634766 0.812500 0.097656 0.125000"]
    assert first.yolo_lines(1) == ["0 0.068359 0.112500 0.097656 0.125000"]


# ---------------------------------------------------------------------------------------------------- real annotations

@pytest.fixture(scope="module")
def real_index():
    root = shared_path("midogpp")
    return load_midogpp(root / "MIDOG++.json", root / "datasets_xvalidation.csv")


REAL_SLIDES_PER_TUMOUR = {"human breast cancer": 150, "canine soft tissue sarcoma": 100, "canine lymphoma": 55,
                          "human neuroendocrine tumor": 55, "canine cutaneous mast cell tumor": 50,
                          "human melanoma": 49, "canine lung cancer": 44}


def test_real_midogpp_annotations_are_read_completely(real_index) -> None:
    slides, boxes = real_index.slides, real_index.boxes
    assert len(slides) == 503 and real_index.unlabelled == list(range(151, 201))
    assert slides["tumour"].value_counts().to_dict() == REAL_SLIDES_PER_TUMOUR
    assert boxes["category"].value_counts().to_dict() == {1: 11937, 2: 14349}
    assert ((boxes["x2"] - boxes["x1"]) == 50).all() and ((boxes["y2"] - boxes["y1"]) == 50).all()
    assert set(slides["scanner"]) == {"Hamamatsu XR", "Hamamatsu S360", "Aperio CS2", "3D Histech"}
    per_tumour = boxes.merge(slides, on="slide").groupby(["tumour", "category"]).size()
    assert per_tumour[("human breast cancer", 1)] == 1721 and per_tumour[("canine lymphoma", 1)] == 3959


def test_real_split_is_7_1_2_per_tumour_type_by_slide(real_index) -> None:
    split = split_slides(real_index.slides, seed=0)
    assert split.notna().all() and set(split) == {"train", "val", "test"}
    slides = real_index.slides.assign(split=split.to_numpy())
    assert not slides["slide"].duplicated().any()  # one row per slide, so one split per slide
    for tumour, group in slides.groupby("tumour"):
        counts = group["split"].value_counts()
        n = len(group)
        assert [counts.get(s, 0) for s in ("train", "val", "test")] == split_counts(n, (0.7, 0.1, 0.2))
        for name, ratio in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
            assert abs(counts[name] - ratio * n) < 1, (tumour, name)
    assert split_slides(real_index.slides, seed=0).equals(split)  # deterministic
    assert not split_slides(real_index.slides, seed=1).equals(split)
    counts = annotation_counts(real_index, split)
    totals = {cls: sum(v.values()) for cls, v in counts["annotations"].items()}
    assert totals == {"mitotic figure": 11937, "hard negative": 14349}
    assert sum(sum(v.values()) for v in counts["slides_by_tumour"].values()) == 503
    # each split gets roughly its share of the mitotic figures (slides differ a lot in count)
    mf = counts["annotations"]["mitotic figure"]
    assert 0.6 < mf["train"] / 11937 < 0.8 and 0.05 < mf["val"] / 11937 < 0.15 and 0.12 < mf["test"] / 11937 < 0.28


def test_every_real_annotation_is_whole_in_some_tile(real_index) -> None:
    """With 20 % overlap (102 px) every 50 px box fits in one tile: tiling loses no figure."""
    cfg = TileConfig()
    merged = real_index.boxes.merge(real_index.slides[["slide", "width", "height"]], on="slide")
    for axis, (lo, hi, size) in {"x": ("x1", "x2", "width"), "y": ("y1", "y2", "height")}.items():
        for length, group in merged.groupby(size):
            origins = np.array(tile_origins(int(length), cfg.tile_size, cfg.overlap))
            a = np.clip(group[lo].to_numpy(), 0, length)[:, None]
            b = np.clip(group[hi].to_numpy(), 0, length)[:, None]
            inside = (origins[None] <= a) & (b <= origins[None] + cfg.tile_size)
            assert inside.any(axis=1).all(), (axis, length)
    slide = real_index.slides.iloc[0]
    own = real_index.boxes[real_index.boxes["slide"] == slide["slide"]]
    plans = plan_tiles(int(slide["width"]), int(slide["height"]), own[["x1", "y1", "x2", "y2"]].to_numpy(),
                       own["category"].to_numpy(), cfg)
    assert len(plans) == 18 * 13  # 7215 x 5412 px
    assert sum(len(p.boxes) for p in plans) >= len(own)


def test_prepare_dry_run_prints_the_real_counts(capsys: pytest.CaptureFixture[str]) -> None:
    root = shared_path("midogpp")
    assert prepare_main(["--annotations", str(root / "MIDOG++.json"), "--xvalidation",
                         str(root / "datasets_xvalidation.csv"), "--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["slides"] == 503 and printed["slides_by_tumour"]["human breast cancer"] == \
        {"train": 105, "val": 15, "test": 30}


# ---------------------------------------------------------------------------------------------------- generated images

def _labels(path: Path) -> np.ndarray:
    text = path.read_text().strip()
    return np.array([[float(v) for v in line.split()] for line in text.splitlines()]) if text else np.zeros((0, 5))


def test_tiles_of_plain_and_compressed_tiffs_hold_the_image_pixels(tmp_path: Path) -> None:
    """Odd slide ids are uncompressed, even ones deflate-compressed in 32-row strips; both are streamed."""
    fake = write_fake_midogpp(tmp_path / "src", slides_per_tumour=2)
    index = load_midogpp(fake.annotations, fake.xvalidation)
    convert(index, fake.images, tmp_path / "yolo", progress=False)
    for name in ("001", "002"):
        whole = np.asarray(Image.open(fake.images / f"{name}.tiff"))
        tiles = list((tmp_path / "yolo" / "images").rglob(f"{name}_*.png"))
        assert tiles
        for tile in tiles:
            _, x0, y0 = (int(v) for v in tile.stem.split("_"))
            pixels = np.asarray(Image.open(tile))
            assert np.array_equal(pixels, whole[y0:y0 + pixels.shape[0], x0:x0 + pixels.shape[1]])


def test_full_conversion_of_generated_midogpp(tmp_path: Path) -> None:
    fake = write_fake_midogpp(tmp_path / "src")
    out = tmp_path / "yolo"
    index = load_midogpp(fake.annotations, fake.xvalidation)
    assert len(index.slides) == 20 and index.unlabelled == [21, 22]
    summary = convert(index, fake.images, out, ConvertConfig(seed=0), progress=False)

    slides = pd.read_csv(out / "slides.csv")
    assert len(slides) == 20 and slides.groupby("tumour")["split"].value_counts().to_dict() == {
        (t, s): n for t in ("canine lymphoma", "human breast cancer") for s, n in (("train", 7), ("val", 1),
                                                                                   ("test", 2))}
    n_tiles = 0
    for row in slides.itertuples():
        expected = len(tile_origins(row.width, 512, 0.2)) * len(tile_origins(row.height, 512, 0.2))
        tiles = sorted((out / "images" / row.split).glob(f"{row.slide:03d}_*.png"))
        assert len(tiles) == row.tiles == expected
        for other in {"train", "val", "test"} - {row.split}:  # no slide in two splits
            assert not list((out / "images" / other).glob(f"{row.slide:03d}_*"))
        n_tiles += expected
    assert sum(v["tiles"] for v in summary["tiles"].values()) == n_tiles
    # a second preparation into the same folder (another seed) would mix two splits: refused, nothing written
    before = sorted(p.name for p in (out / "images" / "train").iterdir())
    with pytest.raises(InputError, match="already holds a prepared dataset"):
        convert(index, fake.images, out, ConvertConfig(seed=1), progress=False)
    assert sorted(p.name for p in (out / "images" / "train").iterdir()) == before

    coco_boxes = {}
    for ann in fake.coco["annotations"]:
        coco_boxes.setdefault(ann["image_id"], []).append(ann)
    found_clipped = found_border = 0
    for split in ("train", "val", "test"):
        for image_path in (out / "images" / split).glob("*.png"):
            labels = _labels(out / "labels" / split / f"{image_path.stem}.txt")
            pixels = np.asarray(Image.open(image_path))
            h, w = pixels.shape[:2]
            slide, x0, y0 = (int(v) for v in image_path.stem.split("_"))
            assert (w, h) == (min(512, slides.set_index("slide").loc[slide, "width"] - x0),
                              min(512, slides.set_index("slide").loc[slide, "height"] - y0))
            # every label is inside its tile, normalised, and a mitotic label sits on a dark disc
            assert np.all((labels[:, 1:] >= 0) & (labels[:, 1:] <= 1))
            for cls, cx, cy, bw, bh in labels:
                x1, x2 = (cx - bw / 2) * w, (cx + bw / 2) * w
                y1, y2 = (cy - bh / 2) * h, (cy + bh / 2) * h
                assert x1 >= -1e-3 and y1 >= -1e-3 and x2 <= w + 1e-3 and y2 <= h + 1e-3
                full = abs(x2 - x1 - 50) < 0.01 and abs(y2 - y1 - 50) < 0.01
                found_clipped += not full
                found_border += x1 < 1e-3 or x2 > w - 1e-3
                if full:
                    centre = pixels[int(round((y1 + y2) / 2)), int(round((x1 + x2) / 2))]
                    assert (np.abs(centre.astype(int) - DARK) < 30).all() == (cls == 0)
            # every annotation whose disc lies well inside this tile is labelled, with its class
            for ann in coco_boxes.get(slide, []):
                cx = (ann["bbox"][0] + ann["bbox"][2]) / 2 - x0
                cy = (ann["bbox"][1] + ann["bbox"][3]) / 2 - y0
                if 25 <= cx <= w - 25 and 25 <= cy <= h - 25:
                    d = np.hypot(labels[:, 1] * w - cx, labels[:, 2] * h - cy) if len(labels) else np.array([99.0])
                    assert d.min() < 0.01
                    assert labels[int(np.argmin(d)), 0] == ann["category_id"] - 1
    assert found_clipped > 0 and found_border > 0  # the generated data did exercise clipping

    # the untiled images and their figure centres, for scoring the whole chain (training.evaluate_chain)
    chain = json.loads((out / "chain" / "annotations.json").read_text())
    assert len(chain["images"]) == 20
    first = chain["images"][str((fake.images / "001.tiff").resolve())]
    assert first["split"] == slides.set_index("slide").loc[1, "split"]
    assert first["slide"] == "human breast cancer/1"
    assert len(first["figures"]) == sum(1 for a in coco_boxes[1] if a["category_id"] == 1)
    assert first["figures"][0] == {"x": 5.0, "y": (coco_boxes[1][0]["bbox"][1] + 25.0)}
    from training.evaluate_chain import load_split

    test_set = load_split(out / "chain", "test")
    assert sorted(p.name for p in test_set.images) == sorted(f"{s:03d}.tiff" for s in slides["slide"][
        slides["split"] == "test"])
    assert all(p.is_file() for p in test_set.images)

    # the real dark pixels: the disc of every mitotic figure is inside the tile that labels it
    assert summary["annotations"]["mitotic figure"]["train"] + summary["annotations"]["mitotic figure"]["val"] + \
        summary["annotations"]["mitotic figure"]["test"] == sum(
            1 for a in fake.coco["annotations"] if a["category_id"] == 1)
    assert DISC_RADIUS < 25


def test_data_yaml_is_accepted_by_ultralytics(tmp_path: Path) -> None:
    from ultralytics.data.dataset import YOLODataset
    from ultralytics.data.utils import check_det_dataset

    fake = write_fake_midogpp(tmp_path / "src", slides_per_tumour=5)
    out = tmp_path / "yolo"
    assert prepare_main(["--annotations", str(fake.annotations), "--xvalidation", str(fake.xvalidation),
                         "--images", str(fake.images), "--out", str(out), "--classes", "1"]) == 0
    data = check_det_dataset(str(out / "data.yaml"))
    assert data["nc"] == 1 and data["names"] == {0: "mitotic figure"}
    dataset = YOLODataset(img_path=data["train"], data=data, task="detect", imgsz=512, augment=False)
    instances = sum(len(label["cls"]) for label in dataset.labels)
    written = sum(len(_labels(p)) for p in (out / "labels" / "train").glob("*.txt"))
    assert instances == written > 0
    assert all(set(label["cls"].ravel().tolist()) <= {0.0} for label in dataset.labels)


def test_two_class_conversion_with_jpg_and_empty_tile_sampling(tmp_path: Path) -> None:
    fake = write_fake_midogpp(tmp_path / "src", slides_per_tumour=5)
    index = load_midogpp(fake.annotations, fake.xvalidation)
    cfg = ConvertConfig(tiles=TileConfig(empty_fraction=0.0), image_format="jpg", workers=2)
    summary = convert(index, fake.images, tmp_path / "yolo", cfg, progress=False)
    labels = [p for p in (tmp_path / "yolo" / "labels").rglob("*.txt")]
    assert labels and all(p.read_text().strip() for p in labels)  # no empty tile kept
    assert {int(line.split()[0]) for p in labels for line in p.read_text().splitlines()} == {0, 1}
    assert len(list((tmp_path / "yolo" / "images").rglob("*.jpg"))) == len(labels)
    assert sum(v["empty_tiles"] for v in summary["tiles"].values()) == 0
    assert "1: hard negative" in (tmp_path / "yolo" / "data.yaml").read_text()


def test_malformed_inputs_are_clear_errors(tmp_path: Path) -> None:
    fake = write_fake_midogpp(tmp_path / "src", slides_per_tumour=2)
    coco = json.loads(fake.annotations.read_text())
    coco["annotations"][0]["bbox"] = [10, 10, 60]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(coco))
    with pytest.raises(InputError, match=r"\[x1, y1, x2, y2\]"):
        load_midogpp(bad, fake.xvalidation)
    comma = tmp_path / "comma.csv"
    comma.write_text(fake.xvalidation.read_text().replace(";", ","))
    with pytest.raises(InputError, match="Slide"):
        load_midogpp(fake.annotations, comma)
    index = load_midogpp(fake.annotations, fake.xvalidation)
    (fake.images / "003.tiff").unlink()
    with pytest.raises(InputError, match="003.tiff"):
        convert(index, fake.images, tmp_path / "out", progress=False)
