"""Cross-validation of the atypical classifier over slide-grouped (or leave-one-dataset-out) folds: training the
folds (`cross_validate`), their summary `cv_summary.json` (`summarise`), and scoring the fold models on their own
validation folds with and without TTA (`out_of_fold`, `score_fold`: the `tta_report*.json` files and each fold
checkpoint's `tta_threshold`).

The command is training/train_classifier.py (sub-commands `cv` and `evaluate-tta`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from midog.classifier import load_classifier
from midog.cli import read_json_file
from midog.errors import InputError
from training.amibr import assign_folds, load_crops, load_index
from training.classifier_config import (TrainConfig, fold_checkpoint_name, fold_checkpoint_path, fold_report_path,
                                        resolve_data_root, tta_report_name)
from training.classifier_fold import (FoldResult, balanced_accuracy, best_threshold, binary_metrics,
                                      predict_with_bar, train_fold, training_targets)
from training.runtime import Dist, save_atomic


def prepare_data(cfg: TrainConfig) -> tuple[Any, np.ndarray, np.ndarray]:
    index = load_index(resolve_data_root(cfg), cfg.csv)
    return index, load_crops(index["path"]), index["label"].to_numpy()


def data_description(index: Any, n_folds: int, csv: str | None, fold_seed: int, split: str = "slide"
                     ) -> dict[str, Any]:
    """The model card's account of the training data and how it was split into folds."""
    return {
        "dataset": "AMi-Br training split (MIDOG21 + TUPAC16 crops, 128x128)",
        "csv": Path(csv).name if csv else "amibr_train_split.csv",
        "crops": int(len(index)), "atypical": int(index["label"].sum()),
        "slides": int(index["group"].nunique()),
        "split": (f"{n_folds}-fold StratifiedGroupKFold by slide (seed {fold_seed}), no slide in two folds"
                  if split == "slide" else
                  f"leave one source dataset out ({', '.join(sorted(set(index['dataset'])))})"),
    }


def cross_validate(cfg: TrainConfig, out_dir: Path, ctx: Dist, only_fold: int | None = None,
                   resume: bool = False) -> list[FoldResult]:
    index, crops, labels = prepare_data(cfg)
    fold_of = assign_folds(index, cfg.split, cfg.folds, cfg.fold_seed)
    results = []
    folds = [only_fold] if only_fold is not None else list(range(cfg.folds))
    for k in folds:
        train_idx, val_idx = np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)
        meta = {"fold": k, "folds": cfg.folds, "fold_seed": cfg.fold_seed, "val_slides": int(
            index["group"].iloc[val_idx].nunique()), "val_crops": int(len(val_idx))}
        result = train_fold(cfg, crops, labels, train_idx, val_idx, out_dir / f"fold{k}", ctx, resume=resume,
                            name=f"fold{k}", meta=meta, train_targets=training_targets(cfg, index))
        result.fold = k
        results.append(result)
        if ctx.main:
            (out_dir / f"fold{k}" / "result.json").write_text(json.dumps(dataclasses.asdict(result), indent=2))
    if ctx.main:
        summary = summarise(out_dir, cfg.folds)
        if summary:
            summary["data"] = data_description(index, cfg.folds, cfg.csv, cfg.fold_seed, cfg.split)
            summary["ship_epoch"] = cfg.ship_epoch  # which fold checkpoint ships (training.ship_ensemble reads it)
            (out_dir / "cv_summary.json").write_text(json.dumps(summary, indent=2))
            print(json.dumps(summary["cv"], indent=2), flush=True)
    return results


def summarise(out_dir: Path, n_folds: int) -> dict[str, Any] | None:
    """Mean ± std over folds of the best-epoch validation metrics, once every fold has a result.json."""
    files = [out_dir / f"fold{k}" / "result.json" for k in range(n_folds)]
    if not all(f.is_file() for f in files):
        return None
    results = [read_json_file(f, f"fold {k} result") for k, f in enumerate(files)]
    cv = {key: mean_std([r["metrics"][key] for r in results]) for key in results[0]["metrics"]}
    summary = {"cv": cv, "best_epochs": [r["best_epoch"] for r in results],
               "thresholds": [round(r["threshold"], 4) for r in results]}
    if all("last_threshold" in r for r in results):
        summary["last_thresholds"] = [round(r["last_threshold"], 4) for r in results]
    last_rows = [_last_row(out_dir / f"fold{k}" / "metrics.csv") for k in range(n_folds)]
    if all(last_rows):
        # the best epoch is chosen on the validation fold itself, which flatters it; the last epoch is not chosen
        summary["last_epoch"] = {key: mean_std([float(row[key]) for row in last_rows]) for key in
                                 ("epoch", "balanced_accuracy", "roc_auc", "balanced_accuracy_at_0.5")
                                 if all(key in row for row in last_rows)}
        averages = sorted({key.split("_")[0] for key in last_rows[0] if key.startswith("ema")})
        if averages:  # the moving averages' last epoch, each at its own validation threshold
            summary["last_epoch_ema"] = {
                name: {metric: mean_std([float(row[f"{name}_{metric}"]) for row in last_rows])
                       for metric in ("balanced_accuracy", "roc_auc")
                       if all(f"{name}_{metric}" in row for row in last_rows)}
                for name in averages}
    return summary


