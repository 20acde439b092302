"""A real-tissue detection set (and verifier crops) composed from the AMi-Br crops.

AMi-Br gives 128 × 128 px crops (0.25 µm/px) with a mitotic figure at the centre, not whole regions of interest.
A detector trained on those crops as they are would only learn "there is a figure at the centre". So each
training image here is a *canvas* tiled from rectangular windows cut out of the crops of one slide:

* The canvas is cut into a brick layout of rectangles with sides in [min_side, max_side] (<= 64 px): columns of
  random widths, each cut into rows of random heights, transposed for half of the canvases.
* A rectangle is a *positive* window (its crop's figure at a uniformly random place inside it, at least `margin`
  from its border) or a *figure-free* window (every known figure at least `clearance` px outside it). Only a
  strip <= 128 / 2 - clearance px wide can be figure-free in a 128 px crop, so a negative rectangle wider than
  that is cut into strips. Every window comes from a crop in a random one of the 8 dihedral orientations.
* Other annotated figures of the same slide that fall inside a window (AMi-Br coordinates tell where) are
  labelled too, so a visible annotated figure is never left unlabelled.
* Seams are hard (no blending) and appear in positive and negative areas alike.

Limits (also in the model cards): seams and stain breaks never occur in real tissue; figures are far denser than
in real regions; negatives are ordinary tissue around figures, never the look-alike "imposters" that real
false positives come from; and a crop may show a mitotic figure that is not in AMi-Br's train list (unannotated
figures become false negatives in the labels).

The split is by slide (dataset + slide name), stratified by source dataset, so val and test are unseen slides.

Output (`--out DIR`):
    detection/images/{train,val,test}/*.png, detection/labels/...*.txt   ultralytics layout, one class
    detection/data.yaml                                                   dataset file for ultralytics
    detection/annotations.json     exact figure centres per canvas (for point-based evaluation)
    verifier/{train,val,test}/{mitotic_figure,non_mitotic_figure}/*.png   candidate crops (verifier_crop px)
    verifier/{train,val}/false_positive/*.png   with --mine-false-positives: a trained detector's false positives
    slides.csv                     slide → split;   manifest.json: settings and counts
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import yaml
from PIL import Image

from midog.cli import OneLineArgumentParser, add_debug_option, add_quiet_option, entry_point, read_json_file
from midog.errors import ConfigError, InputError
from midog.progress import progress_iter
from training.config_file import load_training_config

DEFAULT_CONFIG = Path(__file__).with_name("configs") / "amibr_detection.yaml"
SPLITS = ("train", "val", "test")
CLASS_NAME = "mitotic figure"
POSITIVE_DIR = "mitotic_figure"
NEGATIVE_DIR = "non_mitotic_figure"
FALSE_POSITIVE_DIR = "false_positive"


@dataclass
class AmibrDetectionConfig:
    crop_size: int = 128
    canvas_size: int = 512
    min_side: int = 32
    max_side: int = 64
    thin_fraction: float = 0.4
    positive_fraction: float = 0.4
    margin: int = 12
    clearance: int = 24
    box_size: int = 50
    split_fractions: list[float] = field(default_factory=lambda: [0.7, 0.1, 0.2])
    uses_per_crop: dict[str, int] = field(default_factory=lambda: {"train": 3, "val": 1, "test": 1})
    verifier_crop: int = 50
    verifier_jitter: int = 6
    verifier_negative_min_distance: int = 34
    verifier_per_crop: dict[str, int] = field(default_factory=lambda: {"train": 2, "val": 1, "test": 1})

    @property
    def negative_max_side(self) -> int:
        """Widest strip of a crop that stays `clearance` away from the centre figure."""
        return self.crop_size // 2 - self.clearance - 1


def load_construction_config(path: str | Path | None = None) -> AmibrDetectionConfig:
    """ConfigError for an unreadable file, an unknown key or a value of the wrong type."""
    return load_training_config(path or DEFAULT_CONFIG, AmibrDetectionConfig)


# ---- AMi-Br crops ------------------------------------------------------------------------------------------------

@dataclass
class AmibrCrop:
    """One AMi-Br crop; `figures` holds every annotated figure inside it (crop coordinates, centre first)."""

    uid: str
    slide: str
    dataset: str
    label: str
    path: Path
    x: float
    y: float
    figures: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))


def read_amibr(amibr_dir: str | Path, crop_size: int = 128) -> list[AmibrCrop]:
    """Read amibr_train_split.csv; the slide key is `dataset/slide` (slide names repeat across datasets)."""
    amibr_dir = Path(amibr_dir)
    table = amibr_dir / "amibr_train_split.csv"
    if not table.is_file():
        raise InputError(f"no amibr_train_split.csv in {amibr_dir}")
    crops = []
    with table.open(newline="") as handle:
        for row in csv.DictReader(handle):
            path = amibr_dir / row["final_label"] / row["dataset_uid"]
            if not path.is_file():
                raise InputError(f"AMi-Br image missing: {path}")
            crops.append(AmibrCrop(uid=row["dataset_uid"], slide=f"{row['dataset']}/{row['slide']}",
                                   dataset=row["dataset"], label=row["final_label"], path=path,
                                   x=float(row["x"]), y=float(row["y"])))
    attach_neighbours(crops, crop_size)
    return crops


def attach_neighbours(crops: Sequence[AmibrCrop], crop_size: int = 128) -> None:
    """Fill each crop's `figures`: its own centre, then other annotated figures of its slide inside the crop."""
    half = crop_size / 2
    by_slide: dict[str, list[AmibrCrop]] = defaultdict(list)
    for crop in crops:
        by_slide[crop.slide].append(crop)
    for members in by_slide.values():
        xy = np.array([[c.x, c.y] for c in members], dtype=float)
        for i, crop in enumerate(members):
            rel = xy - xy[i] + half
            inside = np.all((rel >= 0) & (rel < crop_size), axis=1)
            inside[i] = False
            crop.figures = np.vstack([[half, half], rel[inside]])


