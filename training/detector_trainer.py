"""ultralytics' detection trainer, made to build our custom blocks and to apply random erasing.

Why a trainer class in its own importable module: for several GPUs ultralytics pickles the trainer's *class*, its
arguments and the built model (with cloudpickle) and starts `torch.distributed.run` on a generated script that
unpickles them in fresh worker processes. A class that lives in an importable module is pickled by reference, so
each worker imports this module and runs `MidogDetectionTrainer.__init__`, which calls
`register_custom_modules()` before anything is built from a YAML; the pickled model itself references
`midog.yolo_modules` by import path. (A class defined in the `__main__` of `python -m training.train_detector`
would be pickled by value instead, and nothing would register in the workers.) No sitecustomize, no edited files.

Offline: ultralytics downloads a font while checking the dataset (for plots, which we turn off) and, on CUDA with
`amp`, a yolo26n.pt to compare fp32 with autocast. Both are replaced while they run by offline checks
(`offline_checks`): no font is needed, and AMP is trusted except on the GPUs ultralytics itself lists as broken.

Random erasing: ultralytics applies its `erasing` argument to classification only. This trainer inserts
`DetectionErasing(p=args.erasing)` into the training dataset's transforms (before the final formatting), again after
mosaic closes, so `erasing` means the same for detection.
"""

from __future__ import annotations

import contextlib
import math
import random
import re
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import ultralytics.data.utils as data_utils
import ultralytics.engine.trainer as engine_trainer
from ultralytics.models.yolo.detect import DetectionTrainer

from midog.yolo_modules import register_custom_modules


@dataclass
class DetectionErasing:
    """Erase one random rectangle with noise (probability `p`) and drop the boxes it hides.

    The rectangle covers a fraction of the image drawn from `area`, with an aspect ratio (h/w) drawn log-uniformly
    from `aspect`, as torchvision's RandomErasing. A box stays labelled when at least `min_visible` of its area is
    left uncovered, so the detector is not taught to find figures that were painted over.
    """

    p: float
    area: tuple[float, float] = (0.02, 0.2)
    aspect: tuple[float, float] = (0.3, 3.3)
    min_visible: float = 0.4

    def __call__(self, labels: dict[str, Any]) -> dict[str, Any]:
        if self.p <= 0 or random.random() >= self.p:
            return labels
        img = labels["img"].copy()  # the loaded image may be shared with the dataset's RAM cache
        h, w = img.shape[:2]
        target = random.uniform(*self.area) * h * w
        ratio = math.exp(random.uniform(math.log(self.aspect[0]), math.log(self.aspect[1])))
        eh = max(1, min(h, round(math.sqrt(target * ratio))))
        ew = max(1, min(w, round(math.sqrt(target / ratio))))
        y0, x0 = random.randint(0, h - eh), random.randint(0, w - ew)
        img[y0 : y0 + eh, x0 : x0 + ew] = np.random.randint(0, 256, (eh, ew, *img.shape[2:]), dtype=img.dtype)
        labels["img"] = img
        instances = labels["instances"]
        if len(instances):
            instances.convert_bbox(format="xyxy")
            instances.denormalize(w, h)
            boxes = instances.bboxes
            inter_w = np.clip(np.minimum(boxes[:, 2], x0 + ew) - np.maximum(boxes[:, 0], x0), 0, None)
            inter_h = np.clip(np.minimum(boxes[:, 3], y0 + eh) - np.maximum(boxes[:, 1], y0), 0, None)
            area = np.clip((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 1e-6, None)
            keep = 1.0 - inter_w * inter_h / area >= self.min_visible
            labels["instances"] = instances[keep]
            labels["cls"] = labels["cls"][keep]
        return labels


AMP_BROKEN_GPUS = re.compile(r"(nvidia|geforce|quadro|tesla).*?(1660|1650|1630|t400|t550|t600|t1000|t1200|t2000|k40m)",
                             re.IGNORECASE)
"""ultralytics' own list (`check_amp`) of GPUs whose fp16 autocast gives NaN losses or zero mAP."""


def offline_check_amp(model: torch.nn.Module) -> bool:
    """`check_amp` without its download: AMP on accelerators, except the GPUs ultralytics lists as broken."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return False
    return not AMP_BROKEN_GPUS.search(torch.cuda.get_device_name(device))


@contextlib.contextmanager
def offline_checks() -> Iterator[None]:
    """ultralytics' font and AMP checks, which download, replaced by offline ones for the duration."""
    saved = data_utils.check_font, engine_trainer.check_amp
    data_utils.check_font = lambda *args, **kwargs: None  # fonts only serve plots, which our configs turn off
    engine_trainer.check_amp = offline_check_amp
    try:
        yield
    finally:
        data_utils.check_font, engine_trainer.check_amp = saved


class MidogDetectionTrainer(DetectionTrainer):
    """DetectionTrainer that registers the custom YOLO blocks and adds `DetectionErasing` to training images."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        register_custom_modules()  # also runs in every DDP worker, which rebuilds this trainer
        super().__init__(*args, **kwargs)

    def get_dataset(self) -> dict[str, Any]:
        with offline_checks():
            return super().get_dataset()

    def _do_train(self, *args: Any, **kwargs: Any) -> Any:
        """Setup (AMP check), epochs and final evaluation (dataset checks) in every process, DDP workers included."""
        with offline_checks():
            return super()._do_train(*args, **kwargs)

    def build_dataset(self, img_path: str, mode: str = "train", batch: int | None = None):
        dataset = super().build_dataset(img_path, mode, batch)
        if mode == "train":
            self._add_erasing(dataset)
        return dataset

    def _close_dataloader_mosaic(self) -> None:
        super()._close_dataloader_mosaic()  # rebuilds the dataset's transforms
        self._add_erasing(self.train_loader.dataset)

    def _add_erasing(self, dataset: Any) -> None:
        if self.args.erasing > 0 and getattr(dataset, "augment", False):
            dataset.transforms.insert(-1, DetectionErasing(p=float(self.args.erasing)))  # before Format
