"""The AMi-Br benchmark protocol as one command: slide-grouped 5-fold CV, every fold model on external test sets.

    python -m training.benchmark_amibr --method lora --backbone uni2-h \
        --test AMi-Br-test=/data/amibr_test --test AtNorM-Br=/data/atnorm_br --test AtNorM-MD=/data/atnorm_md \
        [--config YAML] [--weights PATH] [--folds 5] [--out runs/benchmark_lora_uni2-h] [--tta] [--resume]

Methods: `end-to-end` (training/train_classifier.py, any timm model: config training/configs/atypical.yaml),
`lora` (training/lora.py, config training/configs/lora.yaml), `linear` (training/linear_probe.py). A test folder has
the AMi-Br layout: `<root>/Atypical/*` and `<root>/Normal/*` (png, jpg or tif crops of any size).

Each fold model is trained on four folds of the AMi-Br training split and early-stopped, with its decision
threshold chosen, on the fifth; on the test sets it uses that stored threshold. The table gives mean ± std over the
folds of balanced accuracy (at the stored threshold, and at 0.5) and ROC AUC, per set; the `cv-validation` row
is each fold on its own validation split (the threshold was tuned there: optimistic for balanced accuracy). The
`ensemble` columns average the fold models' probabilities (threshold: the mean of theirs, as midog.atypical does).
Written as `benchmark.csv`, `benchmark.md` and `benchmark.json` (per-fold values) in the output folder.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from midog.atypical import AtypicalClassifier
from midog.classifier import load_classifier
from midog.cli import OneLineArgumentParser, add_debug_option, add_quiet_option, entry_point
from midog.errors import InputError
from midog.foundation import resolve_spec
from midog.progress import progress_iter
from training import linear_probe
from training.amibr import CLASS_FOLDERS, load_index
from training.config_file import read_training_yaml
from training.lora import lora_train_values
from training.runtime import REPO_ROOT, init_distributed
from training.train_classifier import (binary_metrics, cross_validate, fold_checkpoint_name, load_train_config,
                                       mean_std)

METHODS = ("end-to-end", "lora", "linear")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
DEFAULT_CONFIGS = {"end-to-end": REPO_ROOT / "training/configs/atypical.yaml",
                   "lora": REPO_ROOT / "training/configs/lora.yaml"}


# ---------------------------------------------------------------------------------------------------- test sets

def folder_index(root: str | Path) -> pd.DataFrame:
    """`path`, `label` (1 = atypical) of every crop in `<root>/Atypical` and `<root>/Normal`, sorted."""
    root = Path(root)
    rows = []
    for folder, label in CLASS_FOLDERS.items():
        if not (root / folder).is_dir():
            raise InputError(f"test set {root} lacks the folder {folder}/ (AMi-Br layout: Atypical/, Normal/)")
        rows += [(str(p), label) for p in sorted((root / folder).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not rows:
        raise InputError(f"test set {root} has no images in Atypical/ or Normal/")
    return pd.DataFrame(rows, columns=["path", "label"])


def parse_test_sets(items: Sequence[str]) -> dict[str, Path]:
    """`NAME=DIR` or `DIR` (named after the folder)."""
    sets: dict[str, Path] = {}
    for item in items:
        name, sep, folder = item.partition("=")
        path = Path(folder if sep else name)
        sets[name if sep else path.name] = path
    return sets


# ---------------------------------------------------------------------------------------------------- metrics

@dataclass
class SetScores:
    """Per-fold metrics of one evaluation set, and the fold ensemble's."""

    name: str
    crops: int
    atypical: int
    folds: list[dict[str, float]]
    ensemble: dict[str, float] | None = None


def score_folds(name: str, labels: np.ndarray, fold_probs: Sequence[np.ndarray], thresholds: Sequence[float]
                ) -> SetScores:
    folds = []
    for probs, threshold in zip(fold_probs, thresholds):
        metrics = binary_metrics(labels, probs, threshold)
        metrics["balanced_accuracy_at_0.5"] = binary_metrics(labels, probs, 0.5)["balanced_accuracy"]
        folds.append(metrics)
    ensemble = binary_metrics(labels, np.mean(fold_probs, axis=0), float(np.mean(thresholds)))
    return SetScores(name, int(len(labels)), int(labels.sum()), folds, ensemble)


