"""Candidate crops for the Track 1 verifier, cut exactly as the pipeline cuts them, in an ImageFolder-like layout.

    python -m training.verifier_data --annotations MIDOG++.json --xvalidation datasets_xvalidation.csv \\
        --images DIR --out DIR [--detector weights/detector.pt | --detections detections.csv]
        [--config PIPELINE.yaml] [--splits train val] [--seed 0]

    OUT/train/mitotic_figure/001_00012.png    positives: the MIDOG++ mitotic figures
    OUT/train/hard_negative/001_00003.png     negatives: the experts' look-alikes (MIDOG++ category 2)
    OUT/train/false_positive/001_fp0004.png   negatives: the proposal network's false positives (optional)
    OUT/val/...                               the same for the validation slides

`training.train_verifier` reads this layout (the `mitotic_figure` folder is positive, every other folder negative).
Slides are split with `training.midogpp.split_slides` and the same seed as the YOLO dataset, so the verifier never
trains on a slide that the detector is validated or tested on.

A crop is the candidate's box grown by `verifier.context_px`, clipped to the image, resized (antialiased bilinear)
to `verifier.crop_size` — `midog.verifier.box_crops`, the pipeline's own function, so training
and inference crops are the same.

False positives: a detection of the proposal network on a training/validation slide (`--detector`: run here with
the pipeline's own tiling, proposal and merging stages and settings, written to OUT/detections.csv; or
`--detections`: a CSV made elsewhere) whose centre is farther than `radius_px` (30 px = 7.5 µm at 0.25 µm/px, the
challenge's matching radius) from every mitotic figure. Detections near a true figure are never used as negatives,
even when they are duplicates the evaluation would count as false positives: their crops show a mitotic figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image

from midog.config import PipelineConfig, VerifierConfig, resolve_config
from midog.cli import OneLineArgumentParser, add_debug_option, add_quiet_option, entry_point
from midog.errors import InputError
from midog.pipeline import Track1Detector
from midog.progress import progress_iter
from midog.roi_io import open_roi
from midog.verifier import box_crops
from training.midogpp import HARD_NEGATIVE, MITOTIC_FIGURE, SPLIT_RATIOS, MidogppIndex, load_midogpp, split_slides
from training.train_verifier import POSITIVE_FOLDER

HARD_NEGATIVE_FOLDER = "hard_negative"
FALSE_POSITIVE_FOLDER = "false_positive"
DETECTION_COLUMNS = ("slide", "x1", "y1", "x2", "y2", "score")


@dataclass
class CropConfig:
    crop_size: int = VerifierConfig.crop_size
    context_px: int = VerifierConfig.context_px
    box_size_px: int = 50
    """Side of the square used for a degenerate box (as `merging.box_size_px` in the pipeline)."""
    radius_px: float = 30.0
    """A detection farther than this from every mitotic figure is a false positive."""
    min_score: float = 0.0
    """Detections below this confidence are ignored."""
    max_false_positives_per_slide: int = 0
    """Keep at most this many false positives per slide, highest scores first (0 = all)."""


def far_from(points: np.ndarray, truth: np.ndarray, spacing: tuple[float, float], radius: float) -> np.ndarray:
    """Mask of the (n, 2) pixel points farther than `radius` from every (m, 2) `truth` point. `spacing` (x, y) turns
    pixels into the radius's unit: (1, 1) for a radius in pixels, µm/px for one in µm (anisotropic scans)."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    truth = np.asarray(truth, dtype=np.float64).reshape(-1, 2)
    if not len(truth):
        return np.ones(len(points), dtype=bool)
    delta = (points[:, None, :] - truth[None]) * np.asarray(spacing)
    return np.sqrt((delta ** 2).sum(-1)).min(axis=1) > radius


def false_positives(pred_boxes: np.ndarray, gt_boxes: np.ndarray, radius_px: float,
                    scores: np.ndarray | None = None, min_score: float = 0.0) -> np.ndarray:
    """Indices of the predictions whose centre lies farther than `radius_px` from every ground-truth centre.

    `pred_boxes`, `gt_boxes`: (N, 4) / (M, 4) [x1, y1, x2, y2] in image pixels; pass only the mitotic figures as
    ground truth. Predictions below `min_score` are left out. Indices come sorted by descending score.
    """
    pred = np.asarray(pred_boxes, dtype=np.float64).reshape(-1, 4)
    gt = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.ones(len(pred)) if scores is None else np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(scores) != len(pred):
        raise ValueError(f"{len(pred)} boxes but {len(scores)} scores")
    far = far_from((pred[:, :2] + pred[:, 2:]) / 2, (gt[:, :2] + gt[:, 2:]) / 2, (1.0, 1.0), radius_px)
    keep = np.flatnonzero(far & (scores >= min_score))
    return keep[np.argsort(-scores[keep], kind="stable")]


