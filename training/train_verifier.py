"""Train the Track 1 verifier: a timm classifier (ConvNeXt-Tiny by default) on 64×64 candidate crops.

    python -m training.train_verifier --data DIR --config training/configs/verifier.yaml --out weights/verifier.pt
                                      [--run-dir runs/verifier] [--epochs N] [--arch NAME] [--resume]
                                      [--set KEY=VALUE ...]      # any config value, e.g. --set input_size=112
    torchrun --nproc_per_node 4 -m training.train_verifier ...      # DDP, one process per GPU

Data layout (written by `training.verifier_data`, or by hand):

    DIR/train/mitotic_figure/*.png     positives
    DIR/train/<any other name>/*.png   negatives (hard_negative, false_positive, ...)
    DIR/val/...                        the same; early stopping and the decision threshold use it

Loss: focal (α 1 for mitoses, 1.5 for the rest, γ 2) + λ · supervised contrastive (τ 0.2, λ 1) on the
embeddings of a small projection head that exists only during training (`VerifierNet`). Augmentation: flips,
±15° rotation, an optional Gaussian blur (`augment.blur_p`), ColorJitter 0.2/0.2/0.1, RandAugment (3 ops,
magnitude 5), random erasing (p 0.5, 2–15 % area), mixup (Beta(0.2, 0.2)). AdamW 3e-4 with a per-step cosine to
1e-6, weight decay 1e-5, early stopping on the validation F1 (at its best threshold) with patience 60.

Outputs: `--out` is the best checkpoint in `midog.classifier` format (only the timm model's weights; loads with
`midog.classifier.load_classifier`), with its F1-optimal validation threshold and a model card (`.json`) beside it;
the run folder holds `metrics.csv` (one row per epoch) and `last.pt` (for `--resume`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2

from midog.classifier import BinaryClassifier, build_classifier
from midog.cli import OneLineArgumentParser, add_debug_option, add_quiet_option, entry_point, read_json_file
from midog.errors import InputError
from midog.progress import progress_bar, progress_iter
from midog.weights import DEFAULT_PIXEL_SIZE_UM, write_model_card
from training.augment import HEDJitter, blur_sigma_range, random_blur
from training.config_file import add_set_option, load_training_config, parse_set_pairs
from training.losses import HybridLossConfig, focal_loss, supcon_loss
from training.runtime import (REPO_ROOT, Dist, adamw_warmup_cosine, git_commit, init_distributed, rank0_array,
                              same_model_on_every_rank, save_atomic, seed_everything, write_csv)

POSITIVE_FOLDER = "mitotic_figure"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
TISSUE_GREY = (200, 170, 200)
"""Fill for rotation corners and erased patches: a tissue-like colour rather than black, which H&E never shows."""


# ---------------------------------------------------------------------------------------------------- config

@dataclass
class VerifierAugmentConfig:
    hflip: float = 0.5
    vflip: float = 0.5
    rotation: float = 15.0
    """Random rotation in [-rotation, +rotation] degrees."""
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.1
    hue: float = 0.0
    hed_sigma: float = 0.0
    """Stain augmentation in haematoxylin-eosin optical-density space (`training.augment.HEDJitter`, Tellez et al.
    2018): each stain's density scaled by 1 ± sigma and shifted by ± sigma; 0 turns it off."""
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 1.5)
    """Gaussian blur of σ ~ U(blur_sigma) px of the crop as read (`training.augment.random_blur`) with probability
    blur_p: slides and scanners differ in focus (docs/track1-fields.md, candidate Z); 0 turns it off."""
    randaugment_ops: int = 3
    """RandAugment: operations per image (0 turns it off)."""
    randaugment_magnitude: int = 5
    erase_p: float = 0.5
    erase_scale: tuple[float, float] = (0.02, 0.15)
    """Random erasing: fraction of the crop's area."""
    mixup_alpha: float = 0.2
    """Mixup λ ~ Beta(α, α) per batch; 0 turns it off."""

    def __post_init__(self) -> None:
        self.blur_sigma = blur_sigma_range(self.blur_sigma)


