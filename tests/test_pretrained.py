"""Pretrained starting weights: the real EfficientNet-Lite0/1/2 packages, and stand-ins saved to tmp_path."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from midog.classifier import build_classifier
from midog.errors import ConfigError, WeightsError
from midog.pretrained import PRETRAINED_SOURCES, PretrainedSource, head_keys, load_pretrained, map_keys_by_order

SOURCE = "efficientnet_lite0.imagenet"
ARCH = PRETRAINED_SOURCES[SOURCE].arch
HEAD = ["classifier.weight", "classifier.bias"]
MILITARY_UNIFORM = 652  # ImageNet class of matplotlib's grace_hopper.jpg
TENSORS = {"efficientnet_lite0.imagenet": 296, "efficientnet_lite1.imagenet": 386, "efficientnet_lite2.imagenet": 386}
PACKAGED = list(TENSORS)  # the registry's package sources, with the tensors of each file


def package_state(source: str = SOURCE) -> dict[str, torch.Tensor]:
    """The real package's state dict (foreign key names); skips when the package is not installed."""
    entry = PRETRAINED_SOURCES[source]
    module = pytest.importorskip(entry.package, reason=f"{entry.requirement} (requirements-dev.txt) is not installed")
    path = importlib.resources.files(module).joinpath(entry.file)
    return torch.load(str(path), map_location="cpu", weights_only=True)


def fresh(num_classes: int = 1, arch: str = ARCH, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(arch, pretrained=False, num_classes=num_classes).eval()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, dict[str, torch.Tensor], Path]:
    """A registry source served by a package written to tmp_path: a random tf_efficientnet_lite0 with a 10-class
    head whose keys are renamed k0, k1, ... in timm's order (a foreign checkpoint, like the real package's)."""
    state = {f"k{i}": v for i, v in enumerate(fresh(num_classes=10, seed=1).state_dict().values())}
    package = tmp_path / "standin_weights_pkg"
    (package / "models").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    torch.save(state, package / "models" / "w.pth")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, package.name, raising=False)  # imported by an earlier test from its tmp_path
    monkeypatch.setitem(PRETRAINED_SOURCES, "standin", PretrainedSource(
        arch=ARCH, package=package.name, requirement="standin==0", file="models/w.pth", licence="test",
        sha256=sha256(package / "models" / "w.pth")))
    return "standin", state, package / "models" / "w.pth"


# ------------------------------------------------------------------------------------------- the real package

@pytest.mark.parametrize("source", PACKAGED)
def test_package_weights_load_bit_exactly_except_the_head(source: str) -> None:
    foreign = package_state(source)
    model = fresh(arch=PRETRAINED_SOURCES[source].arch)

    card = load_pretrained(model, source)

    loaded = model.state_dict()
    assert len(loaded) == len(foreign) == TENSORS[source]
    for (key, tensor), file_tensor in zip(loaded.items(), foreign.values()):
        if key in HEAD:
            continue  # one logit: re-initialised small (test_fresh_head_starts_near_one_half)
        else:
            assert tensor.dtype == file_tensor.dtype and torch.equal(tensor, file_tensor), key
    assert card["head_skipped"] == HEAD and card["tensors_loaded"] == TENSORS[source] - 2
    assert card["sha256"] == PRETRAINED_SOURCES[source].sha256 and card["licence"] == "Apache-2.0"
    assert card["file"] == f"{PRETRAINED_SOURCES[source].package}/{PRETRAINED_SOURCES[source].file}"


