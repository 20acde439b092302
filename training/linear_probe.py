"""Linear probing of a frozen foundation model on AMi-Br, cross-validated like the end-to-end classifiers.

    python -m training.linear_probe --backbone uni2-h [--weights DIR_OR_FILE] [--folds 5] [--out runs/probe_uni2-h]

The backbone's pooled features of every crop are extracted once (a progress bar) and cached on disk, keyed by
the backbone (spec, base weights file, input size, normalisation) and the data (crop files); a second run, another
C, or the benchmark's external test sets reuse them. Per slide-grouped fold (training/amibr.py) a class-weighted
logistic regression is fitted on standardised features; the standardisation is folded into the linear head, which
becomes the `head` of a foundation checkpoint (`method: linear`, a few KB: the backbone comes from its local
weights at load time), with the decision threshold chosen on the fold's validation split. Output layout and
`cv_summary.json` are those of training/train_classifier.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from scipy.special import expit
from sklearn.linear_model import LogisticRegression

from midog.classifier import build_classifier, preprocess_card
from midog.cli import OneLineArgumentParser, add_debug_option, add_quiet_option, entry_point, read_json_file
from midog.devices import resolve_device
from midog.foundation import FoundationClassifier
from midog.progress import progress_iter
from midog.weights import plain, write_model_card
from training.amibr import load_index, slide_folds
from training.config_file import load_training_config
from training.runtime import REPO_ROOT, git_commit
from training.train_classifier import (FoldResult, balanced_accuracy, best_threshold, binary_metrics,
                                       data_description, summarise)


@dataclass
class ProbeConfig:
    data_root: str = "../shared/data/amibr"
    """AMi-Br folder; relative paths are from the repo root."""
    csv: str | None = None
    backbone: str = "uni2-h"
    """A foundation registry name (uni, uni2-h, virchow, virchow2, h-optimus-0/1, prov-gigapath) or timm name."""
    weights: str | None = None
    """Local pretrained weights of the backbone; None searches the `foundation` config (docs/foundation-models.md)."""
    pooling: str | None = None
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    input_size: int | None = None
    """None: the backbone's own (224 for the registry models)."""
    folds: int = 5
    fold_seed: int = 0
    C: float = 1.0
    """Inverse L2 strength of the logistic regression (on standardised features)."""
    max_iter: int = 5000
    batch_size: int = 64
    device: str = "auto"
    num_threads: int = 1
    """CPU threads for torch (0 = default); ignored on GPU."""
    cache: str = "runs/features"
    out: str = "runs/linear_probe"


def load_probe_config(path: str | os.PathLike[str] | None, overrides: dict[str, Any] | None = None) -> ProbeConfig:
    """The YAML at `path` (partial is fine) then `overrides`; ConfigError for an unknown key or a bad value."""
    return load_training_config(path, ProbeConfig, overrides)


def repo_path(path: str) -> Path:
    return Path(path) if Path(path).is_absolute() else REPO_ROOT / path


def build_probe(cfg: ProbeConfig) -> FoundationClassifier:
    """The frozen backbone with an untrained head, on the configured device."""
    options: dict[str, Any] = {"method": "linear", "weights": cfg.weights, "timm_kwargs": dict(cfg.timm_kwargs)}
    if cfg.pooling:
        options["pooling"] = cfg.pooling
    clf = build_classifier(cfg.backbone, cfg.input_size or 0, positive="atypical", model_kwargs=options)
    if not isinstance(clf, FoundationClassifier):
        raise TypeError(f"{cfg.backbone} did not build a foundation classifier")
    return clf.to(resolve_device(cfg.device, setting="the probe's device"))


# ---------------------------------------------------------------------------------------------------- features