@dataclass
class VerifierTrainConfig:
    arch: str = "convnext_tiny"
    """Any timm model name (created with pretrained=False)."""
    input_size: int = 64
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None
    """Start from pretrained weights instead of a random init: a `midog.pretrained` registry name (for example
    "efficientnet_lite0.imagenet", with arch tf_efficientnet_lite0) or a local state-dict file with timm key names;
    read from disk, never downloaded (docs/pretrained.md). None: trained from scratch."""
    pixel_size_um: float = DEFAULT_PIXEL_SIZE_UM
    """µm/px of the training crops (`training.prepare_fields --pixel-size`; AMi-Br and MIDOG++: 0.25). Stored in
    the checkpoint: the pipeline cuts candidates at this scale (`midog.resampling`)."""
    projection_dim: int = 128
    """Output size of the training-only projection head that feeds the contrastive loss."""
    loss: HybridLossConfig = field(default_factory=HybridLossConfig)
    augment: VerifierAugmentConfig = field(default_factory=VerifierAugmentConfig)
    epochs: int = 300
    patience: int = 60
    """Stop after this many epochs without a better validation F1."""
    min_epochs: int = 1
    max_steps: int = 0
    """Stop after this many optimizer steps in total (0 = no limit); for smoke tests."""
    batch_size: int = 128
    negatives_per_epoch: int = 0
    """Each epoch sees every positive and a fresh seeded draw of this many negatives (0 = every negative): real
    fields give ~35 false positives per mitosis, and a draw keeps an epoch short while all of them are seen over
    the run."""
    eval_batch_size: int = 512
    lr: float = 3e-4
    min_lr: float = 1e-6
    weight_decay: float = 1e-5
    warmup_epochs: float = 0.0
    seed: int = 0
    num_threads: int = 1
    """CPU threads for torch (0 = torch default); ignored on GPU."""
    num_workers: int = 0
    amp: bool = True
    """bfloat16 autocast on CUDA."""
    run_dir: str = "runs/verifier"


def load_verifier_config(path: str | os.PathLike[str] | None,
                         overrides: dict[str, Any] | None = None) -> VerifierTrainConfig:
    """YAML (partial is fine) then `overrides`; an unknown key or a bad value is a ConfigError, not ignored."""
    cfg = load_training_config(path, VerifierTrainConfig, overrides)
    cfg.augment.erase_scale = tuple(cfg.augment.erase_scale)
    return cfg


# ---------------------------------------------------------------------------------------------------- data

def scan_split(root: Path, split: str) -> tuple[list[Path], np.ndarray, dict[str, int]]:
    """Files and labels of `root/split/<class>/*`: 1 for the `mitotic_figure` folder, 0 for every other folder."""
    folder = root / split
    if not folder.is_dir():
        raise InputError(f"verifier data has no '{split}' folder: {folder}")
    paths: list[Path] = []
    labels: list[int] = []
    counts: dict[str, int] = {}
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        counts[class_dir.name] = len(files)
        paths += files
        labels += [int(class_dir.name == POSITIVE_FOLDER)] * len(files)
    labels_arr = np.asarray(labels, dtype=np.int64)
    if not paths:
        raise InputError(f"no crops under {folder} (expected {folder}/{POSITIVE_FOLDER}/*.png and negatives)")
    if labels_arr.min() == labels_arr.max():
        kind = "positive" if labels_arr[0] == 1 else "negative"
        raise InputError(f"{folder} holds only {kind} crops; need '{POSITIVE_FOLDER}' and at least one other folder")
    return paths, labels_arr, counts


def read_crop(path: Path, size: int) -> torch.Tensor:
    """A crop file → uint8 (3, size, size), resized (antialiased) when stored at another size."""
    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read crop {path}: {err}") from None
    tensor = torch.from_numpy(rgb.copy()).permute(2, 0, 1)
    if tensor.shape[-2:] != (size, size):
        tensor = v2.functional.resize(tensor, [size, size], antialias=True)
    return tensor


class CropFolder(Dataset):
    """Crops read from disk on demand (any number of them), augmented as uint8 CHW tensors."""

    def __init__(self, paths: list[Path], labels: np.ndarray, size: int, transform: Any = None) -> None:
        self.paths = paths
        self.labels = torch.as_tensor(labels, dtype=torch.float32)
        self.size = size
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = read_crop(self.paths[i], self.size)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[i]


