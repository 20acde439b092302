"""MIDOG++ → a YOLO dataset of 512 × 512 tiles: annotations, slide-level split, tile plan, tile reader, writer.

MIDOG++ as published (Aubreville et al. 2023): `MIDOG++.json` in COCO style (553 images `NNN.tiff`, each with
`width`, `height`, `tumor_type`; annotations with `bbox` = [x1, y1, x2, y2] — corners, not COCO's x, y, w, h —
of 50 px around each cell, `category_id` 1 = mitotic figure, 2 = hard negative, i.e. a look-alike the experts
rejected) and `datasets_xvalidation.csv` (`;`-separated: Slide;Dataset;Tumor;Scanner;Origin;Species). 50 images
(151–200, breast cancer) carry no annotation and are not in the CSV: they were never labelled and are left out,
since using them would teach the detector that their mitotic figures are background.

The conversion is four steps, each testable alone:

1. `load_midogpp`: annotations + CSV → a table of slides (tumour type from the CSV) and a table of boxes.
2. `split_slides`: a deterministic slide-level train/val/test split, 7:1:2 within each tumour type.
3. `plan_tiles`: a pure function of the image size and its boxes → tile origins (the pipeline's own
   `midog.tiling` layout: 20 % overlap, the last tile ends on the border) and each tile's boxes, clipped at the
   tile border.
4. `convert`: reads each image one band of tile rows at a time (`midog.roi_io.open_roi`, the pipeline's reader,
   streaming TIFF strips/tiles: never more than one image, and by default only a band of it, in memory) and writes `images/{split}/*.png`, `labels/{split}/*.txt`,
   `data.yaml`, `slides.csv` and `summary.json`.

Clipping rule: a box is first cut to the image (MIDOG++ boxes of cells on the border reach outside it), then to
the tile; it is kept when the visible part is at least `min_visible` (default 0.5) of the in-image box's area.
With 20 % overlap (102 px) and 50 px boxes every cell is whole in at least one tile, so dropping the slivers
costs no figure, and a detector is not asked to fire on a quarter of a cell that the next tile shows whole.
"""

from __future__ import annotations

import csv
import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from midog.errors import InputError
from midog.progress import progress_iter
from midog.roi_io import RoiImage, open_roi
from midog.tiling import axis_origins

MITOTIC_FIGURE, HARD_NEGATIVE = 1, 2
"""MIDOG++ category ids."""
CLASS_NAMES = {2: ["mitotic figure", "hard negative"], 1: ["mitotic figure"]}
"""YOLO class names by number of classes; class 0 is always the mitotic figure."""
SPLITS = ("train", "val", "test")
CSV_COLUMNS = ("Slide", "Tumor")


# ---------------------------------------------------------------------------------------------------- step 1

@dataclass
class MidogppIndex:
    slides: pd.DataFrame
    """One row per labelled slide: slide (int id), file_name, width, height, tumour, scanner, species,
    official_split (the CSV's Dataset column)."""
    boxes: pd.DataFrame
    """One row per annotation: slide, x1, y1, x2, y2 (image pixels), category (1 mitotic figure, 2 hard neg)."""
    unlabelled: list[int] = field(default_factory=list)
    """Image ids in the JSON that the CSV does not list (left out)."""


