"""process.py's logic: argument parsing, slug dispatch, error → exit code."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import platform
import sys
import traceback
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NoReturn

from midog.config import PipelineConfig, config_to_dict, resolve_config
from midog.errors import InputError, MidogError, first_line
from midog.interfaces import TRACK1_SLUG, TRACK2_SLUG
from midog.outputs import (TRACK1_ATYPICAL_FILENAME, TRACK1_FILENAME, TRACK2_FILENAME, check_output_folder,
                           discard_previous_outputs, write_json_atomic)
from midog.progress import LOG_INTERVAL_S, is_quiet, set_quiet
from midog.weights import plain

if TYPE_CHECKING:
    from midog.pipeline import TrackRun

log = logging.getLogger("midog")

USAGE = ("MIDOG 2025 algorithm: Track 1 (mitotic figures in a region of interest -> mitotic-figures.json, points in "
         "mm) or Track 2 (atypical vs normal for each page of a stack -> multiple-mitotic-figure-classification.json), "
         "chosen by the interface slug in INPUT/inputs.json, as grand-challenge runs the container.")


def _run_track1(input_dir: Path, output_dir: Path, config: PipelineConfig) -> TrackRun:
    from midog.pipeline import run_track1

    return run_track1(input_dir, output_dir, config, progress=True)


def _run_track2(input_dir: Path, output_dir: Path, config: PipelineConfig) -> TrackRun:
    from midog.pipeline import run_track2

    return run_track2(input_dir, output_dir, config, progress=True)


RESULT_FILES = (TRACK1_FILENAME, TRACK1_ATYPICAL_FILENAME, TRACK2_FILENAME)
"""Every file a run may write: an earlier run's are removed first, so a failed run leaves none behind."""

HANDLERS: dict[str, Callable[[Path, Path, PipelineConfig], TrackRun | None]] = {
    TRACK1_SLUG: _run_track1,
    TRACK2_SLUG: _run_track2,
}

TRACKS = {TRACK1_SLUG: 1, TRACK2_SLUG: 2}

RECORD_VERSION = 1
"""The layout of a `--record` file; raised when a field changes meaning or goes away."""

RECORDED_PACKAGES = ("torch", "torchvision", "ultralytics", "timm", "numpy", "SimpleITK", "tifffile", "onnxruntime")
"""The installed packages whose versions a run record keeps, beside Python's and midog's."""


JSON_TYPE_NAMES = {dict: "object", list: "list"}


def read_json_file(path: Path, what: str, expected: type = dict, *, error: type[InputError] = InputError) -> Any:
    """The JSON value in `path`, which must be an `expected` (dict: a JSON object; list; object: any JSON value), or
    an `error` that names `what` and the file: missing, not JSON, another type (one error line and exit code 2
    through `entry_point`, process.py or the evaluation, never an unexpected failure). The evaluation passes its own
    InputError subclasses (GroundTruthError, PredictionError), so that every JSON file reads and fails alike."""
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise error(f"{what} {path} is not valid JSON: {first_line(err)}") from None
    except OSError as err:                                   # e.g. no permission to read it
        raise error(f"{what} {path} cannot be read: {err.strerror or err}") from None
    if not isinstance(value, expected):
        raise error(f"{what} {path} must hold a JSON {JSON_TYPE_NAMES.get(expected, expected.__name__)}, "
                    f"not {type(value).__name__}")
    return value


def read_interface_slugs(input_dir: Path) -> list[str]:
    inputs_json = input_dir / "inputs.json"
    inputs = read_json_file(inputs_json, "inputs.json", list)
    slugs = []
    for entry in inputs:
        interface = entry.get("interface") if isinstance(entry, dict) else None
        slug = interface.get("slug") if isinstance(interface, dict) else None
        if not slug:
            raise InputError(f"{inputs_json}: an input has no interface slug")
        if not isinstance(slug, str):
            raise InputError(f"{inputs_json}: an interface slug must be a string, got {slug!r:.80}")
        slugs.append(slug)
    return slugs


