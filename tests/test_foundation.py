"""Foundation-model backbones: registry, offline weight lookup, pooling, checkpoints (tiny random ViTs stand in)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from midog.classifier import build_classifier, load_classifier
from midog.config import FoundationConfig, load_config
from midog.errors import ConfigError, WeightsError
from midog.foundation import (REGISTRY, BackboneSpec, PooledClassifier, create_backbone, find_base_weights,
                              options_from_dict, resolve_spec)

TINY = {"img_size": 32, "depth": 2}


def tiny_options(method: str, weights: Path, **extra) -> dict:
    return {"method": method, "weights": str(weights), "timm_kwargs": TINY, "pooling": "cls+mean", **extra}


@pytest.fixture
def tiny_base(tmp_path: Path) -> Path:
    """A random-initialised test_vit saved as the 'pretrained' foundation weights."""
    torch.manual_seed(0)
    backbone = create_backbone(resolve_spec("test_vit", options_from_dict({"timm_kwargs": TINY})))
    path = tmp_path / "base.safetensors"
    save_file(backbone.state_dict(), str(path))
    return path


def crops(n: int = 6, size: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_hf_hub_names_map_to_the_registry():
    assert resolve_spec("hf-hub:MahmoodLab/UNI2-h").name == "uni2-h"
    assert resolve_spec("hf_hub:paige-ai/Virchow2").pooling == "cls+mean"
    assert resolve_spec("H-optimus-0").mean == pytest.approx((0.707223, 0.578729, 0.703617))
    with pytest.raises(ConfigError, match="not in the foundation registry"):  # exit code 5, one line
        build_classifier("hf-hub:someone/unknown", 224)  # never passed on to timm, which would reach for the hub


def test_cls_plus_mean_pooling_skips_register_tokens():
    torch.manual_seed(0)
    backbone = create_backbone(BackboneSpec("t", "test_vit", dict(TINY, reg_tokens=4))).eval()
    model = PooledClassifier(backbone, "cls+mean")
    x = torch.randn(2, 3, 32, 32)
    tokens = backbone.forward_features(x)  # class, 4 registers, 4 patches
    assert tokens.shape[1] == 1 + 4 + 4
    expected = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=-1)
    torch.testing.assert_close(model.features(x), expected)
    torch.testing.assert_close(PooledClassifier(backbone, "cls").features(x), backbone(x))  # timm's token pool


def test_missing_foundation_weights_name_the_file_and_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    config = FoundationConfig(dir=str(tmp_path / "foundation"))
    with pytest.raises(WeightsError) as err:
        find_base_weights(REGISTRY["uni2-h"], None, config)
    message = str(err.value)
    assert str(tmp_path / "foundation" / "uni2-h") in message
    assert "hf download MahmoodLab/UNI2-h" in message and "docs/foundation-models.md" in message
    with pytest.raises(WeightsError, match="nowhere.safetensors"):
        find_base_weights(REGISTRY["uni"], str(tmp_path / "nowhere.safetensors"), config)


def test_building_without_weights_fails_before_creating_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MIDOG_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(WeightsError, match="foundation model 'h-optimus-1' not found"):
        build_classifier("h-optimus-1", 224, model_kwargs={"method": "linear"})


def test_weights_found_in_foundation_dir_and_hf_cache(tmp_path: Path, tiny_base: Path):
    spec = BackboneSpec("tiny", "test_vit", dict(TINY), hub_id="org/Tiny-Model")
    folder = tmp_path / "foundation" / "tiny"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(tiny_base.read_bytes())
    assert find_base_weights(spec, None, FoundationConfig(dir=str(tmp_path / "foundation"))) \
        == folder / "model.safetensors"
    snapshot = tmp_path / "hub" / "models--org--Tiny-Model" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot / "pytorch_model.bin").write_bytes(b"x")
    (tmp_path / "hub" / "models--org--Tiny-Model" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--Tiny-Model" / "refs" / "main").write_text("0123abc")
    config = FoundationConfig(dir=str(tmp_path / "empty"), hf_cache=str(tmp_path / "hub"))
    assert find_base_weights(spec, None, config) == snapshot / "pytorch_model.bin"
    # an explicit Hugging Face cache folder of one model works too
    assert find_base_weights(spec, str(tmp_path / "hub" / "models--org--Tiny-Model"), config) \
        == snapshot / "pytorch_model.bin"


def test_foundation_config_section_is_overridable_from_the_environment():
    config = load_config(environ={"MIDOG_FOUNDATION__DIR": "/models/fm", "MIDOG_FOUNDATION__HF_CACHE": "/hf"})
    assert config.foundation.dir == "/models/fm" and config.foundation.hf_cache == "/hf"
    assert load_config(environ={}).foundation == FoundationConfig()  # the variables applied to that call only


def test_base_weights_that_do_not_fit_are_refused(tmp_path: Path):
    other = create_backbone(BackboneSpec("t", "test_vit", {"img_size": 32, "depth": 3}))
    path = tmp_path / "deeper.safetensors"
    save_file(other.state_dict(), str(path))
    with pytest.raises(WeightsError, match="does not fit"):
        build_classifier("test_vit", 32, model_kwargs=tiny_options("linear", path))


def test_linear_checkpoint_holds_only_the_head_and_reloads_strictly(tmp_path: Path, tiny_base: Path):
    clf = build_classifier("test_vit", 32, positive="atypical", model_kwargs=tiny_options("linear", tiny_base))
    trainable = [n for n, p in clf.model.named_parameters() if p.requires_grad]
    assert trainable == ["head.weight", "head.bias"]
    torch.nn.init.normal_(clf.model.head.weight)
    clf.threshold = 0.3
    path = clf.save(tmp_path / "probe.pt")
    state = torch.load(path, weights_only=True)
    assert state["kind"] == "foundation" and sorted(state["state_dict"]) == ["head.bias", "head.weight"]
    loaded = load_classifier(path)
    assert loaded.threshold == pytest.approx(0.3) and loaded.positive == "atypical"
    np.testing.assert_allclose(loaded.predict_proba(crops(), tta=True), clf.predict_proba(crops(), tta=True),
                               atol=1e-6)
    state["state_dict"]["backbone.norm.weight"] = torch.ones(64)  # a key the method does not train
    torch.save(state, tmp_path / "tampered.pt")
    with pytest.raises(WeightsError, match="unexpected"):
        load_classifier(tmp_path / "tampered.pt")


def test_full_checkpoint_is_self_contained(tmp_path: Path):
    clf = build_classifier("test_vit", 32, model_kwargs={"method": "full", "timm_kwargs": TINY})
    path = clf.save(tmp_path / "full.pt")
    np.testing.assert_allclose(load_classifier(path).predict_proba(crops()), clf.predict_proba(crops()), atol=1e-6)


def test_unknown_options_are_refused():
    with pytest.raises(ValueError, match="unknown foundation model options"):
        options_from_dict({"method": "lora", "rank": 8})
    with pytest.raises(ValueError, match="unknown LoRA options"):
        options_from_dict({"lora": {"rank": 8}})
    with pytest.raises(ValueError, match="method"):
        options_from_dict({"method": "adapter"})


def test_fold_ensemble_of_foundation_checkpoints_averages_in_the_atypical_stage(tmp_path: Path, tiny_base: Path):
    """process.py's atypical stage takes foundation checkpoints like any other: P is the members' mean."""
    from midog.atypical import load_atypical
    from midog.config import AtypicalConfig

    torch.manual_seed(1)
    lora = build_classifier("test_vit", 32, positive="atypical", model_kwargs=tiny_options("lora", tiny_base))
    for name, param in lora.model.named_parameters():
        if param.requires_grad:  # as if trained: non-zero adapters
            torch.nn.init.normal_(param, std=0.2)
    lora.threshold = 0.4
    linear = build_classifier("test_vit", 32, positive="atypical", model_kwargs=tiny_options("linear", tiny_base))
    linear.threshold = 0.6
    plain = build_classifier("test_vit", 32, positive="atypical", model_kwargs=None)  # an end-to-end timm member
    plain.threshold = 0.5
    paths = [m.save(tmp_path / f"fold{k}.pt") for k, m in enumerate((lora, linear, plain))]
    stage = load_atypical(AtypicalConfig(weights=[str(p) for p in paths], tta=False))
    x = crops(5, size=48, seed=3)
    members = [load_classifier(p).predict_proba(x) for p in paths]
    assert not np.allclose(members[0], members[1])
    np.testing.assert_allclose(stage.predict_proba(x), np.mean(members, axis=0), atol=1e-6)
    np.testing.assert_allclose(members[0], lora.predict_proba(x), atol=1e-5)
    assert stage.threshold == pytest.approx(0.5)


def test_lora_with_gradient_checkpointing_still_trains_every_adapter(tiny_base: Path):
    clf = build_classifier("test_vit", 32, model_kwargs=tiny_options("lora", tiny_base, grad_checkpointing=True))
    assert clf.model.backbone.grad_checkpointing
    clf.model.train()
    clf.model(clf.preprocess(crops(2))).sum().backward()
    adapters = {n: p for n, p in clf.model.named_parameters() if p.requires_grad}
    assert all(p.grad is not None for p in adapters.values())
    # B starts at zero (so A's gradient is zero on the first step); B's must flow through the recomputed blocks
    assert all(float(p.grad.abs().sum()) > 0 for n, p in adapters.items() if "lora_B" in n and "blocks." in n)


# ---------------------------------------------------------------------------------------------------- resize

GIGAPATH_TINY = {"depth": 1, "embed_dim": 32, "num_heads": 2}  # the registry entry's layout, a few layers wide


def he_like_crop(size: int = 128, seed: int = 0) -> np.ndarray:
    """A smooth colour field with fine noise: an AMi-Br-sized crop whose resampling differences show."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(0, 255, (1, 3, 16, 16))).float()
    field = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
    return (field.numpy() + rng.normal(0, 8, (size, size, 3))).clip(0, 255).astype(np.uint8)


