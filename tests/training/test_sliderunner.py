"""SlideRunner databases (MITOS_WSI_CCMCT / CMC layout) → the MIDOG++ index, and on to YOLO tiles."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
import tifffile

from midog.errors import InputError
from training.midogpp import ConvertConfig, convert
from training.sliderunner import category_of, load_sliderunner, read_classes, read_spots

# the tables as SlideRunner creates them (SlideRunner/dataAccess/database.py)
SCHEMA = [
    "CREATE TABLE `Annotations_label` (`uid` INTEGER PRIMARY KEY AUTOINCREMENT UNIQUE, `person` INTEGER, "
    "`class` INTEGER, `exact_id` INTEGER, `annoId` INTEGER)",
    "CREATE TABLE `Annotations_coordinates` (`uid` INTEGER PRIMARY KEY AUTOINCREMENT UNIQUE, `coordinateX` INTEGER, "
    "`coordinateY` INTEGER, `coordinateZ` INTEGER DEFAULT 0, `slide` INTEGER, `annoId` INTEGER, `orderIdx` INTEGER)",
    "CREATE TABLE `Annotations` (`uid` INTEGER PRIMARY KEY AUTOINCREMENT UNIQUE, `slide` INTEGER, `guid` TEXT, "
    "`lastModified` REAL DEFAULT 0, `deleted` INTEGER DEFAULT 0, `type` INTEGER, `agreedClass` INTEGER, "
    "`description` TEXT)",
    "CREATE TABLE `Classes` (`uid` INTEGER PRIMARY KEY AUTOINCREMENT UNIQUE, `name` TEXT, `color` TEXT)",
    "CREATE TABLE `Persons` (`uid` INTEGER PRIMARY KEY AUTOINCREMENT UNIQUE, `name` TEXT, "
    "`isExactUser` INTEGER DEFAULT 0)",
    "CREATE TABLE `Slides` (`uid` INTEGER PRIMARY KEY AUTOINCREMENT UNIQUE, `filename` TEXT, `width` INTEGER, "
    "`height` INTEGER, `directory` TEXT, `uuid` TEXT, `exactImageID` TEXT)",
]


def _database(path: Path, with_sizes: bool = True) -> Path:
    db = sqlite3.connect(path)
    for statement in SCHEMA:
        db.execute(statement)
    # class ids as in MITOS_WSI_CMC: 1 look-alike, 2 mitotic figure; plus a cell class that is not used
    db.executemany("INSERT INTO Classes (uid, name) VALUES (?, ?)",
                   [(1, "Mitotic figure lookalike"), (2, "Mitotic figure"), (3, "Granulocyte"), (4, "Tumor region")])
    db.executemany("INSERT INTO Slides (uid, filename, width, height) VALUES (?, ?, ?, ?)",
                   [(1, "a.tiff", 900 if with_sizes else None, 700 if with_sizes else None),
                    (2, "b.tiff", 600 if with_sizes else None, 600 if with_sizes else None)])

    def spot(uid: int, slide: int, cls: int, x: int, y: int, deleted: int = 0) -> None:
        db.execute("INSERT INTO Annotations (uid, slide, type, agreedClass, deleted) VALUES (?, ?, 1, ?, ?)",
                   (uid, slide, cls, deleted))
        db.execute("INSERT INTO Annotations_coordinates (coordinateX, coordinateY, slide, annoId, orderIdx) "
                   "VALUES (?, ?, ?, ?, 0)", (x, y, slide, uid))
        db.execute("INSERT INTO Annotations_label (person, class, annoId) VALUES (1, ?, ?)", (cls, uid))

    spot(1, 1, 2, 100, 120)
    spot(2, 1, 1, 400, 300)
    spot(3, 1, 3, 500, 500)            # granulocyte: not used
    spot(4, 1, 2, 600, 600, deleted=1)  # deleted: not used
    spot(5, 2, 2, 20, 580)             # box reaches outside the image
    # a polygon (tumour region): four coordinates, type 3, never a cell
    db.execute("INSERT INTO Annotations (uid, slide, type, agreedClass) VALUES (6, 1, 3, 4)")
    for i, (x, y) in enumerate([(0, 0), (800, 0), (800, 600), (0, 600)]):
        db.execute("INSERT INTO Annotations_coordinates (coordinateX, coordinateY, slide, annoId, orderIdx) "
                   "VALUES (?, ?, 1, 6, ?)", (x, y, i))
    db.commit()
    db.close()
    return path


def test_read_spots_keeps_live_spot_annotations_only(tmp_path: Path) -> None:
    path = _database(tmp_path / "MITOS_WSI_CMC_ODAEL_TR.sqlite")
    assert read_classes(path) == {1: "Mitotic figure lookalike", 2: "Mitotic figure", 3: "Granulocyte",
                                  4: "Tumor region"}
    slides, spots = read_spots(path)
    assert slides["filename"].tolist() == ["a.tiff", "b.tiff"]
    assert spots[["slide", "x", "y", "class_id"]].values.tolist() == [[1, 100, 120, 2], [1, 400, 300, 1],
                                                                      [1, 500, 500, 3], [2, 20, 580, 2]]


def test_class_names_map_to_midogpp_categories() -> None:
    assert category_of("Mitotic figure") == 1
    assert category_of("Mitotic figure lookalike") == 2 and category_of("Mitotic figure look-alike") == 2
    assert category_of("Non-mitotic figure") == 2
    assert category_of("Granulocyte") == 0 and category_of(None) == 0
    assert category_of("Granulocyte", negative=["granulocyte"]) == 2
    assert category_of("Mitosis-like figure", positive=["Mitosis-like figure"]) == 1


def test_load_sliderunner_builds_the_midogpp_index(tmp_path: Path) -> None:
    path = _database(tmp_path / "db.sqlite")
    index = load_sliderunner(path, tumour="canine mammary carcinoma")
    assert index.slides[["slide", "file_name", "width", "height", "tumour"]].values.tolist() == [
        [1, "a.tiff", 900, 700, "canine mammary carcinoma"], [2, "b.tiff", 600, 600, "canine mammary carcinoma"]]
    assert index.boxes.values.tolist() == [[1, 75, 95, 125, 145, 1], [1, 375, 275, 425, 325, 2],
                                           [2, -5, 555, 45, 605, 1]]
    only_b = load_sliderunner(path, tumour="x", slides=["b.tiff"])
    assert only_b.slides["file_name"].tolist() == ["b.tiff"] and len(only_b.boxes) == 1
    with pytest.raises(InputError, match="no slide"):
        load_sliderunner(path, tumour="x", slides=["c.tiff"])


def test_sizes_come_from_the_images_and_conversion_runs(tmp_path: Path) -> None:
    images = tmp_path / "WSI"
    images.mkdir()
    rng = np.random.default_rng(0)
    tifffile.imwrite(images / "a.tiff", rng.integers(150, 255, (700, 900, 3), dtype=np.uint8), photometric="rgb",
                     tile=(256, 256))
    tifffile.imwrite(images / "b.tiff", rng.integers(150, 255, (600, 600, 3), dtype=np.uint8), photometric="rgb")
    path = _database(tmp_path / "db.sqlite", with_sizes=False)
    with pytest.raises(InputError, match="no size"):
        load_sliderunner(path, tumour="x")
    index = load_sliderunner(path, tumour="canine cutaneous mast cell tumor", images=images)
    assert index.slides[["width", "height"]].values.tolist() == [[900, 700], [600, 600]]
    summary = convert(index, images, tmp_path / "yolo", ConvertConfig(ratios=(0.5, 0.0, 0.5)), progress=False)
    assert summary["slides"] == 2
    labels = [line for p in (tmp_path / "yolo" / "labels").rglob("*.txt") for line in p.read_text().splitlines()]
    assert {line.split()[0] for line in labels} == {"0", "1"}


def test_not_a_sliderunner_database(tmp_path: Path) -> None:
    other = tmp_path / "other.sqlite"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE t (x INTEGER)")
    db.commit()
    db.close()
    with pytest.raises(InputError, match="not a SlideRunner database"):
        read_spots(other)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(InputError, match="not an SQLite database"):
        read_spots(junk)
    with pytest.raises(InputError, match="not found"):
        read_spots(tmp_path / "missing.sqlite")
