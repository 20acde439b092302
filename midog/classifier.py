"""Binary timm image classifiers shared by the verifier (Track 1) and the atypical classifier (Track 2).

A checkpoint is a plain dict (loadable with `torch.load(weights_only=True)`):

    format        "midog-classifier/1"
    arch          timm model name
    input_size    side in pixels the model sees (crops are resized to it)
    interpolation "bilinear" or "bicubic": how crops are resized (antialiased)
    crop_pct      1.0: resize straight to input_size; below 1: resize to floor(input_size / crop_pct), then
                  centre-crop input_size (timm's eval transform). Both absent in checkpoints written before they
                  existed, which were all trained with "bilinear" and 1.0.
    mean, std     normalisation, taken from the model's own timm data config when it was built
    threshold     decision threshold on P(positive), chosen on validation
    tta_threshold optional: the threshold for P(positive) averaged over the 8 dihedral views (test-time
                  augmentation), chosen on the same validation data; absent, `threshold` serves both
    positive      name of the positive class ("atypical", "mitotic figure")
    model_kwargs  extra keyword arguments for timm.create_model (drop rates, ...)
    state_dict    the weights; loaded strictly
    meta          free-form training metadata (folds, metrics, data)

The model has one output logit; P(positive) = sigmoid(logit).

Building and loading them is here (`build_classifier`, `load_classifier`): timm models directly, foundation-model
backbones through midog.foundation. The classifier type itself, its preprocessing and the checkpoint fields it
reads are in midog.binary_classifier, which midog.foundation builds on (so this module can import midog.foundation
without it importing this one back); `BinaryClassifier` and the resize names are importable from here too.
"""

from __future__ import annotations

import difflib
import math
import os
from pathlib import Path
from typing import Any

import timm
import torch

from midog.binary_classifier import (CHECKPOINT_FORMAT, PLAIN_CROP_PCT, PLAIN_INTERPOLATION, BinaryClassifier,
                                     check_resize, pixel_size_from_state, preprocess_card, resize_from_state,
                                     tta_threshold_from_state)
from midog.config import is_probability
from midog.errors import ConfigError, WeightsError, first_line
from midog.foundation import build_foundation_classifier, is_foundation, load_foundation_classifier
from midog.pretrained import load_pretrained
from midog.weights import verify_checksum

__all__ = [  # with the names of midog.binary_classifier that other code imports from here
    "PLAIN_CROP_PCT", "PLAIN_INTERPOLATION", "BinaryClassifier", "build_classifier",
    "check_checkpoint_fields", "check_resize", "load_classifier", "preprocess_card", "require_positive",
]


def build_classifier(
    arch: str,
    input_size: int,
    positive: str = "positive",
    threshold: float = 0.5,
    model_kwargs: dict[str, Any] | None = None,
    pretrained: str | None = None,
) -> BinaryClassifier:
    """A fresh (random-initialised, never downloaded) timm model with one output logit.

    Its crops get a plain bilinear resize (`PLAIN_INTERPOLATION`, `PLAIN_CROP_PCT`), not the ImageNet eval transform
    of the architecture's timm pretrained_cfg; mean and std come from the timm data config of the architecture.

    `pretrained`: start from local pretrained weights (`midog.pretrained.load_pretrained`: a registry name such as
    "efficientnet_lite0.imagenet", or a state-dict file); their card is kept in `meta["pretrained"]`. Only for
    training: checkpoints are loaded by `load_classifier`.

    Foundation-model backbones (registry names such as "uni2-h", or any timm name whose `model_kwargs` choose a
    `method`) are built by midog.foundation, from their local pretrained weights.
    """
    model_kwargs = dict(model_kwargs or {})
    if is_foundation(arch, model_kwargs):
        if pretrained:
            raise ConfigError(f"pretrained '{pretrained}' is for timm classifiers; a foundation-model backbone "
                              "reads its own base weights (model_kwargs 'weights')")
        return build_foundation_classifier(arch, input_size, positive=positive, threshold=threshold,
                                           model_kwargs=model_kwargs)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        raise ConfigError(f"unknown backbone '{arch}': neither a timm model name nor a foundation model"
                          + (f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""))
    model = timm.create_model(arch, pretrained=False, num_classes=1, **model_kwargs)
    card = load_pretrained(model, pretrained) if pretrained else None
    data_config = timm.data.resolve_model_data_config(model)
    return BinaryClassifier(
        model=model,
        arch=arch,
        input_size=input_size,
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
        threshold=threshold,
        positive=positive,
        model_kwargs=model_kwargs,
        meta={"pretrained": card} if card else {},
    )


