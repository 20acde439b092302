"""`python -m midog.batch`: a whole test set run with the models loaded once, written in grand-challenge's
predictions.json + <pk>/output/ layout, read back and scored by the evaluation code; tiny generated images and tiny
random models."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import stack_factory
from conftest import shared_path
from output_checks import assert_multiple_points, assert_track2_entries
from roi_factory import he_roi, tiny_track1_weights, track1_input
from roi_factory import write_tiff as write_roi

from midog.batch import Case, evaluate_layout, job_entry, main, write_job
from midog.config import resolve_config
from midog.evaluate import PredictionError
from midog.evaluate import __main__ as evaluate_cli
from midog.evaluate import container
from midog.evaluate.io import load_jobs
from midog.outputs import TRACK1_ATYPICAL_FILENAME, TRACK1_FILENAME, TRACK2_FILENAME

TRACK1_SLUG = "histopathology-region-of-interest-cropout"
TRACK2_SLUG = "stacked-histopathology-roi-cropouts"


@pytest.fixture(scope="module")
def track1_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_track1_weights(tmp_path_factory.mktemp("weights1"))


@pytest.fixture(scope="module")
def atypical_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return stack_factory.tiny_atypical(tmp_path_factory.mktemp("weights2") / "atypical.pt", seed=3)


@pytest.fixture
def track1_env(track1_weights: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MIDOG_WEIGHTS_DIR", str(track1_weights))
    monkeypatch.setenv("MIDOG_ATYPICAL__TTA", "false")
    monkeypatch.setenv("MIDOG_RUNTIME__DEVICE", "cpu")
    return track1_weights


@pytest.fixture
def track2_env(atypical_weights: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("MIDOG_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("MIDOG_ATYPICAL__WEIGHTS", str(atypical_weights))
    monkeypatch.setenv("MIDOG_RUNTIME__DEVICE", "cpu")
    return atypical_weights


def batch(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, list[str]]:
    """(exit code, stdout, the `error:` lines of stderr)."""
    code = main([str(a) for a in args] + ["--quiet"])
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines() if line.startswith("error:")]


def read(path: Path) -> Any:
    return json.loads(path.read_text())


def assert_platform_jobs(out: Path, images: list[str], input_slug: str, output_slug: str, output_file: str) -> list:
    """predictions.json lists one Succeeded job per image, in order, each output where the platform puts it."""
    jobs = read(out / "predictions.json")
    assert [job["inputs"][0]["image"]["name"] for job in jobs] == images
    for job in jobs:
        uuid.UUID(job["pk"])  # the platform's pks are UUIDs
        assert job["status"] == "Succeeded"
        assert job["inputs"][0]["interface"]["slug"] == input_slug
        assert [o["interface"]["slug"] for o in job["outputs"]] == [output_slug]
        assert job["outputs"][0]["interface"]["relative_path"] == output_file
        assert (out / job["pk"] / "output" / output_file).is_file()
    assert len({job["pk"] for job in jobs}) == len(jobs)
    return jobs


def cli_metrics(tmp_path: Path, track: str, ground_truth: Path, predictions: Path) -> dict:
    """What `python -m midog.evaluate trackN --predictions ... --output ...` writes for the same folder."""
    written = tmp_path / f"cli-{track}.json"
    assert evaluate_cli.main([track, "--ground-truth", str(ground_truth), "--predictions", str(predictions),
                              "--output", str(written)]) == 0
    return read(written)


# ---- Track 1 -----------------------------------------------------------------------------------------------------

def test_track1_images_are_run_written_in_the_platform_layout_and_scored(tmp_path: Path, track1_env: Path,
                                                                        capsys: pytest.CaptureFixture[str]):
    images = tmp_path / "images"
    write_roi(images / "b.tif", he_roi(420, 300, seed=1, figures=[(120, 100)]))
    write_roi(images / "a.tiff", he_roi(380, 340, seed=2, figures=[(200, 150), (300, 220)]), spacing_um=(0.25, 0.3))
    (images / "notes.txt").write_text("not an image")
    gt = {"a.tiff": {"annotations": [[0.05, 0.045, 0], [0.075, 0.066, 0]], "tumor domain": 0, "roi type": "hotspot"},
          "b.tif": {"annotations": [[0.03, 0.025, 0]], "tumor domain": 1, "roi type": "random"}}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    out = tmp_path / "out"

    code, stdout, errors = batch(capsys, "--images", images, "--track", 1, "--out", out,
                                 "--ground-truth", tmp_path / "gt.json")
    assert code == 0 and errors == []
    jobs = assert_platform_jobs(out, ["a.tiff", "b.tif"], TRACK1_SLUG, "mitotic-figures", TRACK1_FILENAME)

    # each job's files are process.py's for that image (the same chain, the same models)
    from midog.outputs import track1_outputs
    from midog.pipeline import Track1Detector

    detector = Track1Detector.from_config(resolve_config())
    for job in jobs:
        figures = read(out / job["pk"] / "output" / TRACK1_FILENAME)
        atypical = read(out / job["pk"] / "output" / TRACK1_ATYPICAL_FILENAME)
        assert_multiple_points(figures)
        assert_multiple_points(atypical)
        direct = track1_outputs(detector.detect(images / job["inputs"][0]["image"]["name"], progress=False).detections)
        assert [figures, atypical] == json.loads(json.dumps(direct))
    assert any(read(out / job["pk"] / "output" / TRACK1_FILENAME)["points"] for job in jobs), \
        "the tiny detector is biased to propose: the scoring below has points to score"

    # read back by the evaluation code, matched to the ground truth by image name, in predictions.json order
    assert [job.image for job in load_jobs(out, 1, set(gt))] == ["a.tiff", "b.tif"]
    metrics = read(out / "metrics.json")
    assert metrics == cli_metrics(tmp_path, "track1", tmp_path / "gt.json", out)
    assert [r["image"] for r in metrics["results"]] == ["a.tiff", "b.tif"]
    assert {"tumor_0_f1", "tumor_1_f1", "roi_type_hotspot_f1"} <= set(metrics["aggregates"])
    assert f"f1_score                       {metrics['aggregates']['f1_score']:.6f}" in stdout
    # the evaluation container reads the same folder as its /input
    assert container.main(["--input", str(out), "--ground-truth", str(tmp_path / "gt.json"),
                           "--output", str(tmp_path / "container")]) == 0
    assert read(tmp_path / "container" / "metrics.json")["aggregates"] == metrics["aggregates"]


def track1_layout(out: Path, payloads: dict[str, dict]) -> None:
    """A predictions.json layout written by the batch's own writers, without running a model."""
    cases = [Case(name, Path(name), name, 1) for name in payloads]
    now = datetime.now(timezone.utc)
    for case in cases:
        write_job(out / case.pk / "output", {TRACK1_FILENAME: payloads[case.image_name]})
    (out / "predictions.json").write_text(json.dumps([job_entry(case, now, now) for case in cases]))


