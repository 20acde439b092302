"""The full-data atypical classifier and shipping: `train_full` trains one model on all crops for the CV folds'
median best epoch (or a fixed number of epochs) and gives it the median of the folds' thresholds; `ship_one` copies
that model (or one fold's) to the weights folder with its model card, `ship_folds` the whole fold ensemble.

The command is training/train_classifier.py (sub-commands `full`, `ship`, `ship-folds`).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from midog.classifier import preprocess_card
from midog.errors import InputError
from midog.weights import plain, write_model_card
from training.classifier_config import (TrainConfig, ema_name, fold_checkpoint_path, full_checkpoint_name)
from training.classifier_cv import fold_thresholds, prepare_data
from training.classifier_fold import train_fold, training_targets
from training.runtime import Dist, git_commit, save_atomic


# ---------------------------------------------------------------------------------------------------- full data

def train_full(cfg: TrainConfig, out_dir: Path, ctx: Dist, summary: dict[str, Any] | None,
               full_epochs: int | None, resume: bool) -> None:
    """One model on all crops in `out_dir/full` for `full_epochs` or, by default, the CV folds' median best epoch
    (`cfg.epochs` with `ship_epoch: last`); once the CV is done, its thresholds are the folds' medians."""
    if summary is None and not full_epochs:
        raise InputError("--full needs a finished cross-validation (cv_summary.json) or --full-epochs")
    index, crops, labels = prepare_data(cfg)
    epochs = full_epochs or (cfg.epochs if cfg.ship_epoch == "last" else int(np.median(summary["best_epochs"])))
    result = train_fold(cfg, crops, labels, np.arange(len(labels)), None, out_dir / "full", ctx,
                        resume=resume, fixed_epochs=epochs, name="full",
                        meta={"trained_on": "all crops", "epochs": epochs},
                        train_targets=training_targets(cfg, index))
    if ctx.main and summary is None:
        print(f"warning: no cv_summary.json in {out_dir} yet, so {result.checkpoint} keeps threshold 0.5; when the "
              f"cross-validation is done, rerun with --full --full-epochs {epochs} --resume to set the folds' "
              "thresholds without training again", file=sys.stderr, flush=True)
    if ctx.main and summary is not None:
        set_full_thresholds(cfg, out_dir)


def set_full_thresholds(cfg: TrainConfig, out_dir: Path) -> None:
    """No validation data: the full model's thresholds are the medians of the folds' (best.pt, final.pt or
    final_ema*.pt); `tta_threshold` once `evaluate-tta` has set every fold's."""
    path = out_dir / "full" / full_checkpoint_name(cfg)
    state = torch.load(path, map_location="cpu", weights_only=True)
    folds = [fold_thresholds(cfg, out_dir, k) for k in range(cfg.folds)]
    state["threshold"] = float(np.median([fold["threshold"] for fold in folds]))
    fold_tta = [fold.get("tta_threshold") for fold in folds]
    if all(value is not None for value in fold_tta):  # set by --evaluate-tta
        state["tta_threshold"] = float(np.median(fold_tta))
    save_atomic(state, path)


# ---------------------------------------------------------------------------------------------------- shipping

def model_card(cfg: TrainConfig, clf_path: Path, summary: dict[str, Any] | None, extra: dict[str, Any]
               ) -> dict[str, Any]:
    state = torch.load(clf_path, map_location="cpu", weights_only=True)
    card = {
        "task": "Track 2: atypical vs normal mitotic figure; output P(atypical)",
        "architecture": state["arch"], "model_kwargs": state["model_kwargs"],
        "input_size": state["input_size"], "crop_size": 128, "threshold": state["threshold"],
        **({"tta_threshold": state["tta_threshold"]} if "tta_threshold" in state else {}),
        "preprocess": preprocess_card(state),
        "positive": state["positive"],
        "pretrained": ((state.get("meta", {}).get("pretrained") or "none (trained from scratch)")
                       if state.get("kind", "timm") == "timm" else
                       f"{state['arch']}: a foundation-model backbone, base weights read locally "
                       "(docs/foundation-models.md)"),
        "training_config": plain(dataclasses.asdict(cfg)),
        "git_commit": git_commit(),
    }
    if summary:
        card["training_data"] = summary.get("data")
        card["cross_validation"] = summary["cv"]  # each fold's best epoch at its own threshold (flattering)
        if cfg.ship_ema is not None and ema_name(cfg.ship_ema) in summary.get("last_epoch_ema", {}):
            # the moving average that ships, at each fold's last epoch
            card["cross_validation_last_epoch"] = summary["last_epoch_ema"][ema_name(cfg.ship_ema)]
        elif "last_epoch" in summary:  # each fold's last epoch, which `ship_epoch: last` follows
            card["cross_validation_last_epoch"] = summary["last_epoch"]
    card.update(extra)
    return card