def load_classifier(path: str | os.PathLike[str], device: str | torch.device = "cpu",
                    foundation: Any = None) -> BinaryClassifier:
    """Load a checkpoint written by `BinaryClassifier.save`, strictly, after checking its model card's sha256.

    Foundation-model checkpoints (`kind: foundation`) are rebuilt by midog.foundation; `foundation` (a
    config.FoundationConfig, default: the shipped config) says where their pretrained base weights are.
    """
    path = Path(path)
    checked_sha256 = verify_checksum(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise WeightsError(f"cannot load classifier weights {path}: {first_line(err)}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise WeightsError(f"{path} is not a midog classifier checkpoint (format {CHECKPOINT_FORMAT})")
    if state.get("kind", "timm") == "foundation":
        return load_foundation_classifier(state, path, device=device, config=foundation)
    if state.get("kind", "timm") != "timm":
        raise WeightsError(f"{path} has an unknown classifier kind '{state['kind']}'")
    check_checkpoint_fields(state, path)
    try:
        model = timm.create_model(state["arch"], pretrained=False, num_classes=1, **state.get("model_kwargs", {}))
    except (RuntimeError, TypeError, ValueError) as err:  # unknown arch, arguments it does not take
        raise WeightsError(f"{path}: cannot build {state['arch']!r}: {first_line(err)}") from None
    try:
        model.load_state_dict(state["state_dict"], strict=True)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise WeightsError(f"{path} does not fit {state['arch']}: {first_line(err)}") from None
    model.eval().to(device)
    return BinaryClassifier(
        model=model,
        arch=state["arch"],
        input_size=int(state["input_size"]),
        mean=tuple(state["mean"]),
        std=tuple(state["std"]),
        threshold=float(state["threshold"]),
        tta_threshold=tta_threshold_from_state(state),
        positive=state.get("positive", "positive"),
        model_kwargs=state.get("model_kwargs", {}),
        meta=state.get("meta", {}),
        pixel_size_um=pixel_size_from_state(state, path),
        **resize_from_state(state, path),
        checkpoint_sha256=checked_sha256,
    )


def require_positive(clf: BinaryClassifier, positive: str, name: str, role: str) -> BinaryClassifier:
    """`clf` when it scores `positive`; WeightsError naming the file and the `role` it cannot fill otherwise (e.g. an
    atypical classifier where the verifier belongs)."""
    if clf.positive != positive:
        raise WeightsError(f"weights '{name}' classify '{clf.positive}', not '{positive}': not {role}")
    return clf


def check_checkpoint_fields(state: dict[str, Any], path: Path) -> None:
    """WeightsError naming the first field of a timm classifier checkpoint that `BinaryClassifier` cannot use."""
    def bad(field_name: str, expected: str) -> WeightsError:
        return WeightsError(f"{path} is not a usable classifier checkpoint: '{field_name}' is "
                            f"{state.get(field_name)!r:.60}, expected {expected}")

    for key in ("arch", "state_dict", "input_size", "mean", "std", "threshold"):
        if key not in state:
            raise WeightsError(f"{path} is not a usable classifier checkpoint: field '{key}' is missing")
    if not isinstance(state["arch"], str):
        raise bad("arch", "a timm model name")
    if not isinstance(state["state_dict"], dict):
        raise bad("state_dict", "a state dict")
    if not isinstance(state.get("model_kwargs", {}), dict):
        raise bad("model_kwargs", "a mapping")
    size = state["input_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise bad("input_size", "a positive integer")
    for key in ("mean", "std"):
        values = state[key]
        if not (isinstance(values, (list, tuple)) and len(values) == 3
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)):
            raise bad(key, "three numbers (RGB)")
    if not all(v > 0 for v in state["std"]):
        raise bad("std", "three positive numbers")
    if not is_probability(state["threshold"]):
        raise bad("threshold", "a number in [0, 1]")
    if state.get("tta_threshold") is not None and not is_probability(state["tta_threshold"]):
        raise bad("tta_threshold", "null or a number in [0, 1]")
