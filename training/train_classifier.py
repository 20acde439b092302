"""Train the atypical-vs-normal mitotic figure classifier on AMi-Br with slide-grouped cross-validation.

    python -m training.train_classifier --config training/configs/atypical.yaml [--folds 5] [--fold k]
                                        [--out DIR] [--resume] [--full]

Per fold: AdamW + linear warmup + cosine decay, BCE with a positive-class weight for the imbalance, early stopping
on validation balanced accuracy (with `ship_epoch: best`; with 'last' every fold runs its whole schedule), a
decision threshold chosen on the validation fold (max balanced accuracy) and stored in the checkpoint. Writes
`DIR/fold{k}/{best.pt,final.pt,last.pt,metrics.csv}` and `DIR/cv_summary.json`.
`--full` trains one model on all crops for the median best epoch of the CV folds (or `--full-epochs N`, which can
run alongside the CV; `--full --full-epochs N --resume` after the CV then only sets its thresholds).

Multi-GPU: `torchrun --nproc_per_node N -m training.train_classifier ...` (DDP, DistributedSampler; every rank
evaluates the whole, small, validation fold so they take the same early-stopping decision; rank 0 writes).

The pieces (build_model, make_datasets, train_epoch, evaluate, train_fold, cross_validate) are separate functions
so other training recipes (foundation-model probing, LoRA) can reuse them.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader, DistributedSampler
from timm.utils import ModelEmaV3

from midog.classifier import (PLAIN_CROP_PCT, BinaryClassifier, build_classifier, check_resize, load_classifier,
                              preprocess_card)
from midog.cli import OneLineArgumentParser, add_debug_option, entry_point
from midog.errors import ConfigError, InputError
from midog.evaluate.track2 import best_balanced_threshold
from midog.progress import progress_bar, progress_iter
from midog.weights import plain, write_model_card
from training.amibr import FOLD_SPLITS, CropDataset, assign_folds, load_crops, load_index
from training.augment import AugmentConfig, train_transform
from training.config_file import load_training_config
from training.runtime import (REPO_ROOT, Dist, adamw_warmup_cosine, git_commit, init_distributed, rank0_array,
                              same_model_on_every_rank, save_atomic, seed_everything, write_csv)


@dataclass
class TrainConfig:
    data_root: str = "../shared/data/amibr"
    """AMi-Br folder (Atypical/, Normal/, amibr_train_split.csv); relative paths are from the repo root."""
    csv: str | None = None
    """Split CSV; default `<data_root>/amibr_train_split.csv`."""
    arch: str = "resnet18"
    """Any timm model name (created with pretrained=False)."""
    input_size: int = 96
    crop_pct: float = 1.0
    """1: the crop is resized to input_size whole. Below 1: resized to input_size / crop_pct, then centre-cropped to
    input_size (a narrower field of view at a finer scale); stored with the weights, so inference does the same."""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None
    """Start from pretrained weights instead of a random init: a `midog.pretrained` registry name (for example
    "efficientnet_lite0.imagenet", with arch tf_efficientnet_lite0) or a local state-dict file with timm key names;
    read from disk, never downloaded (docs/pretrained.md). Recorded in the checkpoints' meta and the model card."""
    positive: str = "atypical"
    folds: int = 5
    fold_seed: int = 0
    split: str = "slide"
    """How crops are split into folds: 'slide' (stratified, grouped by slide; the default and what the shipped
    thresholds come from) or 'dataset' (leave one source dataset out: `folds` = number of datasets; each fold
    model is scored on a domain it never saw, and the threshold of the other fold is a transferred one)."""
    seed: int = 0
    epochs: int = 30
    min_epochs: int = 8
    """Early stopping never stops before this epoch."""
    patience: int = 8
    """Stop after this many epochs without a better validation balanced accuracy. Early stopping applies with
    `ship_epoch: best` only: with 'last' every fold runs the whole schedule, like the full-data model."""
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    pos_weight: str | float = "balanced"
    """BCE weight of the positive class: 'balanced' (n_negative / n_positive), 'sqrt', or a number."""
    label_smoothing: float = 0.0
    targets: str = "majority"
    """Training targets: 'majority' (the experts' majority label, 0/1) or 'votes' (the share of the three experts
    who called the figure atypical: 0, 1/3, 2/3, 1). Validation, thresholds and early stopping always use the
    majority label; so does the class weight."""
    ship_epoch: str = "best"
    """Which epoch of the CV folds the full-data model (`--full`) follows. 'best': early stopping's best epoch; the
    full model trains for the folds' median best epoch and takes the median of their best.pt thresholds. 'last':
    the end of the schedule; it trains `epochs` epochs and takes the median of the thresholds of the folds' last
    epochs (final.pt), and so the folds run the whole schedule too (no early stopping). The best epoch and its
    threshold are both picked on the validation fold, which makes them noisy and flattering; the last epoch is
    picked by nothing."""
    ema_epochs: list[float] = field(default_factory=list)
    """Exponential moving averages of the weights (timm's ModelEmaV3) kept beside training, one per horizon in
    epochs: decay = 1 - 1 / (horizon x steps per epoch), so a CV fold and the full-data model average over the
    same share of their schedules. They never touch the training path (the raw weights train exactly as without
    them); each is scored on the validation fold every epoch (`ema{h}_*` columns) and saved at the end of the
    schedule as `final_ema{h}.pt` in a fold and `ema{h}.pt` in the full-data run."""
    ship_ema: float | None = None
    """Ship the moving average with this horizon (one of `ema_epochs`) instead of the last epoch's raw weights:
    the folds' `final_ema{h}.pt` give the thresholds and are what `--evaluate-tta` and `--ship-folds` use. Needs
    `ship_epoch: last`."""
    num_threads: int = 1
    """CPU threads for torch (0 = torch default); ignored on GPU."""
    num_workers: int = 0
    eval_batch_size: int = 256
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    out: str = "runs/atypical"

    def __post_init__(self) -> None:
        # checked here, not where it is used: a misspelt value would otherwise train without early stopping
        if self.ship_epoch not in SHIP_EPOCH_CHECKPOINTS:
            raise ConfigError(f"ship_epoch must be 'best' or 'last', got {self.ship_epoch!r}")
        if self.split not in FOLD_SPLITS:
            raise ConfigError(f"split must be one of {FOLD_SPLITS}, got {self.split!r}")
        if any(not h > 0 for h in self.ema_epochs):
            raise ConfigError(f"ema_epochs must be positive horizons in epochs, got {self.ema_epochs!r}")
        if self.ship_ema is not None:
            if self.ship_ema not in self.ema_epochs:
                raise ConfigError(f"ship_ema {self.ship_ema!r} is not one of ema_epochs {self.ema_epochs!r}")
            if self.ship_epoch != "last":
                raise ConfigError("ship_ema needs ship_epoch: last (a moving average has no early-stopping epoch)")