def train_transform(cfg: VerifierAugmentConfig) -> v2.Compose:
    """uint8 (3, S, S) → augmented uint8 (3, S, S). Normalisation happens later, in `BinaryClassifier.preprocess`."""
    steps: list[torch.nn.Module] = []
    if cfg.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(cfg.hflip))
    if cfg.vflip > 0:
        steps.append(v2.RandomVerticalFlip(cfg.vflip))
    if cfg.rotation > 0:
        steps.append(v2.RandomRotation(cfg.rotation, interpolation=v2.InterpolationMode.BILINEAR, fill=TISSUE_GREY))
    if cfg.blur_p > 0:
        steps.append(random_blur(cfg.blur_p, cfg.blur_sigma))
    if cfg.hed_sigma > 0:
        steps.append(HEDJitter(cfg.hed_sigma))
    if max(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue) > 0:
        steps.append(v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue))
    if cfg.randaugment_ops > 0:
        steps.append(v2.RandAugment(num_ops=cfg.randaugment_ops, magnitude=cfg.randaugment_magnitude,
                                    fill=TISSUE_GREY))
    if cfg.erase_p > 0:
        steps.append(v2.RandomErasing(p=cfg.erase_p, scale=tuple(cfg.erase_scale), value=list(TISSUE_GREY)))
    return v2.Compose(steps or [v2.Identity()])  # Compose refuses an empty list


# ---------------------------------------------------------------------------------------------------- model