def cut_crops(image, boxes: np.ndarray, cfg: CropConfig) -> np.ndarray:
    """(N, crop_size, crop_size, 3) uint8 crops of `boxes` from an `RoiImage`, as the pipeline's verifier cuts them."""
    return box_crops(image, boxes, cfg.crop_size, cfg.context_px, cfg.box_size_px)


def false_positive_crops(image, pred_boxes: np.ndarray, scores: np.ndarray, gt_boxes: np.ndarray,
                         cfg: CropConfig) -> tuple[np.ndarray, np.ndarray]:
    """Crops of the detector's false positives on one image, and their indices into `pred_boxes`."""
    index = false_positives(pred_boxes, gt_boxes, cfg.radius_px, scores, cfg.min_score)
    if cfg.max_false_positives_per_slide > 0:
        index = index[:cfg.max_false_positives_per_slide]
    return cut_crops(image, np.asarray(pred_boxes).reshape(-1, 4)[index], cfg), index


def load_detections(path: str | os.PathLike[str]) -> pd.DataFrame:
    """A CSV with columns slide (MIDOG++ image id), x1, y1, x2, y2 (image pixels), score."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"detections file not found: {path}")
    table = pd.read_csv(path)
    missing = set(DETECTION_COLUMNS) - set(table.columns)
    if missing:
        raise InputError(f"{path} lacks columns {sorted(missing)} (expected {', '.join(DETECTION_COLUMNS)})")
    return table


def detect_slides(index: MidogppIndex, images: str | os.PathLike[str], detector: str | os.PathLike[str],
                  splits: Sequence[str] = ("train", "val"), seed: int = 0, config: PipelineConfig | None = None,
                  progress: bool = True, ratios: Sequence[float] = SPLIT_RATIOS) -> pd.DataFrame:
    """Run the proposal network over every slide of `splits`: a table slide, x1, y1, x2, y2, score."""
    config = config or resolve_config()
    config = dataclasses.replace(config, proposals=dataclasses.replace(config.proposals, weights=str(detector)))
    chain = Track1Detector.from_config(config, with_verifier=False, with_atypical=False)
    split = split_slides(index.slides, ratios, seed)
    chosen = index.slides[split.isin(list(splits)).to_numpy()]
    rows = []
    for row in progress_iter(chosen.itertuples(), len(chosen), "proposals", "slide", progress):
        with open_roi(Path(images) / row.file_name, config.image.fallback_spacing_um,
                      config.image.in_memory_max_megapixels, config.image.segment_cache_mb,
                      config.image.max_spacing_um) as image:
            candidates, _ = chain.candidates(image)
        rows += [(int(row.slide), *map(float, box), float(score))
                 for box, score in zip(candidates.boxes, candidates.scores)]
    return pd.DataFrame(rows, columns=list(DETECTION_COLUMNS))


def extract(index: MidogppIndex, images: str | os.PathLike[str], out: str | os.PathLike[str],
            splits: Sequence[str] = ("train", "val"), seed: int = 0, cfg: CropConfig | None = None,
            detections: pd.DataFrame | None = None, progress: bool = True,
            ratios: Sequence[float] = SPLIT_RATIOS) -> dict[str, dict[str, int]]:
    """Write the crops of every slide in `splits`; returns the number of crops per split and folder."""
    cfg = cfg or CropConfig()
    images, out = Path(images), Path(out)
    split = split_slides(index.slides, ratios, seed)
    chosen = index.slides.assign(split=split.to_numpy())
    chosen = chosen[chosen["split"].isin(list(splits))]
    absent = [f for f in chosen["file_name"] if not (images / f).is_file()]
    if absent:
        raise InputError(f"{len(absent)} MIDOG++ images are missing from {images}, e.g. {absent[0]}")
    counts = {s: {POSITIVE_FOLDER: 0, HARD_NEGATIVE_FOLDER: 0, FALSE_POSITIVE_FOLDER: 0} for s in splits}
    boxes_by_slide = dict(tuple(index.boxes.groupby("slide")))
    dets_by_slide = dict(tuple(detections.groupby("slide"))) if detections is not None else {}
    for row in progress_iter(chosen.itertuples(), len(chosen), "verifier crops", "slide", progress):
        slide = int(row.slide)
        own = boxes_by_slide.get(slide, index.boxes.iloc[:0])
        xyxy = own[["x1", "y1", "x2", "y2"]].to_numpy()
        with open_roi(images / row.file_name) as image:
            for category, folder in ((MITOTIC_FIGURE, POSITIVE_FOLDER), (HARD_NEGATIVE, HARD_NEGATIVE_FOLDER)):
                mask = (own["category"] == category).to_numpy()
                crops = cut_crops(image, xyxy[mask], cfg)
                ids = own.index[mask]
                _save(out / row.split / folder, [f"{slide:03d}_{int(i):05d}" for i in ids], crops)
                counts[row.split][folder] += len(crops)
            if slide in dets_by_slide:
                det = dets_by_slide[slide]
                crops, idx = false_positive_crops(image, det[["x1", "y1", "x2", "y2"]].to_numpy(),
                                                  det["score"].to_numpy(), xyxy[own["category"] == MITOTIC_FIGURE],
                                                  cfg)
                _save(out / row.split / FALSE_POSITIVE_FOLDER, [f"{slide:03d}_fp{int(i):05d}" for i in idx], crops)
                counts[row.split][FALSE_POSITIVE_FOLDER] += len(crops)
    (out / "crops.json").write_text(json.dumps({"seed": seed, "crop_size": cfg.crop_size,
                                                "context_px": cfg.context_px, "counts": counts}, indent=2) + "\n")
    return counts


def _save(folder: Path, names: list[str], crops: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, crop in zip(names, crops):
        Image.fromarray(crop).save(folder / f"{name}.png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", required=True, type=Path)
    parser.add_argument("--xvalidation", required=True, type=Path)
    parser.add_argument("--images", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--detector", type=Path, help="proposal network weights: run it on the slides for false "
                        "positives (writes OUT/detections.csv)")
    source.add_argument("--detections", type=Path, help="CSV slide,x1,y1,x2,y2,score of the proposal network")
    parser.add_argument("--config", type=Path, help="partial pipeline config for --detector (tiling, proposals, "
                        "merging); default: midog/configs/default.yaml")
    parser.add_argument("--splits", nargs="+", default=["train", "val"], choices=("train", "val", "test"))
    parser.add_argument("--seed", type=int, default=0, help="slide split seed (use the YOLO dataset's)")
    parser.add_argument("--ratios", type=float, nargs=3, default=SPLIT_RATIOS, metavar=("TRAIN", "VAL", "TEST"),
                        help="slide split ratios (use the YOLO dataset's, as given to prepare_midogpp)")
    parser.add_argument("--crop-size", type=int, default=CropConfig.crop_size)
    parser.add_argument("--context-px", type=int, default=CropConfig.context_px)
    parser.add_argument("--radius-px", type=float, default=CropConfig.radius_px)
    parser.add_argument("--min-score", type=float, default=CropConfig.min_score)
    parser.add_argument("--max-fp-per-slide", type=int, default=0)
    add_debug_option(parser)
    add_quiet_option(parser)
    return parser.parse_args(argv)


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = CropConfig(crop_size=args.crop_size, context_px=args.context_px, radius_px=args.radius_px,
                     min_score=args.min_score, max_false_positives_per_slide=args.max_fp_per_slide)
    index = load_midogpp(args.annotations, args.xvalidation)
    detections = load_detections(args.detections) if args.detections else None
    if args.detector:
        detections = detect_slides(index, args.images, args.detector, args.splits, args.seed,
                                   resolve_config(args.config, overrides={"proposals.weights": str(args.detector)}),
                                   ratios=args.ratios)
        args.out.mkdir(parents=True, exist_ok=True)
        detections.to_csv(args.out / "detections.csv", index=False)
    counts = extract(index, args.images, args.out, args.splits, args.seed, cfg, detections, ratios=args.ratios)
    print(json.dumps(counts, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
