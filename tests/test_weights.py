"""Weights folders: which pipeline.yaml travels with the weights, and checksums against model cards."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from midog import weights
from midog.cli import main
from midog.config import load_config
from midog.errors import WeightsError


@pytest.fixture
def folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, Path]:
    """Three weights folders in search order: $MIDOG_WEIGHTS_DIR, the model folder, the repo's weights/."""
    env, model, repo = (tmp_path / name for name in ("env", "model", "repo"))
    for folder in (env, model, repo):
        folder.mkdir()
    monkeypatch.setenv("MIDOG_WEIGHTS_DIR", str(env))
    monkeypatch.setattr(weights, "MODEL_DIR", model)
    monkeypatch.setattr(weights, "REPO_WEIGHTS_DIR", repo)
    return env, model, repo


def write_pipeline(folder: Path, threshold: float) -> Path:
    path = folder / weights.PIPELINE_CONFIG_NAME
    path.write_text(yaml.safe_dump({"verifier": {"threshold": threshold}}))
    return path


def test_pipeline_config_comes_from_the_first_folder_with_weights(folders: tuple[Path, Path, Path]):
    env, model, repo = folders
    repo_config = write_pipeline(repo, 0.3)
    assert weights.weights_pipeline_config() == repo_config  # env and model folders are empty
    (model / "README.md").write_text("model tarball folder")
    assert weights.weights_pipeline_config() == repo_config  # a folder without checkpoints does not count
    (model / "verifier.pt").write_bytes(b"other weights")
    assert weights.weights_pipeline_config() is None  # repo thresholds never apply to other weights
    model_config = write_pipeline(model, 0.7)
    assert weights.weights_pipeline_config() == model_config
    env_config = write_pipeline(env, 0.4)
    assert weights.weights_pipeline_config() == env_config


def test_config_layers_in_order(tmp_path: Path, folders: tuple[Path, Path, Path]):
    _, _, repo = folders
    shipped = write_pipeline(repo, 0.3)
    assert load_config().verifier.threshold == 0.5  # library callers get the defaults
    assert load_config(weights_config=shipped).verifier.threshold == 0.3
    user = tmp_path / "user.yaml"
    user.write_text(yaml.safe_dump({"verifier": {"threshold": 0.6}}))
    assert load_config(user, weights_config=shipped).verifier.threshold == 0.6
    env = {"MIDOG_VERIFIER__THRESHOLD": "0.65"}
    assert load_config(user, environ=env, weights_config=shipped).verifier.threshold == 0.65


def test_process_py_applies_the_weights_pipeline_config(tmp_path: Path, folders: tuple[Path, Path, Path],
                                                       monkeypatch: pytest.MonkeyPatch):
    from midog import cli

    _, _, repo = folders
    write_pipeline(repo, 0.25)
    seen = []
    monkeypatch.setitem(cli.HANDLERS, cli.TRACK2_SLUG, lambda i, o, config: seen.append(config.verifier.threshold))
    (tmp_path / "inputs.json").write_text('[{"interface": {"slug": "stacked-histopathology-roi-cropouts"}}]')
    assert main(["--input", str(tmp_path), "--output", str(tmp_path / "out")]) == 0
    assert seen == [0.25]


def test_the_shipped_pipeline_config_is_valid_and_loads():
    shipped = weights.REPO_WEIGHTS_DIR / weights.PIPELINE_CONFIG_NAME
    if not shipped.is_file():
        pytest.skip("no weights/pipeline.yaml shipped")
    config = load_config(weights_config=shipped)
    assert 0.0 < config.verifier.threshold < 1.0


def test_checksum_mismatch_is_refused(tmp_path: Path):
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    weights.write_model_card(checkpoint, {"architecture": "x"})
    weights.verify_checksum(checkpoint)
    checkpoint.write_bytes(b"tampered")
    with pytest.raises(WeightsError, match="checksum mismatch"):
        weights.verify_checksum(checkpoint)


def test_plain_gives_what_json_and_weights_only_loading_give_back(tmp_path):
    import torch

    value = {"size": (64, 64), "root": Path("/data/amibr"), "nested": [{"scale": (0.75, 1.0)}], "lr": 0.002}
    flat = weights.plain(value)
    assert flat == {"size": [64, 64], "root": "/data/amibr", "nested": [{"scale": [0.75, 1.0]}], "lr": 0.002}
    torch.save({"meta": flat}, tmp_path / "x.pt")
    assert torch.load(tmp_path / "x.pt", weights_only=True)["meta"] == flat
