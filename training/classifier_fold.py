"""Training one fold of the atypical classifier (or the full-data model): the model, data and loader, loss,
optimizer and moving averages; one epoch; validation metrics and the threshold; `train_fold`, which writes
`best.pt`, `final.pt`, `final_ema{h}.pt`, `metrics.csv` and the resumable `last.pt` into its folder.

The pieces are separate functions so other training recipes (foundation-model probing, LoRA) can reuse them; the
command is training/train_classifier.py.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from sklearn.metrics import roc_auc_score
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, DistributedSampler

from midog.classifier import PLAIN_CROP_PCT, BinaryClassifier, build_classifier, check_resize
from midog.errors import ConfigError
from midog.evaluate.track2 import best_balanced_threshold
from midog.progress import progress_bar, progress_iter
from training.amibr import CropDataset
from training.augment import train_transform
from training.classifier_config import TrainConfig, ema_name
from training.runtime import (Dist, adamw_warmup_cosine, rank0_array, same_model_on_every_rank, save_atomic,
                              seed_everything, write_csv)


# ---------------------------------------------------------------------------------------------------- setup

def build_model(cfg: TrainConfig) -> BinaryClassifier:
    clf = build_classifier(cfg.arch, cfg.input_size, positive=cfg.positive, model_kwargs=cfg.model_kwargs,
                           pretrained=cfg.pretrained)
    if cfg.crop_pct != PLAIN_CROP_PCT:
        check_resize(clf.interpolation, cfg.crop_pct)
        clf.crop_pct = float(cfg.crop_pct)
    return clf


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
    of `cfg.epochs` (`training.runtime.adamw_warmup_cosine`), layer-wise with `cfg.layer_decay`."""
    return adamw_warmup_cosine(model, cfg.lr, cfg.weight_decay, cfg.epochs * steps_per_epoch, cfg.warmup_epochs,
                               steps_per_epoch, min_lr_ratio=0.01, layer_decay=cfg.layer_decay)


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


def predict_with_bar(clf: BinaryClassifier, crops: np.ndarray, tta: bool, batch_size: int, desc: str,
                     tta_views: int = 8) -> np.ndarray:
    """`clf.predict_proba` batch by batch under a progress bar of the crops done (scoring with TTA takes minutes)."""
    out = []
    with progress_bar(len(crops), desc, "crop") as bar:
        for start in range(0, len(crops), batch_size):
            out.append(clf.predict_proba(crops[start:start + batch_size], tta=tta, batch_size=batch_size,
                                         tta_views=tta_views))
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


@dataclass
class _FoldTraining:
    """What one fold trains with (`_start_fold`)."""
    clf: BinaryClassifier
    model: torch.nn.Module
    """`clf.model`, or its DDP wrapper when there are several processes: what the training steps call."""
    loader: DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    emas: dict[float, ModelEmaV3]
    val_set: CropDataset
    """Empty when the fold has no validation crops."""


def train_fold(cfg: TrainConfig, crops: np.ndarray, labels: np.ndarray, train_idx: np.ndarray,
               val_idx: np.ndarray | None, out_dir: Path, ctx: Dist, resume: bool = False,
               fixed_epochs: int | None = None, name: str = "fold", meta: dict[str, Any] | None = None,
               train_targets: np.ndarray | None = None) -> FoldResult:
    """Train on `train_idx`, early-stop on `val_idx`; without `val_idx`, train `fixed_epochs` and keep the last.

    `labels` are the 0/1 labels (validation, class weight); `train_targets` what the loss fits, default `labels`.
    """
    epochs = fixed_epochs if fixed_epochs is not None else cfg.epochs
    run = _start_fold(cfg, crops, labels, train_idx, val_idx, ctx, epochs, train_targets)
    out_dir.mkdir(parents=True, exist_ok=True)  # after the model and optimizer are built: a bad config leaves none
    meta = {**(meta or {}), **({"pretrained": run.clf.meta["pretrained"]} if "pretrained" in run.clf.meta else {})}
    last_path = out_dir / "last.pt"
    state = _resumed_state(cfg, run, last_path, ctx, name) if resume and last_path.is_file() else _fresh_state()
    validated = val_idx is not None
    # with ship_epoch 'last' the full model trains the whole schedule, so every fold does too: no early stopping
    early_stopping = validated and cfg.ship_epoch == "best"
    while _keeps_training(cfg, state, epochs, early_stopping):
        row, improved = _train_and_score_epoch(cfg, run, state, ctx, validated, name)
        if ctx.main:
            _save_epoch(run, state, row, improved, out_dir, meta, name)
    last_threshold = _last_epoch_threshold(state)
    if ctx.main:
        _save_final(run, state, last_threshold, out_dir, meta, validated)
    if ctx.world_size > 1:
        dist.barrier()
    return FoldResult(fold=-1, best_epoch=state["best_epoch"], threshold=state["best_threshold"],
                      metrics=state["best_metrics"], checkpoint=str(out_dir / "best.pt"), last_epoch=state["epoch"],
                      last_threshold=last_threshold)


