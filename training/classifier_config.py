"""The atypical classifier's training config (`TrainConfig`, read from YAML) and the names of the files a run
writes under its output folder: the fold checkpoint that ships, the full-data one, the TTA reports.

Shared by the training of one fold (training/classifier_fold.py), the cross-validation (training/classifier_cv.py)
and shipping (training/classifier_ship.py); the command is training/train_classifier.py.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from midog.config import TTA_VIEW_COUNTS
from midog.errors import ConfigError
from training.amibr import FOLD_SPLITS
from training.augment import AugmentConfig
from training.config_file import load_training_config
from training.runtime import REPO_ROOT


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
    layer_decay: float | None = None
    """Layer-wise learning-rate decay for fine-tuning a pretrained timm backbone: the head learns at `lr`, each
    layer group below it (timm's `group_matcher`: blocks, then the stem) at `layer_decay` times the one above
    (`timm.optim.param_groups_layer_decay`). None: one learning rate for every layer."""
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
    tta_views: int = 8
    """Views `evaluate-tta` averages: 8 (every rotation and reflection) or 4 (the rotations), as the pipeline's
    `atypical.tta_views` can run a member. The report records it. Score other views in a copy of the run's folds
    (`--out COPY`): the report and the checkpoints' `tta_threshold` are rewritten."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    out: str = "runs/atypical"

    def __post_init__(self) -> None:
        # checked here, not where it is used: a misspelt value would otherwise train without early stopping
        if self.ship_epoch not in SHIP_EPOCH_CHECKPOINTS:
            raise ConfigError(f"ship_epoch must be 'best' or 'last', got {self.ship_epoch!r}")
        if self.tta_views not in TTA_VIEW_COUNTS:
            raise ConfigError(f"tta_views must be one of {TTA_VIEW_COUNTS}, got {self.tta_views!r}")
        if self.split not in FOLD_SPLITS:
            raise ConfigError(f"split must be one of {FOLD_SPLITS}, got {self.split!r}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ConfigError(f"layer_decay must be in (0, 1] (or null for none), got {self.layer_decay!r}")
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


def add_split_options(parser: argparse.ArgumentParser) -> None:
    """`--folds` and `--split`, the fold layout's command-line overrides (`split_overrides`): the same options
    wherever a command trains or scores the folds of a config, e.g. leave one source out with the config as it is."""
    parser.add_argument("--folds", type=int, help="number of folds (overrides the config)")
    parser.add_argument("--split", choices=FOLD_SPLITS,
                        help="how crops are split into folds (overrides the config): 'dataset' leaves one source "
                             "dataset out per fold, with --folds the number of datasets (AMi-Br: 2)")


def split_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config values `add_split_options`' options set."""
    return {key: value for key, value in (("folds", args.folds), ("split", args.split)) if value}


def resolve_data_root(cfg: TrainConfig) -> Path:
    root = Path(cfg.data_root)
    return root if root.is_absolute() else (REPO_ROOT / root)


def ema_name(horizon: float) -> str:
    return f"ema{horizon:g}"


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


def resolve_out_dir(cfg: TrainConfig) -> Path:
    """The run's output folder `cfg.out`; a relative path is from the repo root."""
    return Path(cfg.out) if Path(cfg.out).is_absolute() else REPO_ROOT / cfg.out
