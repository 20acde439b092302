"""The verifier trainer on a handful of generated crops with a tiny timm model: runs, saves, reloads strictly."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from midog.classifier import load_classifier
from midog.errors import ConfigError, InputError
from midog.weights import read_model_card
from training.augment import random_blur
from training.train_verifier import (
    VerifierNet,
    f1_threshold,
    load_verifier_config,
    main,
    train_transform,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG = REPO_ROOT / "training" / "configs" / "verifier.yaml"


def _write_crops(root: Path, n_per_class: int = 6, size: int = 64) -> None:
    """Positives: a dark purple disc (a condensed chromosome mass) on pink; negatives: pink with a pale nucleus."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for split in ("train", "val"):
        for folder, dark in (("mitotic_figure", True), ("hard_negative", False)):
            (root / split / folder).mkdir(parents=True)
            for i in range(n_per_class):
                crop = np.full((size, size, 3), (230, 170, 210), dtype=np.float64) + rng.normal(0, 8, (size, size, 3))
                cy, cx = rng.integers(24, 40, 2)
                disc = (yy - cy) ** 2 + (xx - cx) ** 2 < rng.integers(36, 100)
                crop[disc] = (60, 30, 90) if dark else (180, 140, 200)
                Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8)).save(root / split / folder / f"{i}.png")


def test_config_file_holds_the_method_settings() -> None:
    cfg = load_verifier_config(CONFIG)
    assert cfg.arch == "convnext_tiny" and cfg.input_size == 64
    assert (cfg.loss.alpha_pos, cfg.loss.alpha_neg, cfg.loss.gamma) == (1.0, 1.5, 2.0)
    assert (cfg.loss.temperature, cfg.loss.supcon_weight) == (0.2, 1.0)
    assert (cfg.lr, cfg.min_lr, cfg.weight_decay, cfg.patience) == (3e-4, 1e-6, 1e-5, 60)
    a = cfg.augment
    assert (a.rotation, a.brightness, a.contrast, a.saturation) == (15, 0.2, 0.2, 0.1)
    assert (a.randaugment_ops, a.randaugment_magnitude, a.erase_p, a.erase_scale, a.mixup_alpha) == \
        (3, 5, 0.5, (0.02, 0.15), 0.2)
    with pytest.raises(ConfigError, match="unknown key 'learning_rate'"):
        load_verifier_config(CONFIG, {"learning_rate": 1.0})
    with pytest.raises(ConfigError, match=r"unknown key 'loss.gama' \(did you mean 'loss.gamma'\?\)"):
        load_verifier_config(CONFIG, {"loss": {"gama": 2.0}})


def test_augmentation_keeps_uint8_crops_of_the_same_size() -> None:
    cfg = load_verifier_config(CONFIG)
    crop = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    out = train_transform(cfg.augment)(crop)
    assert out.dtype == torch.uint8 and out.shape == (3, 64, 64)


def _high_frequency_energy(crop: torch.Tensor) -> float:
    grey = crop.float().mean(0)
    return float(((grey[1:, :] - grey[:-1, :]) ** 2).mean() + ((grey[:, 1:] - grey[:, :-1]) ** 2).mean())


def test_blur_augmentation_is_off_by_default_and_softens_the_crop_when_on() -> None:
    crop = torch.zeros(3, 64, 64, dtype=torch.uint8)
    crop[:, ::2, :] = 255  # one-pixel stripes: all of their energy is at the highest frequency
    no_other_steps = {"augment.hflip": 0, "augment.vflip": 0, "augment.rotation": 0, "augment.randaugment_ops": 0,
                      "augment.erase_p": 0, "augment.brightness": 0, "augment.contrast": 0, "augment.saturation": 0}
    plain = load_verifier_config(CONFIG, no_other_steps)
    assert plain.augment.blur_p == 0
    assert torch.equal(train_transform(plain.augment)(crop), crop)  # every step off: the crop as read
    blurred = load_verifier_config(CONFIG, {**no_other_steps, "augment.blur_p": 1.0, "augment.blur_sigma": [1.0, 1.5]})
    assert blurred.augment.blur_sigma == (1.0, 1.5)
    out = train_transform(blurred.augment)(crop)
    assert out.dtype == torch.uint8 and out.shape == crop.shape
    assert _high_frequency_energy(out) < 0.05 * _high_frequency_energy(crop)


def test_random_blur_kernel_spans_two_sigmas_and_refuses_an_empty_range() -> None:
    assert random_blur(1.0, (0.1, 1.5)).transforms[0].kernel_size == (7, 7)
    assert random_blur(1.0, (0.1, 1.2)).transforms[0].kernel_size == (5, 5)  # the Track 2 recipes' blur, unchanged
    with pytest.raises(ValueError, match="blur_sigma"):
        random_blur(0.5, (1.5, 0.1))
    with pytest.raises(ConfigError, match=r"blur_sigma must be \[low, high\] with 0 < low <= high, got \[1.5, 0.1\]"):
        load_verifier_config(CONFIG, {"augment.blur_sigma": [1.5, 0.1]})


