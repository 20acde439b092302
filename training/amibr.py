"""The AMi-Br atypical-mitosis dataset: index of the folder + CSV, slide-grouped folds, a crop Dataset.

Layout (as published): `<root>/Atypical/*.png`, `<root>/Normal/*.png` (128x128 RGB crops centred on a mitotic
figure) and `<root>/amibr_train_split.csv` with one row per crop (`slide`, `dataset`, `dataset_uid` = file name,
`final_label`, three experts' `expert{1,2,3}_atypical` votes). Folds are grouped by slide: crops of one slide are
strongly correlated (same scanner, stain, tumour), so a patch-level split would leak and overstate accuracy.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from sklearn.model_selection import StratifiedGroupKFold
from torch.utils.data import Dataset

from midog.errors import ConfigError, InputError

CSV_NAME = "amibr_train_split.csv"
CLASS_FOLDERS = {"Atypical": 1, "Normal": 0}
VOTE_COLUMNS = ("expert1_atypical", "expert2_atypical", "expert3_atypical")


def load_index(root: str | os.PathLike[str], csv: str | os.PathLike[str] | None = None) -> pd.DataFrame:
    """One row per crop: `path`, `label` (1 = atypical), `group` (dataset/slide), `dataset`, `slide`, `votes`.

    Every CSV row must have its image in the folder of its `final_label`; a missing file is an InputError.
    """
    root = Path(root)
    csv_path = Path(csv) if csv is not None else root / CSV_NAME
    if not csv_path.is_file():
        raise InputError(f"AMi-Br split CSV not found: {csv_path}")
    table = pd.read_csv(csv_path)
    missing_cols = {"slide", "dataset", "dataset_uid", "final_label"} - set(table.columns)
    if missing_cols:
        raise InputError(f"{csv_path} lacks columns {sorted(missing_cols)}")
    unknown = set(table["final_label"]) - set(CLASS_FOLDERS)
    if unknown:
        raise InputError(f"{csv_path} has unknown labels {sorted(unknown)}; expected {sorted(CLASS_FOLDERS)}")
    paths = [root / label / name for label, name in zip(table["final_label"], table["dataset_uid"])]
    absent = [p for p in paths if not p.is_file()]
    if absent:
        raise InputError(f"{len(absent)} crops listed in {csv_path.name} are missing, e.g. {absent[0]}")
    votes = table[list(VOTE_COLUMNS)].astype(int).sum(axis=1) if set(VOTE_COLUMNS) <= set(table.columns) else -1
    return pd.DataFrame({
        "path": [str(p) for p in paths],
        "label": table["final_label"].map(CLASS_FOLDERS).astype(int).to_numpy(),
        "group": (table["dataset"].astype(str) + "/" + table["slide"].astype(str)).to_numpy(),
        "dataset": table["dataset"].astype(str).to_numpy(),
        "slide": table["slide"].astype(str).to_numpy(),
        "votes": votes,
    })


def slide_folds(index: pd.DataFrame, n_folds: int, seed: int = 0) -> np.ndarray:
    """Fold number (0..n_folds-1) of every row: stratified by label, grouped by slide (no slide in two folds)."""
    if n_folds < 2:
        raise ConfigError(f"need at least 2 folds, got {n_folds}")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold = np.full(len(index), -1, dtype=int)
    for k, (_, val) in enumerate(splitter.split(np.zeros(len(index)), index["label"], index["group"])):
        fold[val] = k
    return fold


def dataset_folds(index: pd.DataFrame) -> np.ndarray:
    """Leave-one-dataset-out folds: fold k holds every crop of the k-th source dataset (sorted by name; AMi-Br:
    0 = MIDOG21, 1 = TUPAC16). Training on one source and validating on another estimates how the model does on a
    domain it never saw (other scanners, labs, tumour types), which slide folds mixing both sources cannot."""
    names = sorted(set(index["dataset"]))
    if len(names) < 2:
        raise ConfigError(f"leave-one-dataset-out needs at least 2 source datasets, got {names}")
    return index["dataset"].map({name: k for k, name in enumerate(names)}).to_numpy(dtype=int)


FOLD_SPLITS = ("slide", "dataset")


def assign_folds(index: pd.DataFrame, split: str, n_folds: int, seed: int = 0) -> np.ndarray:
    """Fold number of every row: `split` 'slide' (slide_folds) or 'dataset' (dataset_folds, one fold per source,
    so `n_folds` must equal the number of datasets)."""
    if split == "slide":
        return slide_folds(index, n_folds, seed)
    if split == "dataset":
        fold = dataset_folds(index)
        if fold.max() + 1 != n_folds:
            raise ConfigError(f"split 'dataset' makes one fold per source dataset ({fold.max() + 1}), "
                             f"but folds is {n_folds}")
        return fold
    raise ConfigError(f"split must be one of {FOLD_SPLITS}, got {split!r}")


def load_crops(paths: list[str] | pd.Series) -> np.ndarray:
    """All crops as one uint8 (N, H, W, 3) RGB array; they must share one size (AMi-Br: 128x128)."""
    crops = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    sizes = {c.shape for c in crops}
    if len(sizes) > 1:
        raise InputError(f"crops differ in size: {sorted(sizes)[:3]}")
    return np.stack(crops) if crops else np.zeros((0, 0, 0, 3), dtype=np.uint8)


class CropDataset(Dataset):
    """uint8 RGB crops held in memory → (uint8 CHW tensor after `transform`, float label)."""

    def __init__(self, crops: np.ndarray, labels: np.ndarray, transform=None) -> None:
        if len(crops) != len(labels):
            raise ValueError(f"{len(crops)} crops but {len(labels)} labels")
        self.crops = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2)  # view, no copy
        self.labels = torch.tensor(np.asarray(labels), dtype=torch.float32)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.crops[i]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[i]