SHIP_EPOCH_CHECKPOINTS = {"best": "best.pt", "last": "final.pt"}
"""The fold checkpoint each `ship_epoch` follows: early stopping's best epoch, or the last epoch."""


def load_train_config(path: str | os.PathLike[str] | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The YAML at `path` (partial is fine) then `overrides`; ConfigError for an unknown key or a bad value."""
    return load_training_config(path, TrainConfig, overrides)


# ---------------------------------------------------------------------------------------------------- setup

def build_model(cfg: TrainConfig) -> BinaryClassifier:
    clf = build_classifier(cfg.arch, cfg.input_size, positive=cfg.positive, model_kwargs=cfg.model_kwargs,
                           pretrained=cfg.pretrained)
    if cfg.crop_pct != PLAIN_CROP_PCT:
        check_resize(clf.interpolation, cfg.crop_pct)
        clf.crop_pct = float(cfg.crop_pct)
    return clf


def resolve_data_root(cfg: TrainConfig) -> Path:
    root = Path(cfg.data_root)
    return root if root.is_absolute() else (REPO_ROOT / root)


def training_targets(cfg: TrainConfig, index: Any) -> np.ndarray:
    """What the loss is fitted to, per crop (see `TrainConfig.targets`)."""
    if cfg.targets == "majority":
        return index["label"].to_numpy().astype(np.float32)
    if cfg.targets == "votes":
        votes = np.asarray(index["votes"], dtype=np.float32)
        if (votes < 0).any():
            raise ConfigError("targets: votes needs the expert{1,2,3}_atypical columns in the split CSV")
        return votes / 3.0
    raise ConfigError(f"targets must be 'majority' or 'votes', got {cfg.targets!r}")


def make_datasets(cfg: TrainConfig, crops: np.ndarray, labels: np.ndarray, train_idx: np.ndarray,
                  val_idx: np.ndarray, train_targets: np.ndarray | None = None) -> tuple[CropDataset, CropDataset]:
    size = crops.shape[1]
    targets = labels if train_targets is None else train_targets
    train = CropDataset(crops[train_idx], targets[train_idx], transform=train_transform(cfg.augment, size))
    val = CropDataset(crops[val_idx], labels[val_idx])
    return train, val


def make_train_loader(cfg: TrainConfig, dataset: CropDataset, ctx: Dist, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    sampler = DistributedSampler(dataset, ctx.world_size, ctx.rank, shuffle=True, seed=seed) \
        if ctx.world_size > 1 else None
    per_rank = math.ceil(len(dataset) / ctx.world_size)  # DistributedSampler pads every rank to this
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                      drop_last=per_rank > cfg.batch_size, num_workers=cfg.num_workers, generator=generator,
                      pin_memory=ctx.device.type == "cuda", persistent_workers=cfg.num_workers > 0)


def positive_weight(cfg: TrainConfig, labels: np.ndarray) -> float:
    n_pos = max(int(labels.sum()), 1)
    n_neg = max(len(labels) - n_pos, 1)
    if cfg.pos_weight == "balanced":
        return n_neg / n_pos
    if cfg.pos_weight == "sqrt":
        return math.sqrt(n_neg / n_pos)
    return float(cfg.pos_weight)


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module, steps_per_epoch: int
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW (no weight decay on norms and biases) with linear warmup then cosine decay to 1 % of `lr` at the end
    of `cfg.epochs` (`training.runtime.adamw_warmup_cosine`)."""
    return adamw_warmup_cosine(model, cfg.lr, cfg.weight_decay, cfg.epochs * steps_per_epoch, cfg.warmup_epochs,
                               steps_per_epoch, min_lr_ratio=0.01)


# ---------------------------------------------------------------------------------------------------- metrics

def balanced_accuracy(labels: np.ndarray, probs: np.ndarray, threshold: float) -> float:
    pred = probs >= threshold
    pos, neg = labels == 1, labels == 0
    sens = float(pred[pos].mean()) if pos.any() else 0.0
    spec = float((~pred[neg]).mean()) if neg.any() else 0.0
    return 0.5 * (sens + spec)


def best_threshold(labels: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """The threshold maximising balanced accuracy, and that accuracy, by the package's one rule
    (`midog.evaluate.track2.best_balanced_threshold`: a midpoint between consecutive distinct scores, ties to the
    lowest). A validation set of one class has nothing to balance: 0.5, and `balanced_accuracy` there."""
    if labels.min() == labels.max():
        return 0.5, balanced_accuracy(labels, probs, 0.5)
    return best_balanced_threshold(labels, probs)


def binary_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:
    pred = probs >= threshold
    pos, neg = labels == 1, labels == 0
    both = pos.any() and neg.any()
    return {
        "balanced_accuracy": balanced_accuracy(labels, probs, threshold),
        "sensitivity": float(pred[pos].mean()) if pos.any() else float("nan"),
        "specificity": float((~pred[neg]).mean()) if neg.any() else float("nan"),
        "roc_auc": float(roc_auc_score(labels, probs)) if both else float("nan"),
    }


def make_emas(cfg: TrainConfig, model: torch.nn.Module, steps_per_epoch: int) -> dict[float, ModelEmaV3]:
    """One moving average of `model` per horizon of `cfg.ema_epochs` (see there)."""
    return {h: ModelEmaV3(model, decay=1.0 - 1.0 / max(h * steps_per_epoch, 1.0)) for h in cfg.ema_epochs}


def ema_name(horizon: float) -> str:
    return f"ema{horizon:g}"


# ---------------------------------------------------------------------------------------------------- loops

def train_epoch(clf: BinaryClassifier, model: torch.nn.Module, loader: DataLoader,
                optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ctx: Dist,
                desc: str = "train", emas: dict[float, ModelEmaV3] | None = None) -> float:
    """One pass over `loader`; `model` is `clf.model` or its DDP wrapper; each of `emas` follows `clf.model` after
    every step. Returns the mean training loss."""
    model.train()
    total, count = 0.0, 0
    use_amp = ctx.device.type == "cuda"
    bar = progress_iter(loader, len(loader), desc, "batch", ctx.main)
    for images, labels in bar:
        batch = clf.preprocess(images.permute(0, 2, 3, 1))  # uint8 NHWC → resized, normalised, on device
        labels = labels.to(ctx.device, non_blocking=True)
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = model(batch).float().view(-1)
        loss = loss_fn(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        for ema in (emas or {}).values():
            ema.update(clf.model)
        total += float(loss.detach()) * len(labels)
        count += len(labels)
        bar.set_postfix(loss=f"{total / count:.4f}", refresh=False)
    return total / max(count, 1)


@torch.inference_mode()
def predict(clf: BinaryClassifier, dataset: CropDataset, batch_size: int, tta: bool = False) -> np.ndarray:
    crops = dataset.crops.permute(0, 2, 3, 1)
    return clf.predict_proba(crops, tta=tta, batch_size=batch_size)


def predict_with_bar(clf: BinaryClassifier, crops: np.ndarray, tta: bool, batch_size: int, desc: str) -> np.ndarray:
    """`clf.predict_proba` batch by batch under a progress bar of the crops done (scoring with TTA takes minutes)."""
    out = []
    with progress_bar(len(crops), desc, "crop") as bar:
        for start in range(0, len(crops), batch_size):
            out.append(clf.predict_proba(crops[start:start + batch_size], tta=tta, batch_size=batch_size))
            bar.update(len(out[-1]))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def make_loss(cfg: TrainConfig, train_labels: np.ndarray, device: torch.device
              ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    bce = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(positive_weight(cfg, train_labels), device=device))
    eps = cfg.label_smoothing

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return bce(logits, labels * (1 - eps) + 0.5 * eps)

    return loss_fn


# ---------------------------------------------------------------------------------------------------- one fold

@dataclass
class FoldResult:
    fold: int
    best_epoch: int
    threshold: float
    metrics: dict[str, float]
    """Validation metrics of the best epoch at the chosen threshold, plus balanced accuracy at 0.5."""
    checkpoint: str
    last_epoch: int = 0
    last_threshold: float = 0.5
    """The last epoch's validation threshold, stored in `final.pt` with that epoch's weights."""


def train_fold(cfg: TrainConfig, crops: np.ndarray, labels: np.ndarray, train_idx: np.ndarray,
               val_idx: np.ndarray | None, out_dir: Path, ctx: Dist, resume: bool = False,
               fixed_epochs: int | None = None, name: str = "fold", meta: dict[str, Any] | None = None,
               train_targets: np.ndarray | None = None) -> FoldResult:
    """Train on `train_idx`, early-stop on `val_idx`; without `val_idx`, train `fixed_epochs` and keep the last.

    `labels` are the 0/1 labels (validation, class weight); `train_targets` what the loss fits, default `labels`.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    clf = build_model(cfg).to(ctx.device)
    meta = {**(meta or {}), **({"pretrained": clf.meta["pretrained"]} if "pretrained" in clf.meta else {})}
    train_set, val_set = make_datasets(cfg, crops, labels, train_idx,
                                       val_idx if val_idx is not None else np.zeros(0, dtype=int), train_targets)
    loader = make_train_loader(cfg, train_set, ctx, cfg.seed)
    model: torch.nn.Module = clf.model
    if ctx.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            clf.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    epochs = fixed_epochs if fixed_epochs is not None else cfg.epochs
    optimizer, scheduler = make_optimizer(dataclasses.replace(cfg, epochs=epochs), clf.model, len(loader))
    loss_fn = make_loss(cfg, labels[train_idx], ctx.device)
    emas = make_emas(cfg, clf.model, len(loader))

    last_path, best_path, csv_path = out_dir / "last.pt", out_dir / "best.pt", out_dir / "metrics.csv"
    state = {"epoch": 0, "best_score": -1.0, "best_epoch": 0, "best_threshold": 0.5, "best_metrics": {},
             "stale": 0, "history": []}
    if resume and last_path.is_file():
        # on the CPU: the RNG states must stay CPU byte tensors (on CUDA, set_rng_state refuses them), and
        # load_state_dict moves the weights and optimizer state to the model's device itself
        saved = torch.load(last_path, map_location="cpu", weights_only=False)
        clf.model.load_state_dict(saved["model"], strict=True)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["torch_rng"])
        np.random.set_state(saved["numpy_rng"])
        random.setstate(saved["python_rng"])
        loader.generator.set_state(saved["loader_rng"])
        for horizon, ema in emas.items():
            if horizon not in saved.get("emas", {}):
                raise ConfigError(f"{last_path} has no moving average over {horizon:g} epochs: it was trained with "
                                 f"ema_epochs {sorted(saved.get('emas', {}))}, not {cfg.ema_epochs}")
            ema.module.load_state_dict(saved["emas"][horizon], strict=True)
        state = saved["state"]
        if ctx.main:
            print(f"[{name}] resumed after epoch {state['epoch']}", flush=True)

    # with ship_epoch 'last' the full model trains the whole schedule, so every fold does too: no early stopping
    early_stopping = val_idx is not None and cfg.ship_epoch == "best"
    while state["epoch"] < epochs and (not early_stopping or state["stale"] < cfg.patience
                                       or state["epoch"] < cfg.min_epochs):
        epoch = state["epoch"] + 1
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        t0 = time.time()
        loss = train_epoch(clf, model, loader, optimizer, scheduler, loss_fn, ctx, desc=f"{name} ep{epoch}",
                           emas=emas)
        row: dict[str, Any] = {"epoch": epoch, "train_loss": round(loss, 5), "lr": optimizer.param_groups[0]["lr"]}
        improved = val_idx is None
        if val_idx is not None:
            same_model_on_every_rank(clf.model, ctx)
            probs = rank0_array(predict(clf, val_set, cfg.eval_batch_size), ctx)
            threshold, score = best_threshold(val_set.labels.numpy(), probs)
            metrics = binary_metrics(val_set.labels.numpy(), probs, threshold)
            metrics["balanced_accuracy_at_0.5"] = balanced_accuracy(val_set.labels.numpy(), probs, 0.5)
            row.update({"threshold": round(threshold, 4), **{k: round(v, 4) for k, v in metrics.items()}})
            state.update(last_threshold=threshold, last_metrics=metrics)
            for horizon, ema in emas.items():
                ema_probs = rank0_array(predict(averaged(clf, ema), val_set, cfg.eval_batch_size), ctx)
                ema_threshold, _ = best_threshold(val_set.labels.numpy(), ema_probs)
                ema_metrics = binary_metrics(val_set.labels.numpy(), ema_probs, ema_threshold)
                state.setdefault("ema_last", {})[horizon] = {"threshold": ema_threshold, "metrics": ema_metrics}
                row.update({f"{ema_name(horizon)}_threshold": round(ema_threshold, 4),
                            **{f"{ema_name(horizon)}_{k}": round(v, 4) for k, v in ema_metrics.items()
                               if k in ("balanced_accuracy", "roc_auc")}})
            improved = score > state["best_score"]
            if improved:
                state.update(best_score=score, best_epoch=epoch, best_threshold=threshold, best_metrics=metrics,
                             stale=0)
            else:
                state["stale"] += 1
        else:
            state.update(best_epoch=epoch)
        row["seconds"] = round(time.time() - t0, 1)
        state["epoch"] = epoch
        state["history"].append(row)
        if ctx.main:
            print(f"[{name}] " + " ".join(f"{k}={v}" for k, v in row.items()), flush=True)
            if improved:
                clf.threshold = state["best_threshold"]
                clf.save(best_path, meta={**(meta or {}), "epoch": epoch, "val": state["best_metrics"]})
            write_csv(csv_path, state["history"])
            _save_resume(last_path, clf, optimizer, scheduler, loader, state, emas)
    last_threshold = _last_epoch_threshold(state)
    if val_idx is not None and ctx.main:
        # the end of the schedule with its own validation threshold, for `ship_epoch: last`
        clf.threshold = last_threshold
        clf.save(out_dir / "final.pt", meta={**(meta or {}), "epoch": state["epoch"],
                                              "val": state.get("last_metrics") or state["history"][-1]})
    if ctx.main:
        for horizon, ema in emas.items():  # the moving averages at the end of the schedule
            scored = state.get("ema_last", {}).get(horizon, {"threshold": 0.5, "metrics": {}})
            ema_clf = averaged(clf, ema)
            ema_clf.threshold = scored["threshold"]
            ema_clf.save(out_dir / (f"final_{ema_name(horizon)}.pt" if val_idx is not None
                                    else f"{ema_name(horizon)}.pt"),
                         meta={**(meta or {}), "epoch": state["epoch"], "ema_epochs": horizon,
                               "ema_decay": ema.decay, "val": scored["metrics"]})
    if ctx.world_size > 1:
        dist.barrier()
    return FoldResult(fold=-1, best_epoch=state["best_epoch"], threshold=state["best_threshold"],
                      metrics=state["best_metrics"], checkpoint=str(best_path), last_epoch=state["epoch"],
                      last_threshold=last_threshold)


def _last_epoch_threshold(state: dict[str, Any]) -> float:
    if "last_threshold" in state:
        return float(state["last_threshold"])
    rows = [row for row in state["history"] if "threshold" in row]  # runs saved before it was kept exactly
    return float(rows[-1]["threshold"]) if rows else 0.5


def averaged(clf: BinaryClassifier, ema: ModelEmaV3) -> BinaryClassifier:
    """`clf` (its preprocessing, threshold, metadata) with the moving-average weights of `ema`."""
    return dataclasses.replace(clf, model=ema.module, meta=dict(clf.meta))


def _save_resume(path: Path, clf: BinaryClassifier, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, loader: DataLoader, state: dict[str, Any],
                 emas: dict[float, ModelEmaV3]) -> None:
    save_atomic({"model": clf.model.state_dict(), "emas": {h: ema.module.state_dict() for h, ema in emas.items()},
                 "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                 "numpy_rng": np.random.get_state(), "python_rng": random.getstate(),
                 "loader_rng": loader.generator.get_state(), "state": state}, path)


# ---------------------------------------------------------------------------------------------------- CV

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
    results = [json.loads(f.read_text()) for f in files]
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


def fold_checkpoint_name(cfg: TrainConfig) -> str:
    """The fold checkpoint that `ship_epoch` follows: best.pt (early stopping's best epoch) or final.pt (last), or
    with `ship_ema` the last epoch's moving average final_ema{h}.pt."""
    if cfg.ship_ema is not None:
        return f"final_{ema_name(cfg.ship_ema)}.pt"
    return SHIP_EPOCH_CHECKPOINTS[cfg.ship_epoch]


def full_checkpoint_name(cfg: TrainConfig) -> str:
    """The full-data run's checkpoint that ships: its last epoch (best.pt) or, with `ship_ema`, ema{h}.pt."""
    return "best.pt" if cfg.ship_ema is None else f"{ema_name(cfg.ship_ema)}.pt"


def tta_report_name(cfg: TrainConfig) -> str:
    """Where `--evaluate-tta` writes its report: one per fold checkpoint it scores."""
    return "tta_report.json" if cfg.ship_ema is None else f"tta_report_{ema_name(cfg.ship_ema)}.json"


def fold_checkpoint_path(cfg: TrainConfig, out_dir: Path, k: int) -> Path:
    return out_dir / f"fold{k}" / fold_checkpoint_name(cfg)


def fold_report_path(cfg: TrainConfig, out_dir: Path, k: int) -> Path:
    """Fold k's own scores (`--evaluate-tta [--fold k]`), small enough to keep when its checkpoints are gone."""
    return out_dir / f"fold{k}" / tta_report_name(cfg)


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
    """Fold k's checkpoint on its own validation fold, with and without 8-fold dihedral TTA: metrics at its stored
    threshold, the probabilities (by crop file name, so the combination can be redone without the checkpoint), and
    for TTA the threshold that maximises balanced accuracy on the TTA-averaged probabilities (averaging pulls them
    inward, so the plain threshold is off for them). That threshold is stored in the checkpoint as `tta_threshold`,
    which inference with TTA uses and shipping copies; the report goes to `fold_report_path`."""
    path = fold_checkpoint_path(cfg, out_dir, k)
    clf = load_classifier(path)
    report: dict[str, Any] = {"fold": k, "checkpoint": path.name, "threshold": clf.threshold,
                              "files": crop_names(index, val)}
    for key, tta in (("no_tta", False), ("tta", True)):
        probs = predict_with_bar(clf, crops[val], tta, cfg.eval_batch_size, f"fold {k} {key}")
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
    report = json.loads(report_path.read_text())
    if report["files"] != crop_names(index, val):
        raise InputError(f"{report_path} scored other crops than fold {k} of this config's split")
    return report


def fold_thresholds(cfg: TrainConfig, out_dir: Path, k: int) -> dict[str, float]:
    """Fold k's `threshold` and, once scored with TTA, `tta_threshold`: from its checkpoint or, where that is gone,
    from its scoring report (`fold_scores`)."""
    path, report_path = fold_sources(cfg, out_dir, k)
    state = (torch.load(path, map_location="cpu", weights_only=True) if path is not None
             else json.loads(report_path.read_text()))
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
                       **{name: mean_std([m[name] for m in per_fold]) for name in per_fold[0]},
                       "pooled_roc_auc": round(float(roc_auc_score(labels, oof)), 4)}
    return report


def other_folds_thresholds(thresholds: list[float]) -> list[float]:
    """For each fold, the median of the other folds' thresholds: one it was not tuned on, as the shipped model's
    (the median of all folds' thresholds) is for new data. Balanced accuracy there is the honest CV estimate."""
    return [float(np.median(thresholds[:k] + thresholds[k + 1:])) for k in range(len(thresholds))]


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


# ---------------------------------------------------------------------------------------------------- CLI

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO_ROOT / "training/configs/atypical.yaml"))
    parser.add_argument("--folds", type=int, help="number of slide-grouped folds (overrides the config)")
    parser.add_argument("--fold", type=int, help="train only this fold")
    parser.add_argument("--out", help="output folder (overrides the config)")
    parser.add_argument("--resume", action="store_true", help="continue from each fold's last.pt")
    parser.add_argument("--full", action="store_true",
                        help="after CV (or from an existing cv_summary.json), train one model on all crops")
    parser.add_argument("--epochs", type=int, help="override the epoch budget")
    parser.add_argument("--full-epochs", type=int,
                        help="with --full: train this many epochs, without waiting for the CV's median best epoch")
    parser.add_argument("--ship", help="write the result to this .pt (+ .json model card), e.g. weights/atypical.pt")
    parser.add_argument("--ship-folds", metavar="PATH",
                        help="fold ensemble: PATH=weights/atypical.pt writes weights/atypical_fold{k}.pt (+ cards)")
    parser.add_argument("--evaluate-tta", action="store_true",
                        help="after CV, score the fold models on their validation folds with and without TTA")
    parser.add_argument("--half", action="store_true", help="store shipped tensors as fp16")
    parser.add_argument("--ship-ema", metavar="H",
                        help="score/ship the moving average with horizon H epochs (one of ema_epochs), or 'none' for "
                             "the raw weights (overrides the config's ship_ema)")
    add_debug_option(parser)
    return parser.parse_args(argv)


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.folds:
        overrides["folds"] = args.folds
    if args.out:
        overrides["out"] = args.out
    if args.epochs:
        overrides["epochs"] = args.epochs
    if args.ship_ema is not None:
        overrides["ship_ema"] = None if args.ship_ema.lower() == "none" else _horizon(args.ship_ema)
    cfg = load_train_config(args.config, overrides)
    if args.fold is not None and not 0 <= args.fold < cfg.folds:
        raise InputError(f"--fold {args.fold}: the config has {cfg.folds} folds (0 to {cfg.folds - 1})")
    ctx = init_distributed()
    if ctx.device.type == "cpu" and cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    out_dir = Path(cfg.out) if Path(cfg.out).is_absolute() else REPO_ROOT / cfg.out
    if args.evaluate_tta and args.fold is not None:
        return evaluate_one_fold(cfg, out_dir, args.fold, ctx)
    summary_path = out_dir / "cv_summary.json"
    skip_cv = (args.full or args.ship_folds or args.evaluate_tta) and summary_path.is_file()
    if args.full and args.full_epochs:
        # the full-data model can train alongside the CV; once the CV is done, the same command with --resume
        # finds its last epoch already trained and only sets the folds' median thresholds
        skip_cv = True
    if not skip_cv:
        cross_validate(cfg, out_dir, ctx, only_fold=args.fold, resume=args.resume)
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    tta_path = out_dir / tta_report_name(cfg)
    tta_report = json.loads(tta_path.read_text()) if tta_path.is_file() and not args.evaluate_tta else None
    if args.evaluate_tta and ctx.main and summary is not None:
        tta_report = out_of_fold(cfg, out_dir)
        tta_path.write_text(json.dumps(tta_report, indent=2))
        print(json.dumps(tta_report, indent=2), flush=True)
    if ctx.world_size > 1:
        dist.barrier()  # the other ranks wait for rank 0's TTA thresholds in the fold checkpoints
    if args.full:
        if summary is None and not args.full_epochs:
            raise InputError("--full needs a finished cross-validation (cv_summary.json) or --full-epochs")
        index, crops, labels = prepare_data(cfg)
        epochs = args.full_epochs or (cfg.epochs if cfg.ship_epoch == "last"
                                      else int(np.median(summary["best_epochs"])))
        result = train_fold(cfg, crops, labels, np.arange(len(labels)), None, out_dir / "full", ctx,
                            resume=args.resume, fixed_epochs=epochs, name="full",
                            meta={"trained_on": "all crops", "epochs": epochs},
                            train_targets=training_targets(cfg, index))
        if ctx.main and summary is None:
            print(f"warning: no cv_summary.json in {out_dir} yet, so {result.checkpoint} keeps threshold 0.5; when the "
                  f"cross-validation is done, rerun with --full --full-epochs {epochs} --resume to set the folds' "
                  "thresholds without training again", file=sys.stderr, flush=True)
        if ctx.main and summary is not None:
            # no validation data: the thresholds are the medians of the folds' (best.pt, final.pt or final_ema*.pt)
            path = out_dir / "full" / full_checkpoint_name(cfg)
            state = torch.load(path, map_location="cpu", weights_only=True)
            folds = [fold_thresholds(cfg, out_dir, k) for k in range(cfg.folds)]
            state["threshold"] = float(np.median([fold["threshold"] for fold in folds]))
            fold_tta = [fold.get("tta_threshold") for fold in folds]
            if all(value is not None for value in fold_tta):  # set by --evaluate-tta
                state["tta_threshold"] = float(np.median(fold_tta))
            save_atomic(state, path)
    if args.ship_folds and ctx.main and summary is not None:
        extra = {"validation_tta": tta_report} if tta_report else {}
        for path in ship_folds(cfg, out_dir, Path(args.ship_folds).parent, Path(args.ship_folds).stem, summary,
                               extra, half=args.half):
            print(f"shipped {path}", flush=True)
    elif args.ship and ctx.main:
        source = (out_dir / "full" / full_checkpoint_name(cfg) if args.full
                  else fold_checkpoint_path(cfg, out_dir, args.fold or 0))
        extra = {"validation_tta": tta_report} if tta_report else {}
        if args.full:
            state = torch.load(source, map_location="cpu", weights_only=True)
            crops = (summary or {}).get("data", {}).get("crops", "the")
            extra["shipped_model"] = (f"one model trained on all {crops} crops for {state['meta'].get('epochs')} "
                                      "epochs (no validation split left); threshold (and tta_threshold, if any) = "
                                      f"median of the folds' validation thresholds at their {cfg.ship_epoch} epoch"
                                      + (f", both for the moving average of the weights over {cfg.ship_ema:g} epochs"
                                         if cfg.ship_ema is not None else "") + " (on "
                                      "TTA-averaged probabilities); the cross-validation numbers estimate its "
                                      "accuracy")
        ship(cfg, source, Path(args.ship), summary, extra, half=args.half)
    if ctx.world_size > 1:
        dist.destroy_process_group()
    return 0


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
    if ctx.world_size > 1:
        dist.destroy_process_group()
    return 0


def _horizon(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InputError(f"--ship-ema {text!r}: expected a horizon in epochs (one of ema_epochs) or 'none'") from None


if __name__ == "__main__":
    raise SystemExit(main())