def mean_std(values: list[float] | np.ndarray) -> dict[str, Any]:
    """Mean, sample standard deviation and the values themselves, rounded to 4 decimals."""
    values = np.asarray(values, dtype=float)
    std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return {"mean": round(float(values.mean()), 4), "std": round(std, 4), "folds": [round(float(v), 4) for v in values]}


def _last_row(csv_path: Path) -> dict[str, str] | None:
    if not csv_path.is_file():
        return None
    with csv_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return rows[-1] if rows else None


def fold_sources(cfg: TrainConfig, out_dir: Path, k: int) -> tuple[Path | None, Path]:
    """Fold k's checkpoint (None where it is gone: a fold trained on another machine or in an earlier session, of
    which only its small files were kept) and its scoring report; one of the two must exist."""
    path, report_path = fold_checkpoint_path(cfg, out_dir, k), fold_report_path(cfg, out_dir, k)
    if not path.is_file() and not report_path.is_file():
        raise InputError(f"fold {k}: neither {path.name} nor {report_path.name} in {path.parent}")
    return (path if path.is_file() else None), report_path


def crop_names(index: Any, rows: np.ndarray) -> list[str]:
    """The crops' file names, which identify them in a fold report."""
    return [Path(p).name for p in index["path"].iloc[rows]]


def score_fold(cfg: TrainConfig, out_dir: Path, k: int, index: Any, crops: np.ndarray, labels: np.ndarray,
               val: np.ndarray) -> dict[str, Any]:
    """Fold k's checkpoint on its own validation fold, with and without dihedral TTA (`tta_views`, 8 by default): metrics at its stored
    threshold, the probabilities (by crop file name, so the combination can be redone without the checkpoint), and
    for TTA the threshold that maximises balanced accuracy on the TTA-averaged probabilities (averaging pulls them
    inward, so the plain threshold is off for them). That threshold is stored in the checkpoint as `tta_threshold`,
    which inference with TTA uses and shipping copies; the report goes to `fold_report_path`."""
    path = fold_checkpoint_path(cfg, out_dir, k)
    clf = load_classifier(path)
    report: dict[str, Any] = {"fold": k, "checkpoint": path.name, "threshold": clf.threshold,
                              "tta_views": cfg.tta_views, "files": crop_names(index, val)}
    for key, tta in (("no_tta", False), ("tta", True)):
        probs = predict_with_bar(clf, crops[val], tta, cfg.eval_batch_size, f"fold {k} {key}", cfg.tta_views)
        report[key] = {**binary_metrics(labels[val], probs, clf.threshold),
                       "probs": [round(float(p), 6) for p in probs]}
    tuned, accuracy = best_threshold(labels[val], np.asarray(report["tta"]["probs"]))
    report["tta"].update(tta_threshold=tuned, balanced_accuracy_at_tta_threshold=accuracy)
    report["tta_threshold"] = tuned
    state = torch.load(path, map_location="cpu", weights_only=True)
    state["tta_threshold"] = tuned
    save_atomic(state, path)
    fold_report_path(cfg, out_dir, k).write_text(json.dumps(report))
    return report


def fold_scores(cfg: TrainConfig, out_dir: Path, k: int, index: Any, crops: np.ndarray, labels: np.ndarray,
                val: np.ndarray) -> dict[str, Any]:
    """Fold k scored from its checkpoint or, where that is gone, from the report an earlier scoring left."""
    path, report_path = fold_sources(cfg, out_dir, k)
    if path is not None:
        return score_fold(cfg, out_dir, k, index, crops, labels, val)
    report = read_json_file(report_path, f"fold {k} report")
    if report.get("files") != crop_names(index, val):
        raise InputError(f"{report_path} scored other crops than fold {k} of this config's split")
    return report


