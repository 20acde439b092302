"""Real full fields (MITOS-ATYPIA-14 layout): the index, slide folds, official per-slide scoring and a floor.

Layout: `<root>/frames/<slide>_<field>.jpg` and `<root>/mitoses.csv` (frame, slide, x, y: figure centres in
pixels). Ground truth goes to millimetres like the pipeline's output (continuous pixel index times the spacing,
`PhysicalTransform.to_mm`), and is scored with the official Track 1 functions of `midog.evaluate.track1`.

The darkest-blob floor is the score any detector must beat: mitotic figures are dark, so "the darkest blobs"
is the simplest detector there is. See `darkest_blobs`.

    python -m training.fields --root ../shared/data/mitos-atypia-14 --report OUT.json [--folds 3]
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

from midog.cli import OneLineArgumentParser, add_debug_option, entry_point
from midog.errors import InputError, first_line
from midog.evaluate.track1 import (ImagePrediction, ImageTruth, ThresholdSweep, average_precision, froc_curve,
                                   precision_recall_f1, score_detection, threshold_curve)
from midog.outputs import write_json_atomic
from midog.roi_io import ArrayRoi, PhysicalTransform

FIELD_SPACING_UM = (0.2273, 0.2275)
"""MITOS-ATYPIA-14 x40 (Hamamatsu NanoZoomer 2.0-HT) pixel size in µm, x then y."""
MITOSES_CSV = "mitoses.csv"
FRAMES_DIR = "frames"
BLOB_SIGMA_PX = 4.0
BLOB_WINDOW_PX = 31
LUMINANCE = (0.299, 0.587, 0.114)
"""ITU-R BT.601 luma weights (what PIL's "L" mode uses)."""

Prediction = tuple[np.ndarray, np.ndarray]
"""(points_mm (n, 2), probabilities (n,)) for one frame."""


# ---- index ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FieldIndex:
    frames: pd.DataFrame
    """frame (file name, as in the CSV), slide, path, width, height; sorted by frame."""
    mitoses: pd.DataFrame
    """frame, slide, x, y (pixels, continuous index), in CSV order."""
    spacing_um: tuple[float, float] = FIELD_SPACING_UM

    @property
    def transform(self) -> PhysicalTransform:
        return PhysicalTransform(spacing_mm=(self.spacing_um[0] / 1000.0, self.spacing_um[1] / 1000.0))

    def slides(self) -> list[str]:
        return sorted(self.frames["slide"].unique())

    def truth_mm(self) -> dict[str, np.ndarray]:
        """frame → (n, 2) ground-truth points in mm (every frame of the index, possibly empty)."""
        by_frame = {f: g[["x", "y"]].to_numpy(np.float64) for f, g in self.mitoses.groupby("frame", sort=False)}
        return {f: self.transform.to_mm(by_frame.get(f, np.zeros((0, 2)))) for f in self.frames["frame"]}

    def frames_by_slide(self) -> dict[str, list[str]]:
        return {s: g["frame"].tolist() for s, g in self.frames.groupby("slide", sort=True)}


def load_field_index(root: str | Path, spacing_um: tuple[float, float] = FIELD_SPACING_UM) -> FieldIndex:
    """Every JPEG in `root/frames` (sizes from the header, nothing decoded) and every mitosis of the CSV."""
    root = Path(root)
    frames_dir, csv = root / FRAMES_DIR, root / MITOSES_CSV
    if not frames_dir.is_dir():
        raise InputError(f"no {FRAMES_DIR}/ folder in {root}")
    if not csv.is_file():
        raise InputError(f"no {MITOSES_CSV} in {root}")
    frames = pd.DataFrame([_frame_row(p) for p in sorted(frames_dir.glob("*.jpg"))],
                          columns=["frame", "slide", "path", "width", "height"])
    if frames.empty:
        raise InputError(f"no .jpg frame in {frames_dir}")
    mitoses = _read_mitoses(csv)
    _check_mitoses(mitoses, frames.set_index("frame"))
    return FieldIndex(frames.reset_index(drop=True), mitoses, spacing_um)


def _frame_row(path: Path) -> tuple[str, str, Path, int, int]:
    slide, sep, _ = path.stem.partition("_")
    if not sep or not slide:
        raise InputError(f"frame {path.name}: name is not <slide>_<field>.jpg")
    try:
        with Image.open(path) as image:  # lazy: reads the header only
            width, height = image.size
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read frame {path.name}: {first_line(err)}") from err
    return path.name, slide, path, width, height


def _read_mitoses(csv: Path) -> pd.DataFrame:
    try:
        mitoses = pd.read_csv(csv, dtype={"frame": str, "slide": str})
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read {csv}: {first_line(err)}") from err
    missing = [c for c in ("frame", "slide", "x", "y") if c not in mitoses.columns]
    if missing:
        raise InputError(f"{csv.name}: column(s) {missing} missing; expected frame, slide, x, y")
    mitoses = mitoses[["frame", "slide", "x", "y"]].copy()
    try:
        mitoses[["x", "y"]] = mitoses[["x", "y"]].astype(np.float64)
    except ValueError as err:
        raise InputError(f"{csv.name}: x and y must be numbers: {first_line(err)}") from err
    if mitoses[["x", "y"]].isna().any().any():
        raise InputError(f"{csv.name}: a mitosis has no x or y")
    return mitoses


def _check_mitoses(mitoses: pd.DataFrame, frames: pd.DataFrame) -> None:
    """Each row names an existing frame of its slide and lies in it: 0 <= x <= width, 0 <= y <= height."""
    for row in mitoses.itertuples(index=False):
        if row.frame not in frames.index:
            raise InputError(f"{MITOSES_CSV}: frame {row.frame} has no file in {FRAMES_DIR}/")
        frame = frames.loc[row.frame]
        if row.slide != frame.slide:
            raise InputError(f"{MITOSES_CSV}: frame {row.frame} is listed under slide {row.slide}, "
                             f"its name says {frame.slide}")
        if not (0 <= row.x <= frame.width and 0 <= row.y <= frame.height):
            raise InputError(f"{MITOSES_CSV}: mitosis ({row.x:g}, {row.y:g}) lies outside frame {row.frame} "
                             f"({frame.width} x {frame.height} px)")


def open_field(path: str | Path, spacing_um: tuple[float, float] = FIELD_SPACING_UM) -> ArrayRoi:
    """A frame as RGB uint8 pixels with its physical spacing."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"frame not found: {path}")
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read frame {path.name}: {first_line(err)}") from err
    return ArrayRoi(pixels, PhysicalTransform(spacing_mm=(spacing_um[0] / 1000.0, spacing_um[1] / 1000.0)), path)


# ---- folds ---------------------------------------------------------------------------------------------------

def slide_folds(index: FieldIndex, n_folds: int = 3) -> dict[str, int]:
    """slide → fold, balancing mitoses greedily: the slide with most mitoses first (ties by name) goes to the fold
    with the fewest so far (ties: the lowest fold number)."""
    slides = index.slides()
    if not 1 <= n_folds <= len(slides):
        raise InputError(f"cannot make {n_folds} folds of {len(slides)} slides")
    counts = index.mitoses["slide"].value_counts()
    load = [0] * n_folds
    folds: dict[str, int] = {}
    for slide in sorted(slides, key=lambda s: (-int(counts.get(s, 0)), s)):
        fold = min(range(n_folds), key=lambda f: (load[f], f))
        folds[slide] = fold
        load[fold] += int(counts.get(slide, 0))
    return dict(sorted(folds.items()))


# ---- official scoring ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Frame:
    truth: ImageTruth
    prediction: ImagePrediction


def _frames(predictions: Mapping[str, Prediction], names: Sequence[str],
            truth: Mapping[str, np.ndarray]) -> list[_Frame]:
    """The official per-image structures; a frame without predictions has none (all its figures are missed)."""
    unknown = sorted(set(predictions) - set(truth))
    if unknown:
        raise InputError(f"predictions for frame(s) not in the index: {', '.join(unknown[:5])}")
    out = []
    for name in names:
        if name not in truth:
            raise InputError(f"frame {name} is not in the index")
        points, probability = predictions.get(name, (np.zeros((0, 2)), np.zeros(0)))
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        probability = np.asarray(probability, dtype=np.float64).reshape(-1)
        if len(points) != len(probability):
            raise InputError(f"frame {name}: {len(points)} points but {len(probability)} probabilities")
        xyz = np.column_stack([points, np.zeros(len(points))])
        gt = np.column_stack([truth[name], np.zeros(len(truth[name]))])
        out.append(_Frame(ImageTruth(name, gt, None, "hotspot"),
                          ImagePrediction(name, xyz, np.ones(len(xyz), dtype=bool), probability)))
    return out


def _best(sweeps: Sequence[ThresholdSweep]) -> tuple[float, float]:
    """(threshold, F1) maximising F1 over every distinct probability (probability >= threshold is kept)."""
    probabilities = np.unique(np.concatenate([s.probabilities for s in sweeps] + [np.zeros(0)]))
    if len(probabilities) == 0:
        return float("nan"), float(precision_recall_f1(0, 0, sum(s.n_truth for s in sweeps))[2])
    return threshold_curve(sweeps, probabilities).best()


def _group(frames: Sequence[_Frame], threshold: float) -> dict[str, Any]:
    tp = fp = fn = 0
    for f in frames:
        kept = f.prediction.points[f.prediction.probability >= threshold]
        score = score_detection(f.truth.points, kept)
        tp, fp, fn = tp + score.true_positives, fp + score.false_positives, fn + score.false_negatives
    precision, recall, f1 = precision_recall_f1(tp, fp, fn)
    sweeps = [ThresholdSweep(f.truth.points, f.prediction) for f in frames]
    best_threshold, best_f1 = _best(sweeps) if frames else (float("nan"), float(f1))
    return {"frames": len(frames), "mitoses": tp + fn, "tp": tp, "fp": fp, "fn": fn, "precision": precision,
            "recall": recall, "f1": f1, "AP": average_precision([(f.truth, f.prediction) for f in frames]),
            "froc_auc": froc_curve(sweeps).auc if frames else float("nan"),
            "best_f1": best_f1, "best_threshold": best_threshold}


def score_fields(predictions: Mapping[str, Prediction], index: FieldIndex,
                 frames_by_group: Mapping[str, Sequence[str]] | None = None,
                 threshold: float = 0.5) -> dict[str, Any]:
    """Official Track 1 numbers per group (default: per slide) and overall (every frame of the groups).

    A point counts as a mitotic figure at `threshold` when its probability >= threshold; AP and FROC use every
    point ranked by probability; best_f1 / best_threshold are each group's own optimum.
    """
    groups = dict(frames_by_group if frames_by_group is not None else index.frames_by_slide())
    truth = index.truth_mm()
    per_group = {g: _frames(predictions, names, truth) for g, names in groups.items()}
    everything = list(dict.fromkeys(n for names in groups.values() for n in names))
    return {"threshold": threshold,
            "groups": {g: _group(frames, threshold) for g, frames in per_group.items()},
            "overall": _group(_frames(predictions, everything, truth), threshold)}


def best_threshold(predictions: Mapping[str, Prediction], index: FieldIndex,
                   frames: Sequence[str]) -> tuple[float, float]:
    """(threshold, F1) maximising F1 summed over `frames` (tune on validation slides only)."""
    scored = _frames(predictions, frames, index.truth_mm())
    return _best([ThresholdSweep(f.truth.points, f.prediction) for f in scored])


# ---- the darkest-blob floor ----------------------------------------------------------------------------------

def darkest_blobs(rgb: np.ndarray, sigma: float = BLOB_SIGMA_PX,
                  window: int = BLOB_WINDOW_PX) -> tuple[np.ndarray, np.ndarray]:
    """Local maxima of smoothed darkness, at most one per `window` px, darkest first.

    darkness = 255 - BT.601 luma, Gaussian-smoothed (sigma px); a pixel is a maximum when it equals the maximum of
    its window. A plateau (connected equal maxima) gives one point, its pixel nearest the plateau's centroid (then
    the first in raster order); equal maxima closer than the window that are not connected keep the first in rank
    order. Returns points (n, 2) as pixel x, y and scores (n,) = smoothed darkness / 255 in [0, 1].
    """
    grey = np.asarray(rgb, dtype=np.float32)[..., :3] @ np.asarray(LUMINANCE, dtype=np.float32)
    darkness = ndimage.gaussian_filter(255.0 - grey, sigma)
    peaks = darkness == ndimage.maximum_filter(darkness, size=window)
    ys, xs = _plateau_representatives(peaks)
    scores = darkness[ys, xs]
    order = np.lexsort((xs, ys, -scores))
    ys, xs, scores = _suppress_ties(ys[order], xs[order], scores[order], window, darkness.shape)
    return np.column_stack([xs, ys]).astype(np.float64), np.clip(scores / 255.0, 0.0, 1.0).astype(np.float64)


def _plateau_representatives(peaks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One pixel per 8-connected component of `peaks`: the nearest to its centroid, ties in raster order."""
    labels, n = ndimage.label(peaks, structure=np.ones((3, 3), dtype=bool))
    ys, xs = np.nonzero(labels)
    lab = labels[ys, xs]
    size = np.bincount(lab, minlength=n + 1)[lab]
    cy = np.bincount(lab, weights=ys, minlength=n + 1)[lab] / size
    cx = np.bincount(lab, weights=xs, minlength=n + 1)[lab] / size
    order = np.lexsort((np.arange(len(ys)), (ys - cy) ** 2 + (xs - cx) ** 2, lab))
    first = order[np.r_[True, lab[order][1:] != lab[order][:-1]]] if len(order) else order
    return ys[first], xs[first]