def backbone_key(clf: FoundationClassifier, base_weights: Path | None) -> str:
    """Changes whenever the features would: architecture, pooling, preprocessing, or the weights file."""
    described = {"spec": dataclasses.asdict(clf.spec), "input_size": clf.input_size, "mean": clf.mean,
                 "std": clf.std, **clf.resize_state()}
    if base_weights is not None:
        stat = base_weights.stat()
        described["weights"] = [str(base_weights.resolve()), stat.st_size, stat.st_mtime_ns]
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_key(paths: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _read_rgb(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def extract_features(clf: FoundationClassifier, paths: Sequence[str], batch_size: int = 64,
                     desc: str = "features") -> np.ndarray:
    """Pooled features (N, D) float32 of the image files, in order; crops of any size (resized by preprocess)."""
    out = np.zeros((len(paths), clf.model.num_features), dtype=np.float32)
    use_amp = clf.device.type == "cuda"
    batches = range(0, len(paths), batch_size)
    for start in progress_iter(batches, len(batches), desc, "batch"):
        images = [_read_rgb(p) for p in paths[start:start + batch_size]]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(image.shape, []).append(i)
        for indices in groups.values():
            batch = np.stack([images[i] for i in indices])
            with torch.autocast(clf.device.type, dtype=torch.bfloat16, enabled=use_amp):
                features = clf.features(batch, batch_size=len(batch))
            out[[start + i for i in indices]] = features.float().numpy()
    return out


def cached_features(clf: FoundationClassifier, paths: Sequence[str], cache_dir: Path, batch_size: int = 64,
                    desc: str = "features") -> np.ndarray:
    """`extract_features`, computed once per (backbone, data) and kept in `cache_dir`."""
    base = Path(clf.base_weights) if clf.base_weights else None
    key = f"{clf.spec.name}-{backbone_key(clf, base)}-{data_key(paths)}"
    path = cache_dir / f"{key}.npz"
    if path.is_file():
        with np.load(path) as cached:
            if list(cached["paths"]) == [os.path.abspath(p) for p in paths]:
                return cached["features"]
    features = extract_features(clf, paths, batch_size, desc)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, features=features, paths=np.array([os.path.abspath(p) for p in paths]))
    os.replace(tmp, path)
    return features


# ---------------------------------------------------------------------------------------------------- the head

def fit_head(features: np.ndarray, labels: np.ndarray, C: float = 1.0, max_iter: int = 5000,
             seed: int = 0) -> tuple[np.ndarray, float]:
    """Class-weighted logistic regression on standardised features → (weight (D,), bias) on the raw features."""
    mean = features.mean(0)
    std = features.std(0) + 1e-6
    model = LogisticRegression(C=C, class_weight="balanced", max_iter=max_iter, random_state=seed)
    model.fit((features - mean) / std, labels)
    weight = model.coef_[0] / std
    bias = float(model.intercept_[0] - (model.coef_[0] * mean / std).sum())
    return weight.astype(np.float32), bias


def head_probabilities(features: np.ndarray, weight: np.ndarray, bias: float) -> np.ndarray:
    return expit(features.astype(np.float64) @ weight.astype(np.float64) + bias)


def set_head(clf: FoundationClassifier, weight: np.ndarray, bias: float) -> None:
    with torch.no_grad():
        clf.model.head.weight.copy_(torch.as_tensor(weight).view(1, -1))
        clf.model.head.bias.fill_(bias)


# ---------------------------------------------------------------------------------------------------- CV

def cross_validate_probe(cfg: ProbeConfig, out_dir: Path) -> tuple[FoundationClassifier, list[FoldResult]]:
    """Per fold: fit the head on the other folds, threshold on this one, write fold{k}/best.pt + result.json."""
    clf = build_probe(cfg)
    index = load_index(repo_path(cfg.data_root), cfg.csv)
    features = cached_features(clf, list(index["path"]), repo_path(cfg.cache), cfg.batch_size, "AMi-Br features")
    labels = index["label"].to_numpy()
    fold_of = slide_folds(index, cfg.folds, cfg.fold_seed)
    results = []
    for k in range(cfg.folds):
        train, val = fold_of != k, fold_of == k
        weight, bias = fit_head(features[train], labels[train], cfg.C, cfg.max_iter)
        probs = head_probabilities(features[val], weight, bias)
        threshold, _ = best_threshold(labels[val], probs)
        metrics = binary_metrics(labels[val], probs, threshold)
        metrics["balanced_accuracy_at_0.5"] = balanced_accuracy(labels[val], probs, 0.5)
        set_head(clf, weight, bias)
        clf.threshold = threshold
        fold_dir = out_dir / f"fold{k}"
        meta = {"fold": k, "folds": cfg.folds, "fold_seed": cfg.fold_seed, "val": metrics, "method": "linear probe",
                "val_slides": int(index["group"][val].nunique()), "val_crops": int(val.sum())}
        checkpoint = clf.save(fold_dir / "best.pt", meta=meta)
        result = FoldResult(fold=k, best_epoch=0, threshold=threshold, metrics=metrics, checkpoint=str(checkpoint))
        (fold_dir / "result.json").write_text(json.dumps(dataclasses.asdict(result), indent=2))
        print(f"[fold{k}] " + " ".join(f"{key}={value:.4f}" for key, value in metrics.items()), flush=True)
        results.append(result)
    summary = summarise(out_dir, cfg.folds)
    if summary is not None:
        summary["data"] = data_description(index, cfg.folds, cfg.csv, cfg.fold_seed)
        summary["probe"] = plain(dataclasses.asdict(cfg))
        (out_dir / "cv_summary.json").write_text(json.dumps(summary, indent=2))
    return clf, results


def probe_model_card(clf: FoundationClassifier, cfg: ProbeConfig, summary: dict[str, Any] | None) -> dict[str, Any]:
    card = {
        "task": "Track 2: atypical vs normal mitotic figure; output P(atypical)",
        "architecture": f"{clf.spec.name} ({clf.spec.arch}, pooling {clf.spec.pooling}) + linear head",
        "method": "linear probe (frozen backbone, class-weighted logistic regression)",
        "pretrained": clf.spec.hub_id or clf.spec.arch,
        "input_size": clf.input_size, "crop_size": 128, "threshold": clf.threshold, "positive": clf.positive,
        "preprocess": preprocess_card({"input_size": clf.input_size, "mean": clf.mean, "std": clf.std,
                                       **clf.resize_state()}),
        "training_config": plain(dataclasses.asdict(cfg)), "git_commit": git_commit(),
    }
    if summary:
        card["training_data"] = summary.get("data")
        card["cross_validation"] = summary["cv"]
    return card


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML with ProbeConfig fields")
    parser.add_argument("--backbone")
    parser.add_argument("--weights", help="local pretrained weights (file, folder or Hugging Face cache folder)")
    parser.add_argument("--data-root")
    parser.add_argument("--folds", type=int)
    parser.add_argument("--C", type=float)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--device")
    parser.add_argument("--cache", help="feature cache folder")
    parser.add_argument("--out")
    parser.add_argument("--ship", help="also fit the head on all crops and write it here (.pt + .json card)")
    add_debug_option(parser)
    add_quiet_option(parser)
    return parser.parse_args(argv)


@entry_point
def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))  # missing backbone weights, a device this machine lacks, ...: one line