class VerifierNet(torch.nn.Module):
    """The timm classifier plus a projection head used only for the contrastive loss during training.

    forward → (logits (N,), projected embeddings (N, projection_dim)). Only `classifier` is saved: the head is
    thrown away, so the shipped checkpoint is a plain `midog.classifier` model.
    """

    def __init__(self, classifier: torch.nn.Module, projection_dim: int) -> None:
        super().__init__()
        self.classifier = classifier
        width = int(classifier.num_features)
        self.projection = torch.nn.Sequential(
            torch.nn.Linear(width, width), torch.nn.ReLU(inplace=True), torch.nn.Linear(width, projection_dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.classifier.forward_features(x)
        logits = self.classifier.forward_head(features).view(-1)
        pre_logits = self.classifier.forward_head(features, pre_logits=True).flatten(1)
        return logits, self.projection(pre_logits)


# ---------------------------------------------------------------------------------------------------- setup

def make_optimizer(cfg: VerifierTrainConfig, net: torch.nn.Module, total_steps: int, steps_per_epoch: int
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW (no decay on norms and biases), optional linear warmup, then per-step cosine from lr to min_lr at
    `total_steps` (`training.runtime.adamw_warmup_cosine`)."""
    return adamw_warmup_cosine(net, cfg.lr, cfg.weight_decay, total_steps, cfg.warmup_epochs, steps_per_epoch,
                               min_lr_ratio=cfg.min_lr / cfg.lr)


# ---------------------------------------------------------------------------------------------------- metrics

def f1_threshold(labels: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """The threshold (one of the scores; predict positive when P ≥ it) with the best F1, and that F1."""
    if labels.sum() == 0:
        return 0.5, 0.0
    precision, recall, thresholds = precision_recall_curve(labels, probs)
    f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
    i = int(np.argmax(f1))
    return float(thresholds[i]), float(f1[i])


def binary_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:
    pred = probs >= threshold
    tp = int((pred & (labels == 1)).sum())
    fp = int((pred & (labels == 0)).sum())
    fn = int((~pred & (labels == 1)).sum())
    both = labels.min() != labels.max()
    return {
        "f1": 2 * tp / max(2 * tp + fp + fn, 1),
        "precision": tp / max(tp + fp, 1),
        "recall": tp / max(tp + fn, 1),
        "f1_at_0.5": _f1(labels, probs >= 0.5),
        "roc_auc": float(roc_auc_score(labels, probs)) if both else float("nan"),
        "average_precision": float(average_precision_score(labels, probs)) if both else float("nan"),
    }


def _f1(labels: np.ndarray, pred: np.ndarray) -> float:
    tp = int((pred & (labels == 1)).sum())
    return 2 * tp / max(int(pred.sum()) + int(labels.sum()), 1)


# ---------------------------------------------------------------------------------------------------- loops

def mixup(batch: torch.Tensor, targets: torch.Tensor, alpha: float, generator: np.random.Generator
          ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mix each sample with a random partner: returns the mixed batch, the partners' targets, and λ."""
    if alpha <= 0 or len(batch) < 2:
        return batch, targets, 1.0
    lam = float(generator.beta(alpha, alpha))
    perm = torch.randperm(len(batch), device=batch.device)
    return lam * batch + (1 - lam) * batch[perm], targets[perm], lam


def train_epoch(clf: BinaryClassifier, net: torch.nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler, cfg: VerifierTrainConfig, ctx: Dist,
                rng: np.random.Generator, steps_left: int | None, desc: str) -> tuple[dict[str, float], int]:
    """One pass (or `steps_left` steps) over `loader`; `net` is a VerifierNet or its DDP wrapper.

    With mixup, focal loss is λ·FL(y) + (1-λ)·FL(y_partner); the contrastive term uses the label of the sample
    that dominates the mix. Returns the mean losses and the number of steps taken.
    """
    net.train()
    sums = {"loss": 0.0, "focal": 0.0, "supcon": 0.0}
    count = steps = 0
    use_amp = cfg.amp and ctx.device.type == "cuda"
    steps_total = len(loader) if steps_left is None else min(len(loader), steps_left)
    bar = progress_iter(loader, steps_total, desc, "batch", ctx.main)
    for images, targets in bar:
        if steps_left is not None and steps >= steps_left:
            break
        batch = clf.preprocess(images.permute(0, 2, 3, 1))  # uint8 NHWC → resized, normalised, on device
        targets = targets.to(ctx.device, non_blocking=True)
        batch, partner, lam = mixup(batch, targets, cfg.augment.mixup_alpha, rng)
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits, embeddings = net(batch)
        logits, embeddings = logits.float(), embeddings.float()
        lc = cfg.loss
        focal = lam * focal_loss(logits, targets, lc.alpha_pos, lc.alpha_neg, lc.gamma)
        if lam < 1.0:
            focal = focal + (1 - lam) * focal_loss(logits, partner, lc.alpha_pos, lc.alpha_neg, lc.gamma)
        dominant = targets if lam >= 0.5 else partner
        supcon = supcon_loss(embeddings, dominant.long(), lc.temperature) if lc.supcon_weight > 0 \
            else logits.new_zeros(())
        loss = focal + lc.supcon_weight * supcon
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        n = len(targets)
        sums["loss"] += loss.item() * n
        sums["focal"] += focal.item() * n
        sums["supcon"] += supcon.item() * n
        count += n
        steps += 1
        bar.set_postfix(loss=f"{sums['loss'] / count:.4f}")
    return {k: v / max(count, 1) for k, v in sums.items()}, steps


@torch.inference_mode()
def predict_folder(clf: BinaryClassifier, dataset: CropFolder, batch_size: int, desc: str = "validation",
                   progress: bool = True) -> np.ndarray:
    """P(mitotic figure) of every crop in `dataset`, in order (read in chunks, never all at once), under a bar of
    `desc` counting crops (`progress` False: none)."""
    out = []
    with progress_bar(len(dataset), desc, "crop", progress) as bar:
        for start in range(0, len(dataset), batch_size):
            crops = torch.stack([read_crop(p, dataset.size) for p in dataset.paths[start:start + batch_size]])
            out.append(clf.predict_proba(crops.permute(0, 2, 3, 1), batch_size=batch_size))
            bar.update(len(crops))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


# ---------------------------------------------------------------------------------------------------- training

@dataclass
class TrainResult:
    checkpoint: str
    best_epoch: int
    threshold: float
    metrics: dict[str, float]
    steps: int


class NegativeDraw(torch.utils.data.Sampler):
    """Every positive and `negatives` negatives drawn afresh each epoch (seed + epoch, the same on every rank),
    shuffled, padded to a multiple of the world size and dealt out by rank as `DistributedSampler` does."""

    def __init__(self, labels: np.ndarray, negatives: int, seed: int, world_size: int = 1, rank: int = 0) -> None:
        self.positives = np.flatnonzero(np.asarray(labels) == 1)
        self.negatives = np.flatnonzero(np.asarray(labels) != 1)
        self.count = min(int(negatives), len(self.negatives))
        self.seed, self.world_size, self.rank, self.epoch = seed, world_size, rank, 0
        self.total = math.ceil((len(self.positives) + self.count) / world_size) * world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.total // self.world_size

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        chosen = np.concatenate([self.positives, rng.choice(self.negatives, self.count, replace=False)])
        order = rng.permutation(chosen)
        order = np.concatenate([order, order[:self.total - len(order)]])
        return iter(order[self.rank::self.world_size].tolist())


def train(cfg: VerifierTrainConfig, data: Path, out: Path, ctx: Dist | None = None, resume: bool = False,
          card_extra: dict[str, Any] | None = None) -> TrainResult:
    """Train on `data/train`, early-stop on `data/val`, write the best model to `out` (+ model card)."""
    ctx = ctx or Dist()
    seed_everything(cfg.seed)
    train_paths, train_labels, train_counts = scan_split(data, "train")
    val_paths, val_labels, val_counts = scan_split(data, "val")
    run_dir = Path(cfg.run_dir) if Path(cfg.run_dir).is_absolute() else REPO_ROOT / cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)

    clf = build_classifier(cfg.arch, cfg.input_size, positive="mitotic figure", model_kwargs=cfg.model_kwargs,
                           pretrained=cfg.pretrained)
    clf.pixel_size_um = float(cfg.pixel_size_um)
    net = VerifierNet(clf.model, cfg.projection_dim).to(ctx.device)
    model: torch.nn.Module = net
    if ctx.world_size > 1:
        # without the contrastive term the projection head gets no gradient, which DDP must be told about
        model = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            find_unused_parameters=cfg.loss.supcon_weight == 0)

    train_set = CropFolder(train_paths, train_labels, cfg.input_size, train_transform(cfg.augment))
    val_set = CropFolder(val_paths, val_labels, cfg.input_size)
    generator = torch.Generator().manual_seed(cfg.seed)
    if cfg.negatives_per_epoch > 0:
        sampler = NegativeDraw(train_labels, cfg.negatives_per_epoch, cfg.seed, ctx.world_size, ctx.rank)
    else:
        sampler = DistributedSampler(train_set, ctx.world_size, ctx.rank, shuffle=True, seed=cfg.seed) \
            if ctx.world_size > 1 else None
    per_rank = len(sampler) if sampler is not None else len(train_set)  # a DistributedSampler pads to this
    loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                        drop_last=per_rank > cfg.batch_size, num_workers=cfg.num_workers, generator=generator,
                        pin_memory=ctx.device.type == "cuda", persistent_workers=cfg.num_workers > 0)
    total_steps = cfg.epochs * len(loader)
    if cfg.max_steps > 0:
        total_steps = min(total_steps, cfg.max_steps)
    optimizer, scheduler = make_optimizer(cfg, net, total_steps, len(loader))
    rng = np.random.default_rng(cfg.seed + ctx.rank)

    last_path, csv_path = run_dir / "last.pt", run_dir / "metrics.csv"
    state: dict[str, Any] = {"epoch": 0, "steps": 0, "best_f1": -1.0, "best_epoch": 0, "best_threshold": 0.5,
                             "best_metrics": {}, "stale": 0, "history": []}
    if resume and last_path.is_file():
        saved = torch.load(last_path, map_location=ctx.device, weights_only=False)
        net.load_state_dict(saved["net"], strict=True)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["torch_rng"])
        generator.set_state(saved["loader_rng"])
        rng = np.random.default_rng()
        rng.bit_generator.state = saved["numpy_rng"]
        state = saved["state"]
        if ctx.main:
            print(f"[verifier] resumed after epoch {state['epoch']}", flush=True)

    data_card = {"folder": data.name, "train": train_counts, "val": val_counts, "positive_folder": POSITIVE_FOLDER}
    while state["epoch"] < cfg.epochs and (state["stale"] < cfg.patience or state["epoch"] < cfg.min_epochs):
        if cfg.max_steps > 0 and state["steps"] >= cfg.max_steps:
            break
        epoch = state["epoch"] + 1
        if sampler is not None:
            sampler.set_epoch(epoch)
        t0 = time.time()
        steps_left = cfg.max_steps - state["steps"] if cfg.max_steps > 0 else None
        losses, steps = train_epoch(clf, model, loader, optimizer, scheduler, cfg, ctx, rng, steps_left,
                                    desc=f"verifier ep{epoch}")
        state["steps"] += steps
        same_model_on_every_rank(net, ctx)
        probs = predict_folder(clf, val_set, cfg.eval_batch_size, f"verifier val ep{epoch}", ctx.main)
        probs = rank0_array(probs, ctx)
        threshold, f1 = f1_threshold(val_labels, probs)
        metrics = binary_metrics(val_labels, probs, threshold)
        row: dict[str, Any] = {"epoch": epoch, "steps": state["steps"], "lr": optimizer.param_groups[0]["lr"],
                               **{f"train_{k}": round(v, 5) for k, v in losses.items()},
                               "threshold": round(threshold, 4), **{k: round(v, 4) for k, v in metrics.items()},
                               "seconds": round(time.time() - t0, 1)}
        improved = f1 > state["best_f1"]
        if improved:
            state.update(best_f1=f1, best_epoch=epoch, best_threshold=threshold, best_metrics=metrics, stale=0)
        else:
            state["stale"] += 1
        state["epoch"] = epoch
        state["history"].append(row)
        if ctx.main:
            print("[verifier] " + " ".join(f"{k}={v}" for k, v in row.items()), flush=True)
            if improved:
                clf.threshold = threshold
                clf.save(out, meta={"epoch": epoch, "val": metrics, "data": data_card})
                write_model_card(out, model_card(cfg, clf, state, data_card, card_extra))
            write_csv(csv_path, state["history"])
            _save_resume(last_path, net, optimizer, scheduler, generator, rng, state)
    if ctx.main and out.is_file():  # final card: the whole history is known now
        write_model_card(out, model_card(cfg, clf, state, data_card, card_extra))
    if ctx.world_size > 1:
        dist.barrier()
    return TrainResult(checkpoint=str(out), best_epoch=state["best_epoch"], threshold=state["best_threshold"],
                       metrics=state["best_metrics"], steps=state["steps"])


