"""Linear probing end to end on generated AMi-Br crops, a tiny random ViT standing in for the foundation model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from midog.classifier import load_classifier
from midog.foundation import create_backbone, options_from_dict, resolve_spec
from tests.training.fake_amibr import write_amibr
from training import linear_probe
from training.linear_probe import ProbeConfig, cross_validate_probe, fit_head, head_probabilities

TINY = {"img_size": 32, "depth": 2}


@pytest.fixture
def probe_cfg(tmp_path: Path) -> ProbeConfig:
    torch.manual_seed(0)
    backbone = create_backbone(resolve_spec("test_vit", options_from_dict({"timm_kwargs": TINY})))
    save_file(backbone.state_dict(), str(tmp_path / "base.safetensors"))
    root = write_amibr(tmp_path / "amibr")
    return ProbeConfig(data_root=str(root), backbone="test_vit", weights=str(tmp_path / "base.safetensors"),
                       pooling="cls+mean", timm_kwargs=TINY, input_size=32, folds=3, device="cpu",
                       cache=str(tmp_path / "cache"), out=str(tmp_path / "out"))


def test_probe_cross_validates_learns_and_caches(probe_cfg: ProbeConfig, monkeypatch: pytest.MonkeyPatch):
    out = Path(probe_cfg.out)
    clf, results = cross_validate_probe(probe_cfg, out)
    assert [r.fold for r in results] == [0, 1, 2]
    summary = json.loads((out / "cv_summary.json").read_text())
    assert summary["cv"]["balanced_accuracy"]["mean"] >= 0.9  # dark vs faint blob: easy for any features
    assert summary["data"]["slides"] == 6
    assert len(list(Path(probe_cfg.cache).glob("*.npz"))) == 1

    # the saved fold head is the fitted one: the checkpoint reproduces the probe's validation probabilities
    fold0 = load_classifier(out / "fold0" / "best.pt")
    state = torch.load(out / "fold0" / "best.pt", weights_only=True)
    assert sorted(state["state_dict"]) == ["head.bias", "head.weight"]
    assert fold0.threshold == pytest.approx(results[0].threshold)
    assert fold0.meta["val"]["balanced_accuracy"] == pytest.approx(results[0].metrics["balanced_accuracy"])

    # a second run reads the cached features instead of running the backbone
    def no_extraction(*args, **kwargs):
        raise AssertionError("features were extracted again")

    monkeypatch.setattr(linear_probe, "extract_features", no_extraction)
    _, again = cross_validate_probe(probe_cfg, out)
    assert [r.metrics for r in again] == [r.metrics for r in results]


def test_fit_head_folds_the_standardisation_into_the_weights():
    rng = np.random.default_rng(0)
    features = rng.normal(5.0, 3.0, (200, 4))
    labels = (features[:, 0] + 0.5 * rng.normal(size=200) > 5.5).astype(int)
    weight, bias = fit_head(features, labels)
    from sklearn.linear_model import LogisticRegression

    scaled = (features - features.mean(0)) / (features.std(0) + 1e-6)
    reference = LogisticRegression(class_weight="balanced", max_iter=5000, random_state=0).fit(scaled, labels)
    np.testing.assert_allclose(head_probabilities(features, weight, bias), reference.predict_proba(scaled)[:, 1],
                               atol=1e-5)


def test_a_device_the_machine_lacks_is_one_line_naming_the_probes_option(probe_cfg: ProbeConfig, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         capsys: pytest.CaptureFixture[str]):
    import dataclasses

    import yaml

    from training import linear_probe

    config = tmp_path / "probe.yaml"
    config.write_text(yaml.safe_dump(dataclasses.asdict(probe_cfg)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert linear_probe.main(["--config", str(config), "--device", "cuda"]) == 5
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: the probe's device is 'cuda', but this machine has 0 CUDA")