def table(scores: Sequence[SetScores]) -> pd.DataFrame:
    rows = []
    for s in scores:
        row: dict[str, Any] = {"set": s.name, "crops": s.crops, "atypical": s.atypical, "folds": len(s.folds)}
        for key in ("balanced_accuracy", "balanced_accuracy_at_0.5", "roc_auc"):
            stats = mean_std([f[key] for f in s.folds])
            row[f"{key}_mean"], row[f"{key}_std"] = stats["mean"], stats["std"]
        row["ensemble_balanced_accuracy"] = s.ensemble["balanced_accuracy"] if s.ensemble else float("nan")
        row["ensemble_roc_auc"] = s.ensemble["roc_auc"] if s.ensemble else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def markdown(frame: pd.DataFrame, title: str) -> str:
    def pm(row: pd.Series, key: str) -> str:
        return f"{row[f'{key}_mean']:.4f} ± {row[f'{key}_std']:.4f}"

    def number(value: float) -> str:
        return "–" if np.isnan(value) else f"{value:.4f}"

    lines = [f"### {title}", "",
             "| set | crops (atypical) | balanced accuracy | balanced accuracy @0.5 | ROC AUC "
             "| ensemble balanced accuracy | ensemble ROC AUC |",
             "|---|---|---|---|---|---|---|"]
    for _, row in frame.iterrows():
        lines.append(f"| {row['set']} | {row['crops']} ({row['atypical']}) | {pm(row, 'balanced_accuracy')} "
                     f"| {pm(row, 'balanced_accuracy_at_0.5')} | {pm(row, 'roc_auc')} "
                     f"| {number(row['ensemble_balanced_accuracy'])} | {number(row['ensemble_roc_auc'])} |")
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, scores: Sequence[SetScores], title: str, extra: dict[str, Any]) -> pd.DataFrame:
    frame = table(scores)
    frame.to_csv(out_dir / "benchmark.csv", index=False, float_format="%.4f")
    (out_dir / "benchmark.md").write_text(markdown(frame, title))
    (out_dir / "benchmark.json").write_text(json.dumps(
        {**extra, "sets": [s.__dict__ for s in scores]}, indent=2, default=float))
    return frame


def validation_scores(fold_metrics: Sequence[dict[str, float]], n_crops: int, n_atypical: int) -> SetScores:
    """Each fold on its own validation split, from the metrics recorded at training time for the checkpoint scored
    on the test sets (best.pt's best epoch, or final.pt's last epoch with `ship_epoch: last`)."""
    return SetScores("cv-validation", n_crops, n_atypical, [dict(m) for m in fold_metrics], None)


# ---------------------------------------------------------------------------------------------------- methods

