"""Command line: `python -m midog.evaluate {track1,track2,tune} ...` (see docs/evaluation.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from midog.errors import MidogError
from midog.evaluate.io import GroundTruthError, iter_jobs, read_ground_truth_json
from midog.outputs import write_json_atomic


def _track1(args: argparse.Namespace) -> Any:
    from midog.evaluate import track1

    gt = read_ground_truth_json(args.ground_truth)
    jobs = iter_jobs(args.predictions, 1, set(gt) if isinstance(gt, dict) else set())  # read as they are scored
    return track1.evaluate_jobs(jobs, gt, with_froc=not args.no_froc, ap_backend=args.ap_backend,
                                check_coordinates=not args.no_coordinate_check)


def _track2(args: argparse.Namespace) -> Any:
    from midog.evaluate import track2

    gt = read_ground_truth_json(args.ground_truth)
    known = {e.get("image") for e in gt if isinstance(e, dict)} if isinstance(gt, list) else set()
    evaluation = track2.evaluate_jobs(iter_jobs(args.predictions, 2, known), gt, args.confidence)
    if args.confidence == track2.PRE_2025_07_27 and evaluation.looks_like_p_atypical():
        print("warning: these confidences look like P(atypical) on every page (every 'normal' one below every "
              "'atypical' one), as process.py writes them and the final container reads them, but "
              "--confidence pre-2025-07-27 reads them as the confidence in the stated class: ROC AUC (and a tuned "
              "threshold) are scrambled; drop that option to score them as the challenge did", file=sys.stderr)
    return evaluation


def _print_aggregates(aggregates: dict[str, Any]) -> None:
    for key, value in aggregates.items():
        if isinstance(value, dict):
            continue
        print(f"{key:40s} {value:.6f}" if isinstance(value, float) else f"{key:40s} {value}")


def run_track1(args: argparse.Namespace) -> None:
    evaluation = _track1(args)
    if args.output:
        write_json_atomic(args.output, evaluation.metrics())
    if args.report:
        from midog.evaluate.report import write_track1_report

        write_track1_report(evaluation, args.report, args.images, args.spacing_um, args.max_overlays)
    _print_aggregates(evaluation.aggregates)


def _add_confidence_argument(parser: argparse.ArgumentParser) -> None:
    from midog.evaluate.track2 import CONFIDENCE_READINGS, P_ATYPICAL

    parser.add_argument("--confidence", choices=CONFIDENCE_READINGS, default=P_ATYPICAL,
                        help="how Track 2 confidences are read for ROC AUC: p_atypical (default: P(atypical) on every "
                             "page, as the final official container, 2025-07-27 on, and process.py's output) or "
                             "pre-2025-07-27 (the confidence in the stated class, 1 - P(atypical) on 'normal' pages, "
                             "as the container's versions before 2025-07-27)")


def run_track2(args: argparse.Namespace) -> None:
    evaluation = _track2(args)
    if args.output:
        write_json_atomic(args.output, evaluation.metrics())
    if args.report:
        from midog.evaluate.report import write_track2_report

        write_track2_report(evaluation, args.report)
    _print_aggregates(evaluation.aggregates)
    for key, value in evaluation.aggregates.items():
        if isinstance(value, dict):
            print(f"{key:40s} " + "  ".join(f"{k} {v:.6f}" for k, v in value.items()))


def run_tune(args: argparse.Namespace) -> None:
    from midog.evaluate import tune

    if bool(args.track1_ground_truth) != bool(args.track1_predictions) or \
            bool(args.track2_ground_truth) != bool(args.track2_predictions):
        raise GroundTruthError("give ground truth and predictions together for each track you tune")
    if not args.track1_ground_truth and not args.track2_ground_truth:
        raise GroundTruthError("nothing to tune: give --track1-* and/or --track2-* ground truth and predictions")
    tuned = []
    if args.track1_ground_truth:
        ns = argparse.Namespace(ground_truth=args.track1_ground_truth, predictions=args.track1_predictions,
                                no_froc=True, ap_backend="numpy", no_coordinate_check=False)
        tuned.append(tune.tune_detection(_track1(ns)))
    if args.track2_ground_truth:
        ns = argparse.Namespace(ground_truth=args.track2_ground_truth, predictions=args.track2_predictions,
                                confidence=args.confidence)
        tuned.append(tune.tune_classification(_track2(ns)))
    for t in tuned:
        print(f"{t.key} = {t.threshold:.6f}  ({t.metric} {t.value:.6f})")
    if not args.dry_run:
        tune.write_thresholds(args.config, tuned)
        print(f"written to {args.config}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m midog.evaluate", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    t1 = sub.add_parser("track1", help="detection metrics, as the official Track 1 evaluation container")
    t1.add_argument("--ground-truth", type=Path, required=True, help="official ground_truth.json")
    t1.add_argument("--predictions", type=Path, required=True,
                    help="predictions.json + <pk>/output/mitotic-figures.json, or a folder of <image>.json")
    t1.add_argument("--output", type=Path, help="write the official metrics.json here")
    t1.add_argument("--report", type=Path, help="write metrics.json, summary.md and figures into this folder")
    t1.add_argument("--images", type=Path, help="folder with the images, for TP/FP/FN overlays in the report")
    t1.add_argument("--spacing-um", type=float, default=None, help="µm per pixel of the images (default: read it)")
    t1.add_argument("--max-overlays", type=int, default=12)
    t1.add_argument("--no-froc", action="store_true", help="skip the FROC AUC (faster)")
    t1.add_argument("--no-coordinate-check", action="store_true",
                    help="accept points beyond 10 mm or below -7.5 µm (pixel coordinates?), which the container's "
                         "final version rejects; its first version (the published test metrics.json) did not check")
    t1.add_argument("--ap-backend", choices=("numpy", "torchmetrics"), default="numpy",
                    help="numpy: the same AP computed ~100x faster (default); torchmetrics: the container's code path")
    t1.set_defaults(func=run_track1)

    t2 = sub.add_parser("track2", help="atypical/normal metrics, as the official Track 2 evaluation container")
    t2.add_argument("--ground-truth", type=Path, required=True)
    t2.add_argument("--predictions", type=Path, required=True,
                    help="predictions.json + <pk>/output/multiple-mitotic-figure-classification.json, "
                         "or a folder of <stack>.json")
    t2.add_argument("--output", type=Path)
    t2.add_argument("--report", type=Path)
    _add_confidence_argument(t2)
    t2.set_defaults(func=run_track2)

    tn = sub.add_parser("tune", help="choose verifier.threshold (best F1) and atypical.threshold (best balanced "
                                     "accuracy) on validation predictions and write them into a config")
    tn.add_argument("--track1-ground-truth", type=Path)
    tn.add_argument("--track1-predictions", type=Path)
    tn.add_argument("--track2-ground-truth", type=Path)
    tn.add_argument("--track2-predictions", type=Path)
    tn.add_argument("--config", type=Path, required=True, help="pipeline config YAML to update (created if absent)")
    tn.add_argument("--dry-run", action="store_true", help="print the thresholds without writing the config")
    _add_confidence_argument(tn)
    tn.set_defaults(func=run_tune)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MidogError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