def _start_fold(cfg: TrainConfig, crops: np.ndarray, labels: np.ndarray, train_idx: np.ndarray,
                val_idx: np.ndarray | None, ctx: Dist, epochs: int, train_targets: np.ndarray | None
                ) -> _FoldTraining:
    """Seeded by `cfg.seed`: the model (DDP-wrapped on several processes), the datasets and training loader, the
    optimizer with its schedule over `epochs`, the loss and the moving averages."""
    seed_everything(cfg.seed)
    clf = build_model(cfg).to(ctx.device)
    train_set, val_set = make_datasets(cfg, crops, labels, train_idx,
                                       val_idx if val_idx is not None else np.zeros(0, dtype=int), train_targets)
    loader = make_train_loader(cfg, train_set, ctx, cfg.seed)
    model: torch.nn.Module = clf.model
    if ctx.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            clf.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    optimizer, scheduler = make_optimizer(dataclasses.replace(cfg, epochs=epochs), clf.model, len(loader))
    loss_fn = make_loss(cfg, labels[train_idx], ctx.device)
    emas = make_emas(cfg, clf.model, len(loader))
    return _FoldTraining(clf, model, loader, optimizer, scheduler, loss_fn, emas, val_set)


def _fresh_state() -> dict[str, Any]:
    """The fold's bookkeeping before its first epoch (saved in `last.pt` after every epoch)."""
    return {"epoch": 0, "best_score": -1.0, "best_epoch": 0, "best_threshold": 0.5, "best_metrics": {},
            "stale": 0, "history": []}


def _resumed_state(cfg: TrainConfig, run: _FoldTraining, last_path: Path, ctx: Dist, name: str) -> dict[str, Any]:
    """Put the weights, optimizer, schedule, moving averages and every RNG back as `last_path` saved them; returns
    the saved bookkeeping."""
    # on the CPU: the RNG states must stay CPU byte tensors (on CUDA, set_rng_state refuses them), and
    # load_state_dict moves the weights and optimizer state to the model's device itself
    saved = torch.load(last_path, map_location="cpu", weights_only=False)
    run.clf.model.load_state_dict(saved["model"], strict=True)
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
    np.random.set_state(saved["numpy_rng"])
    random.setstate(saved["python_rng"])
    run.loader.generator.set_state(saved["loader_rng"])
    for horizon, ema in run.emas.items():
        if horizon not in saved.get("emas", {}):
            raise ConfigError(f"{last_path} has no moving average over {horizon:g} epochs: it was trained with "
                              f"ema_epochs {sorted(saved.get('emas', {}))}, not {cfg.ema_epochs}")
        ema.module.load_state_dict(saved["emas"][horizon], strict=True)
    state: dict[str, Any] = saved["state"]
    if ctx.main:
        print(f"[{name}] resumed after epoch {state['epoch']}", flush=True)
    return state


def _keeps_training(cfg: TrainConfig, state: dict[str, Any], epochs: int, early_stopping: bool) -> bool:
    """Whether another epoch follows: until `epochs`, or with `early_stopping` until `cfg.patience` epochs in a row
    did not improve (never before `cfg.min_epochs`)."""
    return state["epoch"] < epochs and (not early_stopping or state["stale"] < cfg.patience
                                        or state["epoch"] < cfg.min_epochs)


def _train_and_score_epoch(cfg: TrainConfig, run: _FoldTraining, state: dict[str, Any], ctx: Dist,
                           validated: bool, name: str) -> tuple[dict[str, Any], bool]:
    """Train the next epoch, score it on the validation crops if `validated`, and note it in `state`. Returns its
    metrics.csv row and whether it is the best epoch so far (without validation every epoch is)."""
    epoch = state["epoch"] + 1
    if isinstance(run.loader.sampler, DistributedSampler):
        run.loader.sampler.set_epoch(epoch)
    t0 = time.time()
    loss = train_epoch(run.clf, run.model, run.loader, run.optimizer, run.scheduler, run.loss_fn, ctx,
                       desc=f"{name} ep{epoch}", emas=run.emas)
    row: dict[str, Any] = {"epoch": epoch, "train_loss": round(loss, 5),
                           "lr": max(group["lr"] for group in run.optimizer.param_groups)}  # the head's
    if validated:
        threshold, score, metrics = _validate(cfg, run, state, ctx, row)
        improved = _note_score(state, epoch, score, threshold, metrics)
    else:
        improved = True
        state.update(best_epoch=epoch)
    row["seconds"] = round(time.time() - t0, 1)
    state["epoch"] = epoch
    state["history"].append(row)
    return row, improved


