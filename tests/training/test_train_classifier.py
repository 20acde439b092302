"""The atypical classifier's training loop on generated crops with a tiny timm model: it learns, saves a checkpoint
that reloads strictly with its validation threshold, resumes to the same weights, and ships with a model card."""

from __future__ import annotations

import json
import shutil
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

import training.classifier_fold as classifier_fold  # where train_fold looks up train_epoch
import training.train_classifier as tc
from midog.classifier import load_classifier
from midog.errors import ConfigError, InputError
from midog.weights import read_model_card, sha256_of
from training.amibr import load_index, slide_folds
from training.runtime import Dist
from training.train_classifier import (TrainConfig, balanced_accuracy, best_threshold, load_train_config, main,
                                       train_fold)

REPO = Path(__file__).resolve().parents[2]


def _crop(atypical: bool, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """H&E-like noise with a dark (atypical) or faint (normal) centred blob: learnable in a few steps."""
    image = rng.normal([215, 170, 205], 12, (size, size, 3))
    yy, xx = np.mgrid[:size, :size]
    image[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2] = [70, 40, 110] if atypical else [180, 140, 190]
    return np.clip(image, 0, 255).astype(np.uint8)


def _write_amibr(root: Path, n_slides: int = 6, per_slide: int = 8, votes: bool = True) -> Path:
    """The AMi-Br layout with generated crops; like the real CSV, three experts' votes (2 or 3 of them for an
    atypical majority, 0 or 1 for a normal one) unless `votes` is False."""
    rng = np.random.default_rng(0)
    rows = []
    for s in range(n_slides):
        for i in range(per_slide):
            label = "Atypical" if i % 3 == 0 else "Normal"
            (root / label).mkdir(parents=True, exist_ok=True)
            name = f"S{s}_{i}.png"
            Image.fromarray(_crop(label == "Atypical", rng)).save(root / label / name)
            row = {"slide": f"{s:03d}.tiff", "dataset": "FAKE", "dataset_uid": name, "final_label": label}
            if votes:
                n_atypical = (3 - s % 2) if label == "Atypical" else int(i % 4 == 1)
                row.update({f"expert{e}_atypical": e <= n_atypical for e in (1, 2, 3)})
            rows.append(row)
    pd.DataFrame(rows).to_csv(root / "amibr_train_split.csv")
    return root


def _config(root: Path, out: Path, **kw) -> TrainConfig:
    cfg = load_train_config(REPO / "training/configs/atypical.yaml",
                            {"data_root": str(root), "out": str(out), "arch": "test_resnet", "input_size": 32,
                             "folds": 2, "epochs": 3, "min_epochs": 1, "patience": 5, "batch_size": 8, "lr": 3e-3,
                             "warmup_epochs": 0.5, **kw})
    return cfg


def test_shipped_config_loads_and_rejects_unknown_keys(tmp_path):
    cfg = load_train_config(REPO / "training/configs/atypical.yaml")
    assert cfg.arch and cfg.input_size > 0 and cfg.positive == "atypical"
    with pytest.raises(ValueError, match="unknown"):
        load_train_config(None, {"learning_rate": 1})


def test_threshold_maximises_balanced_accuracy():
    labels = np.array([0, 0, 0, 0, 1, 1])
    probs = np.array([0.1, 0.2, 0.3, 0.6, 0.5, 0.9])
    threshold, score = best_threshold(labels, probs)
    assert score == pytest.approx(balanced_accuracy(labels, probs, threshold))
    assert 0.3 < threshold <= 0.5 and score == pytest.approx(0.875)   # catches both positives, one false alarm
    assert best_threshold(np.zeros(3), probs[:3]) == (0.5, 0.5)       # one class: nothing to balance, 0.5 kept


def _threshold_before_issue_24(labels: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """Training's own rule before the package's one replaced it: 0, the midpoints, 1; the first best."""
    values = np.unique(probs)
    candidates = np.concatenate([[0.0], (values[1:] + values[:-1]) / 2, [1.0]])
    scores = [balanced_accuracy(labels, probs, t) for t in candidates]
    return float(candidates[int(np.argmax(scores))]), max(scores)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_the_shared_threshold_rule_is_the_one_training_always_used(dtype: type) -> None:
    rng = np.random.default_rng(3)
    for size, decimals in [(40, 1), (300, 2), (1000, 6)]:  # coarse scores tie a lot
        probs = np.round(rng.random(size), decimals).astype(dtype)
        labels = (rng.random(size) < 0.3 + 0.4 * probs).astype(np.int64)
        threshold, score = best_threshold(labels, probs)
        assert (threshold, score) == pytest.approx(_threshold_before_issue_24(labels, probs), abs=1e-7)
        assert score == balanced_accuracy(labels, probs, threshold)


def test_each_fold_is_scored_at_thresholds_it_was_not_tuned_on():
    assert tc.other_folds_thresholds([0.2, 0.4, 0.9]) == pytest.approx([0.65, 0.55, 0.3])
    assert tc.other_folds_thresholds([0.3, 0.6]) == pytest.approx([0.6, 0.3])


def test_cross_validation_trains_saves_reloads_and_ships(tmp_path, monkeypatch):
    root = _write_amibr(tmp_path / "amibr")
    cfg = _config(root, tmp_path / "run")
    torch.set_num_threads(1)
    results = tc.cross_validate(cfg, tmp_path / "run", Dist())
    assert [r.fold for r in results] == [0, 1]
    summary = json.loads((tmp_path / "run" / "cv_summary.json").read_text())
    assert summary["data"]["slides"] == 6 and summary["cv"]["roc_auc"]["mean"] > 0.9   # the blobs are learnable
    for r in results:
        clf = load_classifier(r.checkpoint)            # strict load
        assert clf.threshold == pytest.approx(r.threshold) and clf.positive == "atypical"
        assert clf.meta["fold"] == r.fold
        history = pd.read_csv(Path(r.checkpoint).parent / "metrics.csv")
        assert list(history["epoch"]) == [1, 2, 3] and "balanced_accuracy" in history

    target = tmp_path / "weights" / "atypical_fold0.pt"
    tc.ship(cfg, Path(results[0].checkpoint), target, summary, {"ensemble": ["atypical_fold0.pt"]}, half=True)
    card = read_model_card(target)
    assert card["sha256"] == sha256_of(target) and card["architecture"] == "test_resnet"
    assert card["cross_validation"]["balanced_accuracy"]["folds"] == summary["cv"]["balanced_accuracy"]["folds"]
    shipped, original = load_classifier(target), load_classifier(results[0].checkpoint)
    assert next(iter(shipped.model.state_dict().values())).dtype == torch.float32   # fp16 on disk, fp32 loaded
    crops = np.stack([_crop(True, np.random.default_rng(1)), _crop(False, np.random.default_rng(2))])
    np.testing.assert_allclose(shipped.predict_proba(crops), original.predict_proba(crops), atol=2e-3)


def _interrupt_then_resume(monkeypatch, cfg, crops, labels, train_idx, val_idx, out: Path, ctx: Dist):
    """Train a fold that is interrupted in its second epoch, then resume it from last.pt."""
    real_epoch, calls = tc.train_epoch, []

    def crash_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(classifier_fold, "train_epoch", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        train_fold(cfg, crops, labels, train_idx, val_idx, out, ctx)
    monkeypatch.setattr(classifier_fold, "train_epoch", real_epoch)
    return train_fold(cfg, crops, labels, train_idx, val_idx, out, ctx, resume=True)


def test_resume_after_interruption_gives_the_same_weights(tmp_path, monkeypatch):
    root = _write_amibr(tmp_path / "amibr")
    torch.set_num_threads(1)
    index, crops, labels = tc.prepare_data(_config(root, tmp_path))
    train_idx, val_idx = np.arange(0, 32), np.arange(32, 48)
    cfg = _config(root, tmp_path, epochs=2, ema_epochs=[2, 6])

    straight = train_fold(cfg, crops, labels, train_idx, val_idx, tmp_path / "a", Dist())

    resumed = _interrupt_then_resume(monkeypatch, cfg, crops, labels, train_idx, val_idx, tmp_path / "b", Dist())

    a = torch.load(tmp_path / "a" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    assert b["state"]["epoch"] == 2 and len(b["state"]["history"]) == 2
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, msg=key)
    assert set(a["emas"]) == set(cfg.ema_epochs) != set()           # the moving averages resume too
    for horizon, averaged in a["emas"].items():
        for key, value in averaged.items():
            torch.testing.assert_close(b["emas"][horizon][key], value, msg=f"ema{horizon} {key}")
    assert resumed.threshold == pytest.approx(straight.threshold)
    with pytest.raises(ValueError, match="no moving average over 7 epochs"):
        train_fold(_config(root, tmp_path, epochs=3, ema_epochs=[7]), crops, labels, train_idx, val_idx,
                   tmp_path / "b", Dist(), resume=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs it)")
def test_resume_on_cuda(tmp_path, monkeypatch):
    """The resume state's RNG tensors must come back as CPU byte tensors (they once came back on the GPU)."""
    root = _write_amibr(tmp_path / "amibr")
    index, crops, labels = tc.prepare_data(_config(root, tmp_path))
    train_idx, val_idx = np.arange(0, 32), np.arange(32, 48)
    cfg, ctx = _config(root, tmp_path, epochs=2), Dist(device=torch.device("cuda"))
    _interrupt_then_resume(monkeypatch, cfg, crops, labels, train_idx, val_idx, tmp_path / "b", ctx)
    saved = torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    assert saved["state"]["epoch"] == 2 and len(saved["state"]["history"]) == 2


def fails(capsys: pytest.CaptureFixture[str], argv: list[str], code: int, pattern: str) -> None:
    """`main(argv)` ends with `code` and one `error:` line on stderr that matches `pattern`."""
    capsys.readouterr()
    assert main(argv) == code
    err = capsys.readouterr().err
    assert re.match(rf"error: {pattern}", err) and err.count("\n") == 1, err


@pytest.mark.parametrize("text, message", [("lr: 0.1\nwings: 2\n", "unknown key 'wings'"),
                                           ("augment:\n  dihedal: 2\n", "unknown key 'augment.dihedal' "
                                                                         "\\(did you mean 'augment.dihedral'\\?\\)"),
                                           ("epochs: thirty\n", "epochs is 'thirty'; expected int"),
                                           ("split: patch\n", "split must be one of"),
                                           ("tta_views: 3\n", "tta_views must be one of \\(4, 8\\)")])
def test_a_bad_training_config_is_one_line(tmp_path, capsys, text, message):
    config = tmp_path / "cfg.yaml"
    config.write_text(text)
    fails(capsys, ["--config", str(config)], ConfigError.exit_code, f"training config {config}: {message}")


def test_an_unreadable_training_config_is_one_line(tmp_path, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text("lr: [unclosed\n")
    fails(capsys, ["--config", str(config)], ConfigError.exit_code, f"cannot read training config {config}: while")
    fails(capsys, ["--config", str(tmp_path / "none.yaml")], ConfigError.exit_code, "cannot read training config")


def test_shipped_fold_models_follow_ship_epoch_last(tmp_path, capsys):
    root = _write_amibr(tmp_path / "amibr")
    config = tmp_path / "cfg.yaml"
    config.write_text(f"data_root: {root}\narch: test_resnet\ninput_size: 32\nepochs: 2\nmin_epochs: 1\n"
                      f"batch_size: 8\nfolds: 2\nship_epoch: last\nout: {tmp_path / 'run'}\n")
    fails(capsys, ["--config", str(config), "--fold", "5"], InputError.exit_code, "--fold 5: the config has 2 folds")
    assert not (tmp_path / "run" / "fold5").exists()
    assert main(["--config", str(config), "--evaluate-tta", "--ship-folds", str(tmp_path / "w" / "atypical.pt")]) == 0
    assert json.loads((tmp_path / "run" / "cv_summary.json").read_text())["ship_epoch"] == "last"
    for k in range(2):
        final = torch.load(tmp_path / "run" / f"fold{k}" / "final.pt", weights_only=True)
        shipped = torch.load(tmp_path / "w" / f"atypical_fold{k}.pt", weights_only=True)
        assert shipped["meta"]["epoch"] == final["meta"]["epoch"] == 2
        assert shipped["tta_threshold"] == final["tta_threshold"]  # set by --evaluate-tta on final.pt
        for key, value in final["state_dict"].items():
            torch.testing.assert_close(shipped["state_dict"][key], value, msg=key)


def test_cli_single_fold_and_full_retrain(tmp_path):
    root = _write_amibr(tmp_path / "amibr")
    config = tmp_path / "cfg.yaml"
    config.write_text(f"data_root: {root}\narch: test_resnet\ninput_size: 32\nepochs: 1\nmin_epochs: 1\n"
                      f"batch_size: 8\nfolds: 2\nout: {tmp_path / 'run'}\n")
    assert main(["--config", str(config), "--fold", "1"]) == 0
    assert (tmp_path / "run" / "fold1" / "best.pt").is_file() and not (tmp_path / "run" / "cv_summary.json").exists()
    assert main(["--config", str(config), "--fold", "0"]) == 0
    assert (tmp_path / "run" / "cv_summary.json").is_file()
    assert main(["--config", str(config), "--evaluate-tta", "--ship-folds", str(tmp_path / "w" / "atypical.pt"),
                 "--half"]) == 0
    report = json.loads((tmp_path / "run" / "tta_report.json").read_text())
    assert len(report["tta"]["roc_auc"]["folds"]) == 2 and 0 <= report["no_tta"]["pooled_roc_auc"] <= 1
    summary = json.loads((tmp_path / "run" / "cv_summary.json").read_text())
    assert summary["last_epoch"]["epoch"]["folds"] == [1, 1]   # the unselected last epoch, beside the best one
    # each fold scored at the threshold of the fold it was not tuned on (2 folds: the other one's)
    index, crops, labels = tc.prepare_data(load_train_config(config))
    fold_of = slide_folds(index, 2, 0)
    for k in range(2):
        val = fold_of == k
        probs = load_classifier(tmp_path / "run" / f"fold{k}" / "best.pt").predict_proba(crops[val])
        other = load_classifier(tmp_path / "run" / f"fold{1 - k}" / "best.pt").threshold
        assert report["no_tta"]["balanced_accuracy_at_other_folds_threshold"]["folds"][k] == pytest.approx(
            balanced_accuracy(labels[val], probs, other), abs=1e-4)
    for k in range(2):
        card = read_model_card(tmp_path / "w" / f"atypical_fold{k}.pt")
        assert card["ensemble"]["members"] == ["atypical_fold0.pt", "atypical_fold1.pt"]
        assert card["ensemble"]["this_fold"] == k and card["validation_tta"] == report
        shipped, fold = (load_classifier(tmp_path / "w" / f"atypical_fold{k}.pt"),
                         load_classifier(tmp_path / "run" / f"fold{k}" / "best.pt"))
        assert shipped.threshold == pytest.approx(fold.threshold)
        # the threshold chosen on the fold's TTA-averaged probabilities travels with the checkpoint and its card
        assert fold.tta_threshold == pytest.approx(report["tta"]["tta_threshold"]["folds"][k], abs=1e-4)
        assert shipped.tta_threshold == pytest.approx(fold.tta_threshold)
        assert card["tta_threshold"] == pytest.approx(fold.tta_threshold)
        assert report["tta"]["balanced_accuracy_at_tta_threshold"]["folds"][k] >= report["tta"]["balanced_accuracy"][
            "folds"][k] - 1e-4  # the tuned threshold is at least as good on the data it was tuned on
    assert main(["--config", str(config), "--full", "--ship", str(tmp_path / "w" / "atypical.pt")]) == 0
    summary = json.loads((tmp_path / "run" / "cv_summary.json").read_text())
    clf = load_classifier(tmp_path / "w" / "atypical.pt")
    assert clf.threshold == pytest.approx(float(np.median(summary["thresholds"])), abs=1e-4)
    fold_tta = [load_classifier(tmp_path / "run" / f"fold{k}" / "best.pt").tta_threshold for k in range(2)]
    assert clf.tta_threshold == pytest.approx(float(np.median(fold_tta)))
    assert clf.meta["trained_on"] == "all crops"


def test_vote_targets_train_on_the_experts_share_and_validate_on_the_majority(tmp_path):
    root = _write_amibr(tmp_path / "amibr", n_slides=2, per_slide=6)
    table = pd.read_csv(root / "amibr_train_split.csv", index_col=0)
    atypical = table["final_label"] == "Atypical"
    # atypical crops: 3 of 3 experts, then 2 of 3; normal crops: none, then 1 of 3
    table["expert1_atypical"] = atypical | (np.arange(len(table)) % 2 == 1)
    table["expert2_atypical"] = atypical & (np.arange(len(table)) % 2 == 0)
    table["expert3_atypical"] = atypical
    table.to_csv(root / "amibr_train_split.csv")

    cfg = _config(root, tmp_path / "run", targets="votes")
    index, crops, labels = tc.prepare_data(cfg)
    targets = tc.training_targets(cfg, index)
    assert set(np.round(targets * 3).astype(int)) == {0, 1, 2, 3}
    np.testing.assert_allclose(targets * 3, np.round(targets * 3), atol=1e-6)
    assert ((targets > 0.5) == (labels == 1)).all()                 # the majority label is the rounded share
    np.testing.assert_array_equal(tc.training_targets(_config(root, tmp_path, targets="majority"), index), labels)

    train, val = tc.make_datasets(cfg, crops, labels, np.arange(6), np.arange(6, 12), targets)
    np.testing.assert_allclose(train.labels.numpy(), targets[:6])
    np.testing.assert_array_equal(val.labels.numpy(), labels[6:12])   # thresholds and metrics on 0/1 labels

    no_votes = _write_amibr(tmp_path / "plain", n_slides=2, per_slide=3, votes=False)
    with pytest.raises(ValueError, match="expert"):
        tc.training_targets(cfg, load_index(no_votes))
    with pytest.raises(ValueError, match="majority"):
        tc.training_targets(_config(root, tmp_path, targets="soft"), index)


def test_full_model_trained_alongside_the_cv_gets_its_thresholds_without_training_again(tmp_path, monkeypatch,
                                                                                          capsys):
    root = _write_amibr(tmp_path / "amibr")
    config = tmp_path / "cfg.yaml"
    config.write_text(f"data_root: {root}\narch: test_resnet\ninput_size: 32\nepochs: 1\nmin_epochs: 1\n"
                      f"batch_size: 8\nfolds: 2\nout: {tmp_path / 'run'}\n")
    full = ["--config", str(config), "--full", "--full-epochs", "2"]
    assert main(full) == 0                                     # before the CV: trained, threshold still 0.5
    assert "keeps threshold 0.5" in capsys.readouterr().err
    trained = torch.load(tmp_path / "run" / "full" / "best.pt", weights_only=True)
    assert trained["threshold"] == 0.5 and trained["meta"]["epochs"] == 2
    assert main(["--config", str(config)]) == 0 and main(["--config", str(config), "--evaluate-tta"]) == 0

    def no_training(*args, **kwargs):
        raise AssertionError("the full-data model was trained again")

    monkeypatch.setattr(classifier_fold, "train_epoch", no_training)
    assert main([*full, "--resume", "--ship", str(tmp_path / "w" / "atypical.pt")]) == 0
    summary = json.loads((tmp_path / "run" / "cv_summary.json").read_text())
    shipped = load_classifier(tmp_path / "w" / "atypical.pt")
    assert shipped.threshold == pytest.approx(float(np.median(summary["thresholds"])), abs=1e-4)
    assert shipped.tta_threshold is not None
    for key, value in trained["state_dict"].items():           # the same weights, now with the folds' thresholds
        torch.testing.assert_close(shipped.model.state_dict()[key], value, msg=key)


def test_ship_epoch_last_follows_the_end_of_the_schedule(tmp_path):
    root = _write_amibr(tmp_path / "amibr")
    run = tmp_path / "run"
    config = tmp_path / "cfg.yaml"
    # patience 0 would stop a 'best' fold after min_epochs; with 'last' every fold runs the whole schedule
    config.write_text(f"data_root: {root}\narch: test_resnet\ninput_size: 32\nepochs: 3\nmin_epochs: 1\npatience: 0\n"
                      f"batch_size: 8\nfolds: 2\nship_epoch: last\nout: {run}\n")
    assert main(["--config", str(config)]) == 0
    summary = json.loads((run / "cv_summary.json").read_text())
    for k in range(2):
        final = torch.load(run / f"fold{k}" / "final.pt", weights_only=True)
        last = torch.load(run / f"fold{k}" / "last.pt", weights_only=False)
        history = pd.read_csv(run / f"fold{k}" / "metrics.csv")
        # the weights and the validation threshold of the schedule's last epoch
        assert final["meta"]["epoch"] == last["state"]["epoch"] == history["epoch"].iloc[-1] == 3
        assert final["threshold"] == pytest.approx(history["threshold"].iloc[-1], abs=1e-4)
        assert summary["last_thresholds"][k] == pytest.approx(final["threshold"], abs=1e-4)
        for key, value in last["model"].items():
            torch.testing.assert_close(final["state_dict"][key], value, msg=key)

    assert main(["--config", str(config), "--evaluate-tta"]) == 0
    report = json.loads((run / "tta_report.json").read_text())
    assert report["tta"]["checkpoint"] == "final.pt"
    finals = [load_classifier(run / f"fold{k}" / "final.pt") for k in range(2)]
    assert [f.tta_threshold for f in finals] == pytest.approx(report["tta"]["tta_threshold"]["folds"], abs=1e-4)

    # other views are scored in a copy of the folds; the report says how many and holds those views' mean
    four = tmp_path / "run4"
    for k in range(2):
        shutil.copytree(run / f"fold{k}", four / f"fold{k}")
    shutil.copy(run / "cv_summary.json", four)
    assert main(["evaluate-tta", "--config", str(config), "--out", str(four), "--tta-views", "4"]) == 0
    fold0 = json.loads((four / "fold0" / "tta_report.json").read_text())
    assert fold0["tta_views"] == 4
    assert json.loads((four / "tta_report.json").read_text())["tta"]["tta_views"] == 4
    assert report["tta"]["tta_views"] == 8 and "tta_views" not in report["no_tta"]
    crops = np.stack([np.asarray(Image.open(next(root.glob(f"*/{name}"))).convert("RGB")) for name in fold0["files"]])
    expected = load_classifier(four / "fold0" / "final.pt").predict_proba(crops, tta=True, tta_views=4)
    np.testing.assert_allclose(fold0["tta"]["probs"], expected, atol=1e-5)
    eight = json.loads((run / "fold0" / "tta_report.json").read_text())
    assert eight["tta_views"] == 8 and not np.allclose(eight["tta"]["probs"], fold0["tta"]["probs"], atol=1e-5)

    assert main(["--config", str(config), "--full", "--ship", str(tmp_path / "w" / "atypical.pt")]) == 0
    shipped = load_classifier(tmp_path / "w" / "atypical.pt")
    assert shipped.meta["epochs"] == 3                           # the whole schedule, not the median best epoch
    assert shipped.threshold == pytest.approx(float(np.median([f.threshold for f in finals])))
    assert shipped.tta_threshold == pytest.approx(float(np.median([f.tta_threshold for f in finals])))
    card = read_model_card(tmp_path / "w" / "atypical.pt")
    assert "at their last epoch" in card["shipped_model"]
    assert card["cross_validation_last_epoch"] == summary["last_epoch"]
    with pytest.raises(ValueError, match="ship_epoch"):
        tc.fold_checkpoint_name(_config(root, run, ship_epoch="median"))


def test_leave_one_dataset_out_validates_each_fold_on_the_source_it_did_not_train_on(tmp_path):
    root = _write_amibr(tmp_path / "amibr")
    table = pd.read_csv(root / "amibr_train_split.csv", index_col=0)
    table.loc[table["slide"].isin(["000.tiff", "001.tiff"]), "dataset"] = "ALPHA"   # 16 crops; FAKE keeps 32
    table.to_csv(root / "amibr_train_split.csv")
    torch.set_num_threads(1)
    results = tc.cross_validate(_config(root, tmp_path / "run", split="dataset", epochs=1), tmp_path / "run", Dist())
    assert [load_classifier(r.checkpoint).meta["val_crops"] for r in results] == [16, 32]
    summary = json.loads((tmp_path / "run" / "cv_summary.json").read_text())
    assert summary["data"]["split"] == "leave one source dataset out (ALPHA, FAKE)"
    with pytest.raises(ValueError, match="split must be one of"):
        _config(root, tmp_path / "run", split="scanner")


def test_crop_pct_trains_and_serves_a_centre_crop_at_a_finer_scale(tmp_path):
    root = _write_amibr(tmp_path / "amibr")
    clf = tc.build_model(_config(root, tmp_path / "run", crop_pct=0.8))
    path = clf.save(tmp_path / "m.pt")
    loaded = load_classifier(path)
    assert loaded.crop_pct == pytest.approx(0.8)
    x = np.random.default_rng(0).integers(0, 256, (2, 128, 128, 3), dtype=np.uint8)
    batch = torch.as_tensor(x).permute(0, 3, 1, 2).float() / 255
    resized = torch.nn.functional.interpolate(batch, size=(40, 40), mode="bilinear", antialias=True)
    expected = (resized[..., 4:36, 4:36] - torch.tensor(loaded.mean).view(1, 3, 1, 1)) / torch.tensor(
        loaded.std).view(1, 3, 1, 1)                        # 32 / 0.8 = 40 px, then the central 32 px
    torch.testing.assert_close(loaded.preprocess(x), expected)
    with pytest.raises(ValueError, match="crop_pct"):
        tc.build_model(_config(root, tmp_path / "run", crop_pct=1.5))


def test_under_ddp_a_ranks_share_smaller_than_a_batch_still_trains():
    """48 crops on 2 ranks are 24 each: with batch 32, dropping the last (only) batch would train nothing."""
    from training.runtime import Dist

    cfg = TrainConfig(batch_size=32)
    crops = np.zeros((48, 16, 16, 3), np.uint8)
    labels = np.arange(48) % 2
    train_set, _ = tc.make_datasets(cfg, crops, labels, np.arange(48), np.zeros(0, dtype=int))
    for rank in range(2):
        loader = tc.make_train_loader(cfg, train_set, Dist(rank=rank, world_size=2), seed=0)
        assert len(loader) == 1 and sum(len(batch[0]) for batch in loader) == 24
    single = tc.make_train_loader(TrainConfig(batch_size=16), train_set, Dist(), seed=0)
    assert len(single) == 3  # one process, 48 crops: the last batch is dropped only when a smaller one remains


def test_moving_averages_of_the_weights_leave_training_unchanged_and_are_scored_and_saved(tmp_path, monkeypatch):
    root = _write_amibr(tmp_path / "amibr")
    torch.set_num_threads(1)
    index, crops, labels = tc.prepare_data(_config(root, tmp_path))
    train_idx, val_idx = np.arange(0, 32), np.arange(32, 48)           # 32 crops, batch 8: 4 steps per epoch
    updates = []
    real_update = tc.ModelEmaV3.update

    def counted_update(self, model):
        updates.append(self.decay)
        real_update(self, model)

    monkeypatch.setattr(tc.ModelEmaV3, "update", counted_update)
    train_fold(_config(root, tmp_path, epochs=2, ema_epochs=[]), crops, labels, train_idx, val_idx,
               tmp_path / "raw", Dist())
    assert updates == []
    train_fold(_config(root, tmp_path, epochs=2, ema_epochs=[1, 3]), crops, labels, train_idx, val_idx,
               tmp_path / "ema", Dist())
    # decay = 1 - 1 / (horizon x steps per epoch), every optimiser step
    assert sorted(set(updates)) == pytest.approx([1 - 1 / 4, 1 - 1 / 12]) and len(updates) == 2 * 2 * 4

    raw = torch.load(tmp_path / "raw" / "final.pt", weights_only=True)["state_dict"]
    beside = torch.load(tmp_path / "ema" / "final.pt", weights_only=True)["state_dict"]
    for key, value in raw.items():                                     # the raw weights trained exactly the same
        torch.testing.assert_close(beside[key], value, rtol=0, atol=0, msg=key)

    history = pd.read_csv(tmp_path / "ema" / "metrics.csv")
    val_crops = crops[val_idx]
    for horizon in (1, 3):
        ema = load_classifier(tmp_path / "ema" / f"final_ema{horizon}.pt")      # strict load
        assert ema.meta["ema_epochs"] == horizon and ema.meta["epoch"] == 2
        assert ema.threshold == pytest.approx(history[f"ema{horizon}_threshold"].iloc[-1], abs=1e-4)
        assert not all(torch.equal(ema.model.state_dict()[k], v) for k, v in raw.items() if v.is_floating_point())
        # the saved average is the one scored in the last row
        auc = roc_auc_score(labels[val_idx], ema.predict_proba(val_crops))
        assert auc == pytest.approx(history[f"ema{horizon}_roc_auc"].iloc[-1], abs=1e-4)


@pytest.mark.parametrize("values, message", [({"ema_epochs": [0]}, "positive horizons"),
                                             ({"ema_epochs": [2], "ship_ema": 3}, "not one of ema_epochs"),
                                             ({"ema_epochs": [2], "ship_ema": 2, "ship_epoch": "best"},
                                              "needs ship_epoch: last")])
def test_moving_average_settings_are_checked(tmp_path, values, message):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, tmp_path, **values)


def test_a_shipped_moving_average_is_scored_thresholded_and_shipped_from_its_own_checkpoints(tmp_path, capsys):
    root = _write_amibr(tmp_path / "amibr")
    run = tmp_path / "run"
    config = tmp_path / "cfg.yaml"
    config.write_text(f"data_root: {root}\narch: test_resnet\ninput_size: 32\nepochs: 2\nmin_epochs: 1\n"
                      f"batch_size: 8\nfolds: 2\nship_epoch: last\nema_epochs: [1]\nout: {run}\n")
    assert main(["--config", str(config)]) == 0
    assert main(["--config", str(config), "--evaluate-tta"]) == 0 and (run / "tta_report.json").is_file()
    assert main(["--config", str(config), "--evaluate-tta", "--ship-ema", "1"]) == 0
    report = json.loads((run / "tta_report_ema1.json").read_text())
    assert report["tta"]["checkpoint"] == "final_ema1.pt"
    folds = [load_classifier(run / f"fold{k}" / "final_ema1.pt") for k in range(2)]
    assert [f.tta_threshold for f in folds] == pytest.approx(report["tta"]["tta_threshold"]["folds"], abs=1e-4)

    target = tmp_path / "w" / "atypical.pt"
    assert main(["--config", str(config), "--full", "--ship-ema", "1", "--ship", str(target)]) == 0
    shipped = load_classifier(target)
    averaged = torch.load(run / "full" / "ema1.pt", weights_only=True)["state_dict"]
    last = torch.load(run / "full" / "best.pt", weights_only=True)["state_dict"]
    for key, value in averaged.items():
        torch.testing.assert_close(shipped.model.state_dict()[key], value, msg=key)
    assert any(not torch.equal(averaged[k], v) for k, v in last.items() if v.is_floating_point())
    assert shipped.threshold == pytest.approx(float(np.median([f.threshold for f in folds])))
    assert shipped.tta_threshold == pytest.approx(float(np.median([f.tta_threshold for f in folds])))
    card = read_model_card(target)
    assert card["training_config"]["ship_ema"] == 1 and card["validation_tta"] == report
    assert "moving average of the weights over 1 epochs" in card["shipped_model"]
    summary = json.loads((run / "cv_summary.json").read_text())
    last_rows = [pd.read_csv(run / f"fold{k}" / "metrics.csv").iloc[-1] for k in range(2)]
    assert summary["last_epoch_ema"]["ema1"]["roc_auc"]["folds"] == pytest.approx(
        [row["ema1_roc_auc"] for row in last_rows], abs=1e-4)
    assert card["cross_validation_last_epoch"] == summary["last_epoch_ema"]["ema1"]   # the average's, not the raw

    fails(capsys, ["--config", str(config), "--ship-ema", "soon"], InputError.exit_code,
          "--ship-ema 'soon': expected a horizon")
    fails(capsys, ["--config", str(config), "--ship-ema", "4"], ConfigError.exit_code, ".*not one of ema_epochs")


def test_folds_scored_one_at_a_time_combine_without_their_checkpoints(tmp_path, capsys):
    """A fold trained and scored elsewhere keeps only its small files (result.json, metrics.csv, its scoring
    report): `--evaluate-tta` and `--full` then combine it exactly as from its checkpoint."""
    root = _write_amibr(tmp_path / "amibr")
    run = tmp_path / "run"
    config = tmp_path / "cfg.yaml"
    config.write_text(f"data_root: {root}\narch: test_resnet\ninput_size: 32\nepochs: 2\nmin_epochs: 1\n"
                      f"batch_size: 8\nfolds: 2\nship_epoch: last\nout: {run}\n")
    assert main(["--config", str(config), "--fold", "0"]) == 0
    fails(capsys, ["--config", str(config), "--evaluate-tta", "--fold", "1"], InputError.exit_code,
          "--evaluate-tta --fold 1: no final.pt in .*fold1")
    assert main(["--config", str(config), "--evaluate-tta", "--fold", "0"]) == 0
    assert not (run / "fold1").exists()  # scoring one fold trains nothing
    fold0 = json.loads((run / "fold0" / "tta_report.json").read_text())
    index, crops, labels = tc.prepare_data(load_train_config(config))
    val = slide_folds(index, 2, 0) == 0
    clf = load_classifier(run / "fold0" / "final.pt")
    assert clf.tta_threshold == fold0["tta_threshold"]
    assert fold0["files"] == [Path(p).name for p in index["path"][val]]
    np.testing.assert_allclose(fold0["tta"]["probs"], clf.predict_proba(crops[val], tta=True), atol=1e-5)

    assert main(["--config", str(config), "--fold", "1"]) == 0
    assert main(["--config", str(config), "--evaluate-tta"]) == 0
    with_checkpoints = json.loads((run / "tta_report.json").read_text())
    for name in ("final.pt", "best.pt", "last.pt"):
        (run / "fold0" / name).unlink()
    assert main(["--config", str(config), "--evaluate-tta"]) == 0
    assert json.loads((run / "tta_report.json").read_text()) == with_checkpoints
    assert main(["--config", str(config), "--full", "--full-epochs", "1"]) == 0
    full = load_classifier(run / "full" / "best.pt")
    fold1 = load_classifier(run / "fold1" / "final.pt")
    assert full.tta_threshold == pytest.approx(np.median([fold0["tta_threshold"], fold1.tta_threshold]))
    assert full.threshold == pytest.approx(np.median([fold0["threshold"], fold1.threshold]))

    fold0["files"] = fold0["files"][::-1]  # a report of another split is refused, not combined
    (run / "fold0" / "tta_report.json").write_text(json.dumps(fold0))
    fails(capsys, ["--config", str(config), "--evaluate-tta"], InputError.exit_code, ".*scored other crops than fold 0")


@pytest.mark.parametrize("old, new", [
    ([], ["cv"]),
    (["--fold", "1", "--resume"], ["cv", "--fold", "1", "--resume"]),
    (["--evaluate-tta"], ["evaluate-tta"]),
    (["--evaluate-tta", "--fold", "0"], ["evaluate-tta", "--fold", "0"]),
    (["--evaluate-tta", "--ship-folds", "w/a.pt", "--half"], ["evaluate-tta", "--ship-folds", "w/a.pt", "--half"]),
    (["--full", "--full-epochs", "60", "--resume"], ["full", "--full-epochs", "60", "--resume"]),
    (["--full", "--ship", "w/a.pt", "--ship-ema", "1"], ["full", "--ship", "w/a.pt", "--ship-ema", "1"]),
    (["--full", "--ship", "w/a.pt"], ["ship", "w/a.pt", "--full"]),
    (["--ship", "w/a.pt", "--fold", "2"], ["ship", "w/a.pt", "--fold", "2"]),
    (["--ship-folds", "w/a.pt"], ["ship-folds", "w/a.pt"]),
])
def test_old_flag_spelling_parses_to_its_sub_command(old: list[str], new: list[str]) -> None:
    """Parsing only: each old command line and its sub-command spelling ask for the same steps."""
    common = ["--config", "c.yaml", "--out", "cv"]  # an option value spelt like a sub-command stays a value
    old_args, new_args = tc.parse_args(common + old), tc.parse_args(new + common)
    assert old_args == new_args and old_args.out == "cv"
    assert tc.parse_args(common + new) == new_args  # the sub-command after the options (training.lora's order)
    if sum(flag in old for flag in tc.ACTION_FLAGS.values()) <= 1:  # with two, `command` names the later step
        assert new_args.command == new[0]


def test_help_lists_the_sub_commands_and_the_old_spelling(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        tc.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in ("cv", "evaluate-tta", "full", "ship", "ship-folds"):
        assert re.search(rf"^\s+{name}\s", text, re.MULTILINE), name
    assert "old spelling" in text and "--ship-folds PATH" in text
    with pytest.raises(SystemExit) as exit_info:  # a usage error stays argparse's: exit code 2, one line
        main(["no-such-command"])
    assert exit_info.value.code == 2 and capsys.readouterr().err.startswith("error: unrecognized arguments")


@pytest.mark.parametrize("new, old", [
    (["ship", "--fold", "2", "w/a.pt", "--half"], ["--ship", "w/a.pt", "--fold", "2", "--half"]),
    (["--config", "c.yaml", "ship-folds", "w/a.pt"], ["--ship-folds", "w/a.pt", "--config", "c.yaml"]),
    (["full", "--ship", "w/a.pt"], ["--full", "--ship", "w/a.pt"]),
    (["--fold", "1"], ["--fold", "1"]),
])
def test_flag_spelling_gives_the_old_command_line(new: list[str], old: list[str]) -> None:
    assert tc.flag_spelling(new) == old and tc.parse_args(old) == tc.parse_args(new)


def test_split_on_the_command_line_overrides_the_config() -> None:
    """`--split dataset --folds 2`: leave one source out from the same config file, no copy of it."""
    args = tc.parse_args(["--config", "c.yaml", "--split", "dataset", "--folds", "2", "--fold", "1"])
    assert tc.config_overrides(args) == {"split": "dataset", "folds": 2}
    assert "split" not in tc.config_overrides(tc.parse_args(["--config", "c.yaml"]))
    with pytest.raises(SystemExit):
        tc.parse_args(["--split", "source"])


def test_a_fold_trains_with_layer_decay_and_a_model_without_layer_groups_leaves_no_folder(tmp_path, monkeypatch):
    """`layer_decay`: the fold trains and its metrics' lr is the head's (the same as without decay); a model timm
    cannot group is refused before the fold's folder exists."""
    root = _write_amibr(tmp_path / "amibr")
    torch.set_num_threads(1)
    _, crops, labels = tc.prepare_data(_config(root, tmp_path))
    train_idx, val_idx = np.arange(0, 32), np.arange(32, 48)
    cfg = _config(root, tmp_path, epochs=1, warmup_epochs=0.0, layer_decay=0.7, ema_epochs=[])
    result = train_fold(cfg, crops, labels, train_idx, val_idx, tmp_path / "decayed", Dist())
    plain = _config(root, tmp_path, epochs=1, warmup_epochs=0.0, ema_epochs=[])
    train_fold(plain, crops, labels, train_idx, val_idx, tmp_path / "plain", Dist())
    decayed_lr, plain_lr = (pd.read_csv(tmp_path / run / "metrics.csv")["lr"].iloc[0] for run in ("decayed", "plain"))
    assert Path(result.checkpoint).is_file() and decayed_lr == pytest.approx(plain_lr)  # the head's, as before

    real_build = classifier_fold.build_model

    def without_groups(config):
        clf = real_build(config)
        clf.model = torch.nn.Sequential(clf.model)  # a wrapper timm's group_matcher cannot see into
        return clf

    monkeypatch.setattr(classifier_fold, "build_model", without_groups)
    with pytest.raises(ConfigError, match="layer_decay needs a timm model"):
        train_fold(cfg, crops, labels, train_idx, val_idx, tmp_path / "refused", Dist())
    assert not (tmp_path / "refused").exists()