def select_slug(slugs: list[str]) -> str:
    """The first slug of a track this container runs."""
    known = [s for s in slugs if s in HANDLERS]
    if not known:
        raise InputError(f"unknown interface slug(s) {slugs}; expected one of {sorted(HANDLERS)}")
    return known[0]


def select_handler(slugs: list[str]) -> Callable[[Path, Path, PipelineConfig], TrackRun | None]:
    return HANDLERS[select_slug(slugs)]


def package_versions() -> dict[str, str | None]:
    """Python's, midog's and `RECORDED_PACKAGES`' versions (None: not installed). A module the run imported gives
    its own `__version__`, which may carry the build (torch's `2.14.1+cu130`); the others, their installed one."""
    from midog import __version__

    versions: dict[str, str | None] = {"python": platform.python_version(), "midog": __version__}
    for name in RECORDED_PACKAGES:
        loaded = getattr(sys.modules.get(name), "__version__", None)
        try:
            versions[name] = str(loaded) if loaded is not None else metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def run_record(slug: str, config: PipelineConfig, run: TrackRun | None) -> dict[str, Any]:
    """What `--record` writes: enough to trace a result to its weights, settings and software."""
    return {
        "record_version": RECORD_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "track": TRACKS[slug],
        "interface": slug,
        "input_image": run.image.name if run is not None else None,
        "outputs": [path.name for path in run.outputs] if run is not None else [],
        "checkpoints": [checkpoint.as_dict() for checkpoint in run.checkpoints] if run is not None else [],
        "thresholds": dict(run.thresholds) if run is not None else {},
        "config": plain(config_to_dict(config)),
        "versions": package_versions(),
    }


def write_run_record(path: Path, record: dict[str, Any], run: TrackRun | None) -> None:
    """Write the record atomically; when it cannot be written the run failed as a whole, and its outputs go too."""
    try:
        write_json_atomic(path, record)
    except BaseException:
        for output in run.outputs if run is not None else []:
            output.unlink(missing_ok=True)
        raise


def load_run_config(path: Path | None) -> PipelineConfig:
    """The config process.py runs with: `midog.config.resolve_config` of `--config`."""
    return resolve_config(path)


# ---- the error contract every command line shares (process.py, midog.batch, python -m training.*) ---------------

INTERRUPTED = 130
"""The exit code of a run stopped with Ctrl-C (128 + SIGINT, as a shell reports it)."""


