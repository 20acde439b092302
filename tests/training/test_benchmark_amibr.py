"""The benchmark command end to end on generated AMi-Br data with an external test folder (tiny random ViT)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import save_file

from midog.errors import InputError
from midog.foundation import create_backbone, options_from_dict, resolve_spec
from tests.training.fake_amibr import write_amibr
from training import benchmark_amibr

TINY = {"img_size": 32, "depth": 2}


@pytest.fixture
def data(tmp_path: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    backbone = create_backbone(resolve_spec("test_vit", options_from_dict({"timm_kwargs": TINY})))
    save_file(backbone.state_dict(), str(tmp_path / "base.safetensors"))
    return {"train": write_amibr(tmp_path / "amibr"),
            "test": write_amibr(tmp_path / "external", n_slides=2, seed=1, with_csv=False, size=56),
            "weights": tmp_path / "base.safetensors"}


def test_linear_benchmark_writes_the_table(data: dict[str, Path], tmp_path: Path):
    config = tmp_path / "probe.yaml"
    config.write_text(yaml.safe_dump({"data_root": str(data["train"]), "pooling": "cls+mean", "timm_kwargs": TINY,
                                      "input_size": 32, "device": "cpu", "cache": str(tmp_path / "cache")}))
    out = tmp_path / "bench"
    assert benchmark_amibr.main(["--method", "linear", "--config", str(config), "--backbone", "test_vit",
                                 "--weights", str(data["weights"]), "--folds", "3", "--out", str(out),
                                 "--test", f"ext={data['test']}"]) == 0
    frame = pd.read_csv(out / "benchmark.csv")
    assert list(frame["set"]) == ["cv-validation", "ext"]
    ext = frame.set_index("set").loc["ext"]
    assert ext["crops"] == 12 and ext["atypical"] == 4 and ext["folds"] == 3
    assert ext["balanced_accuracy_mean"] >= 0.9 and 0 <= ext["roc_auc_std"] <= 0.5
    assert "| ext | 12 (4) |" in (out / "benchmark.md").read_text()
    per_fold = json.loads((out / "benchmark.json").read_text())["sets"][1]["folds"]
    assert len(per_fold) == 3 and set(per_fold[0]) >= {"balanced_accuracy", "roc_auc"}


def test_lora_benchmark_evaluates_every_fold_checkpoint(data: dict[str, Path], tmp_path: Path):
    config = tmp_path / "lora.yaml"
    config.write_text(yaml.safe_dump({
        "data_root": str(data["train"]), "arch": "test_vit", "input_size": 32, "batch_size": 8, "epochs": 1,
        "min_epochs": 1, "lr": 0.005, "num_threads": 0, "eval_batch_size": 32, "ship_epoch": "last",
        "model_kwargs": {"method": "lora", "weights": str(data["weights"]), "timm_kwargs": TINY,
                         "lora": {"r": 2}}}))
    out = tmp_path / "bench"
    assert benchmark_amibr.main(["--method", "lora", "--config", str(config), "--folds", "2", "--out", str(out),
                                 "--test", str(data["test"])]) == 0
    frame = pd.read_csv(out / "benchmark.csv").set_index("set")
    assert list(frame.index) == ["cv-validation", "external"] and frame.loc["external", "folds"] == 2
    assert 0.0 <= frame.loc["external", "roc_auc_mean"] <= 1.0
    # the fold models scored are the ones --ship-folds would ship: final.pt with ship_epoch: last
    scored = json.loads((out / "benchmark.json").read_text())["checkpoints"]
    assert [Path(c).name for c in scored] == ["final.pt", "final.pt"]
    # and the cv-validation row describes those same models (their last epoch on their validation fold)
    last = [torch.load(c, weights_only=True)["meta"]["val"]["balanced_accuracy"] for c in scored]
    assert frame.loc["cv-validation", "balanced_accuracy_mean"] == pytest.approx(np.mean(last), abs=1e-4)


def test_a_test_folder_without_the_amibr_layout_fails_before_training(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]):
    (tmp_path / "flat").mkdir()
    assert benchmark_amibr.main(["--method", "linear", "--test", str(tmp_path / "flat")]) == InputError.exit_code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Atypical/" in err and err.count("\n") == 1


def test_the_benchmark_runs_five_folds_unless_told_otherwise():
    assert benchmark_amibr.parse_args(["--method", "end-to-end"]).folds == 5  # atypical.yaml itself has 3
