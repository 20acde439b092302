"""Weights folders: which pipeline.yaml travels with the weights, and checksums against model cards."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from midog import weights
from midog.cli import main
from midog.config import PipelineConfig, load_config
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


CHECKPOINTS = {"proposals": "detector.pt", "verifier": "verifier.pt", "atypical": "atypical.pt"}


def test_pipeline_values_follow_the_checkpoints_actually_loaded(folders: tuple[Path, Path, Path]):
    env, model, repo = folders
    for name in CHECKPOINTS.values():
        (repo / name).write_bytes(b"shipped")
    (repo / weights.PIPELINE_CONFIG_NAME).write_text(yaml.safe_dump(
        {"verifier": {"threshold": 0.3}, "atypical": {"threshold": 0.45}, "tiling": {"overlap": 0.25}}))
    shipped = {"verifier": {"threshold": 0.3}, "atypical": {"threshold": 0.45}, "tiling": {"overlap": 0.25}}
    assert weights.weights_pipeline_values(CHECKPOINTS) == shipped
    # a model folder overriding only the atypical classifier: the shipped verifier keeps its tuned threshold, the new
    # atypical classifier does not inherit the one tuned for the shipped classifier
    (model / "atypical.pt").write_bytes(b"new")
    assert weights.weights_pipeline_values(CHECKPOINTS) == {"verifier": {"threshold": 0.3}, "tiling": {"overlap": 0.25}}
    # the model folder's own values: its atypical section applies, its verifier section (no verifier there) does not
    (model / weights.PIPELINE_CONFIG_NAME).write_text(yaml.safe_dump(
        {"verifier": {"threshold": 0.7}, "atypical": {"threshold": 0.6}}))
    assert weights.weights_pipeline_values(CHECKPOINTS) == {"verifier": {"threshold": 0.3}, "tiling": {"overlap": 0.25},
                                                            "atypical": {"threshold": 0.6}}
    # a new detector elsewhere: the sections without a checkpoint follow it, and it has no pipeline.yaml
    (env / "detector.pt").write_bytes(b"new detector")
    assert weights.weights_pipeline_values(CHECKPOINTS) == {"verifier": {"threshold": 0.3},
                                                            "atypical": {"threshold": 0.6}}
    # a missing checkpoint contributes nothing (its stage reports it when it loads)
    assert weights.weights_pipeline_values({"verifier": "absent.pt"}) == {}
    # another verifier in the shipped folder: the section tuned for verifier.pt does not reach it
    (repo / "verifier_b.pt").write_bytes(b"another verifier")
    other = {**CHECKPOINTS, "verifier": "verifier_b.pt"}
    assert "verifier" not in weights.weights_pipeline_values(other, CHECKPOINTS)


def test_a_model_folder_pipeline_yaml_may_name_its_own_checkpoints(folders: tuple[Path, Path, Path],
                                                                   monkeypatch: pytest.MonkeyPatch):
    """A fold ensemble in /opt/ml/model: its pipeline.yaml names the members (ship_ensemble's config) and their
    threshold; the run loads them with it, unless the user chose other weights."""
    from midog.cli import load_run_config

    _, model, repo = folders
    (repo / "atypical.pt").write_bytes(b"shipped")
    for k in range(2):
        (model / f"atyp_fold{k}.pt").write_bytes(b"member")
    (model / weights.PIPELINE_CONFIG_NAME).write_text(yaml.safe_dump(
        {"atypical": {"weights": ["atyp_fold0.pt", "atyp_fold1.pt"], "threshold": 0.42}}))
    monkeypatch.delenv("MIDOG_WEIGHTS_DIR")
    config = load_run_config(None)
    assert config.atypical.weights == ["atyp_fold0.pt", "atyp_fold1.pt"] and config.atypical.threshold == 0.42
    monkeypatch.setenv("MIDOG_ATYPICAL__WEIGHTS", "mine.pt")  # the user's choice wins, without those values
    (repo / "mine.pt").write_bytes(b"the user's")
    config = load_run_config(None)
    assert config.atypical.weights == "mine.pt" and config.atypical.threshold is None


def test_naming_a_stages_default_checkpoint_runs_it_alone_without_the_ensembles_values(
        folders: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch):
    """The shipped pipeline.yaml renames the default atypical.pt to a pair with per-member values; a user who names
    atypical.pt itself gets that checkpoint alone, with none of the pair's values (its view list would not fit)."""
    from midog.cli import load_run_config

    _, _, repo = folders
    monkeypatch.delenv("MIDOG_WEIGHTS_DIR")
    for name in ("atypical.pt", "second.pt"):
        (repo / name).write_bytes(b"member")
    (repo / weights.PIPELINE_CONFIG_NAME).write_text(yaml.safe_dump(
        {"atypical": {"weights": ["atypical.pt", "second.pt"], "tta_views": [8, 4], "threshold": 0.42}}))
    config = load_run_config(None)
    assert config.atypical.weights == ["atypical.pt", "second.pt"] and config.atypical.tta_views == [8, 4]
    monkeypatch.setenv("MIDOG_ATYPICAL__WEIGHTS", "atypical.pt")
    config = load_run_config(None)
    assert config.atypical.weights == "atypical.pt"
    assert config.atypical.tta_views == 8 and config.atypical.threshold is None


def test_a_bare_checkpoint_name_is_never_taken_from_the_working_directory(folders: tuple[Path, Path, Path],
                                                                         tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch):
    _, _, repo = folders
    (repo / "atypical.pt").write_bytes(b"shipped")
    work = tmp_path / "work"
    (work / "runs").mkdir(parents=True)
    (work / "atypical.pt").write_bytes(b"stray file")
    (work / "runs" / "mine.pt").write_bytes(b"a path the user means")
    monkeypatch.chdir(work)
    assert weights.find_weights("atypical.pt") == repo / "atypical.pt"
    assert weights.find_weights("runs/mine.pt") == Path("runs/mine.pt")
    assert weights.find_weights("./atypical.pt") == Path("./atypical.pt")  # a path the user spelled out
    with pytest.raises(WeightsError, match="weights file not found"):
        weights.find_weights("runs/absent.pt")


def test_config_layers_in_order(tmp_path: Path, folders: tuple[Path, Path, Path]):
    _, _, repo = folders
    shipped = write_pipeline(repo, 0.3)
    assert load_config().verifier.threshold == PipelineConfig().verifier.threshold  # library callers: the defaults
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
    (repo / "verifier.pt").write_bytes(b"the checkpoint the threshold was tuned for")
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
