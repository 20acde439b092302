"""The atypical stage: checkpoint lookup and strict loading, thresholds, fold ensembles, dihedral TTA, batching."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from stack_factory import he_pages, tiny_atypical

from midog.atypical import AtypicalClassifier, load_atypical, resolve_threshold
from midog.classifier import load_classifier
from midog.config import AtypicalConfig
from midog.errors import ConfigError, WeightsError
from midog.weights import write_model_card


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("weights")
    return {
        "a": tiny_atypical(folder / "fold0.pt", threshold=0.3, seed=0),
        "b": tiny_atypical(folder / "fold1.pt", threshold=0.5, seed=1),
        "verifier": tiny_atypical(folder / "verifier.pt", positive="mitotic figure"),
    }


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    return he_pages(6, size=48, seed=5)


def test_single_checkpoint_uses_its_stored_threshold_unless_configured(weights: dict[str, Path]):
    stage = load_atypical(AtypicalConfig(weights=str(weights["a"])))
    assert stage.threshold == pytest.approx(0.3) and len(stage.models) == 1
    stage = load_atypical(AtypicalConfig(weights=str(weights["a"]), threshold=0.7))
    assert stage.threshold == pytest.approx(0.7)


def test_a_threshold_chosen_for_tta_is_used_only_with_tta(weights: dict[str, Path], tmp_path: Path):
    state = torch.load(weights["a"], weights_only=True)
    path = tmp_path / "tta.pt"
    torch.save({**state, "tta_threshold": 0.42}, path)
    assert load_classifier(weights["a"]).tta_threshold is None  # older checkpoints: one threshold for both
    assert load_atypical(AtypicalConfig(weights=str(weights["a"]), tta=True)).threshold == pytest.approx(0.3)
    assert load_atypical(AtypicalConfig(weights=str(path), tta=True)).threshold == pytest.approx(0.42)
    assert load_atypical(AtypicalConfig(weights=str(path), tta=False)).threshold == pytest.approx(0.3)
    assert load_atypical(AtypicalConfig(weights=str(path), threshold=0.6)).threshold == pytest.approx(0.6)
    ensemble = load_atypical(AtypicalConfig(weights=[str(path), str(weights["b"])], tta=True))
    assert ensemble.threshold == pytest.approx((0.42 + 0.5) / 2)
    clf = load_classifier(path)
    resaved = clf.save(tmp_path / "resaved.pt")
    assert load_classifier(resaved).tta_threshold == pytest.approx(0.42)


def test_ensemble_averages_probabilities_and_thresholds(weights: dict[str, Path], crops: np.ndarray):
    stage = load_atypical(AtypicalConfig(weights=[str(weights["a"]), str(weights["b"])], tta=False))
    assert stage.threshold == pytest.approx(0.4)
    members = [load_classifier(weights[k]).predict_proba(crops) for k in ("a", "b")]
    np.testing.assert_allclose(stage.predict_proba(crops), (members[0] + members[1]) / 2, atol=1e-6)
    assert not np.allclose(members[0], members[1])  # the two folds really differ


def test_tta_is_the_mean_over_the_eight_dihedral_views(weights: dict[str, Path], crops: np.ndarray):
    stage = load_atypical(AtypicalConfig(weights=str(weights["b"]), tta=True))
    model = stage.models[0]
    views = [np.rot90(c, k, axes=(1, 2)) for c in (crops, crops[:, :, ::-1]) for k in range(4)]
    expected = np.mean([model.predict_proba(np.ascontiguousarray(v)) for v in views], axis=0)
    np.testing.assert_allclose(stage.predict_proba(crops), expected, atol=1e-5)
    rotated = np.ascontiguousarray(np.rot90(crops, 1, axes=(1, 2)))
    np.testing.assert_allclose(stage.predict_proba(rotated), stage.predict_proba(crops), atol=1e-5)


def test_four_tta_views_are_the_mean_over_the_four_rotations(weights: dict[str, Path], crops: np.ndarray):
    stage = load_atypical(AtypicalConfig(weights=str(weights["b"]), tta=True, tta_views=4))
    model = stage.models[0]
    expected = np.mean([model.predict_proba(np.ascontiguousarray(np.rot90(crops, k, axes=(1, 2))))
                        for k in range(4)], axis=0)
    np.testing.assert_allclose(stage.predict_proba(crops), expected, atol=1e-5)
    mirrored = np.ascontiguousarray(crops[:, :, ::-1])   # invariant to rotations, not to reflections
    assert not np.allclose(stage.predict_proba(mirrored), stage.predict_proba(crops), atol=1e-5)
    assert stage.threshold == pytest.approx(model.decision_threshold(tta=True))
    with pytest.raises(ValueError, match="one of"):
        model.predict_proba(crops, tta=True, tta_views=2)



def test_each_member_can_have_its_own_tta_views(weights: dict[str, Path], crops: np.ndarray):
    names = [str(weights[k]) for k in ("a", "b")]
    stage = load_atypical(AtypicalConfig(weights=names, tta=True, tta_views=[8, 4]))
    assert stage.member_views == [8, 4]
    members = [load_classifier(weights["a"]).predict_proba(crops, tta=True, tta_views=8),
               load_classifier(weights["b"]).predict_proba(crops, tta=True, tta_views=4)]
    np.testing.assert_allclose(stage.predict_proba(crops), (members[0] + members[1]) / 2, atol=1e-6)
    both_eight = load_atypical(AtypicalConfig(weights=names, tta=True, tta_views=8))
    assert both_eight.member_views == [8, 8]
    assert not np.allclose(both_eight.predict_proba(crops), stage.predict_proba(crops), atol=1e-6)
    with pytest.raises(ConfigError, match="lists 1 view counts for 2 atypical.weights"):
        load_atypical(AtypicalConfig(weights=names, tta=True, tta_views=[8]))

def test_any_crop_size_and_mixed_sizes(weights: dict[str, Path]):
    stage = load_atypical(AtypicalConfig(weights=str(weights["b"]), tta=False, batch_size=2))
    crops = [he_pages(1, size=s, seed=s)[0] for s in (128, 64, 128, 17, 300)]
    together = stage.predict_proba(crops)
    alone = np.concatenate([stage.predict_proba(c[None]) for c in crops])
    assert together.dtype == np.float32 and together.shape == (5,)
    np.testing.assert_allclose(together, alone, atol=1e-6)
    assert ((together >= 0) & (together <= 1)).all()


def test_track1_style_array_of_128px_crops_and_batching(weights: dict[str, Path]):
    crops = he_pages(9, size=128, seed=9)
    big = load_atypical(AtypicalConfig(weights=str(weights["a"]), batch_size=64)).predict_proba(crops)
    small = load_atypical(AtypicalConfig(weights=str(weights["a"]), batch_size=4)).predict_proba(crops)
    np.testing.assert_allclose(big, small, atol=1e-6)
    assert big.shape == (9,)
    assert load_atypical(AtypicalConfig(weights=str(weights["a"]))).predict_proba(crops[:0]).shape == (0,)


def test_decision_follows_the_threshold(weights: dict[str, Path], crops: np.ndarray):
    stage = load_atypical(AtypicalConfig(weights=str(weights["a"])))
    probabilities = stage.predict_proba(crops)
    stage.threshold = float(np.median(probabilities))
    assert stage.is_atypical(probabilities).tolist() == (probabilities >= stage.threshold).tolist()


def test_weights_are_found_by_name_in_the_weights_folders(weights: dict[str, Path], monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MIDOG_WEIGHTS_DIR", str(weights["a"].parent))
    assert load_atypical(AtypicalConfig(weights="fold1.pt")).threshold == pytest.approx(0.5)
    with pytest.raises(WeightsError, match="'nope.pt' not found"):
        load_atypical(AtypicalConfig(weights="nope.pt"))


def test_wrong_corrupt_or_tampered_weights(weights: dict[str, Path], tmp_path: Path):
    with pytest.raises(WeightsError, match="'mitotic figure', not 'atypical'"):
        load_atypical(AtypicalConfig(weights=str(weights["verifier"])))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(weights["a"].read_bytes()[:5000])
    with pytest.raises(WeightsError, match="cannot load"):
        load_atypical(AtypicalConfig(weights=str(truncated)))
    tampered = tmp_path / "tampered.pt"
    tampered.write_bytes(weights["a"].read_bytes())
    write_model_card(tampered, {"arch": "test_resnet"})
    state = torch.load(tampered, weights_only=True)
    state["threshold"] = 0.99
    torch.save(state, tampered)
    with pytest.raises(WeightsError, match="checksum mismatch"):
        load_atypical(AtypicalConfig(weights=str(tampered)))
    with pytest.raises(WeightsError, match="empty"):
        load_atypical(AtypicalConfig(weights=[]))
    assert json.loads(tampered.with_suffix(".json").read_text())["file"] == "tampered.pt"


def test_crops_must_be_uint8_rgb(weights: dict[str, Path]):
    stage = AtypicalClassifier(models=[load_classifier(weights["a"])], threshold=0.5)
    with pytest.raises(ValueError, match="uint8 RGB"):
        stage.predict_proba(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="uint8 RGB"):
        stage.predict_proba([np.zeros((8, 8), np.uint8)])


def test_threshold_out_of_range_is_refused(weights: dict[str, Path]):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        resolve_threshold([load_classifier(weights["a"])], 1.5)