def run(args: argparse.Namespace) -> int:
    overrides = {key: value for key, value in {
        "backbone": args.backbone, "weights": args.weights, "data_root": args.data_root, "folds": args.folds,
        "C": args.C, "batch_size": args.batch_size, "device": args.device, "cache": args.cache, "out": args.out,
    }.items() if value is not None}
    cfg = load_probe_config(args.config, overrides)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    out_dir = repo_path(cfg.out)
    clf, _ = cross_validate_probe(cfg, out_dir)
    summary_path = out_dir / "cv_summary.json"
    summary = read_json_file(summary_path, "cross-validation summary") if summary_path.is_file() else None
    if summary:
        print(json.dumps(summary["cv"], indent=2))
    if args.ship:
        index = load_index(repo_path(cfg.data_root), cfg.csv)
        features = cached_features(clf, list(index["path"]), repo_path(cfg.cache), cfg.batch_size)
        weight, bias = fit_head(features, index["label"].to_numpy(), cfg.C, cfg.max_iter)
        set_head(clf, weight, bias)
        clf.threshold = float(np.median(summary["thresholds"])) if summary else 0.5
        target = clf.save(Path(args.ship), meta={"trained_on": "all crops", "method": "linear probe"})
        write_model_card(target, probe_model_card(clf, cfg, summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
