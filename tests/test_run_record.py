"""Which weights a run used: a weights folder given by $MIDOG_WEIGHTS_DIR is the run's, or the run stops (exit 3);
every run logs the checkpoints it loaded and the thresholds in force; `--record FILE` keeps the same in a JSON file.

process.py runs in children of a warm interpreter (tests/process_runner.py), on tiny random models.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Iterator

import pytest
from process_runner import ProcessResult, WarmRunner, base_env, process_args
from roi_factory import he_roi, tiny_track1_weights, track1_input
from stack_factory import TRACK2_SLUG, he_pages, track2_input, write_tiff

from midog import weights
from midog.errors import WeightsError
from midog.interfaces import TRACK1_SLUG
from midog.outputs import TRACK1_ATYPICAL_FILENAME, TRACK1_FILENAME, TRACK2_FILENAME
from midog.weights import REPO_WEIGHTS_DIR, sha256_of, write_model_card

EXIT_INPUT, EXIT_WEIGHTS = 2, 3  # docs/container.md, "Exit codes" (midog/errors.py)
LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING) [\w.]+: ")


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny detector, verifier and atypical classifier; the detector has a model card with its sha256."""
    folder = tiny_track1_weights(tmp_path_factory.mktemp("weights"))
    write_model_card(folder / "detector.pt", {"architecture": "tiny-yolo"})
    return folder


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def runner(home: Path) -> Iterator[WarmRunner]:
    with WarmRunner(base_env(home)) as warm:
        yield warm


def run(runner: WarmRunner, home: Path, folder: Path, weights_dir: Path | str, *extra: str,
        **env: str) -> ProcessResult:
    environment = base_env(home, MIDOG_ATYPICAL__TTA="false", MIDOG_RUNTIME__DEVICE="cpu",
                           MIDOG_WEIGHTS_DIR=str(weights_dir), **env)
    return runner.run(process_args(folder / "in", folder / "out", *extra), environment, cwd=folder)


def track1_case(folder: Path) -> Path:
    track1_input(folder / "in", he_roi(600, 520, seed=3, figures=[(200, 180), (420, 330)]))
    return folder


def track2_case(folder: Path) -> Path:
    write_tiff(track2_input(folder / "in", "stack.tif"), he_pages(3, size=64))
    return folder


def outputs(folder: Path) -> list[str]:
    out = folder / "out"
    return sorted(p.name for p in out.iterdir()) if out.is_dir() else []


def error_only(result: ProcessResult) -> str:
    """The one `error:` line of a refused run: the last line, and no other line but log records."""
    lines = result.stderr_lines
    assert lines and lines[-1].startswith("error: "), result.stderr
    assert all(LOG_RECORD.match(line) for line in lines[:-1]), result.stderr
    assert "Traceback" not in result.stderr
    return lines[-1]


# ---- a weights folder that is not there, or lacks a checkpoint ------------------------------------------------------

@pytest.mark.parametrize("make", [track1_case, track2_case], ids=["track1", "track2"])
def test_a_weights_folder_that_does_not_exist_stops_the_run(runner: WarmRunner, home: Path, tmp_path: Path, make):
    folder = make(tmp_path)
    missing = tmp_path / "runs" / "nonexistent"
    result = run(runner, home, folder, missing)
    assert result.returncode == EXIT_WEIGHTS, result.stderr
    assert error_only(result) == \
        f"error: MIDOG_WEIGHTS_DIR={missing}: no such folder (unset it to use /opt/ml/model and the shipped weights)"
    assert result.stderr_lines == [error_only(result)]  # refused before anything is logged
    assert outputs(folder) == []


def test_a_file_given_as_the_weights_folder_stops_the_run(runner: WarmRunner, home: Path, tmp_path: Path,
                                                          tiny_weights: Path):
    folder = track2_case(tmp_path)
    result = run(runner, home, folder, tiny_weights / "atypical.pt")
    assert result.returncode == EXIT_WEIGHTS
    assert error_only(result).startswith(f"error: MIDOG_WEIGHTS_DIR={tiny_weights / 'atypical.pt'}: not a folder")


