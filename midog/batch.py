"""Run the pipeline on a whole test set and score it in one command: `python -m midog.batch` (docs/evaluation.md,
"Run and score a whole test set").

    python -m midog.batch --images DIR --track 1|2 --out OUT [--config FILE] [--ground-truth GT.json]
    python -m midog.batch --cases DIR --out OUT [--config FILE] [--ground-truth GT.json] [--no-coordinate-check]

The cases are the images of a folder (`--images`, Track 1 ROIs or Track 2 stacks: .tif/.tiff/.mha, by file name),
or a folder of grand-challenge input folders (`--cases`, each with `inputs.json` and `images/<interface>/`, as
`test/input/*`; a single such folder works too), whose interface slug decides the track. The models are loaded
once, then each case runs exactly what process.py runs on it. OUT receives what grand-challenge gives an evaluation
method: `predictions.json` (one job per case, in case order: `pk`, the input image's name and interface, the output
interface and its relative path, `status: Succeeded`) and each job's output at `<pk>/output/<file>.json`, so
`python -m midog.evaluate track1|track2 --predictions OUT` and `python -m midog.evaluate.container --input OUT`
read it as they read the platform's. `--ground-truth` scores it at once, in this process, with the functions
`python -m midog.evaluate` uses, and writes `OUT/metrics.json`.

Rules:
- A job's pk is a UUID derived from its track and image name: a rerun into the same OUT rewrites the same folders.
- The image name in predictions.json (what the ground truth is keyed by) is the file name for `--images`, and the
  name in `inputs.json` for `--cases` (the platform's own files may be named otherwise), else the file's.
- A case that fails (an unreadable image, a case folder without inputs.json) is reported with one `error:` line
  naming it, and the other cases still run, so that one run lists every bad case. The run then exits with the first
  failure's code (`midog.errors`; 2 for bad input), writes no predictions.json (a partial set must not pass for a
  whole one) and scores nothing; the finished jobs' outputs stay in `<pk>/output/` for inspection. A predictions.json
  or metrics.json left by an earlier run is removed at the start, and each job's output files before it runs.
- Problems with the whole run end it before any model is loaded: cases of both tracks, two cases with one image
  name, a ground truth in the wrong format or without an entry for a case's image. Missing weights, a bad config,
  or an output folder that cannot be written end it at once (their own exit codes).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from midog.cli import OneLineArgumentParser, add_quiet_option, entry_point, read_interface_slugs
from midog.config import PipelineConfig, resolve_config
from midog.errors import InputError, MidogError, OutputError, first_line
from midog.evaluate.io import (TRACK1_OUTPUT_SLUG, TRACK2_OUTPUT_SLUG, GroundTruthError, iter_jobs,
                               read_ground_truth_json)
from midog.image_files import find_single_image
from midog.interfaces import TRACK1_IMAGE_FOLDER, TRACK1_SLUG, TRACK2_IMAGE_FOLDER, TRACK2_SLUG
from midog.outputs import (TRACK1_ATYPICAL_FILENAME, TRACK1_FILENAME, TRACK2_FILENAME, check_output_folder,
                           discard_previous_outputs, write_json_atomic)
from midog.progress import progress_iter
from midog.roi_io import ROI_SUFFIXES
from midog.stack_io import STACK_SUFFIXES

if TYPE_CHECKING:
    from midog.evaluate.track1 import Track1Evaluation
    from midog.evaluate.track2 import Track2Evaluation

log = logging.getLogger(__name__)

PREDICTIONS_FILENAME = "predictions.json"
METRICS_FILENAME = "metrics.json"
PK_NAMESPACE = uuid.UUID("3b1f6a52-7c1e-4d55-9a57-0f6c2d1e8b40")
"""uuid5 namespace of the jobs' pks (any fixed UUID: it only has to stay the same between runs)."""


