"""Evaluate a trained Track 1 chain (detector + verifier) on a prepared split, and tune its threshold.

    python -m training.evaluate_chain --detection DIR/detection [--weights-dir weights] [--config BASE.yaml]
        [--tuned-config weights/pipeline.yaml] [--report weights/chain_eval.json] [--limit N]

DIR/detection holds an annotations.json (image → split, slide, figure centres in pixels), as written by
`training.amibr_detection` (canvases) or `training.prepare_midogpp` (its chain/ folder: whole MIDOG++ images).
Each val and test image is run through the pipeline's Track 1 chain with the weights in --weights-dir (a PNG
canvas is first written as a TIFF region of interest, 0.25 µm/px in its resolution tags), and the outputs are scored with `midog.evaluate.track1` (the official F1 at
7.5 µm, AP, FROC AUC; tumour domain = source dataset). The verifier threshold with the best F1 on **val** is
written into --tuned-config (a partial pipeline config; never the shipped default unless you name it) and the
**test** split is scored at that threshold. The test numbers are the ones to report.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import tifffile
from PIL import Image

from midog.config import PipelineConfig, resolve_config
from midog.cli import OneLineArgumentParser, add_debug_option, add_quiet_option, entry_point, read_json_file
from midog.errors import InputError
from midog.evaluate.track1 import Track1Evaluation, evaluate
from midog.evaluate.tune import TunedThreshold, tune_detection, write_thresholds
from midog.outputs import MITOTIC_FIGURE, NON_MITOTIC_FIGURE
from midog.progress import progress_iter

SPACING_UM = 0.25
ROI_TYPE = "hotspot"
"""The official ground truth needs a ROI type; synthetic canvases have none, all are scored as one group."""

DETECTOR_KEY = "detector_confidence"
"""Extra per-point key the pipeline predictor adds (ignored by the scorer) to score the detector alone."""

Predictor = Callable[[Path], dict[str, Any]]
"""A ROI TIFF → the "Multiple points" payload the pipeline writes for it."""


@dataclass
class SplitSet:
    images: list[Path]
    ground_truth: dict[str, Any]
    """Official Track 1 ground-truth format, keyed by image file name."""


def load_split(detection_dir: str | Path, split: str, limit: int | None = None) -> SplitSet:
    """The canvases of one split and their ground truth in millimetres (official format)."""
    detection_dir = Path(detection_dir)
    path = detection_dir / "annotations.json"
    if not path.is_file():
        raise InputError(f"no annotations.json in {detection_dir} (build it with training.amibr_detection)")
    data = read_json_file(path, "detection set annotations")
    spacing_mm = data.get("spacing_um", SPACING_UM) / 1000.0
    images, truth = [], {}
    for name, entry in sorted(data["images"].items()):
        if entry["split"] != split:
            continue
        image = detection_dir / name
        images.append(image)
        truth[image.name] = {
            "annotations": [[f["x"] * spacing_mm, f["y"] * spacing_mm, 0.0] for f in entry["figures"]],
            "tumor domain": entry["slide"].split("/")[0],
            "roi type": ROI_TYPE,
        }
        if limit and len(images) >= limit:
            break
    if not images:
        raise InputError(f"no '{split}' canvases in {path}")
    return SplitSet(images, truth)


def write_roi_tiff(rgb: np.ndarray, path: Path, spacing_um: float = SPACING_UM) -> Path:
    """An RGB region of interest with its pixel spacing in the TIFF resolution tags (pixels per centimetre)."""
    per_cm = 1e4 / spacing_um
    tifffile.imwrite(path, rgb, photometric="rgb", resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
    return path


def pipeline_predictor(config: PipelineConfig, work_dir: Path) -> Predictor:
    """The pipeline's own Track 1 chain (`midog.pipeline.Track1Detector`, models loaded once) on one image at a
    time; its output payload is exactly what `run_track1` writes. Images the ROI reader does not take (the PNG
    canvases) are first written as TIFF regions of interest with their spacing."""
    from midog.outputs import track1_outputs
    from midog.pipeline import Track1Detector
    from midog.roi_io import ROI_SUFFIXES

    detector = Track1Detector.from_config(config, with_atypical=False)

    def predict(image: Path) -> dict[str, Any]:
        roi = image
        if image.suffix.lower() not in ROI_SUFFIXES:
            roi = write_roi_tiff(np.asarray(Image.open(image).convert("RGB")), work_dir / f"{image.stem}.tif")
        try:
            result = detector.detect(roi, progress=False)
            payload = track1_outputs(result.detections)[0]
            for point, detection in zip(payload["points"], result.detections):  # same order, one per candidate
                point[DETECTOR_KEY] = detection.detector_confidence
            return payload
        finally:
            if roi != image:
                roi.unlink()

    return predict


def predict_split(split: SplitSet, predictor: Predictor, desc: str = "images") -> dict[str, Any]:
    """Every image's payload, with a progress bar (`midog.progress`) named `desc`."""
    return {image.name: predictor(image) for image in progress_iter(split.images, len(split.images), desc, "image")}