def _validate(cfg: TrainConfig, run: _FoldTraining, state: dict[str, Any], ctx: Dist, row: dict[str, Any]
              ) -> tuple[float, float, dict[str, float]]:
    """Score the model, then each moving average, on the validation crops at their own best thresholds; the
    figures go into `row`, the last epoch's thresholds and metrics into `state`. Returns the model's threshold,
    its balanced accuracy there, and its metrics."""
    same_model_on_every_rank(run.clf.model, ctx)
    labels = run.val_set.labels.numpy()
    probs = rank0_array(predict(run.clf, run.val_set, cfg.eval_batch_size), ctx)
    threshold, score = best_threshold(labels, probs)
    metrics = binary_metrics(labels, probs, threshold)
    metrics["balanced_accuracy_at_0.5"] = balanced_accuracy(labels, probs, 0.5)
    row.update({"threshold": round(threshold, 4), **{k: round(v, 4) for k, v in metrics.items()}})
    state.update(last_threshold=threshold, last_metrics=metrics)
    for horizon, ema in run.emas.items():
        ema_probs = rank0_array(predict(averaged(run.clf, ema), run.val_set, cfg.eval_batch_size), ctx)
        ema_threshold, _ = best_threshold(labels, ema_probs)
        ema_metrics = binary_metrics(labels, ema_probs, ema_threshold)
        state.setdefault("ema_last", {})[horizon] = {"threshold": ema_threshold, "metrics": ema_metrics}
        row.update({f"{ema_name(horizon)}_threshold": round(ema_threshold, 4),
                    **{f"{ema_name(horizon)}_{k}": round(v, 4) for k, v in ema_metrics.items()
                       if k in ("balanced_accuracy", "roc_auc")}})
    return threshold, score, metrics


def _note_score(state: dict[str, Any], epoch: int, score: float, threshold: float, metrics: dict[str, float]
                ) -> bool:
    """Keep `epoch` as the best one if its `score` beats the best so far (and reset the patience count), else
    count it as stale. Returns whether it improved."""
    if score > state["best_score"]:
        state.update(best_score=score, best_epoch=epoch, best_threshold=threshold, best_metrics=metrics, stale=0)
        return True
    state["stale"] += 1
    return False


def _save_epoch(run: _FoldTraining, state: dict[str, Any], row: dict[str, Any], improved: bool, out_dir: Path,
                meta: dict[str, Any], name: str) -> None:
    """Rank 0, after each epoch: print its row; `best.pt` if it `improved`; `metrics.csv`; the resumable
    `last.pt`."""
    print(f"[{name}] " + " ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    if improved:
        run.clf.threshold = state["best_threshold"]
        run.clf.save(out_dir / "best.pt", meta={**meta, "epoch": state["epoch"], "val": state["best_metrics"]})
    write_csv(out_dir / "metrics.csv", state["history"])
    _save_resume(out_dir / "last.pt", run, state)


def _save_final(run: _FoldTraining, state: dict[str, Any], last_threshold: float, out_dir: Path,
                meta: dict[str, Any], validated: bool) -> None:
    """Rank 0, at the end of the schedule: `final.pt` with the last epoch's validation threshold (for
    `ship_epoch: last`; a validated fold only), and each moving average, `final_ema{h}.pt` (`ema{h}.pt` without
    validation) at its own last threshold."""
    if validated:
        run.clf.threshold = last_threshold
        run.clf.save(out_dir / "final.pt", meta={**meta, "epoch": state["epoch"],
                                                  "val": state.get("last_metrics") or state["history"][-1]})
    for horizon, ema in run.emas.items():
        scored = state.get("ema_last", {}).get(horizon, {"threshold": 0.5, "metrics": {}})
        ema_clf = averaged(run.clf, ema)
        ema_clf.threshold = scored["threshold"]
        ema_clf.save(out_dir / (f"final_{ema_name(horizon)}.pt" if validated else f"{ema_name(horizon)}.pt"),
                     meta={**meta, "epoch": state["epoch"], "ema_epochs": horizon, "ema_decay": ema.decay,
                           "val": scored["metrics"]})


def _last_epoch_threshold(state: dict[str, Any]) -> float:
    if "last_threshold" in state:
        return float(state["last_threshold"])
    rows = [row for row in state["history"] if "threshold" in row]  # runs saved before it was kept exactly
    return float(rows[-1]["threshold"]) if rows else 0.5


def averaged(clf: BinaryClassifier, ema: ModelEmaV3) -> BinaryClassifier:
    """`clf` (its preprocessing, threshold, metadata) with the moving-average weights of `ema`."""
    return dataclasses.replace(clf, model=ema.module, meta=dict(clf.meta))


def _save_resume(path: Path, run: _FoldTraining, state: dict[str, Any]) -> None:
    """`last.pt`: the weights, moving averages, optimizer, schedule, every RNG and the bookkeeping."""
    save_atomic({"model": run.clf.model.state_dict(),
                 "emas": {h: ema.module.state_dict() for h, ema in run.emas.items()},
                 "optimizer": run.optimizer.state_dict(),
                 "scheduler": run.scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                 "numpy_rng": np.random.get_state(), "python_rng": random.getstate(),
                 "loader_rng": run.loader.generator.get_state(), "state": state}, path)
