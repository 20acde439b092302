"""Regenerate the Track 1 container test case: a generated H&E-like ROI and its expected outputs.

    python test/make_track1_case.py      # after weights/detector.pt, verifier.pt or atypical.pt changed

Writes test/input/track1-generated/ (inputs.json + images/histopathology-roi-cropout/roi.tif, a 1,024 x 768 px
RGB ROI, half of it glass, tiled, zlib, resolution tags for 0.25 µm/px in pixels per centimetre as grand-challenge writes them) and
test/output/track1-generated/expected_output.json (mitotic-figures.json) + expected_atypical-mitotic-figures.json,
produced by the shipped pipeline (process.py's own code path, shipped config, weights found as the container finds
them). No third-party data goes into the case: the ROI is synthetic.

Labels cannot be compared with a tolerance: a candidate whose verifier P(mitotic figure) or P(atypical) lies within
--margin of its threshold could change label on another device. Seeds are tried in turn until none is that close.
Refuses to write anything while the shipped weights are missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from midog.cli import load_run_config  # noqa: E402
from midog.cli import main as process_main  # noqa: E402
from midog.errors import MidogError  # noqa: E402
from midog.outputs import TRACK1_ATYPICAL_FILENAME, TRACK1_FILENAME  # noqa: E402

CASE = "track1-generated"
WIDTH, HEIGHT = 1024, 768
NUCLEI_PER_MPX = 800
GLASS_SHARE = 0.5
"""The right half is glass: fewer candidates (the shipped detector fires often on synthetic texture), so a seed
whose probabilities all keep their distance from the thresholds can be found."""
FIGURES = 8


def _roi_factory():
    """The generator shared with the tests (tests/roi_factory.py)."""
    spec = importlib.util.spec_from_file_location("roi_factory", REPO_ROOT / "tests" / "roi_factory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stable(result, verifier_threshold: float, atypical_threshold: float | None, margin: float) -> bool:
    for d in result.detections:
        if abs(d.verifier_probability - verifier_threshold) < margin:
            return False
        if d.atypical_probability is not None and atypical_threshold is not None \
                and abs(d.atypical_probability - atypical_threshold) < margin:
            return False
    return True


def make_track1_case(seed: int, margin: float, max_tries: int, config_path: Path | None) -> tuple[int, int]:
    from midog.pipeline import Track1Detector

    config = load_run_config(config_path)  # the config process.py runs with
    try:
        detector = Track1Detector.from_config(config)  # loads the weights first: nothing is written without them
    except MidogError as err:
        raise SystemExit(f"error: {err}; no case written") from None
    factory = _roi_factory()
    input_dir = REPO_ROOT / "test" / "input" / CASE
    expected_dir = REPO_ROOT / "test" / "output" / CASE
    atypical_threshold = detector.atypical.threshold if detector.atypical is not None else None
    for attempt in range(max_tries):
        rng_seed = seed + attempt
        import numpy as np

        high = (WIDTH * (1 - GLASS_SHARE) - 60, HEIGHT - 60)
        figures = [tuple(int(v) for v in xy) for xy in np.random.default_rng(rng_seed).uniform(60, high, (FIGURES, 2))]
        pixels = factory.he_roi(WIDTH, HEIGHT, seed=rng_seed, figures=figures, nuclei_per_mpx=NUCLEI_PER_MPX,
                                background=GLASS_SHARE)
        with tempfile.TemporaryDirectory() as scratch:  # the case in test/input changes only once a seed is kept
            result = detector.detect(factory.track1_input(Path(scratch) / CASE, pixels, tile=256, compression="zlib"),
                                     progress=False)
            if not _stable(result, config.verifier.threshold, atypical_threshold, margin):
                print(f"seed {rng_seed}: one of {len(result.detections)} candidates has a probability within {margin} "
                      "of its threshold; trying the next seed")
                continue
            shutil.rmtree(input_dir, ignore_errors=True)
            shutil.copytree(Path(scratch) / CASE, input_dir)
        with tempfile.TemporaryDirectory() as out:
            argv = ["--input", str(input_dir), "--output", out] + (["--config", str(config_path)] if config_path else [])
            if process_main(argv) != 0:
                raise SystemExit("process.py failed on the generated case (see the error above); no expected output")
            expected_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(out) / TRACK1_FILENAME, expected_dir / "expected_output.json")
            shutil.copyfile(Path(out) / TRACK1_ATYPICAL_FILENAME, expected_dir / f"expected_{TRACK1_ATYPICAL_FILENAME}")
        return rng_seed, len(result.detections)
    raise SystemExit(f"no seed in {seed}..{seed + max_tries - 1} gave a stable case; try --margin smaller")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--margin", type=float, default=0.002)
    parser.add_argument("--max-tries", type=int, default=20)
    parser.add_argument("--config", type=Path, default=None)
    args = parser.parse_args()
    seed, count = make_track1_case(args.seed, args.margin, args.max_tries, args.config)
    print(f"wrote test/input/{CASE} and test/output/{CASE} (seed {seed}, {count} candidates)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