@dataclass(frozen=True)
class TrackLayout:
    """What grand-challenge names for one track: the input interface and its folder, the output interface."""

    number: int
    input_slug: str
    image_folder: str
    suffixes: tuple[str, ...]
    output_slug: str
    output_kind: str
    output_file: str
    """The output interface's file (`relative_path`), the one the evaluation reads."""
    extra_files: tuple[str, ...] = ()
    """Files process.py writes beside it that are no interface of the platform (kept in `<pk>/output/` too)."""


TRACKS = {
    1: TrackLayout(1, TRACK1_SLUG, TRACK1_IMAGE_FOLDER, ROI_SUFFIXES, TRACK1_OUTPUT_SLUG, "Multiple points",
                   TRACK1_FILENAME, (TRACK1_ATYPICAL_FILENAME,)),
    2: TrackLayout(2, TRACK2_SLUG, TRACK2_IMAGE_FOLDER, STACK_SUFFIXES, TRACK2_OUTPUT_SLUG, "Anything",
                   TRACK2_FILENAME),
}
SLUG_TRACKS = {layout.input_slug: number for number, layout in TRACKS.items()}


@dataclass(frozen=True)
class Case:
    """One image to run. `label` names it in messages (the file name, or the case folder's name)."""

    label: str
    image: Path
    image_name: str
    """The name predictions.json gives the image, which the ground truth is keyed by."""
    track: int

    @property
    def pk(self) -> str:
        return str(uuid.uuid5(PK_NAMESPACE, f"track{self.track}/{self.image_name}"))


@dataclass(frozen=True)
class Failure:
    label: str
    message: str
    exit_code: int

    def line(self) -> str:
        return f"error: case {self.label}: {self.message}"


@dataclass
class BatchRun:
    """What `run_cases` did: the jobs written (predictions.json entries, in case order) and the failed cases."""

    jobs: list[dict[str, Any]] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)


# ---- finding the cases -------------------------------------------------------------------------------------------

def image_cases(folder: Path, track: int) -> list[Case]:
    """Every .tif/.tiff/.mha file in `folder` (hidden files and subfolders ignored), by file name."""
    if track not in TRACKS:
        raise InputError(f"track must be 1 or 2, got {track!r}")
    if not folder.is_dir():
        raise InputError(f"no image folder {folder}")
    suffixes = TRACKS[track].suffixes
    images = sorted(p for p in folder.iterdir()
                    if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes)
    if not images:
        hint = " (it holds inputs.json: use --cases for grand-challenge input folders)" \
            if (folder / "inputs.json").is_file() else ""
        raise InputError(f"no {'/'.join(suffixes)} image in {folder}{hint}")
    return [Case(p.name, p, p.name, track) for p in images]


def _input_image_name(input_dir: Path, slug: str) -> str | None:
    """The image name inputs.json gives the `slug` input (read_interface_slugs has checked the file's shape)."""
    for entry in json.loads((input_dir / "inputs.json").read_text()):
        if entry["interface"]["slug"] == slug:
            image = entry.get("image")
            name = image.get("name") if isinstance(image, dict) else None
            return name if isinstance(name, str) and name else None
    return None


def input_case(input_dir: Path, label: str | None = None) -> Case:
    """One grand-challenge input folder: its track from the interface slug, as process.py picks it."""
    slugs = read_interface_slugs(input_dir)
    known = [slug for slug in slugs if slug in SLUG_TRACKS]
    if not known:
        raise InputError(f"unknown interface slug(s) {slugs}; expected one of {sorted(SLUG_TRACKS)}")
    layout = TRACKS[SLUG_TRACKS[known[0]]]
    image = find_single_image(input_dir / "images" / layout.image_folder, layout.suffixes)
    name = _input_image_name(input_dir, layout.input_slug) or image.name
    return Case(label or input_dir.name, image, name, layout.number)