def test_the_coordinate_check_names_its_option_and_the_batch_passes_it_through(tmp_path: Path):
    gt = {"a.tiff": {"annotations": [[0.05, 0.05, 0]], "tumor domain": 0, "roi type": "hotspot"}}
    in_pixels = {"name": "Points of interest", "type": "Multiple points", "version": {"major": 1, "minor": 0},
                 "points": [{"name": "mitotic figure", "point": [200.0, 200.0, 0.0], "probability": 0.9}]}
    track1_layout(tmp_path, {"a.tiff": in_pixels})
    with pytest.raises(PredictionError, match="pixel coordinates.*--no-coordinate-check"):
        evaluate_layout(tmp_path, 1, gt)
    assert evaluate_layout(tmp_path, 1, gt, check_coordinates=False).aggregates["recall"] == pytest.approx(0, abs=1e-5)


def test_job_entries_have_the_official_test_vectors_layout(tmp_path: Path):
    vectors = shared_path("grand-challenge")

    def shape(value: Any) -> Any:  # keys, recursively, down to the values
        if isinstance(value, dict):
            return {k: shape(v) for k, v in value.items() if k != "example_value"}
        if isinstance(value, list):
            return [shape(v) for v in value[:1]]
        return None

    for track in (1, 2):
        official = read(vectors / f"track{track}-evaluation" / "test" / "input" / "predictions.json")[0]
        name = official["inputs"][0]["image"]["name"]
        now = datetime.now(timezone.utc)
        ours = job_entry(Case(name, Path(name), name, track), now, now)
        official_shape = shape(official)
        for key in ("started_at", "completed_at"):  # the Track 1 vectors' jobs lack them
            official_shape.setdefault(key, None)
        assert shape(ours) == official_shape
        for field in ("slug", "kind", "super_kind", "relative_path"):
            assert ours["inputs"][0]["interface"][field] == official["inputs"][0]["interface"][field]
            assert ours["outputs"][0]["interface"][field] == official["outputs"][0]["interface"][field]


