"""process.py's logic: argument parsing, slug dispatch, error → exit code."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Callable, NoReturn

from midog.config import PipelineConfig, resolve_config
from midog.errors import InputError, MidogError, first_line
from midog.interfaces import TRACK1_SLUG, TRACK2_SLUG
from midog.outputs import TRACK1_ATYPICAL_FILENAME, TRACK1_FILENAME, TRACK2_FILENAME, discard_previous_outputs

log = logging.getLogger("midog")



def _run_track1(input_dir: Path, output_dir: Path, config: PipelineConfig) -> None:
    from midog.pipeline import run_track1

    run_track1(input_dir, output_dir, config)


def _run_track2(input_dir: Path, output_dir: Path, config: PipelineConfig) -> None:
    from midog.pipeline import run_track2

    run_track2(input_dir, output_dir, config)


RESULT_FILES = (TRACK1_FILENAME, TRACK1_ATYPICAL_FILENAME, TRACK2_FILENAME)
"""Every file a run may write: an earlier run's are removed first, so a failed run leaves none behind."""

HANDLERS: dict[str, Callable[[Path, Path, PipelineConfig], None]] = {
    TRACK1_SLUG: _run_track1,
    TRACK2_SLUG: _run_track2,
}


def read_interface_slugs(input_dir: Path) -> list[str]:
    inputs_json = input_dir / "inputs.json"
    if not inputs_json.is_file():
        raise InputError(f"missing {inputs_json}")
    try:
        inputs = json.loads(inputs_json.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise InputError(f"{inputs_json} is not valid JSON: {first_line(err)}") from None
    if not isinstance(inputs, list):
        raise InputError(f"{inputs_json} must hold a list of inputs")
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


def select_handler(slugs: list[str]) -> Callable[[Path, Path, PipelineConfig], None]:
    known = [s for s in slugs if s in HANDLERS]
    if not known:
        raise InputError(f"unknown interface slug(s) {slugs}; expected one of {sorted(HANDLERS)}")
    return HANDLERS[known[0]]


def load_run_config(path: Path | None) -> PipelineConfig:
    """The config process.py runs with: `midog.config.resolve_config` of `--config`."""
    return resolve_config(path)


class OneLineArgumentParser(argparse.ArgumentParser):
    """Usage errors as one `error: ...` line and exit code 2, like every other bad input (`--help` still helps)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineArgumentParser(description=__doc__)
    parser.add_argument("--input", type=Path, default=Path("/input"))
    parser.add_argument("--output", type=Path, default=Path("/output"))
    parser.add_argument("--config", type=Path, default=None, help="partial YAML overriding the shipped config")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        discard_previous_outputs(args.output, RESULT_FILES)
        config = load_run_config(args.config)
        handler = select_handler(read_interface_slugs(args.input))
        handler(args.input, args.output, config)
    except MidogError as err:
        if args.debug:
            traceback.print_exc()  # the traceback, and still the documented exit code
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except Exception as err:  # an unexpected failure still gets one line, unless --debug
        if args.debug:
            raise
        print(f"error: unexpected {type(err).__name__}: {first_line(err)}", file=sys.stderr)
        return 1
    return 0
