"""midog.compare: the container test's verdict, with numeric tolerance, for Track 2 and Track 1 outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from midog.compare import main
from midog.outputs import TRACK1_ATYPICAL_FILENAME, TRACK1_FILENAME, TRACK2_FILENAME, multiple_points

TRACK2 = [{"class": "atypical", "confidence": 0.81}, {"class": "normal", "confidence": 0.125}]
POINTS = [{"name": "mitotic figure", "point": [0.10, 0.20, 0.0], "probability": 0.9},
          {"name": "non-mitotic figure", "point": [0.50, 0.25, 0.0], "probability": 0.3},
          {"name": "mitotic figure", "point": [1.00, 0.40, 0.0], "probability": 0.7}]


def case(tmp_path: Path, expected: dict[str, object], actual: dict[str, object]) -> tuple[Path, Path]:
    (tmp_path / "expected").mkdir(exist_ok=True)
    (tmp_path / "actual").mkdir(exist_ok=True)
    for name, payload in expected.items():
        (tmp_path / "expected" / name).write_text(json.dumps(payload))
    for name, payload in actual.items():
        (tmp_path / "actual" / name).write_text(json.dumps(payload))
    return tmp_path / "actual", tmp_path / "expected"


def verdict(capsys: pytest.CaptureFixture[str], *args: Path | str) -> tuple[int, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    lines = (out.out + out.err).strip().splitlines()
    assert len(lines) == 1, lines
    return code, lines[0]


def test_track2_identical_and_within_tolerance(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    noisy = [{"class": "atypical", "confidence": 0.8104}, {"class": "normal", "confidence": 0.1246}]
    code, line = verdict(capsys, *case(tmp_path, {"expected_output.json": TRACK2}, {TRACK2_FILENAME: noisy}))
    assert code == 0 and line.startswith("OK: " + TRACK2_FILENAME)


@pytest.mark.parametrize("actual, message", [
    ([{"class": "atypical", "confidence": 0.83}, TRACK2[1]], "$[0].confidence: expected 0.81, got 0.83"),
    ([{"class": "normal", "confidence": 0.81}, TRACK2[1]], "$[0].class: expected 'atypical', got 'normal'"),
    ([TRACK2[0], {"class": "normal", "confidence": 0}], "$[1].confidence: expected a float, got the int 0"),
    ([TRACK2[0]], "expected 2 entries, got 1"),
    ([TRACK2[0], {"class": "normal", "confidence": 0.125, "extra": 1}], "expected keys"),
])
def test_track2_mismatches(tmp_path: Path, capsys: pytest.CaptureFixture[str], actual: list, message: str):
    code, line = verdict(capsys, *case(tmp_path, {"expected_output.json": TRACK2}, {TRACK2_FILENAME: actual}))
    assert code == 1 and line.startswith("MISMATCH: ") and message in line


def test_tolerance_is_configurable(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    actual = [{"class": "atypical", "confidence": 0.83}, TRACK2[1]]
    dirs = case(tmp_path, {"expected_output.json": TRACK2}, {TRACK2_FILENAME: actual})
    assert verdict(capsys, *dirs, "--atol", "0.05")[0] == 0


def test_missing_or_broken_actual_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    dirs = case(tmp_path, {"expected_output.json": TRACK2}, {})
    code, line = verdict(capsys, *dirs)
    assert code == 1 and f"{TRACK2_FILENAME}: missing" in line
    (dirs[0] / TRACK2_FILENAME).write_text("[{")
    code, line = verdict(capsys, *dirs)
    assert code == 1 and "not valid JSON" in line


def test_track1_points_in_any_order_and_the_extra_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    jittered = [dict(p, point=[p["point"][0] + 0.0005, p["point"][1], 0.0], probability=p["probability"] + 1e-4)
                for p in reversed(POINTS)]
    atypical = multiple_points([dict(POINTS[0], name="atypical")])
    dirs = case(tmp_path,
                {"expected_output.json": multiple_points(POINTS), f"expected_{TRACK1_ATYPICAL_FILENAME}": atypical},
                {TRACK1_FILENAME: multiple_points(jittered), TRACK1_ATYPICAL_FILENAME: atypical})
    code, line = verdict(capsys, *dirs)
    assert code == 0 and TRACK1_FILENAME in line and TRACK1_ATYPICAL_FILENAME in line


def test_track1_moved_point_wrong_name_and_missing_extra_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    moved = [dict(POINTS[0], point=[0.2, 0.2, 0.0])] + POINTS[1:]
    dirs = case(tmp_path, {"expected_output.json": multiple_points(POINTS)}, {TRACK1_FILENAME: multiple_points(moved)})
    code, line = verdict(capsys, *dirs)
    assert code == 1 and "no actual 'mitotic figure' within 0.002 mm of [0.1, 0.2, 0.0]" in line
    renamed = [dict(POINTS[1], name="mitotic figure")] + [POINTS[0], POINTS[2]]
    (dirs[0] / TRACK1_FILENAME).write_text(json.dumps(multiple_points(renamed)))
    assert verdict(capsys, *dirs)[0] == 1
    (dirs[1] / f"expected_{TRACK1_ATYPICAL_FILENAME}").write_text(json.dumps(multiple_points([])))
    (dirs[0] / TRACK1_FILENAME).write_text(json.dumps(multiple_points(POINTS)))
    code, line = verdict(capsys, *dirs)
    assert code == 1 and f"{TRACK1_ATYPICAL_FILENAME}: missing" in line


def test_bad_usage(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    code, line = verdict(capsys, tmp_path, tmp_path / "nope")
    assert code == 2 and line.startswith("error: no expected folder")
    code, line = verdict(capsys, tmp_path, tmp_path)
    assert code == 2 and "no expected_*.json" in line
    (tmp_path / "expected_output.json").write_text(json.dumps({"what": 1}))
    assert verdict(capsys, tmp_path, tmp_path)[0] == 2


def test_shipped_container_cases_have_valid_expected_outputs(tmp_path: Path):
    """Every case under test/input/ has an expected output that `python -m midog.compare` understands."""
    inputs = REPO_ROOT / "test" / "input"
    cases = sorted(p.name for p in inputs.iterdir() if p.is_dir()) if inputs.is_dir() else []
    if not cases:
        pytest.skip("no container test case yet: test/make_cases.py writes the Track 2 one from weights/atypical.pt")
    for name in cases:
        expected = REPO_ROOT / "test" / "output" / name
        main_output = json.loads((expected / "expected_output.json").read_text())
        actual = tmp_path / name
        actual.mkdir()
        output_name = TRACK2_FILENAME if isinstance(main_output, list) else TRACK1_FILENAME
        (actual / output_name).write_text(json.dumps(main_output))
        for extra in expected.glob("expected_*.json"):
            if extra.name != "expected_output.json":
                (actual / extra.name[len("expected_"):]).write_text(extra.read_text())
        result = subprocess.run([sys.executable, "-m", "midog.compare", str(actual), str(expected)],
                                capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
        assert result.returncode == 0 and result.stdout.startswith("OK: "), (name, result.stdout, result.stderr)