def _save_resume(path: Path, net: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, generator: torch.Generator,
                 rng: np.random.Generator, state: dict[str, Any]) -> None:
    save_atomic({"net": net.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "torch_rng": torch.get_rng_state(), "loader_rng": generator.get_state(),
                 "numpy_rng": rng.bit_generator.state, "state": state}, path)


def model_card(cfg: VerifierTrainConfig, clf: BinaryClassifier, state: dict[str, Any], data: dict[str, Any],
               extra: dict[str, Any] | None) -> dict[str, Any]:
    card = {
        "task": "Track 1 verifier: candidate crop -> P(mitotic figure)",
        "architecture": clf.arch, "model_kwargs": clf.model_kwargs, "input_size": clf.input_size,
        "threshold": float(state["best_threshold"]), "positive": clf.positive,
        "pixel_size_um": float(clf.pixel_size_um),
        "pretrained": clf.meta.get("pretrained") or "none (trained from scratch)",
        "loss": f"focal(alpha_pos={cfg.loss.alpha_pos}, alpha_neg={cfg.loss.alpha_neg}, gamma={cfg.loss.gamma})"
                f" + {cfg.loss.supcon_weight} * supcon(temperature={cfg.loss.temperature})",
        "training_data": data,
        "best_epoch": state["best_epoch"], "epochs_run": state["epoch"], "steps": state["steps"],
        "validation": {k: round(float(v), 4) for k, v in state["best_metrics"].items()},
        "training_config": dataclasses.asdict(cfg),
        "git_commit": git_commit(),
    }
    card.update(extra or {})
    return card


