"""Track 1 training data from real full fields (the MITOS-ATYPIA-14 layout of `training.fields`), at the models'
pixel size, split by slide.

    python -m training.prepare_fields --root ../shared/data/mitos-atypia-14 --out DIR --config CROPS.yaml
        [--folds 3] [--detector weights/detector.pt] [--pixel-size 0.25] [--amibr-canvases DIR] [--seed 0]
        [--amibr-positives ../shared/data/amibr]

CROPS.yaml: one verifier crop setting, e.g. training/configs/fields_context.yaml (20 µm) or fields_context_wide.yaml
(28 µm), the crops of one member of the shipped pair; without it the shipped verifiers' settings apply, which are
two contexts and so refused.

    OUT/folds.json                        slide → fold, frames and mitoses per slide, the settings below
    OUT/detection/images/*.jpg, labels/*.txt
                                          512 px tiles (20 % overlap) of every field resampled to --pixel-size,
                                          one class, 50 px boxes (12.5 µm) centred on the mitoses whose centre is
                                          in the tile; JPEG quality 95 (the fields are JPEG already)
    OUT/detection/fold{k}.yaml            ultralytics datasets: train = the other folds' slides but a fifth of their
    OUT/detection/all.yaml                fields (val: early stopping), test = fold k's slides; `all`: every slide
    OUT/candidates.csv                    the detector's merged candidates of every field (`Track1Detector.candidates`,
                                          field pixels): frame, slide, x1, y1, x2, y2, score
    OUT/verifier/crops/<slide>/{mitotic_figure,false_positive,tissue}/*.png
                                          verifier crops of every field, cut as the pipeline cuts them
                                          (`midog.verifier.candidate_crops` at --pixel-size, with the
                                          `verifier.crop_size`, `verifier.context_px` and
                                          `verifier.stain_normalization` of --config)
    OUT/verifier/fold{k}/{train,val}/<class>/*.png, OUT/verifier/all/...
                                          symlinks into crops/, split as the detection sets
    OUT/verifier/crops/amibr/mitotic_figure/*.png
                                          with --amibr-positives: one crop per AMi-Br mitosis (other scanners and
                                          labs than the fields'), linked into every set's train split only

Verifier crops: each mitosis `--jitter-copies` times, its 50 px box shifted by the detector's localisation error
(normal, `--jitter-px` per axis, model pixels); every candidate farther than 7.5 µm (the official matching radius)
from every mitosis, a hard negative; `--tissue-per-field` random tissue boxes as far from every mitosis. A frame's
mitoses are all labelled (the dataset's README), so those candidates are true false positives. AMi-Br mitoses
(`--amibr-positives`) are cut the same way from their 128 px crops, read at `AMIBR_PIXEL_SIZE_UM` (and, under
`macenko`, normalised with their slide's stains, estimated from all its crops together): a 50 px box on
the crop's centre, jittered once, with the verifier's context; they add positives from scanners and labs the
seven slides lack, never negatives (AMi-Br holds mitoses only) and never validation data.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from midog.config import PipelineConfig, resolve_config
from midog.cli import OneLineArgumentParser, add_debug_option, add_quiet_option, entry_point
from midog.errors import InputError
from midog.roi_io import ArrayRoi, PhysicalTransform, RoiImage
from midog.pipeline import Track1Detector
from midog.progress import progress_iter
from midog.resampling import at_pixel_size, view_scale
from midog.tiling import has_tissue, tile_origins
from midog.stain import ImageStains, estimate_or_warn, normalise
from midog.verifier import candidate_crops
from midog.weights import DEFAULT_PIXEL_SIZE_UM
from training.amibr import load_crops
from training.amibr_detection import AmibrCrop, read_amibr
from training.fields import FieldIndex, load_field_index, open_field, slide_folds
from training.train_verifier import POSITIVE_FOLDER
from training.verifier_data import far_from

FALSE_POSITIVE_FOLDER = "false_positive"
TISSUE_FOLDER = "tissue"
MATCH_RADIUS_UM = 7.5
"""The official Track 1 matching radius: a candidate farther than this from every mitosis is a false positive."""
CANDIDATE_COLUMNS = ("frame", "slide", "x1", "y1", "x2", "y2", "score")
AMIBR_SLIDE = "amibr"
"""Folder under verifier/crops/ of the AMi-Br positives (not a field slide: in no fold's validation or test)."""
AMIBR_PIXEL_SIZE_UM = DEFAULT_PIXEL_SIZE_UM
"""AMi-Br's crops come without a pixel size; their sources (MIDOG 2021, TUPAC16) were scanned at 0.23-0.26 µm/px."""


@dataclass
class FieldDataConfig:
    pixel_size_um: float = DEFAULT_PIXEL_SIZE_UM
    """Every model's pixel size: fields are resampled to it (`midog.resampling`)."""
    folds: int = 3
    val_fraction: float = 0.2
    """Share of each training slide's fields held out for early stopping (by field, never the test slides)."""
    tile_size: int = 512
    overlap: float = 0.2
    box_px: int = 50
    """Label box side in model pixels (12.5 µm at 0.25 µm/px), as MIDOG++'s."""
    jitter_copies: int = 4
    jitter_px: float = 3.0
    tissue_per_field: int = 20
    seed: int = 0
    jpeg_quality: int = 95


# ---- splits ---------------------------------------------------------------------------------------------------

def frame_splits(index: FieldIndex, folds: dict[str, int], cfg: FieldDataConfig) -> dict[str, dict[str, list[str]]]:
    """Set name (fold0.., all) → {train, val, test}: frame names. Test is the fold's slides; val a seeded
    `val_fraction` of every other slide's fields (at least one when the slide has two or more); train the rest."""
    rng = np.random.default_rng(cfg.seed)
    held: dict[str, bool] = {}
    for slide, frames in index.frames.groupby("slide", sort=True):
        names = sorted(frames["frame"])
        count = int(round(cfg.val_fraction * len(names))) if len(names) > 1 else 0
        chosen = set(rng.choice(names, size=max(count, 1 if len(names) > 1 else 0), replace=False).tolist())
        held.update({name: name in chosen for name in names})
    slide_of = dict(zip(index.frames["frame"], index.frames["slide"]))
    sets = {}
    for fold in [*range(cfg.folds), None]:
        name = "all" if fold is None else f"fold{fold}"
        test = [f for f in slide_of if fold is not None and folds[slide_of[f]] == fold]
        rest = [f for f in slide_of if f not in set(test)]
        sets[name] = {"train": sorted(f for f in rest if not held[f]), "val": sorted(f for f in rest if held[f]),
                      "test": sorted(test)}
    return sets


# ---- detection tiles ------------------------------------------------------------------------------------------

def tile_labels(centres: np.ndarray, origin: tuple[int, int], cfg: FieldDataConfig) -> list[str]:
    """YOLO label lines (class cx cy w h, normalised) of the mitoses (model-pixel centres) whose centre lies in the
    tile at `origin`; boxes clipped to the tile."""
    x0, y0, size, half = origin[0], origin[1], cfg.tile_size, cfg.box_px / 2
    lines = []
    for cx, cy in centres:
        if not (x0 <= cx < x0 + size and y0 <= cy < y0 + size):
            continue
        left, right = max(cx - half - x0, 0), min(cx + half - x0, size)
        top, bottom = max(cy - half - y0, 0), min(cy + half - y0, size)
        lines.append(f"0 {(left + right) / 2 / size:.6f} {(top + bottom) / 2 / size:.6f} "
                     f"{(right - left) / size:.6f} {(bottom - top) / size:.6f}")
    return lines


def write_tiles(field: RoiImage, stem: str, centres_px: np.ndarray, out: Path, cfg: FieldDataConfig,
                tolerance: float) -> list[str]:
    """Tiles of one field at the model's pixel size (as the pipeline sees it: `image.resample_tolerance`) with
    their labels; returns the image paths (relative to `out`)."""
    view = at_pixel_size(field, cfg.pixel_size_um, tolerance)
    sx, sy = view_scale(field, view)
    centres = np.asarray(centres_px, dtype=np.float64).reshape(-1, 2) * [sx, sy]
    written = []
    for x, y in tile_origins(view.width, view.height, cfg.tile_size, cfg.overlap):
        name = f"{stem}_{x:04d}_{y:04d}"
        Image.fromarray(view.read_region(x, y, cfg.tile_size, cfg.tile_size)).save(
            out / "images" / f"{name}.jpg", quality=cfg.jpeg_quality)
        (out / "labels" / f"{name}.txt").write_text("".join(line + "\n" for line in tile_labels(centres, (x, y), cfg)))
        written.append(f"images/{name}.jpg")
    return written


# ---- verifier crops --------------------------------------------------------------------------------------------

def square_boxes(centres: np.ndarray, side: tuple[float, float]) -> np.ndarray:
    """(n, 4) boxes of `side` (x, y) pixels centred on (n, 2) points."""
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    half = np.asarray(side, dtype=np.float64) / 2
    return np.concatenate([centres - half, centres + half], axis=1)


def positive_boxes(mitoses: np.ndarray, scale: tuple[float, float], cfg: FieldDataConfig,
                   rng: np.random.Generator) -> np.ndarray:
    """`jitter_copies` boxes per mitosis (field pixels), each shifted by N(0, jitter_px) model pixels."""
    mitoses = np.asarray(mitoses, dtype=np.float64).reshape(-1, 2)
    copies = np.repeat(mitoses, cfg.jitter_copies, axis=0)
    copies = copies + rng.normal(0, cfg.jitter_px, copies.shape) / np.asarray(scale)
    return square_boxes(copies, (cfg.box_px / scale[0], cfg.box_px / scale[1]))


def tissue_boxes(field: RoiImage, mitoses: np.ndarray, scale: tuple[float, float], spacing_um: tuple[float, float],
                 config: PipelineConfig, cfg: FieldDataConfig, rng: np.random.Generator) -> np.ndarray:
    """Up to `tissue_per_field` random boxes on tissue (the pipeline's tissue test on the box), far from mitoses."""
    side = (cfg.box_px / scale[0], cfg.box_px / scale[1])
    boxes = []
    for _ in range(cfg.tissue_per_field * 10):
        if len(boxes) == cfg.tissue_per_field:
            break
        centre = rng.uniform([side[0] / 2, side[1] / 2], [field.width - side[0] / 2, field.height - side[1] / 2])
        if not far_from(centre[None], mitoses, spacing_um, MATCH_RADIUS_UM)[0]:
            continue
        box = square_boxes(centre[None], side)[0]
        region = field.read_region(int(box[0]), int(box[1]), max(1, int(side[0])), max(1, int(side[1])))
        if has_tissue(region, config.tiling.tissue_saturation, 0.5, config.tiling.tissue_gray_max):
            boxes.append(box)
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def save_crops(folder: Path, stem: str, crops: np.ndarray) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    for k, crop in enumerate(crops):
        Image.fromarray(crop).save(folder / f"{stem}_{k:03d}.png")
    return len(crops)


def write_crops(field: RoiImage, stem: str, mitoses: np.ndarray, candidates: np.ndarray, out: Path,
                config: PipelineConfig, cfg: FieldDataConfig, rng: np.random.Generator) -> dict[str, int]:
    """One field's verifier crops (positives with jitter, detector false positives, random tissue)."""
    view = at_pixel_size(field, cfg.pixel_size_um, config.image.resample_tolerance)
    scale = view_scale(field, view)
    spacing_um = field.transform.spacing_um

    def cut(boxes: np.ndarray) -> np.ndarray:
        return candidate_crops(field, boxes, cfg.pixel_size_um, config.image.resample_tolerance,
                               config.verifier.crop_size, config.verifier.context_px, config.merging.box_size_px,
                               config.verifier.stain_normalization)

    centres = (candidates[:, :2] + candidates[:, 2:]) / 2 if len(candidates) else np.zeros((0, 2))
    false_positives = candidates[far_from(centres, mitoses, spacing_um, MATCH_RADIUS_UM)]
    return {
        POSITIVE_FOLDER: save_crops(out / POSITIVE_FOLDER, stem, cut(positive_boxes(mitoses, scale, cfg, rng))),
        FALSE_POSITIVE_FOLDER: save_crops(out / FALSE_POSITIVE_FOLDER, stem, cut(false_positives)),
        TISSUE_FOLDER: save_crops(out / TISSUE_FOLDER, stem,
                                  cut(tissue_boxes(field, mitoses, scale, spacing_um, config, cfg, rng))),
    }


def write_amibr_positives(amibr: Path, out: Path, config: PipelineConfig, cfg: FieldDataConfig,
                          rng: np.random.Generator, progress: bool = True) -> int:
    """Every AMi-Br mitosis as a verifier positive in `out` (a class folder), cut by `candidate_crops` from its
    crop read at `AMIBR_PIXEL_SIZE_UM`: a `box_px` box on the figure (the crop's centre) shifted once by
    N(0, jitter_px) model pixels, kept inside the crop; returns the count. `rng` is its own generator (seeded
    apart from the fields'), so adding these positives leaves every field crop as it was."""
    out.mkdir(parents=True, exist_ok=True)
    spacing_mm = AMIBR_PIXEL_SIZE_UM / 1000.0
    scale = AMIBR_PIXEL_SIZE_UM / cfg.pixel_size_um
    reach = (cfg.box_px / 2 + config.verifier.context_px) / scale  # the crop's half side, in AMi-Br pixels
    crops = read_amibr(amibr)
    pixels = load_crops([crop.path for crop in crops])
    stains = amibr_slide_stains(crops, pixels, config.verifier.stain_normalization)
    for crop, crop_pixels in progress_iter(zip(crops, pixels), len(crops), "AMi-Br positives", "crop",
                                           enabled=progress):
        image = ArrayRoi(crop_pixels, PhysicalTransform((spacing_mm, spacing_mm)), crop.path)
        low, high = np.full(2, reach), np.array([image.width, image.height]) - reach
        centre = np.array([image.width, image.height]) / 2 + rng.normal(0, cfg.jitter_px, 2) / scale
        centre = np.clip(centre, np.minimum(low, high), np.maximum(low, high))
        boxes = square_boxes(centre[None], (cfg.box_px / scale, cfg.box_px / scale))
        cut = candidate_crops(image, boxes, cfg.pixel_size_um, config.image.resample_tolerance,
                              config.verifier.crop_size, config.verifier.context_px, config.merging.box_size_px)
        Image.fromarray(normalise(cut, stains[crop.slide])[0]).save(out / f"{Path(crop.uid).stem}.png")
    return len(crops)


def amibr_slide_stains(crops: list[AmibrCrop], pixels: np.ndarray,
                       stain_normalization: str) -> dict[str, ImageStains | None]:
    """Each AMi-Br slide's stains for "macenko" (None for all under "none"): estimated from the pixels of all the
    slide's crops together (`pixels`: the crops', in `crops`' order). The fields' crops are normalised with their
    field's stains; an AMi-Br crop has no field around it, and one 128 px crop is too small a sample of a stain (a
    mitosis fills much of it), while the crops of one slide share its staining."""
    slides: dict[str, list[np.ndarray]] = {}
    for crop, crop_pixels in zip(crops, pixels):
        slides.setdefault(crop.slide, []).append(crop_pixels.reshape(-1, 3))
    if stain_normalization == "none":
        return dict.fromkeys(slides)
    return {slide: estimate_or_warn(np.concatenate(parts), f"AMi-Br slide {slide}") for slide, parts in slides.items()}


def link_amibr_positives(out: Path, sets: dict[str, dict[str, list[str]]]) -> None:
    """The AMi-Br positives join every set's train split (symlinks into verifier/crops/amibr/)."""
    source = out / "verifier" / "crops" / AMIBR_SLIDE / POSITIVE_FOLDER
    for name in sets:
        target = out / "verifier" / name / "train" / POSITIVE_FOLDER
        target.mkdir(parents=True, exist_ok=True)
        for crop in sorted(source.glob("*.png")):
            link_crop(crop, target / f"{AMIBR_SLIDE}_{crop.name}")


def link_crop(crop: Path, link: Path) -> None:
    """`link` → `crop` as a relative symlink (kept if it is there already)."""
    if not link.exists():
        link.symlink_to(os.path.relpath(crop, link.parent))


def link_sets(out: Path, sets: dict[str, dict[str, list[str]]], slide_of: dict[str, str]) -> None:
    """verifier/<set>/<split>/<class>/ symlinks into verifier/crops/<slide>/<class>/ (test slides left out)."""
    crops = out / "verifier" / "crops"
    for name, splits in sets.items():
        for split in ("train", "val"):
            for frame in splits[split]:
                stem = Path(frame).stem
                for folder in (crops / slide_of[frame]).iterdir():
                    target = out / "verifier" / name / split / folder.name
                    target.mkdir(parents=True, exist_ok=True)
                    for crop in folder.glob(f"{stem}_*.png"):
                        link_crop(crop, target / crop.name)


# ---- the whole dataset ------------------------------------------------------------------------------------------

def write_dataset_yamls(out: Path, sets: dict[str, dict[str, list[str]]], tiles: dict[str, list[str]],
                        extra_train: list[str], pixel_size_um: float) -> None:
    """ultralytics dataset files per set; `pixel_size_um` goes into the trained detector's checkpoint."""
    det = out / "detection"
    for name, splits in sets.items():
        for split, frames in splits.items():
            lines = [det / p for f in frames for p in tiles[f]] + ([Path(p) for p in extra_train] if split == "train"
                                                                    else [])
            (det / f"{name}_{split}.txt").write_text("".join(f"{p.resolve()}\n" for p in lines))
        data = {"path": str(det.resolve()), "train": f"{name}_train.txt", "val": f"{name}_val.txt",
                "names": {0: "mitotic figure"}, "pixel_size_um": pixel_size_um}
        if splits["test"]:
            data["test"] = f"{name}_test.txt"
        (det / f"{name}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def amibr_canvases(folder: Path | None) -> list[str]:
    """The training canvases of a `training.amibr_detection` output, to add to every training set."""
    if folder is None:
        return []
    images = sorted((folder / "detection" / "images" / "train").glob("*.png"))
    if not images:
        raise InputError(f"no training canvases in {folder}/detection/images/train (training.amibr_detection --out)")
    return [str(p.resolve()) for p in images]


def prepare(root: Path, out: Path, detector: str | None = None, cfg: FieldDataConfig | None = None,
            amibr: Path | None = None, progress: bool = True, config_path: Path | None = None,
            amibr_positives: Path | None = None) -> dict:
    """`config_path`: a partial pipeline YAML (as for process.py) whose verifier crop settings the crops follow.
    `amibr`: a `training.amibr_detection` output whose canvases join the detection sets; `amibr_positives`: the
    AMi-Br crops folder, whose mitoses join the verifier's train splits."""
    cfg = cfg or FieldDataConfig()
    if (out / "folds.json").exists():
        raise InputError(f"{out} already holds a prepared dataset; choose an empty --out")
    index = load_field_index(root)
    folds = slide_folds(index, cfg.folds)
    sets = frame_splits(index, folds, cfg)
    extra = amibr_canvases(amibr)
    overrides = {"runtime.device": "cpu"} | ({"proposals.weights": str(detector)} if detector else {})
    config = resolve_config(config_path, overrides=overrides)
    config.verifier.single_crop_setting("context_px", "prepare_fields (--config)")
    config.verifier.single_crop_setting("stain_normalization", "prepare_fields (--config)")
    chain = Track1Detector.from_config(config, with_verifier=False, with_atypical=False)
    for sub in ("detection/images", "detection/labels", "verifier/crops"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    mitoses_by_frame = {f: g[["x", "y"]].to_numpy(np.float64) for f, g in index.mitoses.groupby("frame")}
    tiles, counts, rows = {}, {}, []
    for row in progress_iter(index.frames.itertuples(), len(index.frames), "fields", "field", enabled=progress):
        field, stem = open_field(row.path, index.spacing_um), Path(row.frame).stem
        mitoses = mitoses_by_frame.get(row.frame, np.zeros((0, 2)))
        tiles[row.frame] = write_tiles(field, stem, mitoses, out / "detection", cfg,
                                       config.image.resample_tolerance)
        candidates, _ = chain.candidates(field)
        rows += [(row.frame, row.slide, *map(float, box), float(score))
                 for box, score in zip(candidates.boxes, candidates.scores)]
        written = write_crops(field, stem, mitoses, np.asarray(candidates.boxes, np.float64).reshape(-1, 4),
                              out / "verifier" / "crops" / row.slide, config, cfg, rng)
        for folder, count in written.items():
            counts.setdefault(row.slide, {}).setdefault(folder, 0)
            counts[row.slide][folder] += count
    with (out / "candidates.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CANDIDATE_COLUMNS)
        writer.writerows(rows)
    write_dataset_yamls(out, sets, tiles, extra, cfg.pixel_size_um)
    link_sets(out, sets, dict(zip(index.frames["frame"], index.frames["slide"])))
    amibr_count = 0
    if amibr_positives is not None:
        amibr_count = write_amibr_positives(amibr_positives, out / "verifier" / "crops" / AMIBR_SLIDE / POSITIVE_FOLDER,
                                            config, cfg, np.random.default_rng([cfg.seed, 1]), progress)
        link_amibr_positives(out, sets)
    summary = {"root": str(root), "detector": config.proposals.weights, "settings": asdict(cfg),
               "crops": {"crop_size": config.verifier.crop_size, "context_px": config.verifier.context_px,
                         "stain_normalization": config.verifier.stain_normalization},
               "folds": folds, "slides": {s: {"frames": int((index.frames["slide"] == s).sum()),
                                             "mitoses": int((index.mitoses["slide"] == s).sum()), **counts.get(s, {})}
                                         for s in sorted(folds)},
               "sets": {name: {split: len(frames) for split, frames in splits.items()} for name, splits in sets.items()},
               "amibr_canvases": len(extra), "amibr_positives": amibr_count}
    (out / "folds.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, type=Path, help="fields in the MITOS-ATYPIA-14 layout")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--detector", default=None, help="proposal weights for the false positives "
                        "(default: the shipped proposals.weights)")
    parser.add_argument("--amibr-canvases", type=Path, default=None,
                        help="a training.amibr_detection --out folder: its training canvases join every train set")
    parser.add_argument("--amibr-positives", type=Path, default=None,
                        help="the AMi-Br crops folder (amibr_train_split.csv): its mitoses join every verifier "
                        "train split as positives")
    parser.add_argument("--config", type=Path, default=None,
                        help="partial pipeline YAML: the verifier.crop_size / context_px the crops are cut with "
                             "(one context; e.g. training/configs/fields_context.yaml)")
    defaults = FieldDataConfig()
    for key in ("pixel_size_um", "folds", "val_fraction", "jitter_copies", "jitter_px", "tissue_per_field", "seed"):
        value = getattr(defaults, key)
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    add_debug_option(parser)
    add_quiet_option(parser)
    return parser.parse_args(argv)


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = FieldDataConfig(**{k: getattr(args, k) for k in ("pixel_size_um", "folds", "val_fraction",
                                                           "jitter_copies", "jitter_px", "tissue_per_field", "seed")})
    summary = prepare(args.root, args.out, args.detector, cfg, args.amibr_canvases, config_path=args.config,
                      amibr_positives=args.amibr_positives)
    print(json.dumps({"folds": summary["folds"], "sets": summary["sets"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