def input_cases(folder: Path) -> tuple[list[Case], list[Failure]]:
    """The input folders in `folder` (its non-hidden subfolders, by name; `folder` itself when it holds
    inputs.json), and the failures of those that cannot be read."""
    if not folder.is_dir():
        raise InputError(f"no cases folder {folder}")
    if (folder / "inputs.json").is_file():
        return [input_case(folder)], []
    folders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise InputError(f"no case folders (each with inputs.json and images/) in {folder}")
    cases, failures = [], []
    for case_dir in folders:
        try:
            cases.append(input_case(case_dir))
        except MidogError as err:
            failures.append(Failure(case_dir.name, str(err), err.exit_code))
    return cases, failures


def check_cases(cases: Sequence[Case], track: int | None) -> int | None:
    """The one track of `cases` (None when there are none), which `track`, when given, must be; and one image name
    per case, since the ground truth and the job pks are keyed by it."""
    tracks = sorted({case.track for case in cases})
    if len(tracks) > 1:
        first = {t: next(c.label for c in cases if c.track == t) for t in tracks}
        raise InputError(f"the cases mix Track 1 ({first[1]}) and Track 2 ({first[2]}); a test set is one track's: "
                         "run each track's cases on their own")
    if track is not None and tracks and tracks[0] != track:
        raise InputError(f"--track {track}, but the cases are Track {tracks[0]}'s (case {cases[0].label})")
    seen: dict[str, str] = {}
    for case in cases:
        if case.image_name in seen:
            raise InputError(f"cases {seen[case.image_name]} and {case.label} both hold an image named "
                             f"{case.image_name!r}: predictions and ground truth are keyed by image name")
        seen[case.image_name] = case.label
    return tracks[0] if tracks else track


# ---- ground truth ------------------------------------------------------------------------------------------------

def read_ground_truth(path: Path, track: int, cases: Sequence[Case]) -> Any:
    """The official ground truth of `track` (checked as the evaluation checks it), with an entry for every case's
    image: read before any model is loaded, so that a wrong file costs seconds, not a whole run."""
    ground_truth = read_ground_truth_json(path)
    if track == 1:
        from midog.evaluate.track1 import parse_ground_truth
    else:
        from midog.evaluate.track2 import parse_ground_truth
    known = set(parse_ground_truth(ground_truth))
    missing = [case.image_name for case in cases if case.image_name not in known]
    if missing:
        listed = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        example = f" (it names images like {sorted(known)[0]!r})" if known else ""
        raise GroundTruthError(f"ground truth {path} has no entry for {len(missing)} of the {len(cases)} images: "
                               f"{listed}{example}")
    unused = len(known) - len(cases)
    if unused > 0:
        print(f"warning: {unused} ground-truth images have no case: the metrics cover the {len(cases)} that run",
              file=sys.stderr)
    return ground_truth


# ---- running -----------------------------------------------------------------------------------------------------

Predictor = Callable[[Path], dict[str, Any]]
"""An image → its output files (file name → JSON payload), the models already loaded."""


def track1_predictor(config: PipelineConfig) -> Predictor:
    """process.py's Track 1 (`midog.pipeline.run_track1`) with the models loaded once."""
    from midog.outputs import track1_outputs
    from midog.pipeline import load_track1

    detector = load_track1(config)

    def predict(image: Path) -> dict[str, Any]:
        figures, atypical = track1_outputs(detector.detect(image, progress=False).detections)
        return {TRACK1_FILENAME: figures, TRACK1_ATYPICAL_FILENAME: atypical}

    return predict


def track2_predictor(config: PipelineConfig) -> Predictor:
    """process.py's Track 2 (`midog.pipeline.run_track2`) with the classifier loaded once."""
    from midog.outputs import track2_classification
    from midog.pipeline import classify_pages, load_track2
    from midog.stack_io import open_stack

    classifier, _ = load_track2(config)

    def predict(image: Path) -> dict[str, Any]:
        with open_stack(image) as stack:
            probabilities = classify_pages(stack, classifier, config.atypical)
        return {TRACK2_FILENAME: track2_classification(probabilities, classifier.threshold,
                                                       config.atypical.confidence)}

    return predict


PREDICTORS: dict[int, Callable[[PipelineConfig], Predictor]] = {1: track1_predictor, 2: track2_predictor}