@pytest.mark.parametrize("track, absent", [("track1", "atypical.pt"), ("track1", "verifier.pt"),
                                           ("track2", "atypical.pt")])
def test_a_weights_folder_without_a_checkpoint_the_run_needs_stops_it(runner: WarmRunner, home: Path,
                                                                      tmp_path: Path, tiny_weights: Path,
                                                                      track: str, absent: str):
    """The shipped weights/ holds every checkpoint: before, the run silently took the missing one from there."""
    if not (REPO_WEIGHTS_DIR / absent).is_file():
        pytest.skip(f"without a shipped weights/{absent} there is nothing to fall back on")
    partial = shutil.copytree(tiny_weights, tmp_path / "partial")
    (partial / absent).unlink()
    folder = (track1_case if track == "track1" else track2_case)(tmp_path)
    result = run(runner, home, folder, partial)
    assert result.returncode == EXIT_WEIGHTS, result.stderr
    line = error_only(result)
    assert line.startswith(f"error: weights '{absent}' not found in MIDOG_WEIGHTS_DIR={partial} "
                           f"({'atypical' if absent == 'atypical.pt' else 'verifier'}.weights)"), line
    assert outputs(folder) == []


def test_a_folder_need_not_hold_checkpoints_the_run_does_not_load(runner: WarmRunner, home: Path, tmp_path: Path,
                                                                  tiny_weights: Path):
    """Track 2 loads only the atypical classifier; a checkpoint given by path is taken where it is."""
    only_atypical = tmp_path / "atypical-only"
    only_atypical.mkdir()
    shutil.copy(tiny_weights / "atypical.pt", only_atypical / "atypical.pt")
    result = run(runner, home, track2_case(tmp_path / "a"), only_atypical)
    assert result.returncode == 0, result.stderr
    elsewhere = tmp_path / "elsewhere" / "mine.pt"
    elsewhere.parent.mkdir()
    shutil.copy(tiny_weights / "atypical.pt", elsewhere)
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run(runner, home, track2_case(tmp_path / "b"), empty, MIDOG_ATYPICAL__WEIGHTS=str(elsewhere))
    assert result.returncode == 0, result.stderr
    assert f"loaded atypical: {elsewhere.resolve()} (sha256 {sha256_of(elsewhere)[:12]}" in result.stderr


