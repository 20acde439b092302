"""Compare a run's outputs with a container test case's expected files, with a numeric tolerance.

    python -m midog.compare ACTUAL_DIR EXPECTED_DIR [--atol 1e-3] [--rtol 0] [--point-tol-mm 0.002]

EXPECTED_DIR holds `expected_output.json` (the track's main output: a list of {class, confidence} is Track 2's
multiple-mitotic-figure-classification.json, a "Multiple points" object is Track 1's mitotic-figures.json) and,
optionally, `expected_<output-file-name>` for any other output (e.g. expected_atypical-mitotic-figures.json).
Each is compared with the file of that name in ACTUAL_DIR. Numbers match within atol + rtol·|expected| (a GPU and
a CPU do not agree to the last bit), a float must stay a float (the official evaluators refuse ints), strings and
classes must be equal, and "Multiple points" are matched regardless of order, within --point-tol-mm.

Prints one line, `OK: ...` or `MISMATCH: ...`; exit 0 when everything matches, 1 on a mismatch, 2 on bad usage.
Standard library only, so it runs anywhere the outputs are (on the host or inside the container).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from midog.outputs import TRACK1_FILENAME, TRACK2_FILENAME

MAIN_EXPECTED = "expected_output.json"
EXPECTED_PREFIX = "expected_"


@dataclass
class Tolerance:
    atol: float = 1e-3
    rtol: float = 0.0
    point_mm: float = 0.002
    """How far (mm) a detected point may move: 2 µm = 8 px at 0.25 µm/px."""


class UsageError(Exception):
    pass


def main_output_name(expected: Any) -> str:
    """The output file that `expected_output.json` stands for, from its shape."""
    if isinstance(expected, list):
        return TRACK2_FILENAME
    if isinstance(expected, dict) and expected.get("type") == "Multiple points":
        return TRACK1_FILENAME
    raise UsageError(f"{MAIN_EXPECTED} is neither a Track 2 list nor a Track 1 'Multiple points' object")


def expected_pairs(expected_dir: Path) -> list[tuple[Path, str]]:
    """(expected file, name of the actual output file) for every expected_*.json in `expected_dir`."""
    if not expected_dir.is_dir():
        raise UsageError(f"no expected folder {expected_dir}")
    pairs = []
    for path in sorted(expected_dir.glob(f"{EXPECTED_PREFIX}*.json")):
        if path.name == MAIN_EXPECTED:
            pairs.append((path, main_output_name(_load(path))))
        else:
            pairs.append((path, path.name[len(EXPECTED_PREFIX):]))
    if not pairs:
        raise UsageError(f"no {EXPECTED_PREFIX}*.json in {expected_dir}")
    return pairs


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"cannot read {path}: {err}") from None


def differences(expected: Any, actual: Any, tol: Tolerance, where: str = "$") -> list[str]:
    """Every place where `actual` departs from `expected`, as 'path: what' strings."""
    if isinstance(expected, bool) or expected is None or isinstance(expected, str):
        same = type(actual) is type(expected) and actual == expected
        return [] if same else [f"{where}: expected {expected!r}, got {actual!r}"]
    if isinstance(expected, (int, float)):
        return _number_differences(expected, actual, tol, where)
    if isinstance(expected, list):
        if not isinstance(actual, list):
            return [f"{where}: expected a list, got {type(actual).__name__}"]
        if len(actual) != len(expected):
            return [f"{where}: expected {len(expected)} entries, got {len(actual)}"]
        return [d for i, (e, a) in enumerate(zip(expected, actual)) for d in differences(e, a, tol, f"{where}[{i}]")]
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{where}: expected an object, got {type(actual).__name__}"]
        if set(actual) != set(expected):
            return [f"{where}: expected keys {sorted(expected)}, got {sorted(actual)}"]
        found = []
        for key in expected:
            if key == "points" and expected.get("type") == "Multiple points":
                found += _point_differences(expected[key], actual[key], tol, f"{where}.points")
            else:
                found += differences(expected[key], actual[key], tol, f"{where}.{key}")
        return found
    return [f"{where}: cannot compare {type(expected).__name__}"]


def _number_differences(expected: float, actual: Any, tol: Tolerance, where: str) -> list[str]:
    if isinstance(actual, bool) or not isinstance(actual, (int, float)):
        return [f"{where}: expected a number, got {actual!r}"]
    if isinstance(expected, float) and not isinstance(actual, float):
        return [f"{where}: expected a float, got the int {actual!r}"]
    if isinstance(expected, int) and not isinstance(actual, int):
        return [f"{where}: expected the int {expected!r}, got {actual!r}"]
    if not math.isclose(actual, expected, abs_tol=tol.atol, rel_tol=tol.rtol):
        return [f"{where}: expected {expected!r}, got {actual!r} (atol {tol.atol:g})"]
    return []


def _point_differences(expected: list[Any], actual: list[Any], tol: Tolerance, where: str) -> list[str]:
    """Match points one to one, nearest first, whatever their order; then compare each matched pair fully."""
    if not isinstance(actual, list):
        return [f"{where}: expected a list, got {type(actual).__name__}"]
    if len(actual) != len(expected):
        return [f"{where}: expected {len(expected)} points, got {len(actual)}"]
    unmatched = list(range(len(actual)))
    found = []
    for i, point in enumerate(expected):
        candidates = [(j, _distance(point, actual[j])) for j in unmatched
                      if actual[j].get("name") == point.get("name")]
        candidates = [(j, d) for j, d in candidates if d <= tol.point_mm]
        if not candidates:
            found.append(f"{where}[{i}]: no actual '{point.get('name')}' within {tol.point_mm} mm of {point['point']}")
            continue
        j, _ = min(candidates, key=lambda c: c[1])
        unmatched.remove(j)
        exact_point = dict(actual[j], point=point["point"])  # position already checked with its own tolerance
        found += differences(point, exact_point, tol, f"{where}[{i}]")
    return found


def _distance(expected: dict[str, Any], actual: Any) -> float:
    try:
        return math.dist(expected["point"][:2], actual["point"][:2])
    except (KeyError, TypeError, ValueError):
        return math.inf


def compare_dirs(actual_dir: Path, expected_dir: Path, tol: Tolerance) -> tuple[bool, str]:
    """(all match, one-line verdict)."""
    checked, problems = [], []
    for expected_path, output_name in expected_pairs(expected_dir):
        actual_path = actual_dir / output_name
        if not actual_path.is_file():
            problems.append(f"{output_name}: missing from {actual_dir}")
            continue
        try:
            actual = json.loads(actual_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            problems.append(f"{output_name}: not valid JSON ({err})")
            continue
        found = differences(_load(expected_path), actual, tol)
        if found:
            more = f" (+{len(found) - 1} more)" if len(found) > 1 else ""
            problems.append(f"{output_name}: {found[0]}{more}")
        checked.append(output_name)
    if problems:
        return False, "MISMATCH: " + "; ".join(problems)
    return True, f"OK: {', '.join(checked)} match the expected output (atol {tol.atol:g}, rtol {tol.rtol:g})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m midog.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("actual", type=Path, help="folder with the run's output files")
    parser.add_argument("expected", type=Path, help="folder with expected_output.json [and expected_<name>.json]")
    parser.add_argument("--atol", type=float, default=Tolerance.atol)
    parser.add_argument("--rtol", type=float, default=Tolerance.rtol)
    parser.add_argument("--point-tol-mm", type=float, default=Tolerance.point_mm)
    args = parser.parse_args(argv)
    try:
        ok, verdict = compare_dirs(args.actual, args.expected, Tolerance(args.atol, args.rtol, args.point_tol_mm))
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(verdict)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
