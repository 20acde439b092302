"""The Track 1 chain on real full fields, per held-out slide, under the protocol of docs/track1-fields.md.

    python -m training.evaluate_fields --root ../shared/data/mitos-atypia-14 --out REPORT.json
        [--verifier PATH | --verifier fold0=PATH fold1=PATH fold2=PATH] [--detector PATH | fold0=PATH ...]
        (a verifier ensemble: PATH,PATH in place of PATH)
        [--config PIPELINE.yaml] [--floor] [--folds 3] [--candidates DIR/candidates.csv]

For each fold k the chain (`Track1Detector.detect`: tile → propose → merge → verify, at the models' pixel size)
runs on fold k's fields with fold k's models (one path: the same models for every fold, e.g. the shipped ones),
and is scored with the official Track 1 metrics per slide at the median of the *other* folds' F1-optimal
thresholds. `--floor` scores the darkest-blob heuristic the same way instead of a chain. The report holds the
primary figure (mean F1 over folds), the worst slide with >= 20 mitoses, per-fold and per-slide numbers, and the
threshold to ship (median of the folds' optimal thresholds).

`--keep-predictions FILE.npz` keeps every field's output (points, probabilities) and each stage's own probability
(the detector's confidence, the verifier's P(mitotic figure)); `--mean-of A.npz B.npz ...` scores the mean
probability of kept outputs of the same candidates instead of running a chain: with the same saved candidates, that
is a verifier ensemble's output (in product mode detector confidence x the mean of the verifiers' is the mean of the
products), for the cost of reading the files. The chain's final suppression (`merging.final_radius_um` of
`--config`) acts on the mean, so keep the members' outputs with it off (the default). `--stage detector` or
`--stage verifier` scores one stage's probability of kept outputs instead of the output (one file or several), so
the report says which stage ranks the candidates of each slide, and how well.

`--candidates` reuses the merged candidates `training.prepare_fields` saved (its `candidates.csv`) instead of
running the detector again: the same boxes and scores when the detector is the one prepare_fields used (its
`folds.json` names it; a different one is refused), so comparing verifiers costs their verification only.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from midog.config import resolve_config, write_config_values
from midog.cli import OneLineArgumentParser, add_debug_option, add_quiet_option, entry_point, read_json_file
from midog.errors import InputError
from midog.merging import Candidates, suppress_close_points
from midog.outputs import write_json_atomic
from midog.progress import progress_iter
from training.fields import (FieldIndex, Prediction, _finite, best_threshold, blob_predictions, load_field_index,
                             open_field, score_fields, slide_folds)

FIELD_LIMITS = [
    "one tumour type (human breast cancer) and one scanner (Hamamatsu NanoZoomer 2.0-HT, 0.2273 µm/px), JPEG fields",
    "every field holds at least one mitosis: precision on mitosis-free or mitosis-poor tissue is not measured",
    "7 slides in 3 folds: per-slide F1 of the small slides rests on 2-34 mitoses each",
    "no look-alike cells are labelled, and MIDOG's other tumour types, species and scanners are not represented",
]
"""What a real-field figure does not cover; recorded with it in the model card."""

MIN_MITOSES_FOR_WORST = 20
"""Slides with fewer mitoses are too small for a per-slide F1 to mean much (H12 has 2)."""


def fold_frames(index: FieldIndex, folds: Mapping[str, int]) -> dict[int, list[str]]:
    frames: dict[int, list[str]] = {}
    for frame, slide in zip(index.frames["frame"], index.frames["slide"]):
        frames.setdefault(folds[slide], []).append(frame)
    return dict(sorted(frames.items()))


def cross_fold_scores(predictions: Mapping[str, Prediction], index: FieldIndex,
                      folds: Mapping[str, int]) -> dict[str, Any]:
    """Each fold scored at the median of the other folds' F1-optimal thresholds; per fold, per slide, summary."""
    by_fold = fold_frames(index, folds)
    slide_of = dict(zip(index.frames["frame"], index.frames["slide"]))
    optimal = {k: best_threshold(predictions, index, frames)[0] for k, frames in by_fold.items()}
    report: dict[str, Any] = {"folds": {}, "slides": {}}
    for k, frames in by_fold.items():
        others = [t for j, t in optimal.items() if j != k and np.isfinite(t)]
        threshold = float(np.median(others)) if others else float("nan")
        slides = {s: [f for f in frames if slide_of[f] == s] for s in sorted({slide_of[f] for f in frames})}
        scored = score_fields(predictions, index, slides, threshold=threshold)
        report["folds"][str(k)] = {"threshold": threshold, "own_optimal_threshold": optimal[k],
                                   "slides": sorted(slides), **scored["overall"]}
        report["slides"].update(scored["groups"])
    f1s = [fold["f1"] for fold in report["folds"].values()]
    large = {s: v["f1"] for s, v in report["slides"].items() if v["mitoses"] >= MIN_MITOSES_FOR_WORST}
    worst = min(large, key=large.get) if large else None
    finite = [t for t in optimal.values() if np.isfinite(t)]
    report["summary"] = {
        "mean_f1": float(np.mean(f1s)), "fold_f1": f1s,
        "worst_slide": worst, "worst_slide_f1": large.get(worst) if worst else None,
        "mean_AP": float(np.mean([fold["AP"] for fold in report["folds"].values()])),
        "ship_threshold": float(np.median(finite)) if finite else None,
    }
    return report


