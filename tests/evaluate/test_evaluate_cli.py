"""Reading prediction folders (container layout, plain folder) and the command line's exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluate_factory import container_folder, payload, point, truth
from midog.evaluate import PredictionError
from midog.evaluate.__main__ import main
from midog.evaluate.io import image_key, iter_jobs, load_jobs
from midog.evaluate.track1 import evaluate_jobs as evaluate_track1

GT1 = {"007.tiff": truth([(0, 0), (100, 0)], domain=0), "140.tiff": truth([(0, 0)], domain=1, roi="random")}


def _write_gt(tmp_path: Path, gt: object) -> Path:
    path = tmp_path / "ground_truth.json"
    path.write_text(json.dumps(gt))
    return path


def test_container_layout_keeps_predictions_json_order(tmp_path: Path) -> None:
    folder = container_folder(tmp_path / "pred", {"140.tiff": payload([]), "007.tiff": payload([point(0, 0)])})
    jobs = load_jobs(folder, 1, set(GT1))
    assert [(j.pk, j.image) for j in jobs] == [("job-0", "140.tiff"), ("job-1", "007.tiff")]
    assert jobs[1].payload["points"][0]["name"] == "mitotic figure"


@pytest.mark.parametrize("ap_backend", ["numpy", "torchmetrics"])
def test_jobs_are_scored_in_predictions_json_order(tmp_path: Path, ap_backend: str) -> None:
    # Equal probabilities in two images, a TP in one and an FP in the other: pycocotools ranks the image added
    # first first, so AP depends on the job order; the final container follows predictions.json.
    gt = {"tp.tiff": truth([(0, 0)]), "fp.tiff": truth([])}
    outputs = {"tp.tiff": payload([point(0, 0, 0.5)]), "fp.tiff": payload([point(0, 0, 0.5)])}
    ap = {}
    for order in (["tp.tiff", "fp.tiff"], ["fp.tiff", "tp.tiff"]):
        folder = container_folder(tmp_path / order[0], {image: outputs[image] for image in order})
        ev = evaluate_track1(iter_jobs(folder, 1, set(gt)), gt, with_froc=False, ap_backend=ap_backend)
        assert [r.truth.name for r in ev.images] == order
        ap[order[0]] = ev.aggregates["AP"]
    assert ap == {"tp.tiff": 1.0, "fp.tiff": 0.5}


def test_the_first_bad_job_in_predictions_json_order_is_the_one_named(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    # Jobs are read and checked one after another, as the final container does: job-0's bad name is found before
    # job-1's missing output file (and before job-2's image without ground truth).
    bad = payload([{"name": "mitosis", "point": [0, 0, 0], "probability": 0.9}])
    folder = container_folder(tmp_path / "pred", {"007.tiff": bad, "140.tiff": payload([]),
                                                  "999.tiff": payload([])})
    (folder / "job-1" / "output" / "mitotic-figures.json").unlink()
    args = ["track1", "--ground-truth", str(_write_gt(tmp_path, GT1)), "--predictions", str(folder)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: job job-0: points[0]: field 'name' is 'mitosis'") and err.count("\n") == 1
    (folder / "job-0" / "output" / "mitotic-figures.json").write_text(json.dumps(payload([])))
    assert main(args) == 2
    assert capsys.readouterr().err.startswith("error: job job-1 output not found: ")


def test_track2_names_the_first_bad_job_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gt = [{"image": f"stack_{i}.tiff", "labels": ["normal", "atypical"], "tumordomains": [1, 1]} for i in (1, 2)]
    folder = container_folder(tmp_path / "pred", {"stack_1.tiff": [{"class": "normal", "confidence": 0.9}],
                                                  "stack_2.tiff": []}, track=2)
    (folder / "job-1" / "output" / "multiple-mitotic-figure-classification.json").unlink()
    assert main(["track2", "--ground-truth", str(_write_gt(tmp_path, gt)), "--predictions", str(folder)]) == 2
    assert capsys.readouterr().err.startswith("error: job job-0: results length does not match GT length")


def test_plain_folder_maps_file_names_to_images(tmp_path: Path) -> None:
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "007.json").write_text(json.dumps(payload([point(0, 0)])))
    (folder / "140.tiff.json").write_text(json.dumps(payload([])))
    jobs = load_jobs(folder, 1, set(GT1))
    assert sorted((j.pk, j.image) for j in jobs) == [("007.json", "007.tiff"), ("140.tiff.json", "140.tiff")]
    assert image_key("stack_1.json", {"stack_1.tiff"}) == "stack_1.tiff"
    assert image_key("unknown.json", {"stack_1.tiff"}) is None


def test_a_plain_folder_can_hold_its_own_metrics_json(tmp_path: Path) -> None:
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "007.json").write_text(json.dumps(payload([point(0, 0)])))
    args = ["track1", "--ground-truth", str(_write_gt(tmp_path, GT1)), "--predictions", str(folder),
            "--output", str(folder / "metrics.json")]
    assert main(args) == 0 and main(args) == 0  # the second run does not read the first one's output as a job
    (folder / "notes.json").write_text("{}")
    with pytest.raises(PredictionError, match="no ground truth for an image named like 'notes'"):
        load_jobs(folder, 1, set(GT1))


def test_missing_job_output_names_the_job(tmp_path: Path) -> None:
    folder = container_folder(tmp_path / "pred", {"007.tiff": payload([])})
    (folder / "job-0" / "output" / "mitotic-figures.json").unlink()
    with pytest.raises(PredictionError, match="job job-0 output not found: "):
        load_jobs(folder, 1, set(GT1))


def test_job_without_the_output_interface(tmp_path: Path) -> None:
    folder = container_folder(tmp_path / "pred", {"007.tiff": payload([])})
    jobs = json.loads((folder / "predictions.json").read_text())
    jobs[0]["outputs"][0]["interface"]["slug"] = "something-else"
    (folder / "predictions.json").write_text(json.dumps(jobs))
    with pytest.raises(PredictionError, match="job job-0: no 'mitotic-figures' interface in field 'outputs'"):
        load_jobs(folder, 1, set(GT1))


def test_cli_track1_on_a_container_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = container_folder(tmp_path / "pred", {"007.tiff": payload([point(0, 0), point(500, 0, 0.3)]),
                                                  "140.tiff": payload([point(1, 0)])})
    out = tmp_path / "out" / "metrics.json"
    code = main(["track1", "--ground-truth", str(_write_gt(tmp_path, GT1)), "--predictions", str(folder),
                 "--output", str(out)])
    assert code == 0
    metrics = json.loads(out.read_text())
    assert metrics["aggregates"]["recall"] == pytest.approx(2 / 3, abs=1e-5)
    assert [r["image"] for r in metrics["results"]] == ["007.tiff", "140.tiff"]
    assert "recall" in capsys.readouterr().out


def test_cli_malformed_prediction_exits_nonzero_with_one_line(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    bad = payload([{"name": "mitotic figure", "point": [0, 0, 0], "probability": "high"}])
    folder = container_folder(tmp_path / "pred", {"007.tiff": bad})
    out = tmp_path / "metrics.json"
    code = main(["track1", "--ground-truth", str(_write_gt(tmp_path, GT1)), "--predictions", str(folder),
                 "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "job job-0" in err and "'probability'" in err
    assert not out.exists()


def test_cli_track2_wrong_number_of_entries(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gt = [{"image": "stack_1.tiff", "labels": ["normal", "atypical"], "tumordomains": [1, 1]}]
    folder = container_folder(tmp_path / "pred", {"stack_1.tiff": [{"class": "normal", "confidence": 0.9}]},
                              track=2)
    code = main(["track2", "--ground-truth", str(_write_gt(tmp_path, gt)), "--predictions", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and "job job-0" in err and "result length=1, GT length=2" in err


def test_cli_missing_ground_truth(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["track2", "--ground-truth", str(tmp_path / "nope.json"), "--predictions", str(tmp_path)])
    assert code == 2 and "ground truth not found: " in capsys.readouterr().err