# ---------------------------------------------------------------------------------------------------- CLI

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path, help="folder with train/ and val/ crop folders")
    parser.add_argument("--config", default=str(REPO_ROOT / "training/configs/verifier.yaml"))
    parser.add_argument("--out", default="weights/verifier.pt", type=Path, help="best checkpoint (+ .json card)")
    parser.add_argument("--run-dir", help="metrics.csv and last.pt (overrides the config)")
    parser.add_argument("--epochs", type=int, help="override the epoch budget")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (smoke tests)")
    parser.add_argument("--arch", help="timm model name (overrides the config)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    parser.add_argument("--card-extra", type=Path, help="JSON object merged into the model card (data notes)")
    add_set_option(parser)
    add_debug_option(parser)
    add_quiet_option(parser)
    return parser.parse_args(argv)


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config values the command line sets: its named options, then the `--set` pairs."""
    named = {"run_dir": args.run_dir, "epochs": args.epochs, "max_steps": args.max_steps, "arch": args.arch,
             "batch_size": args.batch_size}
    return {key: value for key, value in named.items() if value is not None} | parse_set_pairs(args.set)


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_verifier_config(args.config, config_overrides(args))
    extra = read_json_file(args.card_extra, "--card-extra") if args.card_extra else None
    ctx = init_distributed()
    if ctx.device.type == "cpu" and cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    result = train(cfg, args.data, args.out, ctx, resume=args.resume, card_extra=extra)
    if ctx.main:
        print(json.dumps(dataclasses.asdict(result), indent=2), flush=True)
    if ctx.world_size > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