def relabel(predictions: Mapping[str, Any], threshold: float) -> dict[str, Any]:
    """The same candidates named at another verifier threshold (the pipeline names a point by probability >= t)."""
    out = {}
    for name, payload in predictions.items():
        points = [{**p, "name": MITOTIC_FIGURE if p["probability"] >= threshold else NON_MITOTIC_FIGURE}
                  for p in payload["points"]]
        out[name] = {**payload, "points": points}
    return out


def detector_only(predictions: Mapping[str, Any]) -> dict[str, Any] | None:
    """The same candidates scored by the detector's confidence instead of the verifier (None without it)."""
    out = {}
    for name, payload in predictions.items():
        if any(DETECTOR_KEY not in p for p in payload["points"]):
            return None
        out[name] = {**payload, "points": [{**p, "probability": p[DETECTOR_KEY]} for p in payload["points"]]}
    return out


def summary(evaluation: Track1Evaluation, n_images: int) -> dict[str, Any]:
    agg = evaluation.aggregates
    tp = sum(r.score.true_positives for r in evaluation.images)
    fp = sum(r.score.false_positives for r in evaluation.images)
    fn = sum(r.score.false_negatives for r in evaluation.images)
    keys = [k for k in agg if k.startswith("tumor_") and k.endswith(("_f1", "_AP")) and k != "tumor_roitype"]
    return {"images": n_images, "f1": agg["f1_score"], "precision": agg["precision"], "recall": agg["recall"],
            "AP": agg["AP"], "froc_auc": agg.get("froc_auc"), "true_positives": tp, "false_positives": fp,
            "false_negatives": fn, **{k: agg[k] for k in keys}}


def evaluate_chain(detection_dir: Path, predictor: Predictor, tuned_config: Path | None,
                   limit: int | None = None) -> dict[str, Any]:
    """Predict val and test, tune the verifier threshold on val, score test at it; returns the report."""
    report: dict[str, Any] = {}
    predictions: dict[str, dict[str, Any]] = {}
    sets = {split: load_split(detection_dir, split, limit) for split in ("val", "test")}
    for split, data in sets.items():
        t0 = time.time()
        predictions[split] = predict_split(data, predictor, f"{split} images")
        report[f"{split}_seconds"] = round(time.time() - t0, 1)
    val_eval = evaluate(predictions["val"], sets["val"].ground_truth)
    tuned: TunedThreshold = tune_detection(val_eval)
    report["tuned"] = {"key": tuned.key, "threshold": tuned.threshold, "val_f1": tuned.value}
    report["val_at_tuned"] = summary(evaluate(relabel(predictions["val"], tuned.threshold),
                                              sets["val"].ground_truth), len(sets["val"].images))
    report["test_at_tuned"] = summary(evaluate(relabel(predictions["test"], tuned.threshold),
                                               sets["test"].ground_truth), len(sets["test"].images))
    report["test_as_predicted"] = summary(evaluate(predictions["test"], sets["test"].ground_truth),
                                          len(sets["test"].images))
    val_detector, test_detector = detector_only(predictions["val"]), detector_only(predictions["test"])
    if val_detector is not None and test_detector is not None:
        # the verifier's contribution: the detector alone, its confidence threshold tuned on val the same way
        det_threshold = tune_detection(evaluate(val_detector, sets["val"].ground_truth)).threshold
        report["detector_only"] = {"threshold": det_threshold, "test": summary(
            evaluate(relabel(test_detector, det_threshold), sets["test"].ground_truth), len(sets["test"].images))}
    report["figures"] = {s: sum(len(v["annotations"]) for v in d.ground_truth.values()) for s, d in sets.items()}
    if tuned_config is not None:
        write_thresholds(tuned_config, [tuned])
        report["tuned_config"] = str(tuned_config)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detection", required=True, type=Path, help="DIR/detection from training.amibr_detection")
    parser.add_argument("--weights-dir", type=Path, help="folder with detector.pt and verifier.pt (default: the "
                        "usual lookup, $MIDOG_WEIGHTS_DIR, /opt/ml/model, weights/)")
    parser.add_argument("--config", type=Path, help="partial pipeline config to start from")
    parser.add_argument("--tuned-config", type=Path, help="write the tuned verifier.threshold into this YAML")
    parser.add_argument("--report", type=Path, help="write the report (JSON) here")
    parser.add_argument("--limit", type=int, help="at most this many canvases per split (quick checks)")
    add_debug_option(parser)
    add_quiet_option(parser)
    return parser.parse_args(argv)


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("YOLO_OFFLINE", "1")
    if args.weights_dir is not None:
        os.environ["MIDOG_WEIGHTS_DIR"] = str(args.weights_dir.resolve())
    config = resolve_config(args.config)
    with tempfile.TemporaryDirectory(prefix="midog-chain-") as work:
        report = evaluate_chain(args.detection, pipeline_predictor(config, Path(work)), args.tuned_config, args.limit)
    text = json.dumps(report, indent=2)
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