def fold_thresholds(cfg: TrainConfig, out_dir: Path, k: int) -> dict[str, float]:
    """Fold k's `threshold` and, once scored with TTA, `tta_threshold`: from its checkpoint or, where that is gone,
    from its scoring report (`fold_scores`)."""
    path, report_path = fold_sources(cfg, out_dir, k)
    state = (torch.load(path, map_location="cpu", weights_only=True) if path is not None
             else read_json_file(report_path, f"fold {k} report"))
    return {key: float(state[key]) for key in ("threshold", "tta_threshold") if state.get(key) is not None}


def out_of_fold(cfg: TrainConfig, out_dir: Path) -> dict[str, Any]:
    """Each fold's best.pt (final.pt with `ship_epoch: last`, final_ema{h}.pt with `ship_ema`) on its own
    validation fold, with (`tta`) and without (`no_tta`) TTA: per-fold metrics (mean ± std), balanced accuracy at
    the other folds' thresholds (the honest estimate) and pooled out-of-fold ROC AUC."""
    index, crops, labels = prepare_data(cfg)
    fold_of = assign_folds(index, cfg.split, cfg.folds, cfg.fold_seed)
    vals = [np.flatnonzero(fold_of == k) for k in range(cfg.folds)]
    folds = [fold_scores(cfg, out_dir, k, index, crops, labels, val) for k, val in enumerate(vals)]
    report: dict[str, Any] = {}
    for key in ("no_tta", "tta"):
        per_fold = [{name: value for name, value in fold[key].items() if name != "probs"} for fold in folds]
        own = [fold["tta_threshold"] if key == "tta" else fold["threshold"] for fold in folds]
        oof = np.zeros(len(labels))
        for k, (val, transferred) in enumerate(zip(vals, other_folds_thresholds(own))):
            oof[val] = folds[k][key]["probs"]
            per_fold[k]["balanced_accuracy_at_other_folds_threshold"] = balanced_accuracy(labels[val], oof[val],
                                                                                           transferred)
        report[key] = {"tta": key == "tta", "checkpoint": fold_checkpoint_name(cfg),
                       **({"tta_views": cfg.tta_views} if key == "tta" else {}),
                       **{name: mean_std([m[name] for m in per_fold]) for name in per_fold[0]},
                       "pooled_roc_auc": round(float(roc_auc_score(labels, oof)), 4)}
    return report


def other_folds_thresholds(thresholds: list[float]) -> list[float]:
    """For each fold, the median of the other folds' thresholds: one it was not tuned on, as the shipped model's
    (the median of all folds' thresholds) is for new data. Balanced accuracy there is the honest CV estimate."""
    return [float(np.median(thresholds[:k] + thresholds[k + 1:])) for k in range(len(thresholds))]


def evaluate_one_fold(cfg: TrainConfig, out_dir: Path, k: int, ctx: Dist) -> int:
    """`--evaluate-tta --fold k`: score one finished fold (e.g. trained on another machine) without waiting for the
    others; a later `--evaluate-tta` combines the folds from their checkpoints or these reports."""
    path = fold_checkpoint_path(cfg, out_dir, k)
    if not path.is_file():
        raise InputError(f"--evaluate-tta --fold {k}: no {path.name} in {path.parent}")
    if ctx.main:
        index, crops, labels = prepare_data(cfg)
        val = np.flatnonzero(assign_folds(index, cfg.split, cfg.folds, cfg.fold_seed) == k)
        report = score_fold(cfg, out_dir, k, index, crops, labels, val)
        print(json.dumps({key: ({name: value for name, value in report[key].items() if name != "probs"}
                                if isinstance(report[key], dict) else report[key])
                          for key in report if key != "files"}, indent=2), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------- run files

def cv_summary_path(out_dir: Path) -> Path:
    return out_dir / "cv_summary.json"


def load_cv_summary(out_dir: Path) -> dict[str, Any] | None:
    """The finished cross-validation's `cv_summary.json`, or None before every fold is done."""
    path = cv_summary_path(out_dir)
    return read_json_file(path, "cross-validation summary") if path.is_file() else None


def load_tta_report(cfg: TrainConfig, out_dir: Path) -> dict[str, Any] | None:
    """The report an earlier `evaluate-tta` wrote for the fold checkpoint that ships, if any."""
    path = out_dir / tta_report_name(cfg)
    return read_json_file(path, "TTA report") if path.is_file() else None


def evaluate_tta(cfg: TrainConfig, out_dir: Path) -> dict[str, Any]:
    """`out_of_fold`, written to the run's TTA report and printed (rank 0 only)."""
    report = out_of_fold(cfg, out_dir)
    (out_dir / tta_report_name(cfg)).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2), flush=True)
    return report
