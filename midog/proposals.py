"""Proposal stage: an ultralytics YOLO detector on batches of tiles → candidate boxes in tile coordinates.

The model is loaded once from an ultralytics checkpoint (any YOLO11 size, or our LSConv/EMA model), fused once, and
called directly on batched tensors; NMS is ultralytics' own `non_max_suppression`, with the arguments its
`DetectionPredictor` passes, so a tile gives the boxes `YOLO.predict` would give for it. Tiles are read and checked
for tissue in a background thread while the model runs. On CUDA: channels-last, pinned host memory, fp16 autocast
when `proposals.half`; an out-of-memory error halves the batch and goes on.

On the CPU (`proposals.backend: auto`), the fused model is exported once to ONNX (fixed tile size, dynamic batch)
and run by ONNX Runtime, which is several times faster than PyTorch's eager CPU kernels for YOLO (see
docs/track1.md). The export is cached as `midog.onnx_runtime` caches every model it runs; a `<name>.onnx` beside
the checkpoint, written by `export_onnx`, is used as is. When the export fails (an operator ONNX lacks), the
PyTorch model runs instead, with a warning.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from midog.config import CHOICES, ProposalConfig, TilingConfig
from midog.devices import batches_halving_on_oom
from midog.errors import ConfigError, WeightsError, first_line
from midog.onnx_runtime import OnnxModel, cached_export, export_model, onnx_runtime_available
from midog.roi_io import RoiImage
from midog.tiling import read_tiles
from midog.weights import DEFAULT_PIXEL_SIZE_UM, read_model_card, verify_checksum

log = logging.getLogger(__name__)


@dataclass
class TileDetections:
    """Detections of one tile, in that tile's pixel coordinates."""

    origin: tuple[int, int]
    boxes: np.ndarray
    """(n, 4) float32 x1, y1, x2, y2, clipped to the tile."""
    scores: np.ndarray
    """(n,) float32 detector confidence."""
    classes: np.ndarray
    """(n,) int64 detector class index."""


@dataclass
class ProposalStats:
    tiles_total: int = 0
    tiles_run: int = 0
    """Tiles the detector saw; the others held no tissue."""
    batch_size: int = 0
    """The batch size in use at the end (smaller than configured after an out-of-memory error)."""


def register_custom_modules() -> None:
    """Make our custom YOLO blocks known to ultralytics, when the module that defines them is present."""
    try:
        from midog.yolo_modules import register_custom_modules as register
    except ImportError:
        return
    register()


def disable_ultralytics_sync() -> None:
    """ultralytics' `sync` setting off (no usage events, no crash reports), on top of YOLO_OFFLINE (midog/__init__)."""
    from ultralytics.utils import SETTINGS

    if SETTINGS.get("sync"):
        SETTINGS.update(sync=False)


def load_detector(path: str | os.PathLike[str], device: torch.device) -> torch.nn.Module:
    """An ultralytics checkpoint → its detection model, fused, in eval mode, on `device`.

    The checkpoint is a pickle (ultralytics' format): load only files from a trusted source; its model card's sha256
    is checked first.
    """
    path = Path(path)
    checked_sha256 = verify_checksum(path)
    register_custom_modules()
    from ultralytics.nn.tasks import load_checkpoint
    disable_ultralytics_sync()

    try:
        model, checkpoint = load_checkpoint(str(path), device="cpu")
    except Exception as err:  # torch/pickle raise many types for truncated or foreign files
        raise WeightsError(f"cannot load detector weights {path}: {first_line(err)}") from None
    if not hasattr(model, "fuse") or getattr(model, "task", "detect") != "detect":
        raise WeightsError(f"{path} is not an ultralytics detection checkpoint")
    model = model.fuse(verbose=False).eval().to(device)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.pixel_size_um = detector_pixel_size(checkpoint, path)
    model.checkpoint_sha256 = checked_sha256  # the ONNX export's cache key: the file is hashed once
    return model


def detector_pixel_size(checkpoint: Any, path: Path) -> float:
    """µm/px the detector was trained at: the checkpoint's `pixel_size_um` entry (`training.train_detector` writes
    it), else its model card's, else `DEFAULT_PIXEL_SIZE_UM`."""
    value = checkpoint.get("pixel_size_um") if isinstance(checkpoint, dict) else None
    if value is None:
        value = (read_model_card(path) or {}).get("pixel_size_um", DEFAULT_PIXEL_SIZE_UM)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise WeightsError(f"{path}: 'pixel_size_um' is {value!r:.60}, expected a positive number")
    return float(value)