def report_errors(body: Callable[[], int], debug: bool = False) -> int:
    """`body()`'s exit code, or a failure's: one `error: ...` line on stderr and the code of README's "Exit codes"
    (a MidogError's `exit_code`, 1 for any other exception, 130 for Ctrl-C). With `debug` the traceback comes
    first (an unexpected exception propagates, exit code 1)."""
    try:
        return body()
    except MidogError as err:
        if debug:
            traceback.print_exc()  # the traceback, and still the documented exit code
        print(f"error: {first_line(err)}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("error: interrupted", file=sys.stderr)
        return INTERRUPTED
    except Exception as err:  # an unexpected failure still gets one line, unless --debug
        if debug:
            raise
        print(f"error: unexpected {type(err).__name__}: {first_line(err)}", file=sys.stderr)
        return 1


DEBUG_FLAG = "--debug"


def add_debug_option(parser: argparse.ArgumentParser) -> None:
    """The `--debug` flag an `entry_point` reads."""
    parser.add_argument(DEBUG_FLAG, action="store_true", help="print the traceback of a failure before its error line")


QUIET_FLAG = "--quiet"
QUIET_HELP = ("no progress bars; without it they redraw on a terminal and, when stderr is not one, write a line "
              f"every {LOG_INTERVAL_S:g} s of a step that lasts longer; log lines and printed results are unchanged")


class _QuietAction(argparse.Action):
    """`--quiet` as a flag that also turns every progress bar off (`midog.progress.set_quiet`) once parsed: the
    bars deep inside a command need no flag passed down to them."""

    def __init__(self, option_strings: list[str], dest: str, default: bool = False, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, True)
        set_quiet(True)


def add_quiet_option(parser: argparse.ArgumentParser, help: str = QUIET_HELP) -> None:
    """The `--quiet` flag of every command that draws progress bars: `args.quiet`, and the bars off from the
    moment it is parsed until the `entry_point` command ends."""
    parser.add_argument(QUIET_FLAG, action=_QuietAction, help=help)


def entry_point(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Decorate a command's `main(argv)` with `report_errors`, `--debug` read from its arguments (the parser must
    accept it: `add_debug_option`). Usage errors stay argparse's (exit code 2, one line with
    `OneLineArgumentParser`). The bars' quiet setting (`add_quiet_option`) is put back as it was when `main` ends,
    so a command run from another (training.lora's train_classifier) or from a test leaves it as it found it."""
    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        debug = DEBUG_FLAG in (sys.argv[1:] if argv is None else argv)
        quiet = is_quiet()
        try:
            return report_errors(lambda: main(argv), debug)
        finally:
            set_quiet(quiet)

    return wrapper


class OneLineArgumentParser(argparse.ArgumentParser):
    """Usage errors as one `error: ...` line and exit code 2, like every other bad input (`--help` still helps)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineArgumentParser(
        prog="process.py", description=USAGE, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Exit codes: 0 success, 1 unexpected, 2 bad input, 3 bad weights, 4 output not writable, 5 bad "
               "configuration (one 'error:' line on stderr, no output file). Weights: $MIDOG_WEIGHTS_DIR, then "
               "/opt/ml/model, then weights/.")
    parser.add_argument("--input", type=Path, default=Path("/input"),
                        help="folder with inputs.json and images/<interface>/ (grand-challenge's layout)")
    parser.add_argument("--output", type=Path, default=Path("/output"), help="folder the result JSON goes to")
    parser.add_argument("--config", type=Path, default=None,
                        help="partial YAML over the shipped config (midog/configs/default.yaml and the weights' "
                             "pipeline.yaml); MIDOG_<SECTION>__<FIELD> variables override it")
    parser.add_argument("--record", type=Path, default=None, metavar="FILE",
                        help="write a JSON run record here when the run succeeds: the checkpoints loaded (path, "
                             "sha256), the thresholds in force, the resolved config, package versions, track, image")
    parser.add_argument(DEBUG_FLAG, action="store_true", help="show tracebacks and debug logs")
    add_quiet_option(parser, help="no progress bars (tiles, verification, atypical labelling, stack pages); without "
                                  "it they redraw on a terminal and, when stderr is not one, write a line every "
                                  f"{LOG_INTERVAL_S:g} s of a step that lasts longer; log records are unchanged")
    args = parser.parse_args(argv)
    if args.record is not None and args.record.resolve() in {(args.output / name).resolve() for name in RESULT_FILES}:
        parser.error(f"--record {args.record} would overwrite a result file")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_quiet(args.quiet)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return report_errors(lambda: run_process(args), args.debug)


def run_process(args: argparse.Namespace) -> int:
    """The whole run; a MidogError ends it with its exit code (see `report_errors`)."""
    discard_previous_outputs(args.output, RESULT_FILES)
    if args.record is not None:  # a stale record would read as this run's; an unwritable one fails now
        discard_previous_outputs(args.record.parent, [args.record.name])
    config = load_run_config(args.config)
    slug = select_slug(read_interface_slugs(args.input))
    if args.record is not None:
        check_output_folder(args.record.parent)
    result = HANDLERS[slug](args.input, args.output, config)
    if args.record is not None:
        write_run_record(args.record, run_record(slug, config, result), result)
        log.info("run record written to %s", args.record)
    return 0