def per_fold_paths(values: Sequence[str] | None, n_folds: int, what: str) -> dict[int, str | None]:
    """`PATH` (every fold) or `fold0=PATH fold1=PATH ...` (one per fold) → fold → path; None: the shipped one."""
    if not values:
        return {k: None for k in range(n_folds)}
    if len(values) == 1 and "=" not in values[0]:
        return {k: values[0] for k in range(n_folds)}
    paths = {}
    for value in values:
        name, _, path = value.partition("=")
        if not name.startswith("fold") or not name[4:].isdigit() or not path:
            raise InputError(f"--{what} takes PATH or fold<k>=PATH, not {value!r}")
        paths[int(name[4:])] = path
    missing = sorted(set(range(n_folds)) - set(paths))
    if missing:
        raise InputError(f"--{what} names no checkpoint for fold(s) {missing}")
    return paths


def verifier_weights(value: str) -> str | list[str]:
    """`--verifier`'s PATH, or PATH,PATH,... for an ensemble → `verifier.weights`."""
    paths = [part for part in value.split(",") if part]
    if not paths:
        raise InputError(f"--verifier names no checkpoint in {value!r}")
    return paths[0] if len(paths) == 1 else paths


def read_candidates(path: Path, index: FieldIndex) -> dict[str, Candidates]:
    """frame → its merged candidates from a `prepare_fields` candidates.csv (field pixels); a frame without rows
    had none. Refused: a file without the columns, or naming frames the index does not hold."""
    from training.prepare_fields import CANDIDATE_COLUMNS

    if not path.is_file():
        raise InputError(f"--candidates: no such file {path}")
    rows: dict[str, list[list[float]]] = {}
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not set(CANDIDATE_COLUMNS) <= set(reader.fieldnames):
            raise InputError(f"--candidates: {path} lacks the columns {', '.join(CANDIDATE_COLUMNS)} "
                             "(a training.prepare_fields candidates.csv)")
        for row in reader:
            rows.setdefault(row["frame"], []).append([float(row[k]) for k in ("x1", "y1", "x2", "y2", "score")])
    unknown = sorted(set(rows) - set(index.frames["frame"]))
    if unknown:
        raise InputError(f"--candidates: {path} names {len(unknown)} frame(s) not in the fields, e.g. {unknown[0]}")
    found = {}
    for frame in index.frames["frame"]:
        values = np.asarray(rows.get(frame, []), dtype=np.float32).reshape(-1, 5)
        found[frame] = Candidates(values[:, :4], values[:, 4], np.zeros(len(values), dtype=np.int64))
    return found


def candidates_detector(path: Path) -> str | None:
    """The detector that wrote a candidates.csv, as the `folds.json` beside it records it (None: not recorded)."""
    summary = path.parent / "folds.json"
    return read_json_file(summary, "fields summary").get("detector") if summary.is_file() else None


def chain_predictions(index: FieldIndex, folds: Mapping[str, int], verifiers: Mapping[int, str | None],
                      detectors: Mapping[int, str | None], config: Path | None = None,
                      progress: bool = True, candidates: Path | None = None
                      ) -> tuple[dict[str, Prediction], dict[str, np.ndarray]]:
    """Every field run through its fold's chain: frame → (points in mm, output probabilities), and frame → each
    point's (detector confidence, verifier probability), shape (n, 2). `candidates`: a prepare_fields candidates.csv
    to verify instead of running the detector (only with the detector that wrote it)."""
    from midog.pipeline import Track1Detector

    known = read_candidates(candidates, index) if candidates is not None else {}
    if candidates is not None and any(detectors.values()):
        raise InputError("--candidates replaces the detector's run: give either --candidates or --detector")
    written_by = candidates_detector(candidates) if candidates is not None else None

    predictions: dict[str, Prediction] = {}
    stages: dict[str, np.ndarray] = {}
    paths = dict(zip(index.frames["frame"], index.frames["path"]))
    for k, frames in fold_frames(index, folds).items():
        overrides = {"runtime.device": "cpu"}
        if verifiers.get(k):
            overrides["verifier.weights"] = verifier_weights(str(verifiers[k]))
        if detectors.get(k):
            overrides["proposals.weights"] = str(detectors[k])
        resolved = resolve_config(config, overrides=overrides)
        if written_by is not None and written_by != resolved.proposals.weights:
            raise InputError(f"--candidates were written with the detector {written_by}, this chain's is "
                             f"{resolved.proposals.weights}; leave --candidates out to run it")
        chain = Track1Detector.from_config(resolved, with_atypical=False)
        for frame in progress_iter(frames, len(frames), f"fold {k}", "field", enabled=progress):
            result = chain.detect(open_field(paths[frame], index.spacing_um), progress=False,
                                  candidates=known.get(frame))
            predictions[frame] = (np.array([[d.x_mm, d.y_mm] for d in result.detections]).reshape(-1, 2),
                                  np.array([d.probability for d in result.detections]))
            stages[frame] = np.array([[d.detector_confidence, d.verifier_probability]
                                      for d in result.detections]).reshape(-1, 2)
    return predictions, stages