class _OutputOnly(torch.nn.Module):
    """The detection model with only its prediction tensor as output (ultralytics also returns feature maps)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        preds = self.model(x)
        return preds[0] if isinstance(preds, (list, tuple)) else preds


def export_onnx(model: torch.nn.Module, path: str | os.PathLike[str], tile_size: int) -> Path:
    """Export a fused detection model to ONNX for `tile_size` tiles (the batch dimension stays dynamic)."""
    return export_model(_OutputOnly(model), path, (3, tile_size, tile_size), "images", "preds")


def onnx_detector(model: torch.nn.Module, weights: str | os.PathLike[str], tile_size: int,
                  threads: int = 0, batch_size: int = 1) -> OnnxModel | None:
    """ONNX Runtime for `model`, exported (or found) for `tile_size`; None when the runtime or the export fails.
    On CPUs one tile per call (`batch_size` 1) measured fastest: it stays in cache."""
    if not onnx_runtime_available("detector"):
        return None
    path = cached_export(weights, str(tile_size), lambda out: export_onnx(model, out, tile_size), "detector",
                         sha256=getattr(model, "checkpoint_sha256", None))
    return OnnxModel(path, threads, batch_size) if path is not None else None


def model_stride(model: torch.nn.Module) -> int:
    """The detector's largest stride (at least 32, YOLO11's): tile sides must be a multiple of it."""
    return int(max(getattr(model, "stride", torch.tensor([32.0])).max().item(), 32))


class YoloProposer:
    """Runs the detector on tiles. `propose` reads, filters and batches the tiles itself; `predict` takes pixels."""

    def __init__(self, model: torch.nn.Module, device: torch.device, config: ProposalConfig,
                 onnx: OnnxModel | None = None) -> None:
        self.model = model
        self.onnx = onnx
        self.device = device
        self.config = config
        self.batch_size = max(1, int(config.batch_size))
        self.stride = model_stride(model)
        self.pixel_size_um = float(getattr(model, "pixel_size_um", DEFAULT_PIXEL_SIZE_UM))
        """µm/px of the tiles the detector was trained on."""
        self.end2end = bool(getattr(model, "end2end", False))
        self.half = bool(config.half) and device.type == "cuda"
        self.channels_last = bool(config.channels_last) and onnx is None
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)

    @property
    def backend(self) -> str:
        return "onnxruntime" if self.onnx is not None else "torch"

    @classmethod
    def from_weights(cls, path: str | os.PathLike[str], device: torch.device, config: ProposalConfig,
                     tile_size: int = 512, threads: int = 0) -> "YoloProposer":
        """Load the checkpoint; on the CPU with `backend` auto or onnxruntime, run it through ONNX Runtime."""
        if config.backend not in CHOICES["proposals.backend"]:
            raise ValueError(f"unknown proposals.backend '{config.backend}'; expected auto, torch or onnxruntime")
        model = load_detector(path, device)
        stride = model_stride(model)
        if tile_size % stride:
            raise ConfigError(f"config tiling.tile_size is {tile_size}; the detector {Path(path).name} needs a "
                              f"multiple of its stride {stride} (e.g. {max(1, round(tile_size / stride)) * stride})")
        onnx = None
        if device.type == "cpu" and config.backend != "torch":
            onnx = onnx_detector(model, path, tile_size, threads, config.onnx_batch_size)
        return cls(model, device, config, onnx)

    # -- pixels → detections ------------------------------------------------------------------------------------------

    def to_tensor(self, tiles: np.ndarray) -> torch.Tensor:
        """(B, H, W, 3) uint8 RGB → (B, 3, H, W) float in [0, 1] on the device.

        ultralytics' numpy path expects BGR and flips it to RGB; we hand the model RGB tensors directly, as its
        tensor path does, so no flip happens anywhere in this module. The permuted NHWC buffer is already
        channels-last in memory.
        """
        batch = torch.from_numpy(tiles)
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        batch = batch.permute(0, 3, 1, 2).float().div_(255.0)
        return batch if self.channels_last else batch.contiguous()

    @torch.inference_mode()
    def predict(self, tiles: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Boxes (tile px, clipped), scores and classes for each of (B, H, W, 3) uint8 RGB tiles."""
        if tiles.shape[1] % self.stride or tiles.shape[2] % self.stride:
            raise ValueError(f"tile size {tiles.shape[1:3]} must be a multiple of the model stride {self.stride}")
        chunks, self.batch_size = batches_halving_on_oom(
            len(tiles), self.batch_size, lambda start, stop: self._predict_chunk(tiles[start:stop]), self.device,
            "detector")
        return [tile for chunk in chunks for tile in chunk]

    def _predict_chunk(self, tiles: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        from ultralytics.utils import nms

        batch = self.to_tensor(tiles)
        if self.onnx is not None and tuple(tiles.shape[1:3]) == self.onnx.input_hw:
            preds = self.onnx(batch)
        else:
            with torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.half):
                preds = self.model(batch)
            if isinstance(preds, (list, tuple)):
                preds = preds[0]
        # no time limit: ultralytics' default (2 s + 0.05 s per tile) returns the remaining tiles of a batch empty
        # on a busy CPU, with only a log warning
        detections = nms.non_max_suppression(
            preds.float(), self.config.confidence, self.config.nms_iou, self.config.classes, False,
            max_det=self.config.max_detections_per_tile, nc=0, end2end=self.end2end, max_time_img=float("inf"),
        )
        height, width = tiles.shape[1:3]
        result = []
        for det in detections:
            det = det.float().cpu()
            boxes = det[:, :4].clone()
            boxes[:, 0::2].clamp_(0, width)  # as ultralytics' Results: boxes clipped to the image they came from
            boxes[:, 1::2].clamp_(0, height)
            result.append((boxes.numpy().astype(np.float32), det[:, 4].numpy().astype(np.float32),
                           det[:, 5].numpy().astype(np.int64)))
        return result

    # -- image → detections per tile ------------------------------------------------------------------------------------

    def propose(self, image: RoiImage, origins: Sequence[tuple[int, int]], tiling: TilingConfig,
                progress: bool = True) -> tuple[list[TileDetections], ProposalStats]:
        """Detections of every tissue tile at `origins`; reading overlaps with the detector."""
        from midog.progress import progress_bar

        stats = ProposalStats(tiles_total=len(origins))
        results: list[TileDetections] = []
        with progress_bar(len(origins), "tiles", "tile", progress) as bar:
            for batch_origins, pixels, skipped in read_tiles(image, origins, tiling, self.batch_size):
                bar.update(skipped)
                if not batch_origins:
                    continue
                for origin, (boxes, scores, classes) in zip(batch_origins, self.predict(pixels)):
                    results.append(TileDetections(origin, boxes, scores, classes))
                stats.tiles_run += len(batch_origins)
                bar.update(len(batch_origins))
        stats.batch_size = self.batch_size
        return results, stats