def load_midogpp(annotations: str | os.PathLike[str], xvalidation: str | os.PathLike[str]) -> MidogppIndex:
    """Read and check `MIDOG++.json` and `datasets_xvalidation.csv`; malformed input → InputError."""
    annotations, xvalidation = Path(annotations), Path(xvalidation)
    for path in (annotations, xvalidation):
        if not path.is_file():
            raise InputError(f"MIDOG++ file not found: {path}")
    try:
        coco = json.loads(annotations.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{annotations} is not valid JSON: {err}") from None
    if not isinstance(coco, dict) or not {"images", "annotations"} <= set(coco):
        raise InputError(f"{annotations} is not a COCO file (needs 'images' and 'annotations')")
    images = pd.DataFrame(coco["images"])
    missing = {"id", "file_name", "width", "height"} - set(images.columns)
    if len(images) == 0 or missing:
        raise InputError(f"{annotations}: images lack {sorted(missing) or 'entries'}")
    boxes = _boxes_table(coco["annotations"], set(images["id"]), annotations)

    table = pd.read_csv(xvalidation, sep=";")
    if not set(CSV_COLUMNS) <= set(table.columns):
        raise InputError(f"{xvalidation} lacks columns {sorted(set(CSV_COLUMNS) - set(table.columns))} "
                         f"(expected ';'-separated {';'.join(CSV_COLUMNS)};...)")
    if table["Slide"].duplicated().any():
        raise InputError(f"{xvalidation} lists slide {int(table['Slide'][table['Slide'].duplicated()].iloc[0])} twice")
    unknown = sorted(set(table["Slide"]) - set(images["id"]))
    if unknown:
        raise InputError(f"{xvalidation} lists slides that {annotations.name} lacks, e.g. {unknown[:3]}")
    table = table.rename(columns={"Slide": "slide", "Tumor": "tumour", "Scanner": "scanner", "Species": "species",
                                  "Dataset": "official_split"})
    slides = images.rename(columns={"id": "slide"})[["slide", "file_name", "width", "height"]].merge(
        table[[c for c in ("slide", "tumour", "scanner", "species", "official_split") if c in table.columns]],
        on="slide", how="inner").sort_values("slide").reset_index(drop=True)
    slides["scanner"] = slides.get("scanner", pd.Series("", index=slides.index)).astype(str).str.replace(
        "Hamammatsu", "Hamamatsu")  # a typo in the published CSV splits one scanner in two
    unlabelled = sorted(set(images["id"]) - set(slides["slide"]))
    orphan = boxes["slide"].isin(unlabelled)
    if orphan.any():
        raise InputError(f"{annotations}: image {int(boxes['slide'][orphan].iloc[0])} has annotations but no row in "
                         f"{xvalidation.name}, so no tumour type")
    return MidogppIndex(slides=slides, boxes=boxes.reset_index(drop=True), unlabelled=[int(i) for i in unlabelled])


def _boxes_table(annotations: list[dict], image_ids: set[int], source: Path) -> pd.DataFrame:
    rows = []
    for ann in annotations:
        bbox = ann.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise InputError(f"{source}: annotation {ann.get('id')} has bbox {bbox!r}, expected [x1, y1, x2, y2]")
        x1, y1, x2, y2 = (float(v) for v in bbox)
        if x2 <= x1 or y2 <= y1:
            raise InputError(f"{source}: annotation {ann.get('id')} has an empty bbox {bbox} ([x1, y1, x2, y2])")
        if ann.get("category_id") not in (MITOTIC_FIGURE, HARD_NEGATIVE):
            raise InputError(f"{source}: annotation {ann.get('id')} has category {ann.get('category_id')!r}; "
                             f"expected 1 (mitotic figure) or 2 (hard negative)")
        if ann.get("image_id") not in image_ids:
            raise InputError(f"{source}: annotation {ann.get('id')} refers to unknown image {ann.get('image_id')}")
        rows.append((int(ann["image_id"]), x1, y1, x2, y2, int(ann["category_id"])))
    return pd.DataFrame(rows, columns=["slide", "x1", "y1", "x2", "y2", "category"])


# ---------------------------------------------------------------------------------------------------- step 2

def split_counts(n: int, ratios: Sequence[float]) -> list[int]:
    """`n` items divided in `ratios` by largest remainder (ties go to the earlier split); sums to `n`.

    When there are enough items, every split with a non-zero ratio gets at least one (taken from the largest), so
    each tumour type is seen in validation and test even when it has only a handful of slides.
    """
    total = float(sum(ratios))
    raw = [n * r / total for r in ratios]
    counts = [math.floor(v) for v in raw]
    order = sorted(range(len(ratios)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    if n >= sum(1 for r in ratios if r > 0):
        for i, r in enumerate(ratios):
            if r > 0 and counts[i] == 0:
                counts[int(np.argmax(counts))] -= 1
                counts[i] = 1
    return counts


SPLIT_RATIOS = (0.7, 0.1, 0.2)
"""Default train/val/test slide split; the YOLO dataset and the verifier crops must use the same (and the same seed)."""


def split_slides(slides: pd.DataFrame, ratios: Sequence[float] = SPLIT_RATIOS, seed: int = 0) -> pd.Series:
    """Split name (train/val/test) of every slide, indexed like `slides`: 7:1:2 within each tumour type.

    Deterministic: tumour types in sorted order, each one's slides (sorted by id) permuted by one seeded
    generator. A slide is one image, so no slide can land in two splits.
    """
    if len(ratios) != len(SPLITS) or min(ratios) < 0 or sum(ratios) <= 0:
        raise ValueError(f"ratios must be three non-negative numbers, got {ratios}")
    rng = np.random.default_rng(seed)
    split = pd.Series("", index=slides.index, dtype=object)
    for tumour in sorted(slides["tumour"].unique()):
        members = slides.index[slides["tumour"] == tumour]
        members = members[np.argsort(slides.loc[members, "slide"].to_numpy(), kind="stable")]
        members = members[rng.permutation(len(members))]
        start = 0
        for name, count in zip(SPLITS, split_counts(len(members), ratios)):
            split.loc[members[start:start + count]] = name
            start += count
    return split


# ---------------------------------------------------------------------------------------------------- step 3

def tile_origins(length: int, tile: int, overlap: float) -> list[int]:
    """Tile origins along one axis, exactly as the pipeline cuts images at inference (`midog.tiling`): steps of
    `tile - int(overlap * tile)` px, the last tile moved inward to end on the border, one origin (0) for a side
    shorter than a tile (whose training tile is then cut short rather than padded)."""
    return axis_origins(length, tile, overlap)


@dataclass
class TileConfig:
    tile_size: int = 512
    overlap: float = 0.2
    min_visible: float = 0.5
    """Keep a clipped box when at least this fraction of its in-image area lies inside the tile."""
    classes: int = 2
    """2: mitotic figure (0) and hard negative (1); 1: mitotic figures only, hard negatives become background."""
    empty_fraction: float = 1.0
    """Fraction of tiles without any visible annotation that are kept (seeded per slide)."""


@dataclass
class TilePlan:
    x0: int
    y0: int
    width: int
    height: int
    boxes: np.ndarray
    """(K, 4) float [x1, y1, x2, y2] in tile pixels, clipped to the tile."""
    categories: np.ndarray
    """(K,) MIDOG++ category ids of `boxes`."""

    def yolo_lines(self, classes: int) -> list[str]:
        """`class cx cy w h`, normalised by the tile size; hard negatives dropped in one-class mode."""
        lines = []
        for (x1, y1, x2, y2), cat in zip(self.boxes, self.categories):
            if classes == 1 and cat != MITOTIC_FIGURE:
                continue
            cls = 0 if cat == MITOTIC_FIGURE else 1
            lines.append(f"{cls} {(x1 + x2) / 2 / self.width:.6f} {(y1 + y2) / 2 / self.height:.6f} "
                         f"{(x2 - x1) / self.width:.6f} {(y2 - y1) / self.height:.6f}")
        return lines


def clip_boxes(boxes: np.ndarray, image_size: tuple[int, int], window: tuple[int, int, int, int],
               min_visible: float) -> tuple[np.ndarray, np.ndarray]:
    """Boxes [x1, y1, x2, y2] (image pixels) → (boxes in window pixels clipped to it, indices of those kept).

    `image_size` = (width, height); `window` = (x0, y0, width, height). See the module docstring for the rule.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    width, height = image_size
    inside = np.clip(boxes, 0, [width, height, width, height])
    x0, y0, w, h = window
    clipped = np.clip(inside, [x0, y0, x0, y0], [x0 + w, y0 + h, x0 + w, y0 + h])
    area_inside = (inside[:, 2] - inside[:, 0]) * (inside[:, 3] - inside[:, 1])
    area_clipped = np.clip(clipped[:, 2] - clipped[:, 0], 0, None) * np.clip(clipped[:, 3] - clipped[:, 1], 0, None)
    keep = np.flatnonzero((area_clipped > 0) & (area_clipped >= min_visible * area_inside))
    return clipped[keep] - [x0, y0, x0, y0], keep


def plan_tiles(width: int, height: int, boxes: np.ndarray, categories: np.ndarray, cfg: TileConfig) -> list[TilePlan]:
    """Every tile of a `width` × `height` image with its clipped boxes (before any empty-tile sampling)."""
    plans = []
    for y0 in tile_origins(height, cfg.tile_size, cfg.overlap):
        for x0 in tile_origins(width, cfg.tile_size, cfg.overlap):
            tw, th = min(cfg.tile_size, width - x0), min(cfg.tile_size, height - y0)
            clipped, keep = clip_boxes(boxes, (width, height), (x0, y0, tw, th), cfg.min_visible)
            plans.append(TilePlan(x0, y0, tw, th, clipped, np.asarray(categories)[keep]))
    return plans


def sample_tiles(plans: list[TilePlan], empty_fraction: float, seed: int, slide: int) -> list[TilePlan]:
    """All tiles with a visible annotation (hard negatives count), and `empty_fraction` of the others."""
    if empty_fraction >= 1:
        return plans
    rng = np.random.default_rng([seed, slide])
    draws = rng.random(len(plans))
    return [p for p, u in zip(plans, draws) if len(p.boxes) or u < empty_fraction]


# ---------------------------------------------------------------------------------------------------- step 4

def iter_tiles(image: RoiImage, plans: list[TilePlan]) -> Iterator[tuple[TilePlan, np.ndarray]]:
    """Pixels of each planned tile, reading one band of rows (one tile high, the image wide) at a time."""
    by_row: dict[int, list[TilePlan]] = {}
    for plan in plans:
        by_row.setdefault(plan.y0, []).append(plan)
    for y0 in sorted(by_row):
        row = by_row[y0]
        height = max(p.height for p in row)
        band = image.read_region(0, y0, image.width, height)
        for plan in row:
            yield plan, band[:plan.height, plan.x0:plan.x0 + plan.width]


@dataclass
class ConvertConfig:
    tiles: TileConfig = field(default_factory=TileConfig)
    ratios: tuple[float, float, float] = SPLIT_RATIOS
    seed: int = 0
    image_format: str = "png"
    """png (lossless, large) or jpg (quality 95)."""
    workers: int = 1
    """Slides converted in parallel (one process each)."""
    in_memory_max_megapixels: float = 0.0
    """Images up to this size are decoded whole (faster); larger ones (all, by default) are streamed by TIFF
    strip/tile through `midog.roi_io.open_roi`, so memory stays bounded whatever the image size."""


def _slide_tiles(task: tuple[dict, np.ndarray, np.ndarray, str, Path, Path, ConvertConfig]) -> dict[str, int]:
    """Convert one slide; runs in a worker process. Returns its counts."""
    slide, boxes, categories, split, image_path, out, cfg = task
    plans = plan_tiles(int(slide["width"]), int(slide["height"]), boxes, categories, cfg.tiles)
    plans = sample_tiles(plans, cfg.tiles.empty_fraction, cfg.seed, int(slide["slide"]))
    counts = {"tiles": 0, "empty_tiles": 0, "mitotic_figure_boxes": 0, "hard_negative_boxes": 0}
    stem = Path(slide["file_name"]).stem
    with open_roi(image_path, in_memory_max_megapixels=cfg.in_memory_max_megapixels) as image:
        if (image.width, image.height) != (int(slide["width"]), int(slide["height"])):
            raise InputError(f"{image_path.name} is {image.width}x{image.height} but MIDOG++.json says "
                             f"{slide['width']}x{slide['height']}")
        for plan, pixels in iter_tiles(image, plans):
            name = f"{stem}_{plan.x0:05d}_{plan.y0:05d}"
            image = Image.fromarray(pixels)
            if cfg.image_format == "jpg":
                image.save(out / "images" / split / f"{name}.jpg", quality=95)
            else:
                image.save(out / "images" / split / f"{name}.png", compress_level=1)
            lines = plan.yolo_lines(cfg.tiles.classes)
            (out / "labels" / split / f"{name}.txt").write_text("".join(line + "\n" for line in lines))
            counts["tiles"] += 1
            counts["empty_tiles"] += int(not lines)
            counts["mitotic_figure_boxes"] += int((plan.categories == MITOTIC_FIGURE).sum())
            counts["hard_negative_boxes"] += int((plan.categories == HARD_NEGATIVE).sum())
    return counts


def annotation_counts(index: MidogppIndex, split: pd.Series) -> dict[str, dict]:
    """Annotations per class × split, per class × tumour type × split, and slides per tumour type × split."""
    slide_split = dict(zip(index.slides["slide"], split))
    slide_tumour = dict(zip(index.slides["slide"], index.slides["tumour"]))
    boxes = index.boxes.assign(split=index.boxes["slide"].map(slide_split),
                               tumour=index.boxes["slide"].map(slide_tumour),
                               cls=index.boxes["category"].map({1: "mitotic figure", 2: "hard negative"}))
    per_split = boxes.groupby(["cls", "split"]).size().unstack(fill_value=0)
    per_tumour = boxes.groupby(["tumour", "cls", "split"]).size().unstack(fill_value=0)
    slides = index.slides.assign(split=split.to_numpy()).groupby(["tumour", "split"]).size().unstack(fill_value=0)
    return {
        "annotations": {cls: {s: int(row.get(s, 0)) for s in SPLITS} for cls, row in per_split.iterrows()},
        "annotations_by_tumour": {f"{t} / {c}": {s: int(row.get(s, 0)) for s in SPLITS}
                                  for (t, c), row in per_tumour.iterrows()},
        "slides_by_tumour": {t: {s: int(row.get(s, 0)) for s in SPLITS} for t, row in slides.iterrows()},
    }


def convert(index: MidogppIndex, images: str | os.PathLike[str], out: str | os.PathLike[str],
            cfg: ConvertConfig | None = None, progress: bool = True) -> dict:
    """Write the YOLO dataset for every labelled slide; returns (and writes) the summary."""
    cfg = cfg or ConvertConfig()
    if cfg.tiles.classes not in CLASS_NAMES:
        raise InputError(f"classes must be 1 or 2, got {cfg.tiles.classes}")
    if cfg.image_format not in ("png", "jpg"):
        raise InputError(f"image format must be png or jpg, got {cfg.image_format}")
    images, out = Path(images), Path(out)
    if not images.is_dir():
        raise InputError(f"MIDOG++ image folder not found: {images}")
    absent = [f for f in index.slides["file_name"] if not (images / f).is_file()]
    if absent:
        raise InputError(f"{len(absent)} MIDOG++ images are missing from {images}, e.g. {absent[0]}")
    leftovers = [p for kind in ("images", "labels") for p in (out / kind).rglob("*") if p.is_file()] \
        if out.is_dir() else []
    if leftovers:  # another split's tiles would stay beside this one's: slides in two splits
        raise InputError(f"{out} already holds a prepared dataset ({len(leftovers)} files under images/ and labels/, "
                         f"e.g. {leftovers[0].relative_to(out)}); choose an empty --out or remove it first")
    split = split_slides(index.slides, cfg.ratios, cfg.seed)
    for kind in ("images", "labels"):
        for name in SPLITS:
            (out / kind / name).mkdir(parents=True, exist_ok=True)

    grouped = {k: g for k, g in index.boxes.groupby("slide")}
    tasks = []
    for row, name in zip(index.slides.to_dict("records"), split):
        g = grouped.get(row["slide"])
        boxes = g[["x1", "y1", "x2", "y2"]].to_numpy() if g is not None else np.zeros((0, 4))
        cats = g["category"].to_numpy() if g is not None else np.zeros(0, dtype=int)
        tasks.append((row, boxes, cats, name, images / row["file_name"], out, cfg))
    with ProcessPoolExecutor(cfg.workers) if cfg.workers > 1 else nullcontext() as pool:
        done = pool.map(_slide_tiles, tasks) if pool is not None else map(_slide_tiles, tasks)
        results = list(progress_iter(done, len(tasks), "MIDOG++ slides", "slide", progress))

    slides = index.slides.assign(split=split.to_numpy())
    n_ann = index.boxes.groupby(["slide", "category"]).size().unstack(fill_value=0)
    with open(out / "slides.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide", "file_name", "tumour", "scanner", "split", "width", "height", "mitotic_figures",
                         "hard_negatives", "tiles", "empty_tiles"])
        for row, counts in zip(slides.to_dict("records"), results):
            ann = n_ann.loc[row["slide"]] if row["slide"] in n_ann.index else {}
            writer.writerow([row["slide"], row["file_name"], row["tumour"], row.get("scanner", ""), row["split"],
                             row["width"], row["height"], int(ann.get(MITOTIC_FIGURE, 0)),
                             int(ann.get(HARD_NEGATIVE, 0)), counts["tiles"], counts["empty_tiles"]])
    tiles = {s: {k: int(sum(c[k] for c, sp in zip(results, split) if sp == s)) for k in results[0]} for s in SPLITS} \
        if results else {}
    summary = {"config": asdict(cfg), "slides": int(len(slides)), "unlabelled_slides_left_out": index.unlabelled,
               "tiles": tiles, **annotation_counts(index, split)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_data_yaml(out, cfg.tiles.classes)
    write_chain_annotations(index, split, images, out / "chain")
    return summary


def write_chain_annotations(index: MidogppIndex, split: pd.Series, images: Path, folder: Path,
                            spacing_um: float = 0.25) -> Path:
    """`folder/annotations.json` for `training.evaluate_chain --detection folder`: every labelled slide (its
    absolute image path), its split, tumour type and mitotic-figure centres in pixels, so the whole chain can be
    scored on the untiled val/test images with the official metric."""
    folder.mkdir(parents=True, exist_ok=True)
    figures = index.boxes[index.boxes["category"] == MITOTIC_FIGURE]
    centres = {k: g for k, g in figures.groupby("slide")}
    entries = {}
    for row, name in zip(index.slides.itertuples(), split):
        g = centres.get(row.slide)
        points = [] if g is None else [{"x": round((a + b) / 2, 2), "y": round((c + d) / 2, 2)}
                                       for a, b, c, d in g[["x1", "x2", "y1", "y2"]].itertuples(index=False)]
        entries[str((images / row.file_name).resolve())] = {"split": name, "slide": f"{row.tumour}/{row.slide}",
                                                           "figures": points}
    path = folder / "annotations.json"
    path.write_text(json.dumps({"source": "MIDOG++", "spacing_um": spacing_um, "images": entries}) + "\n")
    return path


def write_data_yaml(out: Path, classes: int) -> Path:
    """The ultralytics dataset file: absolute root, one folder per split, class names."""
    names = "\n".join(f"  {i}: {name}" for i, name in enumerate(CLASS_NAMES[classes]))
    text = (f"# MIDOG++ tiles written by training.prepare_midogpp\npath: {out.resolve()}\n"
            f"train: images/train\nval: images/val\ntest: images/test\nnames:\n{names}\n")
    path = out / "data.yaml"
    path.write_text(text)
    return path
