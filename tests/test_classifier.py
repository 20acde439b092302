"""BinaryClassifier preprocessing: models trained from scratch here keep the plain bilinear resize they were trained
with; the shipped weights see exactly the tensors they saw before `interpolation` / `crop_pct` existed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from midog.classifier import PLAIN_CROP_PCT, PLAIN_INTERPOLATION, build_classifier, load_classifier
from midog.errors import WeightsError

REPO = Path(__file__).resolve().parents[1]


def crops(n: int = 3, height: int = 128, width: int = 128, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


def plain_resize_before(x: np.ndarray, size: int, mean, std) -> torch.Tensor:
    """BinaryClassifier.preprocess as it was before the resize followed the backbone's data config."""
    batch = torch.as_tensor(x).permute(0, 3, 1, 2).float().div_(255.0)
    if batch.shape[-1] != size or batch.shape[-2] != size:
        batch = F.interpolate(batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (batch - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.mark.parametrize("shape", [(128, 128), (100, 90), (32, 32)])
def test_a_model_trained_from_scratch_keeps_the_plain_bilinear_resize(shape: tuple[int, int]):
    clf = build_classifier("test_resnet", 32)  # timm's pretrained_cfg of the arch says bicubic + crop 0.95: not used
    assert (clf.interpolation, clf.crop_pct) == (PLAIN_INTERPOLATION, PLAIN_CROP_PCT) == ("bilinear", 1.0)
    x = crops(height=shape[0], width=shape[1])
    assert torch.equal(clf.preprocess(x), plain_resize_before(x, 32, clf.mean, clf.std))


@pytest.mark.parametrize("name", ["atypical", "verifier"])
def test_shipped_weights_see_exactly_the_tensors_they_saw_before(name: str):
    clf = load_classifier(REPO / "weights" / f"{name}.pt")
    assert (clf.interpolation, clf.crop_pct) == ("bilinear", 1.0)
    for x in (crops(), crops(2, 100, 90, seed=1)):
        assert torch.equal(clf.preprocess(x), plain_resize_before(x, clf.input_size, clf.mean, clf.std))


def test_the_resize_is_saved_and_a_checkpoint_without_it_loads_as_a_plain_resize(tmp_path: Path):
    clf = build_classifier("test_resnet", 32)
    clf.interpolation, clf.crop_pct = "bicubic", 0.875
    path = clf.save(tmp_path / "clf.pt")
    state = torch.load(path, weights_only=True)
    assert (state["interpolation"], state["crop_pct"]) == ("bicubic", 0.875)
    loaded = load_classifier(path)
    assert (loaded.interpolation, loaded.crop_pct) == ("bicubic", 0.875)
    assert torch.equal(loaded.preprocess(crops()), clf.preprocess(crops()))
    del state["interpolation"], state["crop_pct"]  # as every checkpoint written before these keys existed
    torch.save(state, tmp_path / "old.pt")
    old = load_classifier(tmp_path / "old.pt")
    assert (old.interpolation, old.crop_pct) == ("bilinear", 1.0)
    state["interpolation"] = "lanczos"
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(WeightsError, match="interpolation must be one of"):
        load_classifier(tmp_path / "bad.pt")



def test_out_of_memory_halves_the_batch_and_gives_the_same_probabilities(monkeypatch: pytest.MonkeyPatch):
    torch.manual_seed(0)
    clf = build_classifier("resnet10t", 32, positive="atypical")
    x = crops(13, 40, 40, seed=4)
    expected = clf.predict_proba(x, tta=True, batch_size=16)
    forward = clf.model.forward

    def small_memory(batch: torch.Tensor) -> torch.Tensor:
        if len(batch) > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(batch)

    monkeypatch.setattr(clf.model, "forward", small_memory)
    np.testing.assert_allclose(clf.predict_proba(x, tta=True, batch_size=16), expected, atol=1e-6)
    assert clf.batch_cap == 4                                   # 16 → 8 → 4, and it stays there
    monkeypatch.setattr(clf.model, "forward", lambda batch: (_ for _ in ()).throw(
        torch.OutOfMemoryError("CUDA out of memory (simulated)")))
    with pytest.raises(torch.OutOfMemoryError):                 # not even one crop fits: the error goes up
        clf.predict_proba(x[:1])

MALFORMED = {
    "no arch": (lambda s: s.pop("arch"), "field 'arch' is missing"),
    "no threshold": (lambda s: s.pop("threshold"), "field 'threshold' is missing"),
    "unknown arch": (lambda s: s.update(arch="resnet18_from_the_future"), "cannot build 'resnet18_from_the_future'"),
    "arguments the arch does not take": (lambda s: s.update(model_kwargs={"wings": 2}), "cannot build 'test_resnet'"),
    "TTA threshold above 1": (lambda s: s.update(tta_threshold=7.0), "'tta_threshold' is 7.0"),
    "TTA threshold NaN": (lambda s: s.update(tta_threshold=float("nan")), "'tta_threshold' is nan"),
    "threshold as text": (lambda s: s.update(threshold="high"), "'threshold' is 'high'"),
    "input size 0": (lambda s: s.update(input_size=0), "'input_size' is 0"),
    "two-channel mean": (lambda s: s.update(mean=[0.5, 0.5]), "'mean' is \\[0.5, 0.5\\]"),
    "zero std": (lambda s: s.update(std=[0.2, 0.0, 0.2]), "'std'"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_checkpoint_is_a_weights_error_naming_the_field(tmp_path: Path, case: str):
    mutate, message = MALFORMED[case]
    state = torch.load(build_classifier("test_resnet", 32).save(tmp_path / "clf.pt"), weights_only=True)
    mutate(state)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(WeightsError, match=message):
        load_classifier(tmp_path / "bad.pt")


def test_an_empty_checkpoint_file_is_a_weights_error(tmp_path: Path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(WeightsError, match="cannot load classifier weights .*empty.pt: EOFError"):
        load_classifier(tmp_path / "empty.pt")


@pytest.mark.parametrize("card, message", [('{"sha256": 5}', "'sha256' must be a string"),
                                           ("[1, 2]", "must be a JSON object")])
def test_a_malformed_model_card_is_a_weights_error(tmp_path: Path, card: str, message: str):
    path = build_classifier("test_resnet", 32).save(tmp_path / "clf.pt")
    path.with_suffix(".json").write_text(card)
    with pytest.raises(WeightsError, match=message):
        load_classifier(path)
    path.with_suffix(".json").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(WeightsError, match="not valid JSON"):
        load_classifier(path)


def test_an_atypical_checkpoint_is_refused_as_a_verifier(tmp_path: Path):
    from midog.config import VerifierConfig
    from midog.verifier import Verifier

    path = build_classifier("test_resnet", 32, positive="atypical").save(tmp_path / "verifier.pt")
    with pytest.raises(WeightsError, match="classify 'atypical', not 'mitotic figure'"):
        Verifier.from_weights(path, VerifierConfig(), torch.device("cpu"))