def fold_checkpoints(out_dir: Path, n_folds: int, name: str = "best.pt") -> list[Path]:
    """Each fold's checkpoint: best.pt, or final.pt for a run with `ship_epoch: last` (what --ship-folds ships)."""
    paths = [out_dir / f"fold{k}" / name for k in range(n_folds)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise InputError(f"fold checkpoints missing: {missing}")
    return paths


def predict_checkpoints(checkpoints: Sequence[Path], paths: Sequence[str], device: torch.device, tta: bool,
                        batch_size: int, desc: str = "checkpoints") -> list[np.ndarray]:
    """P(atypical) of every image under each checkpoint; crops of any size (midog.atypical groups them). A progress
    bar named `desc` counts the checkpoints done."""
    crops = [linear_probe._read_rgb(p) for p in paths]
    out = []
    for checkpoint in progress_iter(checkpoints, len(checkpoints), desc, "checkpoint"):
        model = load_classifier(checkpoint, device=device)
        stage = AtypicalClassifier(models=[model], threshold=model.threshold, tta=tta, batch_size=batch_size)
        out.append(stage.predict_proba(crops))
    return out


def run_trained(method: str, args: argparse.Namespace, out_dir: Path, test_sets: dict[str, Path]
                ) -> tuple[list[SetScores], dict[str, Any]]:
    """end-to-end and lora: train_classifier's cross-validation, then every fold checkpoint on the test sets."""
    config_path = Path(args.config) if args.config else DEFAULT_CONFIGS[method]
    overrides: dict[str, Any] = {"out": str(out_dir)}
    if args.folds:
        overrides["folds"] = args.folds
    if args.epochs:
        overrides["epochs"] = args.epochs
    if method == "lora":
        values = lora_train_values(read_training_yaml(config_path), args.backbone, args.weights)
        cfg = load_train_config(None, {**values, **overrides})
    else:
        cfg = load_train_config(config_path, {**overrides, **({"arch": args.backbone} if args.backbone else {})})
    ctx = init_distributed()
    if ctx.device.type == "cpu" and cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    results = cross_validate(cfg, out_dir, ctx, resume=args.resume)
    if not ctx.main:
        return [], {}
    index = load_index(linear_probe.repo_path(cfg.data_root), cfg.csv)
    checkpoints = fold_checkpoints(out_dir, cfg.folds, fold_checkpoint_name(cfg))
    states = [torch.load(c, map_location="cpu", weights_only=True) for c in checkpoints]
    fold_metrics = ([r.metrics for r in results] if cfg.ship_epoch == "best"
                    else [state["meta"]["val"] for state in states])  # the last epoch's, stored with final.pt
    scores = [validation_scores(fold_metrics, len(index), int(index["label"].sum()))]
    thresholds = [float(state["threshold"]) for state in states]
    for name, folder in test_sets.items():
        test = folder_index(folder)
        probs = predict_checkpoints(checkpoints, list(test["path"]), ctx.device, args.tta, cfg.eval_batch_size,
                                    f"{name} folds")
        scores.append(score_folds(name, test["label"].to_numpy(), probs, thresholds))
    return scores, {"method": method, "arch": cfg.arch, "model_kwargs": cfg.model_kwargs, "folds": cfg.folds,
                    "checkpoints": [str(c) for c in checkpoints], "tta": args.tta}


def run_linear(args: argparse.Namespace, out_dir: Path, test_sets: dict[str, Path]
               ) -> tuple[list[SetScores], dict[str, Any]]:
    """Linear probe: cached features for training and test crops, the fold heads applied to them."""
    overrides = {key: value for key, value in {"backbone": args.backbone, "weights": args.weights,
                                                 "folds": args.folds, "out": str(out_dir)}.items() if value}
    cfg = linear_probe.load_probe_config(args.config, overrides)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    clf, results = linear_probe.cross_validate_probe(cfg, out_dir)
    index = load_index(linear_probe.repo_path(cfg.data_root), cfg.csv)
    scores = [validation_scores([r.metrics for r in results], len(index), int(index["label"].sum()))]
    heads = [torch.load(c, map_location="cpu", weights_only=True) for c in fold_checkpoints(out_dir, cfg.folds)]
    thresholds = [float(h["threshold"]) for h in heads]
    for name, folder in test_sets.items():
        test = folder_index(folder)
        features = linear_probe.cached_features(clf, list(test["path"]), linear_probe.repo_path(cfg.cache),
                                                cfg.batch_size, f"{name} features")
        probs = [linear_probe.head_probabilities(features, h["state_dict"]["head.weight"].double().numpy()[0],
                                                 float(h["state_dict"]["head.bias"][0])) for h in heads]
        scores.append(score_folds(name, test["label"].to_numpy(), probs, thresholds))
    return scores, {"method": "linear", "backbone": cfg.backbone, "folds": cfg.folds, "C": cfg.C}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--config", help="training config (train_classifier YAML, or ProbeConfig YAML for linear)")
    parser.add_argument("--backbone", help="foundation registry name or timm name (overrides the config)")
    parser.add_argument("--weights", help="local pretrained weights of the backbone")
    parser.add_argument("--test", action="append", default=[], metavar="NAME=DIR",
                        help="a test set in the AMi-Br layout (repeatable)")
    parser.add_argument("--folds", type=int, default=5,
                        help="slide-grouped folds (default 5, the benchmark's protocol, whatever the config says)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--out")
    parser.add_argument("--tta", action="store_true", help="8-fold dihedral TTA on the test sets")
    parser.add_argument("--resume", action="store_true", help="continue the folds' training from last.pt")
    add_debug_option(parser)
    add_quiet_option(parser)
    return parser.parse_args(argv)


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    test_sets = parse_test_sets(args.test)
    for folder in test_sets.values():
        folder_index(folder)  # fail before hours of training, not after
    name = args.backbone or "default"
    if args.backbone:
        name = resolve_spec(args.backbone).name
    out_dir = Path(args.out) if args.out else REPO_ROOT / "runs" / f"benchmark_{args.method}_{name}"
    out_dir = out_dir if out_dir.is_absolute() else REPO_ROOT / out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.method == "linear":
        scores, extra = run_linear(args, out_dir, test_sets)
    else:
        scores, extra = run_trained(args.method, args, out_dir, test_sets)
    if scores:  # rank 0 only under torchrun
        backbone = extra.get("backbone") or extra.get("arch") or name
        write_report(out_dir, scores, f"AMi-Br benchmark: {args.method}, {backbone}", extra)
        print((out_dir / "benchmark.md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