@pytest.mark.parametrize("source", PACKAGED)
def test_package_weights_classify_an_imagenet_photo(source: str) -> None:
    """With its 1000-class head loaded too, the model recognises grace_hopper.jpg (shipped with matplotlib) as
    'military uniform' when fed the way the arch's timm data config says (mean = std = 0.5), and a random init
    does not."""
    package_state(source)
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
        image = np.array(Image.open(handle).convert("RGB").resize((224, 224), Image.BICUBIC))
    model = fresh(num_classes=1000, arch=PRETRAINED_SOURCES[source].arch)
    config = timm.data.resolve_model_data_config(model)
    assert config["mean"] == config["std"] == (0.5, 0.5, 0.5)
    x = torch.from_numpy(image).permute(2, 0, 1).float().div(255)[None]
    x = (x - torch.tensor(config["mean"]).view(1, 3, 1, 1)) / torch.tensor(config["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        random_top = int(model(x).argmax())
        card = load_pretrained(model, source)
        probs = model(x).softmax(-1)[0]
    assert card["head_skipped"] == [] and card["tensors_loaded"] == TENSORS[source]
    assert int(probs.argmax()) == MILITARY_UNIFORM and float(probs[MILITARY_UNIFORM]) > 0.3
    assert random_top != MILITARY_UNIFORM


def test_package_weights_refuse_the_same_shaped_non_tf_arch() -> None:
    """efficientnet_lite0 has the same keys and shapes but symmetric padding and another BatchNorm eps."""
    package_state()
    model = fresh(arch="efficientnet_lite0")
    before = model.conv_stem.weight.clone()
    with pytest.raises(WeightsError, match="use arch: tf_efficientnet_lite0") as err:
        load_pretrained(model, SOURCE)
    assert "\n" not in str(err.value)
    assert torch.equal(model.conv_stem.weight, before)


def test_build_classifier_starts_from_the_package_weights() -> None:
    foreign = package_state()
    clf = build_classifier(ARCH, 64, positive="mitotic figure", pretrained=SOURCE)
    assert torch.equal(clf.model.conv_stem.weight, foreign["_conv_stem.weight"])
    assert clf.meta["pretrained"]["source"] == SOURCE and clf.meta["pretrained"]["head_skipped"] == HEAD
    assert clf.mean == clf.std == (0.5, 0.5, 0.5)  # the arch's timm data config, which these weights need
    assert clf.model.get_classifier().out_features == 1


# ------------------------------------------------------------------------------------------- stand-ins

def test_stand_in_source_maps_by_order_and_skips_only_the_head(stand_in) -> None:
    name, state, _ = stand_in
    model = fresh()
    card = load_pretrained(model, name)
    for (key, tensor), file_tensor in zip(model.state_dict().items(), state.values()):
        if key not in HEAD:
            assert torch.equal(tensor, file_tensor), key
    assert card["head_skipped"] == HEAD and card["tensors_loaded"] == len(state) - 2


def test_fresh_head_starts_near_one_half() -> None:
    """timm's U(-1, 1) init of a 1-logit head on 1,280 pretrained features gives logits of tens (probabilities
    saturate at 0 or 1); the re-initialised head starts every crop near P = 0.5."""
    package_state()  # skips without the package
    torch.manual_seed(0)
    images = torch.rand(8, 3, 64, 64) * 2 - 1
    as_created = fresh().eval()
    loaded = fresh().eval()
    load_pretrained(loaded, SOURCE)
    with torch.no_grad():
        assert as_created.classifier.weight.abs().max() > 0.5  # what timm made: the head being replaced
        logits = loaded(images)
    assert logits.abs().max() < 1.0
    assert loaded.classifier.bias.abs().max() == 0 and loaded.classifier.weight.std() < 0.02


def test_map_keys_by_order_pairs_in_order_and_allows_another_class_count() -> None:
    own = fresh().state_dict()
    foreign = {f"k{i}": v for i, v in enumerate(fresh(num_classes=7, seed=2).state_dict().values())}
    mapped = map_keys_by_order(foreign, own, frozenset(HEAD))
    assert list(mapped) == list(own)
    assert mapped["conv_stem.weight"] is foreign["k0"] and mapped["classifier.weight"].shape == (7, 1280)
    with pytest.raises(WeightsError, match="tensor 294"):  # without the head exemption the class count is a mismatch
        map_keys_by_order(foreign, own)


@pytest.mark.parametrize("change", ["shape", "missing"])
def test_stand_in_of_another_architecture_is_refused_in_one_line(stand_in, change: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    name, state, path = stand_in
    if change == "shape":
        state["k40"] = torch.zeros(*state["k40"].shape[:-1], state["k40"].shape[-1] + 1)
        expected = "tensor 40"
    else:
        del state["k40"]
        expected = "295 tensors in the file, 296 in the model"
    torch.save(state, path)
    monkeypatch.setitem(PRETRAINED_SOURCES, name, dataclasses.replace(PRETRAINED_SOURCES[name], sha256=sha256(path)))
    model = fresh()
    before = model.conv_stem.weight.clone()
    with pytest.raises(WeightsError, match=expected) as err:
        load_pretrained(model, name)
    assert "\n" not in str(err.value) and "another architecture" in str(err.value)
    assert torch.equal(model.conv_stem.weight, before)  # nothing half-loaded


def test_stand_in_with_another_checksum_is_refused(stand_in, monkeypatch: pytest.MonkeyPatch) -> None:
    name, _, _ = stand_in
    monkeypatch.setitem(PRETRAINED_SOURCES, name, dataclasses.replace(PRETRAINED_SOURCES[name], sha256="0" * 64))
    with pytest.raises(WeightsError, match="checksum mismatch for pretrained 'standin'"):
        load_pretrained(fresh(), name)


def test_missing_package_names_its_requirement(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(PRETRAINED_SOURCES, "absent", PretrainedSource(
        arch=ARCH, package="no_such_weights_package_xyz", requirement="no-such==1", file="w.pth", licence="x",
        sha256="0" * 64))
    with pytest.raises(WeightsError, match=r"needs the package no-such==1"):
        load_pretrained(fresh(), "absent")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_file_with_timm_names_loads_by_name(tmp_path: Path, suffix: str) -> None:
    source_model = fresh(num_classes=1000, seed=3)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(source_model.state_dict(), str(path))
    else:
        torch.save(source_model.state_dict(), path)
    model = fresh()
    card = load_pretrained(model, str(path))
    for key, tensor in model.state_dict().items():
        if key not in HEAD:
            assert torch.equal(tensor, source_model.state_dict()[key]), key
    assert card["head_skipped"] == HEAD and card["sha256"] == sha256(path) and card["licence"] is None


def test_local_file_with_foreign_names_or_unknown_source_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "foreign.pth"
    torch.save({f"k{i}": v for i, v in enumerate(fresh().state_dict().values())}, path)
    with pytest.raises(WeightsError, match="296 model tensors not in the file"):
        load_pretrained(fresh(), str(path))
    with pytest.raises(WeightsError, match="unknown pretrained source 'imagenet'"):
        load_pretrained(fresh(), "imagenet")
    with pytest.raises(WeightsError, match="does not exist"):
        load_pretrained(fresh(), str(tmp_path / "absent.pt"))


def test_head_keys_are_the_classifier_tensors() -> None:
    assert head_keys(fresh()) == frozenset(HEAD)
    assert head_keys(fresh(num_classes=0)) == frozenset()


def test_build_classifier_with_stand_in_and_the_verifier_card(stand_in) -> None:
    from training.train_verifier import load_verifier_config, model_card

    name, state, _ = stand_in
    cfg = load_verifier_config(None, {"arch": ARCH, "pretrained": name})
    clf = build_classifier(cfg.arch, 32, positive="mitotic figure", pretrained=cfg.pretrained)
    assert torch.equal(clf.model.conv_stem.weight, state["k0"])
    run = {"best_threshold": 0.5, "best_metrics": {}, "best_epoch": 0, "epoch": 0, "steps": 0}
    assert model_card(cfg, clf, run, {}, None)["pretrained"] == clf.meta["pretrained"]
    assert build_classifier(ARCH, 32).meta == {}
    with pytest.raises(ConfigError, match="foundation-model backbone"):
        build_classifier("uni", 224, model_kwargs={"method": "linear"}, pretrained=name)
