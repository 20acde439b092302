"""Regenerate the Track 2 container test case: a generated 16-page H&E-like stack and its expected output.

    python test/make_cases.py            # after weights/atypical.pt (or the configured atypical weights) changed

Writes test/input/track2-generated/ (inputs.json + images/stacked-histopathology-roi-cropouts/stack.tiff, 16
uncompressed 128×128 RGB pages like the official stacks) and test/output/track2-generated/expected_output.json,
produced by the shipped pipeline (process.py's own code path, shipped config, weights found as the container finds
them). No third-party data goes into the case: the pages are synthetic.

The expected output is compared with a tolerance (midog.compare), but a class cannot be compared with one: a page
whose P(atypical) lies within --margin of the threshold could flip class on another device. Seeds are tried in
turn until no page is that close, so the case stays stable across CPU and GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from midog.cli import main as process_main  # noqa: E402
from midog.errors import MidogError  # noqa: E402
from midog.outputs import TRACK2_FILENAME  # noqa: E402

CASE = "track2-generated"
PAGES = 16
PAGE_SIZE = 128


def _stack_factory():
    """The generator shared with the tests (tests/stack_factory.py)."""
    spec = importlib.util.spec_from_file_location("stack_factory", REPO_ROOT / "tests" / "stack_factory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_track2_case(seed: int, margin: float, max_tries: int, config: Path | None) -> tuple[int, list[dict]]:
    try:
        threshold = _threshold(config)  # loads the weights first: nothing is written when they are missing
    except MidogError as err:
        raise SystemExit(f"error: {err}; no case written") from None
    factory = _stack_factory()
    input_dir = REPO_ROOT / "test" / "input" / CASE
    expected_dir = REPO_ROOT / "test" / "output" / CASE
    for attempt in range(max_tries):
        shutil.rmtree(input_dir, ignore_errors=True)
        factory.write_tiff(factory.track2_input(input_dir), factory.he_pages(PAGES, size=PAGE_SIZE, seed=seed + attempt))
        with tempfile.TemporaryDirectory() as out:
            argv = ["--input", str(input_dir), "--output", out] + (["--config", str(config)] if config else [])
            if process_main(argv) != 0:
                raise SystemExit("process.py failed on the generated case (see the error above); "
                                 "no expected output written")
            entries = json.loads((Path(out) / TRACK2_FILENAME).read_text())
        closest = min(abs(e["confidence"] - threshold) for e in entries)
        if closest >= margin:
            expected_dir.mkdir(parents=True, exist_ok=True)
            (expected_dir / "expected_output.json").write_text(json.dumps(entries, indent=4) + "\n")
            return seed + attempt, entries
        print(f"seed {seed + attempt}: a page lies {closest:.4f} from the threshold {threshold:.4f}; next seed")
    shutil.rmtree(input_dir, ignore_errors=True)  # no case without its expected output
    raise SystemExit(f"no seed in {seed}..{seed + max_tries - 1} keeps every page {margin} from the threshold; "
                     "no case written")


def _threshold(config: Path | None) -> float:
    from midog.atypical import load_atypical
    from midog.config import resolve_config

    pipeline_config = resolve_config(config)
    return load_atypical(pipeline_config.atypical, foundation=pipeline_config.foundation).threshold


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--margin", type=float, default=0.02, help="least distance of any page to the threshold")
    parser.add_argument("--max-tries", type=int, default=50)
    parser.add_argument("--config", type=Path, default=None, help="partial YAML, as for process.py")
    args = parser.parse_args(argv)
    seed, entries = make_track2_case(args.seed, args.margin, args.max_tries, args.config)
    atypical = sum(e["class"] == "atypical" for e in entries)
    print(f"{CASE}: seed {seed}, {len(entries)} pages, {atypical} atypical, {len(entries) - atypical} normal")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
