"""`BinaryClassifier`: a timm model plus everything needed to turn uint8 RGB crops into P(positive), the one type
the verifier (Track 1), the atypical classifier (Track 2) and every training loop use, whatever its backbone.

Here too: its preprocessing (resize, centre crop, normalise), its test-time views, and reading its checkpoint's
preprocessing and calibration fields. The checkpoint format is described in midog/classifier.py, which builds and
loads classifiers; midog.foundation subclasses `BinaryClassifier` for foundation-model backbones.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import center_crop

from midog.config import TTA_VIEW_COUNTS
from midog.devices import batches_halving_on_oom
from midog.errors import WeightsError
from midog.weights import DEFAULT_PIXEL_SIZE_UM, read_model_card

CHECKPOINT_FORMAT = "midog-classifier/1"
INTERPOLATIONS = ("bilinear", "bicubic")
PLAIN_INTERPOLATION = "bilinear"
PLAIN_CROP_PCT = 1.0
"""A plain resize: models trained from scratch here, and every checkpoint without `interpolation`/`crop_pct`."""


def check_resize(interpolation: str, crop_pct: float) -> None:
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got '{interpolation}'")
    if not 0.0 < float(crop_pct) <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")


def resize_side(input_size: int, crop_pct: float) -> int:
    """The side crops are resized to before the centre crop: timm's `floor(input_size / crop_pct)`."""
    return int(input_size) if crop_pct >= 1.0 else math.floor(input_size / crop_pct)


def resize_and_crop(batch: torch.Tensor, input_size: int, interpolation: str, crop_pct: float) -> torch.Tensor:
    """(N, C, H, W) float → (N, C, input_size, input_size), antialiased.

    A square crop gets exactly torchvision's `Resize(resize_side, interpolation, antialias=True)` +
    `CenterCrop(input_size)`; a non-square one is squashed to a square first (as crop_pct 1 always did).
    """
    side = resize_side(input_size, crop_pct)
    if batch.shape[-1] != side or batch.shape[-2] != side:
        batch = F.interpolate(batch, size=(side, side), mode=interpolation, antialias=True, align_corners=False)
    if side != input_size:
        batch = center_crop(batch, [input_size, input_size])
    return batch