def _suppress_ties(ys: np.ndarray, xs: np.ndarray, scores: np.ndarray, window: int,
                   shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy in rank order: drop a point inside the window of a kept one. Two maxima that close must be equal
    (each is the maximum of a window holding the other), so this only breaks ties."""
    half = window // 2
    claimed = np.zeros(shape[:2], dtype=bool)
    keep = np.zeros(len(ys), dtype=bool)
    for i, (y, x) in enumerate(zip(ys.tolist(), xs.tolist())):
        if not claimed[y, x]:
            keep[i] = True
            claimed[max(y - half, 0):y + half + 1, max(x - half, 0):x + half + 1] = True
    return ys[keep], xs[keep], scores[keep]


def blob_predictions(index: FieldIndex) -> dict[str, Prediction]:
    """frame → darkest blobs in mm with their scores, for every frame of the index."""
    out = {}
    for row in index.frames.itertuples(index=False):
        roi = open_field(row.path, index.spacing_um)
        points, scores = darkest_blobs(roi.pixels)
        out[row.frame] = (roi.transform.to_mm(points), scores)
    return out


def floor_report(index: FieldIndex, predictions: Mapping[str, Prediction]) -> dict[str, Any]:
    """The floor: the best F1 over one global score threshold (= keeping the top-ranked points), per slide at it."""
    threshold, f1 = best_threshold(predictions, index, index.frames["frame"].tolist())
    scores = score_fields(predictions, index, threshold=threshold)
    return {"best_f1": f1, "threshold": threshold, "points": int(sum(len(p[1]) for p in predictions.values())),
            **scores}


# ---- command line --------------------------------------------------------------------------------------------

def _finite(value: Any) -> Any:
    """JSON has no NaN: NaN → None, recursively."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def build_report(root: Path, n_folds: int) -> dict[str, Any]:
    start = time.perf_counter()
    index = load_field_index(root)
    folds = slide_folds(index, n_folds)
    frames = index.frames["slide"].value_counts()
    mitoses = index.mitoses["slide"].value_counts()
    slides = {s: {"fold": folds[s], "frames": int(frames.get(s, 0)), "mitoses": int(mitoses.get(s, 0))}
              for s in index.slides()}
    floor = floor_report(index, blob_predictions(index))
    return _finite({"root": str(root), "spacing_um": list(index.spacing_um), "n_folds": n_folds,
                    "slides": slides, "darkest_blob_floor": floor,
                    "seconds": round(time.perf_counter() - start, 1)})


def _print(report: dict[str, Any]) -> None:
    floor = report["darkest_blob_floor"]
    print(f"darkest-blob floor: best F1 {floor['best_f1']:.4f} at score >= {floor['threshold']:.4f} "
          f"({report['seconds']} s)")
    print(f"{'slide':8}{'fold':>5}{'frames':>8}{'mitoses':>9}{'F1':>8}{'prec':>8}{'recall':>8}{'best F1':>9}")
    rows = [(s, v, floor["groups"][s]) for s, v in report["slides"].items()]
    for slide, info, g in rows + [("overall", {"fold": ""}, floor["overall"])]:
        print(f"{slide:8}{info['fold']:>5}{g['frames']:>8}{g['mitoses']:>9}{g['f1']:>8.4f}"
              f"{g['precision']:>8.4f}{g['recall']:>8.4f}{g['best_f1']:>9.4f}")


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="folder with frames/ and mitoses.csv")
    parser.add_argument("--report", type=Path, required=True, help="JSON report to write")
    parser.add_argument("--folds", type=int, default=3)
    add_debug_option(parser)
    args = parser.parse_args(argv)
    report = build_report(args.root, args.folds)
    write_json_atomic(args.report, report)
    _print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
