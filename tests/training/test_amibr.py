"""AMi-Br index and slide-grouped folds: on the real split CSV (skipped when ../shared is absent) and generated data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from midog.errors import InputError
from tests.conftest import shared_path
from training.amibr import CropDataset, assign_folds, load_crops, load_index, slide_folds


def _write_fake(root: Path, n_slides: int = 6, per_slide: int = 4) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for s in range(n_slides):
        for i in range(per_slide):
            label = "Atypical" if i == 0 else "Normal"
            (root / label).mkdir(parents=True, exist_ok=True)
            name = f"S{s}_{i}.png"
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / label / name)
            rows.append({"slide": f"{s:03d}.tiff", "dataset": "FAKE", "dataset_uid": name, "final_label": label,
                         "expert1_atypical": i == 0, "expert2_atypical": i == 0, "expert3_atypical": False})
    pd.DataFrame(rows).to_csv(root / "amibr_train_split.csv")
    return root


def test_real_folds_keep_slides_apart_and_class_ratio():
    root = shared_path("amibr")
    index = load_index(root)
    assert len(index) == 2894
    assert index["label"].sum() == len(list((root / "Atypical").glob("*.png")))
    fold = slide_folds(index, 5, seed=0)
    assert set(fold) == set(range(5))
    slides_per_group = index.assign(fold=fold).groupby("group")["fold"].nunique()
    assert slides_per_group.max() == 1, "a slide appears in two folds"
    overall = index["label"].mean()
    for k in range(5):
        ratio = index["label"][fold == k].mean()
        assert abs(ratio - overall) < 0.05, f"fold {k} atypical ratio {ratio:.3f} vs {overall:.3f}"
        assert 0.1 < (fold == k).mean() < 0.3
    np.testing.assert_array_equal(fold, slide_folds(index, 5, seed=0))
    assert not np.array_equal(fold, slide_folds(index, 5, seed=1))


def test_real_dataset_folds_hold_one_source_each():
    index = load_index(shared_path("amibr"))
    fold = assign_folds(index, "dataset", 2)
    assert sorted(set(index["dataset"][fold == 0])) == ["MIDOG21"] and (fold == 0).sum() == 1292
    assert sorted(set(index["dataset"][fold == 1])) == ["TUPAC16"] and (fold == 1).sum() == 1602


def test_dataset_folds_leave_one_source_out(tmp_path):
    root = _write_fake(tmp_path)
    table = pd.read_csv(root / "amibr_train_split.csv", index_col=0)
    table.loc[table["slide"].isin(["000.tiff", "003.tiff"]), "dataset"] = "ALPHA"
    table.to_csv(root / "amibr_train_split.csv")
    index = load_index(root)
    fold = assign_folds(index, "dataset", 2, seed=7)
    np.testing.assert_array_equal(fold, (index["dataset"] == "FAKE").to_numpy(dtype=int))   # sorted: ALPHA, FAKE
    np.testing.assert_array_equal(assign_folds(index, "slide", 3, seed=0), slide_folds(index, 3, seed=0))
    with pytest.raises(ValueError, match="one fold per source dataset"):
        assign_folds(index, "dataset", 3)
    with pytest.raises(ValueError, match="split must be one of"):
        assign_folds(index, "patient", 2)
    with pytest.raises(ValueError, match="at least 2 source datasets"):
        assign_folds(index[index["dataset"] == "FAKE"], "dataset", 1)


def test_same_slide_name_in_two_datasets_is_two_groups(tmp_path):
    root = _write_fake(tmp_path)
    table = pd.read_csv(root / "amibr_train_split.csv", index_col=0)
    table.loc[table["slide"] == "000.tiff", "dataset"] = "OTHER"
    table.loc[table["slide"] == "000.tiff", "slide"] = "001.tiff"
    table.to_csv(root / "amibr_train_split.csv")
    index = load_index(root)
    assert index["group"].nunique() == 6
    assert index["votes"].tolist()[:4] == [2, 0, 0, 0]


def test_loads_crops_and_dataset(tmp_path):
    index = load_index(_write_fake(tmp_path))
    crops = load_crops(index["path"])
    assert crops.shape == (24, 16, 16, 3) and crops.dtype == np.uint8
    data = CropDataset(crops, index["label"].to_numpy())
    image, label = data[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8
    assert torch.equal(image.permute(1, 2, 0), torch.from_numpy(crops[0]))
    assert float(label) == 1.0 and float(data[1][1]) == 0.0


def test_missing_crop_or_csv_is_an_input_error(tmp_path):
    root = _write_fake(tmp_path)
    (root / "Normal" / "S2_1.png").unlink()
    with pytest.raises(InputError, match="missing"):
        load_index(root)
    with pytest.raises(InputError, match="not found"):
        load_index(tmp_path / "nowhere")