STAGES = {"output": "probabilities", "detector": "detector_confidence", "verifier": "verifier_probability"}
"""`--stage` → the array of a kept file it scores."""


def keep_predictions(path: Path, predictions: Mapping[str, Prediction],
                     stages: Mapping[str, np.ndarray] | None = None) -> None:
    """Every field's output points (mm) and probabilities, in one .npz (frames, per-frame counts, concatenated),
    with each point's detector confidence and verifier probability when `stages` (frame → (n, 2)) is given."""
    frames = sorted(predictions)
    points = [np.asarray(predictions[f][0], dtype=np.float64).reshape(-1, 2) for f in frames]
    arrays = {"probabilities": [np.asarray(predictions[f][1], dtype=np.float64).reshape(-1) for f in frames]}
    if stages is not None:
        per_point = [np.asarray(stages[f], dtype=np.float64).reshape(-1, 2) for f in frames]
        arrays["detector_confidence"] = [s[:, 0] for s in per_point]
        arrays["verifier_probability"] = [s[:, 1] for s in per_point]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        np.savez_compressed(handle, frames=np.array(frames), counts=np.array([len(p) for p in points]),
                            points=np.concatenate(points) if points else np.zeros((0, 2)),
                            **{k: np.concatenate(v) if v else np.zeros(0) for k, v in arrays.items()})


def read_kept_predictions(path: Path, stage: str = "output") -> dict[str, Prediction]:
    """A `keep_predictions` file → frame → (points sorted by x then y, the probabilities of `stage`)."""
    if not path.is_file():
        raise InputError(f"--mean-of: no such file {path}")
    try:
        with np.load(path) as data:
            frames, counts, points = data["frames"].tolist(), data["counts"], data["points"]
            if STAGES[stage] not in data:
                raise InputError(f"--stage {stage}: {path} was kept without each stage's probability; run "
                                 f"evaluate_fields --keep-predictions again")
            probabilities = data[STAGES[stage]]
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"--mean-of: {path} is not an evaluate_fields --keep-predictions file ({err})") from None
    found = {}
    for frame, start, count in zip(frames, np.cumsum(counts) - counts, counts):
        xy, p = points[start:start + count], probabilities[start:start + count]
        order = np.lexsort((xy[:, 1], xy[:, 0]))
        found[frame] = (xy[order], p[order])
    return found


def mean_of_kept(paths: Sequence[Path], stage: str = "output") -> dict[str, Prediction]:
    """The mean probability (of `stage`) of kept outputs of the same candidates (same frames, same points to 1 nm);
    one file: its own."""
    runs = [read_kept_predictions(path, stage) for path in paths]
    for path, run in zip(paths[1:], runs[1:]):
        same = run.keys() == runs[0].keys() and all(
            run[f][0].shape == xy.shape and np.allclose(run[f][0], xy, rtol=0, atol=1e-6)
            for f, (xy, _) in runs[0].items())
        if not same:
            raise InputError(f"--mean-of: {path} holds other fields or candidates than {paths[0]}")
    return {frame: (xy, np.mean([run[frame][1] for run in runs], axis=0)) for frame, (xy, _) in runs[0].items()}


def suppress_kept(predictions: Mapping[str, Prediction], radius_um: float) -> dict[str, Prediction]:
    """Each field's points after the chain's final suppression (`merging.final_radius_um`), for outputs that did not
    go through it: a `--mean-of` mean, whose probabilities exist only once the members' are averaged."""
    found = {}
    for frame, (xy, p) in predictions.items():
        kept = suppress_close_points(np.asarray(xy) * 1000.0, p, radius_um)
        found[frame] = (xy[kept], p[kept])
    return found