def split_slides(crops: Iterable[AmibrCrop], fractions: Sequence[float], seed: int) -> dict[str, str]:
    """Slide → split, 70/10/20 (or `fractions`) within each source dataset, by shuffled slide order."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0):
        raise InputError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    rng = np.random.default_rng(seed)
    slides_by_dataset: dict[str, list[str]] = defaultdict(list)
    for crop in crops:
        if crop.slide not in slides_by_dataset[crop.dataset]:
            slides_by_dataset[crop.dataset].append(crop.slide)
    assignment = {}
    for dataset in sorted(slides_by_dataset):
        slides = sorted(slides_by_dataset[dataset])
        rng.shuffle(slides)
        # every split gets at least one slide of each dataset that has three or more
        n_val = max(round(len(slides) * fractions[1]), int(len(slides) >= 3 and fractions[1] > 0))
        n_test = max(round(len(slides) * fractions[2]), int(len(slides) >= 3 and fractions[2] > 0))
        n_train = len(slides) - n_val - n_test
        for k, slide in enumerate(slides):
            assignment[slide] = "train" if k < n_train else "val" if k < n_train + n_val else "test"
    return assignment


# ---- geometry ----------------------------------------------------------------------------------------------------

def dihedral(image: np.ndarray, points: np.ndarray, k: int, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """Rotate a square image by k × 90° (counter-clockwise, as np.rot90) after an optional left-right flip.

    Points are continuous (x, y) coordinates (pixel i spans [i, i + 1)), moved along with the pixels.
    """
    size = image.shape[1]
    points = np.asarray(points, dtype=float).reshape(-1, 2).copy()
    if flip:
        image = image[:, ::-1]
        points[:, 0] = size - points[:, 0]
    for _ in range(k % 4):
        image = np.rot90(image)
        points = np.stack([points[:, 1], size - points[:, 0]], axis=1)
    return np.ascontiguousarray(image), points


@dataclass(frozen=True)
class Rect:
    x: int
    y: int
    w: int
    h: int


def _draw_sides(total: int, rng: np.random.Generator, cfg: AmibrDetectionConfig) -> list[int]:
    sides: list[int] = []
    while total - sum(sides) > cfg.max_side:
        thin = rng.random() < cfg.thin_fraction
        low, high = (cfg.min_side, cfg.negative_max_side) if thin else (cfg.negative_max_side + 1, cfg.max_side)
        sides.append(int(rng.integers(low, high + 1)))
    rest = total - sum(sides)
    if rest >= cfg.min_side or not sides:
        sides.append(rest)
    else:  # too thin to stand alone: widen the last piece (it may then exceed max_side a little)
        sides[-1] += rest
    return sides


def brick_layout(size: int, rng: np.random.Generator, cfg: AmibrDetectionConfig) -> list[Rect]:
    """Cover a size × size canvas with rectangles: columns of random widths, each cut into random rows."""
    rects = []
    x = 0
    for width in _draw_sides(size, rng, cfg):
        y = 0
        for height in _draw_sides(size, rng, cfg):
            rects.append(Rect(x, y, width, height))
            y += height
        x += width
    if rng.random() < 0.5:
        rects = [Rect(r.y, r.x, r.h, r.w) for r in rects]
    return rects


def split_into_strips(rect: Rect, max_side: int) -> list[Rect]:
    """Cut a rectangle across its longer side into strips at most `max_side` wide (for figure-free windows)."""
    if min(rect.w, rect.h) <= max_side:
        return [rect]
    if rect.w <= rect.h:
        n = math.ceil(rect.w / max_side)
        cuts = np.linspace(0, rect.w, n + 1).round().astype(int)
        return [Rect(rect.x + a, rect.y, b - a, rect.h) for a, b in zip(cuts[:-1], cuts[1:])]
    n = math.ceil(rect.h / max_side)
    cuts = np.linspace(0, rect.h, n + 1).round().astype(int)
    return [Rect(rect.x, rect.y + a, rect.w, b - a) for a, b in zip(cuts[:-1], cuts[1:])]


def positive_offset(figure: np.ndarray, w: int, h: int, crop_size: int, margin: int,
                    rng: np.random.Generator) -> tuple[int, int] | None:
    """Window offset (ox, oy) in the crop that puts `figure` uniformly anywhere >= margin inside a w × h window."""
    offsets = []
    for centre, side in ((figure[0], w), (figure[1], h)):
        low = max(0, math.ceil(centre - side + margin))
        high = min(crop_size - side, math.floor(centre - margin))
        if low > high:
            return None
        offsets.append(int(rng.integers(low, high + 1)))
    return offsets[0], offsets[1]


def negative_offset(figures: np.ndarray, w: int, h: int, crop_size: int, clearance: int,
                    rng: np.random.Generator) -> tuple[int, int] | None:
    """A uniformly drawn window offset that keeps every figure centre >= clearance outside the window."""
    ox = np.arange(crop_size - w + 1)
    oy = np.arange(crop_size - h + 1)
    ok = np.ones((len(oy), len(ox)), dtype=bool)
    for fx, fy in figures:
        far_x = (fx <= ox - clearance) | (fx >= ox + w + clearance)
        far_y = (fy <= oy - clearance) | (fy >= oy + h + clearance)
        ok &= far_x[None, :] | far_y[:, None]
    valid = np.argwhere(ok)
    if len(valid) == 0:
        return None
    iy, ix = valid[rng.integers(len(valid))]
    return int(ox[ix]), int(oy[iy])


# ---- canvases ----------------------------------------------------------------------------------------------------

@dataclass
class Canvas:
    image: np.ndarray
    figures: list[dict]
    """Each: x, y (canvas pixels, continuous), uid, label, primary (placed on purpose vs a neighbour)."""


class CropLoader:
    """AMi-Br crops read once per slide (uint8 RGB)."""

    def __init__(self) -> None:
        self._cache: dict[Path, np.ndarray] = {}

    def __call__(self, crop: AmibrCrop) -> np.ndarray:
        if crop.path not in self._cache:
            with Image.open(crop.path) as img:
                self._cache[crop.path] = np.asarray(img.convert("RGB"))
        return self._cache[crop.path]

    def clear(self) -> None:
        self._cache.clear()


def _oriented(crop: AmibrCrop, load: CropLoader, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    image = load(crop)
    if image.shape[:2] != (image.shape[1], image.shape[1]):
        raise InputError(f"AMi-Br crop {crop.path} is not square: {image.shape}")
    return dihedral(image, crop.figures, int(rng.integers(4)), bool(rng.integers(2)))


def compose_canvas(positives: list[AmibrCrop], pool: Sequence[AmibrCrop], load: CropLoader,
                   rng: np.random.Generator, cfg: AmibrDetectionConfig) -> Canvas:
    """One canvas; pops the crops it shows as positives from `positives`, fills the rest from `pool`."""
    size = cfg.canvas_size
    canvas = np.zeros((size, size, 3), dtype=np.uint8)
    figures: list[dict] = []
    for rect in brick_layout(size, rng, cfg):
        if positives and rng.random() < cfg.positive_fraction:
            crop = positives.pop()
            image, points = _oriented(crop, load, rng)
            offset = positive_offset(points[0], rect.w, rect.h, image.shape[0], cfg.margin, rng)
            if offset is None:
                raise InputError(f"rectangle {rect} cannot hold a figure with margin {cfg.margin}")
            _paste(canvas, figures, rect, image, points, offset, crop, primary_first=True)
            continue
        for strip in split_into_strips(rect, cfg.negative_max_side):
            for _ in range(20):
                crop = pool[int(rng.integers(len(pool)))]
                image, points = _oriented(crop, load, rng)
                offset = negative_offset(points, strip.w, strip.h, image.shape[0], cfg.clearance, rng)
                if offset is not None:
                    _paste(canvas, figures, strip, image, points, offset, crop, primary_first=False)
                    break
            else:
                raise InputError(f"no figure-free {strip.w}x{strip.h} window in 20 crops of slide {crop.slide}")
    return Canvas(canvas, figures)


def _paste(canvas: np.ndarray, figures: list[dict], rect: Rect, image: np.ndarray, points: np.ndarray,
           offset: tuple[int, int], crop: AmibrCrop, primary_first: bool) -> None:
    ox, oy = offset
    canvas[rect.y:rect.y + rect.h, rect.x:rect.x + rect.w] = image[oy:oy + rect.h, ox:ox + rect.w]
    for k, (px, py) in enumerate(points):
        x, y = px - ox, py - oy
        if 0 <= x < rect.w and 0 <= y < rect.h:
            figures.append({"x": float(rect.x + x), "y": float(rect.y + y), "uid": crop.uid if k == 0 else None,
                            "label": crop.label if k == 0 else None, "primary": bool(primary_first and k == 0)})


def yolo_label_lines(figures: Sequence[dict], canvas_size: int, box_size: int) -> list[str]:
    """`0 cx cy w h` (normalised) per figure: a box_size box centred on it, clipped to the canvas."""
    lines = []
    for fig in figures:
        x1, y1 = max(0.0, fig["x"] - box_size / 2), max(0.0, fig["y"] - box_size / 2)
        x2, y2 = min(canvas_size, fig["x"] + box_size / 2), min(canvas_size, fig["y"] + box_size / 2)
        cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
        lines.append(f"0 {cx / canvas_size:.6f} {cy / canvas_size:.6f} {w / canvas_size:.6f} {h / canvas_size:.6f}")
    return lines


def canvases_for_slide(crops: Sequence[AmibrCrop], uses: int, load: CropLoader, rng: np.random.Generator,
                       cfg: AmibrDetectionConfig) -> list[Canvas]:
    """Canvases until every crop of the slide was shown `uses` times as a positive."""
    queue = [c for c in crops for _ in range(uses)]
    rng.shuffle(queue)
    out = []
    if cfg.positive_fraction <= 0:
        raise InputError("positive_fraction must be above 0")
    out = []
    while queue:
        out.append(compose_canvas(queue, crops, load, rng, cfg))
    return out


# ---- verifier crops ----------------------------------------------------------------------------------------------

def verifier_crops(crop: AmibrCrop, image: np.ndarray, n: int, rng: np.random.Generator,
                   cfg: AmibrDetectionConfig) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """`n` positive crops (figure centre jittered) and up to `n` negative crops (centre far from any figure)."""
    side = cfg.verifier_crop
    size = image.shape[0]
    half = side / 2
    low, high = math.ceil(half), math.floor(size - half)
    pos, neg = [], []
    for _ in range(n):
        oriented, points = dihedral(image, crop.figures, int(rng.integers(4)), bool(rng.integers(2)))
        cx, cy = points[0] + rng.integers(-cfg.verifier_jitter, cfg.verifier_jitter + 1, size=2)
        cx, cy = int(np.clip(round(cx), low, high)), int(np.clip(round(cy), low, high))
        pos.append(oriented[int(cy - half):int(cy - half) + side, int(cx - half):int(cx - half) + side])
        grid = np.arange(low, high + 1)
        gx, gy = np.meshgrid(grid, grid)
        centres = np.stack([gx.ravel(), gy.ravel()], axis=1).astype(float)
        dist = np.min(np.linalg.norm(centres[:, None, :] - points[None, :, :], axis=2), axis=1)
        valid = centres[dist >= cfg.verifier_negative_min_distance]
        if len(valid):
            nx, ny = valid[rng.integers(len(valid))].astype(int)
            neg.append(oriented[int(ny - half):int(ny - half) + side, int(nx - half):int(nx - half) + side])
    return pos, neg


# ---- the whole build ---------------------------------------------------------------------------------------------

def build(amibr_dir: str | Path, out_dir: str | Path, seed: int = 0, cfg: AmibrDetectionConfig | None = None,
          crops: list[AmibrCrop] | None = None, progress: bool = True) -> dict:
    """Write the detection and verifier sets; returns the manifest (also written to out/manifest.json). `progress`:
    a bar of the slides done (`midog.progress`)."""
    cfg = cfg or load_construction_config()
    if cfg.max_side > cfg.crop_size // 2 or cfg.min_side < 2 * cfg.margin:
        raise InputError("layout sides must lie in [2 * margin, crop_size / 2]")
    out = Path(out_dir)
    crops = crops if crops is not None else read_amibr(amibr_dir, cfg.crop_size)
    if not crops:
        raise InputError(f"no AMi-Br crops in {amibr_dir}")
    assignment = split_slides(crops, cfg.split_fractions, seed)
    rng = np.random.default_rng(seed)
    by_slide: dict[str, list[AmibrCrop]] = defaultdict(list)
    for crop in crops:
        by_slide[crop.slide].append(crop)

    det = out / "detection"
    annotations: dict[str, dict] = {}
    counts = {s: dict.fromkeys(("slides", "amibr_crops", "canvases", "figures", "verifier_positive",
                                "verifier_negative"), 0) for s in SPLITS}
    load = CropLoader()
    for split in SPLITS:
        (det / "images" / split).mkdir(parents=True, exist_ok=True)
        (det / "labels" / split).mkdir(parents=True, exist_ok=True)
        for label_dir in (POSITIVE_DIR, NEGATIVE_DIR):
            (out / "verifier" / split / label_dir).mkdir(parents=True, exist_ok=True)
    for slide in progress_iter(sorted(by_slide), len(by_slide), "canvases", "slide", progress):
        split = assignment[slide]
        members = by_slide[slide]
        stem = slide.replace("/", "_").replace(".tiff", "").replace(".", "_")
        for k, canvas in enumerate(canvases_for_slide(members, cfg.uses_per_crop[split], load, rng, cfg)):
            name = f"{stem}_{k:03d}"
            Image.fromarray(canvas.image).save(det / "images" / split / f"{name}.png")
            lines = yolo_label_lines(canvas.figures, cfg.canvas_size, cfg.box_size)
            (det / "labels" / split / f"{name}.txt").write_text("".join(line + "\n" for line in lines))
            annotations[f"images/{split}/{name}.png"] = {"split": split, "slide": slide, "figures": canvas.figures}
            counts[split]["canvases"] += 1
            counts[split]["figures"] += len(canvas.figures)
        for crop in members:
            pos, neg = verifier_crops(crop, load(crop), cfg.verifier_per_crop[split], rng, cfg)
            base = Path(crop.uid).stem
            for i, patch in enumerate(pos):
                Image.fromarray(patch).save(out / "verifier" / split / POSITIVE_DIR / f"{base}_{i}.png")
            for i, patch in enumerate(neg):
                Image.fromarray(patch).save(out / "verifier" / split / NEGATIVE_DIR / f"{base}_{i}.png")
            counts[split]["verifier_positive"] += len(pos)
            counts[split]["verifier_negative"] += len(neg)
            counts[split]["amibr_crops"] += 1
        counts[split]["slides"] += 1
        load.clear()

    data_yaml = {"path": str(det.resolve()), "train": "images/train", "val": "images/val", "test": "images/test",
                 "names": {0: CLASS_NAME}}
    (det / "data.yaml").write_text(yaml.safe_dump(data_yaml, sort_keys=False))
    (det / "annotations.json").write_text(json.dumps(
        {"canvas_size": cfg.canvas_size, "box_size": cfg.box_size, "spacing_um": 0.25, "images": annotations}))
    with (out / "slides.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide", "dataset", "split", "crops"])
        for slide in sorted(by_slide):
            writer.writerow([slide, by_slide[slide][0].dataset, assignment[slide], len(by_slide[slide])])
    manifest = {"seed": seed, "amibr": str(amibr_dir), "config": asdict(cfg),
                "counts": counts}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def mine_false_positives(out_dir: str | Path, detector: str | Path, splits: Sequence[str] = ("train", "val"),
                         confidence: float | None = None, match_radius: float = 30.0,
                         progress: bool = True, crop_config: str | Path | None = None) -> dict[str, int]:
    """Run a trained detector (the pipeline's own proposal stage) on the canvases of `splits` and save every
    candidate farther than `match_radius` px (7.5 µm, the official matching radius) from all labelled figures as a
    verifier negative in `verifier/<split>/false_positive/`. Candidates come from `Track1Detector.candidates` (the
    pipeline's tile → propose → merge) and crops from `midog.verifier.box_crops` (cut and resized as the pipeline's
    verifier cuts them). Returns the number of crops per split; an InputError saying why when it writes none.
    `progress`: a bar of the canvases done (`midog.progress`). `crop_config`: a partial pipeline YAML whose verifier
    crop settings the crops follow (default: the shipped verifier's, refused when its members use several contexts)."""
    from midog.config import resolve_config
    from midog.pipeline import Track1Detector
    from midog.roi_io import ArrayRoi, PhysicalTransform
    from midog.verifier import box_crops
    from midog.weights import DEFAULT_PIXEL_SIZE_UM
    from training.verifier_data import far_from

    out = Path(out_dir)
    annotations = {split: read_annotations(out / "detection", split) for split in splits}
    if not any(annotations.values()):
        raise InputError(f"nothing to mine: no {' or '.join(splits)} canvases in {out / 'detection'}")
    overrides = {"proposals.weights": str(detector), "runtime.device": "cpu"}
    if confidence is not None:
        overrides["proposals.confidence"] = confidence
    config = resolve_config(crop_config, overrides=overrides)
    purpose = "mining the canvases' false positives (--crop-config)"
    context_px = config.verifier.single_crop_setting("context_px", purpose)
    if config.verifier.single_crop_setting("stain_normalization", purpose) != "none":
        raise ConfigError(f"{purpose} cuts crops of composed canvases, a patchwork of many slides with no stains "
                          "of their own: verifier.stain_normalization must be none")
    chain = Track1Detector.from_config(config, with_verifier=False, with_atypical=False)
    spacing_mm = DEFAULT_PIXEL_SIZE_UM / 1000  # AMi-Br's crops, and so the canvases
    counts, proposed = dict.fromkeys(splits, 0), 0
    canvases = [(split, path, centres) for split in splits for path, centres in annotations[split].items()]
    for split, path, centres in progress_iter(canvases, len(canvases), "false positives", "canvas", progress):
        folder = out / "verifier" / split / FALSE_POSITIVE_DIR
        image = ArrayRoi(np.array(Image.open(path).convert("RGB")), PhysicalTransform((spacing_mm, spacing_mm)))
        candidates, _ = chain.candidates(image)
        proposed += len(candidates)
        if not len(candidates):
            continue
        far = far_from(candidates.centres, centres, (1.0, 1.0), match_radius)
        crops = box_crops(image, candidates.boxes[far], config.verifier.crop_size, context_px,
                          config.merging.box_size_px)
        if len(crops):
            folder.mkdir(parents=True, exist_ok=True)
        for k, crop in enumerate(crops):
            Image.fromarray(crop).save(folder / f"{path.stem}_{k:03d}.png")
        counts[split] += len(crops)
    if not sum(counts.values()):
        raise InputError(nothing_mined(len(canvases), proposed, config.proposals.confidence, match_radius))
    return counts


def nothing_mined(canvases: int, proposed: int, confidence: float, match_radius: float) -> str:
    """Why mining found no false positive, in one line."""
    if not proposed:
        return (f"no false positives written: the detector proposed no candidate on {canvases} canvases at "
                f"confidence {confidence:g} (try a lower --confidence)")
    return (f"no false positives written: every one of the {proposed} candidates on {canvases} canvases lies within "
            f"{match_radius:g} px of a labelled figure")


def read_annotations(detection_dir: str | Path, split: str) -> dict[Path, np.ndarray]:
    """Image path → (N, 2) figure centres for one split of a built detection set."""
    path = Path(detection_dir) / "annotations.json"
    if not path.is_file():
        raise InputError(f"no detection set: {path} not found (build it first: python -m training.amibr_detection "
                         "--amibr DIR --out DIR)")
    data = read_json_file(path, "detection set annotations")
    return {Path(detection_dir) / name: np.array([[f["x"], f["y"]] for f in entry["figures"]]).reshape(-1, 2)
            for name, entry in data["images"].items() if entry["split"] == split}


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--amibr", type=Path, required=True, help="AMi-Br folder (Atypical/, Normal/, csv)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--mine-false-positives", type=Path, metavar="DETECTOR_PT",
                        help="instead of building: add this detector's false positives on the train and val "
                             "canvases of OUT to OUT/verifier/<split>/false_positive")
    parser.add_argument("--confidence", type=float, help="detector confidence for mining (default: the pipeline's)")
    parser.add_argument("--crop-config", type=Path, default=None,
                        help="mining: a partial pipeline YAML whose verifier crop settings the crops follow (default: "
                             "the shipped verifier's; needed when its members use several contexts)")
    add_debug_option(parser)
    add_quiet_option(parser)
    args = parser.parse_args(argv)
    if args.mine_false_positives is not None:
        counts = mine_false_positives(args.out, args.mine_false_positives, confidence=args.confidence,
                                      crop_config=args.crop_config)
        print(json.dumps(counts))
        return 0
    manifest = build(args.amibr, args.out, args.seed, load_construction_config(args.config))
    print(json.dumps(manifest["counts"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