@pytest.fixture
def gigapath_stand_in(tmp_path: Path) -> Path:
    """Random "pretrained" weights of the prov-gigapath registry entry, narrowed to one small block."""
    torch.manual_seed(0)
    spec = resolve_spec("prov-gigapath", options_from_dict({"timm_kwargs": GIGAPATH_TINY}))
    path = tmp_path / "gigapath.safetensors"
    save_file(create_backbone(spec).state_dict(), str(path))
    return path


def test_a_bicubic_crop_pct_registry_entry_resizes_as_its_card(tmp_path: Path, gigapath_stand_in: Path):
    """Prov-GigaPath's card: Resize(256, bicubic) + CenterCrop(224) + ImageNet normalisation; kept through a save."""
    from PIL import Image
    from torchvision import transforms

    clf = build_classifier("prov-gigapath", 0, positive="atypical",
                           model_kwargs={"method": "linear", "weights": str(gigapath_stand_in),
                                         "timm_kwargs": GIGAPATH_TINY})
    assert (clf.input_size, clf.interpolation, clf.crop_pct) == (224, "bicubic", 0.875)
    crop = he_like_crop()
    mean, std = torch.tensor(clf.mean).view(1, 3, 1, 1), torch.tensor(clf.std).view(1, 3, 1, 1)
    card = transforms.v2.Compose([transforms.v2.Resize(256, interpolation=transforms.v2.InterpolationMode.BICUBIC,
                                                       antialias=True), transforms.v2.CenterCrop(224)])
    expected = (card(torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255.0) - mean) / std
    assert torch.equal(clf.preprocess(crop[None]), expected)
    # the card's own pipeline runs on PIL images (8-bit, clamped): the same within rounding; bilinear is not
    pil = transforms.Compose([transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
                              transforms.CenterCrop(224), transforms.ToTensor()])(Image.fromarray(crop))[None]
    assert float(((clf.preprocess(crop[None]) * std + mean).clamp(0, 1) - pil).abs().mean()) < 0.5 / 255
    bilinear = dataclasses.replace(clf, interpolation="bilinear")
    assert float(((bilinear.preprocess(crop[None]) * std + mean).clamp(0, 1) - pil).abs().mean()) > 1 / 255
    loaded = load_classifier(clf.save(tmp_path / "probe.pt"))
    assert (loaded.interpolation, loaded.crop_pct) == ("bicubic", 0.875)
    assert torch.equal(loaded.preprocess(crop[None]), expected)


def test_a_plain_timm_backbone_resizes_as_its_pretrained_cfg_when_pretrained(tiny_base: Path):
    pretrained = build_classifier("test_vit", 32, model_kwargs=tiny_options("linear", tiny_base))
    data_config = timm.data.resolve_model_data_config(pretrained.model.backbone)
    assert (pretrained.interpolation, pretrained.crop_pct) == (data_config["interpolation"], data_config["crop_pct"])
    assert (pretrained.interpolation, pretrained.crop_pct) == ("bicubic", 0.95)  # 32 px: resize 33, centre-crop 32
    scratch = build_classifier("test_vit", 32, model_kwargs={"method": "full", "timm_kwargs": TINY})
    assert (scratch.interpolation, scratch.crop_pct) == ("bilinear", 1.0)  # trained from scratch: a plain resize
    chosen = build_classifier("test_vit", 32, model_kwargs=tiny_options("linear", tiny_base, interpolation="bilinear",
                                                                         crop_pct=0.875))
    assert (chosen.interpolation, chosen.crop_pct) == ("bilinear", 0.875)
    with pytest.raises(ValueError, match="crop_pct"):
        options_from_dict({"crop_pct": 1.2})