def record_in_card(card_path: Path, report: dict[str, Any], argv: list[str] | None) -> None:
    """The report's summary, folds and slides under `real_fields_evaluation` of a model card, with the command."""
    card = read_json_file(card_path, "model card")
    card["real_fields_evaluation"] = {
        "what": "the Track 1 chain on MITOS-ATYPIA-14 fields (7 breast-cancer slides, Hamamatsu, 0.2273 µm/px, JPEG), "
                "3 slide folds, each fold's models trained without its slides and scored at the median of the other "
                "folds' optimal thresholds with the official Track 1 metrics (docs/track1-fields.md)",
        "command": "python -m training.evaluate_fields " + " ".join(argv if argv is not None else sys.argv[1:]),
        "summary": report["summary"], "folds": report["folds"], "slides": report["slides"],
        "limits": FIELD_LIMITS,
    }
    tmp = card_path.with_name(f".{card_path.name}.tmp")
    tmp.write_text(json.dumps(_finite(card), indent=2) + "\n")  # the cards' own layout (write_model_card)
    tmp.replace(card_path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path, help="report JSON")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--verifier", nargs="+", default=None,
                        help="PATH, or fold<k>=PATH per fold; PATH,PATH,... for an ensemble (mean probability)")
    parser.add_argument("--detector", nargs="+", default=None, help="PATH, or fold<k>=PATH per fold")
    parser.add_argument("--config", type=Path, default=None, help="partial pipeline YAML, as for process.py")
    parser.add_argument("--candidates", type=Path, default=None, metavar="CSV",
                        help="a prepare_fields candidates.csv: verify these instead of running the detector again")
    parser.add_argument("--floor", action="store_true", help="score the darkest-blob heuristic instead")
    parser.add_argument("--keep-predictions", type=Path, default=None, metavar="NPZ",
                        help="also write every field's output points and probabilities here")
    parser.add_argument("--mean-of", type=Path, nargs="+", default=None, metavar="NPZ",
                        help="score the mean probability of these --keep-predictions files (the same candidates) "
                             "instead of running a chain")
    parser.add_argument("--stage", choices=sorted(STAGES), default="output",
                        help="with --mean-of: score the output probability (default), the detector's confidence "
                             "alone or the verifier's probability alone")
    parser.add_argument("--name", default=None, help="what the report calls this chain")
    parser.add_argument("--card", type=Path, default=None, help="a model card (.json) to record the summary and "
                        "per-slide numbers in, under 'real_fields_evaluation' (the shipped model's)")
    parser.add_argument("--write-threshold", type=Path, default=None, metavar="PIPELINE_YAML",
                        help="write the ship threshold (median of the folds' optimal thresholds) as "
                        "verifier.threshold into this pipeline.yaml")
    add_debug_option(parser)
    add_quiet_option(parser)
    return parser.parse_args(argv)


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    index = load_field_index(args.root)
    folds = slide_folds(index, args.folds)
    if args.mean_of and (args.floor or args.verifier or args.detector or args.candidates):
        raise InputError("--mean-of scores kept outputs: leave out --floor, --verifier, --detector and --candidates")
    if args.stage != "output" and not args.mean_of:
        raise InputError("--stage scores kept outputs: give it with --mean-of")
    stages = None
    if args.mean_of:
        predictions = suppress_kept(mean_of_kept(args.mean_of, args.stage),
                                    resolve_config(args.config).merging.final_radius_um)
    elif args.floor:
        predictions = blob_predictions(index)
    else:
        predictions, stages = chain_predictions(index, folds,
                                                per_fold_paths(args.verifier, args.folds, "verifier"),
                                                per_fold_paths(args.detector, args.folds, "detector"), args.config,
                                                candidates=args.candidates)
    if args.keep_predictions is not None:
        keep_predictions(args.keep_predictions, predictions, stages)
    report = cross_fold_scores(predictions, index, folds)
    report = _finite({"name": args.name or ("darkest-blob floor" if args.floor else "chain"),
                      "verifier": args.verifier, "detector": args.detector,
                      "mean_of": [str(p) for p in args.mean_of] if args.mean_of else None, "stage": args.stage,
                      "fold_of_slide": folds,
                      "seconds": round(time.perf_counter() - started, 1), **report})
    write_json_atomic(args.out, report)
    if args.card is not None:
        record_in_card(args.card, report, argv)
    if args.write_threshold is not None and report["summary"]["ship_threshold"] is not None:
        write_config_values(args.write_threshold, {"verifier.threshold": report["summary"]["ship_threshold"]})
    summary = report["summary"]
    print(f"{report['name']}: mean F1 over folds {summary['mean_f1']:.4f} {summary['fold_f1']}, worst slide "
          f"{summary['worst_slide']} {summary['worst_slide_f1']}, ship threshold {summary['ship_threshold']}")
    for slide, v in report["slides"].items():
        print(f"  {slide}: F1 {v['f1']:.3f} P {v['precision']:.3f} R {v['recall']:.3f} AP {v['AP']:.3f} "
              f"({v['mitoses']} mitoses)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