# ---- Track 2 -----------------------------------------------------------------------------------------------------

def expected_pages(pages: np.ndarray) -> list[dict]:
    from midog.atypical import load_atypical
    from midog.outputs import track2_classification

    config = resolve_config().atypical
    stage = load_atypical(config)
    return track2_classification(stage.predict_proba(list(pages)).tolist(), stage.threshold, config.confidence)


def assert_same_pages(entries: list[dict], expected: list[dict]) -> None:
    assert_track2_entries(entries)
    assert [e["class"] for e in entries] == [e["class"] for e in expected]
    np.testing.assert_allclose([e["confidence"] for e in entries], [e["confidence"] for e in expected], atol=1e-5)


def test_track2_stacks_are_run_written_in_the_platform_layout_and_scored(tmp_path: Path, track2_env: Path,
                                                                        capsys: pytest.CaptureFixture[str]):
    images = tmp_path / "stacks"
    pages = {"stack_1.tiff": stack_factory.he_pages(4, size=48, seed=1),
             "stack_2.mha": stack_factory.he_pages(3, size=48, seed=2)}
    stack_factory.write_tiff(images / "stack_1.tiff", pages["stack_1.tiff"])
    stack_factory.write_mha(images / "stack_2.mha", pages["stack_2.mha"])
    gt = [{"image": "stack_1.tiff", "labels": ["normal", "atypical", "normal", "atypical"],
           "tumordomains": [1, 1, 2, 2]},
          {"image": "stack_2.mha", "labels": ["atypical", "normal", "normal"], "tumordomains": [2, 2, 2]}]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    out = tmp_path / "out"

    code, stdout, errors = batch(capsys, "--images", images, "--track", 2, "--out", out,
                                 "--ground-truth", tmp_path / "gt.json")
    assert code == 0 and errors == []
    jobs = assert_platform_jobs(out, ["stack_1.tiff", "stack_2.mha"], TRACK2_SLUG,
                                "multiple-mitotic-figure-classification", TRACK2_FILENAME)
    for job in jobs:
        name = job["inputs"][0]["image"]["name"]
        assert_same_pages(read(out / job["pk"] / "output" / TRACK2_FILENAME), expected_pages(pages[name]))
    metrics = read(out / "metrics.json")
    assert metrics == cli_metrics(tmp_path, "track2", tmp_path / "gt.json", out)
    assert {"domain_1", "domain_2"} <= set(metrics["aggregates"])
    assert "overall_balanced_accuracy" in stdout


def test_cases_take_the_image_name_from_inputs_json_and_rerun_into_the_same_jobs(
        tmp_path: Path, track2_env: Path, capsys: pytest.CaptureFixture[str]):
    cases = tmp_path / "cases"
    pages = {"stack_1.tiff": stack_factory.he_pages(2, size=40, seed=4),
             "stack_2.tif": stack_factory.he_pages(3, size=40, seed=5)}
    # the platform's copy of an input is often named otherwise than the uploaded image
    stack_factory.track2_input(cases / "job-b", "stack_1.tiff")
    stack_factory.write_tiff(cases / "job-b" / "images" / TRACK2_SLUG / "5e1c0a7e.tiff", pages["stack_1.tiff"])
    stack_factory.write_tiff(stack_factory.track2_input(cases / "job-a", "stack_2.tif"), pages["stack_2.tif"])
    (cases / ".hidden").mkdir()
    out = tmp_path / "out"

    code, stdout, errors = batch(capsys, "--cases", cases, "--out", out)
    assert code == 0 and errors == []
    assert "track 2: 2 jobs" in stdout
    jobs = assert_platform_jobs(out, ["stack_2.tif", "stack_1.tiff"], TRACK2_SLUG,  # case folders by name
                                "multiple-mitotic-figure-classification", TRACK2_FILENAME)
    for job in jobs:
        name = job["inputs"][0]["image"]["name"]
        assert_same_pages(read(out / job["pk"] / "output" / TRACK2_FILENAME), expected_pages(pages[name]))
    assert not (out / "metrics.json").exists()  # no ground truth, no scoring

    # one input folder on its own is a test set of one; a rerun writes the same job folder again
    assert batch(capsys, "--cases", cases / "job-a", "--track", 2, "--out", out)[0] == 0
    (rerun,) = read(out / "predictions.json")
    assert rerun["pk"] == jobs[0]["pk"] and rerun["inputs"] == jobs[0]["inputs"]