def ship(cfg: TrainConfig, checkpoint: Path, target: Path, summary: dict[str, Any] | None,
         extra: dict[str, Any], half: bool = False) -> Path:
    """Copy a fold or full-data checkpoint to `target` (optionally with fp16 tensors) and write its model card."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if half:
        state["state_dict"] = {k: v.half() if v.is_floating_point() else v for k, v in state["state_dict"].items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(state, target)
    write_model_card(target, model_card(cfg, target, summary, extra))
    return target


def ship_folds(cfg: TrainConfig, out_dir: Path, weights_dir: Path, stem: str, summary: dict[str, Any],
               extra: dict[str, Any], half: bool) -> list[Path]:
    """Every fold's best.pt (final.pt with `ship_epoch: last`) as `weights_dir/{stem}_fold{k}.pt`, with a model card
    naming the whole ensemble."""
    names = [f"{stem}_fold{k}.pt" for k in range(cfg.folds)]
    members = []
    for k, name in enumerate(names):
        members.append(ship(cfg, fold_checkpoint_path(cfg, out_dir, k), weights_dir / name, summary,
                            {"ensemble": {"members": names, "this_fold": k,
                                          "combine": "mean of P(atypical); threshold = mean of member thresholds"},
                             **extra}, half=half))
    return members


def ship_one(cfg: TrainConfig, out_dir: Path, target: Path, summary: dict[str, Any] | None,
             tta_report: dict[str, Any] | None, full: bool, fold: int, half: bool) -> Path:
    """The full-data model (`full`) or fold `fold`'s checkpoint as `target`, with its model card."""
    source = out_dir / "full" / full_checkpoint_name(cfg) if full else fold_checkpoint_path(cfg, out_dir, fold)
    extra: dict[str, Any] = {"validation_tta": tta_report} if tta_report else {}
    if full:
        extra["shipped_model"] = full_model_description(cfg, source, summary)
    return ship(cfg, source, target, summary, extra, half=half)


def full_model_description(cfg: TrainConfig, source: Path, summary: dict[str, Any] | None) -> str:
    """The model card's account of the full-data model: what it trained on and where its thresholds come from."""
    state = torch.load(source, map_location="cpu", weights_only=True)
    crops = (summary or {}).get("data", {}).get("crops", "the")
    return (f"one model trained on all {crops} crops for {state['meta'].get('epochs')} "
            "epochs (no validation split left); threshold (and tta_threshold, if any) = "
            f"median of the folds' validation thresholds at their {cfg.ship_epoch} epoch"
            + (f", both for the moving average of the weights over {cfg.ship_ema:g} epochs"
               if cfg.ship_ema is not None else "") + " (on "
            "TTA-averaged probabilities); the cross-validation numbers estimate its "
            "accuracy")


def ship_fold_ensemble(cfg: TrainConfig, out_dir: Path, target: Path, summary: dict[str, Any],
                       tta_report: dict[str, Any] | None, half: bool) -> list[Path]:
    """`ship_folds` named after `target` (weights/atypical.pt: weights/atypical_fold{k}.pt), each path printed."""
    extra = {"validation_tta": tta_report} if tta_report else {}
    paths = ship_folds(cfg, out_dir, target.parent, target.stem, summary, extra, half=half)
    for path in paths:
        print(f"shipped {path}", flush=True)
    return paths
