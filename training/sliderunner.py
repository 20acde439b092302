"""Readers for SlideRunner SQLite databases: MITOS_WSI_CCMCT and MITOS_WSI_CMC (Bertram, Aubreville et al.).

Both datasets ship their labels as SlideRunner databases (`*.sqlite`, e.g. `MITOS_WSI_CCMCT_ODAEL.sqlite`,
`MITOS_WSI_CMC_CODAEL_TR.sqlite`): tables `Slides(uid, filename, width, height, ...)`, `Classes(uid, name, ...)`,
`Annotations(uid, slide, type, agreedClass, deleted, ...)` and `Annotations_coordinates(annoId, slide,
coordinateX, coordinateY, orderIdx, ...)`. Cells are *spot* annotations (type 1): one coordinate, the cell centre in
level-0 pixels. Areas and polygons (tumour regions) are other types and are not cells.

`load_sliderunner` turns a database into the same `MidogppIndex` that `training.midogpp` builds from MIDOG++
(50 px boxes around each centre, category 1 = mitotic figure, 2 = hard negative / look-alike), so the same
split, tiling and crop code serves all three datasets:

    index = load_sliderunner("MITOS_WSI_CCMCT_ODAEL.sqlite", tumour="canine cutaneous mast cell tumor",
                             images="WSI/")
    convert(index, "WSI/", "prepared/ccmct", ConvertConfig(tiles=TileConfig(empty_fraction=0.05)))

Classes are matched by name (case-insensitive), since their ids differ between databases: "mitotic figure" is
positive; names with "lookalike", "look-alike", "non-mitotic" or "hard negative" are hard negatives; other cell
classes (granulocytes, tumour cells, ...) are left out unless named in `positive`/`negative`.
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from midog.errors import InputError
from midog.roi_io import open_roi
from training.midogpp import HARD_NEGATIVE, MITOTIC_FIGURE, MidogppIndex

SPOT = 1
"""SlideRunner's AnnotationType.SPOT: a single point."""
POSITIVE_NAMES = ("mitotic figure", "mitotic figures", "mitosis")
NEGATIVE_MARKERS = ("lookalike", "look-alike", "look alike", "non-mitotic", "nonmitotic", "hard negative",
                    "not mitotic")
BOX_SIZE_PX = 50
"""Side of the box drawn around each centre, as in MIDOG++ and the datasets' own training code (radius 25)."""


def read_classes(path: str | os.PathLike[str]) -> dict[int, str]:
    """The database's class table, uid → name."""
    with closing(_connect(path)) as db:
        return {int(uid): str(name) for uid, name in db.execute("SELECT uid, name FROM Classes")}


def read_spots(path: str | os.PathLike[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(slides, spots): slides uid, filename, width, height; spots slide, annotation, x, y, class_id, class_name.

    Deleted annotations and everything that is not a spot are left out. A spot's class is its `agreedClass`
    (the label the experts agreed on).
    """
    with closing(_connect(path)) as db:
        slides = pd.read_sql_query("SELECT uid AS slide, filename, width, height FROM Slides ORDER BY uid", db)
        spots = pd.read_sql_query(
            "SELECT a.slide AS slide, a.uid AS annotation, c.coordinateX AS x, c.coordinateY AS y, "
            "a.agreedClass AS class_id, cl.name AS class_name "
            "FROM Annotations a JOIN Annotations_coordinates c ON c.annoId = a.uid "
            "LEFT JOIN Classes cl ON cl.uid = a.agreedClass "
            f"WHERE a.type = {SPOT} AND COALESCE(a.deleted, 0) = 0 ORDER BY a.slide, a.uid, c.orderIdx", db)
    spots = spots.drop_duplicates("annotation")  # a spot has one coordinate; keep the first if a tool wrote more
    return slides, spots.reset_index(drop=True)


def category_of(name: str | None, positive: Iterable[str] = (), negative: Iterable[str] = ()) -> int:
    """MIDOG++ category of a SlideRunner class name: 1 mitotic figure, 2 hard negative, 0 not used."""
    if name is None:
        return 0
    key = name.strip().lower()
    if key in {p.lower() for p in positive} or key in POSITIVE_NAMES:
        return MITOTIC_FIGURE
    if key in {n.lower() for n in negative} or any(marker in key for marker in NEGATIVE_MARKERS):
        return HARD_NEGATIVE
    return 0


def load_sliderunner(path: str | os.PathLike[str], tumour: str, images: str | os.PathLike[str] | None = None,
                     positive: Iterable[str] = (), negative: Iterable[str] = (),
                     slides: Iterable[str] | None = None) -> MidogppIndex:
    """A SlideRunner database as a `MidogppIndex` (one tumour type for all its slides).

    `images`: the folder of the WSIs; sizes missing from the database are read from there. `slides`: keep only
    these file names (e.g. the training slides of the dataset's own split). Slides without any used spot are
    kept: a slide whose experts found no mitotic figure is still a labelled slide.
    """
    table, spots = read_spots(path)
    positive, negative = tuple(positive), tuple(negative)
    if slides is not None:
        wanted = set(slides)
        unknown = wanted - set(table["filename"])
        if unknown:
            raise InputError(f"{Path(path).name} has no slide {sorted(unknown)[0]}")
        table = table[table["filename"].isin(wanted)]
    table = table.reset_index(drop=True)
    for i, row in table.iterrows():
        if pd.isna(row["width"]) or pd.isna(row["height"]) or not row["width"] or not row["height"]:
            if images is None:
                raise InputError(f"{Path(path).name} gives no size for {row['filename']}; pass the images folder")
            with open_roi(Path(images) / row["filename"]) as image:
                table.loc[i, ["width", "height"]] = [image.width, image.height]
    spots = spots[spots["slide"].isin(table["slide"])]
    categories = np.array([category_of(n, positive, negative) for n in spots["class_name"]], dtype=int)
    used = spots[categories > 0]
    half = BOX_SIZE_PX / 2
    boxes = pd.DataFrame({"slide": used["slide"].astype(int).to_numpy(),
                          "x1": used["x"].to_numpy(dtype=float) - half, "y1": used["y"].to_numpy(dtype=float) - half,
                          "x2": used["x"].to_numpy(dtype=float) + half, "y2": used["y"].to_numpy(dtype=float) + half,
                          "category": categories[categories > 0]})
    slides_df = pd.DataFrame({"slide": table["slide"].astype(int), "file_name": table["filename"].astype(str),
                              "width": table["width"].astype(int), "height": table["height"].astype(int),
                              "tumour": tumour, "scanner": "", "species": "", "official_split": ""})
    return MidogppIndex(slides=slides_df, boxes=boxes.reset_index(drop=True), unlabelled=[])


def _connect(path: str | os.PathLike[str]) -> sqlite3.Connection:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"SlideRunner database not found: {path}")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as err:
        db.close()
        raise InputError(f"{path.name} is not an SQLite database: {err}") from None
    missing = {"Slides", "Classes", "Annotations", "Annotations_coordinates"} - tables
    if missing:
        db.close()
        raise InputError(f"{path.name} is not a SlideRunner database (no table {sorted(missing)[0]})")
    return db