def test_verifier_net_gives_logits_and_projected_embeddings() -> None:
    import timm

    model = timm.create_model("test_convnext", pretrained=False, num_classes=1)
    logits, emb = VerifierNet(model, projection_dim=16)(torch.randn(3, 3, 64, 64))
    assert logits.shape == (3,) and emb.shape == (3, 16)


def test_f1_threshold_picks_the_separating_score() -> None:
    labels = np.array([0, 0, 1, 1, 0, 1])
    probs = np.array([0.1, 0.3, 0.35, 0.8, 0.2, 0.9])
    threshold, f1 = f1_threshold(labels, probs)
    assert threshold == pytest.approx(0.35) and f1 == pytest.approx(1.0)


def test_two_steps_write_a_checkpoint_that_reloads_strictly(tmp_path: Path) -> None:
    data = tmp_path / "crops"
    _write_crops(data)
    out = tmp_path / "weights" / "verifier.pt"
    run_dir = tmp_path / "run"
    code = main(["--data", str(data), "--config", str(CONFIG), "--out", str(out), "--run-dir", str(run_dir),
                 "--arch", "test_convnext", "--max-steps", "2", "--batch-size", "4"])
    assert code == 0
    clf = load_classifier(out)  # strict load, sha256 of the model card checked
    assert clf.arch == "test_convnext" and clf.input_size == 64 and clf.positive == "mitotic figure"
    assert 0.0 <= clf.threshold <= 1.0
    state = torch.load(out, map_location="cpu", weights_only=True)
    assert not any(k.startswith("projection") for k in state["state_dict"])  # the training-only head is dropped
    probs = clf.predict_proba(np.zeros((2, 64, 64, 3), dtype=np.uint8))
    assert probs.shape == (2,) and np.all((probs >= 0) & (probs <= 1))
    card = read_model_card(out)
    assert card is not None and card["steps"] == 2 and card["training_data"]["train"] == \
        {"hard_negative": 6, "mitotic_figure": 6}
    assert card["threshold"] == pytest.approx(clf.threshold)
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert len(rows) == 1 and rows[0]["steps"] == "2" and {"f1", "threshold", "train_supcon"} <= set(rows[0])
    assert (run_dir / "last.pt").is_file()
    json.dumps(card)  # the card is plain JSON


def test_resume_continues_from_last_checkpoint(tmp_path: Path) -> None:
    data = tmp_path / "crops"
    _write_crops(data, n_per_class=4)
    args = ["--data", str(data), "--config", str(CONFIG), "--out", str(tmp_path / "v.pt"), "--run-dir",
            str(tmp_path / "run"), "--arch", "test_convnext", "--batch-size", "4"]
    assert main(args + ["--epochs", "1"]) == 0
    assert main(args + ["--epochs", "2", "--resume"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]


def test_missing_class_folder_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "d" / "train" / "mitotic_figure").mkdir(parents=True)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "d" / "train" / "mitotic_figure" / "a.png")
    code = main(["--data", str(tmp_path / "d"), "--config", str(CONFIG), "--out", str(tmp_path / "v.pt"),
                 "--run-dir", str(tmp_path / "run"), "--arch", "test_convnext"])
    assert code == InputError.exit_code
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "only positive" in err and "\n" not in err
    assert not (tmp_path / "v.pt").exists()


def _verifier_rank(rank: int, port: int, argv: list[str], results: "torch.multiprocessing.SimpleQueue") -> None:
    import os

    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    results.put((rank, main(argv)))


def test_two_processes_train_without_the_contrastive_term(tmp_path: Path) -> None:
    """With supcon_weight 0 the projection head gets no gradient: DDP must be told, or its second step fails
    ("Expected to have finished reduction in the prior iteration")."""
    import socket

    import torch.multiprocessing as mp
    import yaml

    data = tmp_path / "crops"
    _write_crops(data)
    values = yaml.safe_load(CONFIG.read_text())
    values["loss"]["supcon_weight"] = 0.0
    config = tmp_path / "no_supcon.yaml"
    config.write_text(yaml.safe_dump(values))
    argv = ["--data", str(data), "--config", str(config), "--out", str(tmp_path / "verifier.pt"),
            "--run-dir", str(tmp_path / "run"), "--arch", "test_convnext", "--max-steps", "3", "--batch-size", "2"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_verifier_rank, args=(port, argv, results), nprocs=2, start_method="spawn", join=True)
    assert sorted(results.get() for _ in range(2)) == [(0, 0), (1, 0)]
    assert load_classifier(tmp_path / "verifier.pt").positive == "mitotic figure"
