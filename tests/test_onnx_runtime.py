"""ONNX Runtime for the classifiers on the CPU: the same probabilities as PyTorch, the export cached, and PyTorch
whenever the export or the runtime is not there."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import midog.onnx_runtime as onnx_runtime
import midog.weights
from midog.atypical import load_atypical
from midog.classifier import build_classifier, load_classifier
from midog.config import AtypicalConfig, VerifierConfig
from midog.verifier import Verifier
from midog.weights import sha256_of, write_model_card


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))


def saved_classifier(path: Path, arch: str = "test_efficientnet", input_size: int = 48,
                     positive: str = "mitotic figure") -> Path:
    torch.manual_seed(3)
    classifier = build_classifier(arch, input_size=input_size, positive=positive)
    with torch.no_grad():  # BN statistics away from their init, so folding them into the convolutions matters
        for module in classifier.model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return classifier.save(path, meta={"note": "random tiny model for tests"})


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (20, 60, 60, 3), dtype=np.uint8)


@pytest.mark.parametrize("arch", ["test_efficientnet", "test_resnet"])
def test_onnx_runtime_gives_pytorch_probabilities(tmp_path: Path, crops: np.ndarray, arch: str):
    path = saved_classifier(tmp_path / f"{arch}.pt", arch)
    reference = load_classifier(path)
    fast = load_classifier(path).use_backend("auto", path, "verifier")
    assert (reference.backend, fast.backend) == ("torch", "onnxruntime")
    for tta, views in ((False, 8), (True, 8), (True, 4)):
        expected = reference.predict_proba(crops, tta=tta, tta_views=views, batch_size=8)
        found = fast.predict_proba(crops, tta=tta, tta_views=views, batch_size=8)
        np.testing.assert_allclose(found, expected, rtol=0, atol=1e-5)
    assert np.ptp(expected) > 1e-3  # the crops are told apart, so equal outputs are not a constant's

    cached = list((tmp_path / "tmp" / "midog-onnx").glob(f"{arch}-*-48.onnx"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    again = load_classifier(path).use_backend("onnxruntime", path, "verifier")
    assert again.onnx.path == cached[0] and cached[0].stat().st_mtime_ns == stamp  # exported once


def test_pytorch_when_asked_or_when_the_export_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture):
    path = saved_classifier(tmp_path / "verifier.pt")
    assert load_classifier(path).use_backend("torch", path, "verifier").backend == "torch"
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'"):
        load_classifier(path).use_backend("tensorrt", path, "verifier")

    def unsupported(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::something' to ONNX opset version 17 is not supported")

    monkeypatch.setattr(onnx_runtime, "export_model", unsupported)
    classifier = load_classifier(path).use_backend("auto", path, "verifier")
    assert classifier.backend == "torch"
    assert "ONNX export of verifier.pt failed" in caplog.text and "the verifier runs in PyTorch" in caplog.text


def test_the_stages_load_their_classifiers_with_their_backend(tmp_path: Path):
    verifier_path = saved_classifier(tmp_path / "verifier.pt")
    atypical_path = saved_classifier(tmp_path / "atypical.pt", positive="atypical")
    for backend in ("auto", "torch"):
        verifier = Verifier.from_weights([verifier_path, verifier_path], VerifierConfig(backend=backend),
                                         torch.device("cpu"))
        assert {c.backend for c in verifier.classifiers} == {"onnxruntime" if backend == "auto" else "torch"}
        atypical = load_atypical(AtypicalConfig(weights=str(atypical_path), backend=backend))
        assert atypical.models[0].backend == ("onnxruntime" if backend == "auto" else "torch")


def test_a_carded_checkpoint_is_hashed_once_for_its_check_and_its_export(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch):
    path = saved_classifier(tmp_path / "verifier.pt")
    write_model_card(path, {"note": "test"})
    hashed: list[Path] = []

    def counting_sha256_of(file: Path) -> str:
        hashed.append(Path(file))
        return sha256_of(file)

    monkeypatch.setattr(midog.weights, "sha256_of", counting_sha256_of)
    monkeypatch.setattr(onnx_runtime, "sha256_of", counting_sha256_of)
    classifier = load_classifier(path).use_backend("auto", path, "verifier")
    assert classifier.backend == "onnxruntime"
    assert hashed == [path]
    assert classifier.onnx.path.name == f"verifier-{sha256_of(path)[:16]}-48.onnx"