def job_entry(case: Case, started: datetime, completed: datetime) -> dict[str, Any]:
    """The case's entry of predictions.json, in the platform's layout (the official test vectors')."""
    layout = TRACKS[case.track]
    return {
        "pk": case.pk,
        "inputs": [{
            "file": None, "image": {"name": case.image_name}, "value": None,
            "interface": {"slug": layout.input_slug, "kind": "Image", "super_kind": "Image",
                          "relative_path": f"images/{layout.image_folder}", "example_value": None},
        }],
        "outputs": [{
            "file": f"{case.pk}/output/{layout.output_file}", "image": None, "value": None,
            "interface": {"slug": layout.output_slug, "kind": layout.output_kind, "super_kind": "File",
                          "relative_path": layout.output_file, "example_value": None},
        }],
        "status": "Succeeded",
        "started_at": started.isoformat(),
        "completed_at": completed.isoformat(),
    }


def job_folder(out: Path, case: Case) -> Path:
    return out / case.pk / "output"


def write_job(folder: Path, files: Mapping[str, Any]) -> None:
    """Every file of one job, each atomically: all of them or none."""
    written: list[Path] = []
    try:
        for name, payload in files.items():
            written.append(write_json_atomic(folder / name, payload))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def run_cases(cases: Sequence[Case], predict: Predictor, out: Path, progress: bool = True,
              debug: bool = False) -> BatchRun:
    """Run every case, one after another, writing each job's files as it finishes. A failing case is recorded (and
    reported on stderr at once) and the next one runs; an OutputError ends the run (no later case could be saved),
    and with `debug` any failure does, with its traceback."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    run = BatchRun()
    with logging_redirect_tqdm(), progress_iter(cases, len(cases), f"track {cases[0].track}" if cases else "cases",
                                                "case", enabled=progress) as bar:
        for case in bar:
            layout = TRACKS[case.track]
            folder = job_folder(out, case)
            discard_previous_outputs(folder, (layout.output_file, *layout.extra_files))
            started = datetime.now(timezone.utc)
            try:
                write_job(folder, predict(case.image))
            except OutputError:
                raise
            except MidogError as err:
                if debug:
                    raise
                failure = Failure(case.label, str(err), err.exit_code)
            except Exception as err:  # an unexpected failure of one case (a corrupt image, out of memory)
                if debug:
                    raise
                failure = Failure(case.label, f"unexpected {type(err).__name__}: {first_line(err)}", 1)
            else:
                run.jobs.append(job_entry(case, started, datetime.now(timezone.utc)))
                continue
            run.failures.append(failure)
            tqdm.write(failure.line(), file=sys.stderr)
            bar.set_postfix(failed=len(run.failures))
    return run


# ---- scoring -----------------------------------------------------------------------------------------------------

def evaluate_layout(out: Path, track: int, ground_truth: Any,
                    check_coordinates: bool = True) -> Track1Evaluation | Track2Evaluation:
    """Score `out`'s predictions.json layout as `python -m midog.evaluate track1|track2 --predictions out` does
    (Track 1 with FROC, the numpy AP and, unless turned off, the coordinate check; Track 2 reading confidence as
    P(atypical), the final container)."""
    if track == 1:
        from midog.evaluate import track1

        return track1.evaluate_jobs(iter_jobs(out, 1, set(ground_truth)), ground_truth,
                                    check_coordinates=check_coordinates)
    if not check_coordinates:
        raise InputError("--no-coordinate-check applies to Track 1 only")
    from midog.evaluate import track2

    known = {entry.get("image") for entry in ground_truth if isinstance(entry, dict)}
    return track2.evaluate_jobs(iter_jobs(out, 2, known), ground_truth)


MAIN_AGGREGATES = {1: ("f1_score", "precision", "recall", "AP", "froc_auc"),
                   2: ("overall_balanced_accuracy", "overall_sensitivity", "overall_specificity",
                       "overall_accuracy", "overall_roc_auc")}
"""The aggregates printed after a run (metrics.json holds them all)."""


def print_aggregates(aggregates: Mapping[str, Any], track: int) -> None:
    for key in MAIN_AGGREGATES[track]:
        if key in aggregates:
            print(f"{key:30s} {aggregates[key]:.6f}")


# ---- command line ------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="python -m midog.batch", description=__doc__.split("\n\n")[0],
                                   epilog="See docs/evaluation.md, 'Run and score a whole test set'.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, metavar="DIR",
                        help="a folder of Track 1 ROIs or Track 2 stacks (.tif/.tiff/.mha); needs --track")
    source.add_argument("--cases", type=Path, metavar="DIR",
                        help="a folder of grand-challenge input folders (inputs.json + images/<interface>/), "
                             "or one such folder; the interface slug decides the track")
    parser.add_argument("--track", type=int, choices=(1, 2), help="the track of --images (with --cases: a check)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help=f"receives {PREDICTIONS_FILENAME}, <pk>/output/<file>.json and {METRICS_FILENAME}")
    parser.add_argument("--config", type=Path, default=None, help="partial YAML overriding the shipped config, "
                                                                   "as process.py --config")
    parser.add_argument("--ground-truth", type=Path, default=None, metavar="FILE",
                        help=f"the official ground truth: score the run and write OUT/{METRICS_FILENAME}")
    parser.add_argument("--no-coordinate-check", action="store_true",
                        help="Track 1, with --ground-truth: accept points beyond 10 mm or below -7.5 µm, as the "
                             "evaluation container's first version did")
    add_quiet_option(parser)
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs; stop at the first "
                                                             "failing case")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.images is not None and args.track is None:
        parser.error("--images needs --track 1 or 2 (with --cases the interface slug decides)")
    if args.no_coordinate_check and args.ground_truth is None:
        parser.error("--no-coordinate-check needs --ground-truth")
    if args.no_coordinate_check and args.track == 2:
        parser.error("--no-coordinate-check applies to Track 1 only")
    return args


def batch(args: argparse.Namespace) -> int:
    """The whole command; MidogErrors that end the run as a whole propagate (see `main`)."""
    out: Path = args.out
    discard_previous_outputs(out, (PREDICTIONS_FILENAME, METRICS_FILENAME))  # a failed run leaves neither
    if args.images is not None:
        cases, failures = image_cases(args.images, args.track), []
    else:
        cases, failures = input_cases(args.cases)
    track = check_cases(cases, args.track)
    check_output_folder(out)
    for failure in failures:
        print(failure.line(), file=sys.stderr)
    if track == 2 and args.no_coordinate_check:
        raise InputError("--no-coordinate-check applies to Track 1 only")
    ground_truth = read_ground_truth(args.ground_truth, track, cases) \
        if args.ground_truth is not None and track is not None else None
    config = resolve_config(args.config)
    run = BatchRun()
    if cases:
        run = run_cases(cases, PREDICTORS[track](config), out, progress=not args.quiet, debug=args.debug)
    total = len(cases) + len(failures)
    failures += run.failures
    if failures:
        kept = f"; the {len(run.jobs)} finished jobs' outputs are in {out}/<pk>/output/" if run.jobs else ""
        print(f"{len(failures)} of {total} cases failed: no {PREDICTIONS_FILENAME} written{kept}", file=sys.stderr)
        return failures[0].exit_code
    predictions = write_json_atomic(out / PREDICTIONS_FILENAME, run.jobs)
    print(f"track {track}: {len(run.jobs)} jobs, {predictions}")
    if ground_truth is not None:
        evaluation = evaluate_layout(out, track, ground_truth, not args.no_coordinate_check)
        metrics = write_json_atomic(out / METRICS_FILENAME, evaluation.metrics())
        print(f"metrics: {metrics}")
        print_aggregates(evaluation.aggregates, track)
    return 0


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return batch(args)  # entry_point: the run as a whole gives one line, the traceback with --debug


if __name__ == "__main__":
    raise SystemExit(main())
