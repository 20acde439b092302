"""The evaluation container's entry point: `python -m midog.evaluate.container` (evaluation/Dockerfile; see
docs/evaluation.md, "The evaluation container").

It reads what grand-challenge gives an evaluation method and writes what the platform reads back:
- the algorithm's jobs: `<input>/predictions.json` and each job's output at `<input>/<pk>/output/<relative path>`
  (default input: /input);
- the ground truth: `ground_truth.json` in the phase's ground-truth folder (default:
  /opt/ml/input/data/ground_truth/, where the platform unpacks the ground-truth tarball; a file is taken as given);
- it writes `<output>/metrics.json` (default output: /output) as the final official container of the track writes
  it: Track 1 with its per-image `results` (each image's points and counts, `gt` emptied), Track 2 with the
  per-job `results` emptied. `--aggregates-only` empties Track 1's too, for a phase whose organisers want no
  per-image count of the hidden test set on a participant's result page.

Scoring is `midog.evaluate`'s with the final official containers' settings: Track 1 with the coordinate check,
FROC and AP; Track 2 with `confidence` read as P(atypical). The track is `--track`, else $MIDOG_EVAL_TRACK (the
image's TRACK build argument), else `auto`: the ground truth's shape decides, since Track 1's is a mapping of image
names and Track 2's a list of stacks. A pinned track refuses the other track's ground truth.

Bad input (a malformed or missing job output, a job without ground truth, a missing ground truth) ends the run with
one `error:` line on stderr, exit code 2, and no metrics.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from midog.errors import MidogError
from midog.evaluate.io import (EvaluationError, GroundTruthError, PredictionError, iter_jobs,
                               read_ground_truth_json)
from midog.outputs import write_json_atomic

TRACK_VARIABLE = "MIDOG_EVAL_TRACK"
TRACKS = ("auto", "1", "2")
PLATFORM_INPUT = Path("/input")
PLATFORM_GROUND_TRUTH = Path("/opt/ml/input/data/ground_truth")
PLATFORM_OUTPUT = Path("/output")
GROUND_TRUTH_FILENAME = "ground_truth.json"
PREDICTIONS_FILENAME = "predictions.json"
METRICS_FILENAME = "metrics.json"


def ground_truth_track(ground_truth: Any, path: Path) -> int:
    """1 for Track 1's ground truth (image name → annotations), 2 for Track 2's (a list of stacks)."""
    if isinstance(ground_truth, dict):
        return 1
    if isinstance(ground_truth, list):
        return 2
    raise GroundTruthError(f"ground truth: {path} is neither Track 1's (a mapping of image names) nor Track 2's "
                           "(a list of stacks)")


def choose_track(track: str, ground_truth: Any, path: Path) -> int:
    """The track to score: the ground truth's shape, which a pinned `track` ("1" or "2") must agree with."""
    if track not in TRACKS:
        raise EvaluationError(f"track {track!r} (${TRACK_VARIABLE} or --track): must be one of {', '.join(TRACKS)}")
    shape = ground_truth_track(ground_truth, path)
    if track != "auto" and int(track) != shape:
        raise GroundTruthError(f"ground truth: {path} is Track {shape}'s, but this evaluation scores Track {track} "
                               f"(TRACK={track}); upload Track {track}'s ground truth or build with TRACK={shape}")
    return shape


def evaluate(input_dir: Path, ground_truth_path: Path, track: str = "auto",
             check_coordinates: bool = True, aggregates_only: bool = False) -> tuple[int, dict[str, Any]]:
    """(track scored, the metrics.json to write) for grand-challenge's input layout; `aggregates_only`: Track 1's
    per-image results emptied as well (Track 2's always are, as in its final container)."""
    ground_truth = read_ground_truth_json(ground_truth_path)
    number = choose_track(track, ground_truth, ground_truth_path)
    if not (input_dir / PREDICTIONS_FILENAME).is_file():
        raise PredictionError(f"{input_dir}: no {PREDICTIONS_FILENAME} (the platform's list of the algorithm's jobs)")
    if number == 1:
        from midog.evaluate import track1

        jobs = iter_jobs(input_dir, 1, set(ground_truth))  # read one at a time, in predictions.json order
        evaluation = track1.evaluate_jobs(jobs, ground_truth, check_coordinates=check_coordinates)
        return 1, {"results": [] if aggregates_only else evaluation.metrics()["results"],
                   "aggregates": evaluation.aggregates}
    if not check_coordinates:
        raise EvaluationError("--no-coordinate-check applies to Track 1 only")
    from midog.evaluate import track2

    known = {entry.get("image") for entry in ground_truth if isinstance(entry, dict)}
    evaluation = track2.evaluate_jobs(iter_jobs(input_dir, 2, known), ground_truth)  # P(atypical), the default
    return 2, {"results": {}, "aggregates": evaluation.aggregates}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m midog.evaluate.container", description=__doc__.split("\n\n")[0])
    parser.add_argument("--track", choices=TRACKS, default=None,
                        help=f"1, 2, or auto: from the ground truth's shape (default: ${TRACK_VARIABLE}, else auto)")
    parser.add_argument("--input", type=Path, default=PLATFORM_INPUT,
                        help=f"predictions.json and <pk>/output/... (default: {PLATFORM_INPUT})")
    parser.add_argument("--ground-truth", type=Path, default=PLATFORM_GROUND_TRUTH,
                        help=f"folder with {GROUND_TRUTH_FILENAME}, or the file (default: {PLATFORM_GROUND_TRUTH})")
    parser.add_argument("--output", type=Path, default=PLATFORM_OUTPUT,
                        help=f"folder that receives {METRICS_FILENAME} (default: {PLATFORM_OUTPUT})")
    parser.add_argument("--no-coordinate-check", action="store_true",
                        help="Track 1: accept points beyond 10 mm or below -7.5 µm (pixel coordinates?), as the "
                             "container's first version did; the published test vectors need it")
    parser.add_argument("--aggregates-only", action="store_true",
                        help="Track 1: write no per-image results (the final Track 1 container writes them, with "
                             "each image's ground truth emptied; Track 2's are always emptied)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    track = args.track or os.environ.get(TRACK_VARIABLE) or "auto"
    ground_truth = args.ground_truth
    if ground_truth.is_dir():
        ground_truth = ground_truth / GROUND_TRUTH_FILENAME
    try:
        number, metrics = evaluate(args.input, ground_truth, track, not args.no_coordinate_check,
                                   args.aggregates_only)
        written = write_json_atomic(args.output / METRICS_FILENAME, metrics)
    except MidogError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print(f"Track {number}: aggregates written to {written}")
    for key, value in metrics["aggregates"].items():
        print(f"{key:40s} {json.dumps(value)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