@dataclass
class BinaryClassifier:
    """A timm model plus everything needed to turn uint8 RGB crops into P(positive)."""

    model: torch.nn.Module
    arch: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    threshold: float = 0.5
    positive: str = "positive"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    tta_threshold: float | None = None
    """The threshold for TTA-averaged probabilities, when it was chosen on them (averaging pulls them inward)."""
    interpolation: str = PLAIN_INTERPOLATION
    """How crops are resized to the input size: the backbone's own data config for a pretrained backbone."""
    crop_pct: float = PLAIN_CROP_PCT
    """Below 1: resize to floor(input_size / crop_pct), then centre-crop input_size (timm's eval transform)."""
    pixel_size_um: float = DEFAULT_PIXEL_SIZE_UM
    """µm per pixel of the crops it was trained on: the pipeline cuts its crops at this scale."""
    batch_cap: int | None = field(default=None, repr=False)
    """Set after a GPU out-of-memory error: the batch size that `predict_proba` uses at most from then on."""
    onnx: Any = field(default=None, repr=False)
    """A `midog.onnx_runtime.OnnxModel` of `model` (`use_backend`): `predict_proba` then runs in ONNX Runtime."""
    checkpoint_sha256: str | None = field(default=None, repr=False)
    """The sha256 `load_classifier` checked against the model card (None: not loaded from a carded file): the
    ONNX export's cache key, so the file is hashed once."""

    def __post_init__(self) -> None:
        check_resize(self.interpolation, self.crop_pct)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def decision_threshold(self, tta: bool) -> float:
        """The threshold for probabilities from `predict_proba(..., tta=tta)`."""
        return float(self.tta_threshold) if tta and self.tta_threshold is not None else float(self.threshold)

    def to(self, device: str | torch.device) -> "BinaryClassifier":
        self.model.to(device)
        return self

    def preprocess(self, crops: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 RGB crops (N, H, W, 3) → normalised float tensor (N, 3, S, S) on the model's device.

        The one preprocessing of training (train_classifier, LoRA, linear probe) and inference alike: resize
        (`interpolation`, `crop_pct`; see `resize_and_crop`), then normalise.
        """
        batch = torch.as_tensor(crops)
        if batch.ndim == 3:
            batch = batch.unsqueeze(0)
        batch = batch.to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
        batch = resize_and_crop(batch, self.input_size, self.interpolation, self.crop_pct)
        mean = torch.tensor(self.mean, device=batch.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=batch.device).view(1, 3, 1, 1)
        return (batch - mean) / std

    @torch.inference_mode()
    def predict_proba(self, crops: np.ndarray | torch.Tensor, tta: bool = False, batch_size: int = 64,
                      tta_views: int = 8) -> np.ndarray:
        """P(positive) for each crop, in order. With `tta`, the mean over the `tta_views` views of `dihedral_views`
        (8: every rotation and reflection; 4: the rotations).

        Out of GPU memory, the batch is halved (and stays so for later calls: `batch_cap`) and the same crops are
        tried again; only a batch of one that does not fit is an error.
        """
        self.model.eval()
        size = min(batch_size, self.batch_cap or batch_size)
        out, last_size = batches_halving_on_oom(len(crops), size, lambda start, stop: self._predict_batch(
            crops[start:stop], tta, tta_views), self.device, f"{self.positive} classifier")
        if last_size < size:
            self.batch_cap = last_size
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def _predict_batch(self, crops: np.ndarray | torch.Tensor, tta: bool, tta_views: int) -> np.ndarray:
        batch = self.preprocess(crops)
        views = dihedral_views(batch, tta_views) if tta else [batch]
        forward = self.onnx if self.onnx is not None else self.model
        return torch.stack([torch.sigmoid(forward(v).float().view(-1)) for v in views]).mean(0).cpu().numpy()

    @property
    def backend(self) -> str:
        return "onnxruntime" if self.onnx is not None else "torch"

    def use_backend(self, backend: str, weights: str | os.PathLike[str], what: str) -> "BinaryClassifier":
        """Run `predict_proba` in ONNX Runtime when `backend` (`verifier.backend`, `atypical.backend`) is auto or
        onnxruntime and the model is on the CPU; `weights`: the checkpoint it was loaded from (the export's cache
        key). A foundation-model backbone stays in PyTorch: its base weights are not in that file."""
        from midog.config import BACKENDS
        from midog.onnx_runtime import (CLASSIFIER_CALL_BATCH, OnnxModel, cached_export, export_model,
                                        onnx_runtime_available)

        if backend not in BACKENDS:
            raise ValueError(f"unknown backend '{backend}'; expected one of {', '.join(BACKENDS)}")
        self.onnx = None
        if backend == "torch" or self.device.type != "cpu" or type(self) is not BinaryClassifier:
            return self
        if not onnx_runtime_available(what):
            return self
        shape = (3, self.input_size, self.input_size)
        path = cached_export(weights, str(self.input_size), lambda out: export_model(self.model, out, shape), what,
                             sha256=self.checkpoint_sha256)
        if path is not None:
            self.onnx = OnnxModel(path, threads=torch.get_num_threads(), batch_size=CLASSIFIER_CALL_BATCH)
        return self

    def state(self, meta: dict[str, Any] | None = None) -> dict[str, Any]:
        return {**self.describe(meta),
                "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()}}

    def describe(self, meta: dict[str, Any] | None = None) -> dict[str, Any]:
        """Every checkpoint key but the weights: what `load_classifier` needs to rebuild and preprocess."""
        return {
            "format": CHECKPOINT_FORMAT,
            "arch": self.arch,
            "input_size": int(self.input_size),
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
            **self.resize_state(),
            "threshold": float(self.threshold),
            **({"tta_threshold": float(self.tta_threshold)} if self.tta_threshold is not None else {}),
            "positive": self.positive,
            "pixel_size_um": float(self.pixel_size_um),
            "model_kwargs": dict(self.model_kwargs),
            "meta": dict(meta if meta is not None else self.meta),
        }

    def resize_state(self) -> dict[str, Any]:
        return {"interpolation": self.interpolation, "crop_pct": float(self.crop_pct)}

    def save(self, path: str | os.PathLike[str], meta: dict[str, Any] | None = None) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(self.state(meta), tmp)
        os.replace(tmp, path)
        return path


def dihedral_views(batch: torch.Tensor, count: int = 8) -> list[torch.Tensor]:
    """The 8 rotations/reflections of a (N, C, H, W) batch, the 4 plain rotations first; `count` 4 keeps those."""
    if count not in TTA_VIEW_COUNTS:
        raise ValueError(f"test-time views must be one of {TTA_VIEW_COUNTS}, got {count!r}")
    views = []
    for flipped in (batch, batch.flip(-1)):
        for k in range(4):
            views.append(torch.rot90(flipped, k, dims=(-2, -1)))
    return views[:count]


def _stored_resize(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's `interpolation` and `crop_pct`; a plain bilinear resize when absent (older checkpoints)."""
    return {"interpolation": state.get("interpolation", PLAIN_INTERPOLATION),
            "crop_pct": float(state.get("crop_pct", PLAIN_CROP_PCT))}


def resize_from_state(state: dict[str, Any], path: Path) -> dict[str, Any]:
    """`_stored_resize`, checked: WeightsError naming the file if it is not one `preprocess` can apply."""
    try:
        resize = _stored_resize(state)
        check_resize(**resize)
    except (TypeError, ValueError) as err:
        raise WeightsError(f"{path}: {err}") from None
    return resize


def preprocess_card(state: dict[str, Any]) -> dict[str, Any]:
    """What a model card says about a checkpoint's preprocessing (the checkpoint itself is what is used)."""
    resize = _stored_resize(state)
    side = resize_side(int(state["input_size"]), resize["crop_pct"])
    steps = f"resize to {side} x {side} px ({resize['interpolation']}, antialiased)"
    if side != int(state["input_size"]):
        steps += f", centre-crop {state['input_size']} x {state['input_size']} px"
    return {**resize, "steps": steps + ", normalise with mean/std", "mean": list(state["mean"]),
            "std": list(state["std"])}


def pixel_size_from_state(state: dict[str, Any], path: Path) -> float:
    """The checkpoint's training pixel size (µm/px), else its model card's, else `DEFAULT_PIXEL_SIZE_UM` (for
    checkpoints older than the field)."""
    value = state.get("pixel_size_um")
    if value is None:
        value = (read_model_card(path) or {}).get("pixel_size_um", DEFAULT_PIXEL_SIZE_UM)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise WeightsError(f"{path} is not a usable classifier checkpoint: 'pixel_size_um' is {value!r:.60}, "
                           "expected a positive number")
    return float(value)


def tta_threshold_from_state(state: dict[str, Any]) -> float | None:
    value = state.get("tta_threshold")
    return None if value is None else float(value)