# ---- whole-run problems and failing cases ------------------------------------------------------------------------

def test_a_failing_case_is_one_line_the_others_run_and_no_predictions_json_is_written(
        tmp_path: Path, track2_env: Path, capsys: pytest.CaptureFixture[str]):
    images = tmp_path / "stacks"
    stack_factory.write_tiff(images / "good.tiff", stack_factory.he_pages(2, size=40))
    (images / "bad.tiff").write_bytes(b"II*\x00 not really a tiff")
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.json").write_text("[]")  # an earlier run's: it would read as this run's
    (out / "metrics.json").write_text("{}")

    code, stdout, errors = batch(capsys, "--images", images, "--track", 2, "--out", out)
    assert code == 2  # bad input
    assert len(errors) == 1 and errors[0].startswith("error: case bad.tiff: "), errors
    assert not (out / "predictions.json").exists() and not (out / "metrics.json").exists()
    good = Case("good.tiff", images / "good.tiff", "good.tiff", 2)
    assert_track2_entries(read(out / good.pk / "output" / TRACK2_FILENAME))  # the others still ran

    # a case folder that cannot be read is reported the same way, before any model runs
    cases = tmp_path / "cases"
    stack_factory.write_tiff(stack_factory.track2_input(cases / "fine"), stack_factory.he_pages(1, size=40))
    (cases / "broken" / "images").mkdir(parents=True)
    code, stdout, errors = batch(capsys, "--cases", cases, "--out", out)
    assert code == 2
    assert len(errors) == 1 and errors[0].startswith("error: case broken: inputs.json not found: "), errors
    assert not (out / "predictions.json").exists()


def test_whole_run_problems_end_it_before_any_model_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]):
    monkeypatch.setenv("MIDOG_ATYPICAL__WEIGHTS", str(tmp_path / "absent.pt"))  # loading it would be exit 3
    monkeypatch.delenv("MIDOG_WEIGHTS_DIR", raising=False)
    cases = tmp_path / "cases"
    stack_factory.write_tiff(stack_factory.track2_input(cases / "t2"), stack_factory.he_pages(1, size=40))
    track1_input(cases / "t1", np.full((64, 64, 3), 200, np.uint8))
    out = tmp_path / "out"

    code, _, errors = batch(capsys, "--cases", cases, "--out", out)
    assert code == 2 and len(errors) == 1 and "mix Track 1 (t1) and Track 2 (t2)" in errors[0]
    assert not out.exists()

    code, _, errors = batch(capsys, "--cases", cases / "t2", "--track", 1, "--out", out)
    assert code == 2 and len(errors) == 1 and "--track 1" in errors[0]

    (tmp_path / "gt.json").write_text(json.dumps([{"image": "other.tiff", "labels": ["normal"],
                                                   "tumordomains": [0]}]))
    code, _, errors = batch(capsys, "--cases", cases / "t2", "--out", out, "--ground-truth", tmp_path / "gt.json")
    assert code == 2 and len(errors) == 1 and "no entry for 1 of the 1 images: stack.tiff" in errors[0]
    code, _, errors = batch(capsys, "--cases", cases / "t2", "--out", out, "--ground-truth", tmp_path / "gt.json",
                            "--no-coordinate-check")
    assert code == 2 and errors == ["error: --no-coordinate-check applies to Track 1 only"]

    code, _, errors = batch(capsys, "--images", cases / "t2", "--track", 2, "--out", out)
    assert code == 2 and "use --cases" in errors[0]
    code, _, errors = batch(capsys, "--cases", cases / "t2", "--out", out)  # now the models load: exit 3
    assert code == 3 and len(errors) == 1 and "absent.pt" in errors[0]
    assert not (out / "predictions.json").exists()


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path):
    for args in (["--images", tmp_path, "--out", tmp_path],
                 ["--cases", tmp_path, "--out", tmp_path, "--no-coordinate-check"],
                 ["--images", tmp_path, "--cases", tmp_path, "--out", tmp_path]):
        with pytest.raises(SystemExit) as exit_:
            main([str(a) for a in args])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error: ")
