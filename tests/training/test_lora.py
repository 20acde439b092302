"""LoRA through the end-to-end training loop, a tiny random ViT standing in for the foundation model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from midog.classifier import load_classifier
from midog.foundation import create_backbone, options_from_dict, resolve_spec
from midog.weights import read_model_card, write_model_card
from tests.training.fake_amibr import write_amibr
from training import lora as lora_cli
from training.amibr import CropDataset, load_crops, load_index
from training.augment import train_transform
from training.runtime import Dist
from training.train_classifier import (TrainConfig, build_model, make_loss, make_optimizer, make_train_loader,
                                       train_epoch, train_fold)

TINY = {"img_size": 32, "depth": 2}


@pytest.fixture
def base_weights(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    backbone = create_backbone(resolve_spec("test_vit", options_from_dict({"timm_kwargs": TINY})))
    save_file(backbone.state_dict(), str(tmp_path / "base.safetensors"))
    return tmp_path / "base.safetensors"


def lora_cfg(base_weights: Path, **changes) -> TrainConfig:
    cfg = TrainConfig(arch="test_vit", input_size=32, batch_size=8, epochs=2, min_epochs=1, lr=5e-3, num_threads=0,
                      eval_batch_size=32, model_kwargs={
                          "method": "lora", "weights": str(base_weights), "timm_kwargs": TINY, "pooling": "cls+mean",
                          "lora": {"r": 4, "alpha": 8, "dropout": 0.3, "target_modules": ["qkv", "proj", "fc1", "fc2"]}})
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


def test_only_adapters_and_head_train_and_the_base_stays(base_weights: Path, tmp_path: Path):
    cfg = lora_cfg(base_weights)
    torch.manual_seed(0)
    clf = build_model(cfg)
    trainable = [n for n, p in clf.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    assert any(".attn.qkv.lora_A" in n for n in trainable) and any(".mlp.fc2.lora_B" in n for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in clf.model.named_parameters() if not p.requires_grad}
    lora_b_before = {n: p.detach().clone() for n, p in clf.model.named_parameters() if "lora_B" in n}

    root = write_amibr(tmp_path / "amibr", n_slides=2, per_slide=8)
    index = load_index(root)
    crops, labels = load_crops(index["path"]), index["label"].to_numpy()
    dataset = CropDataset(crops, labels, transform=train_transform(cfg.augment, crops.shape[1]))
    ctx = Dist()
    loader = make_train_loader(cfg, dataset, ctx, seed=0)
    optimizer, scheduler = make_optimizer(cfg, clf.model, len(loader))
    train_epoch(clf, clf.model, loader, optimizer, scheduler, make_loss(cfg, labels, ctx.device), ctx)

    for name, param in clf.model.named_parameters():
        if not param.requires_grad:
            torch.testing.assert_close(param, frozen_before[name], rtol=0, atol=0)
    assert any(not torch.equal(p, lora_b_before[n]) for n, p in clf.model.named_parameters() if "lora_B" in n)

    # the saved checkpoint holds adapters + head only, and reloads (merged) with the same predictions
    path = clf.save(tmp_path / "lora.pt")
    state = torch.load(path, weights_only=True)
    assert set(state["state_dict"]) == set(trainable)
    probe = crops[:6]
    loaded = load_classifier(path)
    np.testing.assert_allclose(loaded.predict_proba(probe, tta=True), clf.predict_proba(probe, tta=True), atol=1e-5)
    assert not any("lora_" in n for n, _ in loaded.model.named_parameters())  # merged into the base layers


def test_train_fold_runs_lora_end_to_end(base_weights: Path, tmp_path: Path):
    root = write_amibr(tmp_path / "amibr", n_slides=4, per_slide=6)
    index = load_index(root)
    crops, labels = load_crops(index["path"]), index["label"].to_numpy()
    cfg = lora_cfg(base_weights)
    train_idx, val_idx = np.arange(0, 18), np.arange(18, 24)
    result = train_fold(cfg, crops, labels, train_idx, val_idx, tmp_path / "fold0", Dist(), name="fold0")
    assert result.best_epoch >= 1 and (tmp_path / "fold0" / "metrics.csv").is_file()
    clf = load_classifier(result.checkpoint)
    assert clf.threshold == pytest.approx(result.threshold)
    assert clf.predict_proba(crops[val_idx]).shape == (6,)


def test_lora_cli_composes_the_training_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    seen: list[list[str]] = []

    def fake_main(argv: list[str]) -> int:  # train_classifier ships two fold members with its from-scratch card
        seen.append(argv)
        for k in range(2):
            (tmp_path / f"fm_fold{k}.pt").write_bytes(b"weights")
            write_model_card(tmp_path / f"fm_fold{k}.pt", {"pretrained": "none (trained from scratch)"})
        return 0

    monkeypatch.setattr(lora_cli.train_classifier, "main", fake_main)
    monkeypatch.setattr(lora_cli, "find_base_weights", lambda spec, explicit=None: tmp_path / "base.safetensors")
    out = tmp_path / "run"
    ship = ["--ship-folds", str(tmp_path / "fm.pt"), "--folds", "2"]
    assert lora_cli.main(["--backbone", "virchow2", "--r", "16", "--out", str(out)] + ship) == 0
    values = yaml.safe_load((out / "train_config.yaml").read_text())
    assert values["arch"] == "virchow2" and values["input_size"] == 224
    assert values["model_kwargs"]["method"] == "lora"
    assert values["model_kwargs"]["lora"] == {"r": 16, "alpha": 16, "dropout": 0.3,
                                              "target_modules": ["qkv", "proj", "fc1", "fc2"]}
    assert seen == [["--config", str(out / "train_config.yaml")] + ship]
    for k in range(2):
        card = read_model_card(tmp_path / f"fm_fold{k}.pt")
        assert card["pretrained"] == "paige-ai/Virchow2" and card["method"].startswith("LoRA (peft) r=16 alpha=16")
    # the card describes the backbone as trained: a pooling set in model_kwargs, not the registry's default
    values["model_kwargs"]["pooling"] = "cls"
    lora_cli.describe_shipped(tmp_path / "fm_fold0.pt", values)
    assert read_model_card(tmp_path / "fm_fold0.pt")["backbone"]["pooling"] == "cls"