def test_require_in_given_dir_checks_only_bare_names_and_only_a_given_folder(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("MIDOG_WEIGHTS_DIR", raising=False)
    weights.require_in_given_dir({"atypical": "absent.pt"})  # no folder given: the usual lookup decides
    monkeypatch.setenv("MIDOG_WEIGHTS_DIR", str(tmp_path))
    (tmp_path / "a0.pt").write_bytes(b"member")
    weights.require_in_given_dir({"atypical": ["a0.pt", "runs/a1.pt", str(tmp_path / "x" / "a2.pt")]})
    with pytest.raises(WeightsError, match=r"'a1.pt' not found in MIDOG_WEIGHTS_DIR=.* \(atypical.weights\)"):
        weights.require_in_given_dir({"atypical": ["a0.pt", "a1.pt"]})
    monkeypatch.setenv("MIDOG_WEIGHTS_DIR", "")  # empty is unset, as before
    assert weights.weights_dirs() == [weights.MODEL_DIR, weights.REPO_WEIGHTS_DIR]


# ---- what a run loaded: the log and the record -----------------------------------------------------------------------

def test_the_log_names_the_checkpoints_and_the_record_holds_them(runner: WarmRunner, home: Path, tmp_path: Path,
                                                                 tiny_weights: Path):
    import torch

    folder = track1_case(tmp_path)
    record = tmp_path / "records" / "run.json"
    result = run(runner, home, folder, tiny_weights, "--record", str(record), MIDOG_VERIFIER__THRESHOLD="0.42")
    assert result.returncode == 0, result.stderr
    assert outputs(folder) == sorted([TRACK1_FILENAME, TRACK1_ATYPICAL_FILENAME])

    files = {stage: (tiny_weights / name).resolve()
             for stage, name in (("proposals", "detector.pt"), ("verifier", "verifier.pt"),
                                 ("atypical", "atypical.pt"))}
    info = [line for line in result.stderr_lines if " INFO midog.weights: " in line]
    assert [line.split(": ", 1)[1] for line in info] == [
        f"loaded proposals: {files['proposals']} (sha256 {sha256_of(files['proposals'])[:12]}, checked against its "
        "model card, tiny-yolo)",
        f"loaded verifier: {files['verifier']} (sha256 {sha256_of(files['verifier'])[:12]}, no sha256 on a model "
        "card)",
        f"loaded atypical: {files['atypical']} (sha256 {sha256_of(files['atypical'])[:12]}, no sha256 on a model "
        "card)",
        "thresholds in force: verifier 0.42, atypical 0.5",  # the tiny atypical model stores 0.5
    ]

    content = json.loads(record.read_text())
    assert [p.name for p in record.parent.iterdir()] == ["run.json"]  # written atomically: no temporary file left
    assert content["track"] == 1 and content["interface"] == TRACK1_SLUG
    assert content["input_image"] == "roi.tif"
    assert content["outputs"] == [TRACK1_FILENAME, TRACK1_ATYPICAL_FILENAME]
    assert content["checkpoints"] == [
        {"stage": stage, "path": str(path), "sha256": sha256_of(path), "card_checked": stage == "proposals",
         "architecture": "tiny-yolo" if stage == "proposals" else None}
        for stage, path in files.items()]
    assert content["thresholds"] == {"verifier": 0.42, "atypical": 0.5}
    assert content["config"]["verifier"]["threshold"] == 0.42
    assert content["config"]["atypical"]["tta"] is False and content["config"]["runtime"]["device"] == "cpu"
    assert content["config"]["proposals"]["weights"] == files["proposals"].name
    assert content["versions"]["torch"] == torch.__version__ and content["versions"]["midog"]
    assert content["record_version"] == 1


def test_track2_record_and_no_record_when_the_run_fails(runner: WarmRunner, home: Path, tmp_path: Path,
                                                        tiny_weights: Path):
    folder = track2_case(tmp_path / "ok")
    record = tmp_path / "run.json"
    result = run(runner, home, folder, tiny_weights, "--record", str(record))
    assert result.returncode == 0, result.stderr
    content = json.loads(record.read_text())
    assert (content["track"], content["interface"], content["input_image"]) == (2, TRACK2_SLUG, "stack.tif")
    assert content["outputs"] == [TRACK2_FILENAME]
    assert [(c["stage"], Path(c["path"]).name) for c in content["checkpoints"]] == [("atypical", "atypical.pt")]
    assert content["thresholds"] == {"atypical": 0.5}

    # a failed run leaves no record, and removes the one an earlier run left at that path
    bad = tmp_path / "bad"
    track2_input(bad / "in", "stack.tif").write_text("not an image\n" * 40)
    result = run(runner, home, bad, tiny_weights, "--record", str(record))
    assert result.returncode == EXIT_INPUT and not record.exists()
    missing = tmp_path / "nonexistent"
    result = run(runner, home, track2_case(tmp_path / "again"), missing, "--record", str(record))
    assert result.returncode == EXIT_WEIGHTS and not record.exists()


def test_a_record_may_not_take_a_result_files_place(runner: WarmRunner, home: Path, tmp_path: Path,
                                                    tiny_weights: Path):
    folder = track2_case(tmp_path)
    result = run(runner, home, folder, tiny_weights, "--record", str(folder / "out" / TRACK2_FILENAME))
    assert result.returncode == EXIT_INPUT
    assert result.stderr_lines == [f"error: --record {folder / 'out' / TRACK2_FILENAME} would overwrite a result "
                                   "file (see process.py --help)"]
