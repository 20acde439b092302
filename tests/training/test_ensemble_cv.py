"""training.ensemble_cv: an ensemble's cross-validated figures from its members' kept out-of-fold probabilities."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from midog.errors import ConfigError
from tests.training.fake_amibr import write_amibr
from training.amibr import assign_folds, load_index
from training.classifier_cv import crop_names, other_folds_thresholds
from training.classifier_fold import balanced_accuracy, best_threshold
from training.ensemble_cv import main

FOLDS = 3


@pytest.fixture
def runs(tmp_path: Path) -> tuple[Path, list[Path], list[np.ndarray], list[np.ndarray]]:
    """A config on generated AMi-Br crops and two runs whose fold reports hold known probabilities."""
    root = write_amibr(tmp_path / "amibr", n_slides=6, per_slide=6)
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({"data_root": str(root), "folds": FOLDS, "fold_seed": 0}))
    index = load_index(root)
    fold_of = assign_folds(index, "slide", FOLDS, 0)
    rng = np.random.default_rng(0)
    labels, run_dirs, probs = [], [tmp_path / "run_a", tmp_path / "run_b"], {0: [], 1: []}
    for k in range(FOLDS):
        val = np.flatnonzero(fold_of == k)
        y = index["label"].to_numpy()[val]
        labels.append(y)
        for r, run in enumerate(run_dirs):
            p = np.clip(0.5 * y + rng.uniform(0, 0.7, len(y)), 0, 1).round(6)  # informative, imperfect
            probs[r].append(p)
            (run / f"fold{k}").mkdir(parents=True)
            (run / f"fold{k}" / "tta_report.json").write_text(json.dumps(
                {"files": crop_names(index, val), "tta": {"probs": p.tolist()}}))
    return config, run_dirs, labels, [(a + b) / 2 for a, b in zip(probs[0], probs[1])]


def test_the_ensemble_is_scored_on_the_mean_of_its_members(runs, tmp_path: Path):
    config, run_dirs, labels, mean = runs
    out = tmp_path / "report.json"
    assert main(["--config", str(config), "--runs", *map(str, run_dirs), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    own = [best_threshold(y, p)[0] for y, p in zip(labels, mean)]
    expected = [balanced_accuracy(y, p, t) for y, p, t in zip(labels, mean, other_folds_thresholds(own))]
    ensemble = report["ensemble"]
    assert ensemble["balanced_accuracy_at_other_folds_threshold"]["folds"] == [round(v, 4) for v in expected]
    assert ensemble["roc_auc"]["folds"] == [round(roc_auc_score(y, p), 4) for y, p in zip(labels, mean)]
    assert ensemble["ship_threshold"] == pytest.approx(float(np.median(own)))
    assert set(report["members"]) == {str(run) for run in run_dirs}


def test_runs_of_other_folds_or_one_run_are_refused_in_one_line(runs, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]):
    config, run_dirs, _, _ = runs
    report = run_dirs[1] / "fold1" / "tta_report.json"
    data = json.loads(report.read_text())
    report.write_text(json.dumps({**data, "files": data["files"][::-1]}))
    assert main(["--config", str(config), "--runs", *map(str, run_dirs)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "scored other crops than fold 1" in err[0]
    assert main(["--config", str(config), "--runs", str(run_dirs[0])]) == 2
    assert "two or more" in capsys.readouterr().err


def test_the_card_names_each_member_with_its_checksum_and_figures(runs, tmp_path: Path):
    config, run_dirs, _, _ = runs
    members = []
    for name in ("a.pt", "b.pt"):
        (tmp_path / name).write_bytes(name.encode())
        members.append(tmp_path / name)
    card_path, out = tmp_path / "ensemble.json", tmp_path / "report.json"
    args = ["--config", str(config), "--runs", *map(str, run_dirs), "--out", str(out), "--card", str(card_path),
            "--members", *map(str, members)]
    assert main(args) == 0
    card, report = json.loads(card_path.read_text()), json.loads(out.read_text())
    assert [m["file"] for m in card["members"]] == ["a.pt", "b.pt"]
    assert card["members"][0]["sha256"] == hashlib.sha256(b"a.pt").hexdigest()
    assert card["threshold"] == report["ensemble"]["ship_threshold"]
    assert card["cross_validation"]["ensemble"] == report["ensemble"]
    assert card["command"].startswith("python -m training.ensemble_cv --config")
    assert main(args[:-1]) == 2 and main(args[:-3]) == 2  # one member for two runs; --card without --members


def test_split_options_override_the_configs_folds(runs, capsys: pytest.CaptureFixture[str]):
    """`--split dataset --folds 2` scores the runs on the source folds: the generated crops have one source, so the
    split is refused in one line (as a config's `split: dataset` would be), not scored on the config's slide folds."""
    config, run_dirs, _, _ = runs
    code = main(["--config", str(config), "--runs", *map(str, run_dirs), "--split", "dataset", "--folds", "2"])
    assert code == ConfigError.exit_code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs at least 2 source datasets, got ['FAKE']" in err[0]


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    (None, "holds no tta.probs of"),
])
def test_a_broken_fold_report_is_refused_in_one_line(runs, content: str | None, message: str,
                                                     capsys: pytest.CaptureFixture[str]):
    config, run_dirs, _, _ = runs
    report = run_dirs[0] / "fold2" / "tta_report.json"
    if content is None:  # the right crops, but the probabilities cut short
        data = json.loads(report.read_text())
        content = json.dumps({**data, "tta": {"probs": data["tta"]["probs"][:-1]}})
    report.write_text(content)
    assert main(["--config", str(config), "--runs", *map(str, run_dirs)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and str(report) in err[0]


def test_each_members_tta_views_are_reported_and_must_agree_across_its_folds(runs, tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str]):
    config, run_dirs, _, _ = runs
    for k in range(FOLDS):  # the second run rescored with the 4 rotations (evaluate-tta --tta-views 4)
        report = run_dirs[1] / f"fold{k}" / "tta_report.json"
        report.write_text(json.dumps({**json.loads(report.read_text()), "tta_views": 4}))
    out = tmp_path / "report.json"
    assert main(["--config", str(config), "--runs", *map(str, run_dirs), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["tta_views"] == [8, 4]
    assert [report["members"][str(run)]["tta_views"] for run in run_dirs] == [8, 4]
    fold1 = run_dirs[1] / "fold1" / "tta_report.json"
    fold1.write_text(json.dumps({**json.loads(fold1.read_text()), "tta_views": 8}))
    assert main(["--config", str(config), "--runs", *map(str, run_dirs)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "scored with different TTA views [4, 8]" in err[-1]
