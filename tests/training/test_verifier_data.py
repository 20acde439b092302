"""Verifier crops from (generated) MIDOG++ slides: positives, hard negatives, the detector's false positives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from midog.roi_io import open_roi
from midogpp_factory import DARK, PALE, write_fake_midogpp
from training.midogpp import load_midogpp, split_slides
from training.verifier_data import CropConfig, cut_crops, extract, false_positive_crops, false_positives, main


def test_false_positives_are_detections_far_from_every_mitotic_figure() -> None:
    gt = np.array([[100, 100, 150, 150], [400, 400, 450, 450]])
    pred = np.array([[105, 110, 155, 160],   # centre 10, 10 px off figure 0: a hit
                     [300, 300, 350, 350],   # far from both: false positive
                     [130, 100, 180, 150],   # 30 px off figure 0: on the radius, still a hit
                     [131, 100, 181, 150],   # 31 px off: false positive
                     [400, 400, 450, 450]])  # exact: a hit
    scores = np.array([0.9, 0.3, 0.5, 0.8, 0.7])
    assert false_positives(pred, gt, 30.0, scores).tolist() == [3, 1]  # by descending score
    assert false_positives(pred, gt, 30.0, scores, min_score=0.5).tolist() == [3]
    assert false_positives(pred, np.zeros((0, 4)), 30.0).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        false_positives(pred, gt, 30.0, scores[:2])


def test_crops_match_the_pipeline_and_false_positive_crops_show_no_figure(tmp_path: Path) -> None:
    fake = write_fake_midogpp(tmp_path, slides_per_tumour=1)
    ann = [a for a in fake.coco["annotations"] if a["image_id"] == 1]
    figures = np.array([a["bbox"] for a in ann if a["category_id"] == 1], dtype=float)
    with open_roi(fake.images / "001.tiff") as image:
        crops = cut_crops(image, figures, CropConfig())
        assert crops.shape == (len(figures), 64, 64, 3) and crops.dtype == np.uint8
        inside = [i for i, b in enumerate(figures) if b[0] >= 0]  # the border figure's crop is cut short
        assert all((np.abs(crops[i, 32, 32].astype(int) - DARK) < 30).all() for i in inside)
        far = np.array([[600, 20, 650, 70]], dtype=float)
        if np.hypot(*(((figures[:, :2] + figures[:, 2:]) / 2 - [625, 45]).T)).min() > 30:
            fp, idx = false_positive_crops(image, np.concatenate([figures, far]), np.r_[np.ones(len(figures)), 0.5],
                                           figures, CropConfig())
            assert idx.tolist() == [len(figures)] and fp.shape == (1, 64, 64, 3)


def test_extract_writes_the_train_verifier_layout_and_trains(tmp_path: Path) -> None:
    fake = write_fake_midogpp(tmp_path / "src", slides_per_tumour=5)
    index = load_midogpp(fake.annotations, fake.xvalidation)
    split = split_slides(index.slides, seed=0)
    train_slides = set(index.slides["slide"][split == "train"])
    # detections: one on each figure (hits) and one in a figure-free corner of every training slide
    rows = []
    for a in fake.coco["annotations"]:
        if a["image_id"] in train_slides and a["category_id"] == 1:
            rows.append({"slide": a["image_id"], "x1": a["bbox"][0] + 3, "y1": a["bbox"][1], "x2": a["bbox"][2] + 3,
                         "y2": a["bbox"][3], "score": 0.9})
    sizes = {im["id"]: (im["width"], im["height"]) for im in fake.coco["images"]}
    for slide in sorted(train_slides):
        centres = np.array([[(a["bbox"][0] + a["bbox"][2]) / 2, (a["bbox"][1] + a["bbox"][3]) / 2]
                            for a in fake.coco["annotations"] if a["image_id"] == slide])
        width, height = sizes[slide]
        free = next((x, y) for y in range(30, height - 30, 10) for x in range(30, width - 30, 10)
                    if np.hypot(*(centres - [x, y]).T).min() > 60)
        rows.append({"slide": slide, "x1": free[0] - 25.0, "y1": free[1] - 25.0, "x2": free[0] + 25.0,
                     "y2": free[1] + 25.0, "score": 0.4})
    detections = tmp_path / "dets.csv"
    pd.DataFrame(rows).to_csv(detections, index=False)
    out = tmp_path / "crops"
    assert main(["--annotations", str(fake.annotations), "--xvalidation", str(fake.xvalidation), "--images",
                 str(fake.images), "--out", str(out), "--detections", str(detections)]) == 0
    counts = json.loads((out / "crops.json").read_text())["counts"]

    def expected(slides: set[int], category: int) -> int:
        return sum(1 for a in fake.coco["annotations"] if a["image_id"] in slides and a["category_id"] == category)

    val_slides = set(index.slides["slide"][split == "val"])
    assert counts["train"]["mitotic_figure"] == expected(train_slides, 1) > 0
    assert counts["train"]["hard_negative"] == expected(train_slides, 2) > 0
    assert counts["val"]["mitotic_figure"] == expected(val_slides, 1) > 0
    assert counts["train"]["false_positive"] == len(train_slides)  # only the corner detections
    assert counts["val"]["false_positive"] == 0
    for folder, n in counts["train"].items():
        files = sorted((out / "train" / folder).glob("*.png"))
        assert len(files) == n
        assert all(int(f.name[:3]) in train_slides for f in files)  # no crop from another split's slide
    # a hard negative's crop is pale in the middle, a mitotic figure's dark
    pos = np.asarray(Image.open(sorted((out / "train" / "mitotic_figure").glob("*.png"))[-1]))
    neg = np.asarray(Image.open(sorted((out / "train" / "hard_negative").glob("*.png"))[-1]))
    assert pos.shape == (64, 64, 3) and pos[32, 32].astype(int).sum() < sum(DARK) + 60
    assert abs(neg[32, 32].astype(int).sum() - sum(PALE)) < 60
    assert not (out / "test").exists()

    from training.train_verifier import main as train_main

    config = Path(__file__).resolve().parents[2] / "training" / "configs" / "verifier.yaml"
    assert train_main(["--data", str(out), "--config", str(config), "--out", str(tmp_path / "v.pt"),
                       "--run-dir", str(tmp_path / "run"), "--arch", "test_convnext", "--max-steps", "1"]) == 0


def test_detections_need_their_columns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = write_fake_midogpp(tmp_path / "src", slides_per_tumour=1)
    bad = tmp_path / "dets.csv"
    bad.write_text("slide,x,y\n1,2,3\n")
    code = main(["--annotations", str(fake.annotations), "--xvalidation", str(fake.xvalidation), "--images",
                 str(fake.images), "--out", str(tmp_path / "o"), "--detections", str(bad)])
    assert code == 2 and "lacks columns" in capsys.readouterr().err


def test_extract_splits_slides_with_the_ratios_given(tmp_path: Path) -> None:
    from training.verifier_data import extract

    fake = write_fake_midogpp(tmp_path / "src", slides_per_tumour=5)
    index = load_midogpp(fake.annotations, fake.xvalidation)
    ratios = (0.4, 0.2, 0.4)
    expected = split_slides(index.slides, ratios, 0)
    assert not expected.equals(split_slides(index.slides, seed=0))  # these ratios move slides between splits
    counts = extract(index, fake.images, tmp_path / "crops", ("train",), 0, ratios=ratios, progress=False)
    n_train_figures = sum(1 for a in fake.coco["annotations"] if a["category_id"] == 1
                          and a["image_id"] in set(index.slides["slide"][expected == "train"]))
    assert counts["train"]["mitotic_figure"] == n_train_figures


def test_extract_refuses_missing_images(tmp_path: Path) -> None:
    fake = write_fake_midogpp(tmp_path / "src", slides_per_tumour=2)
    index = load_midogpp(fake.annotations, fake.xvalidation)
    (fake.images / "001.tiff").unlink()
    from midog.errors import InputError

    with pytest.raises(InputError, match="001.tiff"):
        extract(index, fake.images, tmp_path / "o", splits=("train", "val", "test"), progress=False)


def test_detector_false_positives_are_mined_with_the_pipeline_stages(tmp_path: Path) -> None:
    from tests.roi_factory import tiny_detector

    fake = write_fake_midogpp(tmp_path / "src", slides_per_tumour=5)
    detector = tiny_detector(tmp_path / "w" / "detector.pt", class_bias=5.0)  # proposes boxes everywhere
    out = tmp_path / "crops"
    assert main(["--annotations", str(fake.annotations), "--xvalidation", str(fake.xvalidation), "--images",
                 str(fake.images), "--out", str(out), "--detector", str(detector), "--max-fp-per-slide", "3"]) == 0
    detections = pd.read_csv(out / "detections.csv")
    index = load_midogpp(fake.annotations, fake.xvalidation)
    split = split_slides(index.slides, seed=0)
    allowed = set(index.slides["slide"][split.isin(["train", "val"]).to_numpy()])
    assert len(detections) > 0 and set(detections["slide"]) <= allowed
    assert (detections["score"] >= 0.2).all()  # the pipeline's proposal confidence
    expected = 0
    for slide, group in detections.groupby("slide"):
        truth = index.boxes[(index.boxes["slide"] == slide) & (index.boxes["category"] == 1)]
        fp = false_positives(group[["x1", "y1", "x2", "y2"]].to_numpy(), truth[["x1", "y1", "x2", "y2"]].to_numpy(),
                             30.0, group["score"].to_numpy())
        expected += min(len(fp), 3)
    counts = json.loads((out / "crops.json").read_text())["counts"]
    assert counts["train"]["false_positive"] + counts["val"]["false_positive"] == expected > 0
